"""Runs inside a Python that has bpy (5.0.1 in .venv, 4.2 in .venv-bpy42); driven by test_addon.py.

    python tests/addon_scenarios.py --config CONFIG.json

Installs the built extension zip into an isolated user folder (``BLENDER_USER_RESOURCES``),
enables it, builds a .blend with image, movie and scene strips (trimmed, non-zero starts) and
then runs the scenarios named in the config through the add-on's own ``EditJob`` with the real
runtime subprocess and socket. Each scenario's findings go into one JSON file that the tests
read; an exception in a scenario is recorded, not fatal. No assertions here: the tests decide.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback

import bpy

faulthandler.enable()

CONFIG: dict = {}
ADDON = "bl_ext.user_default.pix2video"
M = {}  # the add-on's modules, by short name


def mod(name):
    if name not in M:
        M[name] = importlib.import_module(f"{ADDON}.{name}")
    return M[name]


# --- the test .blend ---------------------------------------------------------------------------


def build_blend(path: str, media: str) -> None:
    compat = mod("compat")
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    scene.name = "Edit"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 80, 48, 100
    scene.frame_start, scene.frame_end = 1, 250
    editor = scene.sequence_editor_create()
    strips = compat.strips(editor)

    img = strips.new_image("img", os.path.join(media, "imgs", "f000.png"), 2, 5)
    for i in range(1, 10):
        img.elements.append(f"f{i:03d}.png")
    img.frame_offset_start, img.frame_offset_end = 2, 3  # shows timeline 7..11, files f002..f006
    compat.new_effect_strip(editor, "block", "COLOR", 3, 8, 3)  # channel 3 is taken over 8..10

    mov = strips.new_movie("mov", os.path.join(media, "clip.mp4"), 4, 20)
    mov.frame_offset_start, mov.frame_offset_end = 1, 4  # shows timeline 21..27, movie frames 1..7

    shot = bpy.data.scenes.new("Shot")
    shot.render.engine = "CYCLES"
    shot.cycles.samples = 1
    shot.cycles.use_denoising = False
    shot.render.resolution_x, shot.render.resolution_y = 80, 48
    shot.frame_start, shot.frame_end = 1, 12
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    shot.collection.objects.link(camera)
    shot.camera = camera
    camera.location = (0.0, -6.0, 0.0)
    camera.rotation_euler = (1.5708, 0.0, 0.0)
    mesh = bpy.data.meshes.new("card")
    mesh.from_pydata([(-1, 0, -1), (1, 0, -1), (1, 0, 1), (-1, 0, 1)], [], [(0, 1, 2, 3)])
    card = bpy.data.objects.new("card", mesh)
    shot.collection.objects.link(card)
    card.location.x = -2.0
    card.keyframe_insert("location", frame=1)
    card.location.x = 2.0
    card.keyframe_insert("location", frame=12)
    shot.world = bpy.data.worlds.new("sky")
    shot.world.color = (0.2, 0.3, 0.4)
    sc = strips.new_scene("shot", shot, 6, 40)
    sc.frame_offset_start, sc.frame_offset_end = 3, 2  # shows timeline 43..49, shot frames 4..10

    try:
        strips.new_sound("snd", os.path.join(media, "tone.wav"), 8, 60)
    except RuntimeError:  # bpy 4.2 module is built without audio
        pass
    compat.new_effect_strip(editor, "txt", "TEXT", 9, 60, 10)
    if hasattr(strips, "new_meta"):
        strips.new_meta("meta", 10, 60)

    top = strips.new_image("top", os.path.join(media, "imgs", "f000.png"), 127, 200)
    compat.new_effect_strip(editor, "ceiling", "COLOR", 128, 199, 5)
    gone = strips.new_movie("gone", os.path.join(media, "gone.mp4"), 2, 100)
    holes = strips.new_image("holes", os.path.join(media, "holes", "h000.png"), 2, 120)
    for i in range(1, 6):
        holes.elements.append(f"h{i:03d}.png")
    nocam = bpy.data.scenes.new("NoCamera")
    strips.new_scene("nocam", nocam, 2, 140)
    del top, gone, holes
    for strip in compat.all_strips(editor):
        # Strips made by script start with strobe 0, which 4.2 turns into 1 the first time it looks
        # up a frame (as the UI's add operators and file loading already do): start from 1.
        if getattr(strip, "strobe", 1.0) < 1.0:
            strip.strobe = 1.0
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.file.make_paths_absolute()  # so the tests may copy the .blend elsewhere
    bpy.ops.wm.save_mainfile()
    # Media that went missing after the strips were made.
    os.unlink(os.path.join(media, "gone.mp4"))
    os.unlink(os.path.join(media, "holes", "h003.png"))


# --- observations ------------------------------------------------------------------------------

_SKIP = {"rna_type", "select", "select_left_handle", "select_right_handle"}


def rna_dump(obj, depth: int = 0):
    """Plain values of an RNA struct's properties (nested structs two levels deep)."""
    out = {}
    for prop in obj.bl_rna.properties:
        name = prop.identifier
        if name in _SKIP:
            continue
        try:
            value = getattr(obj, name)
        except Exception as exc:  # noqa: BLE001 - a scenario records what went wrong
            out[name] = f"<{type(exc).__name__}>"
            continue
        if prop.type == "POINTER":
            if value is None:
                out[name] = None
            elif isinstance(value, bpy.types.ID):
                out[name] = f"ID:{value.name}"
            elif depth < 2:
                out[name] = rna_dump(value, depth + 1)
        elif prop.type == "COLLECTION":
            if depth < 2:
                out[name] = [rna_dump(item, depth + 1) for item in value]
        elif getattr(prop, "is_array", False) or (prop.type in ("INT", "FLOAT", "BOOLEAN") and prop.array_length):
            out[name] = [v for v in value]
        elif prop.type == "ENUM" and prop.is_enum_flag:
            out[name] = sorted(value)
        else:
            out[name] = value
    return out


def strips_state(scene) -> dict:
    compat = mod("compat")
    editor = scene.sequence_editor
    return {strip.name: rna_dump(strip) for strip in compat.all_strips(editor)} if editor else {}


