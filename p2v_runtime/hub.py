"""Where a model's files come from: a local folder, or a hub id found in the Hugging Face cache.

A job never asks the libraries to reach the hub: it loads from a folder. A hub id is looked up in
the Hugging Face cache (``models--org--name/snapshots/<commit>/``, the layout huggingface_hub
writes); when the files one precision needs are not all there, they are fetched here, with sizes
announced, the disk space checked first and progress reported, or the job stops with one line
saying what to do. ``p2v models fetch`` runs the same fetch ahead of a job.

The network goes through huggingface_hub only (``HfApi.model_info`` for the file list and sizes,
``hf_hub_download`` for each file), at the endpoint ``HF_ENDPOINT`` names; tests point that at a
local fake hub. Standard library at import: the command starts fast and does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ModelLoadError, P2VError

# What each kind of model is called in messages, and the option that names it.
ROLES = {
    "model": ("model", "--model"),
    "captioner": ("captioner", "--captioner"),
    "clip": ("CLIP model", "--clip-model"),
}

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Files a loader reads besides the weights: configs, tokenizer vocabularies, sentencepiece models.
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
# Classes of pipeline components that have no weights.
_WEIGHTLESS = ("Tokenizer", "TokenizerFast", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def human_bytes(count: float) -> str:
    """Sizes as the hub shows them: decimal units, three significant digits (2.82 GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            value = count / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(count)} B"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (as huggingface_hub reads it)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


# -- names: folder or hub id --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelName:
    """What a model setting names: a local folder, or a hub id (maybe also a relative path)."""

    text: str
    folder: Path | None = None
    repo_id: str | None = None


def parse_name(name: str, role: str = "model") -> ModelName:
    """A folder if one is there; a hub id if the text can be one; otherwise a missing folder (error).

    Paths that cannot be hub ids (absolute, ``./x``, ``~/x``, two slashes or more) must be folders,
    so a typo in a path says the folder is missing instead of the hub's "Repo id must be in the
    form ..." or an attempt to download it.
    """
    label = ROLES[role][0]
    text = name.strip()
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return ModelName(text, folder=Path(os.path.realpath(expanded)))
    if os.path.exists(expanded):
        raise ModelLoadError(f"cannot load {label}: {label} folder {text} is a file, not a folder")
    if looks_like_hub_id(text):
        return ModelName(text, repo_id=text)
    raise ModelLoadError(f"cannot load {label}: {label} folder {text} does not exist")


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name`` as the hub spells ids: never a path (no ``..``, ``/x``, ``~``, ``a/b/c``)."""
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith((".", "-"))


# -- which files a precision needs --------------------------------------------------------------


def _weight_groups(stem: str, variant: str, suffix: str) -> tuple[str, str, re.Pattern]:
    """(single file, index file, shard pattern) of one stem, variant ('' or 'fp16') and format.

    Shards are named ``model-00001-of-00002.fp16.safetensors`` (or, in older repositories,
    ``model.fp16-00001-of-00002.safetensors``); their index ``model.safetensors.index.fp16.json``.
    """
    dotted = f".{variant}" if variant else ""
    single = f"{stem}{dotted}{suffix}"
    index = f"{stem}{suffix}.index{dotted}.json"
    stem_re, dotted_re, suffix_re = re.escape(stem), re.escape(dotted), re.escape(suffix)
    if variant:
        shards = re.compile(rf"^{stem_re}(?:-\d+-of-\d+{dotted_re}|{dotted_re}-\d+-of-\d+){suffix_re}$")
    else:
        shards = re.compile(rf"^{stem_re}-\d+-of-\d+{suffix_re}$")
    return single, index, shards


def weight_preference(dtype: str) -> list[tuple[str, str]]:
    """(variant, format) in the order tried: the precision asked for first, safetensors before .bin.

    fp16 takes the fp16 variant when a component has one and the full-precision files where it
    has none; fp32 takes full precision, or an fp16 variant where that is all there is (loaded and
    widened). safetensors comes first in both: it loads without unpickling.
    """
    if dtype == "fp16":
        return [("fp16", ".safetensors"), ("", ".safetensors"), ("fp16", ".bin"), ("", ".bin")]
    return [("", ".safetensors"), ("fp16", ".safetensors"), ("", ".bin"), ("fp16", ".bin")]


def choose_weights(names: Iterable[str], dtype: str) -> list[str]:
    """The weight files of one folder's listing that a loader reads for ``dtype``; [] if none."""
    names = set(names)
    for variant, suffix in weight_preference(dtype):
        for stem in WEIGHT_STEMS:
            single, index, shards = _weight_groups(stem, variant, suffix)
            if single in names:
                return [single]
            if index in names:
                parts = sorted(n for n in names if shards.match(n))
                if parts:
                    return [index, *parts]
    return []


