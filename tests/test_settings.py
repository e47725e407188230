"""The one settings schema: every field reachable from each front end it belongs to, with the same
default and the same refusal message for a bad value.

The add-on's side (bpy properties built from the schema, in real Blender) is checked in
tests/test_addon.py::test_addon_properties_follow_the_schema, from the same bad values.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest
from settings_cases import bad_values, refusal

from p2v_runtime import cli
from p2v_runtime import settings as schema

REPO = cli.__file__.rsplit("/p2v_runtime/", 1)[0]


def _subparser(name: str) -> argparse.ArgumentParser:
    return cli.build_parser()._subparsers._group_actions[0].choices[name]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _headless_parser():
    sys.path.insert(0, f"{REPO}/scripts")
    try:
        import p2v_blender
    finally:
        sys.path.pop(0)
    return p2v_blender


def test_every_field_has_a_spec_a_label_and_help():
    for f in schema.setting_fields():
        spec = schema.spec_of(f)
        assert spec.label and spec.help, f.name
        assert spec.cli or spec.blender is not None, f"{f.name} is reachable from no front end"
        assert schema.kind_of(f) in (str, int, float)
        if spec.choices:
            assert f.default in schema.choice_values(f.name)
        # the default itself is valid
        schema.check_value(f, f.default)


def test_every_number_and_choice_has_a_bad_value():
    cases = bad_values()
    for f in schema.setting_fields():
        if schema.spec_of(f).choices or schema.kind_of(f) in (int, float):
            assert f.name in cases, f.name


@pytest.mark.parametrize("front, command", [("cli", "edit"), ("cli", "ablate")])
def test_command_line_offers_every_setting_with_the_schema_default(front, command, tmp_path):
    parser = _subparser(command)
    exclude = ("injection", "update") if command == "ablate" else ()
    shown = {opt for action in parser._actions if action.help != argparse.SUPPRESS for opt in action.option_strings}
    for f in schema.fields_for(front):
        assert (schema.flag(f.name) in shown) == (f.name not in exclude), f.name
    args = parser.parse_args([str(tmp_path), "--out", str(tmp_path / "out"), "--prompt", "a cat"])
    built = schema.from_arguments(args, front, exclude)
    assert built == schema.EditSettings(prompt="a cat").validate()


def test_headless_script_offers_every_blender_setting_with_the_schema_default():
    p2v_blender = _headless_parser()
    parser = p2v_blender.build_parser()
    for f in schema.setting_fields():
        assert (schema.flag(f.name) in _flags(parser)) == (schema.spec_of(f).blender is not None), f.name
    args = parser.parse_args(["--strip", "s"])
    assert schema.given_values(args, "blender") == {}  # not given: the scene's value, then the default
    assert {"--strip", "--blend", "--save", "--stats", "--server", "--runtime-python"} <= _flags(parser)


@pytest.mark.parametrize("name, value", sorted(bad_values().items()))
def test_p2v_edit_refuses_a_bad_value_with_the_schema_message(name, value, tmp_path, capsys):
    if not schema.spec_of(schema.field_named(name)).cli:
        pytest.skip(f"{name} is not a p2v edit option")
    args = ["edit", str(tmp_path / "clip"), "--out", str(tmp_path / "out")]
    if name != "prompt":
        args += ["--prompt", "x"]
    code = cli.main([*args, schema.flag(name), str(value)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_ERROR
    assert err == [f"p2v: error: {refusal(name, value)}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value", sorted(bad_values().items()))
def test_headless_script_refuses_a_bad_value_with_the_schema_message(name, value):
    """What scripts/p2v_blender.py does before Blender is involved: parse, convert, then the add-on's
    (vendored, byte-identical) schema validates the values over the scene's."""
    if schema.spec_of(schema.field_named(name)).blender is None:
        pytest.skip(f"{name} is not in the add-on")
    p2v_blender = _headless_parser()
    args = p2v_blender.build_parser().parse_args(["--strip", "s", schema.flag(name), str(value)])
    given = schema.given_values(args, "blender")
    base = {} if name == "prompt" else {"prompt": "x"}
    with pytest.raises(schema.SettingsError) as excinfo:
        schema.EditSettings.from_dict({**base, **given})
    assert str(excinfo.value) == refusal(name, value)


