"""Edit strips of a .blend with Pix2Video, without Blender's UI.

    blender -b file.blend --python scripts/p2v_blender.py -- --strip NAME [--strip NAME ...] [--prompt "..."]
    blender -b file.blend --python scripts/p2v_blender.py -- --all-selected [--prompt "..."] [options]
    python scripts/p2v_blender.py --blend file.blend --strip NAME [--prompt "..."] [options]

The last form needs a Python with the ``bpy`` module (``pip install bpy``). All run the
add-on's own job code (the enabled Pix2Video add-on when Blender has one, else the copy in this
checkout): the strip's frames go to the runtime, the edited frames into a new image strip above
it, exactly as with the Edit Strip button. Prints progress lines on stdout (on a pool runtime,
the job's place in its queue too).

Several strips (``--strip`` repeated, or ``--all-selected``: the selected image, movie and scene
strips in timeline order) are each their own job, one after another on the same runtime, with
the same settings. Every strip is checked before the first one renders (a missing name or a strip
that cannot be edited fails the run at once, changing nothing); a strip that fails later does not
stop the others, and keeps the frames it had.

Exit status: 0 when every frame of every strip arrived; 1 when an edit failed or was refused (one
line ``p2v_blender: error: ...`` on stderr per problem; frames already edited stay as a shorter
strip); 2 for bad arguments or settings; 130 when cancelled (Ctrl+C: the running strip stops, the
ones after it are not started). ``--save`` saves the .blend once at the end, with every new strip
that has frames. ``--stats FILE`` writes the runtime's statistics of the edit; with several strips,
``{"strips": {NAME: {"state", "frames", "message", "stats"}}}``, and ``--save-depth DIR`` then
gets a folder per strip.

Settings: the edit settings are the same as ``p2v edit``'s (generated from the one settings
schema, ``p2v_runtime/settings.py``), plus ``--depth estimate|zpass`` and ``--zpass-render``;
each option given here wins over the scene's saved Pix2Video settings, which win over the
add-on preferences and the defaults. The runtime is started with ``--runtime-python`` (default:
``$P2V_RUNTIME_PYTHON``, the add-on's preference, its set-up venv, or this Python), or reached at
``--server HOST:PORT`` with the token from ``--token-file`` or ``$P2V_TOKEN``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from p2v_runtime import settings as schema  # noqa: E402 - standard library only, like the add-on's copy
from p2v_runtime.files import atomic_write_text  # noqa: E402 - standard library only

PROG = "p2v_blender"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Edit strips of a .blend with Pix2Video.", allow_abbrev=False)
    parser.add_argument("--blend", help="the .blend to open (needed when run by plain Python with bpy)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--strip",
        action="append",
        metavar="NAME",
        help="name of the image, movie or scene strip to edit; repeat it to edit several, each as its own job",
    )
    which.add_argument(
        "--all-selected",
        action="store_true",
        help="edit every selected image, movie and scene strip of the scene, in timeline order",
    )
    parser.add_argument("--scene", help="scene that holds the strip (default: the file's current scene)")
    schema.add_arguments(
        parser,
        "blender",
        default_note="default: the scene's Pix2Video settings, then the add-on preferences, then the values shown",
    )
    parser.add_argument("--save", action="store_true", help="save the .blend with the new strip")
    parser.add_argument("--stats", metavar="FILE", help="write the edit's statistics as JSON")
    parser.add_argument(
        "--save-depth",
        metavar="DIR",
        help="write the depth each frame was edited with (16-bit PNG, "
        "the model's size, near = bright), also for --depth zpass",
    )
    parser.add_argument("--runtime-python", help="Python that has p2v_runtime (starts a local runtime)")
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="use a running `p2v serve` instead (or unix:PATH for its --unix)"
    )
    parser.add_argument("--token-file", help="file with the --server token (default: $P2V_TOKEN)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="the CA certificate of a --server started with --tls-cert (connect with TLS)"
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where the edited frames go, a folder per result "
        "(default: the add-on's Output folder, else //p2v/ beside the .blend)",
    )
    parser.add_argument(
        "--max-frames", type=int, default=0, help="refuse strips with more frames than this (0: no limit)"
    )
    parser.add_argument("--yes", action="store_true", help="edit a strip longer than --max-frames anyway")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def script_arguments(argv: list[str]) -> list[str]:
    """Arguments for this script: after ``--`` when Blender runs it, else all but the program name."""
    if "--" in argv:
        return argv[argv.index("--") + 1 :]
    return argv[1:]


def find_addon():
    """The add-on package: the one enabled in Blender, else this checkout's ``blender_addon``."""
    import bpy

    for name in bpy.context.preferences.addons.keys():
        module = sys.modules.get(name)
        info = getattr(module, "bl_info", None) or {}
        if name.rsplit(".", 1)[-1] == "pix2video" or info.get("name") == "Pix2Video":
            try:
                importlib.import_module(f"{name}.job")
                return module, True
            except ImportError:
                continue
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import build_addon  # the checkout's vendored protocol must match the runtime's

    build_addon.vendor()
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module("blender_addon"), False


