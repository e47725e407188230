"""Edit one strip of a .blend with Pix2Video, without Blender's UI.

    blender -b file.blend --python scripts/p2v_blender.py -- --strip NAME [--prompt "..."] [options]
    python scripts/p2v_blender.py --blend file.blend --strip NAME [--prompt "..."] [options]

The second form needs a Python with the ``bpy`` module (``pip install bpy``). Both run the
add-on's own job code (the enabled Pix2Video add-on when Blender has one, else the copy in this
checkout): the strip's frames go to the runtime, the edited frames into a new image strip above
it, exactly as with the Edit Strip button. Prints progress lines on stdout.

Exit status: 0 when every frame arrived; 1 when the edit failed or was refused (one line
``p2v_blender: error: ...`` on stderr says why; frames already edited stay as a shorter strip);
2 for bad arguments or settings; 130 when cancelled (Ctrl+C). ``--save`` saves the .blend with
the new strip.

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
    parser = _Parser(prog=PROG, description="Edit one strip of a .blend with Pix2Video.", allow_abbrev=False)
    parser.add_argument("--blend", help="the .blend to open (needed when run by plain Python with bpy)")
    parser.add_argument("--strip", required=True, help="name of the image, movie or scene strip to edit")
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
    editor = scene.sequence_editor
    strip = compat.all_strips(editor).get(args.strip) if editor is not None else None
    if strip is None:
        names = ", ".join(sorted(s.name for s in compat.all_strips(editor))[:10]) if editor is not None else ""
        return fail(
            f"scene '{scene.name}' has no strip named {args.strip!r}" + (f" (it has: {names})" if names else "")
        )

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
    job = modules["job"].EditJob(
        scene,
        strip,
        settings,
        runtime,
        output_dir=output_dir,
        max_frames=max(0, args.max_frames),
        confirmed=args.yes,
        save_depth_dir=os.path.abspath(args.save_depth) if args.save_depth else "",
    )
    try:
        job.start()
    except errors.StripTooLong as exc:
        return fail(
            f"strip '{strip.name}' shows {exc.frames} frames, more than --max-frames {exc.limit}: "
            "pass --yes to edit it anyway (or a smaller --frames range)"
        )
    except errors.P2VAddonError as exc:
        return fail(exc)
    with_depth = f", depth: Z pass ({settings.zpass_render})" if settings.depth == "zpass" else ""
    say(
        f"editing {job.total} frame(s) of strip '{strip.name}' at {job.frames.width}x{job.frames.height} "
        f"on {runtime.describe()}{with_depth}",
        args.quiet,
    )

    last = [None, 0.0]

    def report(current):
        line = f"{current.progress:6.1%} ({current.frames_done}/{current.total} frames, {current.stage_text})"
        now = time.monotonic()
        if line != last[0] and (now - last[1] > 0.5 or current.frames_done != getattr(report, "frames", -1)):
            say(line, args.quiet)
            last[0], last[1] = line, now
            report.frames = current.frames_done

    try:
        state = job.wait(on_poll=report)
    except KeyboardInterrupt:
        job.cancel()
        state = job.wait()
    if job.frames_done and args.save:
        blend_save = modules["blend_save"]
        path = bpy.data.filepath
        opened = (args.opened.st_mtime_ns, args.opened.st_size, args.opened.st_ino)
        try:
            how = blend_save.save_with_result(path, opened, job.output.spec())
        except errors.P2VAddonError as exc:
            return fail(f"{exc} (the edited frames are in {job.output.folder})")
        say(f"{how}: {path}", args.quiet)
    if args.stats and job.stats:
        atomic_write_text(args.stats, json.dumps(job.stats, indent=2) + "\n")
    if state == "done":
        say(job.message, args.quiet)
        return EXIT_OK
    return fail(job.message, EXIT_CANCELLED if state == "cancelled" else EXIT_FAILED)


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