def has_weights(names: Iterable[str]) -> bool:
    return bool(choose_weights(names, "fp32"))


def _by_folder(paths: Iterable[str]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for path in paths:
        posix = PurePosixPath(path)
        folders.setdefault("" if len(posix.parts) == 1 else str(posix.parent), []).append(posix.name)
    return folders


def _is_config(name: str) -> bool:
    return name.endswith(_CONFIG_SUFFIXES) and not name.startswith(".") and ".index" not in name


def pipeline_components(model_index: dict) -> dict[str, str]:
    """component folder -> class name, for the components a diffusers model_index.json uses."""
    components = {}
    for key, value in model_index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] is None:
            continue
        components[key] = str(value[1])
    return components


def needed_files(paths: Iterable[str], dtype: str, model_index: dict | None = None) -> list[str]:
    """The files of a repository listing (or a folder) that loading it in ``dtype`` reads.

    A diffusers pipeline (``model_index.json``): that file, then for each component it names,
    the component folder's configs and the chosen weights. Anything else (a transformers model):
    the top level's configs and chosen weights. Whole-model checkpoints (``*.ckpt``), other
    frameworks' weights, other precisions, README files and pictures are left out.
    """
    folders = _by_folder(paths)
    if model_index is not None:
        wanted = ["model_index.json"]
        for component in pipeline_components(model_index):
            names = folders.get(component, [])
            wanted += [f"{component}/{n}" for n in sorted(names) if _is_config(n)]
            wanted += [f"{component}/{n}" for n in choose_weights(names, dtype)]
        return wanted
    names = folders.get("", [])
    return [n for n in sorted(names) if _is_config(n)] + choose_weights(names, dtype)


@dataclass
class LocalStatus:
    """What a folder holds for one precision: whether it can be loaded, and what is missing."""

    folder: Path
    dtype: str
    missing: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # the needed files present -> size
    weights: dict[str, list[str]] = field(default_factory=dict)  # component ('' at top) -> weight files

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def size(self) -> int:
        return sum(self.files.values())

    def precisions(self) -> str:
        """Which weight files the chosen set is made of: "fp16", "fp32" or "fp16 and fp32"."""
        kinds = {"fp16" if ".fp16." in n else "fp32" for names in self.weights.values() for n in names}
        return " and ".join(sorted(kinds)) or "no"

    def variant(self) -> str | None:
        """'fp16' when some component's chosen weights are its fp16 variant (diffusers' ``variant``)."""
        return "fp16" if any(".fp16." in n for names in self.weights.values() for n in names) else None


def folder_files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative POSIX path -> size), through the cache's symlinks."""
    found = {}
    for root, _dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root, name)
            try:
                size = path.stat().st_size  # follows the snapshot's symlink; a dangling one is missing
            except OSError:
                continue
            found[path.relative_to(folder).as_posix()] = size
    return found


