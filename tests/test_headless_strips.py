"""The headless script with several strips in one run (``--strip A --strip B``, ``--all-selected``):
each strip its own job and its own result strip, every strip checked before the first renders, a
failed strip not stopping the others, one save at the end, stats per strip, and a pool's queue
places printed. Real Blender (bpy 5.0.1 and 4.2 LTS), the real runtime subprocess with the tiny
models, or tests/fake_pool.py for the queue and for failures."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import blender_helpers as bh
import pytest
from fake_pool import FakePool

# The .blend fixture of the add-on tests (and the built add-on it needs), shared rather than copied;
# tests taking it as an argument redefine the imported name, hence F811 ignored for this file.
from test_addon import VERSIONS, _strips_in, _tiny_args, blend_files, built_addon  # noqa: F401

REPO = bh.REPO
pytestmark = pytest.mark.blender


def _python(version: str) -> Path:
    python = bh.bpy_python(version)
    if python is None:
        pytest.skip(f"bpy {version} is not installed")
    return python


def _headless(python: Path, args: list[str], tmp_path: Path, token: str = "") -> subprocess.CompletedProcess:
    env = bh.bpy_env(tmp_path / "blender-user")
    env["P2V_RUNTIME_PYTHON"] = str(bh.RUNTIME_PYTHON)
    if token:
        env["P2V_TOKEN"] = token
    return subprocess.run(
        [str(python), str(REPO / "scripts" / "p2v_blender.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _select(python: Path, blend: Path, names: list[str], tmp_path: Path) -> None:
    """Save ``blend`` with exactly the strips ``names`` selected in the Edit scene."""
    code = (
        "import bpy\n"
        f"bpy.ops.wm.open_mainfile(filepath={str(blend)!r})\n"
        "e = bpy.data.scenes['Edit'].sequence_editor\n"
        "c = e.strips_all if hasattr(e, 'strips_all') else e.sequences_all\n"
        f"for s in c: s.select = s.name in {names!r}\n"
        "bpy.ops.wm.save_mainfile()\n"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=bh.bpy_env(tmp_path / "blender-user")
    )
    assert done.returncode == 0, done.stderr


def _copy(blend_files, version: str, tmp_path: Path) -> Path:
    blend = tmp_path / "shot.blend"
    shutil.copy(blend_files(version), blend)
    return blend


def _new_strips(python: Path, blend: Path, before: dict, tmp_path: Path) -> dict:
    """{source: (length, frame files)} of the result strips added to ``blend``."""
    after = _strips_in(python, blend, tmp_path)
    return {v[5]: (v[2], v[4]) for name, v in after.items() if name not in before}


@pytest.mark.parametrize("version", VERSIONS)
def test_two_strips_in_one_run_make_two_strips_and_one_save(version, blend_files, tiny_models, tmp_path):
    python = _python(version)
    blend = _copy(blend_files, version, tmp_path)
    before = _strips_in(python, blend, tmp_path)
    stats = tmp_path / "stats.json"
    args = ["--blend", str(blend), "--strip", "mov", "--strip", "img", "--prompt", "a red car"]
    args += ["--frames", "0:2", "--save", "--stats", str(stats), *_tiny_args(tiny_models)]
    done = _headless(python, args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("p2v_blender: ")]
    editing = [line for line in lines if line.startswith("p2v_blender: editing")]
    assert [line.split("'")[1] for line in editing] == ["mov", "img"]  # in the order given
    assert sum(line.startswith("p2v_blender: saved: ") for line in lines) == 1
    assert lines[-1] == "p2v_blender: 2 of 2 strip(s) edited"
    assert _new_strips(python, blend, before, tmp_path) == {
        "mov": (2, ["000000.png", "000001.png"]),
        "img": (2, ["000000.png", "000001.png"]),
    }
    found = json.loads(stats.read_text())["strips"]
    assert sorted(found) == ["img", "mov"]
    assert all(entry["state"] == "done" and entry["frames"] == 2 for entry in found.values())
    assert all(entry["stats"]["frames"] == 2 for entry in found.values())


@pytest.mark.parametrize("version", VERSIONS)
def test_all_selected_on_a_pool_prints_the_queue_and_edits_each_strip(version, blend_files, tmp_path):
    python = _python(version)
    blend = _copy(blend_files, version, tmp_path)
    _select(python, blend, ["mov", "img", "txt"], tmp_path)  # a text strip is not one Pix2Video edits
    before = _strips_in(python, blend, tmp_path)
    with FakePool(positions=(2, 1), wait=0.6) as pool:
        args = ["--blend", str(blend), "--all-selected", "--prompt", "x", "--frames", "0:2", "--save"]
        done = _headless(python, [*args, "--server", pool.address], tmp_path, token=pool.token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(pool.jobs) == 2 and all(job["queue"] is True for job in pool.jobs)
    lines = done.stdout.splitlines()
    editing = [line.split("'")[1] for line in lines if line.startswith("p2v_blender: editing")]
    assert editing == ["img", "mov"]  # timeline order
    for name in editing:
        mine = [line for line in lines if line.startswith(f"p2v_blender: '{name}': ")]
        assert any(line.endswith("queued, 1 ahead)") for line in mine), lines
        assert any(line.endswith("queued, next to start)") for line in mine), lines
    assert set(_new_strips(python, blend, before, tmp_path)) == {"img", "mov"}


def test_every_strip_is_checked_before_anything_renders(blend_files, tmp_path):
    python = _python("5.0")
    blend = _copy(blend_files, "5.0", tmp_path)
    original = blend.read_bytes()
    with FakePool() as pool:
        args = ["--blend", str(blend), "--strip", "mov", "--strip", "nope", "--strip", "txt", "--prompt", "x"]
        done = _headless(python, [*args, "--save", "--server", pool.address], tmp_path, token=pool.token)
        assert pool.jobs == []
    errors = [line for line in done.stderr.splitlines() if line.startswith("p2v_blender: error:")]
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(errors) == 2, errors
    assert "has no strip named 'nope'" in errors[0] and "'txt' is a text strip" in errors[1]
    assert "editing" not in done.stdout
    assert blend.read_bytes() == original and not (tmp_path / "p2v").exists()


def test_a_failed_strip_keeps_its_frames_and_the_next_one_runs(blend_files, tmp_path):
    python = _python("5.0")
    blend = _copy(blend_files, "5.0", tmp_path)
    before = _strips_in(python, blend, tmp_path)
    stats = tmp_path / "stats.json"
    with FakePool(positions=(), fail_after=1) as pool:
        args = ["--blend", str(blend), "--strip", "mov", "--strip", "img", "--prompt", "x", "--frames", "0:3"]
        args += ["--save", "--stats", str(stats), "--server", pool.address]
        done = _headless(python, args, tmp_path, token=pool.token)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("p2v_blender: error:")]
    assert len(errors) == 1 and "the pool failed at frame 1" in errors[0] and "1 frame(s) kept" in errors[0]
    assert done.stdout.splitlines()[-1] == "p2v_blender: 1 of 2 strip(s) edited"
    assert _new_strips(python, blend, before, tmp_path) == {
        "mov": (1, ["000000.png"]),
        "img": (3, ["000000.png", "000001.png", "000002.png"]),
    }
    found = json.loads(stats.read_text())["strips"]
    assert (found["mov"]["state"], found["mov"]["frames"]) == ("failed", 1)
    assert (found["img"]["state"], found["img"]["frames"]) == ("done", 3)
