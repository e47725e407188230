"""Render the demo clip: a toy car on a ground plane, orbited by the camera, with a true Z pass.

    .venv/bin/python scripts/render_demo_clip.py OUT_DIR [--frames 12] [--size 256] [--samples 8]
    blender -b --python scripts/render_demo_clip.py -- OUT_DIR [...]

Writes ``OUT_DIR/frames/000000.png ...`` (RGB, view transform Standard, so display-ready) and
``OUT_DIR/depth/000000.exr ...`` (multilayer EXR with the render's Combined and Depth passes:
32-bit float distance from the camera, Blender's Z pass, 1e10 where a pixel sees only the world),
then ``OUT_DIR/clip.json`` last, naming the parameters. With ``--reuse`` nothing is rendered when
clip.json matches the parameters and this script, so callers can run it every time.

The scene is built from scratch in an empty file with bmesh (no operators that need a window),
rendered with Cycles on the CPU, and every frame is saved from the Render Result twice: once as
PNG and once as multilayer EXR. Works with bpy 4.2 and 5.x (5.0 added ``media_type``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FPS = 12
STAMP = "clip.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="render_demo_clip.py", description="render the demo clip (frames + true Z pass) with bpy"
    )
    parser.add_argument("out_dir", help="folder for frames/, depth/ and clip.json")
    parser.add_argument("--frames", type=int, default=12, help="number of frames (default 12)")
    parser.add_argument("--size", type=int, default=256, help="width and height in pixels (default 256)")
    parser.add_argument("--samples", type=int, default=8, help="Cycles samples per pixel (default 8)")
    parser.add_argument(
        "--denoise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="denoise with OpenImageDenoise (default: when this Blender has it; "
        "about 0.5 s a frame at 256x256 on 2 cores)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="do nothing when OUT_DIR already holds this clip with the same parameters"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= 10000:
        parser.error(f"--frames must be 1..10000, got {args.frames}")
    if not 16 <= args.size <= 4096:
        parser.error(f"--size must be 16..4096, got {args.size}")
    if not 1 <= args.samples <= 4096:
        parser.error(f"--samples must be 1..4096, got {args.samples}")
    return args


def script_argv() -> list[str]:
    """Arguments after ``--`` under ``blender --python``; else the usual ones."""
    argv = sys.argv
    if "--" in argv:
        return argv[argv.index("--") + 1 :]
    return argv[1:]


def wanted_stamp(args: argparse.Namespace) -> dict:
    source = Path(__file__).read_bytes()
    return {
        "frames": args.frames,
        "size": args.size,
        "samples": args.samples,
        "denoise": "auto" if args.denoise is None else bool(args.denoise),
        "fps": FPS,
        "script": hashlib.sha256(source).hexdigest()[:16],
    }


def already_rendered(out_dir: Path, stamp: dict) -> bool:
    try:
        have = json.loads((out_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if {k: have.get(k) for k in stamp} != stamp:
        return False
    count = stamp["frames"]
    return len(_numbered(out_dir / "frames", ".png")) == count and len(_numbered(out_dir / "depth", ".exr")) == count


def _numbered(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\d{6}" + re.escape(suffix) + "$")
    return sorted(p for p in folder.iterdir() if pattern.match(p.name))


# --------------------------------------------------------------------------------------------
# scene


def build_scene(size: int, samples: int, denoise: bool):
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x = size
    render.resolution_y = size
    render.resolution_percentage = 100
    render.film_transparent = False
    render.use_compositing = False
    render.use_sequencer = False
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = samples
    if hasattr(cycles, "use_adaptive_sampling"):
        cycles.use_adaptive_sampling = False
    cycles.use_denoising = bool(denoise)
    if cycles.use_denoising and hasattr(cycles, "denoiser"):
        cycles.denoiser = "OPENIMAGEDENOISE"
    cycles.max_bounces = 4
    cycles.diffuse_bounces = 2
    cycles.glossy_bounces = 2
    cycles.transmission_bounces = 2
    cycles.transparent_max_bounces = 2
    cycles.caustics_reflective = False
    cycles.caustics_refractive = False
    cycles.seed = 0
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.view_layers[0].use_pass_z = True
    scene.view_layers[0].use_pass_combined = True

    world = bpy.data.worlds.new("Sky")
    scene.world = world
    _background(world, (0.45, 0.65, 0.95), 1.0)

    ground = _material("Ground", (0.32, 0.36, 0.30), roughness=0.9)
    body = _material("Body", (0.70, 0.08, 0.05), roughness=0.35)
    cabin = _material("Cabin", (0.10, 0.16, 0.25), roughness=0.15)
    tyre = _material("Tyre", (0.03, 0.03, 0.03), roughness=0.8)
    lamp = _material("Lamp", (0.95, 0.90, 0.60), roughness=0.3)
    trunk = _material("Trunk", (0.30, 0.18, 0.08), roughness=0.9)
    leaves = _material("Leaves", (0.10, 0.35, 0.08), roughness=0.8)
    cone = _material("Cone", (0.95, 0.45, 0.05), roughness=0.6)

    _add(scene, "Ground", _plane(30.0), ground)
    # The car: body, cabin, headlights and four wheels, about 4 x 2 x 1.4 units, facing +X.
    _add(scene, "Body", _box(4.0, 1.8, 0.6), body, location=(0.0, 0.0, 0.65))
    _add(scene, "Cabin", _box(2.0, 1.6, 0.55), cabin, location=(-0.3, 0.0, 1.22))
    for side in (-1, 1):
        _add(scene, f"Lamp{side}", _box(0.06, 0.35, 0.15), lamp, location=(2.0, side * 0.6, 0.75))
    for x in (-1.3, 1.3):
        for y in (-0.95, 0.95):
            wheel = _add(scene, f"Wheel{x:+}{y:+}", _cylinder(0.38, 0.3, 24), tyre, location=(x, y, 0.38), smooth=True)
            wheel.rotation_euler = (math.pi / 2, 0.0, 0.0)
    # A tree and two traffic cones give the background some depth.
    _add(scene, "TreeTrunk", _cylinder(0.18, 1.6, 12), trunk, location=(-3.5, 3.0, 0.8), smooth=True)
    _add(scene, "TreeTop", _sphere(1.0), leaves, location=(-3.5, 3.0, 2.2), smooth=True)
    for i, (x, y) in enumerate(((3.2, -1.8), (3.8, 1.6))):
        _add(scene, f"Cone{i}", _cylinder(0.25, 0.7, 16, top=0.02), cone, location=(x, y, 0.35), smooth=True)

    sun_data = bpy.data.lights.new("Sun", type="SUN")
    sun_data.energy = 3.5
    sun_data.angle = math.radians(3.0)
    sun = bpy.data.objects.new("Sun", sun_data)
    sun.rotation_euler = (math.radians(40.0), math.radians(10.0), math.radians(-35.0))
    scene.collection.objects.link(sun)

    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 35.0
    cam_data.clip_start = 0.1
    cam_data.clip_end = 200.0
    camera = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene, camera


def place_camera(camera, t: float) -> None:
    """``t`` from 0 to 1: orbit 60 degrees round the car (azimuth -55 to +5), dollying in from 8 to 7 units."""
    from mathutils import Vector

    azimuth = math.radians(-55.0 + 60.0 * t)
    radius = 8.0 - 1.0 * t
    location = Vector((radius * math.cos(azimuth), radius * math.sin(azimuth), 2.6))
    target = Vector((0.0, 0.0, 0.7))
    camera.location = location
    camera.rotation_euler = (target - location).to_track_quat("-Z", "Y").to_euler()


def _blender_version() -> str:
    import bpy

    return bpy.app.version_string


def _has_oidn() -> bool:
    try:
        import _cycles

        return bool(getattr(_cycles, "with_openimagedenoise", False))
    except ImportError:
        return False


def _background(world, colour, strength) -> None:
    if world.node_tree is None:
        with _quiet_deprecation():
            world.use_nodes = True
    tree = world.node_tree
    node = next((n for n in tree.nodes if n.type == "BACKGROUND"), None)
    if node is None:
        node = tree.nodes.new("ShaderNodeBackground")
        output = next((n for n in tree.nodes if n.type == "OUTPUT_WORLD"), None) or tree.nodes.new(
            "ShaderNodeOutputWorld"
        )
        tree.links.new(node.outputs["Background"], output.inputs["Surface"])
    node.inputs["Color"].default_value = (*colour, 1.0)
    node.inputs["Strength"].default_value = strength
    world.color = colour


def _material(name: str, colour, roughness: float):
    import bpy

    material = bpy.data.materials.new(name)
    material.diffuse_color = (*colour, 1.0)
    if material.node_tree is None:
        with _quiet_deprecation():
            material.use_nodes = True
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Base Color"].default_value = (*colour, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return material


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _mesh_from(name: str, build) -> object:
    import bmesh
    import bpy

    bm = bmesh.new()
    try:
        build(bm)
        mesh = bpy.data.meshes.new(name)
        bm.to_mesh(mesh)
    finally:
        bm.free()
    return mesh


def _plane(size: float):
    import bmesh

    return lambda name: _mesh_from(
        name, lambda bm: bmesh.ops.create_grid(bm, x_segments=1, y_segments=1, size=size / 2)
    )


def _box(x: float, y: float, z: float):
    import bmesh

    def build(bm):
        bmesh.ops.create_cube(bm, size=1.0)
        bmesh.ops.scale(bm, vec=(x, y, z), verts=bm.verts)

    return lambda name: _mesh_from(name, build)


def _cylinder(radius: float, depth: float, segments: int, top: float | None = None):
    import bmesh

    return lambda name: _mesh_from(
        name,
        lambda bm: bmesh.ops.create_cone(
            bm,
            cap_ends=True,
            cap_tris=False,
            segments=segments,
            radius1=radius,
            radius2=radius if top is None else top,
            depth=depth,
        ),
    )


def _sphere(radius: float):
    import bmesh

    return lambda name: _mesh_from(
        name, lambda bm: bmesh.ops.create_uvsphere(bm, u_segments=24, v_segments=12, radius=radius)
    )


def _add(scene, name: str, make_mesh, material, location=(0.0, 0.0, 0.0), smooth: bool = False):
    import bpy

    mesh = make_mesh(name)
    mesh.materials.append(material)
    if smooth:
        for polygon in mesh.polygons:
            polygon.use_smooth = True
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    scene.collection.objects.link(obj)
    return obj


# --------------------------------------------------------------------------------------------
# rendering and saving


class _Progress:
    """Our lines go to the real stdout; Blender's own chatter there (Cycles prints a status line
    per tile and sample, and device probes like "CUEW initialization failed") goes to /dev/null.

    Blender writes to file descriptor 1 from C, so sys.stdout cannot filter it: descriptor 1 is
    pointed at /dev/null while bpy works, and a duplicate of the original carries our lines.
    Errors still reach stderr.
    """

    def __init__(self):
        self._out = None

    def __enter__(self) -> _Progress:
        sys.stdout.flush()
        self._saved = os.dup(1)
        self._out = os.fdopen(os.dup(self._saved), "w", buffering=1)
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        return self

    def say(self, line: str) -> None:
        (self._out or sys.stdout).write(line + "\n")
        (self._out or sys.stdout).flush()

    def __exit__(self, *exc_info) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        self._out.close()
        self._out = None


def _set_format(settings, multilayer_exr: bool) -> None:
    if hasattr(settings, "media_type"):  # Blender 5.0+: the media type decides which formats exist
        settings.media_type = "MULTI_LAYER_IMAGE" if multilayer_exr else "IMAGE"
    if multilayer_exr:
        settings.file_format = "OPEN_EXR_MULTILAYER"
        settings.color_depth = "32"  # half floats top out at 65504: the background's 1e10 would be inf
        settings.exr_codec = "ZIP"
    else:
        settings.file_format = "PNG"
        settings.color_mode = "RGB"
        settings.color_depth = "8"
        settings.compression = 15


def render_clip(out_dir: Path, frames: int, size: int, samples: int, denoise: bool, say=print) -> None:
    import bpy

    scene, camera = build_scene(size, samples, denoise)
    frames_dir, depth_dir = out_dir / "frames", out_dir / "depth"
    for folder, suffix in ((frames_dir, ".png"), (depth_dir, ".exr")):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in _numbered(folder, suffix):  # a longer earlier clip must not leave extra frames
            stale.unlink()
    settings = scene.render.image_settings
    for index in range(frames):
        started = time.perf_counter()
        place_camera(camera, index / max(1, frames - 1))
        scene.frame_set(index + 1)
        result = bpy.ops.render.render()
        if "FINISHED" not in result:
            raise RuntimeError(f"rendering frame {index} failed: {result}")
        image = bpy.data.images["Render Result"]
        png, exr = frames_dir / f"{index:06d}.png", depth_dir / f"{index:06d}.exr"
        for path, layered in ((png, False), (exr, True)):
            _set_format(settings, layered)
            temp = path.with_name(f".{path.stem}.tmp{path.suffix}")
            image.save_render(str(temp), scene=scene)
            if not temp.is_file():
                raise RuntimeError(f"Blender did not write {temp}")
            os.replace(temp, path)
        say(f"render_demo_clip: frame {index + 1}/{frames} in {time.perf_counter() - started:.1f} s")


def check_clip(out_dir: Path, frames: int, size: int) -> str:
    """Read the clip back the way ``p2v edit`` will; a one-line summary of the depth."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import numpy as np
        import OpenEXR  # noqa: F401 - blender's own Python may lack it

        from p2v_runtime.frames import open_depth, open_frames
    except ImportError as exc:
        return f"depth not checked ({exc.name} is not importable here)"
    clip = open_frames(out_dir / "frames")
    if len(clip) != frames or clip.size != (size, size):
        raise RuntimeError(f"expected {frames} frames of {size}x{size}, read {len(clip)} of {clip.size}")
    depth = open_depth(out_dir / "depth", frames, (size, size))
    near, far, background = [], [], []
    for index, z in enumerate(depth):
        sky = z >= 1e9
        objects = z[~sky]
        if not sky.any() or not objects.size:
            raise RuntimeError(f"depth {index}: expected both sky and objects, got background {sky.mean():.0%}")
        if not (np.isfinite(objects).all() and objects.min() > 0.1 and objects.max() < 200.0):
            raise RuntimeError(f"depth {index}: object depths out of range {objects.min()}..{objects.max()}")
        near.append(float(objects.min()))
        far.append(float(objects.max()))
        background.append(float(sky.mean()))
    return (
        f"Z {min(near):.2f}..{max(far):.2f} on objects, "
        f"background (Z=1e10) {min(background):.0%}..{max(background):.0%} of pixels"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(script_argv() if argv is None else argv)
    out_dir = Path(args.out_dir).expanduser().resolve()
    stamp = wanted_stamp(args)
    if args.reuse and already_rendered(out_dir, stamp):
        print(f"render_demo_clip: reusing {out_dir} ({args.frames} frames, {args.size}x{args.size})", flush=True)
        return 0
    with _Progress() as progress:
        return _render(args, out_dir, stamp, progress.say)


def _render(args: argparse.Namespace, out_dir: Path, stamp: dict, say) -> int:
    try:
        import bpy  # noqa: F401
    except ImportError:
        print(
            "render_demo_clip: error: bpy is not importable; install the project's blender extra "
            "or run under blender -b --python",
            file=sys.stderr,
        )
        return 1
    denoise = _has_oidn() if args.denoise is None else args.denoise  # _cycles is there once bpy is
    if denoise and not _has_oidn():
        print(
            "render_demo_clip: warning: this Blender has no OpenImageDenoise; rendering without denoising",
            file=sys.stderr,
        )
        denoise = False
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)  # written again only once every frame is in place
    started = time.perf_counter()
    render_clip(out_dir, args.frames, args.size, args.samples, denoise, say=say)
    summary = check_clip(out_dir, args.frames, args.size)
    record = {**stamp, "denoised": denoise, "blender": _blender_version()}
    (out_dir / STAMP).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    say(
        f"render_demo_clip: {args.frames} frames {args.size}x{args.size}"
        f"{' (denoised)' if denoise else ''} in {time.perf_counter() - started:.1f} s "
        f"to {out_dir}; {summary}"
    )
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as exc:  # noqa: BLE001 - one clear line, not a Blender traceback
        print(f"render_demo_clip: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
