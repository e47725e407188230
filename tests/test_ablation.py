"""`p2v ablate` end to end on a tiny synthetic clip, and its argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import synthetic_frames, tiny_edit_options, write_png_clip
from PIL import Image

from p2v_runtime import ablation
from p2v_runtime.cli import main
from p2v_runtime.errors import InputError


def ablate_args(tiny_models, tmp_path, clip, out, *extra):
    return [
        "ablate", str(clip), "--out", str(out), "--prompt", "a red sports car",
        "--clip-model", str(tiny_models["clip"]),
        *tiny_edit_options(tiny_models, tmp_path / "inversion-cache"),
        *extra,
    ]  # fmt: skip


def test_p2v_ablate_end_to_end(tiny_models, tmp_path, capsys):
    clip = write_png_clip(tmp_path / "clip", synthetic_frames(3))
    out = tmp_path / "ablation"
    assert main(ablate_args(tiny_models, tmp_path, clip, out)) == 0
    printed = capsys.readouterr().out
    for name in ablation.VARIANT_NAMES:
        assert name in printed

    for name in ablation.OUTPUT_FILES:
        assert (out / name).is_file(), name
    report = json.loads((out / "ablation.json").read_text())
    assert [v["name"] for v in report["variants"]] == list(ablation.VARIANT_NAMES)
    assert report["frames"] == 3 and report["size"] == [64, 64]
    for variant in report["variants"]:
        assert sorted((out / variant["folder"]).glob("*.png")) == [
            out / variant["folder"] / f"{i:06d}.png" for i in range(3)
        ]
        assert set(variant["metrics"]) == {"clip_text", "clip_image", "pixel_mse"}
        assert all(isinstance(value, float) for value in variant["metrics"].values())
        assert len(variant["per_frame"]["pixel_mse"]) == 2
    hits = [v["stats"]["inversion_cache_hits"] for v in report["variants"]]
    assert hits == [0] + [3] * (len(ablation.VARIANTS) - 1), "only the first variant inverts"
    # The BLIP caption of the first variant is every variant's source prompt.
    assert len({v["stats"]["source_prompt"] for v in report["variants"]}) == 1

    assert all(v["stats"]["unet_calls_inversion"] == 0 for v in report["variants"][1:])
    frames = {name: np.asarray(Image.open(out / name / "000002.png")) for name in ("per-frame", "pix2video")}
    assert not np.array_equal(frames["per-frame"], frames["pix2video"]), "variants must differ"

    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == 1 + len(ablation.VARIANTS)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height > (1 + len(ablation.VARIANTS)) * 64 and sheet.width > 3 * 64
    assert Image.open(out / "pixel_mse.png").size[0] > 100

    # A second run into the same folder is refused unless --overwrite.
    assert main(ablate_args(tiny_models, tmp_path, clip, out)) == 1
    assert "already holds an ablation" in capsys.readouterr().err


def test_p2v_ablate_refuses_per_variant_options_and_unknown_variants(tiny_models, tmp_path, capsys):
    clip = write_png_clip(tmp_path / "clip", synthetic_frames(2))
    assert main(ablate_args(tiny_models, tmp_path, clip, tmp_path / "a", "--update", "off")) == 1
    assert "sets --update per variant" in capsys.readouterr().err
    assert main(ablate_args(tiny_models, tmp_path, clip, tmp_path / "b", "--variants", "pix2video,nope")) == 1
    assert "unknown nope" in capsys.readouterr().err
    assert main(ablate_args(tiny_models, tmp_path, clip, clip / "inside")) == 1
    assert "inside the input folder" in capsys.readouterr().err


def test_variants_named_keeps_the_ladder_order():
    assert [v.name for v in ablation.variants_named("pix2video,per-frame")] == ["per-frame", "pix2video"]
    assert len(ablation.variants_named(None)) == len(ablation.VARIANTS) == 7
    with pytest.raises(InputError):
        ablation.variants_named(",")


@pytest.mark.parametrize(
    "count, columns, expected",
    [(1, 6, [0]), (3, 6, [0, 1, 2]), (10, 4, [0, 3, 6, 9]), (120, 2, [0, 119])],
)
def test_sampled_columns_spread_over_the_clip(count, columns, expected):
    assert ablation.sampled_columns(count, columns) == expected
