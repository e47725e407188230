"""The new image strip that receives the edited frames, and the folder its PNGs live in.

Placement: the first channel above the source that is free over the whole range the result will
cover, starting at the timeline frame of the first edited frame (the source's first visible frame,
or later with a frame range); it is checked before the job starts, so a
job never begins without a place to put its result. The strip is created when the first frame
arrives and grows by one element per frame. A frame is written to disk (atomically) before the
strip refers to it, so the strip never points to a missing or half-written file, and nothing the
add-on does deletes a frame it wrote (undo removes the strip, not the files).

Folder: ``//p2v/<strip name>_<n>/`` beside the saved .blend (``n`` the first unused number), or
``<output folder>/<blend or "untitled">/<strip name>_<n>/`` when the file is not saved yet.
"""

from __future__ import annotations

import os
import re
import tempfile

import bpy

from . import compat, png
from .errors import P2VAddonError

FRAME_NAME = "{:06d}.png"


def safe_name(name: str) -> str:
    """A folder name made from a strip name (letters, digits, ``-``, ``_``, ``.``)."""
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("._")
    return cleaned[:64] or "strip"


def output_root(blend_path: str, fallback_dir: str) -> tuple[str, bool]:
    """(absolute root folder for outputs, whether it is relative to the .blend)."""
    if blend_path:
        return os.path.join(os.path.dirname(os.path.abspath(blend_path)), "p2v"), True
    base = fallback_dir or os.path.join(tempfile.gettempdir(), "p2v")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "untitled"), False


def unused_folder(root: str, strip_name: str) -> str:
    stem = safe_name(strip_name)
    n = 1
    while os.path.exists(os.path.join(root, f"{stem}_{n}")):
        n += 1
    return os.path.join(root, f"{stem}_{n}")


def check_writable(folder: str) -> None:
    """Raise unless ``folder`` can be created (if missing) and written; leaves nothing behind."""
    probe_dir = folder
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise P2VAddonError(f"Output folder {folder} cannot be created: {probe_dir} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".p2v-write-test-", dir=probe_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise P2VAddonError(
            f"Output folder {folder} is not writable ({exc.strerror or exc}); "
            "save the .blend elsewhere or set another output folder in the preferences"
        ) from None


def strip_occupies(strip, channel: int, start: int, end: int) -> bool:
    return strip.channel == channel and strip.frame_final_start < end and start < strip.frame_final_end


def first_free_channel(editor, source, start: int, length: int) -> int:
    """First channel above ``source`` with no top-level strip over the result's frames."""
    end = start + length
    siblings = list(compat.strips(editor))
    for channel in range(source.channel + 1, compat.MAX_CHANNEL + 1):
        if not any(strip_occupies(strip, channel, start, end) for strip in siblings):
            return channel
    frames = f"frame {start}" if length == 1 else f"frames {start}..{end - 1}"
    raise P2VAddonError(f"No free channel above strip '{source.name}' for {frames}: make room on a channel above it")


class OutputStrip:
    """Where the edited frames of one job go: a folder of PNGs and a growing image strip.

    :meth:`write` runs on the worker thread (files only), :meth:`append` on the main thread (bpy).
    """

    def __init__(self, scene, source, frame_start: int, count: int, fallback_dir: str = ""):
        editor = scene.sequence_editor
        if compat.parent_meta(source) is not None:
            raise P2VAddonError(
                f"Strip '{source.name}' is inside a meta strip; edit it at the top level (ungroup the meta strip first)"
            )
        self.scene = scene
        self.count = count
        self.channel = first_free_channel(editor, source, frame_start, count)
        self.frame_start = frame_start
        self.source_name = source.name
        blend_path = bpy.data.filepath
        root, self.relative = output_root(blend_path, fallback_dir)
        self.folder = unused_folder(root, source.name)
        check_writable(self.folder)
        self.name = f"{source.name} p2v"
        self.strip_name: str | None = None
        self.files: list[str] = []  # frame files the strip shows, in order

    # worker thread -------------------------------------------------------------------------------

    def write(self, index: int, rgb, width: int, height: int) -> str:
        """Write frame ``index`` as a PNG (atomically); return its file name."""
        os.makedirs(self.folder, exist_ok=True)
        name = FRAME_NAME.format(index)
        png.write_rgb(os.path.join(self.folder, name), rgb, width, height)
        return name

    # main thread ---------------------------------------------------------------------------------

    def strip(self):
        """The output strip, or None before the first frame (or after an undo took it away)."""
        if self.strip_name is None or self.scene.sequence_editor is None:
            return None
        return compat.all_strips(self.scene.sequence_editor).get(self.strip_name)

    def append(self, name: str) -> None:
        """Show one more frame (already on disk) at the end of the strip."""
        self.files.append(name)
        strip = self.strip()
        if strip is None or len(strip.elements) != len(self.files) - 1:
            self._create()
        else:
            strip.elements.append(name)

    def _create(self) -> None:
        """(Re)create the strip with every frame written so far."""
        editor = self.scene.sequence_editor or self.scene.sequence_editor_create()
        old = self.strip()
        if old is not None:
            compat.strips(editor).remove(old)
        directory = self.folder
        if self.relative:
            try:
                directory = bpy.path.relpath(directory)
            except ValueError:  # another drive on Windows
                pass
        first = os.path.join(directory, self.files[0])
        strip = compat.new_image_strip(editor, self.name, first, self.channel, self.frame_start)
        for name in self.files[1:]:
            strip.elements.append(name)
        self.strip_name = strip.name

    @property
    def frames(self) -> int:
        return len(self.files)
