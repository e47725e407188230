"""Loading models by hub id or local folder, choosing device and dtype, and the warm model cache.

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


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """fp16 on CUDA (memory and speed), fp32 elsewhere (CPU fp16 is slow and MPS fp16 is fragile)."""
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    return torch.float16 if device == "cuda" else torch.float32


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


def load_depth_pipeline(model: str, device: str, dtype_setting: str) -> tuple[DepthPipeline, bool]:
    """Return the warm pipeline for (model, device, dtype), loading it on first use.

    The second value says whether this call loaded anything, for the server's stats.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype_setting, device)
    location = model_location(model)

    def load() -> DepthPipeline:
        started = time.perf_counter()
        pipe = _from_pretrained_depth(model, location, dtype)
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


def load_captioner(model: str, device: str) -> tuple[Captioner, bool]:
    """BLIP captioning model, warm like the depth pipeline (fp32: it runs once per clip)."""
    device = resolve_device(device)
    location = model_location(model)

    def load() -> Captioner:
        started = time.perf_counter()
        _quiet_loading()
        try:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            processor = BlipProcessor.from_pretrained(location)
            blip = BlipForConditionalGeneration.from_pretrained(location).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            raise ModelLoadError(_load_failure("captioner", model, exc, "--captioner", "--source-prompt")) from exc
        return Captioner(blip, processor, device, model, time.perf_counter() - started)

    return _warm("captioner", (location, device), load)


def load_clip(model: str, device: str) -> tuple[ClipScorer, bool]:
    """CLIP for the metrics, warm like the others: ``p2v ablate`` scores six variants with it."""
    device = resolve_device(device)
    location = model_location(model)

    def load() -> ClipScorer:
        started = time.perf_counter()
        try:
            from transformers import CLIPModel, CLIPProcessor

            processor = CLIPProcessor.from_pretrained(location)
            clip = CLIPModel.from_pretrained(location).to(device).eval()
            clip.requires_grad_(False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(_load_failure("CLIP model", model, exc, "--clip-model", None)) from exc
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
        _collect()


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
            _collect()
        loaded = load()
        _HELD[kind] = (key, loaded)
        return loaded, True


def _collect() -> None:
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


def _from_pretrained_depth(model: str, location: str, dtype):
    _quiet_loading()
    try:
        from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline
        from transformers import DPTImageProcessor

        # The SD 2 depth checkpoint names `DPTFeatureExtractor`, which transformers 5 no longer
        # has; its config loads as the DPTImageProcessor that replaced it.
        feature_extractor = DPTImageProcessor.from_pretrained(location, subfolder="feature_extractor")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype vs dtype across versions
            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
                location, torch_dtype=dtype, feature_extractor=feature_extractor
            )
        # Pix2Video samples and inverts with DDIM (eta 0) whatever scheduler the model ships with.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(_load_failure("model", model, exc, "--model", None)) from exc


def _load_failure(what: str, name: str, exc: Exception, option: str, alternative: str | None) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = f"pass {option} a local folder" + (f" or give {alternative}" if alternative else "")
    return f"cannot load {what} {name!r} ({reason[:200]}); if the model hub is unreachable, {hint}"


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
