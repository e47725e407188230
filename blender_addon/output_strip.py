"""The new image strip that receives the edited frames, and the folder its PNGs live in.

Placement: the first channel above the source that is free over the whole range the result will
cover, starting at the timeline frame of the first edited frame (the source's first visible frame,
or later with a frame range); it is checked before the job starts, so a job never begins without
a place to put its result. The strip is created when the first frame arrives and grows by one
element per frame; it takes the source's transform, crop, flips, blend mode and opacity
(``strip_look``), so it composites where the source did. A frame is written to disk (atomically)
before the strip refers to it, so the strip never points to a missing or half-written file, and
nothing the add-on does deletes a frame it wrote (undo removes the strip, not the files).

Folder: ``<output folder>/<strip name>_<n>/``, the output folder being the preference (default
``//p2v/``, beside the .blend) or the headless ``--output-dir``. A folder is never reused: it is
created with one ``mkdir`` (so two jobs at once cannot both take it), and a number that any image
strip of the file already points to is skipped even when its folder is gone (a .blend copied
without its frames). While the file is not saved, ``//`` has no folder: frames wait in the
system's temp folder and move beside the .blend when it is first saved (:func:`move_unsaved_frames`).

Every result strip records how it was made in custom properties (``p2v_source``, ``p2v_prompt``,
``p2v_settings`` as JSON), which *Re-edit* and a person reading the file can use, and is named
``<source> p2v <prompt>`` shortened to Blender's name length, so results can be told apart.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import bpy

from . import compat, png, strip_look
from .errors import P2VAddonError

FRAME_NAME = "{:06d}.png"
DEFAULT_OUTPUT = "//p2v/"
NAME_BYTES = 63  # Blender 4.2's longest strip name


def safe_name(name: str) -> str:
    """A folder name made from a strip name (letters, digits, ``-``, ``_``, ``.``)."""
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("._")
    return cleaned[:64] or "strip"


def unsaved_root() -> str:
    """Where frames of a file that was never saved wait for its first save."""
    return os.path.join(tempfile.gettempdir(), "p2v", "untitled")


def output_root(output_dir: str, blend_path: str) -> tuple[str, bool]:
    """(absolute root folder for outputs, whether it is the unsaved file's temporary place)."""
    wanted = (output_dir or "").strip() or DEFAULT_OUTPUT
    if wanted.startswith("//"):
        if not blend_path:
            return unsaved_root(), True
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(blend_path)), wanted[2:])), False
    return os.path.normpath(os.path.abspath(os.path.expanduser(wanted))), False


def folders_in_use() -> set[str]:
    """Every folder an image strip of the open file points to (absolute, normalised)."""
    used = set()
    for scene in bpy.data.scenes:
        if scene.sequence_editor is None:
            continue
        for strip in compat.all_strips(scene.sequence_editor):
            if strip.type == "IMAGE":
                used.add(os.path.normcase(compat.abspath(strip.directory, scene)))
    return used


def reserve_folder(root: str, strip_name: str) -> str:
    """Create and return ``root/<strip>_<n>`` for the first ``n`` no other job or strip has."""
    stem = safe_name(strip_name)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise _unwritable(root, exc) from None
    in_use = folders_in_use()
    for n in range(1, 100_000):
        folder = os.path.join(root, f"{stem}_{n}")
        if os.path.normcase(os.path.normpath(folder)) in in_use:
            continue
        try:
            os.mkdir(folder)  # atomic: exactly one job gets this folder
        except FileExistsError:
            continue
        except OSError as exc:
            raise _unwritable(root, exc) from None
        return folder
    raise P2VAddonError(f"Output folder {root} has no free name for strip '{strip_name}'")


def _unwritable(root: str, exc: OSError) -> P2VAddonError:
    return P2VAddonError(
        f"Output folder {root} cannot be written ({exc.strerror or exc}): choose another Output folder in the "
        "Pix2Video preferences (headless: --output-dir)"
    )


def result_name(source: str, prompt: str, marker: str = " p2v") -> str:
    """``<source> p2v <prompt>`` within Blender's name length (UTF-8 bytes): the source's name and
    the prompt are shortened, never the ``p2v`` that marks a result."""
    words = " ".join(str(prompt).split())
    source_part = _clip_bytes(source, 28 if words else NAME_BYTES - len(marker))
    name = source_part + marker
    room = NAME_BYTES - len(name.encode("utf-8")) - 1
    if words and room > 3:
        name += " " + (words if len(words.encode("utf-8")) <= room else _clip_bytes(words, room - 3) + "...")
    return name


def _clip_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore").rstrip()


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


def result_channel(scene, source, frame_start: int, count: int) -> int:
    """The channel a result of ``source`` would take now, or :class:`P2VAddonError` why there is none."""
    if compat.parent_meta(source) is not None:
        raise P2VAddonError(
            f"Strip '{source.name}' is inside a meta strip; edit it at the top level (ungroup the meta strip first)"
        )
    return first_free_channel(scene.sequence_editor, source, frame_start, count)


