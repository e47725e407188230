"""``p2v serve`` on the command line: its arguments, the token, the ready line, signals.

``--job-runner`` is hidden: tests and benchmarks pass ``echo`` to run without a model. Nothing a
client sends can choose the runner, and the echo runner is imported only when asked for.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading

from .. import protocol as P
from ..errors import P2VError
from .job import JobRunner, edit_job_runner
from .server import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, Server, is_loopback

log = logging.getLogger("p2v.serve")

JOB_RUNNERS = ("edit", "echo")  # --job-runner choices; "echo" is for tests and benchmarks


def runner_named(name: str) -> JobRunner:
    """The runner ``--job-runner name`` selects."""
    if name == "echo":
        from .echo import echo_job_runner

        return echo_job_runner
    return edit_job_runner


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on; 0 picks a free one (see the ready line)"
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; needs a token from P2V_TOKEN or --token-file",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds with no job and no message from any client",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the token clients must send (default: $P2V_TOKEN, else a random one on loopback)",
    )
    parser.add_argument(
        "--spool-dir", default=None, help="folder for job folders of spooled frames (default: the temp folder)"
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        metavar="S",
        help="close a connection that stalls mid-message or sends no hello for S seconds",
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=DEFAULT_FRAME_TIMEOUT,
        metavar="S",
        help="cancel a job whose client sends no frame for S seconds mid-upload",
    )
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--job-runner", choices=JOB_RUNNERS, default="edit", help=argparse.SUPPRESS)


def _read_token(args) -> tuple[str | None, str | None]:
    """(token, error). The token never comes from the command line, only a file or the environment."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            return None, f"cannot read --token-file {path}: {exc.strerror or exc}"
        if not token:
            return None, f"--token-file {path} is empty"
        return token, None
    return os.environ.get("P2V_TOKEN", "").strip() or None, None


def serve_main(args: argparse.Namespace) -> int:
    """``p2v serve``: print the ready line on stdout, log to stderr, serve until stopped."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("p2v serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    token, problem = _read_token(args)
    if problem:
        print(f"p2v serve: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        if not args.allow_remote:
            print(
                f"p2v serve: refusing to listen on {args.host!r}, which is not a loopback address: "
                "pass --allow-remote and set P2V_TOKEN or --token-file",
                file=sys.stderr,
            )
            return 2
        if token is None:
            print(
                f"p2v serve: refusing to listen on {args.host!r} without a token: set P2V_TOKEN or --token-file",
                file=sys.stderr,
            )
            return 2
    generated = token is None
    if generated:
        token = secrets.token_urlsafe(32)
    for name, value in (
        ("--read-timeout", args.read_timeout),
        ("--frame-timeout", args.frame_timeout),
        ("--idle-timeout", args.idle_timeout),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            print(f"p2v serve: {name} must be a positive number of seconds, got {value}", file=sys.stderr)
            return 2
    server = Server(
        args.host,
        args.port,
        token=token,
        job_runner=runner_named(args.job_runner),
        allow_remote=args.allow_remote,
        read_timeout=args.read_timeout,
        frame_timeout=args.frame_timeout,
        idle_timeout=args.idle_timeout,
        spool_dir=args.spool_dir,
        max_connections=max(1, args.max_connections),
    )
    try:
        host, port = server.bind()
    except (OSError, P2VError) as exc:
        print(f"p2v serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.stop())
    ready = {"event": "ready", "host": host, "port": port, "pid": os.getpid(), "protocol": P.PROTOCOL_VERSION}
    if generated:
        ready["token"] = token  # only reachable on loopback: remote binds refuse to start without one
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    server.serve_forever()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2v serve", description="Run the Pix2Video runtime server.")
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))
