"""Self-attention feature injection (docs/algorithm.md, "Self-attention feature injection").

While a frame is denoised, each chosen self-attention layer records its input features (the
normalised hidden states, before the K/V projections) per step; both guidance branches travel in
the batch, so each branch attends to its own branch. A later frame keeps its own queries and
takes keys and values from the anchor's and the previous frame's features at the same step:

    Q = W_Q f^i        K = W_K [f^a ; f^(i-1)]        V = W_V [f^a ; f^(i-1)]

The attention itself is diffusers' ``AttnProcessor2_0`` with the recorded features passed as
``encoder_hidden_states``, so injecting a frame's own features reproduces the plain layer bit
for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

# Which frames each injection mode attends to; the order is the token order of K/V.
SOURCES_BY_MODE = {
    "anchor+previous": ("anchor", "previous"),
    "anchor": ("anchor",),
    "previous": ("previous",),
    "none": (),
}


def self_attention_layers(unet, layer_set: str) -> list[str]:
    """Processor names of the self-attention layers that take part.

    ``decoder`` is every attn1 in the UNet's up blocks (for SD 2: up_blocks 1..3, three transformer
    blocks each); ``all`` adds the encoder and the middle block.
    """
    names = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    if layer_set == "decoder":
        names = [name for name in names if name.startswith("up_blocks.")]
    return names


class FeatureBank:
    """The recorded features of the frames still needed: anchor, previous, and the current one.

    Features are keyed by (step index, layer name). Only the layers that inject are recorded, in
    the model's dtype, and a frame's features are dropped as soon as no later frame needs them.
    """

    def __init__(self, mode: str):
        self.sources = SOURCES_BY_MODE[mode]
        self.anchor: dict | None = None
        self.previous: dict | None = None
        self.current: dict = {}
        self.step = 0
        self.recording = False
        self.injecting = False
        self.peak_bytes = 0
        self._kept_bytes = 0
        self._current_bytes = 0

    @property
    def needs_recording(self) -> bool:
        return bool(self.sources)

    def begin_frame(self, index: int) -> None:
        """Frame 0 is the anchor: it is generated without injection and recorded for the rest."""
        self.current = {}
        self._current_bytes = 0
        self.step = 0
        self.recording = self.needs_recording and (index == 0 or "previous" in self.sources)
        self.injecting = index > 0 and bool(self.sources)

    def end_frame(self, index: int) -> None:
        """Keep the just-recorded features only in the roles a later frame reads them from."""
        if self.recording:
            if index == 0 and "anchor" in self.sources:
                self.anchor = self.current
            if "previous" in self.sources:
                self.previous = self.current
            self._kept_bytes = self.held_bytes()
        self.current = {}
        self._current_bytes = 0
        self.recording = self.injecting = False

    def record(self, layer: str, features) -> None:
        self.current[(self.step, layer)] = features.detach()
        self._current_bytes += features.numel() * features.element_size()
        self.peak_bytes = max(self.peak_bytes, self._kept_bytes + self._current_bytes)

    def injected(self, layer: str):
        """The features to take K/V from for this layer and step, or None for plain attention."""
        if not self.injecting:
            return None
        parts = [getattr(self, role)[(self.step, layer)] for role in self.sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def held_bytes(self) -> int:
        """Bytes held by all three roles; a frame that is anchor and previous counts once."""
        seen: dict[int, int] = {}
        for store in (self.anchor, self.previous, self.current):
            if store:
                for tensor in store.values():
                    seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())


class InjectingSelfAttention:
    """A diffusers attention processor that records and injects through a :class:`FeatureBank`."""

    def __init__(self, layer: str, bank: FeatureBank):
        self.layer = layer
        self.bank = bank
        self.attend = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.bank.recording:
            self.bank.record(self.layer, hidden_states)
        injected = self.bank.injected(self.layer)
        if injected is not None:
            encoder_hidden_states = injected
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@contextlib.contextmanager
def injection_installed(unet, layers: Sequence[str], bank: FeatureBank) -> Iterator[None]:
    """Install the injecting processors on ``layers`` and restore the UNet's own ones afterwards.

    The UNet is shared through the warm model cache, so it must leave this block as it came in,
    also on error and cancel. Layers that do not inject keep the UNet's own processors.
    """
    original = dict(unet.attn_processors)
    chosen = set(layers)
    unet.set_attn_processor(
        {
            name: InjectingSelfAttention(name, bank) if name in chosen else processor
            for name, processor in original.items()
        }
    )
    try:
        yield
    finally:
        unet.set_attn_processor(original)