def files_hash(folder: str) -> str:
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(path.encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def listing(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def snapshot() -> dict:
    scene = bpy.data.scenes["Edit"]
    blend_dir = os.path.dirname(bpy.data.filepath)
    return {
        "strips": strips_state(scene),
        "scenes": sorted(s.name for s in bpy.data.scenes),
        "images": sorted(i.name for i in bpy.data.images),
        "media": files_hash(CONFIG["media"]),
        "outputs": listing(os.path.join(blend_dir, "p2v")),
    }


def changes(before: dict, after: dict, new_strip: str | None = None) -> list[str]:
    """What differs between two snapshots, apart from the new strip and its files."""
    found = []
    for key in ("scenes", "images", "media"):
        if before[key] != after[key]:
            found.append(f"{key}: {before[key]} -> {after[key]}")
    old, new = before["strips"], dict(after["strips"])
    if new_strip is not None:
        new.pop(new_strip, None)
    if set(old) != set(new):
        found.append(f"strips: {sorted(set(old) ^ set(new))}")
    for name in set(old) & set(new):
        if _same(old[name], new[name]) is False:
            diff = sorted(k for k in old[name] if not _same(old[name].get(k), new[name].get(k)))
            found.append(f"strip {name} changed: {diff}")
    return found


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN (Blender leaves some element fields uninitialised)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def new_strip_info(job) -> dict:
    compat = mod("compat")
    output = job.output
    strip = output.strip() if output is not None else None
    if strip is None:
        return {}
    directory = compat.abspath(strip.directory, bpy.data.scenes["Edit"])
    return {
        "name": strip.name,
        "type": strip.type,
        "channel": strip.channel,
        "frame_final_start": strip.frame_final_start,
        "frame_final_duration": strip.frame_final_duration,
        "directory": strip.directory,
        "abs_directory": directory,
        "elements": [e.filename for e in strip.elements],
        "folder": output.folder,
        "files_on_disk": listing(output.folder),
        "record": {key: strip[key] for key in ("p2v_source", "p2v_prompt", "p2v_settings") if key in strip},
        "look": mod("strip_look").capture(strip),
    }


# --- running jobs ------------------------------------------------------------------------------


def settings(**overrides) -> dict:
    values = dict(
        prompt="a red sports car",
        source_prompt="a grey car on a road",
        model=CONFIG["model"],
        captioner=CONFIG["captioner"],
        device="cpu",
        steps=2,
        size=64,
        cache_dir=os.path.join(CONFIG["work"], "inversions"),
    )
    values.update(overrides)
    return values


def runtime(**overrides):
    rp = mod("runtime_process")
    values = dict(
        python=CONFIG["runtime_python"],
        log_dir=os.path.join(CONFIG["work"], "logs"),
        env={"OMP_NUM_THREADS": "1"},
        idle_timeout=120.0,
    )
    values.update(overrides)
    return rp.RuntimeConfig(**values)


def edit_settings(values: dict, **job_values):
    """The add-on's (vendored) EditSettings, not validated: EditJob.start validates, as in use."""
    return mod("_vendor.settings").EditSettings(**{**values, **job_values})


def make_job(
    strip_name: str,
    settings_values=None,
    runtime_config=None,
    *,
    depth="estimate",
    zpass_render="preview",
    frames="",
    **kwargs,
):
    job_module = mod("job")
    scene = bpy.data.scenes["Edit"]
    strip = mod("compat").all_strips(scene.sequence_editor).get(strip_name) if strip_name else None
    values = edit_settings(settings_values or settings(), depth=depth, zpass_render=zpass_render, frames=frames)
    return job_module.EditJob(scene, strip, values, runtime_config or runtime(), **kwargs)


def run_job(job, *, on_frame=None, timeout=240.0) -> dict:
    started = time.monotonic()
    job.start()
    seen = [0]

    def watch(current):
        if on_frame is not None and current.frames_done > seen[0]:
            seen[0] = current.frames_done
            on_frame(current)

    state = job.wait(timeout=timeout, on_poll=watch)
    return {
        "state": state,
        "message": job.message,
        "frames_done": job.frames_done,
        "total": job.total,
        "seconds": round(time.monotonic() - started, 2),
        "stats_frames": job.stats.get("frames"),
    }


def remove_new_strip(job) -> None:
    """Take the result strip away again (its files stay), so every scenario starts from the same scene."""
    strip = job.output.strip() if job.output is not None else None
    if strip is not None:
        mod("compat").strips(bpy.data.scenes["Edit"].sequence_editor).remove(strip)


def edit_scenario(strip_name: str, **job_kwargs):
    def scenario():
        before = snapshot()
        job = make_job(strip_name, **job_kwargs)
        result = run_job(job)
        result["new"] = new_strip_info(job)
        after = snapshot()
        result["changes"] = changes(before, after, result["new"].get("name"))
        result["render_size"] = list(mod("compat").render_size(bpy.data.scenes["Edit"]))
        remove_new_strip(job)
        return result

    return scenario


def bad_input(strip_name, *, expect_type="P2VAddonError", setup=None, cleanup=None, **job_kwargs):
    def scenario():
        if setup is not None:
            setup()
        try:
            before = snapshot()
            job = make_job(strip_name, **job_kwargs)
            try:
                job.start()
            except Exception as exc:  # noqa: BLE001 - a scenario records what went wrong
                error = {"type": type(exc).__name__, "message": str(exc)}
                result = {"error": error, "started": False}
            else:
                result = {
                    "started": True,
                    "state": job.wait(timeout=120),
                    "message": job.message,
                    "frames_done": job.frames_done,
                }
            result["changes"] = changes(before, snapshot())
            result["running_job"] = mod("job").current_job() is not None
            return result
        finally:
            if cleanup is not None:
                cleanup()

    return scenario


def scenario_cancel():
    before = snapshot()
    job = make_job("mov", settings(steps=8))
    cancelled_at = []

    def on_frame(current):
        if not cancelled_at:
            cancelled_at.append(current.frames_done)
            current.cancel()

    result = run_job(job, on_frame=on_frame)
    result["cancelled_at"] = cancelled_at
    result["new"] = new_strip_info(job)
    result["changes"] = changes(before, snapshot(), result["new"].get("name"))
    remove_new_strip(job)
    return result


def scenario_crash():
    rp = mod("runtime_process")
    before = snapshot()
    job = make_job("mov", settings(steps=8))
    killed = []

    def on_frame(current):
        if not killed and current.process is not None:
            killed.append(current.process.pid)
            os.kill(current.process.pid, signal.SIGKILL)

    result = run_job(job, on_frame=on_frame)
    result["killed"] = killed
    result["new"] = new_strip_info(job)
    result["changes"] = changes(before, snapshot(), result["new"].get("name"))
    result["runtime_after"] = rp.current() is not None
    remove_new_strip(job)
    return result


def scenario_second_edit():
    first = make_job("mov", settings(steps=8))
    first.start()
    try:
        second = make_job("img")
        try:
            second.start()
            outcome = {"second_started": True}
        except Exception as exc:  # noqa: BLE001 - a scenario records what went wrong
            outcome = {"second_started": False, "type": type(exc).__name__, "message": str(exc)}
    finally:
        first.cancel()
        outcome["first_state"] = first.wait(timeout=120)
        outcome["first_frames"] = first.frames_done
        outcome["first_message"] = first.message
    return outcome


def scenario_remote_wrong_token():
    rp = mod("runtime_process")
    process = rp.ensure_local(runtime())
    process.wait_ready()
    config = rp.RuntimeConfig(mode="REMOTE", host=process.host, port=process.port, token="not-the-token")
    return bad_input("img", runtime_config=config)()


def scenario_remote_refused():
    rp = mod("runtime_process")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = rp.RuntimeConfig(mode="REMOTE", host="127.0.0.1", port=port, token="x")
    return bad_input("img", runtime_config=config)()


def scenario_remote_ok():
    """A runtime started elsewhere (here: the add-on's own, reached as a remote one, by port and token)."""
    rp = mod("runtime_process")
    process = rp.ensure_local(runtime())
    process.wait_ready()
    config = rp.RuntimeConfig(mode="REMOTE", host=process.host, port=process.port, token=process.token)
    return edit_scenario("img", runtime_config=config)()


def scenario_warm_reuse():
    rp = mod("runtime_process")
    pids = []
    for _ in range(2):
        job = make_job("img")
        result = run_job(job)
        pids.append((job.process.pid, result["state"], result["seconds"]))
    return {"runs": pids, "alive": rp.current() is not None}


def scenario_release():
    rp = mod("runtime_process")
    process = rp.ensure_local(runtime())
    process.wait_ready()
    pid = process.pid
    released = rp.release()
    return {
        "released": released,
        "pid_gone": process.proc.poll() is not None,
        "current": rp.current() is not None,
        "pid": pid,
    }


def no_output_dir_setup():
    # The output folder cannot be made: a file stands where the p2v folder would go.
    blend_dir = os.path.dirname(bpy.data.filepath)
    shutil.move(os.path.join(blend_dir, "p2v"), os.path.join(blend_dir, "p2v.moved")) if os.path.isdir(
        os.path.join(blend_dir, "p2v")
    ) else None
    with open(os.path.join(blend_dir, "p2v"), "w") as handle:
        handle.write("not a folder\n")


def no_output_dir_cleanup():
    blend_dir = os.path.dirname(bpy.data.filepath)
    os.unlink(os.path.join(blend_dir, "p2v"))
    if os.path.isdir(os.path.join(blend_dir, "p2v.moved")):
        shutil.move(os.path.join(blend_dir, "p2v.moved"), os.path.join(blend_dir, "p2v"))


def scenario_unsaved_file():
    """A file never saved. With an output folder that is a path, the frames go there (absolute
    paths); with the default //p2v/ they wait in the temp folder, and the file's first save moves
    them beside it and points the strip there (relative)."""
    path = bpy.data.filepath
    out_dir = os.path.join(CONFIG["work"], "unsaved-out")
    compat = mod("compat")
    try:
        bpy.ops.wm.read_homefile(use_empty=True)
        scene = bpy.context.scene
        scene.render.resolution_x, scene.render.resolution_y = 80, 48
        editor = scene.sequence_editor_create()
        strip = compat.strips(editor).new_image("still", os.path.join(CONFIG["media"], "imgs", "f000.png"), 1, 1)
        job = mod("job").EditJob(
            scene, strip, edit_settings(settings()), runtime(serve_args=("--job-runner", "echo")), output_dir=out_dir
        )
        result = run_job(job)
        new = job.output.strip()
        result.update(
            filepath=bpy.data.filepath,
            folder=job.output.folder,
            out_dir=out_dir,
            directory=new.directory if new else None,
            files=listing(job.output.folder),
        )
        waiting = mod("job").EditJob(
            scene, strip, edit_settings(settings(prompt="a blue car")), runtime(serve_args=("--job-runner", "echo"))
        )
        run_job(waiting)
        result["waiting"] = {
            "state": waiting.state,
            "message": waiting.message,
            "folder": waiting.output.folder,
            "directory": waiting.output.strip().directory,
        }
        saved_as = os.path.join(CONFIG["work"], "saved-later", "first.blend")
        os.makedirs(os.path.dirname(saved_as), exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=saved_as)
        moved = compat.all_strips(scene.sequence_editor)[waiting.output.strip_name]
        result["after_save"] = {
            "directory": moved.directory,
            "abs": compat.abspath(moved.directory, scene),
            "files": listing(compat.abspath(moved.directory, scene)),
            "old_folder_exists": os.path.exists(waiting.output.folder),
            "explicit_abs": compat.abspath(
                compat.all_strips(scene.sequence_editor)[job.output.strip_name].directory, scene
            ),
        }
        return result
    finally:
        bpy.ops.wm.open_mainfile(filepath=path)


def scenario_unwritable_probe():
    output_strip = mod("output_strip")
    try:
        output_strip.reserve_folder("/proc/p2v-test/out", "img")
        return {"raised": False}
    except Exception as exc:  # noqa: BLE001 - a scenario records what went wrong
        return {"raised": True, "type": type(exc).__name__, "message": str(exc)}


class Recorder:
    """Stands in for ``UILayout``: records every call, returns itself for sub-layouts."""

    def __init__(self, log=None, depth=0):
        self.log = log if log is not None else []
        self.depth = depth

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            entry = {"call": name, "depth": self.depth}
            if name == "prop":
                entry["data"] = type(args[0]).__name__
                entry["property"] = args[1]
                entry["exists"] = args[1] in getattr(args[0], "bl_rna", type(args[0]).bl_rna).properties
                entry["kwargs"] = sorted(kwargs)
            elif name == "operator":
                entry["operator"] = args[0]
                family, _, op = args[0].partition(".")
                entry["exists"] = hasattr(getattr(bpy.ops, family), op)
                entry["text"] = kwargs.get("text")
            elif name in ("label", "progress"):
                entry["text"] = kwargs.get("text")
            self.log.append(entry)
            if name in ("row", "column", "box", "split", "grid_flow", "column_flow"):
                return Recorder(self.log, self.depth + 1)
            return OperatorProps() if name == "operator" else None

        return call

    def __setattr__(self, name, value):
        if name in ("log", "depth"):
            object.__setattr__(self, name, value)
        else:
            self.log.append({"call": f"set {name}", "value": repr(value)})


class OperatorProps:
    def __setattr__(self, name, value):
        pass


def draw(panel_cls, context) -> list:
    fake = type("FakePanel", (), {})()
    fake.layout = Recorder()
    panel_cls.draw(fake, context)
    return fake.layout.log


def scenario_panel_draw():
    panel = mod("panel")
    prefs_mod = mod("preferences")
    scene = bpy.data.scenes["Edit"]
    # (No context.temp_override here: an operator called inside one while the job's worker thread
    # runs crashes Blender; bpy.context.scene is "Edit" already.)
    assert bpy.context.scene == scene
    scene.sequence_editor.active_strip = mod("compat").all_strips(scene.sequence_editor)["img"]
    idle = draw(panel.SEQUENCER_PT_p2v, bpy.context)
    advanced = draw(panel.SEQUENCER_PT_p2v_advanced, bpy.context)
    job = make_job("mov", settings(steps=8))
    job.start()
    try:
        while job.poll() and job.frames_done < 1:
            time.sleep(0.02)
        running = draw(panel.SEQUENCER_PT_p2v, bpy.context)
    finally:
        job.cancel()
        job.wait(timeout=120)
        remove_new_strip(job)
    prefs = prefs_mod.addon_preferences()
    fake = type("FakePrefs", (), {"bl_rna": prefs.bl_rna})()
    for prop in prefs.bl_rna.properties:
        if prop.identifier not in ("rna_type", "bl_idname"):
            setattr(fake, prop.identifier, getattr(prefs, prop.identifier))
    fake.layout = Recorder()
    prefs_mod.P2VPreferences.draw(fake, bpy.context)
    local = fake.layout.log
    # A set-up that has chosen its torch build: the box shows which, before pip's lines.
    setup = mod("runtime_setup")
    task = setup.SetupTask(CONFIG["base_python"], os.path.join(CONFIG["work"], "unused-venv"), [])
    task.announcement = "Installing torch, CPU build (no NVIDIA driver found), about 0.2 GB"
    task.state, task.message = "done", "Runtime ready: p2v_runtime 0.1.0, torch 2.5.1+cpu, device cpu"
    setup._task = task
    try:
        fake.layout = Recorder()
        prefs_mod.P2VPreferences.draw(fake, bpy.context)
        after_setup = fake.layout.log
    finally:
        setup._task = None
    fake.runtime_mode = "REMOTE"
    fake.layout = Recorder()
    prefs_mod.P2VPreferences.draw(fake, bpy.context)
    return {
        "idle": idle,
        "advanced": advanced,
        "running": running,
        "preferences": local,
        "preferences_remote": fake.layout.log,
        "preferences_after_setup": after_setup,
    }


def scenario_schema_walk():
    """Every setting the schema gives Blender: where it lives, its bpy default and limits, and what
    the add-on says for the bad values the test sends (set on the property when Blender keeps the
    value as given, else as a headless override)."""
    schema = mod("_vendor.settings")
    properties = mod("properties")
    prefs = mod("preferences").addon_preferences()
    scene = bpy.data.scenes["Edit"]
    found = {}
    for f in schema.setting_fields():
        spec = schema.spec_of(f)
        if spec.blender is None:
            continue
        holder = scene.p2v if spec.blender == schema.SCENE else prefs
        prop = holder.bl_rna.properties[f.name]
        entry = {
            "scope": spec.blender,
            "value": getattr(holder, f.name),
            "label": prop.name,
            "items": [item.identifier for item in prop.enum_items] if prop.type == "ENUM" else None,
            "min": getattr(prop, "hard_min", None),
            "max": getattr(prop, "hard_max", None),
        }
        if f.name in CONFIG.get("bad_values", {}):
            bad = CONFIG["bad_values"][f.name]
            saved = getattr(holder, f.name)
            try:
                setattr(holder, f.name, bad)
                kept = getattr(holder, f.name)
                entry["kept"] = kept
                if kept == bad:
                    try:
                        properties.job_settings(scene, prefs, {} if f.name == "prompt" else {"prompt": "x"})
                        entry["property_message"] = None
                    except schema.SettingsError as exc:
                        entry["property_message"] = str(exc)
            except (TypeError, ValueError) as exc:  # e.g. an enum value Blender does not know
                entry["kept"] = f"refused by Blender: {exc}"
            finally:
                setattr(holder, f.name, saved)
            try:
                properties.job_settings(scene, prefs, {"prompt": "x", f.name: bad})
                entry["override_message"] = None
            except schema.SettingsError as exc:
                entry["override_message"] = str(exc)
        found[f.name] = entry
    return found


def scenario_placed_image():
    """An image strip scaled, moved and half transparent over a red color strip: the runtime gets
    the image itself (not a black frame with the image in a corner), and the result, given the
    source's placement, composites exactly where the source did (the echo runtime returns the
    frames unchanged, so the composite with the result in place of the muted source must be the
    composite with the source)."""
    import numpy as np

    scene = bpy.data.scenes["Edit"]
    editor, compat = scene.sequence_editor, mod("compat")
    strips = compat.strips(editor)
    red = compat.new_effect_strip(editor, "red", "COLOR", 30, 400, 3)
    red.color = (1.0, 0.0, 0.0)
    placed = strips.new_image("placed", os.path.join(CONFIG["media"], "imgs", "f000.png"), 31, 400)
    for i in (1, 2):
        placed.elements.append(f"f{i:03d}.png")
    placed.transform.scale_x = placed.transform.scale_y = 0.5
    placed.transform.offset_x, placed.transform.offset_y = 15.0, 5.0
    placed.blend_alpha = 0.8

    def composite(label):
        copy = scene.copy()
        try:
            mod("strip_frames").set_png_output(copy)
            copy.frame_set(401)
            path = os.path.join(CONFIG["work"], f"composite-{label}.png")
            compat.render_still(copy, path)
            return mod("strip_frames").load_pixels(path, compat.render_size(copy), label)[:, :, :3]
        finally:
            bpy.data.scenes.remove(copy)

    job = None
    try:
        without = composite("source")
        job = make_job("placed", runtime_config=echo_runtime())
        result = run_job(job)
        result["new"] = new_strip_info(job)
        result["source_look"] = mod("strip_look").capture(placed)
        result["frame_size"] = [job.frames.width, job.frames.height] if job.frames is not None else None
        placed.mute = True  # the result in place of its source: the same picture, the same place
        with_result = composite("result")
        result["composite_difference"] = float(np.abs(with_result - without).mean() * 255.0)
        result["composite_red"] = float(without[..., 0].mean())
        result["composite_difference_without_look"] = None
        strip = job.output.strip()
        if strip is not None:  # the same result without the placement: clearly not where the source was
            mod("strip_look").apply(strip, mod("strip_look").NEUTRAL)
            result["composite_difference_without_look"] = float(np.abs(composite("unplaced") - without).mean() * 255.0)
        return result
    finally:
        if job is not None:
            remove_new_strip(job)
        for name in ("placed", "red"):
            strips.remove(compat.all_strips(editor)[name])


def scenario_muted_source():
    """The source strip muted and its channel muted (to see only results): it is still edited."""
    scene = bpy.data.scenes["Edit"]
    editor, compat = scene.sequence_editor, mod("compat")
    img = compat.all_strips(editor)["img"]
    channels = getattr(editor, "channels", None)
    img.mute = True
    if channels is not None:
        channels[img.channel].mute = True
    job = None
    try:
        job = make_job("img", runtime_config=echo_runtime())
        result = run_job(job)
        result["new"] = new_strip_info(job)
        result["muted_after"] = [img.mute, None if channels is None else channels[img.channel].mute]
        return result
    finally:
        img.mute = False
        if channels is not None:
            channels[img.channel].mute = False
        if job is not None:
            remove_new_strip(job)


def scenario_naming():
    """Result names: the source's name and the prompt shortened, never the marker."""
    name = mod("output_strip").result_name
    cases = {
        "short": name("Wolf", "a red fox"),
        "long_source": name("A" * 80, "a red fox"),
        "long_prompt": name("Wolf", "a marble sculpture of a woman running, Venus de Milo, in a museum hall"),
        "unicode": name("Ünïcødé strip ✓" * 4, "ein Wolf aus Glas ✓ " * 4),
        "no_prompt": name("B" * 80, ""),
    }
    return {key: {"name": value, "bytes": len(value.encode("utf-8"))} for key, value in cases.items()}


def scenario_workflow():
    """Preview, edit, load settings, re-edit and edit selected through the operators (background:
    they run to the end): what each made, and the stats of each job."""
    ops, compat = mod("operators"), mod("compat")
    prefs = mod("preferences").addon_preferences()
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    values = settings()
    props = scene.p2v
    for name in ("prompt", "source_prompt", "steps", "size"):
        setattr(props, name, values[name])
    props.frames = ""
    prefs.python = CONFIG["runtime_python"]
    prefs.model, prefs.captioner, prefs.device = values["model"], values["captioner"], "cpu"
    prefs.cache_dir = os.path.join(CONFIG["work"], "workflow-cache")
    jobs = []
    build_job = ops.build_job
    ops.build_job = lambda *args, **kwargs: jobs.append(build_job(*args, **kwargs)) or jobs[-1]
    before = set(strips_state(scene))
    out = {}

    def made():
        return {
            s.name: {
                "length": s.frame_final_duration,
                "source": s.get("p2v_source"),
                "preview": bool(s.get("p2v_preview")),
            }
            for s in compat.all_strips(editor)
            if s.name not in before
        }

    try:
        editor.active_strip = compat.all_strips(editor)["img"]
        out["preview1"] = sorted(bpy.ops.sequencer.p2v_preview())
        props.prompt = "a blue car"
        out["preview2"] = sorted(bpy.ops.sequencer.p2v_preview())
        out["after_previews"] = made()
        out["edit"] = sorted(bpy.ops.sequencer.p2v_edit())
        out["after_edit"] = made()
        result = next(s for s in compat.all_strips(editor) if s.name not in before and not s.get("p2v_preview"))
        props.prompt, props.steps = "something else", 3
        editor.active_strip = result
        out["load"] = sorted(bpy.ops.sequencer.p2v_load_settings())
        out["loaded"] = {"prompt": props.prompt, "steps": props.steps}
        props.prompt = "a green car"
        out["reedit"] = sorted(bpy.ops.sequencer.p2v_reedit())
        out["after_reedit"] = made()
        for s in compat.all_strips(editor):
            s.select = s.name in ("img", "mov")
        out["selected"] = sorted(bpy.ops.sequencer.p2v_edit_selected())
        out["after_selected"] = made()
        # Previews of another anchor: the strip sits at the anchor's frame; with per-frame depth
        # only the anchor's frame is rendered and sent.
        source = compat.all_strips(editor)["img"]
        editor.active_strip = source
        props.anchor = "middle"
        for depth_norm in ("clip", "frame"):
            props.depth_norm = depth_norm
            out[f"preview_middle_{depth_norm}"] = sorted(bpy.ops.sequencer.p2v_preview())
            shown = [
                s
                for s in compat.all_strips(editor)
                if s.get("p2v_preview") and s.get("p2v_source") == "img" and s.name not in before
            ]
            out[f"preview_middle_{depth_norm}_strips"] = [
                [s.frame_final_start - source.frame_final_start, s.frame_final_duration] for s in shown
            ]
        out["jobs"] = [
            {
                "strip": j.strip_name,
                "preview": j.preview,
                "state": j.state,
                "hits": j.stats.get("inversion_cache_hits"),
                "frames": j.stats.get("frames"),
                "sent": j.total,
                "prompt": j.settings.prompt,
            }
            for j in jobs
        ]
        out["preview_image"] = "P2V Preview" in bpy.data.images
        return out
    finally:
        ops.build_job = build_job
        for s in list(compat.strips(editor)):
            if s.name not in before:
                compat.strips(editor).remove(s)
        for s in compat.all_strips(editor):
            s.select = False
        props.prompt, props.steps = values["prompt"], values["steps"]
        props.anchor, props.depth_norm = "first", "clip"


def scenario_operator_poll():
    """The operator's poll explains why it is unavailable; the edit runs through bpy.ops too."""
    ops = mod("operators")
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    compat = mod("compat")
    out = {}
    assert bpy.context.scene == scene
    editor.active_strip = None
    out["no_strip"] = ops.unavailable_reason(bpy.context)
    out["no_strip_poll"] = bpy.ops.sequencer.p2v_edit.poll()
    editor.active_strip = compat.all_strips(editor)["txt"]
    out["text_strip"] = ops.unavailable_reason(bpy.context)
    editor.active_strip = compat.all_strips(editor)["img"]
    out["img"] = ops.unavailable_reason(bpy.context)
    out["img_poll"] = bpy.ops.sequencer.p2v_edit.poll()
    return out


def scenario_operator_run():
    """``bpy.ops.sequencer.p2v_edit()`` in background mode runs the job to its end (scripts)."""
    prefs = mod("preferences").addon_preferences()
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    compat = mod("compat")
    values = settings()
    props = scene.p2v
    for name in ("prompt", "source_prompt", "steps", "size"):
        setattr(props, name, values[name])
    prefs.python = CONFIG["runtime_python"]
    prefs.model, prefs.captioner, prefs.device = values["model"], values["captioner"], "cpu"
    prefs.cache_dir = values["cache_dir"]
    before = snapshot()
    assert bpy.context.scene == scene
    editor.active_strip = compat.all_strips(editor)["img"]
    result = bpy.ops.sequencer.p2v_edit()
    after = snapshot()
    new = [name for name in after["strips"] if name not in before["strips"]]
    return {
        "result": sorted(result),
        "new": new,
        "new_length": after["strips"][new[0]]["frame_final_duration"] if new else None,
    }


class FakeEvent:
    def __init__(self, type_, value="NOTHING", ctrl=False):
        self.type, self.value, self.ctrl, self.oskey = type_, value, ctrl, False


def scenario_modal_loop():
    """The modal operator's loop, driven by hand (background Blender has no event loop):
    timer events poll the job, Ctrl+Z is held back, Esc cancels, the report says what happened."""
    ops = mod("operators")
    op_cls = ops.SEQUENCER_OT_p2v_edit
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    compat = mod("compat")
    editor.active_strip = compat.all_strips(editor)["mov"]
    scene.p2v.steps = 8
    reports = []
    fake_cls = type(
        "FakeOperator",
        (),
        {
            "modal": op_cls.modal,
            "_status": op_cls._status,
            "_finished": op_cls._finished,
            "_ended": op_cls._ended,
            "_next_job": op_cls._next_job,
            "_threaded": staticmethod(op_cls._threaded),
            "preview": False,
            "confirm_long": False,
            "report": lambda self, level, text: reports.append((sorted(level), text)),
        },
    )
    fake = fake_cls()
    fake._timer = None
    fake._queue, fake._outcomes, fake._cancelled = [], [], False
    fake._job = job = ops.build_job(bpy.context)
    job.start(threaded=True)
    answers = {
        "undo": sorted(fake.modal(bpy.context, FakeEvent("Z", "PRESS", ctrl=True))),
        "other": sorted(fake.modal(bpy.context, FakeEvent("MOUSEMOVE"))),
    }
    cancelled = False
    ticks = 0
    while True:
        ticks += 1
        result = fake.modal(bpy.context, FakeEvent("TIMER"))
        if result != {"RUNNING_MODAL"}:
            break
        if job.frames_done >= 1 and not cancelled:
            cancelled = True
            answers["esc"] = sorted(fake.modal(bpy.context, FakeEvent("ESC", "PRESS")))
        time.sleep(0.02)
    scene.p2v.steps = 2
    strip = job.output.strip()
    length = strip.frame_final_duration if strip is not None else 0
    remove_new_strip(job)
    return {
        "answers": answers,
        "result": sorted(result),
        "reports": reports,
        "state": job.state,
        "length": length,
        "ticks": ticks,
    }


def scenario_operator_in_override():
    """Scripts often call operators inside context.temp_override: the edit must not crash there."""
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    compat = mod("compat")
    editor.active_strip = compat.all_strips(editor)["mov"]
    before = snapshot()
    results = []
    for _ in range(2):
        with bpy.context.temp_override(scene=scene):
            results.append(sorted(bpy.ops.sequencer.p2v_edit()))
    after = snapshot()
    new = [name for name in after["strips"] if name not in before["strips"]]
    for name in new:
        compat.strips(editor).remove(compat.all_strips(editor)[name])
    return {"results": results, "new": new, "lengths": [after["strips"][name]["frame_final_duration"] for name in new]}


def scenario_register_twice():
    import addon_utils

    def leftovers():
        names = (
            "SEQUENCER_OT_p2v_edit",
            "SEQUENCER_OT_p2v_cancel",
            "P2V_OT_setup_runtime",
            "P2V_OT_check_runtime",
            "P2V_OT_release_runtime",
            "P2V_OT_cancel_setup",
            "SEQUENCER_PT_p2v",
            "SEQUENCER_PT_p2v_advanced",
            "P2VSceneSettings",
            "P2VPreferences",
        )
        found = [name for name in names if hasattr(bpy.types, name)]
        if hasattr(bpy.types.Scene, "p2v"):
            found.append("Scene.p2v")
        return found

    rp = mod("runtime_process")
    rp.ensure_local(runtime()).wait_ready()
    pid_before = rp.current().pid
    rounds = []
    for _ in range(2):
        addon_utils.disable(ADDON)
        rounds.append(
            {
                "after_disable": leftovers(),
                "runtime": rp.current() is not None,
                "enabled": ADDON in bpy.context.preferences.addons,
            }
        )
        addon_utils.enable(ADDON, default_set=True)
        rounds.append(
            {"after_enable": sorted(set(("SEQUENCER_OT_p2v_edit", "SEQUENCER_PT_p2v", "Scene.p2v")) - set(leftovers()))}
        )
    M.clear()
    pid_alive = True
    try:
        os.kill(pid_before, 0)
    except OSError:
        pid_alive = False
    return {"rounds": rounds, "old_runtime_alive": pid_alive}


def scenario_setup_fails_cleanly():
    """Set up runtime with a package that does not exist: a clear failure, and the log says why."""
    venv = os.path.join(CONFIG["work"], "setup-venv")
    task = mod("runtime_setup").SetupTask(
        CONFIG["base_python"],
        venv,
        [os.path.join(CONFIG["work"], "missing.whl")],
        pip_args=["--no-index"],
        log_path=os.path.join(CONFIG["work"], "setup.log"),
    )
    task.start()
    task.join(300)
    return {"state": task.state, "message": task.message, "step": task.step, "venv": os.path.isdir(venv)}


def scenario_check_runtime():
    rp = mod("runtime_process")
    good = rp.check_python(CONFIG["runtime_python"])
    bad = rp.check_python(CONFIG["base_python"])
    missing = rp.check_python("/nonexistent/python3")
    return {"good": good, "bad": bad, "missing": missing}


# --- the Z pass of scene strips (tests/test_zpass_addon.py) --------------------------------------


def _mesh_object(scene, name, verts, faces, location=(0.0, 0.0, 0.0)):
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(verts, [], faces)
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    scene.collection.objects.link(obj)
    return obj


def _box(scene, name, half, location):
    hx, hy, hz = half
    verts = [(x, y, z) for x in (-hx, hx) for y in (-hy, hy) for z in (-hz, hz)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return _mesh_object(scene, name, verts, faces, location)


def _ortho_camera(scene, name, height=10.0, ortho_scale=8.0):
    data = bpy.data.cameras.new(name)
    data.type = "ORTHO"
    data.ortho_scale = ortho_scale
    data.clip_end = 100.0
    camera = bpy.data.objects.new(name, data)
    camera.location = (0.0, 0.0, height)  # looks down -Z
    scene.collection.objects.link(camera)
    return camera


def _geo_scene(name: str, engine: str = "CYCLES"):
    """A ground plane 10 units below an orthographic camera and a 4x4x2 box whose top is 5 units
    below it, moving along x; a sun, a red box. Rendered at the Sequencer's 80x48."""
    scene = bpy.data.scenes.new(name)
    scene.render.engine = engine
    if engine == "CYCLES":
        scene.cycles.samples = 16  # "as the scene is set"; the quick preview renders 8
        scene.cycles.use_denoising = False
        scene.cycles.device = "CPU"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 80, 48, 100
    scene.frame_start, scene.frame_end = 1, 5
    scene.frame_current = 1
    _mesh_object(scene, f"{name} plane", [(-20, -20, 0), (20, -20, 0), (20, 20, 0), (-20, 20, 0)], [(0, 1, 2, 3)])
    cube = _box(scene, f"{name} cube", (2.0, 2.0, 1.0), (0.0, 0.0, 4.0))
    material = bpy.data.materials.new(f"{name} red")
    material.diffuse_color = (0.8, 0.1, 0.1, 1.0)  # Workbench
    if material.node_tree is None:  # 4.2; 5.0 makes new materials with nodes
        material.use_nodes = True
    material.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.8, 0.1, 0.1, 1.0)
    cube.data.materials.append(material)
    for frame, x in ((1, -1.0), (5, 1.0)):
        cube.location.x = x
        cube.keyframe_insert("location", frame=frame)
    for curve in _fcurves(cube):
        for point in curve.keyframe_points:
            point.interpolation = "LINEAR"
    sun = bpy.data.lights.new(f"{name} sun", "SUN")
    sun.energy = 0.4
    light = bpy.data.objects.new(f"{name} sun", sun)
    light.rotation_euler = (0.5, 0.3, 0.0)
    scene.collection.objects.link(light)
    scene.camera = _ortho_camera(scene, f"{name} camera")
    scene.world = bpy.data.worlds.new(f"{name} sky")
    scene.world.color = (0.05, 0.05, 0.08)
    return scene


def _fcurves(obj):
    """The object's F-curves (4.4+ keep them in layered actions' channel bags)."""
    action = obj.animation_data.action
    curves = getattr(action, "fcurves", None)
    if curves is not None and len(curves):
        return list(curves)
    found = []
    for layer in getattr(action, "layers", ()):
        for strip in layer.strips:
            for bag in strip.channelbags:
                found.extend(bag.fcurves)
    return found


def zpass_setup() -> dict:
    """Scene strips for the Z pass in the 'Edit' scene (once): channels 11..17 from frame 300."""
    scene = bpy.data.scenes["Edit"]
    compat = mod("compat")
    editor = scene.sequence_editor
    if "geo" in compat.all_strips(editor):
        return {}
    strips = compat.strips(editor)
    geo = _geo_scene("Geo")
    strip = strips.new_scene("geo", geo, 11, 300)
    strip.frame_offset_start, strip.frame_offset_end = 1, 1  # timeline 301..303 = Geo frames 2..4
    placed = strips.new_scene("geo_placed", geo, 12, 300)  # geo, placed in the frame every way there is
    placed.frame_offset_start, placed.frame_offset_end = 1, 1
    placed.use_flip_x = True
    placed.transform.scale_x, placed.transform.scale_y = 0.5, 0.6
    placed.transform.offset_x, placed.transform.offset_y, placed.transform.rotation = 12.0, -6.0, 0.3
    placed.crop.min_x, placed.crop.max_y = 4, 3
    placed.blend_type, placed.blend_alpha = "ADD", 0.7
    reverse = strips.new_scene("geo_reverse", geo, 18, 300)
    reverse.frame_offset_start, reverse.frame_offset_end = 1, 1
    reverse.use_reverse_frames = True  # the Sequencer maps the frames; the Z pass must follow
    retimed = strips.new_scene("geo_retimed", geo, 19, 300)  # Geo 1..5 at half speed over 10 frames
    if hasattr(retimed, "retiming_keys"):  # 4.4+
        _half_speed(scene, editor, retimed)
    else:
        strips.remove(retimed)
    empty = bpy.data.scenes.new("Empty")  # a camera looking at nothing
    empty.render.engine = "CYCLES"
    empty.cycles.samples = 1
    empty.render.resolution_x, empty.render.resolution_y = 80, 48
    empty.camera = _ortho_camera(empty, "Empty camera")
    strips.new_scene("empty", empty, 13, 300).frame_final_duration = 2
    strips.new_scene("self", scene, 14, 300).frame_final_duration = 2
    seqinput = strips.new_scene("seqinput", geo, 15, 300)
    seqinput.frame_final_duration = 2
    seqinput.scene_input = "SEQUENCER"
    nocam = bpy.data.scenes.new("NoCameraZ")
    strips.new_scene("nocam_z", nocam, 17, 300).frame_final_duration = 2
    for made in compat.all_strips(editor):
        if getattr(made, "strobe", 1.0) < 1.0:
            made.strobe = 1.0
    return {}


def _half_speed(scene, editor, strip) -> None:
    """Retime ``strip`` to half speed as the UI does (the Python API cannot set a speed). No other
    Python thread may run during an operator in a context override: this runs before any runtime."""
    compat = mod("compat")
    selected = [other for other in compat.all_strips(editor) if other.select]
    for other in selected:
        other.select = False
    active, editor.active_strip = editor.active_strip, strip
    strip.select = True
    try:
        with bpy.context.temp_override(scene=scene, sequencer_scene=scene):
            bpy.ops.sequencer.retiming_segment_speed_set(speed=50)
    finally:
        strip.select = False
        for other in selected:
            other.select = True
        editor.active_strip = active


def _scene_settings(scene) -> dict:
    """Everything of a scene the Z-pass render could have touched, as plain values."""
    compat = mod("compat")
    tree = compat.compositor_tree(scene)
    out = {
        "render": rna_dump(scene.render),
        "view_layers": [{k: v for k, v in rna_dump(layer).items() if k != "depsgraph"} for layer in scene.view_layers],
        "view_settings": rna_dump(scene.view_settings),
        "display_settings": rna_dump(scene.display_settings),
        "display": rna_dump(scene.display),
        "frame": [scene.frame_current, scene.frame_start, scene.frame_end, scene.frame_step],
        "camera": scene.camera.name if scene.camera else None,
        "world": scene.world.name if scene.world else None,
        "markers": [(m.name, m.frame, m.camera.name if m.camera else None) for m in scene.timeline_markers],
        "tree": None
        if tree is None
        else {
            "name": tree.name,
            "nodes": sorted((n.name, n.bl_idname) for n in tree.nodes),
            "links": sorted(
                (link.from_node.name, link.from_socket.identifier, link.to_node.name, link.to_socket.identifier)
                for link in tree.links
            ),
        },
        "objects": {obj.name: [list(obj.location), list(obj.matrix_world.translation)] for obj in scene.objects},
    }
    for name in ("cycles", "eevee"):
        group = getattr(scene, name, None)
        if group is not None:
            out[name] = rna_dump(group)
    if not hasattr(scene, "compositing_node_group"):
        out["use_nodes"] = scene.use_nodes
    return out


def _without_users(value):
    """``value`` without ID user counts: bpy 4.2's ``Scene.copy()`` adds a user to the objects of the
    scene's master collection that removing the copy does not take back (5.0 does); a count of
    references in memory, recounted when the file loads, not a setting."""
    if isinstance(value, dict):
        return {k: _without_users(v) for k, v in value.items() if k != "users"}
    if isinstance(value, list):
        return [_without_users(v) for v in value]
    return value


def _data_names() -> dict:
    names = {}
    for collection in (
        "scenes",
        "node_groups",
        "images",
        "objects",
        "cameras",
        "meshes",
        "materials",
        "worlds",
        "collections",
        "lights",
        "actions",
    ):
        names[collection] = sorted(item.name for item in getattr(bpy.data, collection))
    return names


def _zpass_state() -> dict:
    scenes = {name: _without_users(_scene_settings(bpy.data.scenes[name])) for name in ("Edit", "Geo", "Empty")}
    return scenes | {"data": _data_names()}


def _state_changes(before, after, path: str = "") -> list[str]:
    """Where two plain-value trees differ: ``path: before -> after`` at the deepest level that differs."""
    if _same(before, after):
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after), key=str):
            found.extend(_state_changes(before.get(key), after.get(key), f"{path}.{key}" if path else str(key)))
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        found = []
        for index, (old, new) in enumerate(zip(before, after)):
            found.extend(_state_changes(old, new, f"{path}[{index}]"))
        return found
    return [f"{path}: {json.dumps(before, default=str)[:200]} -> {json.dumps(after, default=str)[:200]}"]


