"""The real checkpoints' layouts (p2v_runtime/replica_models.py): the published configuration files with
small random weights, loaded as folders and as hub ids from a Hugging Face cache with the hub
offline, in fp32 and through the fp16 variant files, and edited end to end after `p2v models fetch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, populate_hf_cache, write_png_clip
from fake_hub import FakeHub, closed_port

from p2v_runtime import hub, models
from p2v_runtime.replica_models import REFERENCE, SHRINK, reference_config

torch = pytest.importorskip("torch")

SD2 = "stabilityai/stable-diffusion-2-depth"
BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache named by HF_HUB_CACHE, the hub offline and unreachable anyway."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    models.release_all()
    yield cache
    models.release_all()


def differences(published, written, path=""):
    """Keys whose values differ between two configs, as dotted paths."""
    if isinstance(published, dict) and isinstance(written, dict):
        keys = set(published) | set(written)
        return [d for k in sorted(keys) for d in differences(published.get(k), written.get(k), f"{path}{k}.")]
    return [] if published == written else [path.rstrip(".")]


def shrunk_keys(change, path=""):
    return [
        k
        for key, value in change.items()
        for k in (shrunk_keys(value, f"{path}{key}.") if isinstance(value, dict) else [f"{path}{key}"])
    ]


def test_configs_are_the_published_files_but_for_the_shrunk_sizes(replica_models):
    folder = replica_models["sd2-depth"]
    for path in sorted((REFERENCE / "sd2-depth").rglob("*.json")):
        name = path.relative_to(REFERENCE / "sd2-depth").as_posix()
        written = json.loads((folder / name).read_text())
        assert sorted(differences(json.loads(path.read_text()), written)) == sorted(
            shrunk_keys(SHRINK["sd2-depth"].get(name, {}))
        ), name
    blip = json.loads((replica_models["blip-base"] / "config.json").read_text())
    assert sorted(differences(reference_config("blip-base/config.json"), blip)) == sorted(
        shrunk_keys(SHRINK["blip"]["config.json"])
    )
    for name in ("preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (replica_models["blip-base"] / name).read_bytes() == (REFERENCE / "blip-base" / name).read_bytes()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["feature_extractor"] == ["transformers", "DPTImageProcessor"]


def test_weight_files_are_the_real_repositories(replica_models):
    sd2 = {
        p.relative_to(replica_models["sd2-depth"]).as_posix()
        for p in replica_models["sd2-depth"].rglob("*.safetensors")
    }
    for component, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("depth_estimator", "model"),
    ):
        assert {f"{component}/{stem}.safetensors", f"{component}/{stem}.fp16.safetensors"} <= sd2
    assert sorted(p.name for p in replica_models["blip-base"].iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "pytorch_model.bin"
    ]
    assert sorted(p.name for p in replica_models["blip-large"].iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "model.safetensors"
    ]


def test_tokenizers_have_the_real_sizes_and_special_ids(replica_models):
    from transformers import AutoTokenizer, CLIPTokenizer

    clip = CLIPTokenizer.from_pretrained(replica_models["sd2-depth"], subfolder="tokenizer")
    assert len(clip) == reference_config("sd2-depth/text_encoder/config.json")["vocab_size"] == 49408
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token, clip.pad_token_id) == (49406, 49407, "!", 0)
    assert clip.model_max_length == 77
    ids = clip("A Fox, jumping — très jolie!").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids) < 49408
    bert = AutoTokenizer.from_pretrained(replica_models["blip-base"])
    assert len(bert) == 30522 and (bert.pad_token_id, bert.cls_token_id, bert.sep_token_id) == (0, 101, 102)
    text = reference_config("blip-base/config.json")["text_config"]
    assert (text["pad_token_id"], text["sep_token_id"], text["bos_token_id"], text["vocab_size"]) == (
        0,
        102,
        30522,
        30524,
    )


def test_loads_as_a_folder_in_fp32_with_the_dpt_hybrid_depth_estimator(replica_models, offline_cache):
    from diffusers import DDIMScheduler

    pipeline, _ = models.load_depth_pipeline(str(replica_models["sd2-depth"]), "cpu", "fp32")
    pipe = pipeline.pipe
    assert pipeline.dtype == torch.float32 and pipe.unet.dtype == torch.float32
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the edit's own, from the PNDM config
    config = pipe.depth_estimator.config
    assert config.is_hybrid and config.backbone_config.model_type == "bit" and config.image_size == 384
    assert list(config.backbone_out_indices) == [2, 5, 8, 11]
    assert type(pipe.feature_extractor).__name__.startswith("DPTImageProcessor")
    assert pipe.unet.config.in_channels == 5 and list(pipe.unet.config.attention_head_dim) == [5, 10, 20, 20]


def test_fp16_loads_the_variant_files(replica_models):
    status = hub.local_status(replica_models["sd2-depth"], "fp16")
    assert status.variant() == "fp16" and status.precisions() == "fp16"
    pipe = models._from_pretrained_depth("replica", replica_models["sd2-depth"], status, torch.float16)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.depth_estimator)} == {torch.float16}
    from safetensors.torch import load_file

    variant = load_file(replica_models["sd2-depth"] / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(pipe.unet.conv_in.weight, variant["conv_in.weight"])


def test_loads_as_a_hub_id_from_the_cache_offline_in_fp32(replica_models, offline_cache):
    populate_hf_cache(offline_cache, SD2, replica_models["sd2-depth"])
    pipeline, loaded = models.load_depth_pipeline(SD2, "cpu", "fp32")
    assert loaded and pipeline.unet.dtype == torch.float32
    assert models.load_depth_pipeline(SD2, "cpu", "fp32") == (pipeline, False)


def test_a_cache_with_only_the_fp16_files_loads(replica_models, offline_cache):
    """The failure the issue reports: fp16 files alone gave `no file named diffusion_pytorch_model.bin`."""
    populate_hf_cache(
        offline_cache, SD2, replica_models["sd2-depth"], keep=lambda n: ".fp16." in n or not hub._is_weight(n)
    )
    status = hub.local_status(hub.cached_snapshot(SD2), "fp16")
    assert status.complete and status.variant() == "fp16"
    pipe = models._from_pretrained_depth(SD2, hub.cached_snapshot(SD2), status, torch.float16)
    assert pipe.unet.dtype == torch.float16
    # fp16 asked for on the CPU runs in fp32, with a warning, from the same fp16 files.
    warnings = []
    pipeline, _ = models.load_depth_pipeline(SD2, "cpu", "fp16", warn=warnings.append)
    assert pipeline.dtype == torch.float32 and pipeline.unet.dtype == torch.float32
    assert warnings == ["fp16 on the CPU would take minutes a frame; running in fp32 (use --dtype fp32 or auto)"]


@pytest.mark.parametrize("kind, repo", [("blip-base", BLIP_BASE), ("blip-large", BLIP_LARGE)])
def test_blip_loads_as_a_hub_id_and_captions(replica_models, offline_cache, kind, repo):
    from p2v_runtime.caption import caption_frame

    populate_hf_cache(offline_cache, repo, replica_models[kind])
    captioner, _ = models.load_captioner(repo, "cpu")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    caption = caption_frame(captioner, frame, max_new_tokens=8)
    assert caption and "[SEP]" not in caption and "[PAD]" not in caption


def test_bin_only_weights_are_refused_on_old_torch_with_a_reason(replica_models, offline_cache, monkeypatch):
    populate_hf_cache(offline_cache, BLIP_BASE, replica_models["blip-base"])
    monkeypatch.setattr(models, "_torch_version", lambda: (2, 5))
    with pytest.raises(models.ModelLoadError, match=r"pickled \.bin files .* torch 2\.6 or later"):
        models.load_captioner(BLIP_BASE, "cpu")


def test_published_sizes_are_sd2_depth_with_dpt_hybrid():
    """The --full-size benchmark model is built from these configs: check them on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    def args(name):
        return {k: v for k, v in reference_config(name).items() if not k.startswith("_")}

    with torch.device("meta"):
        unet = UNet2DConditionModel(**args("sd2-depth/unet/config.json"))
        dpt = DPTForDepthEstimation(DPTConfig(**args("sd2-depth/depth_estimator/config.json")))
        text = CLIPTextModel(CLIPTextConfig(**args("sd2-depth/text_encoder/config.json")))
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, dpt, text)]
    assert 865e6 < count[0] < 867e6  # SD 2's UNet with the depth channel
    assert 122e6 < count[1] < 123e6 and dpt.config.is_hybrid  # DPT-Hybrid (BiT + ViT-B)
    assert 340e6 < count[2] < 341e6  # OpenCLIP ViT-H's text tower, 23 layers
    # fp16: 2 bytes a parameter (the VAE, 84 M, is not built here): the published 2.82 GB.
    assert 2.64e9 < 2 * sum(count) < 2.67e9


