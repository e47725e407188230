"""Helpers for the add-on tests: the bpy Pythons, test media, the built add-on, running scenarios.

bpy never runs in the pytest process: every Blender check runs in a subprocess with one of the
Pythons that have the bpy module (5.0.1 in ``.venv``, 4.2 LTS in ``.venv-bpy42``, made by
scripts/test.sh), which keeps the two Blender versions and torch apart.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUNTIME_PYTHON = REPO / ".venv" / "bin" / "python"
BPY_PYTHONS = {
    "5.0": REPO / ".venv" / "bin" / "python",
    "4.2": REPO / ".venv-bpy42" / "bin" / "python",
}
WIDTH, HEIGHT = 80, 48
IMAGE_FRAMES = 10
MOVIE_FRAMES = 12


@functools.cache
def bpy_python(version: str) -> Path | None:
    """The Python with bpy ``version``, or None when it is not installed here."""
    python = BPY_PYTHONS[version]
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('bpy') is None)"],
        capture_output=True,
    )
    return python if done.returncode == 0 else None


def base_python() -> str:
    """The interpreter the venv was made from: no p2v_runtime, no bpy, no torch."""
    candidate = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(candidate)


def image_frame(index: int) -> np.ndarray:
    """Distinct per frame: a red level that encodes the index, a ramp, and a moving square."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[..., 0] = 20 + index * 20
    frame[..., 1] = (np.arange(WIDTH) * 3)[None, :]
    frame[..., 2] = (np.arange(HEIGHT) * 4)[:, None]
    x = 4 + index * 6
    frame[10:26, x : x + 12] = (250, 250, 40)
    return frame


def movie_frame(index: int) -> np.ndarray:
    frame = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    frame[..., 0] = 15 + index * 18
    x = 2 + index * 6
    frame[16:32, x : x + 16] = (40, 220, 60)
    return frame


def make_media(folder: Path) -> Path:
    """Image sequence, movie, sound and the files the bad-input cases start from."""
    import imageio.v3 as iio
    from PIL import Image

    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for index in range(IMAGE_FRAMES):
        Image.fromarray(image_frame(index)).save(folder / "imgs" / f"f{index:03d}.png")
    (folder / "holes").mkdir(exist_ok=True)
    for index in range(6):
        Image.fromarray(image_frame(index)).save(folder / "holes" / f"h{index:03d}.png")
    clip = np.stack([movie_frame(i) for i in range(MOVIE_FRAMES)])
    iio.imwrite(folder / "clip.mp4", clip, fps=24, codec="libx264", macro_block_size=16, output_params=["-crf", "12"])
    shutil.copy(folder / "clip.mp4", folder / "gone.mp4")
    with wave.open(str(folder / "tone.wav"), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(b"\x00\x00" * 8000)
    return folder


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def movie_frames(path: Path) -> list[np.ndarray]:
    import imageio.v3 as iio

    return [np.asarray(frame) for frame in iio.imiter(path)]


def build_addon(out_dir: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_addon
    finally:
        sys.path.pop(0)
    return build_addon.build(out_dir)


def bpy_env(user_resources: Path) -> dict:
    """Environment for a bpy subprocess: isolated Blender user folder, one torch thread."""
    env = dict(os.environ)
    env["BLENDER_USER_RESOURCES"] = str(user_resources)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def run_scenarios(version: str, config: dict, work: Path, timeout: float = 900) -> dict:
    """Run tests/addon_scenarios.py under bpy ``version``; return its JSON findings."""
    python = bpy_python(version)
    config = dict(config, work=str(work), out=str(work / "results.json"))
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    done = subprocess.run(
        [str(python), str(REPO / "tests" / "addon_scenarios.py"), "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=bpy_env(work / "blender-user"),
        cwd=str(work),
    )
    (work / "stdout.txt").write_text(done.stdout)
    (work / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0 or not (work / "results.json").exists():
        raise AssertionError(
            f"scenario run under bpy {version} failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads((work / "results.json").read_text(encoding="utf-8"))
