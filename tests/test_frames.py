"""Frames in and out: folders, videos, depth passes, atomic writes, previews (synthetic data)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2v_runtime import frames as F
from p2v_runtime.errors import InputError

# --- helpers ---------------------------------------------------------------------------------


def solid(value, size=(64, 48)) -> np.ndarray:
    width, height = size
    return np.full((height, width, 3), value, dtype=np.uint8)


def save_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def write_video(path: Path, count: int, size=(64, 48), fps=10) -> Path:
    import imageio.v3 as iio

    frames = np.stack([solid(10 + 20 * i, size) for i in range(count)])
    iio.imwrite(path, frames, fps=fps, codec="libx264")
    return path


def png16_rgb(path: Path, rgb16: np.ndarray) -> Path:
    """A 48-bit RGB PNG (Pillow cannot write one), by hand."""
    height, width, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, f"error message should be one line: {text!r}"
    return text


# --- frame ranges and sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, range(0, 20)),
        ("", range(0, 20)),
        (":", range(0, 20)),
        ("5:", range(5, 20)),
        (":10", range(0, 10)),
        ("3:7", range(3, 7)),
        (" 3 : 7 ", range(3, 7)),
        ("0:20", range(0, 20)),
        ("19:20", range(19, 20)),
    ],
)
def test_parse_frame_range(spec, expected):
    assert F.parse_frame_range(spec, 20) == expected


@pytest.mark.parametrize("spec", ["5", "a:b", "-3:", "1:-1", "1:2:3", "1..4", "1.5:3"])
def test_parse_frame_range_malformed(spec):
    with pytest.raises(InputError) as excinfo:
        F.parse_frame_range(spec, 20)
    text = message(excinfo)
    assert "--frames" in text and "20 frames" in text


@pytest.mark.parametrize("spec", ["0:21", "25:", "5:5", "7:3", "20:"])
def test_parse_frame_range_out_of_range(spec):
    with pytest.raises(InputError) as excinfo:
        F.parse_frame_range(spec, 20)
    assert "20 frames" in message(excinfo)


@pytest.mark.parametrize(
    "width, height, long_side, expected",
    [
        (1920, 1080, 512, (512, 320)),  # 288 is halfway between 256 and 320: rounds up
        (1080, 1920, 512, (320, 512)),
        (512, 512, 512, (512, 512)),
        (100, 3000, 512, (64, 512)),  # 17 rounds to 0: at least 64
        (1280, 720, 768, (768, 448)),  # 432 -> 448
        (640, 480, 512, (512, 384)),
        (3000, 100, 512, (512, 64)),
        (2, 2, 1024, (64, 64)),  # never past the source's long side rounded up to 64
        (300, 200, 512, (320, 192)),
        (100, 60, 128, (128, 64)),
    ],
)
def test_working_size(width, height, long_side, expected):
    assert F.working_size(width, height, long_side) == expected


def test_working_size_sides_are_multiples_of_64():
    for width in range(50, 4000, 137):
        for height in range(50, 4000, 211):
            w, h = F.working_size(width, height, 512)
            longest = min(512, -(-max(width, height) // 64) * 64)  # no upscaling past the source
            assert w % 64 == 0 and h % 64 == 0 and max(w, h) == longest and min(w, h) >= 64


def test_resize_rgb():
    rgb = solid(100, (64, 48))
    assert F.resize_rgb(rgb, (64, 48)) is rgb
    out = F.resize_rgb(rgb, (32, 20))
    assert out.shape == (20, 32, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 100) <= 1


# --- image folders ---------------------------------------------------------------------------


def test_folder_natural_order(tmp_path):
    for number in (10, 2, 1, 33, 3):
        save_png(tmp_path / f"frame{number}.png", solid(number))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".frame0.png.tmp").write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    source = F.open_frames(tmp_path)
    assert len(source) == 5
    assert source.size == (64, 48)
    assert source.description == str(tmp_path)
    assert [int(source.read(i)[0, 0, 0]) for i in range(5)] == [1, 2, 3, 10, 33]
    assert [int(frame[0, 0, 0]) for frame in source] == [1, 2, 3, 10, 33]
    with pytest.raises(IndexError):
        source.read(5)


def test_folder_mixed_extensions_and_range(tmp_path):
    save_png(tmp_path / "f1.png", solid(1))
    Image.fromarray(solid(200)).save(tmp_path / "f2.JPG", quality=95)
    Image.fromarray(solid(3)).save(tmp_path / "f3.tif")
    Image.fromarray(solid(4)).save(tmp_path / "f4.bmp")
    Image.fromarray(solid(5)).save(tmp_path / "f5.webp", lossless=True)
    source = F.open_frames(tmp_path, "1:4")
    assert len(source) == 3
    values = [int(source.read(i).mean()) for i in range(3)]
    assert abs(values[0] - 200) <= 2 and values[1:] == [3, 4]


def test_single_image_is_a_one_frame_clip(tmp_path):
    path = save_png(tmp_path / "still.png", solid(77))
    source = F.open_frames(path)
    assert len(source) == 1 and source.size == (64, 48)
    assert int(source.read(0)[0, 0, 0]) == 77


def test_conversions_to_uint8_rgb(tmp_path):
    grey = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "a_grey.png")
    grey16 = (grey * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "b_grey16.png")
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "c_rgba.png")
    png16_rgb(tmp_path / "d_rgb16.png", np.full((48, 64, 3), 257 * 90, np.uint16))
    Image.fromarray(solid(60)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "e_palette.png")
    Image.fromarray((grey / 255.0).astype(np.float32)).save(tmp_path / "f_float.tif")

    source = F.open_frames(tmp_path)
    assert len(source) == 6
    out = [source.read(i) for i in range(6)]
    for rgb in out:
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(out[0][..., 1], grey)
    np.testing.assert_array_equal(out[1][..., 0], grey)
    assert (out[2][:, :32] == 200).all() and (out[2][:, 32:] == 0).all()
    assert (out[3] == 90).all()
    assert (np.abs(out[4].astype(int) - 60) <= 1).all()
    assert np.abs(out[5][..., 2].astype(int) - grey).max() <= 1


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as excinfo:
        F.open_frames(tmp_path / "nope")
    assert str(tmp_path / "nope") in message(excinfo)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    np.save(tmp_path / "depth.npy", np.zeros((4, 4)))
    with pytest.raises(InputError) as excinfo:
        F.open_frames(tmp_path)
    text = message(excinfo)
    assert "no images" in text and str(tmp_path) in text


def test_mixed_frame_sizes_named_up_front(tmp_path):
    save_png(tmp_path / "f1.png", solid(1, (64, 48)))
    save_png(tmp_path / "f2.png", solid(2, (64, 48)))
    save_png(tmp_path / "f10.png", solid(3, (80, 48)))
    with pytest.raises(InputError) as excinfo:
        F.open_frames(tmp_path)
    text = message(excinfo)
    assert "f10.png" in text and "80x48" in text and "64x48" in text and "f1.png" in text
    # A range that leaves the odd frame out is fine.
    assert len(F.open_frames(tmp_path, ":2")) == 2


def test_unreadable_image(tmp_path):
    save_png(tmp_path / "f1.png", solid(1))
    (tmp_path / "f2.png").write_bytes(b"this is not a png")
    with pytest.raises(InputError) as excinfo:
        F.open_frames(tmp_path)
    assert "f2.png" in message(excinfo)


def test_truncated_image_fails_on_read(tmp_path):
    save_png(tmp_path / "f1.png", solid(1))
    data = (
        save_png(tmp_path / "f2.png", np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    ).read_bytes()
    (tmp_path / "f2.png").write_bytes(data[: len(data) // 2])
    source = F.open_frames(tmp_path)  # the header is intact
    with pytest.raises(InputError) as excinfo:
        source.read(1)
    assert "f2.png" in message(excinfo)


def test_frame_range_out_of_range_names_clip_length(tmp_path):
    for i in range(4):
        save_png(tmp_path / f"{i}.png", solid(i))
    with pytest.raises(InputError) as excinfo:
        F.open_frames(tmp_path, "2:9")
    assert "4 frames" in message(excinfo)
    with pytest.raises(InputError):
        F.open_frames(tmp_path, "x")


# --- video -----------------------------------------------------------------------------------


def test_video_read_lazily(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 12)
    source = F.open_frames(path)
    assert len(source) == 12
    assert source.size == (64, 48)
    assert source.fps == pytest.approx(10.0)
    means = [float(source.read(i).mean()) for i in range(12)]
    assert source.starts == 1  # one sequential pass, no restarts
    assert all(abs(m - (10 + 20 * i)) < 6 for i, m in enumerate(means)), means
    frame = source.read(11)
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.flags.writeable
    assert source.starts == 1  # the same frame again costs nothing
    assert abs(float(source.read(3).mean()) - 70) < 6
    assert source.starts == 2  # going backwards restarts the decoder
    assert abs(float(source.read(4).mean()) - 90) < 6
    assert source.starts == 2
    source.close()


def test_video_frame_range(tmp_path):
    path = write_video(tmp_path / "clip.mov", 10)
    source = F.open_frames(path, "4:7")
    assert len(source) == 3
    assert [round((float(f.mean()) - 10) / 20) for f in source] == [4, 5, 6]
    with pytest.raises(InputError) as excinfo:
        F.open_frames(path, "8:12")
    assert "10 frames" in message(excinfo)


def test_video_that_cannot_be_decoded(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all" * 100)
    with pytest.raises(InputError) as excinfo:
        F.open_frames(path)
    text = message(excinfo)
    assert str(path) in text and "cannot decode" in text


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(InputError) as excinfo:
        F.open_frames(path)
    assert "no video stream" in message(excinfo)


def test_video_with_no_frames(tmp_path, monkeypatch):
    import imageio_ffmpeg

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho frame=0\necho progress=end\n")
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as excinfo:
        F.open_frames(path)
    assert "has no frames" in message(excinfo)


# --- writing ---------------------------------------------------------------------------------


def test_write_frame_atomic_and_existing_frames(tmp_path):
    out = tmp_path / "out" / "shot"
    assert F.existing_frames(out) == []
    for index in (2, 0, 1):
        path = F.write_frame(out, index, solid(index * 50))
        assert path == out / f"{index:06d}.png"
    (out / "notes.txt").write_text("x")
    (out / "12.png").write_bytes(b"")
    assert [p.name for p in F.existing_frames(out)] == ["000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "12.png", "notes.txt"]
    back = np.asarray(Image.open(out / "000002.png"))
    np.testing.assert_array_equal(back, solid(100))
    F.write_frame(out, 2, solid(7))  # overwrite in place
    assert int(np.asarray(Image.open(out / "000002.png"))[0, 0, 0]) == 7


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    F.write_frame(tmp_path, 0, solid(1))

    def boom(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        F.write_frame(tmp_path, 1, solid(2))
    with pytest.raises(KeyboardInterrupt):
        F.write_frame(tmp_path, 0, solid(3))
    assert os.listdir(tmp_path) == ["000000.png"]
    monkeypatch.undo()
    assert int(np.asarray(Image.open(tmp_path / "000000.png"))[0, 0, 0]) == 1


def test_write_frame_rejects_wrong_arrays(tmp_path):
    with pytest.raises(ValueError):
        F.write_frame(tmp_path, 0, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        F.write_frame(tmp_path, 0, np.zeros((4, 4), np.uint8))


def test_depth_png_is_16_bit(tmp_path):
    depth = np.linspace(0.0, 1.0, 48 * 64).reshape(48, 64)
    depth[0, 1] = 2.0  # clipped to 1
    depth[0, 2] = -1.0  # clipped to 0
    path = F.write_depth_png(tmp_path / "d" / "000000.png", depth)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        back = np.asarray(image).astype(np.int64)
    assert back.max() == 65535 and back.min() == 0
    expected = np.rint(np.clip(depth, 0, 1) * 65535)
    assert np.abs(back - expected).max() == 0
    assert len(np.unique(back)) > 256  # more than 8 bits survive
    assert os.listdir(path.parent) == ["000000.png"]


def test_side_by_side_mp4(tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    for i in range(4):
        save_png(source_dir / f"{i}.png", solid(40 * i, (65, 47)))  # odd sides get padded
    source = F.open_frames(source_dir)
    edited = tmp_path / "edit"
    for i in range(3):  # a cancelled job: fewer edited frames than source frames
        F.write_frame(edited, i, np.full((64, 96, 3), (250, 0, 0), np.uint8))
    out = F.write_side_by_side_mp4(
        source, edited, tmp_path / "preview" / "sbs.mp4", fps=8, label="random-weight output"
    )
    assert out.is_file() and os.listdir(out.parent) == ["sbs.mp4"]
    video = F.open_frames(out)
    assert len(video) == 3 and video.size == (130, 48)
    frame = video.read(2)
    assert abs(float(frame[30:, 5:60].mean()) - 80) < 6  # source half
    right = frame[30:, 70:125].astype(float)
    assert right[..., 0].mean() > 200 and right[..., 1].mean() < 40  # edit half, resized


def test_side_by_side_needs_edited_frames(tmp_path):
    save_png(tmp_path / "0.png", solid(1))
    (tmp_path / "edit").mkdir()
    with pytest.raises(InputError) as excinfo:
        F.write_side_by_side_mp4(F.open_frames(tmp_path), tmp_path / "edit", tmp_path / "x.mp4")
    assert "no edited frames" in message(excinfo)


# --- depth -----------------------------------------------------------------------------------


def depth_map(i: int, size=(64, 48)) -> np.ndarray:
    width, height = size
    return np.arange(width * height, dtype=np.float32).reshape(height, width) * 0.01 + 3.0 + i


def write_exr(path: Path, channels_by_part: dict[str, dict[str, np.ndarray]]) -> Path:
    import OpenEXR

    parts = [
        OpenEXR.Part({"compression": OpenEXR.ZIP_COMPRESSION}, channels, name=name or f"part{i}")
        for i, (name, channels) in enumerate(channels_by_part.items())
    ]
    if len(parts) == 1 and not next(iter(channels_by_part)):
        OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION}, next(iter(channels_by_part.values()))).write(str(path))
    else:
        OpenEXR.File(parts).write(str(path))
    return path


def test_exr_blender_multilayer_round_trip(tmp_path):
    pytest.importorskip("OpenEXR")
    for i in range(3):  # Blender 5 writes one part per pass, channels "ViewLayer.Depth.Z"
        write_exr(
            tmp_path / f"Image{i:04d}.exr",
            {
                "ViewLayer.Combined": {f"ViewLayer.Combined.{c}": np.full((48, 64), 0.5, np.float32) for c in "RGBA"},
                "ViewLayer.Depth": {"ViewLayer.Depth.Z": depth_map(i)},
            },
        )
    depth = F.open_depth(tmp_path, 3, (64, 48))
    assert len(depth) == 3 and depth.size == (64, 48)
    for i in range(3):
        out = depth.read(i)
        assert out.dtype == np.float32 and out.shape == (48, 64)
        np.testing.assert_array_equal(out, depth_map(i))


@pytest.mark.parametrize(
    "channels, expected",
    [
        ({"Z": 1, "R": 2, "G": 2, "B": 2}, 1),  # single-layer with Z
        ({"V": 3}, 3),  # File Output node, BW float
        ({"R": 4, "G": 5, "B": 6, "A": 7}, 4),  # File Output node, RGB(A): R=G=B
        ({"Y": 8}, 8),
        ({"depth": 9, "R": 1}, 9),
        ({"Depth.V": 10}, 10),  # multilayer File Output of a float socket
        ({"Combined.R": 1, "Depth.V": 11}, 11),
        ({"Combined.R": 1, "ViewLayer.Depth.Z": 12, "Mist.Z": 2}, 12),
    ],
)
def test_exr_channel_choice(tmp_path, channels, expected):
    pytest.importorskip("OpenEXR")
    write_exr(tmp_path / "0001.exr", {"": {name: np.full((8, 8), v, np.float32) for name, v in channels.items()}})
    depth = F.open_depth(tmp_path, 1, (8, 8))
    assert float(depth.read(0)[0, 0]) == expected


def test_exr_half_float_is_float32(tmp_path):
    pytest.importorskip("OpenEXR")
    write_exr(tmp_path / "0001.exr", {"": {"Z": np.full((8, 8), 2.5, np.float16)}})
    out = F.open_depth(tmp_path, 1, (8, 8)).read(0)
    assert out.dtype == np.float32 and float(out[0, 0]) == 2.5


def test_layered_exr_without_depth_is_refused(tmp_path):
    pytest.importorskip("OpenEXR")
    write_exr(tmp_path / "0001.exr", {"": {f"ViewLayer.Combined.{c}": np.ones((8, 8), np.float32) for c in "RGB"}})
    with pytest.raises(InputError) as excinfo:
        F.open_depth(tmp_path, 1, (8, 8))
    text = message(excinfo)
    assert "no depth channel" in text and "0001.exr" in text


def test_npy_depth_and_frame_range(tmp_path):
    for i in range(6):
        np.save(tmp_path / f"d{i}.npy", depth_map(i).astype(np.float64))
    depth = F.open_depth(tmp_path, 6, (64, 48))
    out = depth.read(5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, depth_map(5))
    # The folder holds the whole clip; --frames picks the same frames as from the clip.
    ranged = F.open_depth(tmp_path, 2, (64, 48), "3:5")
    assert len(ranged) == 2
    np.testing.assert_allclose(ranged.read(0), depth_map(3))
    # Or it already holds just the selected frames.
    assert len(F.open_depth(tmp_path, 6, (64, 48), "3:9")) == 6


def test_depth_errors(tmp_path):
    with pytest.raises(InputError) as excinfo:
        F.open_depth(tmp_path / "missing", 1, (8, 8))
    assert "missing" in message(excinfo)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "frame.png").write_bytes(b"")
    with pytest.raises(InputError) as excinfo:
        F.open_depth(empty, 1, (8, 8))
    assert "no depth files" in message(excinfo)

    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(InputError) as excinfo:
        F.open_depth(folder, 5, (8, 8))
    text = message(excinfo)
    assert "3 files" in text and "5 frames" in text
    with pytest.raises(InputError) as excinfo:
        F.open_depth(folder, 3, (16, 8))
    text = message(excinfo)
    assert "0.npy" in text and "8x8" in text and "16x8" in text

    np.save(folder / "1.npy", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError) as excinfo:
        F.open_depth(folder, 3, (8, 8))
    assert "1.npy" in message(excinfo) and "2-D" in str(excinfo.value)

    (folder / "1.npy").write_bytes(b"garbage")
    with pytest.raises(InputError) as excinfo:
        F.open_depth(folder, 3, (8, 8))
    assert "1.npy" in message(excinfo)


def test_unreadable_exr(tmp_path):
    pytest.importorskip("OpenEXR")
    (tmp_path / "0001.exr").write_bytes(b"not an exr")
    with pytest.raises(InputError) as excinfo:
        F.open_depth(tmp_path, 1, (8, 8))
    assert "0001.exr" in message(excinfo)


# --- import cost -----------------------------------------------------------------------------


def test_import_is_light():
    code = (
        "import sys, p2v_runtime.frames; "
        "print(sorted(m for m in ('torch', 'PIL', 'imageio', 'OpenEXR') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the real Blender's EXR ------------------------------------------------------------------


@pytest.mark.blender
def test_blender_z_pass_exr(tmp_path):
    """What Blender itself writes for a Z pass is what open_depth reads."""
    pytest.importorskip("bpy")
    pytest.importorskip("OpenEXR")
    script = textwrap.dedent(f"""
        import bpy
        scene = bpy.context.scene
        scene.render.engine = "CYCLES"
        scene.cycles.samples = 1
        scene.cycles.device = "CPU"
        scene.render.resolution_x, scene.render.resolution_y = 32, 24
        scene.render.resolution_percentage = 100
        scene.view_layers[0].use_pass_z = True
        settings = scene.render.image_settings
        if hasattr(settings, "media_type"):
            settings.media_type = "MULTI_LAYER_IMAGE"
        settings.file_format = "OPEN_EXR_MULTILAYER"
        scene.render.filepath = {str(tmp_path / "depth" / "0001.exr")!r}
        bpy.ops.render.render(write_still=True)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    depth = F.open_depth(tmp_path / "depth", 1, (32, 24)).read(0)
    # The default cube at the centre is nearer than the background (Blender writes 1e10 there).
    assert depth.shape == (24, 32)
    assert float(depth[12, 16]) < 20.0 and float(depth.max()) > 1e5
