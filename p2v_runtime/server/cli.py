"""``p2v serve`` on the command line: its arguments, the token, the ready line, signals.

``--job-runner`` is hidden: tests and benchmarks pass ``echo`` to run without a model. Nothing a
client sends can choose the runner, and the echo runner is imported only when asked for. So are
``--max-waiting`` and ``--auth-backoff`` (limits tests turn).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import ssl
import sys
import threading

from .. import protocol as P
from ..errors import P2VError
from .job import JobRunner, edit_job_runner
from .paths import PathRules
from .server import (
    DEFAULT_AUTH_BACKOFF,
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_WAITING,
    DEFAULT_READ_TIMEOUT,
    UNIX_PREFIX,
    Server,
    is_loopback,
    unix_sockets_available,
)

log = logging.getLogger("p2v.serve")

JOB_RUNNERS = ("edit", "echo")  # --job-runner choices; "echo" is for tests and benchmarks
MIN_REMOTE_TOKEN_CHARS = 22  # 128 bits as url-safe base64 (``secrets.token_urlsafe(16)``)
MIN_REMOTE_TOKEN_DISTINCT = 10  # a random 22-character token has about 19 different characters


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
        "--unix",
        metavar="PATH",
        default=None,
        help="listen on a Unix socket at PATH (mode 0600: other local users cannot connect) instead of "
        "--host/--port; Linux and macOS",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; needs a strong token from P2V_TOKEN or --token-file (see --new-token)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds with no job and no message from any authenticated client",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the token clients must send, readable by you only (default: $P2V_TOKEN, else a "
        "random one on loopback)",
    )
    parser.add_argument(
        "--new-token",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="print a new random token (256 bits), or write it to FILE with mode 0600, and exit",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="serve TLS with this certificate (PEM; the chain, and the key unless --tls-key); clients "
        "then need --tls-ca",
    )
    parser.add_argument("--tls-key", metavar="FILE", default=None, help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder clients may load model and captioner folders from (repeatable); without it a "
        "loopback runtime loads any folder, a remote-facing one none",
    )
    parser.add_argument(
        "--cache-root",
        metavar="DIR",
        default=None,
        help="the folder a client's --cache-dir must be inside (default: any folder on loopback; the user "
        "cache folder with --allow-remote)",
    )
    parser.add_argument(
        "--allow-downloads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fetch hub models that are not in the Hugging Face cache (default: on for loopback, off with "
        "--allow-remote)",
    )
    parser.add_argument(
        "--spool-dir", default=None, help="folder for job folders of spooled frames (default: the temp folder)"
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        metavar="S",
        help="close a connection that makes no progress mid-message, or takes no result data, for S seconds",
    )
    parser.add_argument(
        "--hello-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"a new connection must finish its hello (and TLS handshake) within S seconds (default "
        f"{DEFAULT_HELLO_TIMEOUT:g}, at most --read-timeout)",
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=DEFAULT_FRAME_TIMEOUT,
        metavar="S",
        help="cancel a job whose client sends no frame for S seconds mid-upload",
    )
    pool = parser.add_argument_group("a pool of devices (Ray)")
    pool.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run jobs on a pool of Ray actors, one per GPU: several clients at once, queued in arrival order; "
        "ADDRESS omitted starts a local Ray cluster, 'auto' joins the one `ray start` runs on this node, or "
        "give the head's host:port (needs the pool extra: pip install 'p2v-runtime[pool]')",
    )
    pool.add_argument(
        "--actors",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: the number of actors (default: one per GPU of the cluster; without GPUs, one per node)",
    )
    pool.add_argument(
        "--actor-threads",
        type=int,
        default=None,
        metavar="N",
        help="with --ray on a cluster without GPUs: CPU threads (and Ray CPUs) per actor (default: the "
        "cluster's CPUs shared out)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help=f"clients connected at once, each with a job running or queued (default {DEFAULT_MAX_CONNECTIONS}; "
        "with --ray at least twice the actors)",
    )
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, help=argparse.SUPPRESS)
    parser.add_argument("--auth-backoff", type=float, default=DEFAULT_AUTH_BACKOFF, help=argparse.SUPPRESS)
    parser.add_argument("--job-runner", choices=JOB_RUNNERS, default="edit", help=argparse.SUPPRESS)


def _read_token(args) -> tuple[str | None, str | None]:
    """(token, error). The token never comes from the command line, only a file or the environment."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            with open(path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                data = handle.read()
        except OSError as exc:
            return None, f"cannot read --token-file {path}: {exc.strerror or exc}"
        if os.name != "nt" and mode & 0o066:
            return None, (
                f"--token-file {path} can be read or changed by other users (mode {mode & 0o777:04o}): chmod 600 {path}"
            )
        try:
            token = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, f"--token-file {path} is not UTF-8 text: write the token as plain text (see --new-token)"
        if not token:
            return None, f"--token-file {path} is empty"
        return token, None
    token = os.environ.get("P2V_TOKEN", "").strip()
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        return None, "P2V_TOKEN is not UTF-8 text: set it to plain text (see --new-token)"
    return token or None, None


