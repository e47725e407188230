"""`p2v bench`: this project's edit against plain depth-to-image, side by side in one run.

Prints per-frame time ratios (first edit, cached re-edit), UNet calls per frame and feature-cache
bytes per frame. Performance targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="folder or video to edit (default: a synthetic clip)")
    parser.add_argument("--frames", type=int, default=6, help="frames to edit")
    parser.add_argument("--model", help="depth model id or folder (default: tiny models built on the fly)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--full-size-features",
        action="store_true",
        help="also measure feature-cache bytes of the full-size SD 2 depth UNet at 512x512 "
        "(random weights; about a minute on a CPU)",
    )
    parser.add_argument("--json", help="write the figures as JSON")


def bench_main(args: argparse.Namespace) -> int:
    from .editor import edit_clip
    from .frames import resize_rgb, working_size
    from .models import load_depth_pipeline
    from .protocol import EditStats
    from .settings import EditSettings

    workdir = Path(tempfile.mkdtemp(prefix="p2v-bench-"))
    model = args.model or str(_tiny_model(workdir))
    frames = _clip(args, workdir)
    settings = dict(
        prompt="a red sports car",
        source_prompt="a car on a road",
        model=model,
        steps=args.steps,
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        cache_dir=str(workdir / "cache"),
    )
    pipeline, _ = load_depth_pipeline(model, args.device, args.dtype)
    count = len(frames)
    size = working_size(*frames.size, args.size)

    calls = {"n": 0}
    handle = pipeline.unet.register_forward_pre_hook(lambda module, inputs: calls.__setitem__("n", calls["n"] + 1))
    try:
        from PIL import Image

        def plain_edit(index: int):
            image = Image.fromarray(resize_rgb(frames.read(index), size))
            pipeline.pipe(
                prompt=settings["prompt"],
                image=image,
                strength=1.0,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="np",
            )

        plain_edit(0)  # warm-up: first calls pay for allocations and kernel selection
        _sync(pipeline)
        calls["n"] = 0
        started = time.perf_counter()
        for index in range(count):
            plain_edit(index)
        _sync(pipeline)
        plain_seconds = (time.perf_counter() - started) / count
        plain_calls = calls["n"] / count
    finally:
        handle.remove()

    def ours(prompt: str) -> tuple[float, EditStats]:
        stats = EditStats()
        started = time.perf_counter()
        for _ in edit_clip(frames, EditSettings(**{**settings, "prompt": prompt}), stats=stats):
            pass
        _sync(pipeline)
        return (time.perf_counter() - started) / count, stats

    first_seconds, first = ours(settings["prompt"])
    again_seconds, again = ours("a wooden toy car")
    figures = {
        "device": pipeline.device,
        "dtype": first.dtype,
        "model": model,
        "frames": count,
        "steps": args.steps,
        "working_size": list(size),
        "plain_seconds_per_frame": plain_seconds,
        "first_edit_seconds_per_frame": first_seconds,
        "reedit_seconds_per_frame": again_seconds,
        "first_edit_vs_plain": first_seconds / plain_seconds,
        "reedit_vs_plain": again_seconds / plain_seconds,
        "reedit_vs_first_edit": again_seconds / first_seconds,
        "plain_unet_calls_per_frame": plain_calls,
        "first_edit_unet_calls_per_frame": first.unet_calls / count,
        "reedit_unet_calls_per_frame": again.unet_calls / count,
        "feature_store": first.feature_store,
        "feature_cache_bytes_peak": first.feature_cache_bytes,
        "feature_cache_bytes_per_frame": _feature_bytes_per_frame(pipeline, settings, size),
        "peak_rss_bytes": first.peak_rss_bytes,
        "peak_gpu_bytes": first.peak_gpu_bytes,
    }
    if args.full_size_features:
        figures.update(full_size_feature_bytes(steps=50))
    _print_table(figures)
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


def _feature_bytes_per_frame(pipeline, settings: dict, size: tuple[int, int]) -> int:
    """One frame's recorded features (every step) at the bench's working size, from the layout."""
    import torch

    from .attention import feature_bytes_per_step, self_attention_layers

    scale = pipeline.pipe.vae_scale_factor
    layers = self_attention_layers(pipeline.unet, "decoder")
    element = torch.empty((), dtype=pipeline.dtype).element_size()
    latent_hw = (size[1] // scale, size[0] // scale)
    return feature_bytes_per_step(pipeline.unet, layers, latent_hw, element) * settings["steps"]


def full_size_feature_bytes(steps: int = 50, height: int = 512, width: int = 512) -> dict:
    """Feature-cache bytes per frame of SD 2 depth at 512x512, fp16, decoder layers, both branches.

    Records one real denoising step of the full-size UNet (random weights) through the project's
    own processors, then scales by the step count and from fp32 to fp16 (2 bytes a value); the
    bytes are exactly linear in both. The layout formula (``feature_bytes_per_step``) must agree.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from .attention import FeatureBank, feature_bytes_per_step, injection_installed, self_attention_layers
    from .plan import plan_edit
    from .replica_models import reference_config

    config = reference_config("sd2-depth/unet/config.json")  # the published UNet
    unet = UNet2DConditionModel.from_config(config).eval()
    latent = torch.randn(2, 5, height // 8, width // 8)
    text = torch.randn(2, 77, config["cross_attention_dim"])
    plan = plan_edit(2, 0, "anchor")  # the anchor records: frame 1 reads it
    result = {}
    for layers in ("decoder", "all"):
        chosen = self_attention_layers(unet, layers)
        bank = FeatureBank(plan)
        bank.begin_turn(plan.turns[0])
        with torch.no_grad(), injection_installed(unet, chosen, bank):
            unet(latent, 10, encoder_hidden_states=text)
        fp16_bytes_per_step = bank.peak_bytes // 2
        if fp16_bytes_per_step != feature_bytes_per_step(unet, chosen, (height // 8, width // 8), 2):
            raise RuntimeError("the feature-size formula disagrees with a recorded step")
        result[f"sd2_512_fp16_feature_bytes_per_frame_{layers}"] = fp16_bytes_per_step * steps
    return result


def _tiny_model(workdir: Path) -> Path:
    from .tiny_models import write_tiny_models

    return write_tiny_models(workdir / "tiny")["sd2-depth"]


def _clip(args, workdir: Path):
    from .frames import open_frames

    if args.input:
        return open_frames(args.input, f"0:{args.frames}")
    from PIL import Image

    folder = workdir / "clip"
    folder.mkdir()
    for index in range(args.frames):
        image = np.zeros((args.size, args.size, 3), np.uint8)
        image[..., 0] = np.linspace(0, 255, args.size, dtype=np.uint8)[None, :]
        side = args.size // 3
        x = (index * args.size // 32) % (args.size - side)
        image[side : 2 * side, x : x + side] = (220, 40, 40)
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    return open_frames(folder)


def _sync(pipeline) -> None:
    if pipeline.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _print_table(figures: dict) -> None:
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        if isinstance(value, float):
            text = f"{value:.3f}"
        elif isinstance(value, int) and "bytes" in key:
            text = f"{value:,} ({value / 2**30:.3f} GiB)"
        else:
            text = str(value)
        print(f"{key:<{width}}  {text}")
