"""Depth 'Z pass' of scene strips, end to end, with real Blender (bpy 5.0.1 and 4.2 LTS) in background.

A scene of known geometry (an orthographic camera 10 units above a ground plane, a box whose top
is 5 units from the camera, moving along x) is shown by a scene strip of the test .blend. The
add-on renders it with the Z pass (tests/addon_scenarios.py, ``zpass_*`` scenarios) and sends RGB
and Z per frame through the real socket:

* to a recording server run here, in the test process: the runtime's own ``Server`` whose job
  runner keeps every frame and depth map it received and runs the real edit (tiny models) with
  the runtime's ``--save-depth`` (``depth_sink``), so the test sees exactly what the runtime
  got and what depth the UNet was given;
* to the add-on's own local runtime subprocess (real edit) and to its echo runner (the frames
  that come back are the frames that were sent).

Every scenario also compares every setting of the user's scenes (render, passes, view layers,
engine settings, compositor nodes, output, frame, objects) and the names of all data-blocks
before and after: the Z-pass render works on a temporary copy of the scene, also on error and
cancel.
"""

from __future__ import annotations

import itertools
import json
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

import blender_helpers as bh
import numpy as np
import pytest

REPO = bh.REPO
VERSIONS = ("5.0", "4.2")
SCENARIOS = (
    "zpass_setup",
    "zpass_frames",
    "zpass_problems",
    "zpass_record",
    "zpass_local",
    "zpass_echo",
    "zpass_cancel",
    "zpass_error_mid_render",
    "zpass_panel",
    "zpass_operator",
    "video_output",
    "bad_zpass_self",
    "bad_zpass_no_camera",
    "bad_zpass_all_background",
    "bad_zpass_nan",
    "bad_zpass_neginf",
    "bad_zpass_movie",
    "bad_zpass_sequencer_input",
    "zpass_placed",
    "zpass_save_blend",
)
W, H = 80, 48
PX_PER_UNIT = W / 8.0  # orthographic scale 8 across the width
CUBE_X = {2: -0.5, 3: 0.0, 4: 0.5}  # Geo frames the strip shows -> box centre x (linear -1..1 over 1..5)
PLANE_Z, CUBE_Z = 10.0, 5.0

pytestmark = pytest.mark.blender


# --- the recording runtime -----------------------------------------------------------------------


def _both(first, second):
    """A depth sink that hands each map to ``first`` and, when there is one, ``second`` (the client's)."""
    if second is None:
        return first

    def sink(index, depth01):
        first(index, depth01)
        second(index, depth01)

    return sink


class _Recording:
    """Frames or depth maps as the runtime's job runner reads them; each is kept as .npy."""

    def __init__(self, inner, folder: Path, kind: str):
        self.inner = inner
        self.folder = folder
        self.kind = kind
        self.size = inner.size
        self.description = inner.description

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, index: int):
        array = self.inner.read(index)
        path = self.folder / f"{self.kind}_{index}.npy"
        if not path.exists():
            np.save(path, np.asarray(array))
        return array


class Recorder:
    """``p2v serve``'s Server in a thread with a job runner that records, then edits for real."""

    def __init__(self, root: Path):
        from p2v_runtime.server import Server

        self.root = root
        self.token = secrets.token_hex(16)
        self._ids = itertools.count(1)
        self.server = Server("127.0.0.1", 0, token=self.token, job_runner=self.run, spool_dir=str(root / "spool"))
        (root / "spool").mkdir(parents=True)
        self.host, self.port = self.server.bind()
        self.thread = threading.Thread(target=self.server.serve_forever, name="zpass-recorder", daemon=True)
        self.thread.start()

    def run(self, frames, settings, *, depth=None, progress=None, cancel=None, stats=None, warn=None, depth_sink=None):
        from p2v_runtime.editor import edit_clip
        from p2v_runtime.frames import depth_png_writer

        folder = self.root / f"job{next(self._ids):02d}"
        folder.mkdir()
        (folder / "job.json").write_text(
            json.dumps(
                {"prompt": settings.prompt, "depth": depth is not None, "count": len(frames), "size": list(frames.size)}
            )
        )
        yield from edit_clip(
            _Recording(frames, folder, "rgb"),
            settings,
            depth=None if depth is None else _Recording(depth, folder, "z"),
            progress=progress,
            cancel=cancel,
            stats=stats,
            warn=warn,
            depth_sink=_both(depth_png_writer(folder / "saved-depth"), depth_sink),
        )

    def job(self, prompt: str) -> Path:
        found = [
            p.parent for p in sorted(self.root.glob("job*/job.json")) if json.loads(p.read_text())["prompt"] == prompt
        ]
        assert len(found) == 1, (prompt, found)
        return found[0]

    def config(self) -> dict:
        return {"host": self.host, "port": self.port, "token": self.token}

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    made = Recorder(tmp_path_factory.mktemp("recorder"))
    yield made
    made.stop()


