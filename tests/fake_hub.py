"""A local stand-in for the Hugging Face hub: the URL layout huggingface_hub talks to, over HTTP on 127.0.0.1.

Tests point ``HF_ENDPOINT`` (or ``hub_endpoint()``'s environment) at it, so the project's fetch goes
through the real huggingface_hub client: ``GET /api/models/{id}[/revision/{rev}]`` with file sizes,
``HEAD`` and ``GET /{id}/resolve/{rev}/{path}`` with ETag, commit and size headers and byte ranges.
Each repository is a folder (or a dict of name -> bytes). A test can slow a file down, hold it at a
gate, or cut the connection once part-way through; every request is logged.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Behaviour:
    """How one file is served: throttled, held at a gate after some bytes, or cut once."""

    chunk: int = 64 * 1024
    delay: float = 0.0  # seconds between chunks
    gate_after: int | None = None  # bytes sent, then wait for ``gate``
    gate: threading.Event = field(default_factory=threading.Event)
    reached_gate: threading.Event = field(default_factory=threading.Event)
    cut_after: int | None = None  # bytes sent, then close the connection (once)


@dataclass
class Request:
    method: str
    path: str
    range: str | None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.behaviour: dict[tuple[str, str], Behaviour] = {}
        self.log: list[Request] = []
        self._server = None
        self._thread = None

    # -- set-up -----------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, extra: dict[str, bytes] | None = None) -> str:
        """Serve ``files`` (a folder's files, or name -> bytes) as ``repo_id``; returns its commit."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        files = dict(files, **(extra or {}))
        self.repos[repo_id] = files
        digest = hashlib.sha1((repo_id + "".join(sorted(files))).encode()).hexdigest()
        self.commits[repo_id] = digest
        return digest

    def serve(self, repo_id: str, name: str, **behaviour) -> Behaviour:
        self.behaviour[(repo_id, name)] = Behaviour(**behaviour)
        return self.behaviour[(repo_id, name)]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """The files GET-requested (with their body sent), in order."""
        found = []
        for request in self.log:
            match = _RESOLVE.match(request.path)
            if request.method == "GET" and match and (repo_id is None or match.group(1) == repo_id):
                found.append(match.group(3))
        return found

    # -- the server ---------------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for behaviour in self.behaviour.values():
            behaviour.gate.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handle(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.log.append(Request(handler.command, path, handler.headers.get("Range")))
        api = _API.match(path)
        if api:
            return self._model_info(handler, api.group(1), body)
        resolve = _RESOLVE.match(path)
        if resolve:
            return self._file(handler, resolve.group(1), resolve.group(2), resolve.group(3), body)
        _reply(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)

    def _model_info(self, handler, repo_id: str, body: bool) -> None:
        if repo_id not in self.repos:
            return _reply(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        siblings = []
        for name, data in self.repos[repo_id].items():
            entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if len(data) > 1000:
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        info = {"id": repo_id, "modelId": repo_id, "sha": self.commits[repo_id], "private": False, "siblings": siblings}
        _reply(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, handler, repo_id: str, revision: str, name: str, body: bool) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            return _reply(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        if revision not in ("main", self.commits[repo_id]):
            return _reply(handler, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        if name not in files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commits[repo_id]}
            return _reply(handler, 404, b"{}", headers, body)
        data = files[name]
        headers = {
            "X-Repo-Commit": self.commits[repo_id],
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = 0
        wanted = handler.headers.get("Range")
        status = 200
        if wanted and body:
            start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        if not body:
            return _reply(handler, 200, b"", dict(headers, **{"Content-Length": str(len(data))}), False)
        behaviour = self.behaviour.get((repo_id, name))
        handler.send_response(status)
        for key, value in dict(headers, **{"Content-Length": str(len(payload))}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if behaviour is None:
            handler.wfile.write(payload)
            return
        sent = 0
        while sent < len(payload):
            if behaviour.cut_after is not None and start + sent >= behaviour.cut_after:
                behaviour.cut_after = None  # once
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            if behaviour.gate_after is not None and start + sent >= behaviour.gate_after:
                behaviour.reached_gate.set()
                behaviour.gate.wait(60)
                behaviour.gate_after = None
            piece = payload[sent : sent + behaviour.chunk]
            try:
                handler.wfile.write(piece)
                handler.wfile.flush()
            except OSError:  # the client went away (interrupted)
                return
            sent += len(piece)
            if behaviour.delay:
                time.sleep(behaviour.delay)


_API = re.compile(r"^/api/models/([^/]+/[^/]+|[^/]+?)(?:/revision/[^/]+)?/?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _reply(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    if "Content-Length" not in headers:
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
        handler.wfile.write(data)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