def recording_runtime():
    """The recording server the test process runs (real socket, real edit, depth saved)."""
    rp = mod("runtime_process")
    server = CONFIG["recorder"]
    return rp.RuntimeConfig(mode="REMOTE", host=server["host"], port=server["port"], token=server["token"])


def zpass_edit(strip_name: str, runtime_config=None, zpass_render="preview", **setting_overrides):
    def scenario():
        zpass_setup()
        before, state_before = snapshot(), _zpass_state()
        job = make_job(
            strip_name,
            settings(**setting_overrides),
            runtime_config or runtime(),
            depth="zpass",
            zpass_render=zpass_render,
        )
        result = run_job(job)
        result["depth_source"] = job.stats.get("depth_source")  # "file": the runtime edited with the depth sent
        result["new"] = new_strip_info(job)
        result["changes"] = changes(before, snapshot(), result["new"].get("name"))
        remove_new_strip(job)
        result["settings_changes"] = _state_changes(state_before, _zpass_state())
        result["warnings"] = job.warnings
        return result

    return scenario


def zpass_bad(strip_name: str, patch=None, **job_kwargs):
    """A Z-pass edit that must be refused or fail with a clear report and change nothing."""

    def scenario():
        zpass_setup()
        state_before = _zpass_state()
        undo = patch() if patch is not None else None
        try:
            result = bad_input(strip_name, depth="zpass", **job_kwargs)()
        finally:
            if undo is not None:
                undo()
        result["settings_changes"] = _state_changes(state_before, _zpass_state())
        return result

    return scenario


