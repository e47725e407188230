"""The job settings the add-on sends: ``EditSettings`` fields, their defaults and allowed values.

No bpy here, so the tests can compare these against ``p2v_runtime.settings`` (which Blender's
Python does not have): a default or a choice that drifts from the runtime fails a test.
"""

from __future__ import annotations

# Mirrors p2v_runtime.settings.EditSettings (tests/test_addon.py checks it).
EDIT_DEFAULTS = {
    "prompt": "",
    "source_prompt": None,
    "model": "stabilityai/stable-diffusion-2-depth",
    "captioner": "Salesforce/blip-image-captioning-base",
    "device": "auto",
    "dtype": "auto",
    "steps": 50,
    "guidance": 7.5,
    "seed": 0,
    "injection": "anchor+previous",
    "layers": "decoder",
    "update": "x0",
    "update_delta": 100.0,
    "update_steps": 25,
    "size": 512,
    "depth_norm": "clip",
    "cache_dir": None,
}
CHOICES = {
    "injection": ("anchor+previous", "anchor", "previous", "none"),
    "layers": ("decoder", "all"),
    "update": ("x0", "autograd", "off"),
    "depth_norm": ("clip", "frame"),
    "device": ("auto", "cuda", "mps", "cpu"),
    "dtype": ("auto", "fp16", "fp32"),
}
# Per-scene settings (saved in the .blend) and per-user ones (preferences).
SCENE_FIELDS = ("prompt", "source_prompt", "steps", "guidance", "seed", "injection", "layers", "update",
                "update_delta", "update_steps", "size", "depth_norm")
PREFERENCE_FIELDS = ("model", "captioner", "device", "dtype", "cache_dir")
DEPTH_CHOICES = ("ESTIMATE", "ZPASS")
ZPASS_RENDER_CHOICES = ("PREVIEW", "SCENE")  # how a scene strip is rendered for its Z pass


def job_settings(scene_values: dict, preference_values: dict, overrides: dict | None = None) -> dict:
    """The settings dict of a job: scene values, preference values, then explicit overrides.

    Empty strings mean "default" for the optional text fields (source prompt: caption the first
    frame; cache dir: the runtime's user cache).
    """
    settings = {}
    for name in SCENE_FIELDS:
        if name in scene_values:
            settings[name] = scene_values[name]
    for name in PREFERENCE_FIELDS:
        if name in preference_values:
            settings[name] = preference_values[name]
    for name, value in (overrides or {}).items():
        if name not in EDIT_DEFAULTS:
            raise KeyError(f"unknown setting {name!r}")
        if value is not None:
            settings[name] = value
    for name in ("source_prompt", "cache_dir"):
        if name in settings and not (settings[name] or "").strip():
            settings[name] = None
    for name in ("model", "captioner"):
        if name in settings and not (settings[name] or "").strip():
            del settings[name]
    return settings
