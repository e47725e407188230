"""How a strip is placed in the Sequencer's frame: transform, crop, flips, blend mode and opacity.

The edit works on the strip's own picture (its source at its own size and aspect, modifiers,
colour and retiming applied) and the new strip takes the source's placement, so it composites
exactly where the source did. :func:`capture` reads the placement from the source,
:func:`apply` gives it to the new strip, and :data:`NEUTRAL` is what the temporary copy that
renders the picture uses instead: the picture then fills a frame of its own size.
"""

from __future__ import annotations

# (path, neutral value): transform and crop are nested structs; the rest are the strip's own.
_FIELDS = (
    ("transform.offset_x", 0.0),
    ("transform.offset_y", 0.0),
    ("transform.scale_x", 1.0),
    ("transform.scale_y", 1.0),
    ("transform.rotation", 0.0),
    ("transform.origin", (0.5, 0.5)),
    ("transform.filter", None),  # how the transform samples: kept as it is in the render
    ("crop.min_x", 0),
    ("crop.max_x", 0),
    ("crop.min_y", 0),
    ("crop.max_y", 0),
    ("use_flip_x", False),
    ("use_flip_y", False),
    ("blend_type", "REPLACE"),
    ("blend_alpha", 1.0),
)
NEUTRAL = {path: value for path, value in _FIELDS if value is not None}


def _owner(strip, path: str):
    parts = path.split(".")
    owner = strip
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def capture(strip) -> dict:
    """The source's placement, as plain values (JSON-safe)."""
    look = {}
    for path, _ in _FIELDS:
        owner, name = _owner(strip, path)
        if hasattr(owner, name):
            value = getattr(owner, name)
            look[path] = list(value) if path == "transform.origin" else value
    return look


def apply(strip, look: dict) -> None:
    """Give ``strip`` the placement ``look`` (values a Blender version lacks are skipped)."""
    for path, value in look.items():
        owner, name = _owner(strip, path)
        if hasattr(owner, name):
            setattr(owner, name, tuple(value) if isinstance(value, list) else value)


def is_neutral(look: dict) -> bool:
    """True when the strip shows its picture as it is (the result then needs no placement)."""
    return all(
        look.get(path, value) == (list(value) if isinstance(value, tuple) else value) for path, value in NEUTRAL.items()
    )