def test_fetch_then_check_then_edit_by_hub_id_offline(replica_models, tmp_path):
    """The first run as a user meets it: fetch from the (fake) hub, check, then edit with the hub offline."""
    cache = tmp_path / "hf-cache"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    decoys = {
        "512-depth-ema.ckpt": b"c" * 100_000,
        "README.md": b"# readme\n",
        "unet/diffusion_pytorch_model.bin": b"b" * 5000,
    }
    with FakeHub() as fake:
        fake.add_repo(SD2, replica_models["sd2-depth"], extra=decoys)
        fake.add_repo(BLIP_LARGE, replica_models["blip-large"], extra={"tf_model.h5": b"t" * 5000})
        env["HF_ENDPOINT"] = fake.url
        fetch = subprocess.run(
            [sys.executable, "-m", "p2v_runtime.cli", "models", "fetch", "--dtype", "fp16", "--captioner", BLIP_LARGE],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert fetch.returncode == 0, fetch.stderr
        fetched = set(fake.downloads())
    assert not fetched & {"512-depth-ema.ckpt", "README.md", "unet/diffusion_pytorch_model.bin", "tf_model.h5"}
    assert "unet/diffusion_pytorch_model.safetensors" not in fetched  # fp16 only
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "models",
            "check",
            "--device",
            "cuda",
            "--dtype",
            "fp16",
            "--captioner",
            BLIP_LARGE,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert (
        f"model {SD2} (fp16): ok" in check.stdout
        and "unet: ok (UNet2DConditionModel, 26.8 MB in diffusion_pytorch_model.fp16.safetensors)" in check.stdout
    )
    assert f"captioner {BLIP_LARGE} (fp32): ok" in check.stdout

    clip = write_png_clip(tmp_path / "clip", [np.full((64, 64, 3), v, np.uint8) for v in (40, 200)])
    stats = tmp_path / "stats.json"
    edit = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "edit",
            str(clip),
            "--prompt",
            "a red car",
            "--out",
            str(tmp_path / "out"),
            "--captioner",
            BLIP_LARGE,
            "--dtype",
            "fp16",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--size",
            "64",
            "--stats",
            str(stats),
            "--cache-dir",
            str(tmp_path / "inversions"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert edit.returncode == 0, edit.stderr
    assert "p2v: warning: fp16 on the CPU would take minutes a frame; running in fp32" in edit.stderr
    figures = json.loads(stats.read_text())
    assert figures["frames"] == 2 and figures["dtype"] == "fp32" and figures["source_prompt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png"]


def test_check_reports_a_broken_part(replica_models, tmp_path):
    cache = tmp_path / "hf-cache"
    snapshot = populate_hf_cache(cache, SD2, replica_models["sd2-depth"])
    unet = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.unlink()
    unet.write_bytes(data[: len(data) // 2])  # a truncated file
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "models",
            "check",
            "--device",
            "cpu",
            "--json",
            "--captioner",
            str(replica_models["blip-base"]),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 1
    report = json.loads(check.stdout)
    parts = {p["name"]: p for p in report["models"][0]["parts"]}
    assert not parts["unet"]["ok"] and parts["unet"]["state"].startswith("cannot load: ")
    assert all(p["ok"] for name, p in parts.items() if name != "unet")
    assert report["models"][1]["ok"]


def test_an_edit_downloads_a_missing_model_with_a_warning_and_progress(replica_models, tmp_path):
    cache = tmp_path / "hf-cache"
    populate_hf_cache(cache, SD2, replica_models["sd2-depth"])  # the captioner is missing
    clip = write_png_clip(tmp_path / "clip", [np.full((64, 64, 3), 90, np.uint8)])
    env = dict(os.environ, HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    with FakeHub() as fake:
        fake.add_repo(BLIP_LARGE, replica_models["blip-large"])
        env["HF_ENDPOINT"] = fake.url
        edit = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2v_runtime.cli",
                "edit",
                str(clip),
                "--prompt",
                "a red car",
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--steps",
                "1",
                "--size",
                "64",
                "--cache-dir",
                str(tmp_path / "inversions"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert fake.downloads(SD2) == []  # found in the cache: not even asked for
    assert edit.returncode == 0, edit.stderr
    lines = edit.stderr.splitlines()
    warning = next(line for line in lines if "downloading" in line)
    assert warning.startswith(
        f"p2v: warning: downloading captioner `{BLIP_LARGE}` (fp32): 10.9 MB of 10.9 MB into {cache}"
    )
    assert lines.index(warning) < lines.index(
        next(line for line in lines if line.startswith("p2v: download 10.9 MB of 10.9 MB (100%)"))
    )
    assert hub.local_status(hub.cached_snapshot(BLIP_LARGE, cache), "fp32").complete
