"""Benchmark for a GPU machine: features on the GPU vs in host memory (``--feature-store``).

Edits the same clip with the recorded features kept on the device (``gpu``) and in pinned host
memory (``cpu``), on the full-size SD 2 depth architecture (random weights: no hub needed), and
prints per store: seconds per frame, peak GPU bytes (``torch.cuda.max_memory_allocated``), peak
feature bytes, and whether the frames are identical bit for bit. ``--cap-gb 6`` also runs both
stores with the process limited to 6 GB of the card (``set_per_process_memory_fraction``), what
a 6 GB card leaves an edit: ``cpu`` must fit there, ``gpu`` is expected not to.

    p2v make-tiny-models /tmp/models --full-size
    python scripts/bench_feature_store.py --model /tmp/models/sd2-depth-full --frames 4 --steps 50 --cap-gb 6

Needs CUDA; figures go in docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np


def run(model: str, store: str, frames, steps: int, size: int, cache: str) -> dict:
    import torch

    from p2v_runtime.editor import edit_clip
    from p2v_runtime.errors import GpuOutOfMemory
    from p2v_runtime.protocol import EditStats
    from p2v_runtime.settings import EditSettings

    settings = EditSettings(
        prompt="a red sports car",
        source_prompt="a car on a road",
        model=model,
        steps=steps,
        size=size,
        device="cuda",
        dtype="fp16",
        cache_dir=cache,
        feature_store=store,
    ).validate()
    stats = EditStats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    try:
        outputs = [rgb for _, rgb in edit_clip(frames, settings, stats=stats)]
    except GpuOutOfMemory as exc:
        return {"store": store, "out_of_memory": str(exc)}
    finally:
        torch.cuda.synchronize()
    return {
        "store": stats.feature_store,
        "seconds_per_frame": (time.perf_counter() - started) / len(frames),
        "peak_gpu_bytes": stats.peak_gpu_bytes,
        "feature_cache_bytes": stats.feature_cache_bytes,
        "inversion_cache_hits": stats.inversion_cache_hits,
        "outputs": outputs,
    }


def main(argv=None) -> int:
    import torch

    from p2v_runtime.bench import _clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SD 2 depth folder (p2v make-tiny-models DIR --full-size)")
    parser.add_argument("--input", help="folder or video (default: a synthetic clip)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cap-gb", type=float, default=0.0, help="also run limited to this much of the card")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_feature_store: needs a CUDA GPU", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="p2v-store-")
    import pathlib

    frames = _clip(argparse.Namespace(input=args.input, frames=args.frames, size=args.size), pathlib.Path(workdir))
    cache = f"{workdir}/cache"
    results = []
    run(args.model, "gpu", frames, args.steps, args.size, cache)  # warm-up: loads, inverts and caches
    caps = [0.0] + ([args.cap_gb] if args.cap_gb else [])
    total = torch.cuda.get_device_properties(0).total_memory
    for cap in caps:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total) if cap else 1.0)
        for store in ("gpu", "cpu"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            result = run(args.model, store, frames, args.steps, args.size, cache)
            result["cap_gb"] = cap or None
            results.append(result)
    torch.cuda.set_per_process_memory_fraction(1.0)
    reference = next(r["outputs"] for r in results if "outputs" in r)
    for result in results:
        outputs = result.pop("outputs", None)
        if outputs is not None:
            result["identical_to_first"] = all(np.array_equal(a, b) for a, b in zip(outputs, reference))
    figures = {
        "device": torch.cuda.get_device_name(0),
        "total_memory_bytes": total,
        "frames": len(frames),
        "steps": args.steps,
        "size": args.size,
        "runs": results,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