def remote_token_problem(token: str) -> str | None:
    """Why ``token`` is too weak for a server other machines can reach; None when it will do."""
    if len(token) < MIN_REMOTE_TOKEN_CHARS:
        return (
            f"it has {len(token)} characters; a runtime other machines can reach needs at least "
            f"{MIN_REMOTE_TOKEN_CHARS} (128 bits as url-safe base64)"
        )
    if len(set(token)) < MIN_REMOTE_TOKEN_DISTINCT:
        return "it repeats a few characters; use a random one"
    return None


def new_token_main(destination: str) -> int:
    """``p2v serve --new-token [FILE]``: a random token on stdout, or in a new file only this user can read."""
    token = secrets.token_urlsafe(32)
    if destination == "-":
        print(token)
        return 0
    try:
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"p2v serve: {destination} already exists; remove it or choose another file", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"p2v serve: cannot write {destination}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    print(
        f"p2v serve: wrote a new token to {destination} (readable by you only); start with --token-file {destination}",
        file=sys.stderr,
    )
    return 0


def _tls_context(args) -> tuple[ssl.SSLContext | None, str | None]:
    if not args.tls_cert:
        return None, ("--tls-key needs --tls-cert" if args.tls_key else None)
    try:
        return P.tls_server_context(args.tls_cert, args.tls_key), None
    except FileNotFoundError as exc:
        return None, f"cannot read the TLS certificate or key: {exc.filename or exc}: {exc.strerror}"
    except (ssl.SSLError, OSError, ValueError) as exc:
        return None, f"cannot use --tls-cert {args.tls_cert} and --tls-key {args.tls_key}: {exc}"


def _fail(message: str) -> int:
    print(f"p2v serve: {message}", file=sys.stderr)
    return 2


