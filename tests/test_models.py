"""The warm model cache: one entry per model however it is spelled, one model of a kind held, and
a release that really frees (tiny random-weight models)."""

from __future__ import annotations

import os
import shutil
import weakref

import pytest

from p2v_runtime import models

LOADERS = {
    "sd2-depth": lambda name: models.load_depth_pipeline(name, "cpu", "auto"),
    "blip": lambda name: models.load_captioner(name, "cpu"),
    "clip": lambda name: models.load_clip(name, "cpu"),
}


def spellings(folder, tmp_path, monkeypatch) -> list[str]:
    """Six names of one folder: plain, trailing separator, doubled separator, '.', relative, symlink."""
    text = str(folder)
    parent, name = os.path.split(text)
    names = [text, text + os.sep, parent + os.sep + os.sep + name, os.path.join(parent, ".", name), name]
    monkeypatch.chdir(parent)
    link = tmp_path / f"link-to-{name}"
    try:
        link.symlink_to(folder, target_is_directory=True)
    except OSError:  # Windows without the symlink privilege
        return names
    return names + [str(link)]


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_one_folder_spelled_six_ways_is_loaded_once(tiny_models, tmp_path, monkeypatch, kind):
    models.release_all()
    results = [LOADERS[kind](name) for name in spellings(tiny_models[kind], tmp_path, monkeypatch)]
    assert [loaded for _, loaded in results] == [True] + [False] * (len(results) - 1)
    assert all(model is results[0][0] for model, _ in results)


def test_a_hub_id_is_its_own_key():
    assert models.model_location("stabilityai/stable-diffusion-2-depth") == "stabilityai/stable-diffusion-2-depth"


def test_loading_another_model_frees_the_previous_one_first(tiny_models, tmp_path):
    other = tmp_path / "sd2-depth-copy"
    shutil.copytree(tiny_models["sd2-depth"], other)
    captioner, _ = models.load_captioner(str(tiny_models["blip"]), "cpu")
    first, _ = models.load_depth_pipeline(str(tiny_models["sd2-depth"]), "cpu", "auto")
    gone = [weakref.ref(first), weakref.ref(first.pipe), weakref.ref(first.unet)]
    del first
    second, loaded = models.load_depth_pipeline(str(other), "cpu", "auto")
    assert loaded
    assert [ref() for ref in gone] == [None, None, None], "the first pipeline is still alive"
    assert models.load_depth_pipeline(str(other), "cpu", "auto") == (second, False)
    # One model of each kind: the captioner stayed.
    assert models.load_captioner(str(tiny_models["blip"]), "cpu") == (captioner, False)


def test_release_all_leaves_no_model_alive(tiny_models):
    depth, _ = models.load_depth_pipeline(str(tiny_models["sd2-depth"]), "cpu", "auto")
    captioner, _ = models.load_captioner(str(tiny_models["blip"]), "cpu")
    clip, _ = models.load_clip(str(tiny_models["clip"]), "cpu")
    alive = [weakref.ref(obj) for obj in (depth, depth.pipe, depth.unet, captioner, captioner.model, clip, clip.model)]
    del depth, captioner, clip
    models.release_all()
    assert [ref() for ref in alive] == [None] * len(alive)
    _, loaded = models.load_captioner(str(tiny_models["blip"]), "cpu")
    assert loaded


def test_precision_auto_is_fp16_on_cuda_only_and_fp16_on_the_cpu_runs_in_fp32_with_a_warning():
    import torch

    assert models.choose_dtype("auto", "cuda") == (torch.float16, None)
    assert models.choose_dtype("auto", "cpu") == (torch.float32, None)
    assert models.choose_dtype("auto", "mps") == (torch.float32, None)
    assert models.choose_dtype("fp16", "cuda") == (torch.float16, None)
    dtype, warning = models.choose_dtype("fp16", "cpu")
    assert dtype == torch.float32 and "running in fp32" in warning