def _inject(kind: str, at_call: int = 1):
    """Make the add-on read a Z pass with NaN (or -inf) pixels from the ``at_call``-th render on."""

    def patch():
        strip_frames = mod("strip_frames")
        original = strip_frames.load_pixels
        calls = [0]

        def load_pixels(path, size, what, data=False):
            pixels = original(path, size, what, data)
            if data:
                calls[0] += 1
                if calls[0] >= at_call:
                    pixels = pixels.copy()
                    pixels[5:9, 10:20, 0] = float("nan") if kind == "nan" else float("-inf")
            return pixels

        strip_frames.load_pixels = load_pixels
        return lambda: setattr(strip_frames, "load_pixels", original)

    return patch


def scenario_zpass_cancel():
    """Cancel a Z-pass edit after its first frame: the copy of the scene goes, nothing else changes."""
    zpass_setup()
    before, state_before = snapshot(), _zpass_state()
    job = make_job("geo", settings(steps=8), depth="zpass")
    cancelled = []

    def on_frame(current):
        if not cancelled:
            cancelled.append(current.frames_done)
            current.cancel()

    job_module = mod("job")
    result = run_job(job, on_frame=on_frame)
    result["new"] = new_strip_info(job)
    remove_new_strip(job)
    result["changes"] = changes(before, snapshot())
    result["settings_changes"] = _state_changes(state_before, _zpass_state())
    result["running_job"] = job_module.current_job() is not None
    return result


