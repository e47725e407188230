"""A stand-in for a pool runtime (``p2v serve --ray``) on 127.0.0.1, speaking the wire with
``protocol.py``: it says where each job stands in its queue (``queued``) before editing, then
echoes the frames back. Only the client side of the queue is tested with it; the real pool is
the server's to test."""

from __future__ import annotations

import socket
import threading
import time

from p2v_runtime import protocol as P


class FakePool:
    """Each job is answered ``job_ok``, then ``queued`` with each of ``positions`` (only when the
    job asked with ``queue: true``), then ``received`` per frame, ``progress`` and the frames back,
    then ``done``. ``jobs`` keeps every ``job`` header it was sent. ``wait``: seconds between
    queue places (a real queue moves slowly); ``fail_after``: the first job ends with an ``input``
    error after that many results."""

    def __init__(
        self,
        token: str = "pool-token",
        positions: tuple[int, ...] = (3, 2, 1),
        wait: float = 0.0,
        fail_after: int | None = None,
    ):
        self.token = token
        self.positions = positions
        self.wait = wait
        self.fail_after = fail_after
        self.jobs: list[dict] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> FakePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                hello = P.read_message(sock)
                if hello is None or hello["token"] != self.token:
                    P.send_message(sock, P.error_header(P.E_AUTH, "wrong token", True))
                    return
                P.send_message(
                    sock,
                    {
                        "type": "hello_ok",
                        "protocol": P.PROTOCOL_VERSION,
                        "server": "fake pool",
                        "pid": 1,
                        "busy": False,
                    },
                )
                while True:
                    job = P.read_message(sock)
                    if job is None:
                        return
                    self._job(sock, job)
            except (OSError, P.ProtocolError):
                return

    def _job(self, sock: socket.socket, job: P.Message) -> None:
        self.jobs.append(dict(job.header))
        count, width, height = job["frames"], job["width"], job["height"]
        P.send_message(sock, {"type": "job_ok", "job": f"job-{len(self.jobs)}", "frames": count, "window": 8})
        if job.get("queue"):
            for position in self.positions:
                P.send_message(sock, {"type": "queued", "position": position})
                time.sleep(self.wait)
        frames = []
        while len(frames) < count:
            message = P.read_message(sock)
            if message is None:
                return
            if message.type == "cancel":
                P.send_message(sock, {"type": "cancelled", "frames_done": 0})
                return
            if message.type == "frame":
                frames.append(bytes(message.payload))
                P.send_message(sock, {"type": "received", "index": message["index"]})
        for index, frame in enumerate(frames):
            if len(self.jobs) == 1 and index == self.fail_after:
                P.send_message(sock, P.error_header(P.E_INPUT, f"the pool failed at frame {index}", False))
                return
            P.send_message(sock, {"type": "progress", "stage": "edit", "done": index + 1, "total": count})
            P.send_message(sock, P.frame_header("result", index, width, height), frame)
        stats = P.EditStats(frames=count, actor="actor-1").to_dict()
        P.send_message(sock, {"type": "done", "frames": count, "stats": stats})
