"""The strip's own picture, frame by frame: its trimmed range, in timeline order, at its source's size.

Frames are *rendered through the Sequencer* rather than decoded by hand: a temporary copy of the
scene in which every other strip is muted renders one timeline frame at a time. So the frames are
what the strip shows, whatever its type (image sequence, movie, scene strip rendered by its
engine), retiming, reversal, colour or modifiers, and movies are decoded by Blender's own FFmpeg.
What places the picture in the frame (transform, crop, flips, blend mode, opacity) is left out:
the copy renders at the size of the strip's source (the image, the movie, the shown scene's
render size) with the strip unplaced, so the model spends its pixels on the picture, not on empty
frame, and the new strip takes the source's placement (``strip_look``). The user's scene is
never modified; the copy and its files are removed by :meth:`StripFrames.close`.

Colour: the copy renders with the *Standard* view transform, so the 8-bit frames are the
Sequencer's sRGB pixels, and the edited frames, written back as sRGB PNGs, look like the source
under whatever view transform the user's scene uses.

Depth ``"zpass"`` (scene strips only): the copy's strip shows a temporary copy of the strip's scene
instead, rendered at its own size with the Z pass on; its compositor sends the view
layer's Image on to the Sequencer and writes the Depth to a 32-bit float EXR (File Output node)
during the same render. So RGB and Z come from one render of the frame the strip shows (the
Sequencer still maps timeline frames to scene frames: offsets, reversal, strobe, retiming), and
line up pixel for pixel: both are the scene's own picture at its own render size, whatever the
strip's transform. Everything the Z pass needs
(engine samples, passes, view layers, compositor nodes, output, resolution) is set on the copies:
the user's scenes are only read, and the copies go in :meth:`StripFrames.close`, also after an
error or a cancel. Rendering through the Sequencer also keeps the scene's animated values as they
were: a direct render of a scene writes the rendered frame's animated values into its objects.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import bpy

from . import compat, strip_look
from ._vendor import settings as schema
from .errors import P2VAddonError

DEPTH_MODES = schema.choice_values("depth")  # estimate, zpass
ZPASS_RENDERS = schema.choice_values("zpass_render")  # quick preview, as the scene is set
PREVIEW_SAMPLES = {"CYCLES": 8, "EEVEE": 4}  # quick preview: at most this many samples
RENDER_RESULT = "Render Result"
MAX_PICTURE_SIDE = 16384
# Blender writes 1e10 for Z-pass pixels that see no surface (Cycles, Workbench): sent for every
# background pixel. _BACKGROUND_FROM mirrors p2v_runtime.depth.BACKGROUND_Z: this far, or +inf,
# is background there too.
BACKGROUND_Z = 1e10
_BACKGROUND_FROM = 1e9


def check_strip(scene, strip, depth: str = "estimate", zpass_render: str = "preview") -> None:
    """Raise :class:`P2VAddonError` unless ``strip`` can be edited; nothing is changed either way."""
    if strip is None:
        raise P2VAddonError("No active strip: click the image, movie or scene strip to edit in the Sequencer")
    kind = compat.strip_kind(strip)
    if kind not in ("image", "movie", "scene"):
        raise P2VAddonError(
            f"Strip '{strip.name}' is {compat.a_kind(kind)} strip; Pix2Video edits image, movie and scene strips"
        )
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
        if shown == scene:
            raise P2VAddonError(
                f"Scene strip '{strip.name}' shows '{scene.name}', the Sequencer's own scene: Blender "
                f"cannot render a scene inside itself; show another scene in the strip"
            )
        if getattr(strip, "scene_input", "CAMERA") == "CAMERA" and (strip.scene_camera or shown.camera) is None:
            raise P2VAddonError(f"Scene '{shown.name}' of strip '{strip.name}' has no camera to render from")
    if depth not in DEPTH_MODES:
        raise P2VAddonError(f"Unknown depth mode {depth!r}; use one of {', '.join(DEPTH_MODES)}")
    if depth == "zpass":
        if kind != "scene":
            raise P2VAddonError(
                f"Depth 'Z pass' needs a scene strip; '{strip.name}' is {compat.a_kind(kind)} strip: "
                "use Depth 'Estimate'"
            )
        check_zpass_strip(scene, strip, zpass_render)


def check_zpass_strip(scene, strip, zpass_render: str) -> None:
    """Raise unless the Z pass of scene strip ``strip`` can be rendered frame for frame as it shows."""
    shown = strip.scene
    if getattr(strip, "scene_input", "CAMERA") != "CAMERA":
        raise P2VAddonError(
            f"Depth 'Z pass' renders the scene of strip '{strip.name}' through its camera, but the "
            f"strip shows the Sequencer of '{shown.name}': set the strip's Input to Camera, or use Depth 'Estimate'"
        )
    if zpass_view_layer(shown) is None:
        raise P2VAddonError(
            f"Scene '{shown.name}' of strip '{strip.name}' has no view layer that renders "
            f"(every 'Use for Rendering' is off)"
        )
    if zpass_render not in ZPASS_RENDERS:
        raise P2VAddonError(f"Unknown Z-pass render setting {zpass_render!r}; use one of {', '.join(ZPASS_RENDERS)}")


def zpass_view_layer(scene):
    """The view layer whose Z pass is used: the first one that renders (as the Sequencer shows it)."""
    for layer in scene.view_layers:
        if layer.use:
            return layer
    return None


def zpass_problem(z, clip_end: float) -> tuple:
    """``(z with Blender's background value where no surface is seen, why it is unusable or None)``.

    Pixels at or beyond the camera's clip end see nothing (Eevee writes the clip distance there,
    Cycles and Workbench 1e10): they become 1e10, so every engine sends the same background.
    NaN, zero, negative or -inf distances, and a Z pass with no surface at all, are unusable.
    """
    import numpy as np

    nan = np.isnan(z)
    if nan.any():
        return z, f"{int(nan.sum())} of {z.size} pixels of its Z pass are NaN"
    if np.isneginf(z).any() or (z <= 0).any():
        return z, "its Z pass has zero, negative or -inf distances"
    background = ~np.isfinite(z) | (z >= _BACKGROUND_FROM)
    if clip_end > 0:
        background |= z >= clip_end * 0.9999
    if background.all():
        return z, "nothing is in front of the camera (its Z pass is all background), so it gives no depth"
    z = z.copy()
    z[background] = BACKGROUND_Z
    return z, None


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


def picture_size(scene, strip, frame: int) -> tuple[int, int]:
    """Width and height of the strip's own picture: its image or movie, or its scene's render."""
    kind = compat.strip_kind(strip)
    if kind == "scene":
        width, height = compat.render_size(strip.scene)
        what = f"scene '{strip.scene.name}' of strip '{strip.name}'"
    else:
        # From the file: a strip element's orig_width/height is not set until Blender has shown it
        # (and holds garbage in Blender 4.2 for elements appended from Python).
        width, height = _file_size(scene, strip, kind, frame)
        what = f"the {kind} of strip '{strip.name}'"
    if not (1 <= width <= MAX_PICTURE_SIDE and 1 <= height <= MAX_PICTURE_SIDE):
        raise P2VAddonError(f"Cannot edit {what}: its picture is {width}x{height}")
    return int(width), int(height)


def _file_size(scene, strip, kind: str, frame: int) -> tuple[int, int]:
    if kind == "movie":
        clip = bpy.data.movieclips.load(compat.abspath(strip.filepath, scene), check_existing=False)
        try:
            return tuple(clip.size)
        finally:
            bpy.data.movieclips.remove(clip)
    element = strip.strip_elem_from_frame(frame)
    path = os.path.join(compat.abspath(strip.directory, scene), element.filename)
    image = bpy.data.images.load(path, check_existing=False)
    try:
        return tuple(image.size)
    finally:
        bpy.data.images.remove(image)


class StripFrames:
    """Frame ``i`` of the strip as raw RGB bytes (top row first); bpy, so main thread only."""

    def __init__(self, scene, strip, depth: str = "estimate", zpass_render: str = "preview", frames: str = ""):
        check_strip(scene, strip, depth, zpass_render)
        try:
            chosen = schema.frame_range(frames, strip.frame_final_duration)
        except schema.SettingsError as exc:
            raise P2VAddonError(f"{exc} of strip '{strip.name}'") from None
        self.scene = scene
        self.strip_name = strip.name
        self.kind = compat.strip_kind(strip)
        self.first_frame = strip.frame_final_start + chosen.start  # timeline frame of frame 0
        self.count = len(chosen)
        self.width, self.height = picture_size(scene, strip, self.first_frame)
        self.look = strip_look.capture(strip)  # the new strip's placement
        self.depth = depth
        self._keep = {strip.name, *(meta.name for meta in strip_ancestors(strip))}
        self._copy = None
        self._folder = None
        self._had_render_result = True
        self._zpass = ZPassScene(scene, strip, zpass_render) if depth == "zpass" else None
        self._depth = None  # (index, float32 Z bytes) of the frame read last, with depth

    def __len__(self) -> int:
        return self.count

    @property
    def has_depth(self) -> bool:
        return self.depth == "zpass"

    def open(self) -> None:
        """Make the temporary scene that renders this strip alone (with depth: showing its scene's copy)."""
        if self._copy is not None:
            return
        self._folder = tempfile.mkdtemp(prefix="p2v-frames-")
        self._had_render_result = RENDER_RESULT in bpy.data.images
        copy = self.scene.copy()
        copy.name = f"P2V frames of {self.strip_name}"
        self._copy = copy
        for strip in compat.all_strips(copy.sequence_editor):
            strip.mute = strip.name not in self._keep
        shown = compat.all_strips(copy.sequence_editor)[self.strip_name]
        strip_look.apply(shown, strip_look.NEUTRAL)  # its picture, unplaced, filling the frame
        compat.unmute_channel(copy.sequence_editor, shown)  # a muted source channel still renders here
        render = copy.render
        render.resolution_x, render.resolution_y = self.width, self.height
        render.resolution_percentage = 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        render.use_sequencer = True
        render.use_compositing = False
        render.use_stamp = False
        render.use_border = False
        render.use_multiview = False
        set_png_output(copy)
        if self._zpass is not None:
            try:
                self._zpass.open(copy, os.path.join(self._folder, "z"))
            except BaseException:
                self.close()
                raise

    def read(self, index: int) -> bytes:
        """Render frame ``index`` of the strip (0 = its first visible frame)."""
        if not 0 <= index < self.count:
            raise IndexError(f"frame {index} is outside 0..{self.count - 1}")
        self.open()
        copy = self._copy
        path = os.path.join(self._folder, f"{index:06d}.png")
        what = f"frame {self.first_frame + index} of strip '{self.strip_name}'"
        if self._zpass is not None:
            self._depth = None
            self._zpass.before_render()
        copy.frame_set(self.first_frame + index)
        compat.render_still(copy, path)
        rgb = load_rgb(path, (self.width, self.height), what)
        if self._zpass is not None:
            self._depth = (index, self._zpass.after_render((self.width, self.height), what))
        return rgb

    def read_depth(self, index: int):
        """Float32 Z-pass distances of frame ``index`` (top row first), or None without a Z pass.

        Comes from the render that :meth:`read` of that frame made (rendered here if it was not).
        """
        if self._zpass is None:
            return None
        if self._depth is None or self._depth[0] != index:
            self.read(index)
        return self._depth[1]

    def close(self) -> None:
        """Remove the temporary scenes and their files (safe to call twice)."""
        self._depth = None
        copy, self._copy = self._copy, None
        if copy is not None:
            try:
                bpy.data.scenes.remove(copy)
            except ReferenceError:
                pass
        if self._zpass is not None:  # after the Sequencer copy, whose strip shows it
            self._zpass.close()
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            result = bpy.data.images.get(RENDER_RESULT)
            if result is not None and not self._had_render_result:
                bpy.data.images.remove(result)  # the first render made it; leave the file as it was


def set_png_output(scene) -> None:
    """8-bit RGB PNG renders through the *Standard* view transform (the Sequencer's sRGB pixels)."""
    settings = scene.render.image_settings
    compat.set_image_format(settings, "PNG", "8", "RGB")
    settings.compression = 0
    view = scene.view_settings
    view.view_transform = "Standard"
    view.look = "None"
    view.exposure = 0.0
    view.gamma = 1.0
    view.use_curve_mapping = False


def load_pixels(path: str, size: tuple[int, int], what: str, data: bool = False):
    """Float pixels of an image file, (height, width, channels), top row first; the file is left."""
    import numpy as np

    if not os.path.isfile(path):
        raise P2VAddonError(f"Blender rendered no image for {what}")
    image = bpy.data.images.load(path, check_existing=False)
    try:
        if data:
            image.colorspace_settings.is_data = True  # values as stored: distances, not colours
        width, height = image.size
        channels = image.channels
        if (width, height) != tuple(size):
            raise P2VAddonError(
                f"{what[:1].upper()}{what[1:]} rendered at {width}x{height}, expected {size[0]}x{size[1]}"
            )
        pixels = np.empty(width * height * channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    return pixels.reshape(height, width, channels)[::-1]


def load_rgb(path: str, size: tuple[int, int], what: str) -> bytes:
    """The 8-bit RGB bytes of a rendered PNG (top row first); the file is removed."""
    import numpy as np

    try:
        rgb = load_pixels(path, size, what)[:, :, :3]
    finally:
        if os.path.isfile(path):
            os.unlink(path)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).tobytes()


class ZPassScene:
    """The copy of a scene strip's scene that the Sequencer copy renders instead, with its Z pass.

    The copy (``Scene.copy``: the same objects, settings of its own) renders at the Sequencer's
    size through its own compositor: the view layer's Image is the render result the Sequencer
    shows, and its Depth goes to a File Output node that writes a 32-bit float EXR each render.

    ``quality``: ``"scene"`` renders as the scene is set; ``"preview"`` keeps the scene's engine
    but caps its samples (:data:`PREVIEW_SAMPLES`, Cycles without denoising). Every engine Blender
    ships (Cycles, Eevee, Workbench) has a Z pass.
    """

    def __init__(self, sequencer_scene, strip, quality: str = "preview"):
        self.sequencer_scene = sequencer_scene
        self.strip_name = strip.name
        self.scene_name = strip.scene.name
        self.shown = strip.scene
        self.camera = strip.scene_camera or strip.scene.camera
        self.quality = quality
        self.copy = None
        self.group = None
        self.folder = None

    def open(self, sequencer_copy, folder: str) -> None:
        """Make the scene copy and let ``sequencer_copy``'s strip show it."""
        if self.copy is not None:
            return
        self.folder = folder
        copy = self.shown.copy()
        self.copy = copy
        copy.name = f"P2V Z pass of {self.strip_name}"
        render = copy.render  # its own resolution: the picture the strip shows, unplaced
        render.use_border = False
        render.use_multiview = False
        render.use_stamp = False
        render.use_sequencer = False  # its camera, not its own strips (as the strip's Input says)
        render.use_compositing = True
        layer = zpass_view_layer(copy)
        for other in copy.view_layers:
            other.use = other == layer
        layer.use_pass_combined = True
        layer.use_pass_z = True
        if self.quality == "preview":
            preview_samples(copy)
        tree, self.group = compat.new_compositor_tree(copy, f"P2V Z pass of {self.strip_name}")
        layers = tree.nodes.new("CompositorNodeRLayers")
        layers.scene = copy
        layers.layer = layer.name
        tree.links.new(layers.outputs["Image"], compat.composite_input(tree))
        depth = compat.depth_output(layers)
        if depth is None:
            raise P2VAddonError(
                f"The render engine of scene '{self.scene_name}' ({render.engine}) has no Z pass: "
                f"use Cycles, Eevee or Workbench, or Depth 'Estimate'"
            )
        tree.links.new(depth, compat.float_file_output(tree, folder, "Depth"))
        shown_by = compat.all_strips(sequencer_copy.sequence_editor)[self.strip_name]
        shown_by.scene = copy  # unplaced already (StripFrames.open): the picture fills the frame
        for name in ("use_cache_raw", "use_cache_preprocessed", "use_cache_composite", "use_cache_final"):
            if hasattr(sequencer_copy.sequence_editor, name):  # every frame rendered, so every Z written
                setattr(sequencer_copy.sequence_editor, name, False)

    def before_render(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def after_render(self, size: tuple[int, int], what: str) -> bytes:
        """The float32 Z bytes (top row first) of the render just made; raise if unusable."""
        import numpy as np

        written = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        if len(written) != 1:
            raise P2VAddonError(
                f"Blender wrote no Z pass for {what} (scene '{self.scene_name}', render engine "
                f"{self.copy.render.engine})"
            )
        z = load_pixels(os.path.join(self.folder, written[0]), size, f"the Z pass of {what}", data=True)[:, :, 0]
        clip_end = getattr(getattr(self.camera, "data", None), "clip_end", 0.0) or 0.0
        z, problem = zpass_problem(np.ascontiguousarray(z, dtype=np.float32), clip_end)
        if problem is not None:
            raise P2VAddonError(f"Depth 'Z pass' cannot use {what} (scene '{self.scene_name}'): {problem}")
        return z.astype("<f4").tobytes()

    def close(self) -> None:
        """Remove the scene copy and its node group (safe to call twice); the caller removes the folder."""
        copy, self.copy = self.copy, None
        if copy is not None:
            try:
                bpy.data.scenes.remove(copy)
            except ReferenceError:
                pass
        group, self.group = self.group, None
        if group is not None:
            try:
                bpy.data.node_groups.remove(group)
            except ReferenceError:
                pass


def preview_samples(scene) -> None:
    """Quick preview: the scene's engine with few samples (Workbench and other engines as set)."""
    engine = scene.render.engine
    if engine == "CYCLES":
        cycles = scene.cycles
        cycles.samples = min(cycles.samples, PREVIEW_SAMPLES["CYCLES"])
        cycles.use_denoising = False
    elif engine in compat.EEVEE_ENGINES:
        eevee = scene.eevee
        eevee.taa_render_samples = min(eevee.taa_render_samples, PREVIEW_SAMPLES["EEVEE"])
