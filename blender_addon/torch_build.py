"""Which torch build "Set up runtime" installs: look at the machine, then choose a PyTorch index.

PyPI's default torch for Linux is the CUDA build (about 2.5 GB to download with its NVIDIA
libraries), wasted on a machine without an NVIDIA GPU; PyTorch's own indexes hold CPU, CUDA and
ROCm builds. :func:`probe_machine` looks (short timeouts, never raises), :func:`choose_torch`
decides from what it found (pure, so the tests fake any machine). Standard library only: this
runs in the set-up thread inside Blender's Python.

The decision (an explicit *Torch index URL* preference always wins):

=============================  =================================================================
machine                        torch build
=============================  =================================================================
macOS                          PyPI's default wheel (MPS on Apple silicon)
Linux/Windows, NVIDIA driver   the newest CUDA index in :data:`CUDA_BUILDS` whose CUDA version
                               the driver supports (``CUDA Version`` of ``nvidia-smi``) and
                               whose GPU generations include the oldest GPU found
driver CUDA 11.0 to 11.7       cu118, through CUDA's minor-version compatibility (said so)
driver older than CUDA 11      CPU build, with the reason (update the driver or set the URL)
Linux on ARM, NVIDIA driver    cu128 or newer only (no older ARM CUDA builds), else CPU
Linux, ROCm, no NVIDIA driver  the newest ROCm index in :data:`ROCM_BUILDS` not newer than the
                               installed ROCm (the newest when its version is unknown)
otherwise (Linux, Windows)     CPU build from ``https://download.pytorch.org/whl/cpu``
=============================  =================================================================

Download sizes are estimates (:func:`estimate_gb`, from the wheels of torch 2.5 to 2.9): the
indexes publish no sizes that pip's dry run reports, and asking them would make the set-up need
the network before it starts. The task logs what pip actually downloaded afterwards.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field

PYTORCH_INDEX = "https://download.pytorch.org/whl"
CPU_INDEX = f"{PYTORCH_INDEX}/cpu"

# (index, the CUDA version the driver must report, the lowest Linux driver with that CUDA (used
# when nvidia-smi is missing), the oldest GPU compute capability the builds include). Newest
# first. cu128 and later builds dropped Maxwell, Pascal and Volta (below 7.5), so an older GPU
# gets cu126 even from a new driver; Blackwell GPUs need cu128, which their drivers support.
CUDA_BUILDS = (
    ("cu130", (13, 0), (580, 65, 6), (7, 5)),
    ("cu128", (12, 8), (570, 26), (7, 5)),
    ("cu126", (12, 6), (560, 28, 3), (5, 0)),
    ("cu124", (12, 4), (550, 54, 14), (5, 0)),
    ("cu121", (12, 1), (530, 30, 2), (5, 0)),
    ("cu118", (11, 8), (520, 61, 5), (3, 7)),
)
MINOR_COMPAT_FROM = (11, 0)  # drivers of CUDA 11.0-11.7 run cu118 builds (minor-version compatibility)
ARM_CUDA_FROM = "cu128"  # PyTorch's CUDA builds for Linux on ARM (aarch64) start here
# (index, ROCm version); PyTorch's ROCm wheels carry their own ROCm libraries. Newest first.
ROCM_BUILDS = (
    ("rocm6.4", (6, 4)),
    ("rocm6.3", (6, 3)),
    ("rocm6.2", (6, 2)),
    ("rocm6.1", (6, 1)),
    ("rocm6.0", (6, 0)),
    ("rocm5.7", (5, 7)),
)
PROBE_TIMEOUT = 10.0  # seconds for one nvidia-smi call: a busy or broken driver can hang it


@dataclass(frozen=True)
class Machine:
    """What :func:`probe_machine` found; every field may be faked in the tests."""

    system: str  # platform.system(): "Linux", "Windows", "Darwin"
    arch: str  # platform.machine(): "x86_64", "AMD64", "arm64", "aarch64"
    nvidia_driver: str = ""  # "550.54.15"; empty when no NVIDIA driver was found
    cuda: tuple[int, int] | None = None  # the CUDA version the driver supports ("CUDA Version: 12.4")
    gpus: tuple[str, ...] = ()  # GPU names
    compute_capability: tuple[int, int] | None = None  # the oldest GPU's
    rocm: str = ""  # where ROCm was found (a folder or rocminfo); empty when not
    rocm_version: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()  # what the probes could not tell, for the log


@dataclass(frozen=True)
class TorchChoice:
    """The torch build to install: ``index_url`` empty means PyPI's default wheel."""

    kind: str  # "cpu", "cuda", "rocm", "default" or "custom" (the preference's URL)
    index_url: str
    what: str  # "CPU build (no NVIDIA driver found)", for the user
    size_gb: float | None  # estimated download, None when not known
    label: str | None  # the local version label its wheels have ("+cpu", "+cu124", ""), None: unknown
    details: tuple[str, ...] = field(default=())  # more reasons and probe notes, for the log

    @property
    def size_text(self) -> str:
        if self.size_gb is None:
            return "download size not known"
        extra = {"cuda": " with its CUDA libraries", "rocm": " with its ROCm libraries"}.get(
            build_family(self.label), ""
        )
        return f"about {self.size_gb:g} GB{extra}"

    def announcement(self) -> str:
        """The line said before pip starts: which build, why, and about how much to download."""
        return f"Installing torch, {self.what}, {self.size_text}"


