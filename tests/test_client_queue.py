"""The client side of a pool's queue: the job asks for ``queued`` messages, the client hands them
on in order, ``edit_on_server`` reports them as progress stage ``queue``, ``p2v edit --server``
prints them. Against tests/fake_pool.py (the real pool is the server's to test)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ArrayFrames, synthetic_frames, write_png_clip
from fake_pool import FakePool

from p2v_runtime import cli
from p2v_runtime.client import Client, edit_on_server, queue_text
from p2v_runtime.settings import EditSettings


@pytest.fixture
def pool():
    with FakePool() as running:
        yield running


def test_run_job_asks_for_the_queue_and_yields_its_positions_first(pool):
    frames = [bytes([index]) * (8 * 4 * 3) for index in range(2)]
    with Client.connect(pool.address, pool.token) as client:
        kinds = [
            (message.type, message.get("position", message.get("index")))
            for message in client.run_job({"prompt": "x"}, frames, 8, 4)
        ]
    assert pool.jobs[0]["queue"] is True
    assert kinds[:3] == [("queued", 3), ("queued", 2), ("queued", 1)]
    assert [k for k in kinds if k[0] == "result"] == [("result", 0), ("result", 1)]
    assert kinds[-1][0] == "done"


def test_a_client_that_does_not_ask_hears_no_queue(pool):
    with Client.connect(pool.address, pool.token) as client:
        client.submit({"prompt": "x"}, 1, 8, 4, queue=False)
    assert "queue" not in pool.jobs[0]


def test_edit_on_server_reports_the_queue_as_progress_before_the_edit(pool):
    arrays = synthetic_frames(3, 16, 16)
    events = []
    remote = edit_on_server(
        pool.address,
        ArrayFrames(arrays),
        EditSettings(prompt="x"),
        token=pool.token,
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    results = []
    for index, image in remote:
        results.append(index)
        events.append(("result", index, 0))
        assert np.array_equal(image, arrays[index])
    assert events[:3] == [("queue", 3, 0), ("queue", 2, 0), ("queue", 1, 0)]
    assert [e for e in events if e[0] == "result"] == [("result", i, 0) for i in range(3)]
    assert events.index(("result", 0, 0)) > 2
    assert results == [0, 1, 2] and remote.stats.actor == "actor-1" and remote.stats.frames == 3


def test_queue_text_says_how_many_jobs_are_ahead():
    assert queue_text(1) == "queued, next to start"
    assert queue_text(3) == "queued, 2 ahead"


def test_p2v_edit_on_a_pool_prints_its_place_in_the_queue(pool, tmp_path, monkeypatch, capsys):
    clip = write_png_clip(tmp_path / "clip", synthetic_frames(2, 16, 16))
    monkeypatch.setenv("P2V_TOKEN", pool.token)
    code = cli.main(["edit", str(clip), "--out", str(tmp_path / "out"), "--prompt", "x", "--server", pool.address])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "queued" in line]
    assert lines == ["p2v: queued, 2 ahead", "p2v: queued, 1 ahead", "p2v: queued, next to start"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png"]
