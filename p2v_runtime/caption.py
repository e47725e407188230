"""The source prompt for inversion: a BLIP caption of the first frame (docs/algorithm.md, section 1)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def caption_frame(captioner, rgb: np.ndarray, max_new_tokens: int = 30) -> str:
    """Greedy BLIP caption, so the same frame always gives the same source prompt (and cache key)."""
    inputs = captioner.processor(images=Image.fromarray(rgb), return_tensors="pt").to(captioner.device)
    with torch.no_grad():
        tokens = captioner.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return captioner.processor.decode(tokens[0], skip_special_tokens=True).strip()
