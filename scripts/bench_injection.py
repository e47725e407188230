"""Benchmark: what one denoising step costs with injection, against the plain UNet, interleaved.

The inherent cost of the method over plain depth-to-image is the attention of the injecting
layers over the anchor's and the previous frame's features (twice the keys of plain
self-attention, and their K/V projections). This measures it on one batch-2 UNet call, the
sampling step of every frame, with the same inputs in three modes, taking turns so that other
processes on a shared machine slow all three alike:

* ``plain``: the UNet's own processors;
* ``recording``: the anchor's step (features recorded, no injection);
* ``injecting``: a later frame's step (K/V from the anchor and the previous frame).

It prints the median seconds per call of each, the extra of injecting over plain, and the
attention work the extra keys add (multiply-adds of QK^T, AV and the K/V projections of the
injected tokens, per layer), next to the UNet's total. Random weights: no hub needed.

    p2v make-tiny-models /tmp/models --full-size
    python scripts/bench_injection.py --model /tmp/models/sd2-depth-full --size 256 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    import torch

    from p2v_runtime.attention import FeatureBank, injection_installed, self_attention_layers
    from p2v_runtime.models import load_depth_pipeline
    from p2v_runtime.plan import Turn, plan_edit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SD 2 depth folder")
    parser.add_argument("--size", type=int, default=256, help="square working size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="calls of each mode, taking turns")
    parser.add_argument("--layers", default="decoder")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)

    pipeline, _ = load_depth_pipeline(args.model, args.device, args.dtype)
    unet, device, dtype = pipeline.unet, pipeline.device, pipeline.dtype
    side = args.size // pipeline.pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, unet.config.in_channels, side, side, generator=generator).to(device, dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    layers = self_attention_layers(unet, args.layers)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # Frames 0 (anchor) and 1 recorded at step 0; frame 2's step reads both.
    plan = plan_edit(3, 0, "anchor+previous")
    bank = FeatureBank(plan)
    with torch.no_grad():
        for turn in plan.turns[:2]:
            bank.begin_turn(turn)
            with injection_installed(unet, layers, bank):
                unet(latent, timestep, encoder_hidden_states=text)
            bank.end_turn()
    recording_turn = Turn(position=0, index=9, previous=None, sources=(), record=True, keep_x0=False)
    injecting_turn = Turn(position=2, index=2, previous=1, sources=(0, 1), record=False, keep_x0=False)

    def call(mode: str) -> float:
        """One UNet call; the processors are installed (once a frame in an edit) outside the timing."""
        with contextlib.ExitStack() as installed, torch.no_grad():
            if mode != "plain":
                bank.begin_turn(recording_turn if mode == "recording" else injecting_turn)
                installed.enter_context(injection_installed(unet, layers, bank))
            sync()
            started = time.perf_counter()
            unet(latent, timestep, encoder_hidden_states=text)
            sync()
            elapsed = time.perf_counter() - started
        bank.end_turn()
        bank.store.drop(9, 0)
        return elapsed

    modes = ("plain", "recording", "injecting")
    for mode in modes:  # warm-up
        call(mode)
    seconds = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            seconds[mode].append(call(mode))
    median = {mode: statistics.median(values) for mode, values in seconds.items()}

    # The work the injected keys add, per layer and in all: the second frame's tokens in K/V.
    extra_macs = 0
    unet_layers = []
    for name in layers:
        module = unet.get_submodule(name.removesuffix(".processor"))
        tokens = bank.store.tensors[(0, 0)][name].shape[1]
        width = module.to_q.in_features
        attention = 2 * 2 * tokens * tokens * width  # QK^T and AV against N more keys, 2 branches
        projection = 2 * 2 * tokens * width * module.to_k.out_features  # K and V of N more tokens
        extra_macs += attention + projection
        unet_layers.append({"layer": name, "tokens": tokens, "width": width, "extra_macs": attention + projection})
    figures = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "rounds": args.rounds,
        "median_seconds": median,
        "min_seconds": {mode: min(values) for mode, values in seconds.items()},
        "max_seconds": {mode: max(values) for mode, values in seconds.items()},
        "injecting_vs_plain": median["injecting"] / median["plain"],
        "recording_vs_plain": median["recording"] / median["plain"],
        "injected_extra_seconds": median["injecting"] - median["plain"],
        "injected_extra_gmacs": extra_macs / 1e9,
        "layers": unet_layers,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "layers"}, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