def scenario_zpass_error_mid_render():
    """A render that fails on the 2nd frame (NaN injected) ends the job with a clear report, restored."""
    return zpass_bad("geo", patch=_inject("nan", at_call=2), runtime_config=echo_runtime())()


class _RenderLog:
    """What each render of a scene named ``prefix...`` (the Z-pass copy) really rendered with: its
    engine and sample settings as the render starts (``render_pre``, which Blender also calls for
    the scene a scene strip renders) and the last "done / total" samples the engine reported
    (``render_stats``: Cycles "Sample 8/8", Eevee "Rendering 4 / 4 samples")."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.renders = []
        self._scenes = []  # renders in progress, innermost last

    def _pre(self, scene, *args):
        self._scenes.append(scene.name)
        if scene.name.startswith(self.prefix):
            cycles, eevee = getattr(scene, "cycles", None), getattr(scene, "eevee", None)
            self.renders.append(
                {
                    "engine": scene.render.engine,
                    "cycles_samples": getattr(cycles, "samples", None),
                    "cycles_denoising": getattr(cycles, "use_denoising", None),
                    "eevee_samples": getattr(eevee, "taa_render_samples", None),
                    "rendered_samples": None,
                }
            )

    def _stats(self, text, *args):
        import re

        if self._scenes and self._scenes[-1].startswith(self.prefix) and self.renders:
            found = re.search(r"Sample (\d+)/(\d+)|Rendering (\d+) / (\d+) samples", str(text))
            if found:
                self.renders[-1]["rendered_samples"] = [int(v) for v in found.groups() if v is not None]

    def _post(self, scene, *args):
        if self._scenes:
            self._scenes.pop()

    def start(self) -> _RenderLog:
        bpy.app.handlers.render_pre.append(self._pre)
        bpy.app.handlers.render_stats.append(self._stats)
        bpy.app.handlers.render_post.append(self._post)
        return self

    def stop(self) -> None:
        bpy.app.handlers.render_pre.remove(self._pre)
        bpy.app.handlers.render_stats.remove(self._stats)
        bpy.app.handlers.render_post.remove(self._post)


def scenario_zpass_frames():
    """What StripFrames gives for the Z pass, straight (no runtime): per frame the Z, RGB and time,
    for the geo strip in both render settings and with Workbench and Eevee; the sequencer's RGB;
    what each render of the Z-pass copy rendered with (``renders``, see :class:`_RenderLog`)."""
    import numpy as np

    zpass_setup()
    strip_frames, compat = mod("strip_frames"), mod("compat")
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    state_before = _zpass_state()
    out = {"folder": os.path.join(CONFIG["work"], "zpass-frames")}
    os.makedirs(out["folder"], exist_ok=True)

    def grab(strip, depth, quality, label):
        frames = strip_frames.StripFrames(scene, strip, depth, quality)
        times = []
        log = _RenderLog(f"P2V Z pass of {strip.name}").start()
        try:
            frames.open()
            for index in range(len(frames)):
                began = time.perf_counter()
                rgb = frames.read(index)
                z = frames.read_depth(index)
                times.append(time.perf_counter() - began)
                np.save(
                    os.path.join(out["folder"], f"{label}_rgb_{index}.npy"),
                    np.frombuffer(rgb, np.uint8).reshape(frames.height, frames.width, 3),
                )
                if z is not None:
                    np.save(
                        os.path.join(out["folder"], f"{label}_z_{index}.npy"),
                        np.frombuffer(z, "<f4").reshape(frames.height, frames.width),
                    )
        finally:
            log.stop()
            frames.close()
        out[label] = {"count": len(frames), "seconds": times, "renders": log.renders}

    geo = compat.all_strips(editor)["geo"]
    grab(geo, "zpass", "preview", "preview")
    grab(geo, "zpass", "scene", "scene")
    grab(geo, "estimate", "preview", "sequencer")
    grab(compat.all_strips(editor)["geo_placed"], "zpass", "preview", "placed")
    grab(compat.all_strips(editor)["geo_reverse"], "zpass", "preview", "reverse")
    if "geo_retimed" in compat.all_strips(editor):
        grab(compat.all_strips(editor)["geo_retimed"], "zpass", "preview", "retimed")
    shown = bpy.data.scenes["Geo"]
    out["geo_samples"] = {"cycles": shown.cycles.samples, "eevee": shown.eevee.taa_render_samples}
    denoising = shown.cycles.use_denoising
    shown.cycles.use_denoising = True  # as a user would set it (restored below): the preview turns it off
    try:
        out["denoising_scene"] = shown.cycles.use_denoising
        grab(geo, "zpass", "preview", "preview_denoising_scene")
    finally:
        shown.cycles.use_denoising = denoising
    for label, names in (("workbench", ("BLENDER_WORKBENCH",)), ("eevee", compat.EEVEE_ENGINES)):
        previous = shown.render.engine
        try:
            for name in names:
                try:
                    shown.render.engine = name  # as a user would choose it (restored below)
                    break
                except TypeError:  # not this version's name for it
                    continue
            grab(geo, "zpass", "preview", label)
        finally:
            shown.render.engine = previous
    out["settings_changes"] = _state_changes(state_before, _zpass_state())
    return out


def scenario_zpass_problems():
    """The add-on's checks of a Z pass on small arrays: background by clip end or +inf, bad values."""
    import numpy as np

    strip_frames = mod("strip_frames")
    cases = {
        "clip_end": [[5.0, 100.07], [100.07, 5.0]],  # Eevee writes the camera's far clip where nothing is
        "inf": [[5.0, float("inf")], [float("inf"), 5.0]],
        "nan": [[5.0, float("nan")], [10.0, 5.0]],
        "neginf": [[5.0, float("-inf")], [10.0, 5.0]],
        "zero": [[5.0, 0.0], [10.0, 5.0]],
        "all_background": [[1e10, float("inf")], [100.5, 1e10]],
    }
    out = {}
    for name, values in cases.items():
        z, problem = strip_frames.zpass_problem(np.array(values, dtype=np.float32), 100.0)
        out[name] = {
            "problem": problem,
            "background": [float(z[0, 1]), float(z[1, 0])] if problem is None else None,
            "surface": float(z[0, 0]) if problem is None else None,
        }
    return out