class OutputStrip:
    """Where the edited frames of one job go: a folder of PNGs and a growing image strip.

    :meth:`write` runs on the worker thread (files only), :meth:`append` on the main thread (bpy).
    """

    def __init__(
        self,
        scene,
        source,
        frame_start: int,
        count: int,
        output_dir: str = "",
        *,
        look: dict | None = None,
        record: dict | None = None,
        name: str = "",
    ):
        self.scene = scene
        self.count = count
        self.channel = result_channel(scene, source, frame_start, count)
        self.frame_start = frame_start
        self.source_name = source.name
        self.look = dict(look or {})
        self.record = dict(record or {})  # custom properties of the result strip
        self.name = name or f"{source.name} p2v"
        root, self.unsaved = output_root(output_dir, bpy.data.filepath)
        self._made_root = not os.path.isdir(root)
        self.folder = reserve_folder(root, source.name)  # created now: no other job can take it
        self.strip_name: str | None = None
        self.files: list[str] = []  # frame files the strip shows, in order

    def release(self) -> None:
        """Remove the folder again if no frame was written into it (a job that never started), and
        the output folder too when this job made it and it is empty: a refused job changes nothing."""
        try:
            os.rmdir(self.folder)
            if self._made_root:
                os.rmdir(os.path.dirname(self.folder))
        except OSError:
            pass

    # worker thread -------------------------------------------------------------------------------

    def write(self, index: int, rgb, width: int, height: int) -> str:
        """Write frame ``index`` as a PNG (atomically); return its file name."""
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
        first = os.path.join(blend_relative(self.folder), self.files[0])
        strip = compat.new_image_strip(editor, self.name, first, self.channel, self.frame_start)
        for name in self.files[1:]:
            strip.elements.append(name)
        strip_look.apply(strip, self.look)
        for key, value in self.record.items():
            strip[key] = value
        self.strip_name = strip.name

    def spec(self) -> dict:
        """What re-creates this strip in a fresh copy of the file (the headless save)."""
        return {
            "scene": self.scene.name,
            "source": self.source_name,
            "name": self.name,
            "folder": self.folder,
            "files": list(self.files),
            "frame_start": self.frame_start,
            "channel": self.channel,
            "look": dict(self.look),
            "record": dict(self.record),
        }

    @property
    def frames(self) -> int:
        return len(self.files)


def blend_relative(folder: str, blend_path: str | None = None) -> str:
    """``//``-relative when the file is saved (and on the same drive), else absolute."""
    if not (bpy.data.filepath if blend_path is None else blend_path):
        return folder
    try:
        start = None if blend_path is None else os.path.dirname(blend_path)
        return bpy.path.relpath(folder, start=start)
    except ValueError:  # another drive on Windows
        return folder


def recreate(spec: dict):
    """Add a result strip described by :meth:`OutputStrip.spec` to the open file; return it.

    Placed on the first channel above its source that is free now (the file may hold strips that
    other jobs added since), or on the first free channel from 1 up if the source is gone.
    """
    scene = bpy.data.scenes.get(spec["scene"])
    if scene is None:
        raise P2VAddonError(f"Scene '{spec['scene']}' is no longer in the saved file")
    editor = scene.sequence_editor or scene.sequence_editor_create()
    source = compat.all_strips(editor).get(spec["source"])
    length = len(spec["files"])
    if source is not None:
        channel = first_free_channel(editor, source, spec["frame_start"], length)
    else:
        channel = next(
            c
            for c in range(1, compat.MAX_CHANNEL + 1)
            if not any(
                strip_occupies(s, c, spec["frame_start"], spec["frame_start"] + length) for s in compat.strips(editor)
            )
        )
    first = os.path.join(blend_relative(spec["folder"]), spec["files"][0])
    strip = compat.new_image_strip(editor, spec["name"], first, channel, spec["frame_start"])
    for name in spec["files"][1:]:
        strip.elements.append(name)
    strip_look.apply(strip, spec["look"])
    for key, value in spec["record"].items():
        strip[key] = value
    return strip


def move_unsaved_frames(blend_path: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Move result frames that wait in the temp folder beside ``blend_path`` (its ``p2v/``) and point
    their strips there; return the new folders. Called as the file is first saved; ``skip``: folders
    a running job still writes into (they stay, and the job's strip with them)."""
    waiting = os.path.normcase(unsaved_root())
    root = os.path.join(os.path.dirname(os.path.abspath(blend_path)), "p2v")
    moved = {}
    for scene in bpy.data.scenes:
        if scene.sequence_editor is None:
            continue
        for strip in compat.all_strips(scene.sequence_editor):
            if strip.type != "IMAGE":
                continue
            folder = os.path.normpath(compat.abspath(strip.directory, scene))
            if os.path.normcase(os.path.dirname(folder)) != waiting or not os.path.isdir(folder) or folder in skip:
                continue
            if folder not in moved:
                target = reserve_folder(root, os.path.basename(folder).rsplit("_", 1)[0])
                for name in sorted(os.listdir(folder)):
                    shutil.move(os.path.join(folder, name), os.path.join(target, name))
                os.rmdir(folder)
                moved[folder] = target
            strip.directory = blend_relative(moved[folder], blend_path) + os.sep
    return list(moved.values())
