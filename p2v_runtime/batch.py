"""``p2v batch FILE``: many clips, each edited as ``p2v edit`` edits one, from a TOML or JSON file.

The whole file is checked before anything starts (every problem is one line, exit status 2), so a
farm job fails at once rather than after the first shots. Locally the clips are edited one after
another (the models stay loaded); with ``--server`` each clip is its own job on its own connection,
up to ``--parallel`` at once: a pool (``p2v serve --ray``) queues them, and a plain runtime's
``busy`` is waited out and tried again. A failed clip does not stop the others; Ctrl+C cancels the
running ones and keeps every frame already written.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings as schema
from .errors import USER_ERRORS, EditCancelled, P2VError
from .files import atomic_write_text
from .progress import ProgressBars
from .protocol import E_BUSY, E_TOO_MANY, EditStats

PROG = "p2v batch"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
PATH_KEYS = ("input", "out", "depth", "save_depth")
CLIP_KEYS = ("name", *PATH_KEYS)
# Settings a clip or the defaults may give: those of p2v edit, by their schema names.
SETTING_KEYS = tuple(f.name for f in schema.fields_for("cli"))
RETRY_CODES = (E_BUSY, E_TOO_MANY)  # a plain runtime runs one job at a time: wait, then try again
RETRY_FIRST, RETRY_MOST = 0.5, 5.0  # seconds between tries, doubling


class BatchFileError(Exception):
    """The batch file cannot run; ``problems`` are one line each."""

    def __init__(self, problems: list[str]):
        super().__init__(problems[0])
        self.problems = problems


@dataclass
class Clip:
    name: str
    input: Path
    out: Path
    settings: schema.EditSettings
    frames: Any  # the opened frames (p2v_runtime.frames.FrameSource)
    depth: Any = None  # the opened Z pass (DepthFiles), or None
    save_depth: Path | None = None


@dataclass
class Outcome:
    clip: Clip
    state: str = "not started"  # done, failed, cancelled, not started
    frames: int = 0
    seconds: float = 0.0
    error: str = ""
    stats: EditStats = field(default_factory=EditStats)

    def to_dict(self) -> dict:
        return {
            "name": self.clip.name,
            "input": str(self.clip.input),
            "out": str(self.clip.out),
            "state": self.state,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "error": self.error or None,
            "stats": self.stats.to_dict() if self.state != "not started" else None,
        }


# --- the file ------------------------------------------------------------------------------------


def read_file(path: Path) -> dict:
    """The file's table: TOML (``.toml``) or JSON (``.json``); BatchFileError with the parser's place."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise BatchFileError([f"{path}: give a .toml or .json batch file"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchFileError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        if suffix == ".toml":
            values = _toml().loads(data.decode("utf-8"))
        else:
            values = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BatchFileError([f"{path} is not UTF-8 text"]) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise BatchFileError([f"{path} is not valid {suffix[1:].upper()}: {exc}"]) from None
    if not isinstance(values, dict):
        raise BatchFileError([f"{path}: the top level must be a table with 'clips' (and 'defaults')"])
    return values


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise BatchFileError(
                ["reading TOML needs Python 3.11 or the tomli package: install it, or use JSON"]
            ) from None
    return tomllib


