"""Where models come from (p2v_runtime/hub.py) and `p2v models fetch | list`: names, the files one
precision needs, the Hugging Face cache, and fetching through huggingface_hub from a local fake hub.

No torch here: the command's model step must work (and fail clearly) before torch is imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, populate_hf_cache
from fake_hub import FakeHub, closed_port

from p2v_runtime import hub
from p2v_runtime.cli import main
from p2v_runtime.errors import EditCancelled, ModelLoadError

SD2 = "stabilityai/stable-diffusion-2-depth"
BLIP = "Salesforce/blip-image-captioning-large"
UNREACHABLE = (
    "`stabilityai/stable-diffusion-2-depth` is not in the Hugging Face cache and the hub is unreachable: "
    "run `p2v models fetch` where there is network, or pass --model a folder"
)
MODEL_INDEX = {
    "_class_name": "StableDiffusionDepth2ImgPipeline",
    "depth_estimator": ["transformers", "DPTForDepthEstimation"],
    "feature_extractor": ["transformers", "DPTImageProcessor"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# The real repository's listing (names; sizes made small): every weight in four forms, plus a
# whole-model checkpoint and a README the edit never reads.
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": None}


def sd2_files(scale: int = 1000, fp16: bool = True) -> dict[str, bytes]:
    files = {
        "model_index.json": json.dumps(MODEL_INDEX).encode(),
        "README.md": b"# sd2 depth\n",
        "512-depth-ema.ckpt": b"c" * 50 * scale,
    }
    for name in (
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ):
        files[name] = json.dumps({"file": name}).encode()  # distinct: one blob each
    sizes = {"unet": 40, "vae": 8, "text_encoder": 12, "depth_estimator": 10}
    for component, size in sizes.items():
        stem = "diffusion_pytorch_model" if component in ("unet", "vae") else None
        files[f"{component}/config.json"] = json.dumps({"component": component}).encode()
        names = [(f"{stem}.safetensors", 2), (f"{stem}.bin", 2)] if stem else [("model.safetensors", 2)]
        if not stem:
            names.append(("pytorch_model.bin", 2))
        if fp16:
            names += [
                (n.replace(".safetensors", ".fp16.safetensors").replace(".bin", ".fp16.bin"), 1) for n, _ in names
            ]
        for name, factor in names:
            files[f"{component}/{name}"] = bytes([len(name) % 251]) * (size * scale * factor)
    return files


def fp16_names(files) -> set[str]:
    return {n for n in files if ".fp16.safetensors" in n}


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a fake hub, both named by the environment as a user would."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        fake.cache = cache
        yield fake


def run_p2v(args, env_update, timeout=120, **kwargs):
    env = dict(os.environ, **env_update)
    env.pop("HF_HUB_OFFLINE", None) if "HF_HUB_OFFLINE" not in env_update else None
    return subprocess.run(
        [sys.executable, "-m", "p2v_runtime.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def json_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# -- names ---------------------------------------------------------------------------------------


def test_a_folder_that_does_not_exist_is_named_as_a_folder(tmp_path):
    for name in (str(tmp_path / "x" / "y"), "./no-such/model", "~/no-such-model-dir", "a/b/c", "has space"):
        with pytest.raises(ModelLoadError, match=r"model folder .* does not exist"):
            hub.parse_name(name)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        hub.parse_name(str(tmp_path / "file"))


def test_hub_ids_and_folders_are_told_apart(tmp_path, monkeypatch):
    assert hub.parse_name(SD2).repo_id == SD2
    assert hub.parse_name("bert-base-uncased").repo_id == "bert-base-uncased"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse_name("org/name").folder == (tmp_path / "org" / "name").resolve()  # a folder wins


# -- which files ---------------------------------------------------------------------------------


def test_fp16_takes_the_fp16_variant_files_and_nothing_else():
    files = sd2_files()
    chosen = hub.needed_files(files, "fp16", MODEL_INDEX)
    weights = [n for n in chosen if hub._is_weight(n)]
    assert set(weights) == fp16_names(files)
    assert "512-depth-ema.ckpt" not in chosen and "README.md" not in chosen
    assert {"tokenizer/vocab.json", "scheduler/scheduler_config.json", "unet/config.json"} <= set(chosen)


def test_fp32_takes_the_full_precision_safetensors():
    chosen = hub.needed_files(sd2_files(), "fp32", MODEL_INDEX)
    weights = sorted(n for n in chosen if hub._is_weight(n))
    assert weights == [
        "depth_estimator/model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_a_component_without_a_variant_falls_back_to_its_plain_files():
    files = {n: b"" for n in sd2_files() if not n.startswith("vae/") or ".fp16." not in n}
    weights = {n for n in hub.needed_files(files, "fp16", MODEL_INDEX) if hub._is_weight(n)}
    assert "vae/diffusion_pytorch_model.safetensors" in weights
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in weights and len(weights) == 4


def test_transformers_repos_prefer_safetensors_and_take_bin_only_when_alone():
    large = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "vocab.txt", "README.md"]
    assert hub.needed_files(large, "fp32") == ["config.json", "vocab.txt", "model.safetensors"]
    base = ["config.json", "pytorch_model.bin", "tf_model.h5", "tokenizer.json", "preprocessor_config.json"]
    assert hub.needed_files(base, "fp32") == [
        "config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "pytorch_model.bin",
    ]


def test_sharded_weights_are_taken_with_their_index():
    names = [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
        "model-00001-of-00002.fp16.safetensors",
        "model-00002-of-00002.fp16.safetensors",
    ]
    assert hub.choose_weights(names, "fp32") == names[:3]
    assert hub.choose_weights(names, "fp16") == names[3:]


def test_a_cached_folder_with_only_fp16_files_loads_in_either_precision(tmp_path):
    files = {n: d for n, d in sd2_files(scale=1).items() if ".fp16.safetensors" in n or not hub._is_weight(n)}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for dtype in ("fp16", "fp32"):
        status = hub.local_status(tmp_path, dtype)
        assert status.complete and status.variant() == "fp16" and status.precisions() == "fp16"
    (tmp_path / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    assert hub.local_status(tmp_path, "fp16").missing == ["unet/weights"]


# -- fetch -----------------------------------------------------------------------------------------


def test_fetch_announces_sizes_then_reports_progress_then_loads_offline(hub_env, capsys):
    files = sd2_files()
    hub_env.add_repo(SD2, files)
    assert main(["models", "fetch", "--dtype", "fp16", "--skip-captioner", "--json-progress"]) == 0
    events = json_events(capsys.readouterr().out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[1] == "total" and kinds[-1] == "done"
    plan = events[0]
    expected = {n: len(d) for n, d in files.items() if n in hub.needed_files(files, "fp16", MODEL_INDEX)}
    assert plan["file_sizes"] == expected and plan["bytes"] == sum(expected.values())
    assert plan["download_bytes"] == plan["bytes"] - expected["model_index.json"]  # the index came with the plan
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == plan["bytes"]
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    # Only what fp16 needs crossed the wire: no fp32 weights, no .bin, no .ckpt.
    assert set(hub_env.downloads()) == set(expected)
    snapshot = hub.cached_snapshot(SD2, hub_env.cache)
    assert hub.local_status(snapshot, "fp16").complete
    # A second fetch finds everything cached and downloads nothing.
    before = len(hub_env.downloads())
    assert main(["models", "fetch", "--dtype", "fp16", "--skip-captioner", "--json-progress"]) == 0
    assert json_events(capsys.readouterr().out)[0]["download_bytes"] == 0
    assert len(hub_env.downloads()) == before


def test_plain_progress_lines_say_bytes_of_total(hub_env, capsys):
    hub_env.add_repo(SD2, sd2_files(scale=4000))
    assert main(["models", "fetch", "--dtype", "fp16", "--skip-captioner"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"p2v: model {SD2} (fp16): 15 files, 281 kB; ")
    assert err[0].endswith(" to download") and err[1].startswith("p2v: 280 kB to download in all into ")
    lines = [line for line in err if line.startswith("p2v: download ")]
    assert lines[0].startswith("p2v: download 403 B of 281 kB (0%)")
    assert lines[-1].startswith("p2v: download 281 kB of 281 kB (100%)")
    assert err[-1].startswith(f"p2v: {SD2} (fp16) is complete: 281 kB in ")


def test_progress_lines_carry_rate_and_time_left():
    now = [0.0]
    meter = hub.ByteMeter(4_000_000, 0, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 1
        meter.advance(250_000)
    assert meter.describe() == "1 MB of 4 MB (25%), 250 kB/s, 12 s left"
    now[0] += 30
    meter.advance(3_000_000)
    assert meter.describe() == "4 MB of 4 MB (100%), 100 kB/s"
    assert hub.format_seconds(4000) == "66 min 40 s" and hub.format_seconds(9000) == "2 h 30 min"


def test_a_dropped_connection_is_resumed_by_huggingface_hub(hub_env):
    """huggingface_hub keeps what it received in whole 10 MB chunks and asks for the rest with a Range."""
    data = bytes(range(256)) * (12 * 2**20 // 256)
    hub_env.add_repo("org/big", {"config.json": b'{"architectures": ["X"]}', "model.safetensors": data})
    hub_env.serve("org/big", "model.safetensors", chunk=2**20, cut_after=11 * 2**20)
    assert main(["models", "fetch", "--model", "org/big", "--skip-captioner", "--quiet"]) == 0
    gets = [r for r in hub_env.log if r.method == "GET" and r.path.endswith("model.safetensors")]
    assert [r.range for r in gets] == [None, f"bytes={10 * 2**20}-"]  # the second asked only for the rest
    assert (hub.cached_snapshot("org/big", hub_env.cache) / "model.safetensors").read_bytes() == data


def test_an_interrupted_fetch_keeps_finished_files_and_the_next_one_fetches_the_rest(hub_env):
    files = sd2_files(scale=2000)
    hub_env.add_repo(SD2, files)
    name = "unet/diffusion_pytorch_model.fp16.safetensors"  # the largest: fetched last
    held = hub_env.serve(SD2, name, chunk=8192, gate_after=30_000)
    env = {"HF_ENDPOINT": hub_env.url, "HF_HUB_CACHE": str(hub_env.cache)}
    command = [sys.executable, "-m", "p2v_runtime.cli", "models", "fetch", "--dtype", "fp16", "--skip-captioner"]
    proc = subprocess.Popen(
        [*command, "--json-progress"],
        cwd=REPO,
        env=dict(os.environ, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.reached_gate.wait(60), "the fetch never reached the last file"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=30)
    finally:
        held.gate.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    interrupted = json_events(out)[-1]
    assert interrupted["event"] == "interrupted" and interrupted["files_kept"] == interrupted["files"] - 1
    first = set(hub_env.downloads())
    assert name in first
    snapshot = hub.cached_snapshot(SD2, hub_env.cache)
    assert not (snapshot / name).exists() and not hub.local_status(snapshot, "fp16").complete
    assert not (hub_env.cache / f"models--{SD2.replace('/', '--')}" / "refs" / "main").exists()

    count = len(hub_env.log)
    again = run_p2v(command[3:], env)
    assert again.returncode == 0, again.stderr
    second = [r for r in hub_env.log[count:] if r.method == "GET" and "/resolve/" in r.path]
    assert [r.path.split("/resolve/")[1].split("/", 1)[1] for r in second] == [name]  # only the missing one
    assert (hub.cached_snapshot(SD2, hub_env.cache) / name).read_bytes() == files[name]


def test_a_full_disk_is_refused_before_anything_large_is_downloaded(hub_env, monkeypatch, capsys):
    hub_env.add_repo(SD2, sd2_files())
    hub_env.add_repo(BLIP, {"config.json": b"{}", "model.safetensors": b"w" * 5000})
    monkeypatch.setattr(hub, "free_bytes", lambda path: 1000)
    assert main(["models", "fetch", "--captioner", BLIP]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("p2v: error: not enough disk space: ") and last.endswith(
        ", 1 kB free; free some space or set HF_HUB_CACHE to another disk"
    )
    assert hub_env.downloads() == ["model_index.json"]  # the plan's one small file, no weights


@pytest.mark.slow  # the edit's half imports torch
def test_an_unreachable_hub_is_one_line_quickly_without_retries(tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_CACHE": str(tmp_path / "empty")}
    started = time.monotonic()
    fetched = run_p2v(["models", "fetch"], env)
    assert time.monotonic() - started < 15
    assert fetched.returncode == 1
    assert fetched.stderr.splitlines() == [f"p2v: error: {UNREACHABLE}"]

    frames = tmp_path / "clip"
    frames.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(frames / "0.png")
    started = time.monotonic()
    edited = run_p2v(["edit", str(frames), "--prompt", "a car", "--out", str(tmp_path / "out")], env)
    assert time.monotonic() - started < 30  # torch's import, then one refused connection
    assert edited.returncode == 1
    lines = [line for line in edited.stderr.splitlines() if not line.startswith("p2v: load")]
    assert lines == [f"p2v: error: {UNREACHABLE}"], edited.stderr


def test_offline_mode_says_so_without_trying(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(hub.HubUnreachable, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.local_model(SD2, "model", "fp16")


def test_a_job_downloads_with_a_warning_and_byte_progress_and_can_be_cancelled(hub_env):
    files = sd2_files()
    hub_env.add_repo(SD2, files)
    reports, warnings = [], []

    def cancel_in_unet(stage, done, total):  # what the editor's progress does when Esc was pressed
        reports.append((stage, done, total))
        if done > total - 30_000:  # inside the last (largest) file
            raise EditCancelled(0)

    with pytest.raises(EditCancelled):
        hub.local_model(SD2, "model", "fp16", progress=cancel_in_unet, warn=warnings.append)
    assert warnings and warnings[0].startswith(f"downloading model `{SD2}` (fp16): ")
    assert {stage for stage, _, _ in reports} == {"download"}
    snapshot = hub.cached_snapshot(SD2, hub_env.cache)
    assert not (snapshot / "unet/diffusion_pytorch_model.fp16.safetensors").exists()
    assert (snapshot / "vae/diffusion_pytorch_model.fp16.safetensors").exists()  # finished files stay

    reports.clear()
    folder, status = hub.local_model(SD2, "model", "fp16", progress=lambda *r: reports.append(r))
    assert status.complete and folder == snapshot
    assert reports[-1][1] == reports[-1][2] == status.size
    # Once complete, the cache is used without the hub.
    hub_env.log.clear()
    assert hub.local_model(SD2, "model", "fp16")[0] == snapshot and hub_env.log == []


def test_progress_without_tqdm_class_watches_the_file_grow(hub_env, tmp_path):
    """huggingface_hub before 1.1 has no tqdm_class: the fallback counts the bytes on disk."""
    data = b"z" * 24 * 2**20  # huggingface_hub writes in 10 MB pieces
    commit = hub_env.add_repo("org/big", {"model.safetensors": data, "config.json": b"{}"})
    hub_env.serve("org/big", "model.safetensors", chunk=2**20, delay=0.05)
    seen = []
    kwargs = dict(
        repo_id="org/big", filename="model.safetensors", revision=commit, cache_dir=str(tmp_path), endpoint=hub_env.url
    )
    path = hub._download_watching_disk(kwargs, tmp_path / "models--org--big" / "blobs", seen.append)
    assert Path(path).read_bytes() == data and sum(seen) == len(data) and len(seen) > 1


# -- list --------------------------------------------------------------------------------------------


def test_list_shows_what_is_cached_complete_or_partial(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    source = tmp_path.parent / "source"
    for name, data in sd2_files(scale=1).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    populate_hf_cache(tmp_path, SD2, source, keep=lambda n: ".fp16.safetensors" in n or not hub._is_weight(n))
    populate_hf_cache(tmp_path, BLIP, source, keep=lambda n: n == "unet/config.json")  # no weights at all
    assert main(["models", "list", "--json", "--captioner", BLIP]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {row["id"]: row for row in listing["models"]}
    assert rows[SD2]["ready"] == {"fp16": True, "fp32": True} and rows[SD2]["weights"]["fp32"] == "fp16"
    assert rows[SD2]["bytes"] == sum(
        len(d) for n, d in sd2_files(scale=1).items() if ".fp16.safetensors" in n or not hub._is_weight(n)
    )
    assert rows[BLIP]["ready"] == {"fp16": False, "fp32": False} and rows[BLIP]["role"] == "--captioner"
    assert rows["openai/clip-vit-large-patch14"]["in_cache"] is False
    assert main(["models", "list", "--captioner", BLIP]) == 0
    text = capsys.readouterr().out
    assert f"Hugging Face cache: {tmp_path}" in text
    assert "ready (fp16 files)  [--model]" in text and "not in the cache" in text


def test_check_names_what_is_missing_without_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    source = tmp_path.parent / "source"
    for name, data in sd2_files(scale=1).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    populate_hf_cache(tmp_path, SD2, source, keep=lambda n: not n.startswith("unet/diffusion"))
    assert main(["models", "check", "--device", "cpu", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    model, captioner = report["models"]
    assert "only partly in the Hugging Face cache" in model["summary"]
    assert [p["name"] for p in model["parts"]] == ["unet/weights"]
    assert "not in the Hugging Face cache" in captioner["summary"]


def test_an_edit_draws_a_download_like_fetch(capsys, monkeypatch):
    from p2v_runtime.progress import ProgressBars

    bars = ProgressBars(enabled=True, steps=4)
    bars.interactive = False
    now = [0.0]
    monkeypatch.setattr(hub.time, "monotonic", lambda: now[0])
    for done in (0, 1_000_000, 2_000_000, 4_000_000):
        now[0] += 3
        bars("download", done, 4_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "p2v: download 0 B of 4 MB (0%)",
        "p2v: download 2 MB of 4 MB (50%), 333 kB/s, 6 s left",
        "p2v: download 4 MB of 4 MB (100%), 444 kB/s",
    ]
