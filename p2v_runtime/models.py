"""Loading models, choosing device and dtype, and the warm model cache.

Models load from folders: a local one, or the Hugging Face cache's snapshot of a hub id, which
``hub.local_model`` finds (and fetches when it is missing); the fp16 variant files are used where
the folder has them.

The server keeps models loaded across jobs; this module's cache is the one place that state lives.
It holds at most one model of each kind (depth pipeline, captioner, CLIP, RAFT), keyed by what
was loaded rather than how it was named, and a job that asks for another one frees the previous
one before loading: a long-lived server never holds two SD 2 pipelines at once.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from . import hub
from .errors import ModelLoadError

Loaded = TypeVar("Loaded")

# kind -> (key, loaded model); see _warm.
_HELD: dict[str, tuple[tuple, Any]] = {}
_HELD_LOCK = threading.Lock()


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps was asked for but this torch has no MPS support")
    return name


def choose_dtype(name: str, device: str) -> tuple[torch.dtype, str | None]:
    """The dtype an edit runs in, and a warning when it is not the one asked for.

    ``auto`` is fp16 on CUDA (memory and speed) and fp32 elsewhere (MPS fp16 is fragile). fp16
    asked for on the CPU runs in fp32 instead, with a warning: CPU kernels in half precision are so
    slow that one DPT-Hybrid depth frame takes minutes (over 590 s measured, against 7.6 s in
    fp32), so the job would never finish. fp32 rather than a refusal, because the precision is a
    preference that one Blender user sets for every runtime (a GPU workstation, a CPU laptop); the
    edit is the same at full precision, and the warning and the job's statistics say what ran.
    """
    if name == "fp16" and device == "cpu":
        return torch.float32, "fp16 on the CPU would take minutes a frame; running in fp32 (use --dtype fp32 or auto)"
    if name == "fp16":
        return torch.float16, None
    if name == "fp32":
        return torch.float32, None
    return (torch.float16 if device == "cuda" else torch.float32), None


def resolve_dtype(name: str, device: str) -> torch.dtype:
    return choose_dtype(name, device)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return "fp16" if dtype == torch.float16 else "fp32"


def model_location(name: str) -> str:
    """What a model name loads: an existing local folder by its real path, a hub id as given.

    Every spelling of one folder (``/a/b``, ``/a//b``, ``/a/./b``, ``/a/b/``, relative, through
    a symlink) is then one cache key, so it is loaded once.
    """
    return os.path.realpath(name) if os.path.isdir(name) else name


@dataclass
class DepthPipeline:
    """The loaded depth-to-image pipeline, with what the editor and the inversion cache need."""

    pipe: Any  # diffusers.StableDiffusionDepth2ImgPipeline
    device: str
    dtype: torch.dtype
    name: str
    fingerprint: str
    load_seconds: float

    @property
    def unet(self):
        return self.pipe.unet


@dataclass
class Captioner:
    model: Any  # transformers.BlipForConditionalGeneration
    processor: Any
    device: str
    name: str
    load_seconds: float


@dataclass
class ClipScorer:
    """CLIP for ``p2v eval``'s CLIP-Text and CLIP-Image."""

    model: Any  # transformers.CLIPModel
    processor: Any
    device: str
    name: str
    load_seconds: float


def load_depth_pipeline(
    model: str, device: str, dtype_setting: str, *, progress=None, warn=None
) -> tuple[DepthPipeline, bool]:
    """Return the warm pipeline for (model, device, dtype), loading it on first use.

    The second value says whether this call loaded anything, for the server's stats. A hub id
    missing from the Hugging Face cache is downloaded first (``hub.local_model``): ``warn`` hears
    that it is, ``progress("download", done, total)`` how far it is (bytes).
    """
    device = resolve_device(device)
    dtype, note = choose_dtype(dtype_setting, device)
    if note and warn is not None:
        warn(note)
    location = model_location(model)

    def load() -> DepthPipeline:
        folder, status = hub.local_model(model, "model", dtype_name(dtype), progress=progress, warn=warn)
        started = time.perf_counter()  # the load, not the download
        pipe = _from_pretrained_depth(model, folder, status, dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.depth_estimator):
            module.requires_grad_(False)
            module.eval()
        return DepthPipeline(
            pipe=pipe,
            device=device,
            dtype=dtype,
            name=model,
            fingerprint=_weights_fingerprint(pipe),
            load_seconds=time.perf_counter() - started,
        )

    return _warm("depth", (location, device, str(dtype)), load)


