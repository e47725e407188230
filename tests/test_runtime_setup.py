"""Set up runtime picks the torch build for the machine, says so first, then installs torch alone.

No network and no real torch here: the machine is faked (``torch_build.Machine`` for the decision,
fake probes for the detection) and the set-up runs with a fake Python whose ``-m venv`` makes a
venv of copies of itself and whose ``-m pip`` records its arguments (and the set-up log's first
line at that moment) and exits 0. The real pip install of the runtime wheel is
tests/test_addon.py::test_runtime_setup_installs_the_wheel_and_says_what_is_missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from blender_addon import runtime_setup
from blender_addon import torch_build as tb

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake Python is a #! script")

CPU = "https://download.pytorch.org/whl/cpu"
SMI_HEADER = """Tue Dec  1 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA GeForce RTX 3090        Off |   00000000:01:00.0  On |                  N/A |
+-----------------------------------------------------------------------------------------+
"""
PROC_VERSION = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\nGCC version:  gcc version 12.2.0\n"
)


def nvidia(system="Linux", arch="x86_64", driver="550.54.15", cuda=(12, 4), compute=(8, 6), gpus=("RTX 3090",)):
    return tb.Machine(system, arch, driver, cuda, gpus, compute)


# --- the decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine, kind, index",
    [
        (tb.Machine("Linux", "x86_64"), "cpu", CPU),
        (tb.Machine("Windows", "AMD64"), "cpu", CPU),
        (tb.Machine("Linux", "aarch64"), "cpu", CPU),
        (tb.Machine("Darwin", "arm64"), "default", ""),
        (tb.Machine("Darwin", "x86_64"), "default", ""),
        (tb.Machine("FreeBSD", "amd64"), "default", ""),
        (nvidia(), "cuda", "https://download.pytorch.org/whl/cu124"),
        (nvidia(cuda=(12, 5)), "cuda", "https://download.pytorch.org/whl/cu124"),
        (nvidia(cuda=(12, 2)), "cuda", "https://download.pytorch.org/whl/cu121"),
        (nvidia(cuda=(12, 0)), "cuda", "https://download.pytorch.org/whl/cu118"),
        (nvidia(system="Windows", arch="AMD64", cuda=(12, 6)), "cuda", "https://download.pytorch.org/whl/cu126"),
        (nvidia(cuda=(12, 9)), "cuda", "https://download.pytorch.org/whl/cu128"),
        (nvidia(cuda=(13, 1), compute=None), "cuda", "https://download.pytorch.org/whl/cu130"),
        # Pascal on a new driver: cu128 and later builds have no kernels for it.
        (nvidia(cuda=(12, 9), compute=(6, 1)), "cuda", "https://download.pytorch.org/whl/cu126"),
        (nvidia(arch="aarch64", cuda=(12, 8)), "cuda", "https://download.pytorch.org/whl/cu128"),
        (nvidia(arch="aarch64", cuda=(12, 4)), "cpu", CPU),
        (nvidia(cuda=(10, 2), driver="440.33.01"), "cpu", CPU),
        (nvidia(compute=(3, 0)), "cpu", CPU),
        # /proc/driver/nvidia/version but no nvidia-smi: the CUDA version from the driver's own.
        (tb.Machine("Linux", "x86_64", "560.35.03"), "cuda", "https://download.pytorch.org/whl/cu126"),
        (tb.Machine("Linux", "x86_64", "(unknown version)"), "cpu", CPU),
        (
            tb.Machine("Linux", "x86_64", rocm="/opt/rocm", rocm_version=(6, 2)),
            "rocm",
            "https://download.pytorch.org/whl/rocm6.2",
        ),
        (
            tb.Machine("Linux", "x86_64", rocm="/opt/rocm", rocm_version=(6, 10)),
            "rocm",
            "https://download.pytorch.org/whl/rocm6.4",
        ),
        (tb.Machine("Linux", "x86_64", rocm="/usr/bin/rocminfo"), "rocm", "https://download.pytorch.org/whl/rocm6.4"),
        (tb.Machine("Linux", "x86_64", rocm="/opt/rocm", rocm_version=(5, 2)), "cpu", CPU),
        (tb.Machine("Windows", "AMD64", rocm="C:/rocm", rocm_version=(6, 2)), "cpu", CPU),  # no ROCm torch there
        (
            tb.Machine("Linux", "x86_64", "550.54.15", (12, 4), rocm="/opt/rocm"),
            "cuda",
            "https://download.pytorch.org/whl/cu124",
        ),
    ],
)
def test_setup_chooses_the_torch_build_for_the_machine(machine, kind, index):
    choice = tb.choose_torch(machine)
    assert (choice.kind, choice.index_url) == (kind, index), choice
    assert choice.announcement().startswith("Installing torch, ")
    if kind == "cpu":
        assert choice.label == "+cpu" and choice.size_gb == 0.2
    if kind == "cuda":
        assert choice.label == "+" + index.rsplit("/", 1)[1] and choice.size_gb >= 2.5


def test_setup_announcements_say_build_reason_and_size():
    say = lambda machine, url="": tb.choose_torch(machine, url).announcement()  # noqa: E731 - a local shorthand
    assert say(tb.Machine("Linux", "x86_64")) == "Installing torch, CPU build (no NVIDIA driver found), about 0.2 GB"
    assert say(nvidia(gpus=())) == (
        "Installing torch, CUDA 12.4 build for NVIDIA driver 550.54.15, about 2.5 GB with its CUDA libraries"
    )
    assert say(nvidia(gpus=("NVIDIA GeForce RTX 3090",))) == (
        "Installing torch, CUDA 12.4 build for NVIDIA driver 550.54.15 (NVIDIA GeForce RTX 3090), "
        "about 2.5 GB with its CUDA libraries"
    )
    assert say(nvidia(cuda=(12, 8))).endswith("about 3 GB with its CUDA libraries")
    assert say(tb.Machine("Darwin", "arm64")) == (
        "Installing torch, PyPI's default macOS build (MPS on Apple silicon), about 0.1 GB"
    )
    assert say(tb.Machine("Linux", "x86_64", rocm="/opt/rocm", rocm_version=(6, 2))) == (
        "Installing torch, ROCm 6.2 build (ROCm 6.2 found in /opt/rocm, no NVIDIA driver), "
        "about 4 GB with its ROCm libraries"
    )
    old = say(nvidia(cuda=(11, 4), driver="470.82.01"))
    assert old.startswith("Installing torch, CUDA 11.8 build for NVIDIA driver 470.82.01") and (
        "minor-version compatibility" in old
    )
    assert "CPU build (NVIDIA driver 440.33.01 (CUDA 10.2) is too old" in say(nvidia(cuda=(10, 2), driver="440.33.01"))
    assert "compute capability 3.0" in say(nvidia(compute=(3, 0)))
    assert "ARM Linux need CUDA 12.8" in say(nvidia(arch="aarch64"))
    pascal = tb.choose_torch(nvidia(cuda=(12, 9), compute=(6, 1)))
    assert any("below compute capability 7.5" in note for note in pascal.details)
    guessed = tb.choose_torch(tb.Machine("Linux", "x86_64", "560.35.03"))
    assert any("no nvidia-smi: assumed CUDA 12.6" in note for note in guessed.details)


@pytest.mark.parametrize(
    "machine",
    [tb.Machine("Linux", "x86_64"), tb.Machine("Darwin", "arm64"), nvidia(), tb.Machine("Linux", "x86_64", rocm="/r")],
)
def test_setup_explicit_torch_index_url_wins(machine):
    choice = tb.choose_torch(machine, " https://download.pytorch.org/whl/cu121 ")
    assert (choice.kind, choice.index_url, choice.label) == (
        "custom",
        "https://download.pytorch.org/whl/cu121",
        "+cu121",
    )
    assert choice.announcement() == (
        "Installing torch, the build at https://download.pytorch.org/whl/cu121 (Torch index URL preference), "
        "about 2.5 GB with its CUDA libraries"
    )
    mirror = tb.choose_torch(machine, "https://mirror.example/simple")
    assert mirror.index_url == "https://mirror.example/simple" and mirror.label is None
    assert mirror.announcement().endswith("download size not known")
    assert tb.choose_torch(machine, f"{CPU}/").label == "+cpu"


# --- the probes -----------------------------------------------------------------------------------


class FakeProbes:
    """Files, programs on PATH and what running them prints; records the commands run."""

    def __init__(self, files=None, programs=None, outputs=None, environ=None):
        self.files = dict(files or {})
        self.programs = dict(programs or {})
        self.outputs = dict(outputs or {})
        self.environ = dict(environ or {})
        self.ran: list[list[str]] = []

    def probe(self, system, arch="x86_64"):
        return tb.probe_machine(
            system=system,
            arch=arch,
            run=self.run,
            which=self.programs.get,
            exists=lambda path: path in self.files or path in self.programs.values(),
            read=self.files.get,
            environ=self.environ,
        )

    def run(self, argv, timeout=tb.PROBE_TIMEOUT):
        self.ran.append(list(argv))
        return self.outputs.get(tuple(argv[1:]), (None, f"cannot run {argv[0]}"))


QUERY = ("--query-gpu=name,compute_cap", "--format=csv,noheader")


def test_setup_probe_reads_nvidia_smi():
    fake = FakeProbes(
        programs={"nvidia-smi": "/usr/bin/nvidia-smi"},
        outputs={
            (): (0, SMI_HEADER.format(driver="550.54.15", cuda="12.4")),
            QUERY: (0, "NVIDIA GeForce RTX 3090, 8.6\nNVIDIA GeForce GTX 1080, 6.1\n"),
        },
    )
    machine = fake.probe("Linux")
    assert (machine.nvidia_driver, machine.cuda, machine.compute_capability) == ("550.54.15", (12, 4), (6, 1))
    assert machine.gpus == ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce GTX 1080") and not machine.rocm
    assert tb.choose_torch(machine).index_url.endswith("/cu124")
    # A driver before compute_cap was a query field: names only.
    fake.outputs[QUERY] = (6, 'Field "compute_cap" is not a valid field to query.')
    fake.outputs[("--query-gpu=name", "--format=csv,noheader")] = (0, "Tesla K80\n")
    machine = fake.probe("Linux")
    assert machine.gpus == ("Tesla K80",) and machine.compute_capability is None


def test_setup_probe_without_nvidia_or_with_a_broken_driver():
    assert tb.probe_machine(
        system="Linux",
        arch="x86_64",
        run=None,
        which=lambda _: None,
        exists=lambda _: False,
        read=lambda _: None,
        environ={},
    ) == tb.Machine("Linux", "x86_64")
    broken = FakeProbes(
        programs={"nvidia-smi": "/usr/bin/nvidia-smi"},
        outputs={(): (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")},
    )
    machine = broken.probe("Linux")
    assert machine.nvidia_driver == "" and "couldn't communicate" in machine.notes[0]
    choice = tb.choose_torch(machine)
    assert choice.kind == "cpu" and any("couldn't communicate" in note for note in choice.details)
    hung = FakeProbes(programs={"nvidia-smi": "/usr/bin/nvidia-smi"}, outputs={(): (None, "nvidia-smi did not answer")})
    assert hung.probe("Linux").nvidia_driver == ""


def test_setup_probe_finds_the_driver_without_nvidia_smi_and_on_windows_and_wsl():
    proc_only = FakeProbes(files={"/proc/driver/nvidia/version": PROC_VERSION}).probe("Linux")
    assert proc_only.nvidia_driver == "560.35.03" and proc_only.cuda is None
    smi = SMI_HEADER.format(driver="566.36", cuda="12.7")
    windows = FakeProbes(
        files={os.path.join(r"C:\Windows", "System32", "nvidia-smi.exe"): ""},
        outputs={(): (0, smi), QUERY: (0, "NVIDIA GeForce RTX 4070, 8.9\n")},
        environ={"SystemRoot": r"C:\Windows"},
    )
    machine = windows.probe("Windows", "AMD64")
    assert windows.ran[0] == [os.path.join(r"C:\Windows", "System32", "nvidia-smi.exe")]
    assert (machine.nvidia_driver, machine.cuda) == ("566.36", (12, 7))
    assert tb.choose_torch(machine).index_url.endswith("/cu126")
    wsl = FakeProbes(files={"/usr/lib/wsl/lib/nvidia-smi": ""}, outputs={(): (0, smi)}).probe("Linux")
    assert wsl.cuda == (12, 7)


def test_setup_probe_finds_rocm():
    opt = FakeProbes(files={"/opt/rocm": "", "/opt/rocm/.info/version": "6.2.0-66\n"}).probe("Linux")
    assert (opt.rocm, opt.rocm_version) == ("/opt/rocm", (6, 2))
    assert tb.choose_torch(opt).index_url.endswith("/rocm6.2")
    info = FakeProbes(programs={"rocminfo": "/usr/bin/rocminfo"}).probe("Linux")
    assert info.rocm == "/usr/bin/rocminfo" and info.rocm_version is None
    assert FakeProbes(files={"/opt/rocm": ""}).probe("Windows", "AMD64").rocm == ""


def test_setup_probe_never_raises_and_asks_nothing_on_macos():
    def explode(*_):
        raise RuntimeError("probe broke")

    machine = tb.probe_machine(system="Linux", arch="x86_64", run=explode, which=explode, exists=explode, read=explode)
    assert machine.nvidia_driver == "" and "probe broke" in machine.notes[0]
    assert tb.choose_torch(machine).kind == "cpu"
    mac = tb.probe_machine(system="Darwin", arch="arm64", run=explode, which=explode, exists=explode, read=explode)
    assert mac == tb.Machine("Darwin", "arm64")


def test_setup_probe_commands_time_out(tmp_path):
    slow = tmp_path / "slow"
    slow.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    slow.chmod(0o755)
    started = time.monotonic()
    assert tb.run_probe([str(slow)], timeout=0.5) == (None, "slow did not answer within 0.5 s")
    assert time.monotonic() - started < 10
    assert tb.run_probe([str(tmp_path / "missing")])[0] is None
    assert tb.run_probe([sys.executable, "-c", "print('hi')"]) == (0, "hi\n")


# --- the task, with a fake Python -----------------------------------------------------------------

FAKE_PYTHON = r"""#!{python}
import json, os, shutil, sys, time
CONFIG = json.load(open({config!r}))
args = sys.argv[1:]
try:
    with open(CONFIG["log"]) as handle:
        first = handle.readline().rstrip("\n")