def load_batch(path, *, overwrite: bool = False) -> list[Clip]:
    """Every clip of the file, checked and opened; BatchFileError listing every problem found."""
    path = Path(path).expanduser().resolve()
    values = read_file(path)
    problems: list[str] = []
    unknown = sorted(set(values) - {"defaults", "clips"})
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)}: a batch file has 'defaults' and 'clips'")
    defaults = values.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("'defaults' must be a table of edit settings")
        defaults = {}
    wrong = sorted(set(defaults) - set(SETTING_KEYS))
    if wrong:
        problems.append(f"defaults: unknown setting(s) {', '.join(wrong)} ({_settings_hint()})")
        defaults = {k: v for k, v in defaults.items() if k in SETTING_KEYS}
    entries = values.get("clips")
    if not isinstance(entries, list) or not entries:
        problems.append("no clips: give a list 'clips' ([[clips]] in TOML), each with its input and out")
        raise BatchFileError(problems)
    clips: list[Clip] = []
    names: dict[str, str] = {}
    outs: dict[Path, str] = {}
    for number, entry in enumerate(entries, 1):
        clip = _checked_clip(number, entry, defaults, path.parent, overwrite, problems)
        if clip is None:
            continue
        label = f"clip '{clip.name}'"
        if clip.name in names:
            problems.append(f"{label}: the name is used by {names[clip.name]} too: give each clip its own name")
        names.setdefault(clip.name, f"clip {number}")
        if clip.out in outs:
            problems.append(f"{label}: out {clip.out} is also the out folder of {outs[clip.out]}: give each its own")
        outs.setdefault(clip.out, label)
        clips.append(clip)
    inputs = {clip.input: f"clip '{clip.name}'" for clip in clips}
    for clip in clips:
        if clip.out in inputs and inputs[clip.out] != f"clip '{clip.name}'":
            problems.append(
                f"clip '{clip.name}': out {clip.out} is the input of {inputs[clip.out]}; its source frames would be "
                "written over"
            )
    if problems:
        raise BatchFileError(problems)
    return clips


def _checked_clip(number, entry, defaults, base: Path, overwrite: bool, problems: list[str]) -> Clip | None:
    """One clip of the file, opened, or None with its problems added (each naming the clip)."""
    from .frames import open_depth, open_frames
    from .outputs import checked_output_dir

    if not isinstance(entry, dict):
        problems.append(f"clip {number}: must be a table with input and out, got {type(entry).__name__}")
        return None
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        problems.append(f"clip {number}: name must be a non-empty text, got {name!r}")
        name = None
    source = entry.get("input")
    label = f"clip '{name}'" if name else f"clip {number}"
    if name is None and isinstance(source, str) and source.strip():
        name = Path(source).stem or f"clip {number}"
        label = f"clip {number} ('{name}')"
    before = len(problems)
    unknown = sorted(set(entry) - set(CLIP_KEYS) - set(SETTING_KEYS))
    if unknown:
        problems.append(
            f"{label}: unknown key(s) {', '.join(unknown)} (a clip takes {', '.join(CLIP_KEYS)} and {_settings_hint()})"
        )
    paths: dict[str, Path | None] = {}
    for key in PATH_KEYS:
        value = entry.get(key)
        if value is None:
            paths[key] = None
            if key in ("input", "out"):
                problems.append(f"{label}: no {key}: give the {_PATH_MEANING[key]}")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"{label}: {key} must be a path, got {value!r}")
            paths[key] = None
        else:
            paths[key] = (base / Path(value).expanduser()).resolve()
    values = {**defaults, **{k: v for k, v in entry.items() if k in SETTING_KEYS}}
    try:
        settings = schema.EditSettings.from_dict(values)
    except schema.SettingsError as exc:
        problems.append(f"{label}: {exc}")
        settings = None
    frames = depth = out = None
    if paths["input"] is not None:
        try:
            frames = open_frames(paths["input"], settings.frames if settings is not None else None)
        except USER_ERRORS as exc:
            problems.append(f"{label}: {exc}")
    if paths["out"] is not None and paths["input"] is not None:
        try:
            out = checked_output_dir(
                paths["out"],
                paths["input"],
                what=f"{label}: out {paths['out']}",
                depth_dirs=(paths["depth"], paths["save_depth"]),
                overwrite=overwrite,
            )
        except USER_ERRORS as exc:
            problems.append(str(exc))
    if paths["depth"] is not None and frames is not None and settings is not None:
        try:
            depth = open_depth(paths["depth"], len(frames), frames.size, settings.frames)
        except USER_ERRORS as exc:
            problems.append(f"{label}: depth: {exc}")
    if len(problems) > before or settings is None or frames is None or out is None:
        return None
    return Clip(name, paths["input"], out, settings, frames, depth, paths["save_depth"])


_PATH_MEANING = {
    "input": "folder of frames or the video file to edit",
    "out": "folder for the edited frames",
}


def _settings_hint() -> str:
    return "edit settings by their names in the settings schema, e.g. " + ", ".join(SETTING_KEYS[:4]) + ", ..."


# --- running -------------------------------------------------------------------------------------