def load_captioner(model: str, device: str, *, progress=None, warn=None) -> tuple[Captioner, bool]:
    """BLIP captioning model, warm like the depth pipeline (fp32: it runs once per clip)."""
    device = resolve_device(device)
    location = model_location(model)

    def load() -> Captioner:
        folder, status = hub.local_model(model, "captioner", "fp32", progress=progress, warn=warn)
        _refuse_pickles_on_old_torch(model, "captioner", "--captioner", status)
        started = time.perf_counter()
        _quiet_loading()
        try:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            processor = BlipProcessor.from_pretrained(folder)
            blip = BlipForConditionalGeneration.from_pretrained(folder).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            raise _load_error("captioner", model, exc, "--captioner", "--source-prompt") from exc
        return Captioner(blip, processor, device, model, time.perf_counter() - started)

    return _warm("captioner", (location, device), load)


def load_clip(model: str, device: str, *, progress=None, warn=None) -> tuple[ClipScorer, bool]:
    """CLIP for the metrics, warm like the others: ``p2v ablate`` scores six variants with it."""
    device = resolve_device(device)
    location = model_location(model)

    def load() -> ClipScorer:
        folder, status = hub.local_model(model, "clip", "fp32", progress=progress, warn=warn)
        _refuse_pickles_on_old_torch(model, "CLIP model", "--clip-model", status)
        started = time.perf_counter()
        try:
            from transformers import CLIPModel, CLIPProcessor

            processor = CLIPProcessor.from_pretrained(folder)
            clip = CLIPModel.from_pretrained(folder).to(device).eval()
            clip.requires_grad_(False)
        except Exception as exc:  # noqa: BLE001
            raise _load_error("CLIP model", model, exc, "--clip-model", None) from exc
        return ClipScorer(clip, processor, device, model, time.perf_counter() - started)

    return _warm("clip", (location, device), load)


def load_raft(device: str) -> tuple[Any, bool]:
    """torchvision's RAFT-Large with its pretrained weights (the caller checks torchvision first)."""
    device = resolve_device(device)

    def load():
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

        try:
            model = raft_large(weights=Raft_Large_Weights.DEFAULT, progress=False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load RAFT weights ({str(exc).strip()[:200]}); use --flow dis or farneback offline"
            ) from exc
        return model.to(device).eval()

    return _warm("raft", ("raft_large", device), load)


def release_all() -> None:
    """Drop every warm model and give its memory back (CUDA's cached blocks included)."""
    with _HELD_LOCK:
        _HELD.clear()
        free_device_memory()


def holds_another_depth_pipeline(model: str, device: str, dtype_setting: str) -> bool:
    """Whether another depth pipeline than (model, device, dtype) is warm here: loading this one
    would drop it (a pool's actor does not, just to help another job with one inversion)."""
    device = resolve_device(device)
    dtype, _ = choose_dtype(dtype_setting, device)
    key = (model_location(model), device, str(dtype))
    with _HELD_LOCK:
        held = _HELD.get("depth")
        return held is not None and held[0] != key


def _warm(kind: str, key: tuple, load: Callable[[], Loaded]) -> tuple[Loaded, bool]:
    """The held model of ``kind`` if it has ``key``; else free the held one, then load and hold.

    Freeing first keeps the peak at one model of a kind, not two. The lock is held while loading,
    so two threads asking for the same model load it once.
    """
    with _HELD_LOCK:
        held = _HELD.get(kind)
        if held is not None and held[0] == key:
            return held[1], False
        if held is not None:
            del _HELD[kind], held
            free_device_memory()
        loaded = load()
        _HELD[kind] = (key, loaded)
        return loaded, True