def local_status(folder: Path, dtype: str) -> LocalStatus:
    """Whether ``folder`` can be loaded in ``dtype`` from what is on disk (no network)."""
    folder = Path(folder)
    present = folder_files(folder)
    status = LocalStatus(folder, dtype)
    folders = _by_folder(present)
    model_index = _read_json(folder / "model_index.json")
    if model_index is not None:
        parts = [(c, cls) for c, cls in pipeline_components(model_index).items()]
    elif "config.json" in present:
        parts = [("", "")]
    else:
        status.missing.append("model_index.json or config.json")
        return status
    for component, class_name in parts:
        names = folders.get(component, [])
        prefix = f"{component}/" if component else ""
        if not names:
            status.missing.append(f"{component}/")
            continue
        configs = [n for n in names if _is_config(n)]
        if not configs:
            status.missing.append(f"{prefix}config")
        weightless = class_name.endswith(_WEIGHTLESS)
        weights = [] if weightless else choose_weights(names, dtype)
        if not weightless and not weights:
            status.missing.append(f"{prefix}weights")
        if weights:
            status.weights[component] = weights
        for name in configs + weights:
            status.files[prefix + name] = present[prefix + name]
    if model_index is not None:
        status.files["model_index.json"] = present["model_index.json"]
    return status


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the Hugging Face cache ---------------------------------------------------------------------


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The snapshot ``refs/main`` points to; else the most recently written one; else None."""
    storage = repo_folder(repo_id, cache)
    try:
        commit = (storage / "refs" / "main").read_text().strip()
    except OSError:
        commit = ""
    if commit and (storage / "snapshots" / commit).is_dir():
        return storage / "snapshots" / commit
    try:
        snapshots = [p for p in (storage / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


@dataclass
class CachedRepo:
    repo_id: str
    folder: Path
    size: int  # bytes of finished blobs
    partial: int  # bytes of unfinished downloads
    snapshot: Path | None


def scan_cache(cache: Path | None = None) -> list[CachedRepo]:
    """Every model repository in the hub cache, with its size on disk (blobs are shared, counted once)."""
    cache = cache or hub_cache_dir()
    repos = []
    try:
        folders = sorted(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("models--"))
    except OSError:
        return []
    for folder in folders:
        repo_id = folder.name[len("models--") :].replace("--", "/")
        size = partial = 0
        blobs = folder / "blobs"
        for blob in blobs.iterdir() if blobs.is_dir() else ():
            try:
                length = blob.stat().st_size
            except OSError:
                continue
            if blob.name.endswith(".incomplete"):
                partial += length
            else:
                size += length
        repos.append(CachedRepo(repo_id, folder, size, partial, cached_snapshot(repo_id, cache)))
    return repos


# -- the hub ------------------------------------------------------------------------------------


class HubUnreachable(ModelLoadError):
    """The hub did not answer (no network, a closed port, DNS) or offline mode is on."""


@dataclass
class RemoteFile:
    name: str
    size: int
    cached: bool = False


@dataclass
class Plan:
    """The files of one model in one precision, and which of them are still to download."""

    repo_id: str
    role: str
    dtype: str
    commit: str
    files: list[RemoteFile]
    cache: Path

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def to_download(self) -> int:
        return sum(f.size for f in self.files if not f.cached)

    @property
    def snapshot(self) -> Path:
        return repo_folder(self.repo_id, self.cache) / "snapshots" / self.commit


def _quiet_hub() -> None:
    """huggingface_hub's own bars and retry warnings would interleave with our progress lines."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


def _network_error_message(name: ModelName, role: str, exc: BaseException | None) -> str:
    option = ROLES[role][1]
    where = "HF_HUB_OFFLINE is set" if exc is None else "the hub is unreachable"
    return (
        f"`{name.text}` is not in the Hugging Face cache and {where}: run `p2v models fetch` where there is "
        f"network, or pass {option} a folder"
    )


