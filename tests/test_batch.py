"""``p2v batch``: TOML and JSON files, every clip written as ``p2v edit`` writes one, locally (tiny
models) and as jobs on a runtime (the echo runner in process, a fake pool); the busy runtime
waited out; a failed clip does not stop the others; Ctrl+C keeps what is done; every problem of
the file is one line before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, synthetic_frames, write_png_clip
from fake_pool import FakePool
from PIL import Image

from p2v_runtime import cli
from p2v_runtime.server import Server
from p2v_runtime.server.echo import echo_job_runner

TOKEN = "batch-test-token"


@pytest.fixture
def echo_server(tmp_path):
    """A plain runtime (one job at a time) with the echo runner: each frame comes back as sent."""
    server = Server("127.0.0.1", 0, token=TOKEN, job_runner=echo_job_runner, spool_dir=str(tmp_path / "spool"))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.address[1]}"
    server.stop()
    thread.join(10)


@pytest.fixture
def shots(tmp_path) -> dict[str, Path]:
    return {
        "a": write_png_clip(tmp_path / "plates" / "a", synthetic_frames(3, 16, 16, seed=1)),
        "b": write_png_clip(tmp_path / "plates" / "b", synthetic_frames(2, 24, 16, seed=2)),
    }


def frames_in(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def run_batch(args, capsys, monkeypatch, token: str = TOKEN) -> tuple[int, str, str]:
    monkeypatch.setenv("P2V_TOKEN", token)
    code = cli.main(["batch", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def toml_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- on a server ---------------------------------------------------------------------------------


def test_toml_batch_on_a_server_edits_every_clip_and_writes_stats(echo_server, shots, tmp_path, capsys, monkeypatch):
    batch = toml_file(
        tmp_path / "shots.toml",
        """
[defaults]
prompt = "echo steps=2"
steps = 2  # progress lines count frames by the settings' steps

[[clips]]
input = "plates/a"
out = "edited/a"

[[clips]]
name = "second"
input = "plates/b"
out = "edited/b"
frames = "1:2"
""",
    )
    stats = tmp_path / "stats.json"
    code, out, err = run_batch([batch, "--server", echo_server, "--stats", stats], capsys, monkeypatch)
    assert code == 0, err
    for got, sent in zip(frames_in(tmp_path / "edited" / "a"), frames_in(shots["a"]), strict=True):
        assert np.array_equal(got, sent)
    assert [p.name for p in sorted((tmp_path / "edited" / "b").iterdir())] == ["000000.png"]
    assert np.array_equal(frames_in(tmp_path / "edited" / "b")[0], frames_in(shots["b"])[1])
    lines = out.splitlines()
    assert any(line.startswith("p2v batch: a: done, 3 frame(s) in ") for line in lines), out
    assert any(line.startswith("p2v batch: second: done, 1 frame(s) in ") for line in lines), out
    assert lines[-1] == "p2v batch: 2 of 2 clip(s) done"
    assert "p2v batch: a: edit 1/3 frames" in err  # progress lines name their clip
    found = json.loads(stats.read_text())
    assert [(c["name"], c["state"], c["frames"], c["stats"]["frames"]) for c in found["clips"]] == [
        ("a", "done", 3, 3),
        ("second", "done", 1, 1),
    ]
    assert found["done"] == 2 and found["failed"] == 0


def test_a_busy_runtime_is_waited_out_not_failed(echo_server, shots, tmp_path, capsys, monkeypatch):
    """A plain runtime runs one job at a time: the clip that meets ``busy`` waits and tries again."""
    batch = tmp_path / "shots.json"
    batch.write_text(
        json.dumps(
            {
                "defaults": {"prompt": "echo steps=4 delay=0.05"},
                "clips": [
                    {"input": str(shots["a"]), "out": str(tmp_path / "out-a")},
                    {"input": str(shots["b"]), "out": str(tmp_path / "out-b")},
                ],
            }
        )
    )
    code, out, err = run_batch([batch, "--server", echo_server, "--parallel", "2"], capsys, monkeypatch)
    assert code == 0, out + err
    assert "is busy with another job; waiting for it" in err
    assert len(frames_in(tmp_path / "out-a")) == 3 and len(frames_in(tmp_path / "out-b")) == 2
    assert out.splitlines()[-1] == "p2v batch: 2 of 2 clip(s) done"


def test_a_failed_clip_keeps_its_frames_and_the_others_go_on(echo_server, shots, tmp_path, capsys, monkeypatch):
    batch = toml_file(
        tmp_path / "shots.toml",
        f"""