def free_device_memory() -> None:
    """Free what dropped references held: Python cycles first, then the GPU allocator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def _quiet_loading() -> None:
    """The libraries' own loading bars would interleave with ours (and the add-on parses stderr)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _from_pretrained_depth(model: str, folder, status: hub.LocalStatus, dtype):
    """The pipeline from a local folder, with the fp16 variant files where the folder has them.

    ``status.variant()`` is "fp16" when the weights chosen for this dtype include fp16 variants
    (the real checkpoint ships ``*.fp16.safetensors`` beside the fp32 files); diffusers then takes,
    per component, the variant where that folder has one and the plain files where it has none.
    """
    _refuse_pickles_on_old_torch(model, "model", "--model", status)
    _quiet_loading()
    try:
        from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline
        from transformers import DPTImageProcessor

        # model_index.json names DPTImageProcessor (checked against the real checkpoint's file). It
        # is loaded here by that class, whatever the file says, so a copy that still names the
        # DPTFeatureExtractor of older transformers (removed in 5) loads too, and the processor
        # does not depend on whether torchvision is installed.
        feature_extractor = DPTImageProcessor.from_pretrained(folder, subfolder="feature_extractor")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype vs dtype across versions
            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
                folder, torch_dtype=dtype, variant=status.variant(), feature_extractor=feature_extractor
            )
        # Pix2Video samples and inverts with DDIM (eta 0) whatever scheduler the model ships with
        # (the real one names PNDM).
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe
    except Exception as exc:  # noqa: BLE001
        raise _load_error("model", model, exc, "--model", None) from exc


def _refuse_pickles_on_old_torch(model: str, label: str, option: str, status: hub.LocalStatus) -> None:
    """transformers (4.50 and later) refuses ``.bin`` weights on torch before 2.6; say so before it does."""
    pickled = sorted(n for names in status.weights.values() for n in names if n.endswith(".bin"))
    if pickled and _torch_version() < (2, 6):
        raise ModelLoadError(
            f"cannot load {label} `{model}`: its weights are pickled .bin files ({pickled[0]}), which "
            f"transformers loads only with torch 2.6 or later (this is {torch.__version__}); upgrade torch, or "
            f"pass {option} a model with safetensors weights"
        )


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (99, 0)


def _load_error(what: str, name: str, exc: Exception, option: str, alternative: str | None) -> ModelLoadError:
    """One line with the loader's reason; its ``public`` twin names only the setting, not the reason."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = f"`p2v models check` tests each part; or pass {option} another folder or id" + (
        f", or give {alternative}" if alternative else ""
    )
    return ModelLoadError(
        f"cannot load {what} {name!r} ({reason[:200]}); {hint}",
        public=f"cannot load {what} {name!r}: its files did not load (the reason is in the runtime's log); {hint}",
    )


def _weights_fingerprint(pipe) -> str:
    """A content hash of the weights and noise schedule, so inversion caches never outlive them.

    Every tensor of the UNet, VAE and text encoder contributes its sum and its sum of squares
    (computed where the weights live: milliseconds on a GPU), so a fine-tune or a fused LoRA
    anywhere changes the key; the first and last convolutions go in byte for byte.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            # float32: MPS has no float64; the device is part of the cache key anyway.
            flat = [p.float().reshape(-1) for p in module.parameters()]  # no copy when already fp32
            sums = torch.stack([torch.stack([q.sum(), torch.dot(q, q)]) for q in flat])
            del flat
            digest.update(sums.cpu().numpy().tobytes())
        for tensor in (pipe.unet.conv_in.weight, pipe.unet.conv_out.weight, pipe.vae.encoder.conv_in.weight):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(str(pipe.unet.dtype).encode())
    return digest.hexdigest()[:32]
