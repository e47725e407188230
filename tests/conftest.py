"""Shared fixtures: the tiny random-weight models (built once per checkout) and synthetic clips."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _tiny_models_root() -> Path:
    """Rebuilt when tiny_models.py changes, reused otherwise (CI builds it once per run)."""
    source = (REPO / "p2v_runtime" / "tiny_models.py").read_bytes()
    version = hashlib.sha256(source).hexdigest()[:12]
    base = Path(os.environ.get("P2V_TEST_CACHE", REPO / ".cache"))
    return base / f"tiny-models-{version}"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from p2v_runtime.tiny_models import write_tiny_models

    root = _tiny_models_root()
    names = ("sd2-depth", "blip", "clip")
    if not all((root / name / ".complete").exists() for name in names):
        for stale in root.parent.glob("tiny-models-*"):
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
        write_tiny_models(root)
        for name in names:
            (root / name / ".complete").write_text("ok\n")
    return {name: root / name for name in names}


def _replica_root() -> Path:
    """Rebuilt when the replica writer, its helpers or the reference configs change."""
    digest = hashlib.sha256()
    runtime = REPO / "p2v_runtime"
    for path in [
        runtime / "replica_models.py",
        runtime / "tiny_models.py",
        *sorted(runtime.glob("reference_configs/**/*")),
    ]:
        if path.is_file():
            digest.update(path.as_posix().encode() + path.read_bytes())
    base = Path(os.environ.get("P2V_TEST_CACHE", REPO / ".cache"))
    return base / f"replica-models-{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def replica_models() -> dict[str, Path]:
    """SD 2 depth, BLIP base and BLIP large in their real layouts and configs, small random weights."""
    from p2v_runtime.replica_models import write_replicas

    root = _replica_root()
    names = ("sd2-depth", "blip-base", "blip-large")
    if not all((root / name / ".complete").exists() for name in names):
        for stale in root.parent.glob("replica-models-*"):
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
        write_replicas(root)
        for name in names:
            (root / name / ".complete").write_text("ok\n")
    return {name: root / name for name in names}


def populate_hf_cache(cache: Path, repo_id: str, folder: Path, keep=lambda name: True) -> Path:
    """Lay ``folder``'s files out as huggingface_hub caches a repository: blobs, a snapshot of
    symlinks to them, and refs/main. ``keep(name)`` chooses the files (e.g. only the fp16 ones)."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.startswith(".") or not keep(name):
            continue
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def tiny_settings(tiny_models, tmp_path):
    """Settings for a fast edit on the tiny models; tests override what they examine."""
    from p2v_runtime.settings import EditSettings

    def make(**overrides) -> EditSettings:
        values = dict(
            prompt="a red sports car",
            source_prompt="a grey car on a road",
            model=str(tiny_models["sd2-depth"]),
            captioner=str(tiny_models["blip"]),
            device="cpu",
            steps=4,
            size=64,
            cache_dir=str(tmp_path / "inversion-cache"),
        )
        values.update(overrides)
        return EditSettings(**values).validate()

    return make


def tiny_edit_options(tiny_models, cache_dir) -> list[str]:
    """The command-line options of a fast edit on the tiny models (64 px, 2 steps, CPU, quiet)."""
    return [
        "--model", str(tiny_models["sd2-depth"]), "--captioner", str(tiny_models["blip"]),
        "--size", "64", "--steps", "2", "--device", "cpu", "--quiet", "--cache-dir", str(cache_dir),
    ]  # fmt: skip


def synthetic_frames(count: int, width: int = 64, height: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A square moving across a gradient: simple, deterministic, and different per frame."""
    rng = np.random.default_rng(seed)
    background = np.zeros((height, width, 3), np.uint8)
    background[..., 0] = np.linspace(20, 235, width, dtype=np.uint8)[None, :]
    background[..., 1] = np.linspace(200, 40, height, dtype=np.uint8)[:, None]
    background[..., 2] = rng.integers(60, 90)
    frames = []
    side = max(8, min(width, height) // 3)
    for index in range(count):
        frame = background.copy()
        x = (index * 3) % max(1, width - side)
        y = height // 3
        frame[y : y + side, x : x + side] = (230, 40, 40)
        frames.append(frame)
    return frames


class ArrayFrames:
    """An in-memory clip as ``protocol.Frames``, what ``edit_clip`` and ``edit_on_server`` read."""

    def __init__(self, frames: list[np.ndarray]):
        self.frames = frames
        self.size = (frames[0].shape[1], frames[0].shape[0])
        self.description = "synthetic clip"
        self.reads = 0

    def __len__(self) -> int:
        return len(self.frames)

    def read(self, index: int) -> np.ndarray:
        self.reads += 1
        return self.frames[index]


def write_png_clip(folder: Path, frames: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{index:04d}.png")
    return folder


def pytest_sessionstart(session):
    """The add-on's vendored copies (settings, protocol, client) are refreshed before any test
    imports the add-on: a fresh clone has none, and a stale copy imported first would stay."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_addon", REPO / "scripts" / "build_addon.py")
    build_addon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_addon)
    build_addon.vendor()


def pytest_collection_modifyitems(config, items):
    """Every test that runs a model (it asks for the tiny or replica models) or Blender is ``slow``, so
    ``scripts/test.sh -m "not slow"`` is the fast loop."""
    for item in items:
        models = {"tiny_models", "replica_models"}
        if models & set(item.fixturenames) or item.get_closest_marker("blender") is not None:
            item.add_marker(pytest.mark.slow)