def say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"{PROG}: {text}", flush=True)


def fail(text: str, code: int = EXIT_FAILED) -> int:
    print(f"{PROG}: error: {' '.join(str(text).split())}", file=sys.stderr, flush=True)
    return code


def run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(script_arguments(argv))
        given = schema.given_values(args, "blender")  # typed values, checked by the schema
    except (UsageError, schema.SettingsError) as exc:
        return fail(exc, EXIT_USAGE)
    try:
        import bpy
    except ImportError as exc:
        return fail(
            f"bpy is not importable ({exc}): run this with Blender (blender -b FILE --python "
            f"{os.path.basename(__file__)} -- ...) or with a Python that has the bpy module",
            EXIT_USAGE,
        )
    if args.blend:
        path = os.path.abspath(args.blend)
        if not os.path.isfile(path):
            return fail(f"--blend {args.blend}: no such file", EXIT_USAGE)
        try:
            bpy.ops.wm.open_mainfile(filepath=path)
        except RuntimeError as exc:
            return fail(f"cannot open {args.blend}: {str(exc).strip().splitlines()[-1]}")
    elif not bpy.data.filepath and not bpy.app.binary_path:
        return fail("give --blend FILE (a Python with bpy starts with an empty file)", EXIT_USAGE)
    if args.save and not bpy.data.filepath:
        return fail("--save needs a saved .blend: open one with --blend or on Blender's command line", EXIT_USAGE)
    # Other jobs may save the same file while this one edits: --save compares with this.
    args.opened = os.stat(bpy.data.filepath) if bpy.data.filepath else None

    addon, enabled = find_addon()
    registered = False
    if not enabled and not hasattr(bpy.types.Scene, "p2v"):
        addon.register()  # scene settings saved in the .blend become readable
        registered = True
    modules = {
        name: importlib.import_module(f"{addon.__name__}.{name}")
        for name in ("job", "errors", "compat", "preferences", "properties", "runtime_process", "blend_save")
    }
    try:
        return _edit(args, given, bpy, modules, enabled)
    finally:
        modules["runtime_process"].release()
        if registered:
            addon.unregister()