except OSError:
    first = None
with open(CONFIG["calls"], "a") as handle:
    handle.write(json.dumps({{"argv": args, "log_first_line": first}}) + "\n")
torch = CONFIG["torch_file"]
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"), exist_ok=True)
    shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
elif args[:3] == ["-m", "pip", "install"] and "torch" in args:
    if CONFIG.get("hang_in_torch"):
        print("Collecting torch", flush=True)
        time.sleep(60)
    for line in CONFIG.get("downloads", []):
        print(line)
    url = args[args.index("--index-url") + 1] if "--index-url" in args else ""
    label = url.rstrip("/").rsplit("/", 1)[-1] if url else ""
    if not os.path.exists(torch):  # like pip: any torch already there satisfies "torch"
        with open(torch, "w") as handle:
            handle.write("2.5.1" + ("+" + label if label else ""))
elif args[:3] == ["-m", "pip", "install"] and not os.path.exists(torch):  # torch as a dependency, from PyPI
    with open(torch, "w") as handle:
        handle.write("2.5.1")
elif args[:3] == ["-m", "pip", "uninstall"]:
    os.remove(torch)
elif args[:1] == ["-c"] and "p2v_runtime" in args[1]:
    print(json.dumps({{"p2v_runtime": "0.1.0", "torch": open(torch).read(), "device": CONFIG["device"]}}))