def serve_main(args: argparse.Namespace) -> int:
    """``p2v serve``: print the ready line on stdout, log to stderr, serve until stopped."""
    if getattr(args, "new_token", None) is not None:
        return new_token_main(args.new_token)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("p2v serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    token, problem = _read_token(args)
    if problem:
        return _fail(problem)
    if args.unix is not None:
        if not unix_sockets_available():
            return _fail("--unix needs Unix sockets, which this system does not have: use --host and --port")
        if args.allow_remote or args.host != "127.0.0.1" or args.port != 0:
            return _fail("--unix serves this machine's user only: drop --host, --port and --allow-remote")
        if args.tls_cert or args.tls_key:
            return _fail("--unix is local and needs no TLS: drop --tls-cert and --tls-key")
    remote = args.unix is None and not is_loopback(args.host)
    if remote:
        if not args.allow_remote:
            return _fail(
                f"refusing to listen on {args.host!r}, which is not a loopback address: "
                "pass --allow-remote and set P2V_TOKEN or --token-file"
            )
        if token is None:
            return _fail(f"refusing to listen on {args.host!r} without a token: set P2V_TOKEN or --token-file")
        weak = remote_token_problem(token)
        if weak:
            return _fail(
                f"the token is too weak for a runtime other machines can reach: {weak}; "
                "`p2v serve --new-token FILE` makes one"
            )
    generated = token is None
    if generated:
        token = secrets.token_urlsafe(32)
    for name, value in (
        ("--read-timeout", args.read_timeout),
        ("--hello-timeout", args.hello_timeout),
        ("--frame-timeout", args.frame_timeout),
        ("--idle-timeout", args.idle_timeout),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            return _fail(f"{name} must be a positive number of seconds, got {value}")
    tls, problem = _tls_context(args)
    if problem:
        return _fail(problem)
    for folder in args.models_dir:
        if not os.path.isdir(folder):
            return _fail(f"--models-dir {folder} is not a folder")
    for name, value in (("--actors", args.actors), ("--actor-threads", args.actor_threads)):
        if value is not None and value < 1:
            return _fail(f"{name} must be at least 1, got {value}")
        if value is not None and args.ray is None:
            return _fail(f"{name} needs --ray")
    paths = PathRules.for_server(
        remote=remote, models_dirs=args.models_dir, cache_root=args.cache_root, allow_downloads=args.allow_downloads
    )
    if not paths.allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in this process reaches the hub, whatever asks
    pool = None
    if args.ray is not None:
        pool, problem = _start_pool(args)
        if problem:
            return _fail(problem)
    server = Server(
        args.host,
        args.port,
        token=token,
        job_runner=runner_named(args.job_runner),
        allow_remote=args.allow_remote,
        read_timeout=args.read_timeout,
        hello_timeout=args.hello_timeout,
        frame_timeout=args.frame_timeout,
        idle_timeout=args.idle_timeout,
        spool_dir=args.spool_dir,
        max_connections=_max_connections(args, pool),
        max_waiting=max(1, args.max_waiting),
        auth_backoff=max(0.0, args.auth_backoff),
        tls=tls,
        unix_path=args.unix,
        paths=paths,
        pool=pool,
    )
    try:
        return _serve(server, args, generated, tls)
    finally:
        if pool is not None:
            pool.close()


def _max_connections(args, pool) -> int:
    if args.max_connections is not None:
        return max(1, args.max_connections)
    if pool is not None:  # every actor busy and as many jobs queued behind them
        return max(DEFAULT_MAX_CONNECTIONS, 2 * len(pool.actors()))
    return DEFAULT_MAX_CONNECTIONS


def _start_pool(args):
    """(the started pool, None) or (None, why not)."""
    try:
        from ..pool.pool import Pool
    except ImportError as exc:
        return None, f"--ray needs Ray ({exc}): pip install 'p2v-runtime[pool]'"
    pool = Pool(args.ray or None, args.actors, args.actor_threads)
    log.info("starting the pool on %s", f"the Ray cluster at {args.ray}" if args.ray else "a local Ray cluster")
    try:
        log.info("%s", pool.start())
    except P2VError as exc:
        pool.close()
        return None, str(exc)
    return pool, None


def _serve(server: Server, args, generated: bool, tls) -> int:
    token = server.token
    try:
        host, port = server.bind()
    except (OSError, P2VError) as exc:
        where = args.unix if args.unix is not None else f"{args.host}:{args.port}"
        return _fail_bind(where, exc)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.stop())
    if args.unix is not None:
        ready = {"event": "ready", "unix": host, "address": UNIX_PREFIX + host}
    else:
        ready = {"event": "ready", "host": host, "port": port, "address": server.where}
    ready.update(pid=os.getpid(), protocol=P.PROTOCOL_VERSION)
    if tls is not None:
        ready["tls"] = True
    if server.pool is not None:
        ready["actors"] = len(server.pool.actors())
    if generated:
        ready["token"] = token  # only reachable on loopback: remote binds refuse to start without one
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    server.serve_forever()
    log.info("stopped")
    return 0


def _fail_bind(where: str, exc: Exception) -> int:
    print(f"p2v serve: cannot listen on {where}: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2v serve", description="Run the Pix2Video runtime server.")
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))