def build_family(label: str | None) -> str:
    """The kind of a build label: "+cu124" is "cuda", "+rocm6.2" "rocm", "+cpu" "cpu", PyPI's "" ""."""
    if not label:
        return ""
    return "cuda" if label.startswith("+cu") else "rocm" if label.startswith("+rocm") else label.lstrip("+")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _dotted(version) -> str:
    return ".".join(str(part) for part in version)


def estimate_gb(label: str | None, system: str, arch: str = "") -> float | None:
    """Estimated download of torch with its dependencies for a build label (estimates, see above)."""
    family = build_family(label)
    if label == "":  # PyPI's default wheel
        if system == "Darwin":
            return 0.1 if arch == "arm64" else 0.2
        if system == "Linux" and arch in ("x86_64", "AMD64"):
            return 2.5  # PyPI's Linux wheel is a CUDA build
        return 0.2
    if family == "cpu":
        return 0.2
    if family == "cuda":
        return 3.0 if _version(label) >= (128,) else 2.5
    if family == "rocm":
        return 4.0
    return None


def index_label(url: str) -> str | None:
    """The local version label of the wheels at a PyTorch index URL (``.../cu124`` -> ``+cu124``)."""
    last = url.rstrip("/").rsplit("/", 1)[-1].lower()
    if re.fullmatch(r"cpu|cu\d+|rocm\d+(\.\d+)*", last):
        return "+" + last
    if "pypi.org" in url:
        return ""
    return None


def this_platform() -> Machine:
    """The machine's system and architecture only (no probes): enough when the URL is given."""
    return Machine(platform.system(), platform.machine())


def choose_torch(machine: Machine, index_url: str = "") -> TorchChoice:
    """The torch build for ``machine`` (see the table above); ``index_url`` (the preference) wins."""
    notes = tuple(machine.notes)
    index_url = index_url.strip()
    if index_url:
        label = index_label(index_url)
        return TorchChoice(
            "custom",
            index_url,
            f"the build at {index_url} (Torch index URL preference)",
            estimate_gb(label, machine.system, machine.arch),
            label,
            notes,
        )
    if machine.system == "Darwin":
        why = "MPS on Apple silicon" if machine.arch == "arm64" else "CPU: torch 2.2 is the last for Intel Macs"
        return TorchChoice(
            "default", "", f"PyPI's default macOS build ({why})", estimate_gb("", "Darwin", machine.arch), "", notes
        )
    if machine.system not in ("Linux", "Windows"):
        return TorchChoice(
            "default",
            "",
            f"PyPI's default build (no PyTorch index for {machine.system or 'this system'})",
            None,
            "",
            notes,
        )
    if machine.nvidia_driver:
        return _choose_cuda(machine, notes)
    if machine.system == "Linux" and machine.rocm:
        return _choose_rocm(machine, notes)
    return _cpu("no NVIDIA driver found", machine, notes)


def _cpu(reason: str, machine: Machine, notes: tuple[str, ...]) -> TorchChoice:
    return TorchChoice("cpu", CPU_INDEX, f"CPU build ({reason})", estimate_gb("+cpu", machine.system), "+cpu", notes)