[defaults]
prompt = "echo"

[[clips]]
name = "breaks"
input = "{shots["a"]}"
out = "{tmp_path / "out-a"}"
prompt = "echo fail_at=1"

[[clips]]
name = "fine"
input = "{shots["b"]}"
out = "{tmp_path / "out-b"}"
""",
    )
    stats = tmp_path / "stats.json"
    code, out, err = run_batch(
        [batch, "--server", echo_server, "--parallel", "1", "--stats", stats], capsys, monkeypatch
    )
    assert code == 1, out + err
    assert (
        f"p2v batch: breaks: failed: echo job told to fail at frame 1 (1 frame(s) kept in {tmp_path / 'out-a'})" in out
    )
    assert [p.name for p in (tmp_path / "out-a").iterdir()] == ["000000.png"]
    assert len(frames_in(tmp_path / "out-b")) == 2
    assert out.splitlines()[-1] == "p2v batch: 1 of 2 clip(s) done, 1 failed"
    states = {c["name"]: (c["state"], c["error"]) for c in json.loads(stats.read_text())["clips"]}
    assert states == {"breaks": ("failed", "echo job told to fail at frame 1"), "fine": ("done", None)}


def test_on_a_pool_each_clip_says_its_place_in_the_queue(shots, tmp_path, capsys, monkeypatch):
    with FakePool(positions=(2, 1)) as pool:
        batch = toml_file(
            tmp_path / "shots.toml",
            f'defaults = {{ prompt = "x" }}\n[[clips]]\ninput = "{shots["a"]}"\nout = "{tmp_path / "out"}"\n',
        )
        code, out, err = run_batch([batch, "--server", pool.address], capsys, monkeypatch, token=pool.token)
    assert code == 0, out + err
    assert "p2v batch: a: queued, 1 ahead\np2v batch: a: queued, next to start\n" in err
    assert pool.jobs[0]["queue"] is True


def _lines_of(stream, into: list[str]) -> threading.Thread:
    def read():
        for line in stream:
            into.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for(lines: list[str], text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"no {text!r} in {lines}"
        time.sleep(0.05)


def test_ctrl_c_cancels_the_running_clip_and_keeps_the_finished_one(echo_server, shots, tmp_path):
    batch = toml_file(
        tmp_path / "shots.toml",
        f"""
[[clips]]
name = "quick"
input = "{shots["a"]}"
out = "{tmp_path / "out-a"}"
prompt = "echo"