# --- the scenarios, once per Blender version ---------------------------------------------------------


@pytest.fixture(scope="module")
def built_addon(tmp_path_factory) -> dict[str, Path]:
    return bh.build_addon(tmp_path_factory.mktemp("dist"))


def record_prompt(version: str) -> str:
    return f"a stone tower, bpy {version}"


@pytest.fixture(scope="module", params=VERSIONS)
def results(request, built_addon, tiny_models, recorder, tmp_path_factory) -> dict:
    version = request.param
    if bh.bpy_python(version) is None:
        pytest.skip(f"bpy {version} is not installed (scripts/test.sh makes it)")
    work = tmp_path_factory.mktemp(f"zpass-{version}")
    media_dir = bh.make_media(work / "media")
    config = dict(
        zip=str(built_addon["extension"]),
        media=str(media_dir),
        model=str(tiny_models["sd2-depth"]),
        captioner=str(tiny_models["blip"]),
        runtime_python=str(bh.RUNTIME_PYTHON),
        base_python=bh.base_python(),
        scenarios=list(SCENARIOS),
        recorder=recorder.config(),
        record_prompt=record_prompt(version),
    )
    found = bh.run_scenarios(version, config, work / "run")
    found["_version"] = version
    found["_work"] = str(work / "run")
    return found


def outcome(results: dict, name: str) -> dict:
    found = results[name]
    assert "exception" not in found, found["exception"]
    return found


def _frames(results, label: str, kind: str) -> list[np.ndarray]:
    found = outcome(results, "zpass_frames")
    folder = Path(found["folder"])
    return [np.load(folder / f"{label}_{kind}_{i}.npy") for i in range(found[label]["count"])]


def _cube_columns(z: np.ndarray) -> float:
    """Mean column of the pixels that see the box top (nearer than halfway to the plane)."""
    return float(np.nonzero(z < (PLANE_Z + CUBE_Z) / 2)[1].mean())


def _expected_column(scene_frame: int, flipped: bool = False) -> float:
    column = (W - 1) / 2 + CUBE_X[scene_frame] * PX_PER_UNIT
    return (W - 1) - column if flipped else column


# --- what the add-on renders ------------------------------------------------------------------


def test_zpass_of_known_geometry(results):
    outcome(results, "zpass_frames")  # the scenario ran without an exception
    for label in ("preview", "scene", "workbench", "eevee"):
        for scene_frame, z in zip((2, 3, 4), _frames(results, label, "z")):
            assert z.shape == (H, W) and z.dtype == np.float32
            near = z < (PLANE_Z + CUBE_Z) / 2
            assert 0.25 < near.mean() < 0.55, (label, near.mean())  # a 4x4 top in an 8x4.8 view
            assert np.allclose(z[near], CUBE_Z, rtol=0.01), (label, np.unique(z[near])[:5])
            assert np.allclose(z[~near], PLANE_Z, rtol=0.01), (label, np.unique(z[~near])[:5])
            assert abs(_cube_columns(z) - _expected_column(scene_frame)) < 1.0, (label, scene_frame)


