"""Seconds per frame: the add-on's Z-pass render of a scene strip against the edit itself.

    .venv/bin/python scripts/bench_zpass.py [--size 256] [--frames 6] [--samples 64] [--steps 20]
                                            [--bpy-python .venv-bpy42/bin/python] [--json OUT]

Blender side (a subprocess with a ``bpy`` module, the add-on's own ``StripFrames``): a scene strip
of a small scene (ground plane, boxes, a sun, an orthographic camera, Cycles on the CPU) in a
Sequencer of ``--size`` x ``--size``, read frame by frame as the add-on reads it for a job:

* Z pass, quick preview (the scene's engine, at most 8 samples, no denoising);
* Z pass, as the scene is set (``--samples``);
* Z pass, quick preview with Workbench and with Eevee, when this Blender can render them;
* RGB only through the Sequencer (Depth 'Estimate'), as the scene is set, for comparison.

Runtime side (this process, torch): the edit of the preview frames with the tiny random-weight
models at the same size, with the Z pass as depth and with estimated depth (models loaded and
warmed up first, so load time is not counted). Prints one table; the first frame of each render
row is left out of its median (engine start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- Blender side ------------------------------------------------------------------------------


def render_side(out: Path, size: int, frames: int, samples: int) -> None:
    import bpy
    import numpy as np

    sys.path.insert(0, str(REPO))
    from blender_addon import compat, strip_frames

    bpy.ops.wm.read_factory_settings(use_empty=True)
    edit = bpy.context.scene
    edit.name = "Edit"
    edit.render.resolution_x = edit.render.resolution_y = size
    edit.render.resolution_percentage = 100
    shot = bpy.data.scenes.new("Shot")
    shot.render.engine = "CYCLES"
    shot.cycles.device = "CPU"
    shot.cycles.samples = samples
    shot.cycles.use_denoising = False
    shot.render.resolution_x = shot.render.resolution_y = size
    shot.frame_start, shot.frame_end = 1, frames

    def box(name, half, location):
        hx, hy, hz = half
        verts = [(x, y, z) for x in (-hx, hx) for y in (-hy, hy) for z in (-hz, hz)]
        faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
        mesh = bpy.data.meshes.new(name)
        mesh.from_pydata(verts, [], faces)
        obj = bpy.data.objects.new(name, mesh)
        obj.location = location
        shot.collection.objects.link(obj)
        return obj

    box("ground", (20, 20, 0.01), (0, 0, 0))
    mover = box("mover", (1.5, 1.5, 1.0), (-2, 0, 1))
    box("tower", (0.8, 0.8, 2.5), (2, 1.5, 2.5))
    mover.keyframe_insert("location", frame=1)
    mover.location.x = 2
    mover.keyframe_insert("location", frame=frames)
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.rotation_euler = (0.6, 0.3, 0.0)
    shot.collection.objects.link(sun)
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.location = (0, -9, 7)
    camera.rotation_euler = (0.9, 0, 0)
    shot.collection.objects.link(camera)
    shot.camera = camera
    shot.world = bpy.data.worlds.new("sky")
    shot.world.color = (0.3, 0.4, 0.5)
    strip = compat.strips(edit.sequence_editor_create()).new_scene("shot", shot, 1, 1)

    rows = []

    def timed(label, depth, quality, keep=False):
        reader = strip_frames.StripFrames(edit, strip, depth, quality)
        seconds = []
        try:
            reader.open()
            for index in range(len(reader)):
                began = time.perf_counter()
                rgb = reader.read(index)
                z = reader.read_depth(index)
                seconds.append(time.perf_counter() - began)
                if keep:
                    np.save(out / f"rgb_{index}.npy", np.frombuffer(rgb, np.uint8).reshape(size, size, 3))
                    np.save(out / f"z_{index}.npy", np.frombuffer(z, "<f4").reshape(size, size))
        finally:
            reader.close()
        rows.append({"label": label, "seconds": seconds, "engine": shot.render.engine})

    timed("Z pass, quick preview (Cycles, 8 samples)", "zpass", "preview", keep=True)
    timed(f"Z pass, as the scene is set (Cycles, {samples} samples)", "zpass", "scene")
    timed("RGB only via the Sequencer (Estimate), as set", "estimate", "preview")
    for label, names in (("Workbench", ("BLENDER_WORKBENCH",)), ("Eevee", compat.EEVEE_ENGINES)):
        for name in names:
            try:
                shot.render.engine = name
                break
            except TypeError:
                continue
        else:
            continue
        try:
            timed(f"Z pass, quick preview ({label}{', 4 samples' if label == 'Eevee' else ''})", "zpass", "preview")
        except Exception as exc:  # noqa: BLE001 - no OpenGL here: Workbench and Eevee need it even in background
            rows.append({"label": f"Z pass, {label}", "error": str(exc).splitlines()[0]})
        shot.render.engine = "CYCLES"
    (out / "render.json").write_text(json.dumps({"blender": bpy.app.version_string, "rows": rows}))


# --- runtime side --------------------------------------------------------------------------------


class _Arrays:
    def __init__(self, arrays, description):
        self.arrays = arrays
        self.size = (arrays[0].shape[1], arrays[0].shape[0])
        self.description = description

    def __len__(self):
        return len(self.arrays)

    def read(self, index):
        return self.arrays[index]


def tiny_models() -> Path:
    import hashlib

    from p2v_runtime.tiny_models import write_tiny_models

    version = hashlib.sha256((REPO / "p2v_runtime" / "tiny_models.py").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("P2V_TEST_CACHE", REPO / ".cache")) / f"tiny-models-{version}"
    if not all((root / name / ".complete").exists() for name in ("sd2-depth", "blip", "clip")):
        write_tiny_models(root)
        for name in ("sd2-depth", "blip", "clip"):
            (root / name / ".complete").write_text("ok\n")
    return root / "sd2-depth"


def edit_seconds(rgb, z, size: int, steps: int, device: str, cache: Path) -> float:
    from p2v_runtime.editor import edit_clip
    from p2v_runtime.settings import EditSettings

    settings = EditSettings(
        prompt="a stone tower on a meadow",
        source_prompt="grey boxes on the ground",
        model=str(tiny_models()),
        device=device,
        steps=steps,
        size=size,
        cache_dir=str(cache),
    ).validate()
    depth = None if z is None else _Arrays(z, "Z pass")
    began = time.perf_counter()
    for _ in edit_clip(_Arrays(rgb, "frames"), settings, depth=depth):
        pass
    return (time.perf_counter() - began) / len(rgb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="Sequencer size, square (default 256)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64, help="the scene's Cycles samples (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the edit (default 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--bpy-python",
        default=str(REPO / ".venv" / "bin" / "python"),
        help="a Python with the bpy module (default: .venv's, bpy 5.0.1)",
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--render-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render_only:
        render_side(Path(args.render_only), args.size, args.frames, args.samples)
        return 0

    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="p2v-bench-zpass-"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [
            args.bpy_python,
            __file__,
            "--render-only",
            str(work),
            "--size",
            str(args.size),
            "--frames",
            str(args.frames),
            "--samples",
            str(args.samples),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        return 1
    render = json.loads((work / "render.json").read_text())
    rgb = [np.load(work / f"rgb_{i}.npy") for i in range(args.frames)]
    z = [np.load(work / f"z_{i}.npy") for i in range(args.frames)]
    edit_seconds(rgb[:1], z[:1], args.size, 2, args.device, work / "cache-warm")  # load and warm the models
    rows = []
    for row in render["rows"]:
        if "error" in row:
            rows.append((row["label"], None, row["error"]))
            continue
        seconds = row["seconds"]
        rows.append((row["label"], statistics.median(seconds[1:] or seconds), f"first frame {seconds[0]:.3f} s"))
    rows.append(
        (
            f"edit, tiny models, {args.steps} steps, Z-pass depth",
            edit_seconds(rgb, z, args.size, args.steps, args.device, work / "cache-z"),
            "inversion + edit",
        )
    )
    rows.append(
        (
            f"edit, tiny models, {args.steps} steps, estimated depth",
            edit_seconds(rgb, None, args.size, args.steps, args.device, work / "cache-e"),
            "inversion + edit",
        )
    )
    torch_threads = __import__("torch").get_num_threads()
    print(
        f"bench_zpass: {args.size}x{args.size}, {args.frames} frames, Blender {render['blender']}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch_threads}, device {args.device}"
    )
    width = max(len(label) for label, _, _ in rows)
    print(f"{'step':<{width}}  {'s/frame':>8}  note")
    for label, value, note in rows:
        shown = "-" if value is None else f"{value:8.3f}"
        print(f"{label:<{width}}  {shown:>8}  {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "size": args.size,
                    "frames": args.frames,
                    "blender": render["blender"],
                    "rows": [{"step": step, "seconds_per_frame": v, "note": n} for step, v, n in rows],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