class Report:
    """Progress lines (stderr, each prefixed with its clip) and one result line per clip (stdout)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._lock = threading.Lock()

    def progress(self, clip: Clip) -> ProgressBars:
        return ProgressBars(not self.quiet, clip.settings.steps, prefix=f"{PROG}: {clip.name}: ", lines=True)

    def waiting(self, clip: Clip, why: str) -> None:
        if not self.quiet:
            self._write(sys.stderr, f"{PROG}: {clip.name}: {why}")

    def finished(self, outcome: Outcome) -> None:
        clip = outcome.clip
        kept = f" ({outcome.frames} frame(s) kept in {clip.out})" if outcome.frames else ""
        if outcome.state == "done":
            text = f"done, {outcome.frames} frame(s) in {outcome.seconds:.1f} s -> {clip.out}"
        elif outcome.state == "failed":
            text = f"failed: {outcome.error}{kept}"
        else:
            text = f"{outcome.state}{kept}"
        self._write(sys.stdout, f"{PROG}: {clip.name}: {text}")

    def _write(self, stream, line: str) -> None:
        with self._lock:
            stream.write(line + "\n")
            stream.flush()


def edit_one(clip: Clip, cancel: threading.Event, report: Report, server: dict | None = None) -> Outcome:
    """Edit one clip into its out folder as ``p2v edit`` does; a runtime's ``busy`` is waited out."""
    from .frames import depth_png_writer
    from .outputs import OutputFolder

    outcome = Outcome(clip)
    out = OutputFolder(clip.out, f"out {clip.out}")
    progress = report.progress(clip)
    started = time.monotonic()
    retry = RETRY_FIRST
    try:
        sink = depth_png_writer(clip.save_depth) if clip.save_depth else None
        while True:
            options = dict(
                depth=clip.depth,
                progress=progress,
                cancel=cancel,
                stats=outcome.stats,
                depth_sink=sink,
                warn=progress.warn,
            )
            if server is not None:
                from .client import edit_on_server

                results = edit_on_server(server["address"], clip.frames, clip.settings, **server["options"], **options)
            else:
                from .editor import edit_clip

                results = edit_clip(clip.frames, clip.settings, **options)
            try:
                out.make()
                for index, rgb in results:
                    out.write(index, rgb)
                break
            except P2VError as exc:
                if server is None or getattr(exc, "code", None) not in RETRY_CODES or out.written:
                    raise
                if retry == RETRY_FIRST:
                    report.waiting(clip, "the runtime is busy with another job; waiting for it")
                if cancel.wait(retry):
                    raise EditCancelled(0) from None
                retry = min(RETRY_MOST, retry * 2)
        outcome.state = "done"
    except EditCancelled:
        outcome.state = "cancelled"
    except USER_ERRORS as exc:
        outcome.state, outcome.error = "failed", " ".join(str(exc).split())
    finally:
        progress.close()
        outcome.frames = out.written
        outcome.seconds = time.monotonic() - started
    return outcome


def run_locally(clips: list[Clip], report: Report, cancel: threading.Event) -> list[Outcome]:
    """One clip after another in this process (the models stay loaded); Ctrl+C stops the batch."""
    outcomes = [Outcome(clip) for clip in clips]
    for number, clip in enumerate(clips):
        try:
            outcomes[number] = edit_one(clip, cancel, report)
        except KeyboardInterrupt:
            cancel.set()
            outcomes[number].state = "cancelled"
            outcomes[number].frames = _frames_in(clip.out)
        report.finished(outcomes[number])
        if cancel.is_set():
            break
    return outcomes