def test_zpass_rgb_is_what_the_strip_shows(results):
    """The Z-pass render's RGB matches the Sequencer's own render of the strip (frame mapping, framing, colour)."""
    sequencer = _frames(results, "sequencer", "rgb")
    for label, tolerance in (("scene", 1.5), ("preview", 4.0)):
        for k, (ours, theirs) in enumerate(zip(_frames(results, label, "rgb"), sequencer)):
            assert ours.shape == theirs.shape == (H, W, 3)
            assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < tolerance, (label, k)
    red = _frames(results, "preview", "rgb")[1]
    assert red[H // 2, W // 2, 0] > red[H // 2, W // 2, 1] + 30  # the red box at the centre


def test_a_placed_scene_strip_gets_its_scenes_own_picture_and_depth(results):
    """Flipped, scaled, moved, rotated, cropped, blended: RGB and Z are the scene's own render, so
    they line up with each other whatever the placement (the result strip takes the placement)."""
    placed, plain = _frames(results, "placed", "z"), _frames(results, "preview", "z")
    assert len(placed) == len(plain) == 3
    for a, b in zip(placed, plain):
        assert np.array_equal(a, b)
    for a, b in zip(_frames(results, "placed", "rgb"), _frames(results, "preview", "rgb")):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_a_placed_scene_strips_result_takes_its_placement(results):
    found = outcome(results, "zpass_placed")
    assert found["state"] == "done", found["message"]
    look = found["new"]["look"]
    assert look["use_flip_x"] is True and look["transform.scale_y"] == pytest.approx(0.6)
    assert look["crop.min_x"] == 4 and look["blend_type"] == "ADD" and look["blend_alpha"] == pytest.approx(0.7)


def test_reversed_strip_gets_the_depth_of_the_frames_it_shows(results):
    """The Sequencer maps timeline frames to scene frames; the Z pass comes from that same render."""
    reverse, plain = _frames(results, "reverse", "z"), _frames(results, "preview", "z")
    assert len(reverse) == 3
    for k in range(3):
        assert np.array_equal(reverse[k], plain[2 - k]), k
    for z, rgb in zip(reverse, _frames(results, "reverse", "rgb")):  # depth and colour of the same frame
        red = (rgb[..., 0].astype(int) - rgb[..., 1]) > 30
        assert abs(float(np.nonzero(red)[1].mean()) - _cube_columns(z)) < 1.5


def test_retimed_strip_gets_the_depth_of_the_frames_it_shows(results):
    if "retimed" not in outcome(results, "zpass_frames"):
        pytest.skip(f"bpy {results['_version']} cannot retime scene strips")
    retimed, plain = _frames(results, "retimed", "z"), _frames(results, "preview", "z")
    assert len(retimed) == 10  # Geo 1..5 at half speed
    for k in range(3):  # Geo frames 2, 3, 4 at timeline 302, 304, 306
        assert np.allclose(retimed[2 * (k + 1)], plain[k]), k
    columns = [_cube_columns(z) for z in retimed[:9]]  # subframes between: half a frame's move each
    steps = np.diff(columns)
    assert np.all(np.abs(steps - PX_PER_UNIT * 0.25) < 1.01), columns


def test_zpass_render_leaves_the_scenes_as_they_were(results):
    assert outcome(results, "zpass_frames")["settings_changes"] == []
    for name in (
        "zpass_record",
        "zpass_local",
        "zpass_echo",
        "zpass_cancel",
        "zpass_error_mid_render",
        "zpass_operator",
    ):
        assert outcome(results, name)["settings_changes"] == [], name


def test_quick_preview_renders_fewer_samples_without_denoising(results):
    """What makes the quick preview cheaper, as Blender rendered it: for each render of the Z-pass
    copy, its engine and sample settings as the render started and the samples the engine reported."""
    found = outcome(results, "zpass_frames")
    assert found["geo_samples"] == {"cycles": 16, "eevee": 64}  # the user's scene (Blender's Eevee default)
    assert found["denoising_scene"] is True
    scene, preview, preview_denoising_scene, eevee = (
        found[label]["renders"] for label in ("scene", "preview", "preview_denoising_scene", "eevee")
    )
    assert len(scene) == len(preview) == len(preview_denoising_scene) == len(eevee) == 3, "one render a frame"
    for render in scene:  # as the scene is set
        assert (render["engine"], render["cycles_samples"], render["rendered_samples"]) == ("CYCLES", 16, [16, 16])
    # Cycles at 8 samples and without denoising, also where the user's scene denoises.
    for render in preview + preview_denoising_scene:
        assert (render["engine"], render["cycles_samples"], render["rendered_samples"]) == ("CYCLES", 8, [8, 8])
        assert render["cycles_denoising"] is False
    for render in eevee:  # Eevee at 4 samples
        assert render["engine"] != "CYCLES" and (render["eevee_samples"], render["rendered_samples"]) == (4, [4, 4])


def test_background_and_bad_values(results):
    found = outcome(results, "zpass_problems")
    assert found["clip_end"] == {"problem": None, "background": [1e10, 1e10], "surface": 5.0}  # Eevee's far clip
    assert found["inf"] == {"problem": None, "background": [1e10, 1e10], "surface": 5.0}
    assert "NaN" in found["nan"]["problem"]
    assert "-inf" in found["neginf"]["problem"] and "-inf" in found["zero"]["problem"]
    assert "all background" in found["all_background"]["problem"]


# --- what the runtime receives -----------------------------------------------------------------


def test_runtime_receives_the_zpass_and_edits_with_it(results, recorder):
    from p2v_runtime.depth import zpass_to_inverse_depth

    found = outcome(results, "zpass_record")
    assert found["state"] == "done", found["message"]
    assert found["frames_done"] == found["total"] == 3
    assert found["new"]["frame_final_duration"] == 3 and found["changes"] == []
    job = recorder.job(record_prompt(results["_version"]))
    meta = json.loads((job / "job.json").read_text())
    assert meta["depth"] is True and meta["count"] == 3 and meta["size"] == [W, H]
    sent_rgb = _frames(results, "preview", "rgb")
    for index, scene_frame in enumerate((2, 3, 4)):
        z = np.load(job / f"z_{index}.npy")
        assert z.shape == (H, W) and z.dtype == np.float32
        near = z < (PLANE_Z + CUBE_Z) / 2
        assert abs(_cube_columns(z) - _expected_column(scene_frame)) < 1.0
        assert float(np.median(z[near])) < float(np.median(z[~near]))  # the box is nearer
        inverse = zpass_to_inverse_depth(z, (H, W))
        row, column = H // 2, int(round(_expected_column(scene_frame)))
        ratio = inverse[row, column] / inverse[2, 2]
        assert ratio == pytest.approx(PLANE_Z / CUBE_Z, rel=0.03)
        rgb = np.load(job / f"rgb_{index}.npy")
        assert rgb.shape == (H, W, 3)
        assert np.abs(rgb.astype(int) - sent_rgb[index].astype(int)).mean() < 1.0  # the same render
        # --save-depth: the normalised depth the UNet was given, near = bright, on the latent grid.
        saved = _read_grey(job / "saved-depth" / f"{index:06d}.png")
        assert saved.shape == (8, 16)  # 80x48 at size 128 works at 128x64
        box = saved[3:5, int(column * 16 / W) - 1 : int(column * 16 / W) + 1].mean()
        assert box > saved[0, :].mean() + 20000 and box > saved[-1, :].mean() + 20000


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float64)


