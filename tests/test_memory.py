"""Memory does not grow with clip length: frames are read lazily and no frame is kept.

Frames are 512x512 (768 KiB as RGB) while the edit works at 64: holding each input or output
frame would add 30 frames' worth from 10 to 40 frames, far above the run-to-run noise of peak RSS
(well under 1 MiB here). The tiny models' features are far too small to show in RSS: that only
the needed frames' features stay alive is tested in test_editor.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, synthetic_frames, tiny_edit_options, write_png_clip

SIDE = 512
FRAME_BYTES = SIDE * SIDE * 3


def peak_rss_of_edit(tiny_models, tmp_path, count: int) -> int:
    clip = write_png_clip(tmp_path / f"clip{count}", synthetic_frames(count, width=SIDE, height=SIDE))
    stats = tmp_path / f"stats{count}.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "edit",
            str(clip),
            "--out",
            str(tmp_path / f"out{count}"),
            "--prompt",
            "a red sports car",
            "--source-prompt",
            "a car",
            "--stats",
            str(stats),
            *tiny_edit_options(tiny_models, tmp_path / "cache"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(stats.read_text())
    assert values["frames"] == count
    return values["peak_rss_bytes"]


def test_peak_memory_does_not_grow_with_clip_length(tiny_models, tmp_path):
    short = peak_rss_of_edit(tiny_models, tmp_path, 10)
    long = peak_rss_of_edit(tiny_models, tmp_path, 40)
    growth = long - short
    assert growth < 10 * FRAME_BYTES, f"peak RSS grew by {growth / FRAME_BYTES:.1f} frames' worth from 10 to 40 frames"


def test_peak_memory_is_the_process_own_not_its_parents():
    """A runtime started by a large process (Blender) reports its own peak: on Linux ``ru_maxrss``
    starts at the parent's resident size when the child is spawned."""
    ballast = b"\x01" * (1024 * 1024 * 1024)  # 1 GiB resident in this process while it spawns
    done = subprocess.run(
        [sys.executable, "-c", "from p2v_runtime.editor import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    del ballast
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 900 * 1024 * 1024  # importing torch and the editor takes far less
