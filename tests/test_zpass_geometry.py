"""A real Blender Z pass of known geometry, through the runtime's depth conversion.

An orthographic camera 10 units above a ground plane sees a cube whose top is 5 units away: the
inverse depths must be in the ratio 2 : 1, and the depth the model is given (``--save-depth``)
must show the cube brighter than the plane.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_edit_options
from PIL import Image

pytest.importorskip("OpenEXR")

RENDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import bpy

    out = Path(sys.argv[-1])
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 1
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    scene.view_layers[0].use_pass_z = True
    bpy.ops.mesh.primitive_plane_add(size=40, location=(0, 0, 0))
    bpy.ops.mesh.primitive_cube_add(size=2, location=(0, 0, 4))  # top face at z = 5
    camera_data = bpy.data.cameras.new("camera")
    camera_data.type = "ORTHO"
    camera_data.ortho_scale = 8
    camera = bpy.data.objects.new("camera", camera_data)
    camera.location = (0, 0, 10)  # looks down -Z by default
    scene.collection.objects.link(camera)
    scene.camera = camera
    bpy.ops.render.render()
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"
    out.mkdir(parents=True, exist_ok=True)
    bpy.data.images["Render Result"].save_render(str(out / "000000.exr"), scene=scene)
    if hasattr(settings, "media_type"):
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    settings.color_depth = "8"
    bpy.data.images["Render Result"].save_render(str(out / "rgb.png"), scene=scene)
    """
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    pytest.importorskip("bpy", reason="needs Blender as a Python module")
    out = tmp_path_factory.mktemp("zpass") / "depth"
    script = out.parent / "render.py"
    script.write_text(RENDER)
    result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_inverse_depth_ratio_matches_the_geometry(rendered):
    from p2v_runtime.depth import zpass_to_inverse_depth
    from p2v_runtime.frames import open_depth

    z = open_depth(rendered, 1, (64, 64)).read(0)
    assert z[32, 32] == pytest.approx(5.0, rel=0.01)  # cube top
    assert z[2, 2] == pytest.approx(10.0, rel=0.01)  # ground plane
    inverse = zpass_to_inverse_depth(z, (64, 64))
    assert inverse[32, 32] / inverse[2, 2] == pytest.approx(2.0, rel=0.03)


def test_saved_depth_of_a_zpass_edit_shows_the_cube_brighter(rendered, tiny_models, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.open(rendered / "rgb.png").convert("RGB").save(frames / "000000.png")
    depth = tmp_path / "z"
    depth.mkdir()
    (depth / "000000.exr").write_bytes((rendered / "000000.exr").read_bytes())
    used = tmp_path / "used"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "edit",
            str(frames),
            "--out",
            str(tmp_path / "out"),
            "--prompt",
            "a stone tower",
            "--source-prompt",
            "a box",
            "--depth",
            str(depth),
            "--save-depth",
            str(used),
            *tiny_edit_options(tiny_models, tmp_path / "cache"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    saved = np.asarray(Image.open(used / "000000.png"), dtype=np.float64)
    assert saved.shape == (8, 8)  # the latent grid the UNet is conditioned on
    assert saved[4, 4] > saved[0, 0] + 20000  # near = bright: the cube's top against the plane