[[clips]]
name = "slow"
input = "{shots["b"]}"
out = "{tmp_path / "out-b"}"
prompt = "echo steps=200 delay=0.05"
""",
    )
    env = {**os.environ, "P2V_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2v_runtime.cli", "batch", str(batch), "--server", echo_server, "--parallel", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = [], []
    readers = [_lines_of(proc.stdout, out), _lines_of(proc.stderr, err)]
    try:
        _wait_for(out, "quick: done")
        _wait_for(err, "slow: edit 1/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130, "".join(out + err)
    finally:
        proc.kill()
    for reader in readers:
        reader.join(5)
    assert any(line.startswith("p2v batch: slow: cancelled") for line in out), out
    assert out[-1].startswith("p2v batch: 1 of 2 clip(s) done, 1 cancelled")
    assert len(frames_in(tmp_path / "out-a")) == 3


# --- locally -------------------------------------------------------------------------------------


def test_json_batch_edits_locally_one_after_another_with_the_models_warm(tiny_models, shots, tmp_path, capsys):
    batch = tmp_path / "shots.json"
    defaults = {
        "prompt": "a red car",
        "source_prompt": "a car",
        "model": str(tiny_models["sd2-depth"]),
        "captioner": str(tiny_models["blip"]),
        "device": "cpu",
        "steps": 2,
        "size": 64,
        "cache_dir": str(tmp_path / "cache"),
    }
    batch.write_text(
        json.dumps(
            {
                "defaults": defaults,
                "clips": [
                    {"name": "one", "input": "plates/a", "out": "out/one", "save_depth": "out/one-depth"},
                    {"name": "two", "input": "plates/b", "out": "out/two", "prompt": "a blue car", "steps": 3},
                ],
            }
        )
    )
    stats = tmp_path / "stats.json"
    code = cli.main(["batch", str(batch), "--stats", str(stats), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(frames_in(tmp_path / "out" / "one")) == 3 and len(frames_in(tmp_path / "out" / "two")) == 2
    assert len(list((tmp_path / "out" / "one-depth").glob("*.png"))) == 3
    clips = {c["name"]: c for c in json.loads(stats.read_text())["clips"]}
    assert clips["one"]["stats"]["steps"] == 2 and clips["two"]["stats"]["steps"] == 3
    assert clips["two"]["stats"]["model_load_seconds"] == 0  # loaded once, for the first clip
    assert [line.split(",")[0] for line in out.splitlines()[:2]] == ["p2v batch: one: done", "p2v batch: two: done"]


def test_ctrl_c_in_a_local_batch_stops_it_and_starts_no_more(tiny_models, shots, tmp_path):
    batch = tmp_path / "shots.json"
    defaults = {
        "prompt": "a red car",
        "source_prompt": "a car",
        "model": str(tiny_models["sd2-depth"]),
        "captioner": str(tiny_models["blip"]),
        "device": "cpu",
        "steps": 100,
        "size": 64,
        "cache_dir": str(tmp_path / "cache"),
    }
    clips = [
        {"name": "one", "input": "plates/a", "out": "out/one"},
        {"name": "two", "input": "plates/b", "out": "out/two"},
    ]
    batch.write_text(json.dumps({"defaults": defaults, "clips": clips}))
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2v_runtime.cli", "batch", str(batch), "--stats", str(stats)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = [], []
    readers = [_lines_of(proc.stdout, out), _lines_of(proc.stderr, err)]
    try:
        _wait_for(err, "one: inversion", timeout=300)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, "".join(out + err)
    finally:
        proc.kill()
    for reader in readers:
        reader.join(5)
    assert out[0].startswith("p2v batch: one: cancelled") and out[-1].startswith(
        "p2v batch: 0 of 2 clip(s) done, 1 cancelled, 1 not started"
    ), out
    assert not (tmp_path / "out" / "two").exists()
    states = [c["state"] for c in json.loads(stats.read_text())["clips"]]
    assert states == ["cancelled", "not started"]


# --- the file, checked before anything starts --------------------------------------------------------


def _bad_files(tmp_path: Path, shots: dict[str, Path]) -> dict[str, tuple[str, str, str]]:
    """name -> (file name, its text, the one error line's telling part)."""
    a, b = shots["a"], shots["b"]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "000000.png").write_bytes(b"an earlier result")
    good_b = f'[[clips]]\ninput = "{b}"\nout = "out-b"\nprompt = "x"\n'
    return {
        "missing input": (
            "f.toml",
            f'[[clips]]\ninput = "plates/nope"\nout = "o"\nprompt = "x"\n{good_b}',
            f"clip 1 ('nope'): input not found: {tmp_path / 'plates' / 'nope'}",
        ),
        "no out": ("f.toml", f'[[clips]]\nname = "s1"\ninput = "{a}"\nprompt = "x"\n', "clip 's1': no out: give the"),
        "duplicate outputs": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "same"\nprompt = "x"\n'
            f'[[clips]]\ninput = "{b}"\nout = "same"\nprompt = "x"\n',
            f"clip 'b': out {tmp_path / 'same'} is also the out folder of clip 'a': give each its own",
        ),
        "one folder by two names": (
            "f.json",
            json.dumps(
                {
                    "defaults": {"prompt": "x"},
                    "clips": [{"input": str(a), "out": "o/a"}, {"input": str(b), "out": "o/x/../a"}],
                }
            ),
            "is also the out folder of clip 'a'",
        ),
        "out is another clip's input": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "{b}"\nprompt = "x"\n{good_b}',
            f"clip 'a': out {b} is the input of clip 'b'; its source frames would be written over",
        ),
        "out is its own input": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "{a}"\nprompt = "x"\n',
            "is the input folder; choose another folder",
        ),
        "earlier frames in out": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "done"\nprompt = "x"\n',
            "already holds 1 frame(s); pass --overwrite",
        ),
        "unknown clip key": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "o"\nprompt = "x"\nstpes = 4\n',
            "clip 1 ('a'): unknown key(s) stpes (a clip takes name, input, out, depth, save_depth and edit settings",
        ),
        "front-end setting": (
            "f.toml",
            f'[[clips]]\ninput = "{a}"\nout = "o"\nprompt = "x"\nzpass_render = "scene"\n',
            "unknown key(s) zpass_render",
        ),
        "unknown default": ("f.toml", f'[defaults]\npromt = "x"\n{good_b}', "defaults: unknown setting(s) promt"),
        "unknown top-level key": ("f.toml", f"clip = 1\n{good_b}", "unknown top-level key(s) clip"),
        "bad setting": (
            "f.toml",
            f'[[clips]]\nname = "s1"\ninput = "{a}"\nout = "o"\nprompt = "x"\nsteps = "many"\n',
            "clip 's1': Steps (--steps) must be a whole number, got 'many'",
        ),
        "bad default": (
            "f.toml",
            f'[defaults]\ninjection = "sideways"\n[[clips]]\nname = "s1"\ninput = "{a}"\nout = "o"\nprompt = "x"\n',
            "clip 's1': Injection (--injection) must be one of",
        ),
        "empty prompt": (
            "f.toml",
            f'[[clips]]\nname = "s1"\ninput = "{a}"\nout = "o"\n',
            "clip 's1': Prompt (--prompt) is empty",
        ),
        "frames past the clip": (
            "f.toml",
            f'[[clips]]\nname = "s1"\ninput = "{a}"\nout = "o"\nprompt = "x"\nframes = "0:9"\n',
            "clip 's1': ",
        ),
        "depth of the wrong count": (
            "f.toml",
            f'[[clips]]\nname = "s1"\ninput = "{a}"\nout = "o"\nprompt = "x"\ndepth = "{b}"\n',
            "clip 's1': depth: ",
        ),
        "duplicate names": (
            "f.toml",
            f'[[clips]]\nname = "s"\ninput = "{a}"\nout = "o1"\nprompt = "x"\n'
            f'[[clips]]\nname = "s"\ninput = "{b}"\nout = "o2"\nprompt = "x"\n',
            "clip 's': the name is used by clip 1 too",
        ),
        "not TOML": ("f.toml", "[[clips]\ninput = 1\n", "f.toml is not valid TOML: "),
        "not JSON": ("f.json", '{"clips": [}', "f.json is not valid JSON: "),
        "no clips": ("f.json", json.dumps({"defaults": {"prompt": "x"}, "clips": []}), "no clips: give a list 'clips'"),
        "a list at the top": ("f.json", json.dumps([{"input": "a"}]), "the top level must be a table"),
        "another format": ("f.yaml", "clips: []", "give a .toml or .json batch file"),
    }