def _edit(args, given: dict, bpy, modules: dict, enabled: bool) -> int:
    compat, errors, preferences = modules["compat"], modules["errors"], modules["preferences"]
    runtime_process = modules["runtime_process"]
    scene = bpy.data.scenes.get(args.scene) if args.scene else bpy.context.scene
    if scene is None:
        return fail(f"no scene named {args.scene!r} in {bpy.data.filepath or 'the file'}")
    strips, missing = _chosen_strips(args, scene, compat)
    if not missing and not strips:
        return fail(f"scene '{scene.name}' has no selected image, movie or scene strip (--all-selected)")

    prefs = preferences.addon_preferences() if enabled else None
    properties = modules["properties"]
    try:
        settings = properties.job_settings(scene, prefs, given)
    except properties.schema.SettingsError as exc:
        return fail(exc, EXIT_USAGE)
    try:
        runtime = _runtime_config(args, prefs, preferences, runtime_process)
    except errors.P2VAddonError as exc:
        return fail(exc, EXIT_USAGE)
    output_dir = (
        os.path.abspath(args.output_dir) if args.output_dir else (prefs.output_dir if prefs is not None else "")
    )
    jobs = [
        modules["job"].EditJob(
            scene,
            strip,
            settings,
            runtime,
            output_dir=output_dir,
            max_frames=max(0, args.max_frames),
            confirmed=args.yes,
            save_depth_dir=_depth_dir(args, strip.name, len(strips)),
        )
        for strip in strips
    ]
    # Every strip is checked before the first one renders: a typo in the last name costs nothing.
    problems = list(missing)
    for job in jobs:
        try:
            job.check()
        except errors.P2VAddonError as exc:
            problems.append(_refusal(exc, job.strip.name, errors))
    if problems:
        return _fail_all(problems)

    outcomes = []  # (job, state, strip name): names read now, as a reopening save replaces the strips
    interrupted = False
    for job in jobs:
        if interrupted:
            break
        name = job.strip.name
        state, interrupted = _run_job(job, args, runtime, errors, several=len(jobs) > 1)
        outcomes.append((job, state, name))
    code = _save_and_report(args, bpy, modules, outcomes, len(jobs))
    if code is not None:
        return code
    if len(jobs) == 1 and outcomes:  # one strip: its outcome is the last line, as it always was
        _say_outcome(outcomes[0][0], outcomes[0][1], args)
    states = [state for _, state, _ in outcomes]
    if interrupted or "cancelled" in states:
        return EXIT_CANCELLED
    return EXIT_OK if states.count("done") == len(jobs) else EXIT_FAILED


def _chosen_strips(args, scene, compat) -> tuple[list, list[str]]:
    """The strips to edit (``--strip`` in the order given, or the selected ones in timeline order)
    and a problem line for each name the scene does not have."""
    editor = scene.sequence_editor
    every = compat.all_strips(editor) if editor is not None else {}
    if args.all_selected:
        chosen = [
            s
            for s in (compat.strips(editor) if editor is not None else [])
            if s.select and compat.strip_kind(s) in ("image", "movie", "scene")
        ]
        return sorted(chosen, key=lambda s: (s.frame_final_start, s.channel)), []
    strips, problems = [], []
    names = ", ".join(sorted(s.name for s in every)[:10]) if editor is not None else ""
    for name in dict.fromkeys(args.strip):  # a name given twice is edited once
        strip = every.get(name)
        if strip is None:
            problems.append(
                f"scene '{scene.name}' has no strip named {name!r}" + (f" (it has: {names})" if names else "")
            )
        else:
            strips.append(strip)
    return strips, problems


def _depth_dir(args, strip_name: str, count: int) -> str:
    """--save-depth DIR for one strip; for several, a folder per strip inside it."""
    if not args.save_depth:
        return ""
    folder = os.path.abspath(args.save_depth)
    # A strip's name may hold any character: a folder name of it cannot leave the given folder.
    safe = "".join(c if c.isalnum() or c in " -_.()" else "_" for c in strip_name).strip(" .") or "strip"
    return folder if count == 1 else os.path.join(folder, safe)


def _refusal(exc, strip_name: str, errors) -> str:
    if isinstance(exc, errors.StripTooLong):
        return (
            f"strip '{strip_name}' shows {exc.frames} frames, more than --max-frames {exc.limit}: "
            "pass --yes to edit it anyway (or a smaller --frames range)"
        )
    return str(exc)


def _fail_all(problems: list[str]) -> int:
    for problem in problems:
        fail(problem)
    return EXIT_FAILED