def scenario_video_output():
    """A Sequencer scene set to render a video: its copies still render PNG frames (5.0 needs the
    image settings' media type changed before the format)."""
    zpass_setup()
    compat, strip_frames = mod("compat"), mod("strip_frames")
    scene = bpy.data.scenes["Edit"]
    settings = scene.render.image_settings
    saved = (getattr(settings, "media_type", None), settings.file_format)
    if saved[0] is not None:
        settings.media_type = "VIDEO"
    else:
        settings.file_format = "FFMPEG"
    out = {"format": settings.file_format}
    try:
        for name, depth in (("img", "estimate"), ("geo", "zpass")):
            frames = strip_frames.StripFrames(scene, compat.all_strips(scene.sequence_editor)[name], depth)
            try:
                frames.open()
                out[name] = [len(frames.read(0)), None if frames.read_depth(0) is None else len(frames.read_depth(0))]
            finally:
                frames.close()
        out["format_after"] = settings.file_format
    finally:
        if saved[0] is not None:
            settings.media_type = saved[0]
        settings.file_format = saved[1]
    return out


def scenario_zpass_panel():
    panel = mod("panel")
    scene = bpy.data.scenes["Edit"]
    zpass_setup()
    scene.sequence_editor.active_strip = mod("compat").all_strips(scene.sequence_editor)["geo"]
    scene.p2v.depth = "zpass"
    try:
        drawn = draw(panel.SEQUENCER_PT_p2v, bpy.context)
    finally:
        scene.p2v.depth = "estimate"
    estimate = draw(panel.SEQUENCER_PT_p2v, bpy.context)
    operators = mod("operators")
    scene.sequence_editor.active_strip = mod("compat").all_strips(scene.sequence_editor)["img"]
    scene.p2v.depth = "zpass"
    try:
        image_reason = operators.unavailable_reason(bpy.context)
    finally:
        scene.p2v.depth = "estimate"
    return {
        "zpass": drawn,
        "estimate": estimate,
        "image_reason": image_reason,
        "image_reason_estimate": operators.unavailable_reason(bpy.context),
        "items": [item.identifier for item in scene.p2v.bl_rna.properties["zpass_render"].enum_items],
        "default": scene.p2v.zpass_render,
    }


