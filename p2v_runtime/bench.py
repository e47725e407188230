"""`p2v bench`: this project's edit against plain depth-to-image, side by side in one run.

Prints per-frame time ratios (first edit, cached re-edit), UNet calls per frame, feature-cache
bytes, and where the time goes in each run (:class:`PartClock`: the UNet, the self-attention of
the injecting layers inside it and, inside those, assembling the injected keys and recording
features; the guided update, the scheduler, depth, the VAE, the text encoder, and the rest:
Python, resizing, the inversion cache). Performance targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# The breakdown's parts, in print order; indented ones are inside the part above them.
PARTS = (
    ("unet_batch2", "UNet, batch 2 (sampling)"),
    ("self_attention", "  self-attention of the injecting layers"),
    ("injected_kv", "    assembling the injected frames' features"),
    ("recording", "    recording features"),
    ("unet_batch1", "UNet, batch 1 (inversion)"),
    ("update", "guided update"),
    ("scheduler", "scheduler steps"),
    ("depth", "depth estimator (DPT)"),
    ("vae_encoder", "VAE encoder"),
    ("vae_decoder", "VAE decoder"),
    ("text_encoder", "text encoder"),
    ("other", "the rest (Python, resizing, cache files)"),
)
TOP_LEVEL = ("unet_batch2", "unet_batch1", "update", "scheduler", "depth", "vae_encoder", "vae_decoder", "text_encoder")


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
    parser.add_argument("--feature-store", default="gpu", help="where the edit keeps its features (gpu, cpu, auto)")
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
        feature_store=args.feature_store,
    )
    pipeline, _ = load_depth_pipeline(model, args.device, args.dtype)
    count = len(frames)
    size = working_size(*frames.size, args.size)
    clock = PartClock(pipeline, EditSettings(**settings).layers)

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
        with clock.run("plain"):
            started = time.perf_counter()
            for index in range(count):
                plain_edit(index)
            _sync(pipeline)
            plain_seconds = (time.perf_counter() - started) / count
        plain_calls = calls["n"] / count
    finally:
        handle.remove()

    def ours(name: str, prompt: str) -> tuple[float, EditStats]:
        stats = EditStats()
        with clock.run(name):
            started = time.perf_counter()
            for _ in edit_clip(frames, EditSettings(**{**settings, "prompt": prompt}), stats=stats):
                pass
            _sync(pipeline)
            seconds = (time.perf_counter() - started) / count
        return seconds, stats

    first_seconds, first = ours("first_edit", settings["prompt"])
    again_seconds, again = ours("reedit", "a wooden toy car")
    breakdown = clock.per_frame(count)
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
        "reedit_extra_seconds_per_frame": again_seconds - plain_seconds,
        "reedit_extra_self_attention_seconds_per_frame": breakdown["reedit"]["self_attention"]
        - breakdown["plain"]["self_attention"],
        "breakdown_seconds_per_frame": breakdown,
    }
    if args.full_size_features:
        figures.update(full_size_feature_bytes(steps=50))
    _print_table({k: v for k, v in figures.items() if k != "breakdown_seconds_per_frame"})
    print()
    print(breakdown_table(breakdown))
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


class PartClock:
    """Seconds spent in each part of a run (see ``PARTS``), by forward hooks on the pipeline's
    modules and by wrapping the editor's functions; on CUDA each boundary synchronises, so the
    parts are real but the whole runs a little slower than unobserved. The rest is the run's
    wall time minus the top-level parts."""

    def __init__(self, pipeline, layer_set: str):
        self.pipeline = pipeline
        self.layer_set = layer_set
        self.totals: dict[str, dict[str, float]] = {}
        self._seconds: dict[str, float] | None = None

    def _sync(self) -> None:
        _sync(self.pipeline)

    def _add(self, part: str, seconds: float) -> None:
        if self._seconds is not None:
            self._seconds[part] += seconds

    def _time_module(self, module, part_of) -> list:
        starts: list[float] = []

        def before(_module, args):
            self._sync()
            starts.append(time.perf_counter())

        def after(_module, args, output):
            self._sync()
            self._add(part_of(args), time.perf_counter() - starts.pop())

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _time_function(self, owner, name: str, part: str):
        raw = vars(owner).get(name)  # None when a class inherits it: then only the wrapper goes
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._sync()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self._add(part, time.perf_counter() - started)

        setattr(owner, name, timed)
        if raw is not None:
            return lambda: setattr(owner, name, raw)
        return lambda: delattr(owner, name)

    @contextlib.contextmanager
    def run(self, name: str):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        from . import editor
        from .attention import FeatureBank, FeatureStore, self_attention_layers

        pipe = self.pipeline.pipe
        handles = self._time_module(pipe.unet, lambda args: f"unet_batch{args[0].shape[0]}")
        for layer in self_attention_layers(pipe.unet, self.layer_set):
            handles += self._time_module(
                pipe.unet.get_submodule(layer.removesuffix(".processor")), lambda a: "self_attention"
            )
        handles += self._time_module(pipe.depth_estimator, lambda args: "depth")
        handles += self._time_module(pipe.vae.encoder, lambda args: "vae_encoder")
        handles += self._time_module(pipe.vae.decoder, lambda args: "vae_decoder")
        handles += self._time_module(pipe.text_encoder, lambda args: "text_encoder")
        undo = [
            self._time_function(FeatureBank, "injected", "injected_kv"),
            self._time_function(FeatureStore, "put", "recording"),
            self._time_function(editor, "x0_gradient", "update"),
            self._time_function(editor, "apply_update", "update"),
            self._time_function(editor, "autograd_gradient", "update"),
        ]
        for scheduler in {DDIMScheduler, DDIMInverseScheduler, type(pipe.scheduler)}:
            undo.append(self._time_function(scheduler, "step", "scheduler"))
        self._seconds = collections.defaultdict(float)
        started = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - started
            seconds, self._seconds = self._seconds, None
            for handle in handles:
                handle.remove()
            for restore in reversed(undo):
                restore()
            seconds["other"] = wall - sum(seconds[part] for part in TOP_LEVEL)
            seconds["wall"] = wall
            self.totals[name] = dict(seconds)

    def per_frame(self, count: int) -> dict[str, dict[str, float]]:
        return {
            run: {part: totals.get(part, 0.0) / count for part, _ in (*PARTS, ("wall", ""))}
            for run, totals in self.totals.items()
        }


def breakdown_table(breakdown: dict[str, dict[str, float]]) -> str:
    """Seconds per frame of each part in each run, and what the re-edit adds to plain."""
    runs = [run for run in ("plain", "first_edit", "reedit") if run in breakdown]
    width = max(len(label) for _, label in PARTS) + 2
    lines = [f"{'seconds per frame':<{width}}" + "".join(f"{run:>12}" for run in runs) + f"{'reedit-plain':>14}"]
    for part, label in (*PARTS, ("wall", "wall time")):
        values = "".join(f"{breakdown[run][part]:>12.3f}" for run in runs)
        extra = breakdown["reedit"][part] - breakdown["plain"][part] if {"reedit", "plain"} <= set(runs) else 0.0
        lines.append(f"{label:<{width}}{values}{extra:>+14.3f}")
    return "\n".join(lines)


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