def _choose_cuda(machine: Machine, notes: tuple[str, ...]) -> TorchChoice:
    driver = f"NVIDIA driver {machine.nvidia_driver}"
    cuda = machine.cuda
    if cuda is None:  # /proc/driver/nvidia/version without nvidia-smi: the driver's own version
        found = _version(machine.nvidia_driver)
        if not found:
            notes += ("set Torch index URL for a CUDA build",)
            return _cpu("an NVIDIA driver is loaded but neither its version nor nvidia-smi was found", machine, notes)
        cuda = next((need for _, need, least, _ in CUDA_BUILDS if found >= least), None)
        if cuda is None:
            cuda = MINOR_COMPAT_FROM if found >= (450, 80, 2) else (10, 0)
        notes += (f"no nvidia-smi: assumed CUDA {_dotted(cuda)} from the driver version {machine.nvidia_driver}",)
    arm = machine.system == "Linux" and machine.arch in ("aarch64", "arm64")
    builds = CUDA_BUILDS
    if arm:
        builds = builds[: [name for name, *_ in builds].index(ARM_CUDA_FROM) + 1]
    compute = machine.compute_capability
    usable = [b for b in builds if compute is None or compute >= b[3]]
    chosen = next((b for b in usable if cuda >= b[1]), None)
    compat = ""
    if chosen is None and not arm and cuda >= MINOR_COMPAT_FROM and usable and usable[-1][0] == "cu118":
        chosen = usable[-1]
        compat = f"; the driver's CUDA {_dotted(cuda)} runs it through CUDA's minor-version compatibility"
    if chosen is None:
        if not usable:
            why = f"GPU compute capability {_dotted(compute)} is older than PyTorch's CUDA builds support"
        elif arm:
            why = (
                f"PyTorch's CUDA builds for ARM Linux need CUDA {_dotted(builds[-1][1])}; {driver} has {_dotted(cuda)}"
            )
        else:
            why = f"{driver} (CUDA {_dotted(cuda)}) is too old for PyTorch's CUDA builds"
        notes += ("update the NVIDIA driver, or set Torch index URL, for a CUDA build",)
        return _cpu(why, machine, notes)
    name, need, _, oldest = chosen
    if compute is not None and compute < (7, 5) and cuda >= CUDA_BUILDS[1][1] and oldest < (7, 5):
        notes += (
            f"{name}: newer CUDA builds leave out GPUs below compute capability 7.5 (this one: {_dotted(compute)})",
        )
    gpu = ""
    if len(set(machine.gpus)) == 1:
        gpu = f" ({machine.gpus[0]})"
    elif machine.gpus:
        gpu = f" ({len(machine.gpus)} GPUs)"
    label = "+" + name
    return TorchChoice(
        "cuda",
        f"{PYTORCH_INDEX}/{name}",
        f"CUDA {_dotted(need)} build for {driver}{gpu}{compat}",
        estimate_gb(label, machine.system),
        label,
        notes,
    )


def _choose_rocm(machine: Machine, notes: tuple[str, ...]) -> TorchChoice:
    have = machine.rocm_version
    chosen = ROCM_BUILDS[0] if have is None else next((b for b in ROCM_BUILDS if have >= b[1]), None)
    if chosen is None:
        why = f"ROCm {_dotted(have)} in {machine.rocm} is older than PyTorch's ROCm builds; no NVIDIA driver found"
        return _cpu(why, machine, notes)
    name, version = chosen
    found = f"ROCm {_dotted(have)}" if have else "ROCm"
    label = "+" + name
    return TorchChoice(
        "rocm",
        f"{PYTORCH_INDEX}/{name}",
        f"ROCm {_dotted(version)} build ({found} found in {machine.rocm}, no NVIDIA driver)",
        estimate_gb(label, machine.system),
        label,
        notes,
    )


# --- probing the machine --------------------------------------------------------------------------