elif args[:1] == ["-c"] and os.path.exists(torch):
    print(open(torch).read())
"""


def fake_python(tmp_path, **config):
    """A fake base Python (see the module docstring); returns it and the file of its calls."""
    config = {
        "calls": str(tmp_path / "calls.jsonl"),
        "log": str(tmp_path / "setup.log"),
        "torch_file": str(tmp_path / "torch-installed"),
        "device": "cpu",
        **config,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    python = tmp_path / "base-python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, config=str(tmp_path / "config.json")))
    python.chmod(0o755)
    return str(python), tmp_path / "calls.jsonl"


def calls(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pip_calls(path) -> list[dict]:
    return [c for c in calls(path) if c["argv"][:2] == ["-m", "pip"]]


def run_task(tmp_path, machine=None, url="", **config):
    python, recorded = fake_python(tmp_path, **config)
    task = runtime_setup.SetupTask(
        python,
        str(tmp_path / "venv"),
        ["/dist/p2v_runtime-0.1.0-py3-none-any.whl[runtime]"],
        torch_index_url=url,
        machine=machine,
        log_path=str(tmp_path / "setup.log"),
    )
    task.start()
    assert task.join(60)
    return task, recorded


@pytest.mark.parametrize(
    "machine, url, index, device",
    [
        (tb.Machine("Linux", "x86_64"), "", CPU, "cpu"),
        (tb.Machine("Darwin", "arm64"), "", "", "mps"),
        (
            nvidia(gpus=("NVIDIA GeForce RTX 3090",)),
            "",
            "https://download.pytorch.org/whl/cu124",
            "cuda (NVIDIA GeForce RTX 3090)",
        ),
        (
            tb.Machine("Linux", "x86_64", rocm="/opt/rocm", rocm_version=(6, 2)),
            "",
            "https://download.pytorch.org/whl/rocm6.2",
            "cuda (AMD Radeon RX 7900 XTX)",
        ),
        (
            tb.Machine("Linux", "x86_64"),
            "https://download.pytorch.org/whl/cu121",
            "https://download.pytorch.org/whl/cu121",
            "cuda (NVIDIA A10)",
        ),
    ],
)
def test_setup_announces_then_installs_torch_from_the_chosen_index_first(tmp_path, machine, url, index, device):
    task, recorded = run_task(tmp_path, machine, url, device=device)
    assert task.state == "done", task.message
    choice = tb.choose_torch(machine, url)
    log = (tmp_path / "setup.log").read_text().splitlines()
    assert task.announcement == choice.announcement() == log[0]
    # The announcement was in the log before any pip ran (each fake call recorded the first line).
    assert all(c["log_first_line"] == task.announcement for c in pip_calls(recorded))
    commands = [c["argv"][:2] for c in calls(recorded) if c["argv"][0] != "-c"]  # -c: torch version, check
    assert commands == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    torch_step, runtime_step = (c["argv"] for c in pip_calls(recorded))
    pip = ["-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    label = "+" + index.rsplit("/", 1)[1] if index else ""
    assert torch_step == pip + ["torch"] + (["--index-url", index] if index else [])
    assert runtime_step == pip + ["/dist/p2v_runtime-0.1.0-py3-none-any.whl[runtime]", f"torch==2.5.1{label}"]
    assert task.steps == task.step == 4
    assert task.message == f"Runtime ready: p2v_runtime 0.1.0, torch 2.5.1{label}, device {device}"
    assert f"torch 2.5.1{label} installed" in log


def test_setup_replaces_another_torch_build_and_reports_what_was_downloaded(tmp_path):
    (tmp_path / "torch-installed").write_text("2.5.1")  # an earlier set-up's PyPI (CUDA) build
    downloads = [
        "  Downloading https://download.pytorch.org/whl/cpu/torch-2.5.1%2Bcpu-cp311-cp311-linux_x86_64.whl (174.7 MB)",
        "Downloading sympy-1.13.1-py3-none-any.whl (6.2 MB)",
        "Downloading mpmath-1.3.0-py3-none-any.whl (536 kB)",
    ]
    task, recorded = run_task(tmp_path, tb.Machine("Linux", "x86_64"), downloads=downloads)
    assert task.state == "done", task.message
    argv = [c["argv"] for c in pip_calls(recorded)]
    assert argv[0] == ["-m", "pip", "uninstall", "--yes", "torch"] and argv[1][-3:] == ["torch", "--index-url", CPU]
    log = (tmp_path / "setup.log").read_text()
    assert "== Removing torch 2.5.1, another build than the one chosen" in log
    assert "torch 2.5.1+cpu installed, 0.18 GB downloaded" in log
    # The same build already there is kept (pip finds it satisfied); nothing is removed.
    (tmp_path / "calls.jsonl").unlink()
    task, recorded = run_task(tmp_path, tb.Machine("Linux", "x86_64"))
    assert task.state == "done" and [c["argv"][2] for c in pip_calls(recorded)] == ["install", "install"]


def test_setup_says_when_a_gpu_build_finds_no_gpu(tmp_path):
    task, _ = run_task(tmp_path, nvidia(), device="cpu")
    assert task.state == "done"
    assert task.message.endswith("device cpu (the CUDA build is installed but torch finds no GPU: see the log)")


def test_setup_can_be_cancelled_while_torch_installs(tmp_path):
    python, recorded = fake_python(tmp_path, hang_in_torch=True)
    task = runtime_setup.SetupTask(
        python, str(tmp_path / "venv"), ["p2v-runtime"], machine=nvidia(), log_path=str(tmp_path / "setup.log")
    )
    task.start()
    deadline = time.monotonic() + 30
    while "Collecting torch" not in task.lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert task.stage == "Installing torch" and task.announcement
    started = time.monotonic()
    task.cancel()
    assert task.join(20) and time.monotonic() - started < 10
    assert task.state == "cancelled" and task.message == "Set-up cancelled"
    assert len(pip_calls(recorded)) == 1  # the runtime was never installed


def test_setup_without_a_torch_choice_installs_only_the_runtime(tmp_path):
    """What the existing callers (tests, scripts) get: no probe, no torch step, no announcement."""
    task, recorded = run_task(tmp_path)
    assert task.state == "done" and task.announcement == "" and task.steps == 3
    assert [c["argv"][-1] for c in pip_calls(recorded)] == ["/dist/p2v_runtime-0.1.0-py3-none-any.whl[runtime]"]


def test_setup_detects_the_machine_in_its_thread(tmp_path, monkeypatch):
    seen = []

    def probe():
        seen.append(True)
        return tb.Machine("Linux", "x86_64")

    monkeypatch.setattr(tb, "probe_machine", probe)
    python, recorded = fake_python(tmp_path)
    task = runtime_setup.SetupTask(
        python, str(tmp_path / "venv"), ["p2v-runtime"], detect_torch=True, log_path=str(tmp_path / "setup.log")
    )
    task.start()
    assert task.join(60) and task.state == "done" and seen == [True]
    assert pip_calls(recorded)[0]["argv"][-2:] == ["--index-url", CPU]


def test_setup_torch_version_snippet_runs(tmp_path):
    """The real snippet on a real Python: a version (this venv has torch) or nothing, never an error."""
    done = subprocess.run([sys.executable, "-c", runtime_setup.TORCH_VERSION_SNIPPET], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == "" or done.stdout.strip()[0].isdigit()