def test_local_runtime_edits_with_the_zpass(results):
    """The add-on's own runtime subprocess, real edit (tiny models), the scene rendered as it is set."""
    found = outcome(results, "zpass_local")
    assert found["state"] == "done", found["message"]
    assert found["depth_source"] == "file", "the runtime edited with the Z pass it was sent, not an estimate"
    assert found["frames_done"] == found["stats_frames"] == 3
    assert len(found["new"]["files_on_disk"]) == 3 and found["changes"] == []


def test_echo_returns_the_frames_the_zpass_render_sent(results):
    found = outcome(results, "zpass_echo")
    assert found["state"] == "done", found["message"]
    folder = Path(found["new"]["folder"])
    for index, sent in enumerate(_frames(results, "preview", "rgb")):
        back = bh.read_png(folder / f"{index:06d}.png")
        assert np.abs(back.astype(int) - sent.astype(int)).mean() < 1.0


def test_cancel_during_a_zpass_edit(results):
    found = outcome(results, "zpass_cancel")
    assert found["state"] == "cancelled" and 1 <= found["frames_done"] < found["total"]
    assert found["changes"] == [] and found["settings_changes"] == [] and found["running_job"] is False


def test_render_failure_mid_edit_is_reported_and_restores(results):
    found = outcome(results, "zpass_error_mid_render")
    assert found["started"] and found["state"] == "failed"
    assert "NaN" in found["message"] and "frame 302 of strip 'geo'" in found["message"]
    assert "\n" not in found["message"]
    assert found["changes"] == [] and found["settings_changes"] == [] and found["running_job"] is False