def run_on_server(clips: list[Clip], report: Report, cancel: threading.Event, server: dict, parallel: int):
    """Each clip its own job and connection, ``parallel`` at once, reported as each finishes.

    Ctrl+C cancels the running jobs (each stops within a denoising step) and waits for them; a
    second Ctrl+C stops waiting (closing the connections cancels the jobs too).
    """
    outcomes = [Outcome(clip) for clip in clips]
    waiting: queue.Queue[int] = queue.Queue()
    for number in range(len(clips)):
        waiting.put(number)

    ended: list[threading.Thread] = []

    def work() -> None:
        try:
            while not cancel.is_set():
                try:
                    number = waiting.get_nowait()
                except queue.Empty:
                    return
                outcomes[number].state = "running"
                outcomes[number] = edit_one(clips[number], cancel, report, server)
                report.finished(outcomes[number])
        finally:
            ended.append(threading.current_thread())

    workers = [
        threading.Thread(target=work, name=f"p2v-batch-{n}", daemon=True) for n in range(min(parallel, len(clips)))
    ]
    for worker in workers:
        worker.start()
    interrupted = 0
    # Polled with sleep, not join: a Ctrl+C that interrupts Thread.join can leave is_alive() wrong.
    while len(ended) < len(workers):
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            cancel.set()
            interrupted += 1
            if interrupted > 1:
                break
    for outcome in outcomes:
        if outcome.state == "running":  # still running after a second Ctrl+C
            outcome.state = "cancelled"
            outcome.frames = _frames_in(outcome.clip.out)
    return outcomes


def _frames_in(folder: Path) -> int:
    from .frames import existing_frames

    return len(existing_frames(folder))


# --- the command ---------------------------------------------------------------------------------


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the batch file (.toml or .json): its clips and their settings")
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="run the clips as jobs on a running `p2v serve` (or unix:PATH)"
    )
    parser.add_argument(
        "--parallel",
        metavar="N",
        type=_positive,
        help="with --server: at most N jobs at once (default: all of them; a pool queues them)",
    )
    parser.add_argument("--token-file", metavar="FILE", help="with --server: file with the token (default: $P2V_TOKEN)")
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="with --server: connect with TLS, trusting the runtime's certificate by this CA",
    )
    parser.add_argument("--stats", metavar="FILE", help="write every clip's outcome and statistics as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace frames already in the clips' out folders")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (each clip's result line stays)")
    parser.set_defaults(handler=batch_main)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def batch_main(args: argparse.Namespace) -> int:
    for flag, value in (("--parallel", args.parallel), ("--token-file", args.token_file), ("--tls-ca", args.tls_ca)):
        if value is not None and not args.server:
            return _usage(f"{flag} needs --server (a local batch edits one clip after another)")
    server = None
    if args.server:
        from .client import UNIX_PREFIX, parse_address, token_from_env

        if not args.server.startswith(UNIX_PREFIX):
            try:
                parse_address(args.server)
            except ValueError as exc:
                return _usage(f"--server: {exc}")
        try:
            token = token_from_env(args.token_file)
        except OSError as exc:
            return _usage(f"cannot read --token-file {args.token_file}: {exc.strerror or exc}")
        except ValueError as exc:
            return _usage(str(exc))
        server = {"address": args.server, "options": {"token": token, "tls_ca": args.tls_ca}}
    try:
        clips = load_batch(args.file, overwrite=args.overwrite)
    except BatchFileError as exc:
        for problem in exc.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    report = Report(args.quiet)
    cancel = threading.Event()
    where = f"on {args.server}" if server else "here, one after another"
    if not args.quiet:
        print(f"{PROG}: {len(clips)} clip(s), {sum(len(c.frames) for c in clips)} frame(s), {where}", file=sys.stderr)
    if server is None:
        outcomes = run_locally(clips, report, cancel)
    else:
        outcomes = run_on_server(clips, report, cancel, server, args.parallel or len(clips))
    counts = {state: sum(o.state == state for o in outcomes) for state in ("done", "failed", "cancelled")}
    counts["not started"] = len(outcomes) - sum(counts.values())
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n and state != "done")
    print(f"{PROG}: {counts['done']} of {len(outcomes)} clip(s) done" + (f", {summary}" if summary else ""))
    code = EXIT_CANCELLED if cancel.is_set() else (EXIT_OK if counts["done"] == len(outcomes) else EXIT_FAILED)
    if args.stats:
        document = {"clips": [o.to_dict() for o in outcomes], **{k.replace(" ", "_"): n for k, n in counts.items()}}
        try:
            atomic_write_text(args.stats, json.dumps(document, indent=2) + "\n")
        except OSError as exc:
            print(f"{PROG}: error: cannot write --stats {args.stats}: {exc.strerror or exc}", file=sys.stderr)
            return max(code, EXIT_FAILED)
    return code


def _usage(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
