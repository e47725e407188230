"""The Blender add-on, with real Blender (bpy 5.0.1 and 4.2 LTS) in background.

Every Blender check runs in a subprocess (tests/addon_scenarios.py) that installs the built
extension zip into an isolated user folder, builds a .blend with image, movie and scene strips
(trimmed, non-zero starts) and drives the add-on's own EditJob through the real runtime
subprocess and socket with the tiny models. The scenarios run once per Blender version; each test
below checks one part of what they found. Checks that need no Blender (vendored protocol, build,
settings mirror, PNG writer, runtime set-up) run here directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import blender_helpers as bh
import numpy as np
import pytest
import settings_cases

REPO = bh.REPO
VERSIONS = ("5.0", "4.2")
SCENARIOS = (
    "image",
    "movie",
    "scene",
    "echo_image",
    "echo_movie",
    "echo_scene",
    "cancel",
    "crash",
    "second_edit",
    "warm_reuse",
    "remote_ok",
    "remote_wrong_token",
    "remote_refused",
    "bad_no_strip",
    "bad_sound",
    "bad_text",
    "bad_color",
    "bad_meta",
    "bad_movie_missing",
    "bad_image_holes",
    "bad_scene_no_camera",
    "bad_too_long",
    "long_confirmed_check",
    "bad_no_channel",
    "bad_output_dir",
    "bad_python_missing",
    "bad_python_lacks_runtime",
    "bad_empty_prompt",
    "bad_zpass_image",
    "bad_model_missing",
    "unwritable_probe",
    "unsaved_file",
    "release",
    "panel_draw",
    "schema_walk",
    "placed_image",
    "muted_source",
    "naming",
    "workflow",
    "operator_poll",
    "operator_run",
    "operator_in_override",
    "modal_loop",
    "check_runtime",
    "setup_fails",
    "register_twice",
)

pytestmark = pytest.mark.blender

if str(REPO) not in sys.path:  # blender_addon's bpy-free modules (settings_map, png, runtime_process)
    sys.path.insert(0, str(REPO))


def _scripts_module(name: str):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="session")
def built_addon(tmp_path_factory) -> dict[str, Path]:
    return bh.build_addon(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    return bh.make_media(tmp_path_factory.mktemp("media"))


def _config(built_addon, tiny_models, media_dir: Path, scenarios) -> dict:
    return dict(
        zip=str(built_addon["extension"]),
        media=str(media_dir),
        model=str(tiny_models["sd2-depth"]),
        captioner=str(tiny_models["blip"]),
        runtime_python=str(bh.RUNTIME_PYTHON),
        base_python=bh.base_python(),
        scenarios=list(scenarios),
        bad_values=settings_cases.bad_values(),
    )


@pytest.fixture(scope="module", params=VERSIONS)
def results(request, built_addon, tiny_models, tmp_path_factory) -> dict:
    """All scenarios, run once per Blender version (about 40 s each)."""
    version = request.param
    if bh.bpy_python(version) is None:
        pytest.skip(f"bpy {version} is not installed (scripts/test.sh makes it)")
    work = tmp_path_factory.mktemp(f"blender-{version}")
    media_dir = bh.make_media(work / "media")  # its own copy: scenarios delete files from it
    found = bh.run_scenarios(version, _config(built_addon, tiny_models, media_dir, SCENARIOS), work / "run")
    found["_work"] = str(work / "run")
    found["_media"] = str(media_dir)
    found["_version"] = version
    return found


def outcome(results: dict, name: str) -> dict:
    found = results[name]
    assert "exception" not in found, found["exception"]
    return found


# --- no Blender needed -------------------------------------------------------------------------


def test_vendored_protocol_matches_the_runtime(built_addon):
    build_addon = _scripts_module("build_addon")
    build_addon.vendor()
    assert build_addon.vendored_differences() == []
    for kind in ("extension", "legacy"):
        prefix = "" if kind == "extension" else "pix2video/"
        with zipfile.ZipFile(built_addon[kind]) as archive:
            for name in ("protocol.py", "client.py"):
                shipped = archive.read(f"{prefix}_vendor/{name}")
                assert shipped == (REPO / "p2v_runtime" / name).read_bytes(), f"{kind} zip: _vendor/{name} differs"


def test_vendored_copy_that_differs_is_found(tmp_path):
    build_addon = _scripts_module("build_addon")
    addon = tmp_path / "addon"
    build_addon.vendor(addon)
    assert build_addon.vendored_differences(addon) == []
    (addon / "_vendor" / "client.py").write_text("# edited by hand\n")
    assert build_addon.vendored_differences(addon) == ["client.py"]


def test_packages_have_the_addon_and_validate(built_addon):
    with zipfile.ZipFile(built_addon["extension"]) as archive:
        names = set(archive.namelist())
    for required in (
        "blender_manifest.toml",
        "__init__.py",
        "compat.py",
        "operators.py",
        "panel.py",
        "preferences.py",
        "strip_frames.py",
        "output_strip.py",
        "runtime_process.py",
        "job.py",
    ):
        assert required in names
    assert any(n.startswith("runtime/p2v_runtime-") and n.endswith(".whl") for n in names)
    assert not any("__pycache__" in n for n in names)
    with zipfile.ZipFile(built_addon["legacy"]) as archive:
        assert all(n.startswith("pix2video/") for n in archive.namelist())
    validators = sorted(
        (REPO / ".venv").glob("lib/python3*/site-packages/bpy/*/scripts/addons_core/bl_pkg/cli/blender_ext.py")
    )
    validators += sorted(
        (REPO / ".venv-bpy42").glob("lib/python3*/site-packages/bpy/*/scripts/addons_core/bl_pkg/cli/blender_ext.py")
    )
    if not validators:
        pytest.skip("Blender's extension validator (in the bpy package) is not installed")
    for validator in validators:
        done = subprocess.run(
            [sys.executable, str(validator), "validate", str(built_addon["extension"])], capture_output=True, text=True
        )
        assert done.returncode == 0 and "FATAL" not in done.stdout, done.stdout + done.stderr


def test_runtime_wheel_metadata(built_addon):
    with zipfile.ZipFile(built_addon["extension"]) as archive:
        wheel_name = next(n for n in archive.namelist() if n.endswith(".whl"))
        wheel = archive.read(wheel_name)
    path = Path(wheel_name).name
    import io

    with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
        names = whl.namelist()
        assert "p2v_runtime/protocol.py" in names and "p2v_runtime/server/__init__.py" in names
        meta = whl.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        assert "Provides-Extra: runtime" in meta and 'torch>=2.6; extra == "runtime"' in meta
        entry = whl.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
        assert "p2v = p2v_runtime.cli:main" in entry
    assert path.startswith("p2v_runtime-") and path.endswith("-py3-none-any.whl")


def test_png_writer_round_trip(tmp_path):
    from blender_addon import png

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "frame.png"
    png.write_rgb(str(path), rgb.tobytes(), 53, 37)
    assert np.array_equal(bh.read_png(path), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]  # no temporary file left
    with pytest.raises(ValueError):
        png.encode_rgb(b"\x00" * 10, 53, 37)


def test_png_grey16_writes_what_the_runtime_writes(tmp_path):
    """The add-on's --save-depth PNGs (standard library) hold the values the runtime's own writer
    gives the same depth: clipped to [0, 1], NaN as 0, rounded to even."""
    from blender_addon import png
    from p2v_runtime.frames import write_depth_png

    values = np.random.default_rng(1).uniform(-0.2, 1.2, (13, 21)).astype(np.float32)
    values[0, :4] = [np.nan, np.inf, -np.inf, 0.5 / 65535]
    png.write_grey16(str(tmp_path / "addon.png"), values.astype("<f4").tobytes(), 21, 13)
    write_depth_png(tmp_path / "runtime.png", values)
    from PIL import Image

    with Image.open(tmp_path / "addon.png") as ours, Image.open(tmp_path / "runtime.png") as theirs:
        assert np.array_equal(np.asarray(ours).astype(np.int64), np.asarray(theirs).astype(np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["addon.png", "runtime.png"]


def test_runtime_setup_installs_the_wheel_and_says_what_is_missing(built_addon, tmp_path):
    """Set up runtime: a venv with the bundled wheel (no network: --no-deps), then the device check."""
    from blender_addon import runtime_setup

    with zipfile.ZipFile(built_addon["extension"]) as archive:
        wheel_name = next(n for n in archive.namelist() if n.endswith(".whl"))
        wheel = tmp_path / Path(wheel_name).name
        wheel.write_bytes(archive.read(wheel_name))
    venv = tmp_path / "venv"
    task = runtime_setup.SetupTask(
        bh.base_python(),
        str(venv),
        [str(wheel)],
        pip_args=["--no-deps", "--no-index"],
        log_path=str(tmp_path / "setup.log"),
    )
    task.start()
    assert task.join(300)
    # The base Python has no torch: the runtime is installed, and the check says what is missing.
    assert task.state == "failed", task.message
    assert "torch cannot be imported" in task.message
    assert task.step == task.steps
    done = subprocess.run(
        [runtime_setup.venv_python(str(venv)), "-c", "import p2v_runtime.protocol as p; print(p.PROTOCOL_VERSION)"],
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "1"
    assert (venv / "bin" / "p2v").exists()
    log = (tmp_path / "setup.log").read_text()
    assert "Installing the runtime" in log and "Successfully installed p2v-runtime" in log


def _fake_torch_index(root: Path, label: str) -> str:
    """A PEP 503 index folder ``root/<label>`` with one torch wheel: a module that imports in no time
    and finds no GPU, versioned like PyTorch's builds (``2.5.1+cpu``)."""
    version = f"2.5.1+{label}"
    dist = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\n"
        "class cuda:\n    is_available = staticmethod(lambda: False)\n"
        "class backends:\n    mps = None\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    folder = root / label / "torch"
    folder.mkdir(parents=True)
    name = f"torch-{version}-py3-none-any.whl"
    (folder / "index.html").write_text(
        f'<a href="{name.replace("+", "%2B")}">{name}</a>\n'
    )  # pip reads a file: index's pages
    with zipfile.ZipFile(folder / name, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n")
    return (root / label).as_uri()


def test_runtime_setup_installs_torch_from_its_index_with_real_pip(built_addon, tmp_path):
    """The torch step with real pip from a local index: torch first, then the runtime with torch
    pinned; a second set-up with another build replaces the first (pip alone would keep it)."""
    from blender_addon import runtime_setup

    with zipfile.ZipFile(built_addon["extension"]) as archive:
        wheel_name = next(n for n in archive.namelist() if n.endswith(".whl"))
        wheel = tmp_path / Path(wheel_name).name
        wheel.write_bytes(archive.read(wheel_name))
    venv = tmp_path / "venv"
    # Only the given index: no pip configuration (this machine's lists a real torch wheel).
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    for label in ("cpu", "cu124"):
        task = runtime_setup.SetupTask(
            bh.base_python(),
            str(venv),
            [str(wheel)],
            torch_index_url=_fake_torch_index(tmp_path / "whl", label),
            pip_args=["--no-deps"],
            log_path=str(tmp_path / f"setup-{label}.log"),
            env=env,
        )
        task.start()
        assert task.join(300)
        assert task.state == "done", task.message
        assert task.steps == task.step == 4
        log = (tmp_path / f"setup-{label}.log").read_text()
        assert log.startswith(f"Installing torch, the build at {tmp_path.as_uri()}/whl/{label} (Torch index URL")
        assert f"torch 2.5.1+{label} installed" in log and f"torch==2.5.1+{label}" in log
        assert ("Removing torch 2.5.1+cpu" in log) == (label == "cu124")
    assert task.message == (
        "Runtime ready: p2v_runtime 0.1.0, torch 2.5.1+cu124, device cpu "
        "(the CUDA build is installed but torch finds no GPU: see the log)"
    )


def test_runtime_setup_can_be_cancelled(tmp_path):
    from blender_addon import runtime_setup

    task = runtime_setup.SetupTask(
        bh.base_python(), str(tmp_path / "venv"), ["p2v-runtime"], log_path=str(tmp_path / "setup.log")
    )
    task.start()
    task.cancel()
    assert task.join(120)
    assert task.state == "cancelled" and task.message == "Set-up cancelled"


def test_runtime_process_refuses_a_missing_python():
    from blender_addon import runtime_process
    from blender_addon.errors import P2VAddonError

    with pytest.raises(P2VAddonError, match="not found"):
        runtime_process.resolve_python("/nonexistent/python3")
    with pytest.raises(P2VAddonError, match="Set up runtime"):
        runtime_process.resolve_python("")


# --- with Blender: edits through the real runtime ------------------------------------------------


def test_extension_installs_and_enables(results):
    assert results["install"] == ["FINISHED"]
    assert results["enabled"] is True


@pytest.mark.parametrize(
    "name, strip, channel, start, length",
    [
        ("image", "img", 4, 7, 5),  # channel 3 is taken over the range, channel 4 is free there
        ("movie", "mov", 5, 21, 7),
        ("scene", "shot", 7, 43, 7),
    ],
)
def test_edit_makes_the_new_strip(results, name, strip, channel, start, length):
    found = outcome(results, name)
    assert found["state"] == "done", found["message"]
    assert found["frames_done"] == found["total"] == length == found["stats_frames"]
    new = found["new"]
    assert new["name"] == f"{strip} p2v a red sports car"  # source, marker, prompt: results tell apart
    assert new["record"]["p2v_source"] == strip and new["record"]["p2v_prompt"] == "a red sports car"
    assert json.loads(new["record"]["p2v_settings"])["steps"] == 2
    assert new["type"] == "IMAGE"
    assert (new["channel"], new["frame_final_start"], new["frame_final_duration"]) == (channel, start, length)
    assert new["directory"].startswith(f"//p2v/{strip}_") and new["directory"].endswith("/")
    names = [f"{i:06d}.png" for i in range(length)]
    assert new["elements"] == names and new["files_on_disk"] == names
    for file in names:
        assert bh.read_png(Path(new["folder"]) / file).shape == (found["render_size"][1], found["render_size"][0], 3)
    assert found["changes"] == []  # source strip, its files, every other strip, scenes, images


def test_a_placed_strip_is_edited_as_its_own_picture_and_composites_where_it_was(results):
    """Scaled 0.5, moved and at 80% over red: the runtime gets the image (80x48, not the frame with a
    corner of it), and the result strip, with the source's placement, leaves the composite as it was."""
    found = outcome(results, "placed_image")
    assert found["state"] == "done", found["message"]
    assert found["frame_size"] == [bh.WIDTH, bh.HEIGHT]
    media_dir = Path(results["_media"])
    for k in range(3):  # the echo runtime's frames are what was sent: the source images themselves
        sent = bh.read_png(Path(found["new"]["folder"]) / f"{k:06d}.png")
        assert np.array_equal(sent, bh.read_png(media_dir / "imgs" / f"f{k:03d}.png")), k
    look = found["new"]["look"]
    assert look == found["source_look"]
    assert look["transform.scale_x"] == 0.5 and look["transform.offset_x"] == 15.0
    assert look["blend_alpha"] == pytest.approx(0.8)
    assert found["composite_red"] > 0.5  # the red strip shows around the image
    assert found["composite_difference"] < 0.5  # the result, in place of the source, looks the same
    assert found["composite_difference_without_look"] > 10 * max(found["composite_difference"], 0.5)


def test_a_muted_source_on_a_muted_channel_is_still_edited(results):
    found = outcome(results, "muted_source")
    assert found["state"] == "done", found["message"]
    assert found["new"]["files_on_disk"] == [f"{i:06d}.png" for i in range(5)]
    media_dir = Path(results["_media"])
    first = bh.read_png(Path(found["new"]["folder"]) / "000000.png")
    assert np.array_equal(first, bh.read_png(media_dir / "imgs" / "f002.png"))  # the picture, not black
    assert found["muted_after"][0] is True  # the user's strip stays muted


def test_result_names_keep_the_marker_and_fit(results):
    found = outcome(results, "naming")
    assert found["short"]["name"] == "Wolf p2v a red fox"
    for key in ("long_source", "long_prompt", "unicode", "no_prompt"):
        assert " p2v" in found[key]["name"] and found[key]["bytes"] <= 63, found[key]
    assert found["long_source"]["name"].endswith(" p2v a red fox")
    assert found["long_prompt"]["name"].startswith("Wolf p2v a marble") and found["long_prompt"]["name"].endswith("...")


def test_preview_edit_reedit_and_edit_selected(results):
    """The workflow of an artist: preview the anchor (twice: the older preview goes), edit the strip
    (the preview's inversion is reused), load a result's settings, re-edit its source, and edit two
    selected strips in one go."""
    found = outcome(results, "workflow")
    for key in ("preview1", "preview2", "edit", "load", "reedit", "selected"):
        assert found[key] == ["FINISHED"], key
    previews = [v for v in found["after_previews"].values() if v["preview"]]
    assert len(previews) == 1 and previews[0] == {"length": 1, "source": "img", "preview": True}
    assert [name for name in found["after_previews"]] == [n for n in found["after_previews"] if "preview" in n]
    edited = [v for v in found["after_edit"].values() if not v["preview"]]
    assert edited == [{"length": 5, "source": "img", "preview": False}]
    assert found["loaded"] == {"prompt": "a blue car", "steps": 2}
    reedits = [n for n, v in found["after_reedit"].items() if not v["preview"] and "green" in n]
    assert len(reedits) == 1 and found["after_reedit"][reedits[0]]["source"] == "img"
    selected = [v["source"] for n, v in found["after_selected"].items() if n not in found["after_reedit"]]
    assert sorted(selected) == ["img", "mov"]
    jobs = found["jobs"]
    assert [(j["strip"], j["preview"], j["state"]) for j in jobs] == [
        ("img", True, "done"),
        ("img", True, "done"),
        ("img", False, "done"),
        ("img", False, "done"),
        ("img", False, "done"),
        ("mov", False, "done"),
        ("img", True, "done"),
        ("img", True, "done"),
    ]
    # --anchor middle: the preview of frame 2 of 5 sits at that frame; with clip depth all five
    # frames are sent, with per-frame depth the anchor's alone.
    for depth_norm in ("clip", "frame"):
        assert found[f"preview_middle_{depth_norm}"] == ["FINISHED"]
        assert found[f"preview_middle_{depth_norm}_strips"] == [[2, 1]]
    assert [(j["sent"], j["frames"]) for j in jobs[-2:]] == [(5, 1), (1, 1)]
    assert jobs[0]["frames"] == 1 and jobs[0]["hits"] == 0
    assert jobs[2]["frames"] == 5 and jobs[2]["hits"] == 1  # the anchor's inversion from the preview
    assert jobs[3]["prompt"] == "a green car"
    assert found["preview_image"]


def test_frames_sent_are_what_the_strip_shows(results):
    """With the runtime's echo runner, the result strip holds exactly the frames that were sent."""
    work = Path(results["_work"])
    media_dir = Path(results["_media"])
    image = outcome(results, "echo_image")
    assert image["state"] == "done"
    for k in range(5):  # timeline 7..11 = files f002..f006 (offset start 2)
        out = bh.read_png(Path(image["new"]["folder"]) / f"{k:06d}.png")
        assert np.array_equal(out, bh.read_png(media_dir / "imgs" / f"f{k + 2:03d}.png")), k
    movie = outcome(results, "echo_movie")
    assert movie["state"] == "done"
    decoded = bh.movie_frames(media_dir / "clip.mp4")
    for k in range(7):  # timeline 21..27 = movie frames 1..7 (offset start 1)
        out = bh.read_png(Path(movie["new"]["folder"]) / f"{k:06d}.png").astype(int)
        errors = [np.abs(out - frame.astype(int)).mean() for frame in decoded]
        assert int(np.argmin(errors)) == k + 1 and min(errors) < 4, (k, errors)
    scene = outcome(results, "echo_scene")
    assert scene["state"] == "done"
    frames = [bh.read_png(Path(scene["new"]["folder"]) / f"{k:06d}.png").astype(int) for k in range(7)]
    assert all(frame.mean() > 10 for frame in frames)  # rendered, not black
    assert np.abs(frames[0] - frames[-1]).mean() > 0.5  # the card moved between shot frames 4 and 10
    assert work.exists()


def test_cancel_keeps_the_frames_already_edited(results):
    found = outcome(results, "cancel")
    assert found["state"] == "cancelled"
    assert 1 <= found["frames_done"] < found["total"]
    assert found["new"]["frame_final_duration"] == found["frames_done"] == len(found["new"]["files_on_disk"])
    assert f"Cancelled after {found['frames_done']} of {found['total']}" in found["message"]
    assert found["changes"] == []


def test_runtime_crash_keeps_the_frames_and_says_so(results):
    found = outcome(results, "crash")
    assert found["state"] == "failed"
    assert "runtime stopped unexpectedly" in found["message"] and "runtime.log" in found["message"]
    assert found["frames_done"] >= 1 and found["new"]["frame_final_duration"] == found["frames_done"]
    assert f"{found['frames_done']} frame(s) kept" in found["message"]
    assert found["runtime_after"] is False
    assert found["changes"] == []


def test_second_edit_is_refused_while_one_runs(results):
    found = outcome(results, "second_edit")
    assert found["second_started"] is False
    assert "already running" in found["message"]
    assert found["first_state"] == "cancelled", found.get("first_message")


def test_runtime_stays_warm_between_jobs(results):
    found = outcome(results, "warm_reuse")
    (pid1, state1, _), (pid2, state2, seconds2) = found["runs"]
    assert state1 == state2 == "done"
    assert pid1 == pid2 and found["alive"]
    assert seconds2 < 3.0  # no second start, models already loaded


def test_remote_runtime(results):
    ok = outcome(results, "remote_ok")
    assert ok["state"] == "done" and ok["changes"] == []
    wrong = outcome(results, "remote_wrong_token")
    assert wrong["state"] == "failed" and "refused the token" in wrong["message"]
    refused = outcome(results, "remote_refused")
    assert refused["state"] == "failed" and "Connection refused" in refused["message"]
    for found in (wrong, refused):
        assert found["frames_done"] == 0 and found["changes"] == [] and "nothing was changed" in found["message"]


BAD_INPUTS = {
    "bad_no_strip": "No active strip",
    "bad_sound": "is a sound strip",
    "bad_text": "is a text strip",
    "bad_color": "is a color strip",
    "bad_meta": "is a meta strip",
    "bad_movie_missing": "movie file of strip 'gone' is missing",
    "bad_image_holes": "missing 1 image file(s)",
    "bad_scene_no_camera": "has no camera",
    "bad_too_long": "more than the limit of 3",
    "bad_no_channel": "No free channel above strip 'top'",
    "bad_output_dir": "cannot be written",
    "bad_python_missing": "is not found",
    "bad_python_lacks_runtime": "does not have p2v_runtime installed",
    "bad_empty_prompt": "Prompt (--prompt) is empty",
    "bad_zpass_image": "needs a scene strip",
    "bad_model_missing": "cannot load model",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_reported_and_changes_nothing(results, name):
    if name == "bad_sound" and "snd" not in results["strips"]:
        pytest.skip("this bpy build has no audio, so the test file has no sound strip")
    if name == "bad_meta" and "meta" not in results["strips"]:
        pytest.skip("this bpy version cannot add a meta strip from Python")
    found = outcome(results, name)
    message = found["error"]["message"] if "error" in found else found["message"]
    assert BAD_INPUTS[name] in message
    if "error" in found:
        assert found["error"]["type"] in ("P2VAddonError", "StripTooLong")
    else:  # found by the worker (the runtime's side): the job ends with nothing received
        assert found["state"] == "failed" and found["frames_done"] == 0 and "nothing was changed" in message
    assert "\n" not in message
    assert found["changes"] == []
    assert found["running_job"] is False


def test_long_strip_runs_when_confirmed(results):
    assert outcome(results, "long_confirmed_check")["max_frames_ok"] == "done"


def test_unwritable_output_folder_is_refused(results):
    found = outcome(results, "unwritable_probe")
    assert found["raised"] and "cannot be written" in found["message"] and "Output folder" in found["message"]


def test_unsaved_file_writes_to_the_output_preference(results):
    found = outcome(results, "unsaved_file")
    assert found["state"] == "done" and found["filepath"] == ""
    assert found["folder"] == os.path.join(found["out_dir"], "still_1")
    assert found["directory"].startswith(found["out_dir"])  # absolute: there is no .blend to be relative to
    assert found["files"] == ["000000.png"]
    waiting = found["waiting"]  # the default //p2v/ has no folder before the first save
    assert waiting["state"] == "done" and "move beside it when it is saved" in waiting["message"]
    assert waiting["folder"].startswith(os.path.join(tempfile.gettempdir(), "p2v", "untitled", "still_"))
    after = found["after_save"]  # saved: the frames moved beside the .blend, the strip points there
    assert after["directory"] == "//p2v/still_1/" and after["files"] == ["000000.png"]
    assert not after["old_folder_exists"]
    assert after["explicit_abs"] == found["folder"]  # a chosen folder stays where it is


def test_release_stops_the_runtime(results):
    found = outcome(results, "release")
    assert found["released"] and found["pid_gone"] and not found["current"]


def test_addon_properties_follow_the_schema(results):
    """Every setting the schema gives Blender is a property where the schema says (scene or
    preferences), with its default, choices and limits; a bad value gets the schema's message,
    whether set on the property or given to the headless script, or Blender clamps it into range."""
    from p2v_runtime import settings as schema

    found = outcome(results, "schema_walk")
    expected = {f.name for f in schema.setting_fields() if schema.spec_of(f).blender is not None}
    assert set(found) - {"scenario_seconds"} == expected
    for f in schema.setting_fields():
        spec = schema.spec_of(f)
        if spec.blender is None:
            continue
        entry = found[f.name]
        assert entry["scope"] == spec.blender and entry["label"] == spec.label, f.name
        if f.name != "prompt":  # the test .blend's prompt is whatever the last scenario left
            assert entry["value"] == (f.default if f.default is not None else ""), f.name
        if spec.choices:
            assert entry["items"] == list(schema.choice_values(f.name)), f.name
        elif schema.kind_of(f) in (int, float) and spec.low is not None:
            assert (entry["min"], entry["max"]) == (spec.low, spec.high), f.name
        if f.name in results["schema_walk"] and "override_message" in entry:
            bad = settings_cases.bad_values()[f.name]
            assert entry["override_message"] == settings_cases.refusal(f.name, bad), f.name
            if entry["kept"] == bad:
                assert entry["property_message"] == settings_cases.refusal(f.name, bad), f.name
            elif not isinstance(entry["kept"], str):  # clamped by Blender into the schema's range
                assert spec.low <= entry["kept"] <= spec.high, f.name
    assert {name for name, entry in found.items() if isinstance(entry, dict) and "override_message" in entry} == set(
        settings_cases.bad_values()
    ) & expected


def test_panel_layout(results):
    """Blender cannot draw its UI without a window here, so the panels draw into a recorder."""
    found = outcome(results, "panel_draw")
    for key in ("idle", "advanced", "running", "preferences", "preferences_remote"):
        for entry in found[key]:
            if entry["call"] in ("prop", "operator"):
                assert entry["exists"], (key, entry)
    from p2v_runtime import settings as schema

    def scene_fields(advanced):
        return [
            f.name
            for f in schema.setting_fields()
            if schema.spec_of(f).blender == schema.SCENE
            and schema.spec_of(f).advanced == advanced
            and schema.spec_of(f).shown_when is None
        ]

    props = [e["property"] for e in found["idle"] if e["call"] == "prop"]
    assert props == scene_fields(False)  # the schema's order; the Z-pass render only with Depth 'Z pass'
    assert props[:2] == ["prompt", "source_prompt"] and "depth" in props
    assert "sequencer.p2v_edit" in [e["operator"] for e in found["idle"] if e["call"] == "operator"]
    assert any(e["call"] == "label" and e["text"] == "Strip: img" for e in found["idle"])
    assert [e["property"] for e in found["advanced"] if e["call"] == "prop"] == scene_fields(True)
    prefs = [e["property"] for e in found["preferences"] if e["call"] == "prop"]
    assert [name for name in prefs if name in schema.EditSettings.__dataclass_fields__] == [
        f.name for f in schema.setting_fields() if schema.spec_of(f).blender == schema.PREFERENCES
    ]
    running_ops = [e["operator"] for e in found["running"] if e["call"] == "operator"]
    assert "sequencer.p2v_cancel" in running_ops and "sequencer.p2v_edit" not in running_ops
    assert any(e["call"] == "progress" and "frames" in e["text"] for e in found["running"])
    local = [e["property"] for e in found["preferences"] if e["call"] == "prop"]
    assert {
        "runtime_mode",
        "python",
        "model",
        "captioner",
        "device",
        "output_dir",
        "setup_python",
        "torch_index_url",
    } <= set(local)
    assert {"p2v.setup_runtime", "p2v.check_runtime", "p2v.release_runtime"} <= {
        e["operator"] for e in found["preferences"] if e["call"] == "operator"
    }
    labels = [e["text"] for e in found["preferences_after_setup"] if e["call"] == "label"]
    announced = labels.index("Installing torch, CPU build (no NVIDIA driver found), about 0.2 GB")
    assert labels[announced + 1].startswith("Runtime ready:") and "Installing torch" not in str(found["preferences"])
    remote = [e["property"] for e in found["preferences_remote"] if e["call"] == "prop"]
    assert {"host", "port", "token", "token_file"} <= set(remote) and "python" not in remote


def test_operator_explains_and_runs(results):
    poll = outcome(results, "operator_poll")
    assert poll["no_strip_poll"] is False and "No active strip" in poll["no_strip"]
    assert "text strip" in poll["text_strip"]
    assert poll["img"] is None and poll["img_poll"] is True
    run = outcome(results, "operator_run")
    assert run["result"] == ["FINISHED"] and len(run["new"]) == 1 and run["new_length"] == 5
    # Without an event loop the operator runs on the calling thread (no worker thread), so it is
    # safe inside context.temp_override, where Blender crashes if an operator renders while
    # another Python thread runs.
    override = outcome(results, "operator_in_override")
    assert override["results"] == [["FINISHED"], ["FINISHED"]] and override["lengths"] == [7, 7]


def test_modal_loop_polls_blocks_undo_and_cancels(results):
    found = outcome(results, "modal_loop")
    assert found["answers"]["undo"] == ["RUNNING_MODAL"]  # Ctrl+Z waits for the edit
    assert found["answers"]["other"] == ["PASS_THROUGH"]  # the rest of the UI keeps working
    assert found["answers"]["esc"] == ["RUNNING_MODAL"]  # Esc asks; the job ends on a later tick
    assert found["state"] == "cancelled" and found["result"] == ["FINISHED"]  # frames kept: undo step
    assert 1 <= found["length"] < 7
    levels = [level for level, _ in found["reports"]]
    assert ["WARNING"] in levels and any("Cancelled after" in text for _, text in found["reports"])


def test_check_runtime_reports_device_or_what_is_missing(results):
    found = outcome(results, "check_runtime")
    assert found["good"]["device"] == "cpu" and found["good"]["p2v_runtime"]
    assert "p2v_runtime is not installed" in found["bad"]["error"]
    assert "not found" in found["missing"]["error"]


def test_failed_setup_says_why(results):
    found = outcome(results, "setup_fails")
    assert (
        found["state"] == "failed"
        and "Installing the runtime failed" in found["message"]
        and "log:" in found["message"]
    )


def test_register_unregister_twice_leaves_nothing(results):
    found = outcome(results, "register_twice")
    for step in found["rounds"]:
        if "after_disable" in step:
            assert step["after_disable"] == [] and step["runtime"] is False
        else:
            assert step["after_enable"] == []
    assert found["old_runtime_alive"] is False


# --- the headless script -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blend_files(built_addon, tiny_models, tmp_path_factory):
    """The test .blend saved by bpy ``version`` (4.2 cannot read a file 5.0 saved), made once each."""
    made: dict[str, Path] = {}

    def make(version: str) -> Path:
        if bh.bpy_python(version) is None:
            pytest.skip(f"bpy {version} is not installed")
        if version not in made:
            work = tmp_path_factory.mktemp(f"headless-{version}")
            config = _config(built_addon, tiny_models, bh.make_media(work / "media"), [])
            config["blend"] = str(work / "clip.blend")
            bh.run_scenarios(version, config, work / "build")
            made[version] = work / "clip.blend"
        return made[version]

    return make


def _headless(python: Path, args: list[str], tmp_path: Path, timeout: float = 300):
    env = bh.bpy_env(tmp_path / "blender-user")
    env["P2V_RUNTIME_PYTHON"] = str(bh.RUNTIME_PYTHON)
    return subprocess.run(
        [str(python), str(REPO / "scripts" / "p2v_blender.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _tiny_args(tiny_models) -> list[str]:
    return [
        "--model",
        str(tiny_models["sd2-depth"]),
        "--captioner",
        str(tiny_models["blip"]),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--size",
        "64",
        "--source-prompt",
        "a grey car",
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_headless_edit_saves_the_new_strip(version, blend_files, tiny_models, tmp_path):
    python = bh.bpy_python(version)
    if python is None:
        pytest.skip(f"bpy {version} is not installed")
    blend = tmp_path / "copy.blend"
    shutil.copy(blend_files(version), blend)
    done = _headless(
        python,
        ["--blend", str(blend), "--strip", "mov", "--prompt", "a red car", "--save", *_tiny_args(tiny_models)],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("p2v_blender: ")]
    assert lines[0].startswith("p2v_blender: editing 7 frame(s) of strip 'mov' at 80x48")
    assert any("/7 frames" in line for line in lines)
    assert "Edited 7 frame(s)" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "p2v" / "mov_1").iterdir()) == [f"{i:06d}.png" for i in range(7)]
    check = subprocess.run(
        [
            str(python),
            "-c",
            (
                f"import bpy, json; bpy.ops.wm.open_mainfile(filepath={str(blend)!r}); "
                "e = bpy.data.scenes['Edit'].sequence_editor; "
                "c = getattr(e, 'strips_all', None) or e.sequences_all; s = c['mov p2v a red car']; "
                "print('RESULT', json.dumps([s.channel, s.frame_final_start, s.frame_final_duration, s.directory]))"
            ),
        ],
        capture_output=True,
        text=True,
        env=bh.bpy_env(tmp_path / "blender-user"),
    )
    result = json.loads(next(line for line in check.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert result == [5, 21, 7, "//p2v/mov_1/"]


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_headless_bad_input_is_one_line(blend_files, tmp_path):
    python = bh.bpy_python("5.0")
    blend = tmp_path / "copy.blend"
    shutil.copy(blend_files("5.0"), blend)
    before = blend.read_bytes()
    cases = [
        (["--blend", str(blend), "--strip", "nope", "--prompt", "x"], 1, "has no strip named 'nope'"),
        (["--blend", str(blend), "--strip", "txt", "--prompt", "x", "--save"], 1, "is a text strip"),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--max-frames", "2"],
            1,
            "more than --max-frames 2: pass --yes to edit it anyway",
        ),
        (["--blend", str(blend), "--strip", "img"], 2, "Prompt (--prompt) is empty"),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--injection", "sideways"],
            2,
            settings_cases.refusal("injection", "sideways"),
        ),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--steps", "many"],
            2,
            "Steps (--steps) must be a whole number, got 'many'",
        ),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--frames", "0:99"],
            1,
            "goes past the clip: it has 5 frames",
        ),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--runtime-python", "/nonexistent/python"],
            1,
            "is not found: check --runtime-python (or $P2V_RUNTIME_PYTHON)",
        ),
        (
            ["--blend", str(blend), "--strip", "img", "--prompt", "x", "--server", f"127.0.0.1:{_closed_port()}"],
            1,
            "Cannot connect to the runtime",
        ),
    ]
    for args, code, text in cases:
        done = _headless(python, args, tmp_path)
        errors = [line for line in done.stderr.splitlines() if line.startswith("p2v_blender: error:")]
        assert done.returncode == code and len(errors) == 1 and text in errors[0], (args, done.stdout, done.stderr)
    assert blend.read_bytes() == before
    assert not (tmp_path / "p2v").exists()


def test_headless_without_bpy_says_how_to_run(tmp_path):
    done = subprocess.run(
        [
            bh.base_python(),
            str(REPO / "scripts" / "p2v_blender.py"),
            "--blend",
            "x.blend",
            "--strip",
            "s",
            "--prompt",
            "p",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "bpy is not importable" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _strips_in(python: Path, blend: Path, tmp_path: Path) -> dict:
    """{name: (channel, start, length, directory, files, source)} of the Edit scene's image strips."""
    code = (
        "import bpy, json, sys\n"
        f"bpy.ops.wm.open_mainfile(filepath={str(blend)!r})\n"
        "e = bpy.data.scenes['Edit'].sequence_editor\n"
        "c = e.strips_all if hasattr(e, 'strips_all') else e.sequences_all\n"
        "out = {s.name: [s.channel, s.frame_final_start, s.frame_final_duration, bpy.path.abspath(s.directory),\n"
        "                [x.filename for x in s.elements], s.get('p2v_source')] for s in c if s.type == 'IMAGE'}\n"
        "print('RESULT', json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env=bh.bpy_env(tmp_path / "blender-user"),
        timeout=120,
    )
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])


@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_headless_jobs_on_one_blend_keep_every_strip(version, blend_files, tiny_models, tmp_path):
    """Three farm jobs save the same .blend at once (two of them on the same strip): every result
    strip is in the file, each in a folder of its own that no other strip uses, and the file is
    whole (it opens, the source strips are there, a .blend1 keeps the version before the last)."""
    python = bh.bpy_python(version)
    if python is None:
        pytest.skip(f"bpy {version} is not installed")
    blend = tmp_path / "shot.blend"
    shutil.copy(blend_files(version), blend)
    before = _strips_in(python, blend, tmp_path)
    env = bh.bpy_env(tmp_path / "blender-user")
    env["P2V_RUNTIME_PYTHON"] = str(bh.RUNTIME_PYTHON)
    jobs = [("mov", "a red car"), ("mov", "a blue car"), ("img", "a green car")]
    procs = [
        subprocess.Popen(
            [
                str(python),
                str(REPO / "scripts" / "p2v_blender.py"),
                "--blend",
                str(blend),
                "--strip",
                strip,
                "--prompt",
                prompt,
                "--save",
                "--frames",
                "0:3",
                *_tiny_args(tiny_models),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for strip, prompt in jobs
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
    # All three opened the same version; whoever saved after the first had to take the newer file.
    assert sum("reopened (another job had saved it)" in out for out, _ in outputs) == 2, outputs
    after = _strips_in(python, blend, tmp_path)
    new = {name: value for name, value in after.items() if name not in before}
    assert len(new) == 3, (sorted(after), outputs)
    assert sorted(value[5] for value in new.values()) == ["img", "mov", "mov"]
    folders = [os.path.normpath(value[3]) for value in new.values()]
    assert len(set(folders)) == 3  # never one folder for two results
    old_folders = {os.path.normpath(value[3]) for value in before.values()}
    assert not set(folders) & old_folders
    for _channel, _start, length, folder, files, _ in new.values():
        assert length == 3 and files == [f"{i:06d}.png" for i in range(3)]
        assert all((Path(folder) / name).is_file() for name in files)
    for name, value in before.items():
        assert after[name] == value  # the strips that were there are as they were
    assert (tmp_path / "shot.blend1").is_file()
    assert not list(tmp_path.glob(".shot.blend.p2v-*.blend"))  # no temporary left behind


@pytest.mark.parametrize("version", ["5.0"])
def test_a_copied_blend_without_its_frames_never_reuses_a_strips_folder(version, blend_files, tiny_models, tmp_path):
    """The .blend is copied without its p2v/ folder: a new edit must not write into the folder an
    existing result strip points to (it would silently show the new frames)."""
    python = bh.bpy_python(version)
    if python is None:
        pytest.skip(f"bpy {version} is not installed")
    first, copy = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    copy.mkdir()
    shutil.copy(blend_files(version), first / "shot.blend")
    args = ["--strip", "mov", "--save", "--frames", "0:2", *_tiny_args(tiny_models)]
    done = _headless(python, ["--blend", str(first / "shot.blend"), "--prompt", "a red car", *args], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.copy(first / "shot.blend", copy / "shot.blend")  # without first/p2v
    done = _headless(python, ["--blend", str(copy / "shot.blend"), "--prompt", "a blue car", *args], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    strips = _strips_in(python, copy / "shot.blend", tmp_path)
    results = sorted(os.path.relpath(v[3], copy) for v in strips.values() if v[5] == "mov")
    assert results == [os.path.join("p2v", "mov_1"), os.path.join("p2v", "mov_2")]
    assert sorted(p.name for p in (copy / "p2v").iterdir()) == ["mov_2"]  # mov_1's frames stayed with the other copy
