"""The edit settings as Blender properties, built from the runtime's settings schema.

Nothing here lists a setting by hand: ``_vendor/settings.py`` (a byte-for-byte copy of
``p2v_runtime/settings.py``, written by scripts/build_addon.py) says which settings exist, their
defaults, limits and labels, and whether Blender keeps them per scene (``scene.p2v``, saved in the
.blend) or per user (the add-on preferences). The PropertyGroup is made with ``type(...)`` from
that list, and the same schema validates the values before a job starts, so a bad value gets the
same message in Blender, in ``p2v edit`` and in the headless script.
"""

import bpy
from bpy.props import EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from ._vendor import settings as schema


def bpy_property(f):
    """The bpy property for one schema field (enum, int, float or text)."""
    spec = schema.spec_of(f)
    common = {"name": spec.label, "description": spec.help[:1].upper() + spec.help[1:]}
    if spec.choices:
        items = [(c.value, c.label, c.help[:1].upper() + c.help[1:]) for c in spec.choices]
        return EnumProperty(items=items, default=f.default, **common)
    kind = schema.kind_of(f)
    if kind is int:
        limits = {
            k: int(v) for k, v in (("min", spec.low), ("max", spec.high), ("soft_max", spec.soft_high)) if v is not None
        }
        if spec.multiple_of:
            limits["step"] = spec.multiple_of
        return IntProperty(default=f.default, **limits, **common)
    if kind is float:
        limits = {
            k: float(v)
            for k, v in (("min", spec.low), ("max", spec.high), ("soft_max", spec.soft_high))
            if v is not None
        }
        return FloatProperty(default=f.default, **limits, **common)
    subtype = {"folder": "DIR_PATH"}.get(spec.path, "NONE")
    return StringProperty(default=f.default or "", subtype=subtype, **common)


def annotations(scope: str) -> dict:
    """``{name: bpy property}`` for every setting the add-on keeps in ``scope`` (scene or preferences)."""
    return {f.name: bpy_property(f) for f in schema.setting_fields() if schema.spec_of(f).blender == scope}


def fields(scope: str, advanced: bool | None = None) -> list:
    """The schema fields kept in ``scope``, in schema order; ``advanced`` filters for the panel."""
    return [
        f
        for f in schema.setting_fields()
        if schema.spec_of(f).blender == scope and (advanced is None or schema.spec_of(f).advanced == advanced)
    ]


def values(props, scope: str) -> dict:
    """The settings ``props`` holds as plain values (folders made absolute, "//" is the .blend's)."""
    found = {}
    for f in fields(scope):
        value = getattr(props, f.name)
        if schema.spec_of(f).path and value:
            value = bpy.path.abspath(value)
        found[f.name] = value
    return found


def job_settings(scene, prefs, overrides: dict | None = None):
    """The validated settings of the next edit: schema defaults, the user's preferences, the scene's
    values, then ``overrides`` (the headless script's options); raises ``schema.SettingsError``."""
    merged = {}
    if prefs is not None:
        merged.update(values(prefs, schema.PREFERENCES))
    if hasattr(scene, "p2v"):
        merged.update(values(scene.p2v, schema.SCENE))
    merged.update(overrides or {})
    return schema.EditSettings.from_dict(merged)


def load_scene_settings(scene, recorded: dict) -> list[str]:
    """Set the scene's settings from a result's recorded ones (unknown or refused values are skipped:
    a result made by another version); return the names set."""
    loaded = []
    for f in fields(schema.SCENE):
        if f.name not in recorded:
            continue
        value = recorded[f.name]
        if value is None:
            value = ""  # an optional text left empty: its default
        try:
            setattr(scene.p2v, f.name, value)
        except (TypeError, ValueError):
            continue
        loaded.append(f.name)
    return loaded


P2VSceneSettings = type(
    "P2VSceneSettings",
    (bpy.types.PropertyGroup,),
    {
        "__doc__": "What the next edit of a strip in this scene does",
        "__annotations__": annotations(schema.SCENE),
    },
)

CLASSES = (P2VSceneSettings,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.p2v = PointerProperty(type=P2VSceneSettings, name="Pix2Video")


def unregister() -> None:
    del bpy.types.Scene.p2v
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
