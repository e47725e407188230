"""Every difference between the Blender versions the add-on supports (4.2 LTS .. 5.x), in one place.

The rest of the add-on calls these functions instead of touching the renamed parts of the API:

* 4.2 .. 4.3: ``SequenceEditor.sequences`` / ``sequences_all``, strip classes ``*Sequence``;
  4.4+ and 5.x: ``strips`` / ``strips_all``, classes ``*Strip``.
* ``new_effect`` takes ``frame_end`` before 5.0 and ``length`` from 5.0 on.
* 5.0+: the Sequencer shows the workspace's *sequencer scene* (``context.sequencer_scene``),
  which need not be the window's scene.
* 5.0+: the compositor's node tree is ``scene.compositing_node_group``, a node group of its own
  (``bpy.data.node_groups.new(name, 'CompositorNodeTree')``); before, ``scene.use_nodes`` makes the
  scene's embedded ``scene.node_tree``. 5.0 has no Composite node: the tree's Group Output is the
  render result. The File Output node names its inputs ``file_output_items`` with ``directory`` and
  ``file_name`` from 5.0 on; ``file_slots`` and ``base_path`` before. (Used by the Z pass of scene
  strips, see ``strip_frames``.)
* 5.0+: ``ImageFormatSettings.media_type`` (image, multilayer EXR, video) must be set before a
  ``file_format`` of that kind can be chosen.
* 4.2's Eevee is ``BLENDER_EEVEE_NEXT``; 5.x's is ``BLENDER_EEVEE`` again.
* 4.2+ extensions keep user data in ``bpy.utils.extension_path_user``; a legacy add-on (or the
  add-on run from a checkout) uses a folder under Blender's user data files.
"""

from __future__ import annotations

import contextlib
import os
import sys

import bpy

VERSION = tuple(bpy.app.version)

# strip.type values, grouped by what the add-on does with them.
EDITABLE_TYPES = {"IMAGE": "image", "MOVIE": "movie", "SCENE": "scene"}
KIND_NAMES = {
    "SOUND": "sound",
    "META": "meta",
    "TEXT": "text",
    "COLOR": "color",
    "ADJUSTMENT": "adjustment",
    "MOVIECLIP": "movie clip",
    "MASK": "mask",
    "MULTICAM": "multicam",
}
MAX_CHANNEL = 128


def strips(editor):
    """Top-level strips of a sequence editor (the collection new strips are added to)."""
    collection = getattr(editor, "strips", None)
    return collection if collection is not None else editor.sequences


def all_strips(editor):
    """Every strip, including those inside meta strips."""
    collection = getattr(editor, "strips_all", None)
    return collection if collection is not None else editor.sequences_all


def sequencer_scene(context):
    """The scene the Sequencer edits: 5.x's workspace sequencer scene, else the window's scene."""
    return getattr(context, "sequencer_scene", None) or context.scene


def active_strip(scene):
    editor = scene.sequence_editor
    return None if editor is None else editor.active_strip


def strip_kind(strip) -> str:
    """'image', 'movie', 'scene', or a plain name for what the add-on cannot edit ('sound', 'effect', ...)."""
    kind = EDITABLE_TYPES.get(strip.type)
    if kind is not None:
        return kind
    return KIND_NAMES.get(strip.type, "effect")


def a_kind(kind: str) -> str:
    """'an image', 'a movie', 'an effect': for messages."""
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def new_image_strip(editor, name: str, filepath: str, channel: int, frame_start: int):
    """Add an image strip showing ``filepath`` as its first frame, unscaled."""
    return strips(editor).new_image(
        name=name, filepath=filepath, channel=channel, frame_start=frame_start, fit_method="ORIGINAL"
    )


def new_effect_strip(editor, name: str, effect_type: str, channel: int, frame_start: int, length: int):
    """Add an effect strip without inputs (color, text, adjustment) covering ``length`` frames.

    4.2 .. 4.x take ``frame_end``; 5.x takes ``length``.
    """
    collection = strips(editor)
    try:
        return collection.new_effect(
            name=name, type=effect_type, channel=channel, frame_start=frame_start, length=length
        )
    except TypeError:
        return collection.new_effect(
            name=name, type=effect_type, channel=channel, frame_start=frame_start, frame_end=frame_start + length
        )


def unmute_channel(editor, strip) -> None:
    """Unmute the channel ``strip`` is on (4.2+: channels have their own mute), in a temporary copy."""
    channels = getattr(editor, "channels", None)
    if channels is not None and 0 <= strip.channel < len(channels):
        channels[strip.channel].mute = False


def parent_meta(strip):
    """The meta strip that holds ``strip``, or None at the top level."""
    getter = getattr(strip, "parent_meta", None)
    return getter() if callable(getter) else None


def compositor_tree(scene):
    """The scene's compositing node tree, or None (5.x node group / 4.x ``node_tree``)."""
    if hasattr(scene, "compositing_node_group"):
        return scene.compositing_node_group
    return getattr(scene, "node_tree", None)


def new_compositor_tree(scene, name: str):
    """Give ``scene`` (a temporary copy: never a user's scene) a fresh, empty compositing tree.

    Returns ``(tree, group)``: on 5.x ``group`` is the new node group, which the caller removes
    with the scene (the copy shared the user's group; that one is left alone); on 4.x the tree is
    the copy's own embedded one and ``group`` is None.
    """
    if hasattr(scene, "compositing_node_group"):
        group = bpy.data.node_groups.new(name, "CompositorNodeTree")
        scene.compositing_node_group = group
        return group, group
    scene.use_nodes = True
    tree = scene.node_tree
    for node in list(tree.nodes):
        tree.nodes.remove(node)
    return tree, None


