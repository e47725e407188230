"""The frames a strip shows: its trimmed range, in timeline order, at the scene's render resolution.

Frames are *rendered through the Sequencer* rather than decoded by hand: a temporary copy of the
scene in which every other strip is muted renders one timeline frame at a time. So the frames are
exactly what the strip shows, whatever its type (image sequence, movie, scene strip rendered by
its engine), retiming, reversal, transform, crop or modifiers, and movies are decoded by Blender's
own FFmpeg. The user's scene is never modified; the copy and its files are removed by
:meth:`StripFrames.close`.

Colour: the copy renders with the *Standard* view transform, so the 8-bit frames are the
Sequencer's sRGB pixels, and the edited frames, written back as sRGB PNGs, look like the source
under whatever view transform the user's scene uses.

Depth: ``read_depth`` is the hook for a rendered Z pass of scene strips (``depth="ZPASS"``); it is
not available yet, so :func:`check_strip` refuses that mode with a clear message.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import bpy

from . import compat
from .errors import P2VAddonError

DEPTH_MODES = ("ESTIMATE", "ZPASS")
RENDER_RESULT = "Render Result"
ZPASS_AVAILABLE = False  # a rendered Z pass for scene strips is the next step (see read_depth)


def check_strip(scene, strip, depth: str = "ESTIMATE") -> None:
    """Raise :class:`P2VAddonError` unless ``strip`` can be edited; nothing is changed either way."""
    if strip is None:
        raise P2VAddonError("No active strip: click the image, movie or scene strip to edit in the Sequencer")
    kind = compat.strip_kind(strip)
    if kind not in ("image", "movie", "scene"):
        raise P2VAddonError(f"Strip '{strip.name}' is {compat.a_kind(kind)} strip; Pix2Video edits image, movie and scene strips")
    if strip.frame_final_duration < 1:
        raise P2VAddonError(f"Strip '{strip.name}' shows no frames")
    if kind == "movie":
        path = compat.abspath(strip.filepath, scene)
        if not os.path.isfile(path):
            raise P2VAddonError(f"The movie file of strip '{strip.name}' is missing: {path}")
    elif kind == "image":
        missing = missing_image_files(scene, strip)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise P2VAddonError(f"Strip '{strip.name}' is missing {len(missing)} image file(s): {missing[0]}{more}")
    elif kind == "scene":
        shown = strip.scene
        if shown is None:
            raise P2VAddonError(f"Scene strip '{strip.name}' has no scene")
        if getattr(strip, "scene_input", "CAMERA") == "CAMERA" and (strip.scene_camera or shown.camera) is None:
            raise P2VAddonError(f"Scene '{shown.name}' of strip '{strip.name}' has no camera to render from")
    if depth not in DEPTH_MODES:
        raise P2VAddonError(f"Unknown depth mode {depth!r}; use one of {', '.join(DEPTH_MODES)}")
    if depth == "ZPASS":
        if kind != "scene":
            raise P2VAddonError(f"Depth 'Z pass' needs a scene strip; '{strip.name}' is {compat.a_kind(kind)} strip: use Depth 'Estimate'")
        if not ZPASS_AVAILABLE:
            raise P2VAddonError("Depth 'Z pass' is not available in this version of the add-on; use Depth 'Estimate'")


def missing_image_files(scene, strip) -> list[str]:
    """Image files the strip shows within its trimmed range that do not exist (absolute paths)."""
    directory = compat.abspath(strip.directory, scene)
    seen, missing = set(), []
    for frame in range(strip.frame_final_start, strip.frame_final_end):
        element = strip.strip_elem_from_frame(frame)
        if element is None or element.filename in seen:
            continue
        seen.add(element.filename)
        path = os.path.join(directory, element.filename)
        if not os.path.isfile(path):
            missing.append(path)
    return missing


def strip_ancestors(strip) -> list:
    chain = []
    parent = compat.parent_meta(strip)
    while parent is not None:
        chain.append(parent)
        parent = compat.parent_meta(parent)
    return chain


class StripFrames:
    """Frame ``i`` of the strip as raw RGB bytes (top row first); bpy, so main thread only."""

    def __init__(self, scene, strip, depth: str = "ESTIMATE"):
        check_strip(scene, strip, depth)
        self.scene = scene
        self.strip_name = strip.name
        self.kind = compat.strip_kind(strip)
        self.first_frame = strip.frame_final_start
        self.count = strip.frame_final_duration
        self.width, self.height = compat.render_size(scene)
        if self.width < 1 or self.height < 1:
            raise P2VAddonError(f"Scene '{scene.name}' has a render size of {self.width}x{self.height}")
        self.depth = depth
        self._keep = {strip.name, *(meta.name for meta in strip_ancestors(strip))}
        self._copy = None
        self._folder = None
        self._had_render_result = True

    def __len__(self) -> int:
        return self.count

    @property
    def has_depth(self) -> bool:
        return self.depth == "ZPASS"

    def open(self) -> None:
        """Make the temporary scene that renders this strip alone."""
        if self._copy is not None:
            return
        self._folder = tempfile.mkdtemp(prefix="p2v-frames-")
        self._had_render_result = RENDER_RESULT in bpy.data.images
        copy = self.scene.copy()
        copy.name = f"P2V frames of {self.strip_name}"
        self._copy = copy
        for strip in compat.all_strips(copy.sequence_editor):
            strip.mute = strip.name not in self._keep
        render = copy.render
        render.use_sequencer = True
        render.use_compositing = False
        render.use_stamp = False
        render.use_border = False
        render.use_multiview = False
        render.image_settings.file_format = "PNG"
        render.image_settings.color_mode = "RGB"
        render.image_settings.color_depth = "8"
        render.image_settings.compression = 0
        view = copy.view_settings
        view.view_transform = "Standard"
        view.look = "None"
        view.exposure = 0.0
        view.gamma = 1.0
        view.use_curve_mapping = False

    def read(self, index: int) -> bytes:
        """Render frame ``index`` of the strip (0 = its first visible frame)."""
        import numpy as np  # bundled with every Blender

        if not 0 <= index < self.count:
            raise IndexError(f"frame {index} is outside 0..{self.count - 1}")
        self.open()
        copy = self._copy
        path = os.path.join(self._folder, f"{index:06d}.png")
        copy.frame_set(self.first_frame + index)
        compat.render_still(copy, path)
        if not os.path.isfile(path):
            raise P2VAddonError(f"Blender rendered no image for frame {self.first_frame + index} of strip '{self.strip_name}'")
        image = bpy.data.images.load(path, check_existing=False)
        try:
            width, height = image.size
            channels = image.channels
            if (width, height) != (self.width, self.height):
                raise P2VAddonError(f"Frame {self.first_frame + index} rendered at {width}x{height}, expected {self.width}x{self.height}")
            pixels = np.empty(width * height * channels, dtype=np.float32)
            image.pixels.foreach_get(pixels)
        finally:
            bpy.data.images.remove(image)
            os.unlink(path)
        rgb = pixels.reshape(height, width, channels)[::-1, :, :3]
        return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).tobytes()

    def read_depth(self, index: int):
        """Float32 Z-pass distances of frame ``index`` (top row first), or None without a Z pass.

        The hook for rendered depth of scene strips: it will render the strip's scene with its Z
        pass (through ``compat.compositor_tree``) alongside :meth:`read`.
        """
        if not self.has_depth:
            return None
        raise P2VAddonError("Depth 'Z pass' is not available in this version of the add-on")

    def close(self) -> None:
        """Remove the temporary scene and its files (safe to call twice)."""
        copy, self._copy = self._copy, None
        if copy is not None:
            try:
                bpy.data.scenes.remove(copy)
            except ReferenceError:
                pass
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            result = bpy.data.images.get(RENDER_RESULT)
            if result is not None and not self._had_render_result:
                bpy.data.images.remove(result)  # the first render made it; leave the file as it was