BAD = [
    "missing input",
    "no out",
    "duplicate outputs",
    "one folder by two names",
    "out is another clip's input",
    "out is its own input",
    "earlier frames in out",
    "unknown clip key",
    "front-end setting",
    "unknown default",
    "unknown top-level key",
    "bad setting",
    "bad default",
    "empty prompt",
    "frames past the clip",
    "depth of the wrong count",
    "duplicate names",
    "not TOML",
    "not JSON",
    "no clips",
    "a list at the top",
    "another format",
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", BAD)
def test_each_problem_of_the_file_is_one_line_and_nothing_starts(case, shots, tmp_path, capsys, monkeypatch):
    name, text, expected = _bad_files(tmp_path, shots)[case]
    batch = tmp_path / name
    batch.write_text(text)
    before = snapshot(tmp_path)
    # A server that is not there: a clip that started would fail differently (exit 1).
    code, out, err = run_batch([batch, "--server", "127.0.0.1:9"], capsys, monkeypatch)
    assert code == 2, out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2v batch: error: "), err
    assert expected in lines[0], lines[0]
    assert snapshot(tmp_path) == before and out == ""


def test_every_problem_is_listed_at_once(shots, tmp_path, capsys, monkeypatch):
    batch = toml_file(
        tmp_path / "f.toml",
        f'[[clips]]\ninput = "nope"\nout = "o"\nprompt = "x"\n'
        f'[[clips]]\ninput = "{shots["a"]}"\nout = "p"\nsteps = 0\n',
    )
    code, _, err = run_batch([batch], capsys, monkeypatch)
    assert code == 2
    assert [line.split(":")[2].strip() for line in err.splitlines()] == ["clip 1 ('nope')", "clip 2 ('a')"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--parallel", "2"], "--parallel needs --server"),
        (["--token-file", "t"], "--token-file needs --server"),
        (["--server", "127.0.0.1:9", "--token-file", "/nonexistent/token"], "cannot read --token-file"),
        (["--server", "gpu-box"], "--server: bad server address 'gpu-box'"),
    ],
)
def test_bad_arguments_are_one_line(args, expected, shots, tmp_path, capsys, monkeypatch):
    batch = toml_file(tmp_path / "f.toml", f'[[clips]]\ninput = "{shots["a"]}"\nout = "o"\nprompt = "x"\n')
    code, _, err = run_batch([batch, *args], capsys, monkeypatch)
    assert code == 2 and err.strip() == f"p2v batch: error: {err.strip().split('error: ', 1)[1]}"
    assert expected in err and not (tmp_path / "o").exists()
