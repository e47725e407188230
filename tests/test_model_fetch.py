"""*Download Models* in the add-on: the runtime's `p2v models fetch --json-progress`, read into a
progress figure and a line for the panel; failure and cancel reported, nothing left running.

A fake runtime Python stands in (no network here): it prints the fetch's JSON events as the
real command does (documented in README, "First run") and exits with its exit codes.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from blender_addon import model_fetch

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake Python is a #! script")

FAKE = r"""#!{python}
import json, signal, sys, time
args = sys.argv[1:]
assert args[:5] == ["-m", "p2v_runtime.cli", "models", "fetch", "--json-progress"], args
open({record!r}, "w").write(json.dumps(args))
def say(**event):
    print(json.dumps(event), flush=True)
mode = {mode!r}
signal.signal(signal.SIGINT, lambda *_: (say(event="interrupted", files_kept=1, files=3), sys.exit(130)))
say(event="plan", model="m", role="model", dtype="fp16", files=3, bytes=3000, download_bytes=3000)
say(event="total", download_bytes=3_000_000_000, free_bytes=50_000_000_000, cache="/c")
for done in (1_000_000_000, 2_000_000_000):
    say(event="progress", model="m", done=done, total=3_000_000_000, rate=40e6, seconds_left=25)
    time.sleep(0.05)
if mode == "fail":
    say(event="error", message="the disk is full: 1.0 GB free, 3.0 GB needed")
    print("p2v models fetch: error: the disk is full", file=sys.stderr)
    sys.exit(1)
if mode == "slow":
    time.sleep(30)
say(event="progress", model="m", done=3_000_000_000, total=3_000_000_000, rate=40e6, seconds_left=0)
say(event="done", model="m", role="model", dtype="fp16", folder="/c/m", bytes=3_000_000_000)
"""

SETTINGS = {"model": "org/model", "captioner": "org/blip", "dtype": "fp16", "device": "cuda"}


def fake_python(tmp_path, mode: str):
    python = tmp_path / "python"
    record = tmp_path / "args.json"
    python.write_text(FAKE.format(python=sys.executable, record=str(record), mode=mode))
    python.chmod(0o755)
    return str(python), record


def run(task, timeout: float = 30.0):
    task.start()
    assert task.join(timeout), "the fetch did not end"
    return task


def test_a_download_reports_its_progress_and_ends_ready(tmp_path):
    python, record = fake_python(tmp_path, "ok")
    task = run(model_fetch.ModelFetchTask(python, SETTINGS))
    assert task.state == "done" and task.progress == 1.0
    assert task.message.startswith("Models ready: m (fp16) in /c/m")
    args = record.read_text()
    for value in SETTINGS.values():
        assert value in args  # the preferences' model, captioner, precision and device


def test_a_failed_download_says_why(tmp_path):
    python, _ = fake_python(tmp_path, "fail")
    task = run(model_fetch.ModelFetchTask(python, SETTINGS))
    assert task.state == "failed"
    assert task.message == "Download failed: the disk is full: 1.0 GB free, 3.0 GB needed"
    assert 0.6 < task.progress < 0.7  # what had arrived


def test_cancel_stops_the_download_and_keeps_what_was_fetched(tmp_path):
    python, _ = fake_python(tmp_path, "slow")
    task = model_fetch.ModelFetchTask(python, SETTINGS)
    task.start()
    deadline = time.monotonic() + 20
    while task.progress < 0.6 and time.monotonic() < deadline:
        time.sleep(0.02)
    task.cancel()
    assert task.join(10)
    assert task.state == "cancelled" and "files already fetched stay" in task.message


def test_a_missing_runtime_python_is_one_line(tmp_path):
    task = run(model_fetch.ModelFetchTask(str(tmp_path / "nope"), SETTINGS, python_hint="--runtime-python"))
    assert task.state == "failed" and task.message.endswith("is not found: check --runtime-python")
