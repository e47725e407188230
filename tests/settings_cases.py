"""Bad values for the settings schema's fields, and the message the schema gives each.

Used by tests/test_settings.py (command lines) and tests/test_addon.py (the add-on, in Blender):
every front end must refuse these with the schema's own words. Derived from each field's spec,
so a new setting gets its case without a hand-written entry (texts that any value suits, such as
the negative prompt, have no bad value).
"""

from __future__ import annotations

from p2v_runtime import settings as schema


def bad_value(field):
    """A value of the right kind that the schema refuses, or None when every value of it is valid."""
    spec = schema.spec_of(field)
    kind = schema.kind_of(field)
    if spec.choices:
        return "not-a-choice"
    if kind is int:
        if spec.multiple_of:
            return int(spec.low) + spec.multiple_of // 2
        return int(spec.high) + 1
    if kind is float:
        return float(spec.high) * 10
    if field.name == "frames":
        return "five"
    if field.default is not None and field.default == "" and field.name != "prompt":
        return None  # any text will do (negative prompt)
    if field.default is None:
        return None  # optional texts: empty means the default
    return "   "  # required texts: prompt, model, captioner


def bad_values() -> dict:
    found = {}
    for field in schema.setting_fields():
        value = bad_value(field)
        if value is not None:
            found[field.name] = value
    return found


def refusal(name: str, value) -> str:
    """The schema's own message for ``name = value`` (with a valid prompt around it)."""
    values = {"prompt": "x", name: value}
    try:
        schema.EditSettings.from_dict(values)
    except schema.SettingsError as exc:
        return str(exc)
    raise AssertionError(f"{name}={value!r} is accepted by the schema")
