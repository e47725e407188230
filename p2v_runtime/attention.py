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

from .plan import EditPlan, Turn

# Where recorded features live (``--feature-store``; "auto" is resolved by the editor).
STORE_KINDS = ("gpu", "cpu")


def self_attention_layers(unet, layer_set: str) -> list[str]:
    """Processor names of the self-attention layers that take part.

    ``decoder`` is every attn1 in the UNet's up blocks (for SD 2: up_blocks 1..3, three transformer
    blocks each); ``all`` adds the encoder and the middle block.
    """
    names = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    if layer_set == "decoder":
        names = [name for name in names if name.startswith("up_blocks.")]
    return names


def feature_bytes_per_step(unet, layers, latent_hw: tuple[int, int], element_size: int) -> int:
    """Bytes one frame records at one step: every chosen layer's input, both guidance branches.

    From the UNet's layout rather than a run, so ``--feature-store auto`` can decide before the
    first frame: a layer in ``down_blocks.b`` sees the latent at 1/2^b, ``mid_block`` at
    1/2^(n-1) and ``up_blocks.u`` at 1/2^(n-1-u) (n blocks, each but the last resampling by 2),
    with the width of the layer's query projection.
    """
    blocks = len(unet.config.block_out_channels)
    height, width = latent_hw
    total = 0
    for name in layers:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = blocks - 1 - int(parts[1])
        else:
            level = blocks - 1
        module = unet.get_submodule(name.removesuffix(".processor"))
        tokens = -(-height // 2**level) * -(-width // 2**level)
        total += 2 * tokens * module.to_q.in_features * element_size
    return total


class FeatureStore:
    """The recorded features, keyed by (frame, step, layer), on the compute device or on the host.

    ``gpu``: the tensors as recorded, on the compute device. ``cpu``: copied into host memory as
    recorded (pinned when CUDA is there, so the copies are asynchronous) and copied back to the
    device when a later frame reads them, one layer of one step at a time: the device then holds
    no recorded frame, only the step being read. Both hand the attention the same values, so the
    edit is the same bit for bit. Counts the bytes it holds and their peak.
    """

    def __init__(self, kind: str = "gpu", device="cpu"):
        if kind not in STORE_KINDS:
            raise ValueError(f"feature store {kind!r}: expected one of {', '.join(STORE_KINDS)}")
        self.kind = kind
        self.device = torch.device(device)
        self.pin = kind == "cpu" and torch.cuda.is_available()
        self.tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (frame, step) -> layer -> features
        self.held_bytes = 0
        self.peak_bytes = 0

    def put(self, frame: int, step: int, layer: str, features: torch.Tensor) -> None:
        features = features.detach()
        if self.kind == "cpu":
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=self.pin)
            host.copy_(features, non_blocking=self.pin)
            features = host
        self.tensors.setdefault((frame, step), {})[layer] = features
        self.held_bytes += features.numel() * features.element_size()
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def get(self, frame: int, step: int, layer: str) -> torch.Tensor:
        features = self.tensors[(frame, step)][layer]
        if self.kind == "cpu":
            return features.to(self.device, non_blocking=self.pin)
        return features

    def drop(self, frame: int, step: int) -> None:
        """Free one frame's features of one step (every layer)."""
        for features in self.tensors.pop((frame, step), {}).values():
            self.held_bytes -= features.numel() * features.element_size()

    def device_bytes(self) -> int:
        """Bytes of recorded features held on the compute device."""
        return self.held_bytes if self.kind == "gpu" else 0


class FeatureBank:
    """Records and serves the features of one clip's edit, turn by turn, as its plan says.

    A turn records only when a later turn reads it (``Turn.record``); after each step, the step's
    features of every source frame whose last reader is this turn are freed. With the paper's
    anchor+previous that keeps the anchor and, while frame i is edited, frame i-1's remaining
    steps and frame i's recorded ones: about two frames, whatever the clip length.
    """

    def __init__(self, plan: EditPlan, store: FeatureStore | None = None):
        self.plan = plan
        self.store = store or FeatureStore()
        self.turn: Turn | None = None
        self.step = 0
        self.recording = False
        self.injecting = False

    @property
    def peak_bytes(self) -> int:
        return self.store.peak_bytes

    def begin_turn(self, turn: Turn) -> None:
        self.turn = turn
        self.step = 0
        self.recording = turn.record
        self.injecting = bool(turn.sources)

    def end_step(self) -> None:
        """The step is done: free what no later turn reads at this step."""
        turn = self.turn
        for frame in dict.fromkeys(turn.sources):
            if self.plan.last_reader[frame] == turn.position:
                self.store.drop(frame, self.step)

    def end_turn(self) -> None:
        self.turn = None
        self.recording = self.injecting = False

    def record(self, layer: str, features) -> None:
        self.store.put(self.turn.index, self.step, layer, features)

    def injected(self, layer: str):
        """The features to take K/V from for this layer and step, or None for plain attention."""
        if not self.injecting:
            return None
        parts = [self.store.get(frame, self.step, layer) for frame in self.turn.sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def held_bytes(self) -> int:
        return self.store.held_bytes


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
