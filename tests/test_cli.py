"""`p2v edit` end to end, its stats, and every bad input: one clear line, non-zero exit, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, synthetic_frames, tiny_edit_options, write_png_clip
from PIL import Image

from p2v_runtime import cli

STAT_KEYS = {
    "frames",
    "steps",
    "unet_calls",
    "unet_calls_inversion",
    "unet_calls_edit",
    "inversion_cache_hits",
    "feature_cache_bytes",
    "seconds",
    "seconds_per_frame",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "depth_source",
    "source_prompt",
    "device",
    "dtype",
}


@pytest.fixture
def clip(tmp_path) -> Path:
    return write_png_clip(tmp_path / "clip", synthetic_frames(3))


@pytest.fixture
def edit_args(tiny_models, tmp_path):
    def make(input_path, out, *extra):
        return [
            "edit", str(input_path), "--out", str(out), "--prompt", "a red sports car",
            *tiny_edit_options(tiny_models, tmp_path / "cache"), *map(str, extra),
        ]  # fmt: skip

    return make


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli.main(args)
    err = capsys.readouterr().err
    return code, err


def test_edit_end_to_end_writes_frames_and_stats(clip, edit_args, tmp_path):
    out = tmp_path / "out"
    stats_file = tmp_path / "stats.json"
    depth_dir = tmp_path / "depth-used"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            *edit_args(clip, out, "--stats", stats_file, "--save-depth", depth_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["000000.png", "000001.png", "000002.png"]
    for name in written:
        assert Image.open(out / name).size == (64, 64)
    stats = json.loads(stats_file.read_text())
    assert STAT_KEYS <= stats.keys()
    assert stats["frames"] == 3 and stats["steps"] == 2
    assert stats["unet_calls_inversion"] == 6 and stats["unet_calls_edit"] == 6 and stats["unet_calls"] == 12
    assert stats["depth_source"] == "estimate" and stats["device"] == "cpu" and stats["dtype"] == "fp32"
    assert stats["peak_gpu_bytes"] is None and stats["peak_rss_bytes"] > 0
    depth_pngs = sorted(depth_dir.iterdir())
    assert len(depth_pngs) == 3
    assert Image.open(depth_pngs[0]).mode.startswith("I")  # 16-bit greyscale


def test_reedit_reuses_inversions_and_frame_range(clip, edit_args, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    assert run_cli(edit_args(clip, tmp_path / "a", "--stats", stats_file), capsys)[0] == 0
    args = edit_args(clip, tmp_path / "b", "--stats", stats_file)
    args[args.index("--prompt") + 1] = "a wooden toy car"
    assert run_cli(args, capsys)[0] == 0
    stats = json.loads(stats_file.read_text())
    assert stats["frames"] == 3 and stats["inversion_cache_hits"] == 3 and stats["unet_calls_inversion"] == 0
    # A sub-range has its own caption and clip depth range, so it is its own inversion.
    assert run_cli(edit_args(clip, tmp_path / "c", "--frames", "1:3", "--stats", stats_file), capsys)[0] == 0
    found = json.loads(stats_file.read_text())
    assert found["frames"] == 2 and found["inversion_cache_hits"] == 0 and found["unet_calls_inversion"] == 4
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["000000.png", "000001.png"]


def test_preview_writes_the_anchor_and_the_whole_edit_reuses_its_inversion(clip, edit_args, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    args = edit_args(clip, tmp_path / "preview", "--stats", stats_file, "--preview")
    args[args.index("--prompt") + 1] = "a glass car"
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "preview").iterdir()) == ["000000.png"]
    assert json.loads(stats_file.read_text())["frames"] == 1
    args = edit_args(clip, tmp_path / "whole", "--stats", stats_file)
    args[args.index("--prompt") + 1] = "a glass car"
    assert run_cli(args, capsys)[0] == 0
    found = json.loads(stats_file.read_text())
    assert found["frames"] == 3 and found["inversion_cache_hits"] == 1
    assert (tmp_path / "preview" / "000000.png").read_bytes() == (tmp_path / "whole" / "000000.png").read_bytes()
    # --anchor middle: the preview is frame 1 of 3, under its own name.
    args = edit_args(clip, tmp_path / "middle", "--preview", "--anchor", "middle")
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "middle").iterdir()) == ["000001.png"]


def test_edit_reads_video_files(tmp_path, edit_args, capsys):
    import imageio_ffmpeg

    video = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(video), (64, 64), fps=10, macro_block_size=16)
    writer.send(None)
    for frame in synthetic_frames(3):
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    code, err = run_cli(edit_args(video, tmp_path / "out"), capsys)
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_zpass_depth_from_npy_files(clip, edit_args, tmp_path, capsys):
    depth = tmp_path / "z"
    depth.mkdir()
    for index in range(3):
        z = np.full((64, 64), 8.0, np.float32)
        z[20:40, 20:40] = 2.0 + index * 0.1
        z[:5] = np.inf  # background
        np.save(depth / f"{index:04d}.npy", z)
    stats_file = tmp_path / "stats.json"
    code, err = run_cli(
        edit_args(clip, tmp_path / "out", "--depth", depth, "--stats", stats_file, "--save-depth", tmp_path / "used"),
        capsys,
    )
    assert code == 0, err
    assert json.loads(stats_file.read_text())["depth_source"] == "file"
    used = np.asarray(Image.open(tmp_path / "used" / "000000.png"), dtype=np.float64)
    assert used[4, 4] > used[0, 0]  # the near square is brighter than the background


# -- bad input: one line, non-zero, nothing written over -----------------------------------------


def write_depth(folder: Path, maps: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, depth_map in enumerate(maps):
        np.save(folder / f"{index:04d}.npy", depth_map)
    return folder


def good_depth(count=3, size=(64, 64)):
    maps = []
    for _ in range(count):
        z = np.full((size[1], size[0]), 6.0, np.float32)
        z[10:30, 10:30] = 2.0
        maps.append(z)
    return maps


def bad_cases(tmp_path: Path, clip: Path) -> dict[str, tuple[list, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = write_png_clip(tmp_path / "mixed", synthetic_frames(2))
    Image.fromarray(synthetic_frames(1, width=80)[0]).save(mixed / "frame_0002.png")
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    nan_depth = good_depth()
    nan_depth[1][3, 3] = np.nan
    neg_inf_depth = good_depth()
    neg_inf_depth[0][3, 3] = -np.inf
    constant = [np.full((64, 64), 5.0, np.float32) for _ in range(3)]
    return {
        "missing input": ([tmp_path / "nope"], "not found"),
        "empty folder": ([empty], "no images"),
        "mixed sizes": ([mixed], "80x64"),
        "undecodable video": ([broken_video], "decode"),
        "depth wrong count": (
            [clip, "--depth", write_depth(tmp_path / "d1", good_depth(2))],
            "2 files but there are 3",
        ),
        "depth wrong size": ([clip, "--depth", write_depth(tmp_path / "d2", good_depth(3, (32, 32)))], "32x32"),
        "depth NaN": ([clip, "--depth", write_depth(tmp_path / "d3", nan_depth)], "NaN"),
        "depth -inf": ([clip, "--depth", write_depth(tmp_path / "d4", neg_inf_depth)], "-inf"),
        "depth constant": ([clip, "--depth", write_depth(tmp_path / "d5", constant)], "constant"),
        "steps < 1": ([clip, "--steps", "0"], "--steps"),
        "frames out of range": ([clip, "--frames", "2:9"], "3 frames"),
        "out is input": ([clip, "--out-is-input"], "input folder"),
    }


CASES = [
    "missing input",
    "empty folder",
    "mixed sizes",
    "undecodable video",
    "depth wrong count",
    "depth wrong size",
    "depth NaN",
    "depth -inf",
    "depth constant",
    "steps < 1",
    "frames out of range",
    "out is input",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_writes_nothing(case, clip, edit_args, tmp_path, capsys):
    extra, expected = bad_cases(tmp_path, clip)[case]
    input_path, *options = extra
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    if "--out-is-input" in options:
        options.remove("--out-is-input")
        out = input_path
    before_out, before_clip = snapshot(out), snapshot(clip)
    args = edit_args(input_path, out, *options)
    if "--steps" in options:  # the later --steps wins in argparse
        args = args[: args.index("--steps")] + args[args.index("--steps") + 2 :]
    code, err = run_cli(args, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("p2v: error:"), err
    assert expected in lines[0], lines[0]
    assert snapshot(out) == before_out
    assert snapshot(clip) == before_clip


def test_empty_prompt_is_refused(clip, edit_args, tmp_path, capsys):
    args = edit_args(clip, tmp_path / "out")
    args[args.index("--prompt") + 1] = "   "
    code, err = run_cli(args, capsys)
    assert code != 0 and "Prompt (--prompt) is empty" in err
    assert not (tmp_path / "out").exists()


def test_existing_frames_are_not_written_over(clip, edit_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000.png").write_bytes(b"earlier result")
    code, err = run_cli(edit_args(clip, out), capsys)
    assert code != 0 and "--overwrite" in err
    assert (out / "000000.png").read_bytes() == b"earlier result"
    assert run_cli(edit_args(clip, out, "--overwrite"), capsys)[0] == 0
    assert (out / "000000.png").read_bytes() != b"earlier result"


def test_out_of_gpu_memory_names_the_setting_to_lower(clip, edit_args, tmp_path, capsys, tiny_models):
    import torch

    from p2v_runtime.models import load_depth_pipeline

    pipeline, _ = load_depth_pipeline(str(tiny_models["sd2-depth"]), "cpu", "auto")
    calls = []

    def exhaust(module, args):
        calls.append(1)
        if len(calls) > 3:  # fail mid-clip, after some work was done
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = pipeline.unet.register_forward_pre_hook(exhaust)
    try:
        code, err = run_cli(edit_args(clip, tmp_path / "out"), capsys)
    finally:
        handle.remove()
    assert code != 0
    assert "out of GPU memory" in err and "--size" in err
    assert "--feature-store cpu" in err  # the features were on the device
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("norm", ["clip", "frame"])
def test_depth_normalisation_over_the_clip_or_per_frame(norm, clip, edit_args, tmp_path, capsys):
    # Frame 0 sees only near surfaces (2..4), frame 2 only far ones (6..8): per-frame
    # normalisation stretches each to the full range, clip normalisation keeps them apart.
    maps = []
    for near in (2.0, 4.0, 6.0):
        z = np.full((64, 64), near + 2.0, np.float32)
        z[:, :32] = near
        maps.append(z)
    depth = write_depth(tmp_path / "z", maps)
    used = tmp_path / "used"
    code, err = run_cli(
        edit_args(clip, tmp_path / "out", "--depth", depth, "--depth-norm", norm, "--save-depth", used), capsys
    )
    assert code == 0, err
    saved = [np.asarray(Image.open(used / f"{i:06d}.png"), dtype=np.float64) for i in range(3)]
    if norm == "frame":
        assert all(s.min() < 1000 and s.max() > 64535 for s in saved)
    else:
        assert saved[0].min() > 20000 and saved[2].max() < 45000  # near frame bright, far frame dark
        assert saved[0].max() > 64535 and saved[2].min() < 1000  # the clip's nearest and farthest