def scenario_zpass_operator():
    """``bpy.ops.sequencer.p2v_edit()`` with the scene's Depth set to Z pass (echo runtime)."""
    zpass_setup()
    prefs = mod("preferences").addon_preferences()
    scene = bpy.data.scenes["Edit"]
    editor = scene.sequence_editor
    compat = mod("compat")
    values = settings()
    props = scene.p2v
    for name in ("prompt", "source_prompt", "steps", "size"):
        setattr(props, name, values[name])
    props.depth, props.zpass_render = "zpass", "scene"
    prefs.python = CONFIG["runtime_python"]
    prefs.model, prefs.captioner, prefs.device = values["model"], values["captioner"], "cpu"
    prefs.cache_dir = values["cache_dir"]
    state_before = _zpass_state()
    editor.active_strip = compat.all_strips(editor)["geo"]
    before = snapshot()
    operators, jobs = mod("operators"), []  # the job the operator makes, to read its stats afterwards
    build_job = operators.build_job
    operators.build_job = lambda *args, **kwargs: jobs.append(build_job(*args, **kwargs)) or jobs[-1]
    log = _RenderLog("P2V Z pass of geo").start()
    try:
        result = bpy.ops.sequencer.p2v_edit()
    finally:
        log.stop()
        operators.build_job = build_job
        props.depth, props.zpass_render = "estimate", "preview"
    after = snapshot()
    new = [name for name in after["strips"] if name not in before["strips"]]
    length = after["strips"][new[0]]["frame_final_duration"] if new else None
    for name in new:
        compat.strips(editor).remove(compat.all_strips(editor)[name])
    return {
        "result": sorted(result),
        "new": new,
        "length": length,
        "settings_changes": _state_changes(state_before, _zpass_state()),
        "depth_source": [job.stats.get("depth_source") for job in jobs],
        "rendered_samples": [render["rendered_samples"] for render in log.renders],
    }


