"""Benchmark: peak resident memory of `p2v edit` against clip length (10, 40, 120 frames).

Pix2Video's edit is sequential and keeps only the features a later frame reads (about two
frames' worth), and frames are read lazily, so peak memory should not grow with the clip. Each length runs in a
fresh subprocess of `p2v edit --stats` (peak RSS is a per-process high-water mark) on the tiny
random-weight models at a small size, so the whole table takes a few minutes on a CPU. What the
table shows is the growth, not the absolute figure: the tiny models are a few MB, the real SD 2
depth is about 5 GB.

    python scripts/bench_memory.py [--clip ../shared/data/woman-running.mp4] [--lengths 10,40,120]

Without the shared data folder (and no --clip), it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = REPO.parent / "shared" / "data" / "woman-running.mp4"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", help=f"video or frame folder (default {DEFAULT_CLIP}, 120 frames)")
    parser.add_argument("--lengths", default="10,40,120", help="clip lengths to edit (frames 0:N)")
    parser.add_argument("--size", type=int, default=64, help="working size (default 64)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (default 2)")
    parser.add_argument("--models", help="folder holding tiny models (sd2-depth); default: built in a temp folder")
    parser.add_argument("--json", help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clip = Path(args.clip) if args.clip else DEFAULT_CLIP
    if not clip.exists():
        why = "not found" if args.clip else "not found (the shared data folder is absent; pass --clip)"
        print(f"bench_memory: {clip} {why}; skipped", file=sys.stderr)
        return 0
    lengths = sorted({int(n) for n in args.lengths.split(",") if n.strip()})
    with tempfile.TemporaryDirectory(prefix="p2v-bench-memory-") as scratch:
        work = Path(scratch)
        model = Path(args.models) / "sd2-depth" if args.models else build_tiny_model(work)
        available = count_frames(clip)
        rows = []
        for length in lengths:
            if length > available:
                print(f"bench_memory: {clip.name} has {available} frames; {length} skipped", file=sys.stderr)
                continue
            rows.append(run_edit(clip, length, model, work, args.size, args.steps))
            print(f"bench_memory: {length} frames done in {rows[-1]['wall_seconds']:.0f} s", file=sys.stderr)
    print(format_table(rows, clip, args.size, args.steps))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def build_tiny_model(work: Path) -> Path:
    from p2v_runtime.tiny_models import write_tiny_models

    return write_tiny_models(work / "models")["sd2-depth"]


def count_frames(clip: Path) -> int:
    from p2v_runtime.frames import open_frames

    return len(open_frames(clip))


def run_edit(clip: Path, length: int, model: Path, work: Path, size: int, steps: int) -> dict:
    """One `p2v edit --stats` in its own process, so its peak RSS is its own."""
    stats = work / f"stats-{length}.json"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "p2v_runtime.cli",
        "edit",
        str(clip),
        "--frames",
        f"0:{length}",
        "--out",
        str(work / f"out-{length}"),
        "--prompt",
        "a marble sculpture of a woman running",
        "--source-prompt",
        "a woman running",
        "--model",
        str(model),
        "--size",
        str(size),
        "--steps",
        str(steps),
        "--device",
        "cpu",
        "--quiet",
        "--stats",
        str(stats),
        "--cache-dir",
        str(work / f"cache-{length}"),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"bench_memory: p2v edit failed for {length} frames:\n{result.stderr.strip()[-2000:]}")
    values = json.loads(stats.read_text(encoding="utf-8"))
    return {
        "frames": values["frames"],
        "peak_rss_bytes": values["peak_rss_bytes"],
        "feature_cache_bytes": values["feature_cache_bytes"],
        "seconds": values["seconds"],
        "seconds_per_frame": values["seconds_per_frame"],
        "wall_seconds": time.perf_counter() - started,
    }


def format_table(rows: list[dict], clip: Path, size: int, steps: int) -> str:
    lines = [
        f"peak RSS of `p2v edit` vs clip length: {clip.name}, tiny models, size {size}, steps {steps}, cpu",
        "",
        "| frames | peak RSS (MiB) | vs shortest | feature cache (KiB) | edit s | s/frame |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["peak_rss_bytes"] if rows else None
    for row in rows:
        rss = row["peak_rss_bytes"]
        lines.append(
            f"| {row['frames']} | {rss / 2**20:.1f} | {rss / base:.3f} | {row['feature_cache_bytes'] / 1024:.1f} | "
            f"{row['seconds']:.1f} | {row['seconds_per_frame']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