def test_text_that_is_not_a_number_is_refused_in_the_schema_words():
    with pytest.raises(schema.SettingsError, match=r"^Steps \(--steps\) must be a whole number, got 'ten'$"):
        schema.parse_text("steps", "ten")
    with pytest.raises(schema.SettingsError, match=r"^Guidance \(--guidance\) must be a number"):
        schema.parse_text("guidance", "high")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"prompt": " "}, "Prompt (--prompt) is empty"),
        ({"prompt": "x", "steps": 0}, "Steps (--steps) must be between 1 and 500, got 0"),
        ({"prompt": "x", "steps": 2.5}, "Steps (--steps) must be a whole number, got 2.5"),
        ({"prompt": "x", "steps": True}, "Steps (--steps) must be a whole number, got True"),
        ({"prompt": "x", "size": 100}, "Size (--size) must be a multiple of 64, got 100"),
        ({"prompt": "x", "guidance": float("nan")}, "Guidance (--guidance) must be a number, got nan"),
        ({"prompt": "x", "device": "tpu"}, "Device (--device) must be one of auto, cuda, mps, cpu; got 'tpu'"),
        ({"prompt": "x", "frames": "5:5"}, "Frames (--frames) 5:5 selects no frames"),
        ({"prompt": 5}, "Prompt (--prompt) must be text, got 5"),
        ({"prompt": "x", "sampler": "euler"}, "unknown setting(s): sampler"),
        ({"prompt": "x", "anchor": "last"}, "Anchor (--anchor) must be first, middle or a frame number"),
        ({"prompt": "x", "anchor": "-1"}, "Anchor (--anchor) must be first, middle or a frame number"),
        ({"prompt": "x", "seed": -1}, "Seed (--seed) must be between 0 and 2147483647, got -1"),
        ({"prompt": "x", "feature_store": "disk"}, "Feature memory (--feature-store) must be one of auto, gpu, cpu"),
    ],
)
def test_bad_values_are_refused_with_one_line(values, message):
    with pytest.raises(schema.SettingsError) as excinfo:
        schema.EditSettings.from_dict(values)
    assert str(excinfo.value).startswith(message)
    assert "\n" not in str(excinfo.value)


def test_empty_optional_texts_mean_their_default():
    built = schema.EditSettings.from_dict({"prompt": "x", "source_prompt": "  ", "cache_dir": ""})
    assert built.source_prompt is None and built.cache_dir is None


def test_the_wire_carries_only_what_the_runtime_uses():
    settings = schema.EditSettings(prompt="x", frames="2:5", depth="zpass").validate()
    wire = settings.to_wire()
    local = {f.name for f in schema.setting_fields() if not schema.spec_of(f).wire}
    assert local == {"frames", "depth", "zpass_render"}
    assert not local & set(wire)
    assert schema.EditSettings.from_wire(wire) == dataclasses.replace(settings, frames="", depth="estimate")
    with pytest.raises(schema.SettingsError, match="applied by the front end"):
        schema.EditSettings.from_wire({**wire, "frames": "0:1"})
    with pytest.raises(schema.SettingsError, match="unknown setting"):
        schema.EditSettings.from_wire({**wire, "extra": {"echo_delay": 1}})
    with pytest.raises(schema.SettingsError, match="mapping"):
        schema.EditSettings.from_wire(["x"])


@pytest.mark.parametrize(
    "text, count, expected",
    [
        ("", 10, range(10)),
        ("2:5", 10, range(2, 5)),
        ("7:", 10, range(7, 10)),
        (":3", 10, range(0, 3)),
    ],
)
def test_frame_range_selects(text, count, expected):
    assert schema.frame_range(text, count) == expected


@pytest.mark.parametrize("text", ["0:11", "10:", "-1:3", "x", "3"])
def test_frame_range_outside_or_malformed_names_the_clip_length(text):
    with pytest.raises(schema.SettingsError) as excinfo:
        schema.frame_range(text, 10)
    assert "10 frames" in str(excinfo.value) and "--frames" in str(excinfo.value)


def test_update_range_is_scaled_from_fifty_steps():
    assert schema.EditSettings(prompt="x").last_update_step() == 25
    assert schema.EditSettings(prompt="x", steps=10).last_update_step() == 5
    assert schema.EditSettings(prompt="x", steps=3, update_steps=1000).last_update_step() == 2


def test_settings_module_is_standard_library_only():
    """The add-on vendors it into Blender's Python, which has no third-party packages."""
    import ast

    tree = ast.parse(open(schema.__file__, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the vendored copy has no package around it"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize(
    "text, count, index",
    [
        ("first", 7, 0),
        ("middle", 7, 3),
        ("middle", 8, 4),
        ("middle", 1, 0),
        ("6", 7, 6),
        (" Middle ", 4, 2),
        ("007", 9, 7),
    ],
)
def test_anchor_names_a_frame_of_the_clip(text, count, index):
    settings = schema.EditSettings(prompt="x", anchor=text).validate()
    assert settings.anchor_index(count) == index
    assert settings.anchor in ("first", "middle", str(index))  # kept in one spelling


def test_an_anchor_past_the_clip_names_its_length():
    with pytest.raises(
        schema.SettingsError, match=r"^Anchor \(--anchor\) 7 is past the clip: it has 7 frame\(s\), 0..6$"
    ):
        schema.EditSettings(prompt="x", anchor="7").validate().anchor_index(7)
