"""The demo clip renders with bpy into frames + a true Z pass that `p2v edit --depth` reads.

Runs scripts/render_demo_clip.py in a subprocess (bpy stays out of the test process) at a tiny
size; skipped where bpy is not installed. Also checks demo.sh's argument errors, which are
reported before it sets up anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

SCRIPT = REPO / "scripts" / "render_demo_clip.py"
SIZE, FRAMES = 64, 2


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("bpy is not installed")
    out = tmp_path_factory.mktemp("demo-clip")
    done = _run(str(out), "--size", str(SIZE), "--frames", str(FRAMES), "--samples", "1", "--no-denoise")
    if done.returncode != 0 and "bpy is not importable" in done.stderr:
        pytest.skip("bpy cannot be imported")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == FRAMES + 1, "one progress line a frame and a summary, none of Blender's own"
    for index, line in enumerate(lines[:FRAMES]):
        assert line.startswith(f"render_demo_clip: frame {index + 1}/{FRAMES} in ")
    assert "background (Z=1e10)" in lines[-1]
    return out


def test_frames_are_rgb_pngs_of_the_requested_size(rendered):
    from p2v_runtime.frames import open_frames

    pngs = sorted((rendered / "frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(FRAMES)]
    for path in pngs:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    clip = open_frames(rendered / "frames")
    first, last = clip.read(0), clip.read(FRAMES - 1)
    assert first.std() > 10, "the frame should show a scene, not a flat colour"
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 2, "the camera should move between frames"
    # Sky at the top (blue over red), the car (red) in the middle.
    top = first[:4].reshape(-1, 3).mean(axis=0)
    assert top[2] > top[0] + 30
    middle = first[SIZE // 3 : 2 * SIZE // 3, SIZE // 4 : 3 * SIZE // 4].reshape(-1, 3).astype(int)
    assert ((middle[:, 0] > 100) & (middle[:, 0] > middle[:, 2] + 50)).any()


def test_depth_is_a_true_z_pass_that_open_depth_reads(rendered):
    pytest.importorskip("OpenEXR")
    from p2v_runtime.frames import open_depth

    depth = open_depth(rendered / "depth", FRAMES, (SIZE, SIZE))
    assert len(depth) == FRAMES
    for z in depth:
        assert z.shape == (SIZE, SIZE) and z.dtype == np.float32
        sky = z >= 1e9
        assert sky[0].all(), "the top row sees only the world: Blender's background Z is 1e10"
        assert not sky[-1].any(), "the bottom row sees the ground"
        assert 0.1 < sky.mean() < 0.8
        objects = z[~sky]
        assert np.isfinite(objects).all() and objects.min() > 0.5 and objects.max() < 100
        # The car in the centre is nearer than the ground at the horizon behind it, and the
        # ground gets farther from the bottom of the frame towards the horizon.
        horizon_row = int(np.argmax(~sky[:, 1]))  # first row from the top that sees the ground
        assert z[SIZE // 2, SIZE // 2] < z[horizon_row + 1, 1]
        assert z[-1, 1] < z[horizon_row + 1, 1]


def test_clip_json_names_the_parameters_and_reuse_skips_rendering(rendered):
    stamp = json.loads((rendered / "clip.json").read_text())
    assert (stamp["frames"], stamp["size"], stamp["samples"], stamp["denoise"]) == (FRAMES, SIZE, 1, False)
    assert stamp["fps"] > 0
    before = {p: p.stat().st_mtime_ns for p in rendered.rglob("*") if p.is_file()}
    done = _run(
        str(rendered),
        "--size",
        str(SIZE),
        "--frames",
        str(FRAMES),
        "--samples",
        "1",
        "--no-denoise",
        "--reuse",
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("render_demo_clip: reusing ")
    assert {p: p.stat().st_mtime_ns for p in rendered.rglob("*") if p.is_file()} == before


def test_reuse_refuses_a_clip_rendered_with_other_parameters(rendered, tmp_path):
    from scripts_render_demo_clip import already_rendered, parse_args, wanted_stamp  # type: ignore[import-not-found]

    same = parse_args([str(rendered), "--size", str(SIZE), "--frames", str(FRAMES), "--samples", "1", "--no-denoise"])
    assert already_rendered(rendered, wanted_stamp(same))
    for changed in (["--frames", "3"], ["--size", "32"], ["--samples", "2"], ["--denoise"]):
        args = parse_args(
            [str(rendered), "--size", str(SIZE), "--frames", str(FRAMES), "--samples", "1", "--no-denoise", *changed]
        )
        assert not already_rendered(rendered, wanted_stamp(args)), changed
    assert not already_rendered(tmp_path / "nothing-here", wanted_stamp(same))


@pytest.fixture(autouse=True)
def _script_module(monkeypatch):
    """render_demo_clip.py importable as a module (it imports bpy only when rendering)."""
    spec = importlib.util.spec_from_file_location("scripts_render_demo_clip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "scripts_render_demo_clip", module)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "zero"], "--frames must be a whole number"),
        (["--frames", "0"], "--frames must be a whole number"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_demo_sh_reports_bad_arguments_in_one_line(args, message):
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("p2v demo: error: ") and message in done.stderr