def plan_download(name: ModelName, role: str, dtype: str, cache: Path | None = None, timeout: float = 15) -> Plan:
    """Ask the hub for the file list and sizes (one call, no retries), then pick the files for ``dtype``.

    A pipeline's model_index.json is fetched first (a few hundred bytes): it says which component
    folders the pipeline loads.
    """
    cache = Path(cache or hub_cache_dir())
    if hub_offline():
        raise HubUnreachable(_network_error_message(name, role, None))
    _quiet_hub()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    label, option = ROLES[role]
    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(name.repo_id, files_metadata=True, timeout=timeout)
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"`{name.text}` is gated on the hub: accept its terms on its page and log in (`hf auth login`)"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelLoadError(
            f"no {label} `{name.text}` on the hub (a typo? a private model needs `hf auth login`); "
            f"or pass {option} a folder"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status < 500:
            raise ModelLoadError(f"the hub refused `{name.text}` (HTTP {status}); or pass {option} a folder") from exc
        raise HubUnreachable(_network_error_message(name, role, exc)) from exc
    except Exception as exc:  # noqa: BLE001 - connection, DNS, TLS and timeout errors of any HTTP stack
        raise HubUnreachable(_network_error_message(name, role, exc)) from exc
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    commit = info.sha
    model_index = None
    if "model_index.json" in sizes:
        try:
            index_path = _download(name.repo_id, "model_index.json", commit, cache, None)
        except Exception as exc:  # noqa: BLE001 - the list came, the first file did not: one line
            raise ModelLoadError(f"cannot fetch model_index.json of `{name.text}` ({_first_line(exc)})") from exc
        model_index = _read_json(Path(index_path))
    names = needed_files(sizes, dtype, model_index)
    if not any(_is_weight(n) for n in names):
        raise ModelLoadError(f"`{name.text}` on the hub has no weights this runtime can load (safetensors or .bin)")
    snapshot = repo_folder(name.repo_id, cache) / "snapshots" / commit
    files = [RemoteFile(n, sizes[n], (snapshot / n).exists()) for n in names]
    files.sort(key=lambda f: (f.name != "model_index.json", f.size, f.name))  # weights last: see fetch
    return Plan(name.repo_id, role, dtype, commit, files, cache)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_weight(name: str) -> bool:
    return PurePosixPath(name).name.startswith(WEIGHT_STEMS) and name.endswith(WEIGHT_SUFFIXES)


def free_bytes(path: Path) -> int:
    """Free space of the disk that holds ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(os.getcwd()).free


def check_disk(plan: Plan) -> None:
    free = free_bytes(plan.cache)
    if plan.to_download > free:
        raise ModelLoadError(
            f"not enough disk space for `{plan.repo_id}` ({plan.dtype}): {human_bytes(plan.to_download)} to "
            f"download into {plan.cache}, {human_bytes(free)} free; free some space or set HF_HUB_CACHE to "
            f"another disk"
        )


class ByteMeter:
    """Bytes done of a total, with the rate and time left over the last few seconds."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] | None = None):
        self.total, self.done = total, done
        self.clock = clock or (lambda: time.monotonic())
        self.started = self.clock()
        self.samples: list[tuple[float, int]] = [(self.started, done)]

    def advance(self, count: int) -> None:
        self.done += count
        now = self.clock()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 10:  # a window of about ten seconds
            self.samples.pop(0)

    @property
    def rate(self) -> float:
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def describe(self) -> str:
        """``1.20 GB of 2.82 GB (43%), 35.2 MB/s, 46 s left``: the form of every progress line."""
        percent = 100 * self.done / self.total if self.total else 100.0
        text = f"{human_bytes(self.done)} of {human_bytes(self.total)} ({percent:.0f}%)"
        if self.rate > 0:
            text += f", {human_bytes(self.rate)}/s"
        left = self.seconds_left
        if left is not None and self.done < self.total:
            text += f", {format_seconds(left)} left"
        return text


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def fetch(plan: Plan, on_bytes: Callable[[int], None] | None = None) -> Path:
    """Download the plan's missing files into the cache, one at a time; return the snapshot folder.

    ``on_bytes(n)`` is called as bytes arrive (it may raise to cancel: the file being written is
    dropped, the finished ones stay). Files go smallest first, so an interrupted fetch leaves the
    configs and lacks weights, which ``local_status`` reports as incomplete. Each finished file is
    kept, so running the fetch again downloads only what is missing; huggingface_hub itself resumes
    a file after a dropped connection. ``refs/main`` is written last, so the snapshot it names is
    always complete.
    """
    _quiet_hub()
    for item in plan.files:
        if item.cached and (plan.snapshot / item.name).exists():
            continue
        reported = [0]

        def counted(count: int, reported=reported) -> None:
            reported[0] += count
            on_bytes(count)

        try:
            _download(plan.repo_id, item.name, plan.commit, plan.cache, counted if on_bytes else None)
            if on_bytes is not None and item.size > reported[0]:  # a blob another file already brought
                on_bytes(item.size - reported[0])
        except P2VError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dropped network, a full disk: one line, and what to do
            reason = _first_line(exc)
            done = sum(1 for f in plan.files if f.cached)
            raise ModelLoadError(
                f"downloading `{plan.repo_id}` stopped at {item.name} ({reason[:160]}); {done} of "
                f"{len(plan.files)} files are kept: run `p2v models fetch` again to fetch the rest"
            ) from exc
        item.cached = True
    refs = repo_folder(plan.repo_id, plan.cache) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    from .files import atomic_write_text

    atomic_write_text(refs / "main", plan.commit)
    return plan.snapshot


def _download(repo_id: str, filename: str, commit: str, cache: Path, on_bytes) -> str:
    """One file through ``hf_hub_download``, its bytes reported through a tqdm stand-in."""
    import inspect

    from huggingface_hub import hf_hub_download

    kwargs = dict(repo_id=repo_id, filename=filename, revision=commit, cache_dir=str(cache), endpoint=hub_endpoint())
    if on_bytes is None:
        return hf_hub_download(**kwargs)
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        return hf_hub_download(**kwargs, tqdm_class=_bytes_reporter(on_bytes))
    return _download_watching_disk(kwargs, repo_folder(repo_id, cache) / "blobs", on_bytes)


def _bytes_reporter(on_bytes: Callable[[int], None]) -> type:
    """A class huggingface_hub can use as its ``tqdm_class``: it counts bytes and draws nothing."""

    class Reporter:
        def __init__(self, *args, **kwargs):
            initial = kwargs.get("initial") or 0
            if initial:
                on_bytes(int(initial))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count=1):
            if count:
                on_bytes(int(count))

        def update_transfer(self, count=1):  # network bytes of a Xet transfer; `update` counts the file
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        def set_transfer_postfix_str(self, *args, **kwargs):
            pass

        def set_description(self, *args, **kwargs):
            pass

        def refresh(self, *args, **kwargs):
            pass

        def close(self):
            pass

    return Reporter


