"""Every knob of an edit, in one place: its default, meaning, limits, and where a user sets it.

:class:`EditSettings` is the single schema. Each field carries a :class:`Spec` (label, help,
choices, range, whether it is advanced, whether Blender keeps it per scene or in the user's
preferences, whether the runtime needs it). Everything else is generated from it: the options of
``p2v edit`` and ``p2v ablate`` and of the headless Blender script (:func:`add_arguments`), the
add-on's bpy properties and panel (``blender_addon/properties.py``), and the validation that
every front end runs (:meth:`EditSettings.validate`), so a bad value is refused with the same
one-line message wherever it was typed. Adding a setting means adding one field here.

Standard library only: the Blender add-on runs in Blender's own Python, so
``scripts/build_addon.py`` copies this file into the add-on byte for byte, like the protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-depth"
# BLIP large rather than base: base ships only a pickled pytorch_model.bin, which transformers
# loads only on torch 2.6 and later and only through torch's unpickler; large ships safetensors.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"

# The paper applies the guided update on step indices 0..25 of 50.
PAPER_STEPS = 50

# Where the Blender add-on keeps a setting: per scene (saved in the .blend) or per user.
SCENE = "scene"
PREFERENCES = "preferences"


class SettingsError(ValueError):
    """A setting cannot be used; the message names it and says what would be accepted."""


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    help: str


@dataclass(frozen=True)
class Spec:
    """What a front end needs to know about one setting besides its default."""

    label: str  # what a Blender user sees
    help: str  # one sentence: what it does
    choices: tuple[Choice, ...] = ()
    low: float | None = None
    high: float | None = None
    soft_high: float | None = None  # a slider's end in Blender; typed values may go up to ``high``
    multiple_of: int | None = None
    advanced: bool = False  # in the panel's Advanced section
    blender: str | None = SCENE  # SCENE, PREFERENCES, or None (not in the add-on)
    cli: bool = True  # an option of ``p2v edit`` / ``p2v ablate``
    wire: bool = True  # the runtime uses it (sent in the job); False: the front end applies it
    path: str | None = None  # "folder" for a folder on the runtime's machine
    empty: str = ""  # what an empty optional text means, e.g. "a caption of the first frame"
    shown_when: tuple[str, str] | None = None  # (field, value): drawn in the panel only then
    metavar: str = ""  # how --help shows the value (default: from the kind)


def setting(default: Any, spec: Spec) -> Any:
    return field(default=default, metadata={"spec": spec})


def _choices(*items: tuple[str, str, str]) -> tuple[Choice, ...]:
    return tuple(Choice(*item) for item in items)


@dataclass
class EditSettings:
    """What one Pix2Video edit needs to know, with the paper's defaults."""

    prompt: str = setting("", Spec("Prompt", "what the clip should become"))
    negative_prompt: str = setting(
        "", Spec("Negative prompt", "what the edit should avoid (the paper uses none)", advanced=True)
    )
    source_prompt: str | None = setting(
        None,
        Spec(
            "Source prompt",
            "describes the clip as it is; inversion is conditioned on it",
            empty="a caption of the first frame",
        ),
    )
    frames: str = setting(
        "",
        Spec(
            "Frames",
            "edit only frames A..B-1 of the clip or strip, counted from 0 (A:B, or A: to the end)",
            wire=False,
            empty="all frames",
            metavar="A:B",
        ),
    )
    steps: int = setting(50, Spec("Steps", "DDIM steps of the inversion and of the edit", low=1, high=500))
    guidance: float = setting(
        7.5, Spec("Guidance", "classifier-free guidance scale", low=0.0, high=100.0, soft_high=20.0)
    )
    injection: str = setting(
        "anchor+previous",
        Spec(
            "Injection",
            "where the self-attention keys and values come from",
            choices=_choices(
                ("anchor+previous", "Anchor + previous", "the anchor and the previous frame (the paper)"),
                ("anchor", "Anchor", "only the anchor"),
                ("previous", "Previous", "only the previous frame"),
                (
                    "anchor+random",
                    "Anchor + random",
                    "the anchor and a random earlier frame, picked by --seed (the paper's Figure 5 ablation)",
                ),
                ("none", "None", "no injection: plain per-frame depth-to-image"),
            ),
        ),
    )
    anchor: str = setting(
        "first",
        Spec(
            "Anchor",
            "the frame edited first, that every frame attends to: first, middle, or N (the Nth frame "
            "edited, counted from 0); the edit runs from it forward to the end and backward to the start",
            metavar="first|middle|N",
        ),
    )
    update: str = setting(
        "x0",
        Spec(
            "Update",
            "guided latent update towards the previous frame's prediction",
            choices=_choices(
                ("x0", "x0 (closed form)", "closed-form gradient of the distance, as the official code"),
                ("autograd", "Autograd", "gradient through the UNet (a backward pass per step: slower)"),
                ("off", "Off", "no guided update"),
            ),
        ),
    )
    size: int = setting(
        512,
        Spec(
            "Size",
            "long side of the working size in pixels (at most the clip's own, rounded up to a multiple of 64)",
            low=64,
            high=4096,
            multiple_of=64,
        ),
    )
    layers: str = setting(
        "decoder",
        Spec(
            "Layers",
            "which self-attention layers take the injected features",
            choices=_choices(
                ("decoder", "Decoder", "the decoder's self-attention layers (the paper)"),
                ("all", "All", "every self-attention layer"),
            ),
            advanced=True,
        ),
    )
    update_delta: float = setting(
        100.0,
        Spec(
            "Update strength",
            "step size of the guided update: the paper's delta, the same pull at every working size",
            low=0.0,
            high=1e7,
            soft_high=1000.0,
            advanced=True,
        ),
    )
    update_steps: int = setting(
        25,
        Spec(
            "Update until",
            "last step index that gets the guided update, counted on 50 steps (scaled with the steps)",
            low=0,
            high=1000,
            advanced=True,
        ),
    )
    seed: int = setting(
        0,
        Spec(
            "Seed",
            "picks the random earlier frames of injection anchor+random; nothing else in the edit is random",
            low=0,
            high=2**31 - 1,
            advanced=True,
            shown_when=("injection", "anchor+random"),
        ),
    )
    depth_norm: str = setting(
        "clip",
        Spec(
            "Depth normalisation",
            "how depth is scaled to the model's range",
            choices=_choices(
                ("clip", "Clip", "over the whole clip: steady from frame to frame"),
                ("frame", "Frame", "each frame on its own, as the official code (can flicker)"),
            ),
            advanced=True,
        ),
    )
    depth: str = setting(
        "estimate",
        Spec(
            "Depth",
            "where the depth that conditions the edit comes from",
            choices=_choices(
                ("estimate", "Estimate", "estimated from each frame by the model's depth estimator"),
                ("zpass", "Z pass", "a scene strip rendered with its Z pass: the scene's true depth"),
            ),
            cli=False,
            wire=False,
        ),
    )
    zpass_render: str = setting(
        "preview",
        Spec(
            "Z-pass render",
            "how a scene strip is rendered for its Z pass (the user's scene is not changed)",
            choices=_choices(
                ("preview", "Quick preview", "the scene's engine with few samples (Cycles 8, Eevee 4)"),
                ("scene", "As the scene is set", "the scene's own render settings (slower)"),
            ),
            cli=False,
            wire=False,
            shown_when=("depth", "zpass"),
        ),
    )
    model: str = setting(
        DEFAULT_MODEL,
        Spec(
            "Model",
            "depth-conditioned Stable Diffusion 2: hub id or folder on the runtime's machine",
            blender=PREFERENCES,
            metavar="ID|DIR",
        ),
    )
    captioner: str = setting(
        DEFAULT_CAPTIONER,
        Spec(
            "Captioner",
            "BLIP captioning model: hub id or folder on the runtime's machine",
            blender=PREFERENCES,
            metavar="ID|DIR",
        ),
    )
    device: str = setting(
        "auto",
        Spec(
            "Device",
            "where the runtime computes",
            choices=_choices(
                ("auto", "Auto", "CUDA, else Apple MPS, else the CPU"),
                ("cuda", "CUDA", "an NVIDIA GPU"),
                ("mps", "MPS", "Apple silicon GPU"),
                ("cpu", "CPU", "the processor (slow)"),
            ),
            blender=PREFERENCES,
        ),
    )
    dtype: str = setting(
        "auto",
        Spec(
            "Precision",
            "number format of the model",
            choices=_choices(
                ("auto", "Auto", "fp16 on CUDA, fp32 elsewhere"),
                ("fp16", "fp16", "half precision: half the memory"),
                ("fp32", "fp32", "full precision"),
            ),
            blender=PREFERENCES,
        ),
    )
    feature_store: str = setting(
        "auto",
        Spec(
            "Feature memory",
            "where the recorded self-attention features are kept",
            choices=_choices(
                ("auto", "Auto", "on the GPU when they fit in half its free memory, else in host memory"),
                ("gpu", "GPU", "on the compute device (fastest)"),
                (
                    "cpu",
                    "Host memory",
                    "in host memory, copied to the GPU a step at a time (SD 2 depth at 512 fits a 6 GB card)",
                ),
            ),
            blender=PREFERENCES,
        ),
    )
    cache_dir: str | None = setting(
        None,
        Spec(
            "Inversion cache",
            "folder for cached inversions on the runtime's machine",
            blender=PREFERENCES,
            path="folder",
            empty="the runtime's user cache folder",
        ),
    )

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> EditSettings:
        """Raise :class:`SettingsError` with a message a user can act on; return self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and kind_of(f) is str and f.default is None and not str(value).strip():
                setattr(self, f.name, None)  # an empty optional text means its default
            setattr(self, f.name, check_value(f, getattr(self, f.name)))
        if not self.prompt.strip():
            raise SettingsError(f"{describe('prompt')} is empty: say what the clip should become")
        if not self.model.strip():
            raise SettingsError(f"{describe('model')} is empty: give a hub id or a folder")
        if not self.captioner.strip():
            raise SettingsError(f"{describe('captioner')} is empty: give a hub id or a folder")
        parse_frame_range(self.frames)
        self.anchor = parse_anchor(self.anchor)
        return self

    def anchor_index(self, count: int) -> int:
        """The frame the edit starts from in a ``count``-frame clip (``middle``: ``count // 2``)."""
        anchor = parse_anchor(self.anchor)
        if anchor == "first":
            return 0
        if anchor == "middle":
            return count // 2
        if int(anchor) >= count:
            raise SettingsError(
                f"{describe('anchor')} {anchor} is past the clip: it has {count} frame(s), 0..{count - 1}"
            )
        return int(anchor)

    def last_update_step(self) -> int:
        """Last step index that gets the guided update, scaled from the paper's 50 steps."""
        # Halves round up (Python's round() would send 1.5 and 2.5 both to 2).
        return min(self.steps - 1, int(self.update_steps * self.steps / PAPER_STEPS + 0.5))

    # -- to and from plain values -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_wire(self) -> dict[str, Any]:
        """The settings the runtime uses (what a job message carries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if spec_of(f).wire}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditSettings:
        """Build from key/values (a front end, a saved file); unknown keys are an error."""
        if not isinstance(values, dict):
            raise SettingsError(f"settings must be a mapping of names to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**values).validate()

    @classmethod
    def from_wire(cls, values: Any) -> EditSettings:
        """Build from a job message: untrusted, and only the settings the runtime uses."""
        if isinstance(values, dict):
            local = sorted(str(f.name) for f in dataclasses.fields(cls) if not spec_of(f).wire and f.name in values)
            if local:
                raise SettingsError(
                    f"setting(s) {', '.join(local)} are applied by the front end, not sent to the runtime"
                )
        return cls.from_dict(values)


def setting_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of :class:`EditSettings`, in the order front ends show them."""
    return dataclasses.fields(EditSettings)


def field_named(name: str) -> dataclasses.Field:
    return EditSettings.__dataclass_fields__[name]


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata["spec"]


def choice_values(name: str) -> tuple[str, ...]:
    """The values a choice setting accepts, e.g. ``choice_values("device")``."""
    return tuple(c.value for c in spec_of(field_named(name)).choices)


def kind_of(f: dataclasses.Field) -> type:
    """str, int or float: the type a field's values have (optional texts are str)."""
    return str if f.default is None else type(f.default)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(name: str) -> str:
    """How messages name a setting, for the Blender user and the command-line user alike."""
    return f"{spec_of(field_named(name)).label} ({flag(name)})"


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """The value, if it is of the right kind and within the field's limits; else SettingsError."""
    spec, kind, what = spec_of(f), kind_of(f), describe(f.name)
    if value is None and f.default is None:
        return None
    if kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{what} must be text, got {value!r}")
        if spec.choices and value not in [c.value for c in spec.choices]:
            raise SettingsError(f"{what} must be one of {', '.join(c.value for c in spec.choices)}; got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        noun = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{what} must be {noun}, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise SettingsError(f"{what} must be a whole number, got {value!r}")
    if kind is float:
        value = float(value)
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        raise SettingsError(
            f"{what} must be between {_number(spec.low)} and {_number(spec.high)}, got {_number(value)}"
        )
    if spec.multiple_of and value % spec.multiple_of:
        raise SettingsError(f"{what} must be a multiple of {spec.multiple_of}, got {_number(value)}")
    return value


def parse_frame_range(text: str | None) -> tuple[int, int | None]:
    """``"A:B"`` to (A, B); either side may be left out (``"5:"``, ``":10"``); ``""`` is everything.

    Negative numbers are refused rather than counted from the end: a render-farm job that says
    ``-3:`` is more likely a typo than a wish.
    """
    if text is None or not text.strip():
        return 0, None
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not match:
        raise SettingsError(
            f"{describe('frames')} {text.strip()!r} is not a range: use START:END, counted from 0 "
            f"with END excluded, e.g. 0:24, 10: or :48"
        )
    start = int(match.group(1)) if match.group(1) else 0
    stop = int(match.group(2)) if match.group(2) else None
    if stop is not None and start >= stop:
        raise SettingsError(f"{describe('frames')} {text.strip()} selects no frames")
    return start, stop


def parse_anchor(text: str) -> str:
    """``first``, ``middle`` or a frame number as digits (any case and spacing); else SettingsError."""
    value = str(text).strip().lower()
    if value in ("first", "middle"):
        return value
    if value.isdigit() and value.isascii():
        return str(int(value))
    raise SettingsError(f"{describe('anchor')} must be first, middle or a frame number counted from 0, got {text!r}")


def frame_range(text: str | None, count: int) -> range:
    """The frames of a ``count``-frame clip that ``text`` (``A:B``) selects; SettingsError if outside."""
    try:
        start, stop = parse_frame_range(text)
    except SettingsError as exc:
        raise SettingsError(f"{exc} (the clip has {count} frames)") from None
    if start >= count or (stop is not None and stop > count):
        raise SettingsError(
            f"{describe('frames')} {text.strip()} goes past the clip: it has {count} frames (0..{count - 1})"
        )
    return range(start, count if stop is None else stop)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_text(name: str, text: str) -> Any:
    """A value typed on a command line, as the field's kind (SettingsError with the schema's words)."""
    f = field_named(name)
    kind = kind_of(f)
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{describe(name)} must be {noun}, got {text!r}") from None


# -- command lines --------------------------------------------------------------------------------


def fields_for(front: str, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields a front end offers: ``"cli"`` (p2v edit/ablate) or ``"blender"`` (add-on, headless)."""
    chosen = []
    for f in setting_fields():
        spec = spec_of(f)
        on = spec.cli if front == "cli" else spec.blender is not None
        if on and f.name not in exclude:
            chosen.append(f)
    return chosen


def help_text(f: dataclasses.Field) -> str:
    spec = spec_of(f)
    text = spec.help
    if spec.choices:
        text += ": " + ", ".join(f"{c.value} ({c.help})" for c in spec.choices)
    if spec.low is not None and spec.high is not None and not spec.choices:
        text += f"; {_number(spec.low)}..{_number(spec.high)}"
        if spec.multiple_of:
            text += f", a multiple of {spec.multiple_of}"
    if f.default is None or f.default == "":
        text += f" (default: {spec.empty})" if spec.empty else ""
    else:
        text += f" (default: {_number(f.default)})"
    return text.replace("%", "%%")


def add_arguments(
    parser: argparse.ArgumentParser, front: str, exclude: tuple[str, ...] = (), default_note: str = ""
) -> None:
    """One option per setting of ``front``; every default is None ("not given"), values stay text.

    Conversion and validation are the schema's (:func:`given_values`, :meth:`EditSettings.validate`),
    so a bad value gets the same message as in the add-on.
    """
    group = parser.add_argument_group("edit settings" + (f" ({default_note})" if default_note else ""))
    for f in fields_for(front, exclude):
        spec = spec_of(f)
        metavar = spec.metavar or (
            "|".join(c.value for c in spec.choices)
            if spec.choices
            else ("DIR" if spec.path else {str: "TEXT", int: "N", float: "X"}[kind_of(f)])
        )
        group.add_argument(flag(f.name), dest=f.name, default=None, metavar=metavar, help=help_text(f))


def given_values(args: argparse.Namespace, front: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings given on the command line, converted to their kinds (not yet validated)."""
    values = {}
    for f in fields_for(front, exclude):
        text = getattr(args, f.name, None)
        if text is not None:
            values[f.name] = parse_text(f.name, text)
    return values


def from_arguments(
    args: argparse.Namespace, front: str, exclude: tuple[str, ...] = (), base: dict[str, Any] | None = None
) -> EditSettings:
    """Validated settings: ``base`` (e.g. a scene's saved values), then what the command line gave."""
    values = dict(base or {})
    values.update(given_values(args, front, exclude))
    return EditSettings.from_dict(values)