def composite_input(tree):
    """The socket whose image becomes the render result: a Composite node (4.x), the group's output (5.x)."""
    if hasattr(bpy.types, "CompositorNodeComposite"):
        return tree.nodes.new("CompositorNodeComposite").inputs["Image"]
    tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    return tree.nodes.new("NodeGroupOutput").inputs[0]


def depth_output(render_layers):
    """The Z-pass output of a Render Layers node (``Depth``; ``Z`` in old files), or None."""
    for name in ("Depth", "Z"):
        socket = render_layers.outputs.get(name)
        if socket is not None:
            return socket
    return None


def float_file_output(tree, folder: str, name: str):
    """A File Output node that writes its one input, per render, as a 32-bit float EXR into ``folder``.

    32-bit, not half: a Z pass holds 1e10 for the background, which half floats turn into inf.
    The file is ``folder/<name>_<frame>.exr`` (4.x) or ``folder/<name>_<name>.exr`` (5.x); the
    caller gives each render an empty folder and takes the one EXR it finds. Returns the input.
    """
    node = tree.nodes.new("CompositorNodeOutputFile")
    set_image_format(node.format, "OPEN_EXR", "32", "RGB")
    node.format.exr_codec = "ZIP"  # lossless
    if hasattr(node, "file_output_items"):  # 5.x
        node.directory = folder + os.sep
        node.file_name = name + "_"
        node.file_output_items.clear()
        node.file_output_items.new("FLOAT", name)
        if hasattr(node, "save_as_render"):
            node.save_as_render = False  # data, not a picture: no view transform
        return node.inputs[name]
    node.base_path = folder + os.sep
    node.file_slots.clear()
    node.file_slots.new(name + "_")
    return node.inputs[0]


def set_image_format(settings, file_format: str, color_depth: str, color_mode: str) -> None:
    """Set an ``ImageFormatSettings`` (5.x: its ``media_type`` first, else the format is refused)."""
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE" if file_format == "OPEN_EXR_MULTILAYER" else "IMAGE"
    settings.file_format = file_format
    settings.color_mode = color_mode
    settings.color_depth = color_depth


EEVEE_ENGINES = ("BLENDER_EEVEE", "BLENDER_EEVEE_NEXT")  # 5.x / 4.2 .. 4.x


def render_size(scene) -> tuple[int, int]:
    """Width and height of a render of ``scene`` (resolution times percentage, as Blender rounds)."""
    render = scene.render
    return (
        render.resolution_x * render.resolution_percentage // 100,
        render.resolution_y * render.resolution_percentage // 100,
    )


def render_still(scene, filepath: str) -> None:
    """Render ``scene``'s current frame into an image file (its render output settings).

    Blender renders the *context* scene's frame, so ``scene`` becomes the window's scene for the
    call and is switched back at once. Not ``context.temp_override(scene=...)``: calling an
    operator inside a context override while another Python thread runs (the job's socket
    worker) crashes Blender 4.2 .. 5.0 (a GIL mix-up); switching the window's scene does not.
    The render result is saved here rather than with ``write_still``, which would print a line
    per frame; in background mode Blender's own lines of the render (a Z pass's File Output prints
    "Saved: ..." for every frame) are kept off stdout, where a script's progress lines go.
    """
    window = bpy.context.window
    with quiet_stdout(bpy.app.background):
        if window is not None:
            previous = window.scene
            window.scene = scene
            try:
                result = bpy.ops.render.render(write_still=False)
            finally:
                window.scene = previous
        else:  # no window at all: the override is the only way (nothing else should run then)
            with bpy.context.temp_override(scene=scene):
                result = bpy.ops.render.render(write_still=False)
    if "FINISHED" not in result:
        raise RuntimeError(f"Blender could not render frame {scene.frame_current} of scene {scene.name!r}")
    bpy.data.images["Render Result"].save_render(filepath, scene=scene)


@contextlib.contextmanager
def quiet_stdout(active: bool = True):
    """Send what Blender's C code prints to stdout nowhere for the block (file descriptor 1)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    _flush_c_stdout()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_c_stdout()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdout() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None) if os.name != "nt" else ctypes.cdll.msvcrt
        libc.fflush(None)
    except (OSError, AttributeError):
        pass


def user_folder(package: str, *parts: str) -> str:
    """A writable folder for the add-on's own files (runtime venv, logs, unsaved-file output)."""
    base = None
    if package.startswith("bl_ext."):
        try:
            base = bpy.utils.extension_path_user(package, create=True)
        except (ValueError, RuntimeError):
            base = None
    if base is None:
        base = bpy.utils.user_resource("DATAFILES", path="pix2video", create=True)
    path = os.path.join(base, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def abspath(path: str, id_data=None) -> str:
    """An absolute, normalised file path for a Blender path (``//`` relative to the .blend)."""
    library = getattr(id_data, "library", None)
    return os.path.normpath(bpy.path.abspath(path, library=library))


def redraw_sequencer(context=None) -> None:
    """Ask every Sequencer and Preferences area to redraw (progress changed)."""
    wm = (context or bpy.context).window_manager
    if wm is None:
        return
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in ("SEQUENCE_EDITOR", "PREFERENCES"):
                area.tag_redraw()


def layout_progress(layout, factor: float, text: str) -> None:
    """A progress bar (``UILayout.progress``, Blender 4.0+), or a plain label where it is missing."""
    progress = getattr(layout, "progress", None)
    if progress is not None:
        progress(factor=max(0.0, min(1.0, factor)), type="BAR", text=text)
    else:
        layout.label(text=text)