def run_probe(argv: list[str], timeout: float = PROBE_TIMEOUT) -> tuple[int | None, str]:
    """``(exit status, output)`` of a probe command; ``(None, reason)`` when it cannot run or hangs."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
        )
    except subprocess.TimeoutExpired:
        return None, f"{os.path.basename(argv[0])} did not answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return None, f"cannot run {argv[0]}: {getattr(exc, 'strerror', None) or exc}"
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(4096)
    except OSError:
        return None


def _nvidia_smi(system: str, which, exists, environ) -> str:
    """Where nvidia-smi is: on PATH, in System32 (Windows) or WSL's driver folder; empty if nowhere."""
    found = which("nvidia-smi")
    if found:
        return found
    if system == "Windows":
        root = environ.get("SystemRoot", r"C:\Windows")
        places = [
            os.path.join(root, "System32", "nvidia-smi.exe"),
            os.path.join(
                environ.get("ProgramFiles", r"C:\Program Files"), "NVIDIA Corporation", "NVSMI", "nvidia-smi.exe"
            ),
        ]
    else:
        places = ["/usr/lib/wsl/lib/nvidia-smi", "/usr/bin/nvidia-smi"]
    return next((place for place in places if exists(place)), "")


def parse_nvidia_smi(text: str) -> tuple[str, tuple[int, int] | None]:
    """Driver version and CUDA version from ``nvidia-smi``'s header ("Driver Version: 550.54.15 ...
    CUDA Version: 12.4"); empty / None for what it does not say."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (driver.group(1) if driver else "", (int(cuda.group(1)), int(cuda.group(2))) if cuda else None)


def parse_gpu_query(text: str) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """GPU names and the oldest compute capability from ``--query-gpu=name,compute_cap`` CSV lines."""
    names, capabilities = [], []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if not parts[0] or parts[0].lower().startswith(("name", "field", "error", "invalid")):
            continue
        names.append(parts[0])
        if len(parts) > 1 and re.fullmatch(r"\d+\.\d+", parts[1]):
            major, minor = parts[1].split(".")
            capabilities.append((int(major), int(minor)))
    return tuple(names), min(capabilities) if capabilities else None


def probe_machine(
    *,
    system: str | None = None,
    arch: str | None = None,
    run=run_probe,
    which=shutil.which,
    exists=os.path.exists,
    read=_read,
    environ=None,
) -> Machine:
    """What the machine has for torch: platform, NVIDIA driver, CUDA version, GPUs, ROCm.

    Each probe has a short timeout and nothing here raises: what cannot be told goes into
    ``notes`` and the machine counts as having no GPU. The keyword arguments fake the probes.
    """
    system = system if system is not None else platform.system()
    arch = arch if arch is not None else platform.machine()
    environ = os.environ if environ is None else environ
    notes: list[str] = []
    try:
        if system not in ("Linux", "Windows"):
            return Machine(system, arch)
        driver, cuda, gpus, compute = "", None, (), None
        if system == "Linux":
            proc = read("/proc/driver/nvidia/version")
            if proc:
                found = re.search(r"Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc)
                driver = found.group(1) if found else "(unknown version)"
        smi = _nvidia_smi(system, which, exists, environ)
        if smi:
            code, out = run([smi])
            smi_driver, cuda = parse_nvidia_smi(out) if code == 0 else ("", None)
            if smi_driver:
                driver = smi_driver
                code, out = run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"])
                if code != 0:  # drivers before compute_cap was a field
                    code, out = run([smi, "--query-gpu=name", "--format=csv,noheader"])
                if code == 0:
                    gpus, compute = parse_gpu_query(out)
            else:
                last = next((line.strip() for line in reversed(out.splitlines()) if line.strip()), "no output")
                notes.append(f"{smi} answered without a driver version (exit status {code}): {last[:200]}")
        rocm, rocm_version = "", None
        if system == "Linux" and not driver:
            root = environ.get("ROCM_PATH") or "/opt/rocm"
            rocminfo = "" if exists(root) else which("rocminfo")
            if rocminfo:  # <root>/bin/rocminfo
                root = os.path.dirname(os.path.dirname(os.path.realpath(rocminfo)))
            rocm = rocminfo or (root if exists(root) else "")
            if rocm:
                text = read(os.path.join(root, ".info", "version")) or ""
                found = re.match(r"\s*(\d+)\.(\d+)", text)
                rocm_version = (int(found.group(1)), int(found.group(2))) if found else None
        return Machine(system, arch, driver, cuda, gpus, compute, rocm, rocm_version, tuple(notes))
    except Exception as exc:  # noqa: BLE001 - a probe that breaks must not stop the set-up
        notes.append(f"probing the machine failed ({type(exc).__name__}: {exc}); assuming no GPU")
        return Machine(system, arch, notes=tuple(notes))
