"""Every knob of an edit, its default and its validation, in one dataclass.

The CLI, the server and the Blender add-on all build an :class:`EditSettings`; validation lives
here so every front end rejects bad values with the same one-line message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import P2VError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-depth"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"

INJECTION_MODES = ("anchor+previous", "anchor", "previous", "none")
LAYER_SETS = ("decoder", "all")
UPDATE_MODES = ("x0", "autograd", "off")
DEPTH_NORMS = ("clip", "frame")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "fp32")

# The paper applies the guided update on step indices 0..25 of 50.
PAPER_STEPS = 50


class SettingsError(P2VError, ValueError):
    """A setting the user gave cannot be used; the message says which and why."""


@dataclass
class EditSettings:
    """What one Pix2Video edit needs to know, with the paper's defaults."""

    prompt: str = ""
    source_prompt: str | None = None  # None: BLIP caption of the first frame
    model: str = DEFAULT_MODEL
    captioner: str = DEFAULT_CAPTIONER
    device: str = "auto"
    dtype: str = "auto"
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    injection: str = "anchor+previous"
    layers: str = "decoder"
    update: str = "x0"
    update_delta: float = 100.0
    update_steps: int = 25  # last step index of the update, counted on a 50-step schedule
    size: int = 512
    depth_norm: str = "clip"
    cache_dir: str | None = None  # None: the user cache folder
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "EditSettings":
        """Raise :class:`SettingsError` with a message a user can act on; return self."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SettingsError("the edit prompt is empty: give --prompt \"what the clip should become\"")
        if self.source_prompt is not None and not self.source_prompt.strip():
            self.source_prompt = None
        # SD's schedule has 1000 timesteps and DDIM leaves `steps_offset` free at the top: beyond
        # 500 steps the schedule no longer starts near pure noise.
        _check_int("steps", self.steps, 1, 500)
        _check_int("size", self.size, 64, 4096)
        if self.size % 64:
            raise SettingsError(f"--size must be a multiple of 64, got {self.size}")
        _check_int("update_steps", self.update_steps, 0, 1000)
        _check_number("guidance", self.guidance, 0.0, 100.0)
        _check_number("update_delta", self.update_delta, 0.0, 1e7)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        for name, allowed in (
            ("injection", INJECTION_MODES),
            ("layers", LAYER_SETS),
            ("update", UPDATE_MODES),
            ("depth_norm", DEPTH_NORMS),
            ("device", DEVICES),
            ("dtype", DTYPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise SettingsError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
        if not self.model:
            raise SettingsError("--model is empty")
        return self

    def last_update_step(self) -> int:
        """Last step index that gets the guided update, scaled from the paper's 50 steps."""
        # Halves round up (Python's round() would send 1.5 and 2.5 both to 2).
        return min(self.steps - 1, int(self.update_steps * self.steps / PAPER_STEPS + 0.5))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EditSettings":
        """Build from untrusted key/values (the wire, a saved file); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**values).validate()


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"--{name.replace('_', '-')} must be between {low} and {high}, got {value}")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SettingsError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"--{name.replace('_', '-')} must be between {low} and {high}, got {value}")