def _download_watching_disk(kwargs: dict, blobs: Path, on_bytes) -> str:
    """For huggingface_hub before 1.1 (no ``tqdm_class``): watch the ``*.incomplete`` file grow."""
    import threading

    from huggingface_hub import hf_hub_download

    seen = [0]
    stop = threading.Event()

    def in_flight() -> int:
        try:
            return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
        except OSError:
            return seen[0]

    result: dict = {}

    def run():
        try:
            result["path"] = hf_hub_download(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            result["error"] = exc
        finally:
            stop.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while not stop.wait(0.25):
        now = in_flight()
        if now > seen[0]:
            on_bytes(now - seen[0])  # may raise: the download thread is a daemon and its file is dropped
            seen[0] = now
    if "error" in result:
        raise result["error"]
    path = result["path"]
    size = os.path.getsize(path)
    if size > seen[0]:
        on_bytes(size - seen[0])
    return path


# -- what a job loads -----------------------------------------------------------------------------


def local_model(
    name: str,
    role: str,
    dtype: str,
    *,
    download: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, LocalStatus]:
    """The folder to load ``name`` from in ``dtype``, fetching a hub id's missing files first.

    A folder is used as it is (a missing part is named). A hub id whose files are in the cache
    loads from there without the network. Otherwise, unless ``download`` is off or the hub is
    offline or unreachable (one line each, no retries), the files are fetched with a warning that
    says so and ``progress("download", done, total)`` in bytes.
    """
    label, option = ROLES[role]
    parsed = parse_name(name, role)
    if parsed.folder is not None:
        status = local_status(parsed.folder, dtype)
        if not status.complete:
            raise ModelLoadError(
                f"cannot load {label} from folder {parsed.text}: it lacks {', '.join(status.missing)} "
                f"(a Hugging Face model folder has model_index.json or config.json and weights)"
            )
        return parsed.folder, status
    cache = hub_cache_dir()
    snapshot = cached_snapshot(parsed.repo_id, cache)
    status = local_status(snapshot, dtype) if snapshot is not None else None
    if status is not None and status.complete:
        return snapshot, status
    partly = status is not None and bool(status.files)
    if not download or hub_offline():
        state = "is only partly in the Hugging Face cache" if partly else "is not in the Hugging Face cache"
        if not download:
            raise HubUnreachable(f"`{parsed.text}` {state}: run `p2v models fetch`, or pass {option} a folder")
        raise HubUnreachable(
            f"`{parsed.text}` {state} and HF_HUB_OFFLINE is set: run `p2v models fetch` where there is "
            f"network, or pass {option} a folder"
        )
    plan = plan_download(parsed, role, dtype, cache)
    check_disk(plan)
    if plan.to_download and warn is not None:
        warn(
            f"downloading {label} `{parsed.text}` ({dtype}): {human_bytes(plan.to_download)} of "
            f"{human_bytes(plan.total)} into {cache} (`p2v models fetch` does this before a job)"
        )
    meter = ByteMeter(plan.total, plan.total - plan.to_download)

    def on_bytes(count: int) -> None:
        meter.advance(count)
        if progress is not None:
            progress("download", min(meter.done, meter.total), meter.total)

    if progress is not None:
        progress("download", meter.done, meter.total)
    snapshot = fetch(plan, on_bytes)
    status = local_status(snapshot, dtype)
    if not status.complete:
        raise ModelLoadError(
            f"`{parsed.text}` was downloaded but lacks {', '.join(status.missing)}: this runtime cannot load it"
        )
    return snapshot, status
