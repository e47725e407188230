"""Reading and writing frames: image folders, video files, depth passes, previews.

Clips are read lazily, one frame at a time, so memory does not grow with clip length. Every
problem with the user's input is an :class:`~p2v_runtime.errors.InputError` whose one-line
message names the path, because that is what a user can fix. numpy, Pillow and imageio-ffmpeg
only (no torch); OpenEXR is imported when an EXR is actually read.

Conventions, chosen once here:

- Frames are HxWx3 ``uint8`` RGB. Greyscale, palette, 16-bit and float images are converted;
  images with alpha are composited over black (what a premultiplied render shows), so pixels
  under full transparency cannot leak stale colours into the edit.
- EXIF orientation is ignored, as Blender's image strips ignore it: pixels are used as stored.
- Folders are read in natural order (``f2.png`` before ``f10.png``); hidden files (``.name``,
  e.g. the temporary files of :func:`write_frame`) are skipped.
- Video frames are every decoded frame of the first video stream, in decode order
  (``-fps_mode passthrough``): no frames are dropped or duplicated to reach a constant rate.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import settings
from .errors import InputError
from .files import atomic_write, replacing

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEPTH_EXTENSIONS = (".exr", ".npy")
FRAME_NAME = re.compile(r"^(\d{6,})\.png$")

# ffmpeg options shared by counting and reading, so that both see exactly the same frames.
_FFMPEG_VIDEO_ONLY = ["-an", "-sn", "-dn", "-fps_mode", "passthrough"]


# --------------------------------------------------------------------------------------------
# frame ranges and sizes


def parse_frame_range(spec: str | None, count: int) -> range:
    """The frames ``--frames A:B`` selects from a clip of ``count`` frames (the schema's rule)."""
    try:
        return settings.frame_range(spec, count)
    except settings.SettingsError as exc:
        raise InputError(str(exc)) from None


def working_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """The (width, height) the model works at: aspect kept, long side ``long_side``.

    Both sides are multiples of 64 (the UNet's down-sampling needs multiples of 8 in latent
    space), rounded to the nearest multiple, half up, at least 64: 1920x1080 at 512 gives
    512x320 (1080*512/1920 = 288 lies exactly between 256 and 320).

    The long side is never more than the source's long side rounded up to a multiple of 64: a
    small clip is not upscaled to ``long_side`` (a 2x2 upload at 1024 works at 64x64, a 300x200
    clip at 512 works at 320x192), so no one pays the cost of a large edit of a tiny picture.
    """
    if width <= 0 or height <= 0 or long_side <= 0:
        raise ValueError(f"sizes must be positive, got {width}x{height} at {long_side}")
    longest = max(64, _round_half_up(Fraction(long_side, 64)) * 64)
    longest = min(longest, -(-max(width, height) // 64) * 64)  # never past the source, to a multiple of 64
    if width >= height:
        short = Fraction(height * longest, width * 64)
        return longest, max(64, _round_half_up(short) * 64)
    short = Fraction(width * longest, height * 64)
    return max(64, _round_half_up(short) * 64), longest


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` resized to ``size`` (width, height) with Lanczos; the same array when equal."""
    width, height = int(size[0]), int(size[1])
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized)


# --------------------------------------------------------------------------------------------
# reading frames


class FrameSource:
    """A clip, read lazily: ``read(i)`` decodes frame ``i`` of the selected range on demand.

    ``size`` is (width, height), the same for every frame; ``description`` names the clip in
    messages; ``fps`` is the video's rate, or None for image folders.
    """

    size: tuple[int, int]
    description: str
    fps: float | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` (0..len-1, counted within the selected range) as HxWx3 uint8 RGB."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self.read(index)

    def close(self) -> None:
        """Release open readers; reading again reopens them."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"frame index must be an int, got {index!r}")
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} is outside {self.description} ({len(self)} frames)")
        return int(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} frames, {self.size[0]}x{self.size[1]})"


def open_frames(path, frame_range: str | None = None) -> FrameSource:
    """The clip at ``path``: a folder of images, a video file, or a single image.

    Sizes of image folders are checked up front from the image headers (cheap); a video is
    decoded once to count its frames exactly, since container metadata is often wrong.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        return ImageFolderSource(path, frame_range)
    if not path.is_file():
        raise InputError(f"input is neither a folder nor a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFolderSource(path.parent, frame_range, files=[path], description=str(path))
    return VideoSource(path, frame_range)


class ImageFolderSource(FrameSource):
    """Frames from image files, in natural order."""

    def __init__(
        self,
        folder: Path,
        frame_range: str | None = None,
        *,
        files: list[Path] | None = None,
        description: str | None = None,
    ):
        self.description = description or str(folder)
        if files is None:
            files = _image_files(folder)
            if not files:
                raise InputError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self._range = parse_frame_range(frame_range, len(files))
        self.files = [files[i] for i in self._range]
        self.size = _common_image_size(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        path = self.files[self._check_index(index)]
        rgb = _read_rgb(path)
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            raise InputError(
                f"{path} is {rgb.shape[1]}x{rgb.shape[0]}, the clip's frames are {self.size[0]}x{self.size[1]}"
            )
        return rgb


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: ``f2`` before ``f10``."""
    parts = re.split(r"(\d+)", name.lower())
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def _image_files(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise InputError(f"cannot list {folder}: {exc.strerror or exc}") from None
    files = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _common_image_size(files: list[Path]) -> tuple[int, int]:
    """The one size all ``files`` share, read from headers only; else a message naming the odd one."""
    from PIL import Image

    size = None
    for path in files:
        try:
            with Image.open(path) as image:
                this = image.size
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
            raise InputError(f"cannot read image {path}: {_reason(exc)}") from None
        if size is None:
            size = this
            first = path
        elif this != size:
            raise InputError(
                f"frame sizes differ: {path.name} is {this[0]}x{this[1]} but {first.name} is "
                f"{size[0]}x{size[1]} (in {path.parent})"
            )
    assert size is not None
    return size


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _rgb8(image)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read image {path}: {_reason(exc)}") from None


def _rgb8(image: PILImage.Image) -> np.ndarray:
    """Any Pillow image as HxWx3 uint8 RGB (16-bit and float scaled, alpha over black)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image)
        if mode == "F" or values.dtype.kind == "f":
            grey = np.clip(values.astype(np.float32), 0.0, 1.0) * 255.0
        else:  # 16-bit greyscale ("I;16*"), or "I" holding 16-bit data
            grey = np.clip(values.astype(np.float32), 0, 65535) / 257.0
        grey = np.rint(grey).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class VideoSource(FrameSource):
    """Frames of a video file through imageio-ffmpeg, decoded sequentially on demand.

    One ffmpeg process streams raw RGB; reading ``i, i+1, ...`` costs one decode each. It is
    restarted from the beginning only when a frame before the current position is asked for.
    """

    def __init__(self, path: Path, frame_range: str | None = None):
        self.path = Path(path)
        self.description = str(path)
        self.total_frames = _count_video_frames(self.path)
        self._range = parse_frame_range(frame_range, self.total_frames)
        self._reader = None
        self._next = 0  # clip index of the frame the open reader yields next
        self._last: tuple[int, np.ndarray] | None = None
        self.starts = 0  # how many times ffmpeg was started to read (tests check laziness)
        meta = self._open_reader()
        self.size = (int(meta["size"][0]), int(meta["size"][1]))
        fps = float(meta.get("fps") or 0.0)
        self.fps = fps if fps > 0 else None

    def __len__(self) -> int:
        return len(self._range)

    def read(self, index: int) -> np.ndarray:
        target = self._range[self._check_index(index)]
        if self._last is not None and self._last[0] == target:
            return self._last[1].copy()
        if self._reader is None or target < self._next:
            self._open_reader()
        width, height = self.size
        while True:
            try:
                data = next(self._reader)
            except StopIteration:
                self.close()
                raise InputError(
                    f"video {self.path} ended after {self._next} frames while reading frame {target} "
                    f"(it counted {self.total_frames}); the file may be damaged"
                ) from None
            except RuntimeError as exc:
                self.close()
                raise InputError(f"cannot decode frame {self._next} of video {self.path}: {_reason(exc)}") from None
            position = self._next
            self._next += 1
            if position == target:
                frame = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
                self._last = (target, frame)
                return frame.copy()

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _open_reader(self) -> dict:
        import imageio_ffmpeg

        self.close()
        reader = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24", output_params=list(_FFMPEG_VIDEO_ONLY))
        try:
            meta = next(reader)
        except (OSError, RuntimeError, StopIteration) as exc:
            reader.close()
            raise InputError(f"cannot decode video {self.path}: {_reason(exc)}") from None
        self._reader = reader
        self._next = 0
        self.starts += 1
        return meta


def _count_video_frames(path: Path) -> int:
    """Exact frame count, by decoding the first video stream once (metadata can be wrong)."""
    import imageio_ffmpeg

    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        "-nostats",
        "-i",
        str(path),
        *_FFMPEG_VIDEO_ONLY,
        "-f",
        "null",
        "-progress",
        "pipe:1",
        "-",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise InputError(f"cannot run ffmpeg to read {path}: {exc}") from None
    errors = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        if "does not contain any stream" in errors or "matches no streams" in errors:
            raise InputError(f"no video stream in {path}")
        lines = [line.strip() for line in errors.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"ffmpeg exited with status {done.returncode}"
        if reason.startswith(str(path)):
            reason = reason[len(str(path)) :].lstrip(": ")
        raise InputError(f"cannot decode video {path}: {reason}")
    frames = None
    for line in done.stdout.decode(errors="replace").splitlines():
        if line.startswith("frame="):
            try:
                frames = int(line.split("=", 1)[1].strip())
            except ValueError:
                pass
    if frames is None:
        raise InputError(f"cannot decode video {path}: ffmpeg reported no frame count")
    if frames == 0:
        raise InputError(f"video {path} has no frames")
    return frames


# --------------------------------------------------------------------------------------------
# writing frames


def write_frame(out_dir, index: int, rgb) -> Path:
    """Write ``out_dir/NNNNNN.png`` atomically, so an interrupted run leaves only whole files."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {rgb.dtype} {rgb.shape}")
    if index < 0:
        raise ValueError(f"frame index must be >= 0, got {index}")
    target = Path(out_dir) / f"{index:06d}.png"
    return atomic_write(
        target, lambda file: Image.fromarray(np.ascontiguousarray(rgb)).save(file, format="PNG", compress_level=4)
    )


def existing_frames(out_dir) -> list[Path]:
    """The ``NNNNNN.png`` files already in ``out_dir``, in frame order ([] if it does not exist)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if FRAME_NAME.match(p.name) and p.is_file()]
    return sorted(found, key=lambda p: int(FRAME_NAME.match(p.name).group(1)))


def write_depth_png(path, depth01: np.ndarray) -> Path:
    """16-bit greyscale PNG of values in [0, 1] (clipped); callers orient it near = bright."""
    from PIL import Image

    values = np.asarray(depth01, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D depth map, got shape {values.shape}")
    values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
    grey = np.rint(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return atomic_write(path, lambda file: Image.fromarray(grey).save(file, format="PNG"))


def depth_png_writer(folder) -> Callable[[int, np.ndarray], None]:
    """A depth sink for ``edit_clip``: frame i's depth as ``folder/00000i.png`` (folder made now)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create --save-depth folder {folder}: {exc.strerror or exc}") from None

    def write(index: int, depth01: np.ndarray) -> None:
        try:
            write_depth_png(folder / f"{index:06d}.png", depth01)
        except OSError as exc:  # a full disk, a quota
            raise InputError(f"cannot write depth {index} to {folder}: {exc.strerror or exc}") from None

    return write


def write_side_by_side_mp4(
    source: FrameSource, edited_dir, out_path, fps: float = 12.0, label: str | None = None
) -> Path:
    """An H.264 preview: source frame on the left, its edit on the right, for every edited frame.

    Edited frames are matched to source frames by their number and resized to the source
    size; frames past the source's end are ignored. ``label`` is drawn at the top of the
    edit's half (e.g. "random-weight output", so nobody mistakes a test video for a result).
    Odd sizes get one black pixel of padding (yuv420p needs even sides).
    """
    import imageio_ffmpeg

    edited = [p for p in existing_frames(edited_dir) if int(FRAME_NAME.match(p.name).group(1)) < len(source)]
    if not edited:
        raise InputError(f"no edited frames (NNNNNN.png) in {edited_dir} to preview")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    width, height = source.size
    out_w, out_h = 2 * width + (2 * width) % 2, height + height % 2
    out_path = Path(out_path)
    with replacing(out_path, suffix=".tmp.mp4") as temp:  # ffmpeg picks the container by extension
        writer = imageio_ffmpeg.write_frames(
            str(temp),
            (out_w, out_h),
            fps=float(fps),
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-crf", "18", "-movflags", "+faststart"],
        )
        try:
            writer.send(None)
            for path in edited:
                index = int(FRAME_NAME.match(path.name).group(1))
                canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
                canvas[:height, :width] = source.read(index)
                canvas[:height, width : 2 * width] = resize_rgb(_read_rgb(path), (width, height))
                if label:
                    canvas = _draw_label(canvas, label, x=width)
                writer.send(np.ascontiguousarray(canvas))
        finally:
            writer.close()
        if not temp.is_file() or temp.stat().st_size == 0:
            raise InputError(f"ffmpeg could not write the preview {out_path}")
    return out_path


def _draw_label(canvas: np.ndarray, text: str, x: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    size = max(10, canvas.shape[0] // 20)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((x + 4, 2), text, font=font)
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((x + 4, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


# --------------------------------------------------------------------------------------------
# depth passes


class DepthFiles:
    """One float depth image a frame (EXR or .npy), values as stored (e.g. Z-pass distance)."""

    def __init__(self, files: list[Path], size: tuple[int, int], description: str):
        self.files = files
        self.size = size
        self.description = description

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.files):
            raise IndexError(f"depth {index} is outside {self.description} ({len(self.files)} files)")
        path = self.files[index]
        depth = _read_exr_depth(path) if path.suffix.lower() == ".exr" else _read_npy_depth(path)
        if (depth.shape[1], depth.shape[0]) != self.size:
            raise InputError(
                f"depth {path} is {depth.shape[1]}x{depth.shape[0]}, the frames are {self.size[0]}x{self.size[1]}"
            )
        return depth

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self.read(index)

    def __repr__(self) -> str:
        return f"DepthFiles({self.description!r}, {len(self)} files)"


def open_depth(path, count: int, size: tuple[int, int], frame_range: str | None = None) -> DepthFiles:
    """The depth files in folder ``path`` matching ``count`` frames of ``size`` (width, height).

    The folder holds either exactly the selected frames, or the whole clip, in which case
    ``frame_range`` picks the same frames it picked from the clip.
    """
    folder = Path(path)
    if not folder.exists():
        raise InputError(f"depth folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"depth must be a folder of .exr or .npy files, got the file {folder}")
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise InputError(f"cannot list depth folder {folder}: {exc.strerror or exc}") from None
    files = sorted(
        (p for p in entries if p.suffix.lower() in DEPTH_EXTENSIONS and not p.name.startswith(".") and p.is_file()),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise InputError(f"no depth files (.exr or .npy) in {folder}")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise InputError(f"depth folder {folder} mixes .exr and .npy files; keep one kind")
    if len(files) != count:
        selected = None
        if frame_range:
            try:
                selected = parse_frame_range(frame_range, len(files))
            except InputError:
                selected = None
        if selected is None or len(selected) != count:
            raise InputError(
                f"depth folder {folder} has {len(files)} files but there are {count} frames"
                + (f" (--frames {frame_range} of the clip)" if frame_range else "")
            )
        files = [files[i] for i in selected]
    width, height = int(size[0]), int(size[1])
    for file in files:
        this = _depth_size(file)
        if this != (width, height):
            raise InputError(f"depth {file} is {this[0]}x{this[1]}, the frames are {width}x{height}")
    return DepthFiles(files, (width, height), str(folder))


def _depth_size(path: Path) -> tuple[int, int]:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read depth {path}: {_reason(exc)}") from None
        shape = _npy_depth_shape(path, array)
        return shape[1], shape[0]
    part, _ = _exr_depth_channel(path)
    low, high = part.header["dataWindow"]
    return int(high[0] - low[0] + 1), int(high[1] - low[1] + 1)


def _npy_depth_shape(path: Path, array: np.ndarray) -> tuple[int, int]:
    shape = array.shape
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) != 2 or array.dtype.kind not in "fiu":
        raise InputError(f"depth {path} must hold a 2-D float array, got {array.dtype} {array.shape}")
    return shape


def _read_npy_depth(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read depth {path}: {_reason(exc)}") from None
    shape = _npy_depth_shape(path, array)
    return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)


def _exr_channel_rank(name: str, layered: bool) -> int | None:
    """Lower is better; None: not a depth channel (only plain files fall back to V, Y, R, first).

    Blender writes ``ViewLayer.Depth.Z`` (multilayer render, one part per pass),
    ``Depth.V`` (multilayer File Output of a float socket), ``V`` (single-layer BW) and
    R=G=B (single-layer RGB/RGBA).
    """
    lower = name.lower()
    last = lower.rsplit(".", 1)[-1]
    if lower.endswith("depth.z"):
        return 0
    if last == "z":
        return 1
    if "depth" in lower.split("."):
        return 2
    if layered:
        return None
    return {"v": 3, "y": 4, "r": 5}.get(last, 6)


def _exr_depth_channel(path: Path):
    """(part header holder, channel name) of the depth channel, from the headers only."""
    openexr = _import_openexr()
    try:
        exr = openexr.File(str(path), header_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read depth EXR {path}: {_reason(exc)}") from None
    names = [(part, channel.name) for part in exr.parts for channel in part.header["channels"]]
    if not names:
        raise InputError(f"depth EXR {path} has no channels")
    layered = any("." in name for _, name in names)
    ranked = [(_exr_channel_rank(name, layered), order, part, name) for order, (part, name) in enumerate(names)]
    ranked = [r for r in ranked if r[0] is not None]
    if not ranked:
        shown = ", ".join(name for _, name in names[:8]) + (", ..." if len(names) > 8 else "")
        raise InputError(f"depth EXR {path} has no depth channel (Z or Depth); it has {shown}")
    _, _, part, name = min(ranked, key=lambda r: (r[0], r[1]))
    return part, name


def _read_exr_depth(path: Path) -> np.ndarray:
    openexr = _import_openexr()
    _, name = _exr_depth_channel(path)
    try:
        exr = openexr.File(str(path), separate_channels=True)
        for part in exr.parts:
            if name in part.channels:
                return np.ascontiguousarray(part.channels[name].pixels, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read depth EXR {path}: {_reason(exc)}") from None
    raise InputError(f"cannot read depth EXR {path}: channel {name} has no pixels")


def _import_openexr():
    try:
        import OpenEXR
    except ImportError:
        raise InputError("reading EXR depth needs the OpenEXR package: pip install OpenEXR") from None
    return OpenEXR
