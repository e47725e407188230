"""Depth conventions, in one place.

The depth-conditioned SD 2 UNet expects relative *inverse* depth (near = large), resized to the
latent grid and scaled to [-1, 1]. Two sources feed it:

* the pipeline's own DPT estimator, which already outputs relative inverse depth;
* a rendered Z pass (distance from the camera, background = huge or +inf), converted here to
  inverse depth with the background set to the farthest foreground value.

Normalisation is over the whole clip by default (per-frame min/max, as the official code does,
flickers when the depth range changes); ``frame`` keeps the official behaviour.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

from .errors import InputError

# Blender writes 1e10 for background pixels of a Z pass (Cycles and Eevee); anything this far
# away is treated as "no surface", like +inf.
BACKGROUND_Z = 1e9


def estimate_inverse_depth(pipeline, rgb: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Relative inverse depth of one working-size frame from the pipeline's DPT, at latent size.

    Mirrors ``StableDiffusionDepth2ImgPipeline.prepare_depth_map`` (same preprocessing, autocast
    for fp16, bicubic resize) but stops before the per-frame min/max, which is ours to choose.
    """
    pipe = pipeline.pipe
    pixel_values = pipe.feature_extractor(images=[Image.fromarray(rgb)], return_tensors="pt").pixel_values
    pixel_values = pixel_values.to(device=pipeline.device, dtype=pipeline.dtype)
    # DPT-Hybrid's batch norms want autocast in fp16 (as the pipeline does); fp32 needs nothing.
    half_on_cuda = pipeline.device == "cuda" and pipeline.dtype == torch.float16
    autocast = torch.autocast("cuda", dtype=torch.float16) if half_on_cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        predicted = pipe.depth_estimator(pixel_values).predicted_depth
    resized = torch.nn.functional.interpolate(
        predicted.unsqueeze(1).float(), size=latent_hw, mode="bicubic", align_corners=False
    )
    return resized[0, 0].cpu().numpy().astype(np.float32)


def zpass_to_inverse_depth(z: np.ndarray, latent_hw: tuple[int, int], label: str = "depth") -> np.ndarray:
    """Turn a Z pass (distance) into inverse depth at latent size, background marked NaN.

    The background becomes the farthest surface only in :func:`normalise`, where the range is
    known: with clip normalisation that is the clip's farthest surface, so the background does not
    jump from frame to frame when the farthest object of a frame changes.
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2:
        raise InputError(f"{label}: expected a 2-D depth map, got shape {z.shape}")
    if np.isnan(z).any():
        raise InputError(f"{label}: depth has NaN pixels ({int(np.isnan(z).sum())} of {z.size})")
    if np.isneginf(z).any() or (z <= 0).any():
        raise InputError(f"{label}: depth has zero, negative or -inf distances; a Z pass is a distance from the camera")
    background = ~np.isfinite(z) | (z >= BACKGROUND_Z)
    if background.all():
        raise InputError(f"{label}: every pixel is background (nothing in front of the camera)")
    inverse = np.zeros_like(z)
    inverse[~background] = 1.0 / z[~background]
    inverse[background] = inverse[~background].min()  # for resampling only
    tensor = torch.from_numpy(inverse)[None, None]
    resized = torch.nn.functional.interpolate(
        tensor, size=latent_hw, mode="bicubic", align_corners=False, antialias=tensor.shape[-1] > latent_hw[1]
    )
    # Bicubic overshoot must not invent depth beyond the rendered range.
    result = resized[0, 0].clamp(float(inverse.min()), float(inverse.max())).numpy()
    coverage = torch.nn.functional.interpolate(
        torch.from_numpy(background.astype(np.float32))[None, None], size=latent_hw, mode="area"
    )[0, 0].numpy()
    result[coverage > 0.5] = np.nan
    return result


def depth_range(maps: list[np.ndarray], label: str = "clip") -> tuple[float, float]:
    """(min, max) of the surfaces in several inverse-depth maps (NaN = background).

    A constant range cannot be normalised.
    """
    surfaces = [m[~np.isnan(m)] for m in maps]
    surfaces = [values for values in surfaces if values.size]
    if not surfaces:
        raise InputError(f"{label}: no surface left at the model's resolution (background everywhere)")
    low = min(float(values.min()) for values in surfaces)
    high = max(float(values.max()) for values in surfaces)
    if not np.isfinite(low) or not np.isfinite(high):
        raise InputError(f"{label}: depth has non-finite values")
    if high - low <= 1e-12 * max(1.0, abs(high)):
        raise InputError(f"{label}: depth is constant ({low:g} everywhere), so it carries no shape")
    return low, high


def normalise(inverse_depth: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale to the model's [-1, 1] (near = +1), as the pipeline does after its min/max.

    Background (NaN) becomes ``low``, the farthest surface of the range: -1.
    """
    filled = np.where(np.isnan(inverse_depth), low, inverse_depth)
    return (2.0 * (filled - low) / (high - low) - 1.0).astype(np.float32)


def to_display(normalised: np.ndarray) -> np.ndarray:
    """[-1, 1] model depth to [0, 1] for a PNG, near = bright."""
    return np.clip((normalised + 1.0) / 2.0, 0.0, 1.0)
