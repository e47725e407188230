"""DDIM inversion of one frame (conditional only, guidance 1) and its on-disk cache.

Inversions depend only on (frame, depth, model, source prompt, steps, size), not on the edit
prompt, so a re-edit with another prompt reuses them and costs what plain depth-to-image costs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from PIL import Image

from .files import atomic_write

CACHE_FORMAT = "p2v-inversion-v1"


@dataclass(frozen=True)
class InversionSpec:
    """What one clip's inversions share, enough for another process to compute any of them."""

    settings: dict  # the edit's settings, as on the wire (model, device, dtype, steps, ...)
    work_size: tuple[int, int]  # (width, height) the frames are resized to
    source_prompt: str
    fingerprint: str  # the model's; another process inverts only with the same model,
    device: str  # device kind
    dtype: str  # and precision


@dataclass(frozen=True)
class InversionRequest:
    """One frame's inversion: its cache key, its index in the clip and its model depth in [-1, 1]."""

    key: str
    index: int
    model_depth: np.ndarray  # (h, w) float32 at latent size


def default_cache_dir() -> Path:
    """The per-user cache folder of each OS (XDG on Linux, Library/Caches, LocalAppData)."""
    return Path(platformdirs.user_cache_dir("p2v", appauthor=False)) / "inversions"


def inversion_key(
    rgb: np.ndarray,
    depth: np.ndarray,
    model_fingerprint: str,
    source_prompt: str,
    steps: int,
    device: str,
    dtype: str,
) -> str:
    """Content hash of everything the inverted noise depends on (size is in the arrays' shapes)."""
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, model_fingerprint, source_prompt, str(steps), device, dtype):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    for array in (np.ascontiguousarray(rgb, dtype=np.uint8), np.ascontiguousarray(depth, dtype=np.float32)):
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class InversionCache:
    """Inverted latents as .npy files named by their key, written atomically.

    A cache that cannot be written (read-only disk, full disk) costs time on the next edit, never
    the edit itself: failures to store are reported once through ``warn`` and ignored.
    """

    def __init__(self, folder: str | os.PathLike, warn: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self._warn = warn
        self._warned = False

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.npy").is_file()

    def load(self, key: str) -> np.ndarray | None:
        path = self.folder / f"{key}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def store(self, key: str, latent: np.ndarray) -> None:
        try:
            atomic_write(self.folder / f"{key}.npy", lambda file: np.save(file, latent, allow_pickle=False))
        except OSError as exc:
            if self._warn and not self._warned:
                self._warned = True
                self._warn(f"inversion cache {self.folder} is not writable ({exc.strerror}); continuing without it")


def encode_latent(pipeline, rgb: np.ndarray):
    """VAE posterior mean times the scaling factor (deterministic, unlike a posterior sample)."""
    pipe = pipeline.pipe
    image = pipe.image_processor.preprocess(Image.fromarray(rgb)).to(pipeline.device, pipeline.dtype)
    with torch.no_grad():
        posterior = pipe.vae.encode(image).latent_dist
    # The VAE may hand back a channels-last tensor; a cached latent comes back contiguous, and
    # the UNet's kernels differ in the last bits between layouts: keep one layout everywhere.
    # Latent trajectories are kept in fp32 (the UNet alone runs in the model's dtype), so small
    # DDIM and guided-update steps are not rounded away in fp16.
    return (posterior.mean.float() * pipe.vae.config.scaling_factor).contiguous()


def ddim_schedulers(pipeline, steps: int):
    """The sampling (DDIM, eta 0) and inversion schedulers of one clip, from the model's config.

    Built from the checkpoint's own noise schedule (SD 2 depth ships a PNDM config) with only the
    keys each class knows, and never clipping: latents are not bounded to [-1, 1].
    """
    config = dict(pipeline.pipe.scheduler.config)
    built = []
    for kind in (DDIMScheduler, DDIMInverseScheduler):
        known = inspect.signature(kind.__init__).parameters
        scheduler = kind(**{**{k: v for k, v in config.items() if k in known}, "clip_sample": False})
        scheduler.set_timesteps(steps, device=pipeline.device)
        built.append(scheduler)
    return tuple(built)


def embed_prompt(pipeline, prompt: str, guided: bool, negative_prompt: str | None = None):
    """Text embeddings; guided ones are [unconditional (the negative prompt), conditional]."""
    with torch.no_grad():
        positive, negative = pipeline.pipe.encode_prompt(
            prompt, pipeline.device, 1, guided, negative_prompt=negative_prompt if guided else None
        )
    return torch.cat([negative, positive]) if guided else positive


def invert_frame(pipeline, rgb: np.ndarray, depth, source_embedding, scheduler, before_step=None):
    """x_T of one frame at the working size: its VAE latent, inverted (the same in every process)."""
    return invert(pipeline, encode_latent(pipeline, rgb), depth, source_embedding, scheduler, before_step)


def invert(pipeline, latent, depth, source_embedding, scheduler, before_step: Callable[[int], None] | None = None):
    """Run the DDIM schedule backwards from the clean latent to x_T.

    One conditional UNet call per step (guidance 1): the official code's extra unconditional call
    contributes nothing at guidance 1. ``depth`` is the (1, 1, h, w) model depth, ``scheduler``
    a ``DDIMInverseScheduler`` set to the edit's steps, ``before_step`` is called with each step
    index (progress, cancel).
    """
    sample = latent.float()
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            if before_step:
                before_step(index)
            model_input = torch.cat([sample.to(pipeline.dtype), depth], dim=1)
            noise = pipeline.unet(model_input, timestep, encoder_hidden_states=source_embedding).sample
            sample = scheduler.step(noise.float(), timestep, sample).prev_sample
    return sample.contiguous()