BAD = {
    "bad_zpass_self": "the Sequencer's own scene",
    "bad_zpass_no_camera": "has no camera",
    "bad_zpass_all_background": "all background",
    "bad_zpass_nan": "NaN",
    "bad_zpass_neginf": "-inf",
    "bad_zpass_movie": "needs a scene strip",
    "bad_zpass_sequencer_input": "set the strip's Input to Camera",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_zpass_input_is_reported_and_changes_nothing(results, name):
    found = outcome(results, name)
    message = found["error"]["message"] if "error" in found else found["message"]
    assert BAD[name] in message, message
    if "error" in found:  # refused before anything started
        assert found["error"]["type"] == "P2VAddonError"
    else:  # found while rendering: the job ends before any frame is edited
        assert found["state"] == "failed" and found["frames_done"] == 0 and "nothing was changed" in message
    assert "\n" not in message
    assert found["changes"] == [] and found["settings_changes"] == [] and found["running_job"] is False


def test_panel_shows_the_render_setting_with_zpass(results):
    found = outcome(results, "zpass_panel")
    zpass = [e["property"] for e in found["zpass"] if e["call"] == "prop"]
    estimate = [e["property"] for e in found["estimate"] if e["call"] == "prop"]
    assert zpass[-2:] == ["depth", "zpass_render"] and "zpass_render" not in estimate
    assert all(e["exists"] for e in found["zpass"] if e["call"] == "prop")
    assert found["items"] == ["preview", "scene"] and found["default"] == "preview"
    assert "needs a scene strip" in found["image_reason"]  # the button says why, before a click
    assert found["image_reason_estimate"] is None


def test_operator_runs_a_zpass_edit(results):
    found = outcome(results, "zpass_operator")
    assert found["result"] == ["FINISHED"] and found["length"] == 3
    # With the scene's settings: Z pass, rendered as the scene is set (16 samples, not the preview's 8).
    assert found["depth_source"] == ["file"]
    assert found["rendered_samples"] == [[16, 16]] * 3
    assert found["settings_changes"] == []


def test_sequencer_scene_set_to_render_a_video(results):
    """The frames of a strip (and its Z pass) also come when the user's scene renders a movie."""
    found = outcome(results, "video_output")
    assert found["format"] == found["format_after"] == "FFMPEG"
    assert found["img"] == [W * H * 3, None] and found["geo"] == [W * H * 3, W * H * 4]


# --- the headless script ---------------------------------------------------------------------------


def test_headless_zpass_edit_through_a_server(results, recorder, tiny_models, tmp_path):
    version = results["_version"]  # the .blend that version saved (4.2 cannot read a file 5.0 saved)
    python = bh.bpy_python(version)
    blend = tmp_path / "zpass.blend"
    shutil.copy(outcome(results, "zpass_save_blend")["blend"], blend)
    token_file = tmp_path / "token"
    token_file.write_text(recorder.token)
    prompt = f"a marble tower, headless {version}"
    env = bh.bpy_env(tmp_path / "blender-user")
    done = subprocess.run(
        [
            str(python),
            str(REPO / "scripts" / "p2v_blender.py"),
            "--blend",
            str(blend),
            "--scene",
            "Edit",
            "--strip",
            "geo",
            "--prompt",
            prompt,
            "--depth",
            "zpass",
            "--zpass-render",
            "preview",
            "--server",
            f"{recorder.host}:{recorder.port}",
            "--token-file",
            str(token_file),
            "--model",
            str(tiny_models["sd2-depth"]),
            "--device",
            "cpu",
            "--steps",
            "2",
            "--size",
            "128",
            "--source-prompt",
            "a box on the ground",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--save-depth",
            str(tmp_path / "depth-used"),
            "--stats",
            str(tmp_path / "stats.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("p2v_blender: ")]
    assert "depth: Z pass (preview)" in lines[0] and "Edited 3 frame(s)" in lines[-1]
    assert not [line for line in done.stdout.splitlines() if line.startswith(("Saved:", "Fra:"))]  # no render noise
    percents = [float(line.split()[1].rstrip("%")) for line in lines if line.split()[1].endswith("%")]
    assert percents and percents == sorted(percents)  # one progress figure that never goes back
    job = recorder.job(prompt)
    for index, scene_frame in enumerate((2, 3, 4)):
        z = np.load(job / f"z_{index}.npy")
        assert abs(_cube_columns(z) - _expected_column(scene_frame)) < 1.0
    assert sorted(p.name for p in (job / "saved-depth").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    # --save-depth: the add-on wrote (stdlib PNG) exactly the depth the runtime used and saved itself
    for index in range(3):
        name = f"{index:06d}.png"
        ours, runtime = _png16(tmp_path / "depth-used" / name), _png16(job / "saved-depth" / name)
        assert (
            ours.ndim == 2 and ours.shape == runtime.shape and np.array_equal(ours, runtime) and ours.max() > ours.min()
        )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames"] == 3 and stats["depth_source"] == "file"
    refused = subprocess.run(
        [
            str(python),
            str(REPO / "scripts" / "p2v_blender.py"),
            "--blend",
            str(blend),
            "--scene",
            "Edit",
            "--strip",
            "img",
            "--prompt",
            "x",
            "--depth",
            "zpass",
            "--server",
            f"{recorder.host}:{recorder.port}",
            "--token-file",
            str(token_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    errors = [line for line in refused.stderr.splitlines() if line.startswith("p2v_blender: error:")]
    assert refused.returncode == 1 and len(errors) == 1 and "needs a scene strip" in errors[0]


def _png16(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image).astype(np.int64)