def _run_job(job, args, runtime, errors, several: bool) -> tuple[str, bool]:
    """Start and wait for one strip's job; (its state, whether Ctrl+C stopped the run)."""
    strip, settings = job.strip, job.settings
    try:
        job.start()
    except errors.P2VAddonError as exc:
        job.message = _refusal(exc, strip.name, errors)
        if several:
            fail(job.message)
        return "failed", False
    with_depth = f", depth: Z pass ({settings.zpass_render})" if settings.depth == "zpass" else ""
    say(
        f"editing {job.total} frame(s) of strip '{strip.name}' at {job.frames.width}x{job.frames.height} "
        f"on {runtime.describe()}{with_depth}",
        args.quiet,
    )
    prefix = f"'{strip.name}': " if several else ""
    last = {"line": None, "at": 0.0, "frames": -1, "stage": None}

    def report(current):
        stage = current.stage_text
        line = f"{prefix}{current.progress:6.1%} ({current.frames_done}/{current.total} frames, {stage})"
        now = time.monotonic()
        news = current.frames_done != last["frames"] or stage != last["stage"]  # a queue place, a new stage
        if line != last["line"] and (now - last["at"] > 0.5 or news):
            say(line, args.quiet)
            last.update(line=line, at=now, frames=current.frames_done, stage=stage)

    interrupted = False
    try:
        state = job.wait(on_poll=report)
    except KeyboardInterrupt:
        interrupted = True
        job.cancel()
        state = job.wait()
    if several:
        _say_outcome(job, state, args)
    return state, interrupted


def _say_outcome(job, state: str, args) -> None:
    if state == "done":
        say(job.message, args.quiet)
    elif job.message:
        fail(job.message)


def _save_and_report(args, bpy, modules, outcomes, count: int) -> int | None:
    """--save (once, every result strip with frames) and --stats; an exit status if saving failed."""
    errors = modules["errors"]
    kept = [job for job, _, _ in outcomes if job.output is not None and job.frames_done]
    if kept and args.save:
        path = bpy.data.filepath
        opened = (args.opened.st_mtime_ns, args.opened.st_size, args.opened.st_ino)
        try:
            how = modules["blend_save"].save_with_results(path, opened, [job.output.spec() for job in kept])
        except errors.P2VAddonError as exc:
            folders = ", ".join(job.output.folder for job in kept)
            return fail(f"{exc} (the edited frames are in {folders})")
        say(f"{how}: {path}", args.quiet)
    if args.stats:
        if count == 1:  # one strip: its statistics, as the runtime reports them
            document = outcomes[0][0].stats if outcomes and outcomes[0][0].stats else None
        else:
            document = {
                "strips": {
                    name: {
                        "state": state,
                        "frames": job.frames_done,
                        "message": job.message,
                        "stats": job.stats or None,
                    }
                    for job, state, name in outcomes
                }
            }
        if document is not None:
            atomic_write_text(args.stats, json.dumps(document, indent=2) + "\n")
    if count > 1:
        done = sum(state == "done" for _, state, _ in outcomes)
        say(f"{done} of {count} strip(s) edited", args.quiet)
    return None


def _runtime_config(args, prefs, preferences, runtime_process):
    if args.server:
        if args.server.startswith("unix:"):
            host, port = args.server, "0"
        else:
            host, _, port = args.server.rpartition(":")
            if not host or not port.isdigit():
                raise preferences_error(preferences, f"--server {args.server}: expected HOST:PORT or unix:PATH")
        token = os.environ.get("P2V_TOKEN", "").strip()
        if args.token_file:
            try:
                with open(args.token_file, encoding="utf-8") as handle:
                    token = handle.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or exc)
                raise preferences_error(preferences, f"cannot read --token-file {args.token_file}: {why}") from None
        config = runtime_process.RuntimeConfig(
            mode="REMOTE", host=host.strip("[]"), port=int(port), token=token, tls_ca=args.tls_ca or ""
        )
    else:
        config = preferences.runtime_config(prefs)
        config.mode = "LOCAL"
        config.python = (
            args.runtime_python or os.environ.get("P2V_RUNTIME_PYTHON", "") or config.python or sys.executable
        )
        config.idle_timeout = 300.0
    # Messages name what a script can change, not the add-on's preferences.
    config.python_hint = "--runtime-python (or $P2V_RUNTIME_PYTHON)"
    config.server_hint = "--server HOST:PORT"
    config.token_hint = "the token in --token-file (or $P2V_TOKEN)"
    config.tls_hint = "--tls-ca"
    return config


def preferences_error(preferences, message):
    from importlib import import_module

    return import_module(f"{preferences.__package__}.errors").P2VAddonError(message)


def main() -> int:
    return run(sys.argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