def scenario_zpass_save_blend():
    """Save a copy of the file with the Z-pass strips, for the headless script."""
    zpass_setup()
    path = os.path.join(CONFIG["work"], "zpass.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path, copy=True)
    return {"blend": path}


ZPASS_SCENARIOS = {
    "zpass_setup": zpass_setup,
    "zpass_frames": scenario_zpass_frames,
    "zpass_problems": scenario_zpass_problems,
    "zpass_record": lambda: zpass_edit("geo", recording_runtime(), prompt=CONFIG["record_prompt"], size=128)(),
    "zpass_local": zpass_edit("geo", zpass_render="scene"),
    "zpass_echo": lambda: zpass_edit("geo", echo_runtime())(),
    "zpass_cancel": scenario_zpass_cancel,
    "zpass_error_mid_render": scenario_zpass_error_mid_render,
    "zpass_panel": scenario_zpass_panel,
    "video_output": scenario_video_output,
    "zpass_operator": scenario_zpass_operator,
    "zpass_save_blend": scenario_zpass_save_blend,
    "bad_zpass_self": zpass_bad("self"),
    "bad_zpass_no_camera": zpass_bad("nocam_z"),
    "bad_zpass_all_background": lambda: zpass_bad("empty", runtime_config=echo_runtime())(),
    "bad_zpass_nan": lambda: zpass_bad("geo", patch=_inject("nan"), runtime_config=echo_runtime())(),
    "bad_zpass_neginf": lambda: zpass_bad("geo", patch=_inject("neginf"), runtime_config=echo_runtime())(),
    "bad_zpass_movie": zpass_bad("mov"),
    "bad_zpass_sequencer_input": zpass_bad("seqinput"),
    "zpass_placed": lambda: zpass_edit("geo_placed", echo_runtime())(),
}


SCENARIOS = {
    "image": edit_scenario("img"),
    "movie": edit_scenario("mov"),
    "scene": edit_scenario("shot"),
    "echo_image": lambda: edit_scenario("img", runtime_config=echo_runtime())(),
    "echo_movie": lambda: edit_scenario("mov", runtime_config=echo_runtime())(),
    "echo_scene": lambda: edit_scenario("shot", runtime_config=echo_runtime())(),
    "cancel": scenario_cancel,
    "crash": scenario_crash,
    "second_edit": scenario_second_edit,
    "warm_reuse": scenario_warm_reuse,
    "remote_ok": scenario_remote_ok,
    "remote_wrong_token": scenario_remote_wrong_token,
    "remote_refused": scenario_remote_refused,
    "bad_no_strip": bad_input(None),
    "bad_sound": bad_input("snd"),
    "bad_text": bad_input("txt"),
    "bad_color": bad_input("block"),
    "bad_meta": bad_input("meta"),
    "bad_movie_missing": bad_input("gone"),
    "bad_image_holes": bad_input("holes"),
    "bad_scene_no_camera": bad_input("nocam"),
    "bad_too_long": bad_input("img", max_frames=3),
    "long_confirmed_check": lambda: {"max_frames_ok": _long_confirmed()},
    "bad_no_channel": bad_input("top"),
    "bad_output_dir": bad_input("img", setup=no_output_dir_setup, cleanup=no_output_dir_cleanup),
    "bad_python_missing": lambda: bad_input("img", runtime_config=runtime(python="/nonexistent/bin/python3"))(),
    "bad_python_lacks_runtime": lambda: bad_input("img", runtime_config=runtime(python=CONFIG["base_python"]))(),
    "bad_empty_prompt": lambda: bad_input("img", settings_values=settings(prompt="  "))(),
    "bad_zpass_image": bad_input("img", depth="zpass"),
    "bad_model_missing": lambda: bad_input(
        "img", settings_values=settings(model=os.path.join(CONFIG["work"], "no-such-model"))
    )(),
    "unwritable_probe": scenario_unwritable_probe,
    "unsaved_file": scenario_unsaved_file,
    "release": scenario_release,
    "panel_draw": scenario_panel_draw,
    "schema_walk": scenario_schema_walk,
    "placed_image": scenario_placed_image,
    "muted_source": scenario_muted_source,
    "naming": scenario_naming,
    "workflow": scenario_workflow,
    "operator_poll": scenario_operator_poll,
    "operator_run": scenario_operator_run,
    "operator_in_override": scenario_operator_in_override,
    "modal_loop": scenario_modal_loop,
    "check_runtime": scenario_check_runtime,
    "setup_fails": scenario_setup_fails_cleanly,
    "register_twice": scenario_register_twice,
}


SCENARIOS.update(ZPASS_SCENARIOS)


def echo_runtime():
    """The runtime's echo runner: each frame comes back unchanged (checks what was sent)."""
    return runtime(serve_args=("--job-runner", "echo"))


def _long_confirmed():
    job = make_job("img", max_frames=3, confirmed=True, runtime_config=echo_runtime())
    return run_job(job)["state"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args(sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:])
    with open(args.config, encoding="utf-8") as handle:
        CONFIG.update(json.load(handle))
    results = {"blender": bpy.app.version_string}
    started = time.monotonic()
    result = bpy.ops.extensions.package_install_files(
        filepath=CONFIG["zip"], repo="user_default", enable_on_install=True
    )
    results["install"] = sorted(result)
    results["enabled"] = ADDON in bpy.context.preferences.addons
    blend = CONFIG.get("blend") or os.path.join(CONFIG["work"], "edit.blend")
    build_blend(blend, CONFIG["media"])
    results["strips"] = sorted(strips_state(bpy.data.scenes["Edit"]))
    for name in CONFIG["scenarios"]:
        began = time.monotonic()
        try:
            outcome = SCENARIOS[name]()
        except Exception:  # noqa: BLE001 - a scenario records what went wrong
            outcome = {"exception": traceback.format_exc()}
        if isinstance(outcome, dict):
            outcome["scenario_seconds"] = round(time.monotonic() - began, 2)
        results[name] = outcome
        print(f"scenario {name}: {time.monotonic() - began:.1f} s", flush=True)
    mod("runtime_process").release()
    results["total_seconds"] = round(time.monotonic() - started, 2)
    with open(CONFIG["out"], "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
