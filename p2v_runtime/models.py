"""Loading models by hub id or local folder, choosing device and dtype, and the warm model cache.

The server keeps models loaded across jobs; this module's cache is the one place that state lives
(DESIGN.md: "no global mutable state outside the warm model cache").
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

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


def resolve_dtype(name: str, device: str):
    """fp16 on CUDA (memory and speed), fp32 elsewhere (CPU fp16 is slow and MPS fp16 is fragile)."""
    import torch

    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    return torch.float16 if device == "cuda" else torch.float32


def dtype_name(dtype) -> str:
    import torch

    return "fp16" if dtype == torch.float16 else "fp32"


@dataclass
class DepthPipeline:
    """The loaded depth-to-image pipeline plus what the editor derives from it once."""

    pipe: Any  # diffusers.StableDiffusionDepth2ImgPipeline
    device: str
    dtype: Any
    name: str
    fingerprint: str
    load_seconds: float
    prompt_embeddings: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae


@dataclass
class Captioner:
    model: Any
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
    key = ("sd", model, device, str(dtype))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key], False
        started = time.perf_counter()
        pipe = _from_pretrained_depth(model, dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.depth_estimator):
            module.requires_grad_(False)
            module.eval()
        loaded = DepthPipeline(
            pipe=pipe,
            device=device,
            dtype=dtype,
            name=model,
            fingerprint=_weights_fingerprint(pipe),
            load_seconds=time.perf_counter() - started,
        )
        _CACHE[key] = loaded
        return loaded, True


def load_captioner(model: str, device: str) -> tuple[Captioner, bool]:
    """BLIP captioning model, warm like the depth pipeline (fp32: it runs once per clip)."""
    device = resolve_device(device)
    key = ("blip", model, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key], False
        started = time.perf_counter()
        _quiet_loading()
        try:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            processor = BlipProcessor.from_pretrained(model)
            blip = BlipForConditionalGeneration.from_pretrained(model).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            raise ModelLoadError(_load_failure("captioner", model, exc, "--captioner", "--source-prompt")) from exc
        loaded = Captioner(blip, processor, device, model, time.perf_counter() - started)
        _CACHE[key] = loaded
        return loaded, True


def release_all() -> None:
    """Drop every warm model and return the GPU memory they held (the add-on's Release button)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_loading() -> None:
    """The libraries' own loading bars would interleave with ours (and the add-on parses stderr)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _from_pretrained_depth(model: str, dtype):
    _quiet_loading()
    try:
        import warnings

        from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline
        from transformers import DPTImageProcessor

        # The SD 2 depth checkpoint names `DPTFeatureExtractor`, which transformers 5 no longer
        # has; its config loads as the DPTImageProcessor that replaced it.
        feature_extractor = DPTImageProcessor.from_pretrained(model, subfolder="feature_extractor")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype vs dtype across versions
            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
                model, torch_dtype=dtype, feature_extractor=feature_extractor
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
    import json

    import torch

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
