"""Memory does not grow with clip length: frames are read lazily, only needed features are kept."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, synthetic_frames, write_png_clip


def peak_rss_of_edit(tiny_models, tmp_path, count: int) -> int:
    clip = write_png_clip(tmp_path / f"clip{count}", synthetic_frames(count, width=96, height=96))
    stats = tmp_path / f"stats{count}.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "p2v_runtime.cli", "edit", str(clip), "--out", str(tmp_path / f"out{count}"),
            "--prompt", "a red sports car", "--source-prompt", "a car", "--model", str(tiny_models["sd2-depth"]),
            "--size", "64", "--steps", "2", "--device", "cpu", "--quiet", "--stats", str(stats),
            "--cache-dir", str(tmp_path / "cache"),
        ],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(stats.read_text())
    assert values["frames"] == count
    return values["peak_rss_bytes"]


def test_peak_rss_for_40_frames_is_within_10_percent_of_10_frames(tiny_models, tmp_path):
    short = peak_rss_of_edit(tiny_models, tmp_path, 10)
    long = peak_rss_of_edit(tiny_models, tmp_path, 40)
    assert long <= short * 1.10, (short, long)
