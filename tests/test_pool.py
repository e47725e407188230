"""``p2v serve --ray``: a pool of two CPU actors on a local Ray cluster (loopback), tiny models.

One server for the module (starting Ray and two actors takes about 15 s here). Every result is
compared bit for bit with ``edit_clip`` in this process: the chain is deterministic on CPU with
one thread a process, so a job through the pool, spread over actors or resumed after an actor
was killed, makes exactly the frames of a local edit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ArrayFrames, synthetic_frames

from p2v_runtime.client import Client

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class PoolServer:
    """``p2v serve --ray --actors 2 --actor-threads 1`` in a subprocess, its log kept."""

    def __init__(self, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "P2V_TOKEN"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2v_runtime.server", "--ray", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline()
        assert line, f"the pool did not start: {self.log()}"
        self.ready = json.loads(line)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def client(self) -> Client:
        return Client.connect(self.ready["address"], self.ready["token"])

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the log:\n{self.log()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def pool(tiny_models):
    server = PoolServer("--actors", "2", "--actor-threads", "1")
    yield server
    assert server.proc.poll() is None, server.log()
    assert server.stop() == 0, server.log()


@pytest.fixture
def clip_settings(tiny_settings, tmp_path):
    """Settings of a job with its own, empty inversion cache."""
    count = iter(range(1000))

    def make(**overrides):
        return tiny_settings(cache_dir=str(tmp_path / f"cache-{next(count)}"), **overrides)

    return make


def local_edit(frames, settings) -> list[bytes]:
    from p2v_runtime.editor import edit_clip

    return [image.tobytes() for _, image in edit_clip(ArrayFrames(frames), settings)]


def run_job(client: Client, settings, frames, on_result=None):
    """(results by index, the done stats, the indices in arrival order)."""
    height, width = frames[0].shape[:2]
    results, order, stats = {}, [], None
    for message in client.run_job(settings, [f.tobytes() for f in frames], width, height):
        if message.type == "result":
            results[message["index"]] = bytes(message.payload)
            order.append(message["index"])
            if on_result is not None:
                on_result(message["index"])
        elif message.type == "done":
            stats = message["stats"]
    return results, stats, order


def test_the_pool_serves_on_loopback_and_starts_two_actors(pool):
    assert pool.ready["host"] == "127.0.0.1" and pool.ready["actors"] == 2
    pool.wait_for_log(r"pool of 2 actor\(s\) \(CPU, 1 thread\(s\) each\) on a local Ray cluster", timeout=10)
    pids = {int(pid) for pid in re.findall(r"actor actor\d+: pid (\d+)", pool.log())}
    assert len(pids) == 2 and os.getpid() not in pids


def test_two_clients_at_once_both_finish_with_the_frames_of_a_local_edit(pool, clip_settings):
    clips = [synthetic_frames(4, seed=1), synthetic_frames(4, seed=2)]
    settings = [clip_settings(), clip_settings(prompt="a blue truck")]
    outcomes: dict[int, tuple] = {}

    def job(which: int) -> None:
        with pool.client() as client:
            outcomes[which] = run_job(client, settings[which], clips[which])

    threads = [threading.Thread(target=job, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(outcomes) == {0, 1}, pool.log()
    actors = set()
    for which in (0, 1):
        results, stats, order = outcomes[which]
        assert order == [0, 1, 2, 3]
        expected = local_edit(clips[which], clip_settings(prompt=settings[which].prompt))
        assert [results[i] for i in range(4)] == expected
        actors.add(stats["actor"])
    assert len(actors) == 2  # both ran at once, one on each actor


def test_the_inversions_of_one_clip_land_on_both_actors(pool, clip_settings):
    frames = synthetic_frames(8, seed=3)
    settings = clip_settings(steps=6)
    with pool.client() as client:
        results, stats, _ = run_job(client, settings, frames)
    counts = stats["pool_inversions"]
    assert sum(counts.values()) == 8 and len(counts) == 2 and min(counts.values()) >= 1, counts
    assert stats["actor"] in counts and stats["pool_restarts"] == 0
    assert [results[i] for i in range(8)] == local_edit(frames, clip_settings(steps=6))


def test_an_actor_killed_mid_job_the_job_completes_and_matches(pool, clip_settings):
    frames = synthetic_frames(8, seed=4)
    settings = clip_settings(steps=6)
    killed: list[int] = []

    def kill_the_editing_actor(index: int) -> None:
        if index == 1 and not killed:
            pid = int(
                pool.wait_for_log(r"job (\S+): editing on actor \S+ \(pid (\d+)\)\n(?![\s\S]*editing on)").group(2)
            )
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with pool.client() as client:
        results, stats, order = run_job(client, settings, frames, kill_the_editing_actor)
    assert killed
    assert order == list(range(8))  # nothing sent twice, nothing missing
    assert stats["pool_restarts"] == 1
    assert [results[i] for i in range(8)] == local_edit(frames, clip_settings(steps=6))
    pool.wait_for_log(r"is gone; starting actor\d+ in its place")


def test_a_client_that_disconnects_frees_its_actor(pool, clip_settings):
    frames = synthetic_frames(8, seed=5)
    client = pool.client()
    messages = client.run_job(clip_settings(steps=6), [f.tobytes() for f in frames], 64, 64)
    for message in messages:
        if message.type == "result":
            break
    client.close()
    pool.wait_for_log(r"job \S+ ended: cancelled", timeout=30)
    # Both actors are free again: two jobs at once start at once (neither hears a queue place).
    test_two_clients_at_once_both_finish_with_the_frames_of_a_local_edit(pool, clip_settings)


def test_serve_ray_options_are_checked_before_anything_starts():
    def serve(*args):
        return subprocess.run(
            [sys.executable, "-m", "p2v_runtime.server", *args], capture_output=True, text=True, timeout=120
        )

    result = serve("--actors", "2")
    assert result.returncode == 2 and "--actors needs --ray" in result.stderr
    result = serve("--ray", "--actor-threads", "0")
    assert result.returncode == 2 and "--actor-threads must be at least 1" in result.stderr
    result = serve("--ray", "--actors", "3", "--actor-threads", str(os.cpu_count() or 2))
    assert result.returncode == 2 and "not enough for 3 actors" in result.stderr, result.stderr


def test_queue_places_arrive_in_order_old_clients_hear_none_and_a_cancelled_queued_job_never_starts(
    pool, clip_settings
):
    """Both actors busy: an old-style client (no ``queue`` asked) waits first in line and hears no
    ``queued``; a second one hears it is second, cancels, and never starts; the first then runs."""
    editing_before = len(re.findall(r"editing on actor", pool.log()))
    long_jobs = []
    for seed in (6, 7):
        frames = synthetic_frames(8, seed=seed)
        thread = threading.Thread(
            target=lambda f=frames: run_job(pool.client(), clip_settings(steps=10), f), daemon=True
        )
        thread.start()
        long_jobs.append(thread)
    deadline = time.monotonic() + 60
    while len(re.findall(r"editing on actor", pool.log())) < editing_before + 2:
        assert time.monotonic() < deadline, pool.log()
        time.sleep(0.05)

    frames = synthetic_frames(3, seed=8)
    old = pool.client()
    old.submit(clip_settings(), 3, 64, 64, queue=False)
    for index, frame in enumerate(frames):
        old.send_frame(index, frame.tobytes())
    pool.wait_for_log(r"job (\S+) from \S+: 3 frame\(s\)")

    cancel = threading.Event()
    heard: list = []
    with pool.client() as second:
        for message in second.run_job(clip_settings(), [f.tobytes() for f in frames], 64, 64, cancel=cancel):
            heard.append((message.type, message.header.get("position", message.header.get("frames_done"))))
            if message.type == "queued":
                cancel.set()
    assert heard == [("queued", 2), ("cancelled", 0)]

    kinds, results = [], {}
    while True:
        message = old.next_message(120)
        kinds.append(message.type)
        if message.type == "result":
            results[message["index"]] = bytes(message.payload)
        if message.type in ("done", "cancelled"):
            break
    old.close()
    assert "queued" not in kinds and kinds[-1] == "done"
    assert [results[i] for i in range(3)] == local_edit(frames, clip_settings())
    for thread in long_jobs:
        thread.join(120)
    # The two long jobs and the old client's job ran; the cancelled one never reached an actor.
    assert len(re.findall(r"editing on actor", pool.log())) == editing_before + 3


def test_p2v_edit_and_batch_through_the_pool_write_the_pngs_of_a_local_p2v_edit(pool, tiny_models, tmp_path):
    """Same PNG files, byte for byte (frames and --save-depth), from ``p2v edit`` in this process,
    ``p2v edit --server`` on the pool, and a two-clip ``p2v batch --server`` on the pool."""
    from conftest import tiny_edit_options, write_png_clip

    from p2v_runtime import cli

    clips = [write_png_clip(tmp_path / f"clip{n}", synthetic_frames(4, seed=10 + n)) for n in (0, 1)]

    def edit(clip, out, cache, *extra):
        args = [
            "edit",
            str(clip),
            "--out",
            str(out),
            "--prompt",
            "a red sports car",
            "--save-depth",
            str(out) + "-depth",
        ]
        return cli.main([*args, *tiny_edit_options(tiny_models, tmp_path / cache), *extra])

    def files(folder):
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}

    os.environ["P2V_TOKEN"] = pool.ready["token"]
    try:
        assert edit(clips[0], tmp_path / "local", "cache-local") == 0
        assert edit(clips[0], tmp_path / "pooled", "cache-pooled", "--server", pool.ready["address"]) == 0
        assert files(tmp_path / "pooled") == files(tmp_path / "local") != {}
        assert files(tmp_path / "pooled-depth") == files(tmp_path / "local-depth") != {}

        assert edit(clips[1], tmp_path / "local1", "cache-local1") == 0
        defaults = {
            "model": str(tiny_models["sd2-depth"]),
            "captioner": str(tiny_models["blip"]),
            "device": "cpu",
            "cache_dir": str(tmp_path / "cache-batch"),
        }
        batch = {
            "defaults": {**defaults, "prompt": "a red sports car", "size": 64, "steps": 2},  # as tiny_edit_options
            "clips": [{"input": str(clip), "out": str(tmp_path / f"batch{n}")} for n, clip in enumerate(clips)],
        }
        (tmp_path / "batch.json").write_text(json.dumps(batch))
        assert cli.main(["batch", str(tmp_path / "batch.json"), "--server", pool.ready["address"], "--quiet"]) == 0
    finally:
        del os.environ["P2V_TOKEN"]
    assert files(tmp_path / "batch0") == files(tmp_path / "local")
    assert files(tmp_path / "batch1") == files(tmp_path / "local1")


def test_an_error_on_an_actor_reaches_the_client_as_its_kind_and_the_connection_goes_on(pool, clip_settings, tmp_path):
    from p2v_runtime import protocol as P
    from p2v_runtime.client import RemoteError

    frames = synthetic_frames(2, seed=12)
    with pool.client() as client:
        with pytest.raises(RemoteError) as caught:
            run_job(client, clip_settings(model=str(tmp_path / "no-such-model")), frames)
        assert caught.value.code == P.E_MODEL_LOAD and "no-such-model" in str(caught.value)
        results, stats, order = run_job(client, clip_settings(), frames)
    assert order == [0, 1] and stats["frames"] == 2


def test_a_z_pass_job_with_per_frame_depth_through_the_pool_matches_a_local_edit(pool, clip_settings):
    """The add-on's Z-pass jobs: depth maps travel with the frames (the depth side of the board),
    and the depth each frame was edited with comes back once per frame."""
    frames = synthetic_frames(4, seed=13)
    rng = np.random.default_rng(13)
    depths = [(2.0 + rng.random((64, 64))).astype(np.float32) for _ in frames]
    settings = clip_settings(depth_norm="frame")
    results, used = {}, {}
    with pool.client() as client:
        messages = client.run_job(
            settings, [f.tobytes() for f in frames], 64, 64, depth=[d.tobytes() for d in depths], send_depth=True
        )
        for message in messages:
            if message.type == "result":
                results[message["index"]] = bytes(message.payload)
            elif message.type == "depth_used":
                assert message["index"] not in used
                used[message["index"]] = np.frombuffer(message.payload, "<f4")
    from p2v_runtime.editor import edit_clip

    local_used = {}
    local = [
        image.tobytes()
        for _, image in edit_clip(
            ArrayFrames(frames),
            clip_settings(depth_norm="frame"),
            depth=ArrayFrames(depths),
            depth_sink=lambda index, values: local_used.__setitem__(index, values),
        )
    ]
    assert [results[i] for i in range(4)] == local
    assert sorted(used) == [0, 1, 2, 3]
    for index in range(4):
        assert np.array_equal(used[index], local_used[index].astype("<f4").ravel())


def test_a_preview_through_the_pool_is_the_anchor_of_a_local_preview(pool, clip_settings):
    from p2v_runtime.editor import edit_clip

    frames = synthetic_frames(5, seed=14)
    with pool.client() as client:
        messages = list(
            client.run_job(clip_settings(anchor="middle"), [f.tobytes() for f in frames], 64, 64, preview=True)
        )
    results = [m for m in messages if m.type == "result"]
    local = list(edit_clip(ArrayFrames(frames), clip_settings(anchor="middle"), preview=True))
    assert [(m["index"], bytes(m.payload)) for m in results] == [(index, image.tobytes()) for index, image in local]
    assert results[0]["index"] == 2 and messages[-1].type == "done"


def test_actors_that_cannot_start_are_one_line_and_the_server_itself_never_imports_torch(tmp_path):
    """A node without a working torch: the server (which never imports torch) starts the pool, and
    the actors' failure is one line naming the cause, exit status 2."""
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("this torch is broken on purpose")\n')
    env = {k: v for k, v in os.environ.items() if k != "P2V_TOKEN"}
    env.update(PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "p2v_runtime.server", "--ray", "--actors", "1", "--actor-threads", "1"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "p2v serve: actor actor1 could not start: ImportError: this torch is broken on purpose" in result.stderr
    assert "Traceback" not in result.stderr
