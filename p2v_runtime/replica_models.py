"""Random-weight replicas of the real checkpoints, written from their real configuration files.

``reference_configs/`` holds the configuration files of ``stabilityai/stable-diffusion-2-depth``
and ``Salesforce/blip-image-captioning-base`` (no weights; its README says how sure each file is).
A replica keeps every one of them as published (class names, PNDM in the model index, the
DPT-Hybrid depth estimator with its BiT backbone, vocabulary sizes, special-token ids, sample and
image sizes) and the repositories' weight files: fp32 ``*.safetensors`` plus ``*.fp16.safetensors``
variants for SD 2 depth, ``pytorch_model.bin`` only for BLIP base, ``model.safetensors`` for BLIP
large. The tokenizers have the real vocabulary sizes and special-token ids, with made-up BPE merges
and WordPiece entries in place of OpenAI's and BERT's vocabularies.

``small`` replicas shrink only widths and depths (:data:`SHRINK`): what the loading code, the
tokenizers and the edit's hooks see is the real thing, and the whole set is about 140 MB and
written in seconds. ``full`` keeps every size (the GPU benchmark's model: SD 2 depth as published,
DPT-Hybrid included, random weights, fp16 variant files only, about 2.7 GB).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

from .tiny_models import _keep_depth_varied, _quiet_libraries, _seeded, _write_atomically

__all__ = ["write_replicas", "write_full_size_replica", "REFERENCE", "SHRINK", "reference_config"]

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference_configs"

# Widths and depths only: every other value (heads, vocabularies, token ids, image, patch and
# sample sizes, in/out channels, block types, the backbone's type and stages) stays as published.
SHRINK: dict[str, dict[str, dict]] = {
    "sd2-depth": {
        # 5/10/20/20 heads as published, of 8 channels instead of 64; groups of 5 channels.
        "unet/config.json": {"block_out_channels": [40, 80, 160, 160], "norm_num_groups": 8, "cross_attention_dim": 64},
        "vae/config.json": {"block_out_channels": [32, 32, 64, 64]},
        # 16 heads of 4 channels; 2 layers of 23.
        "text_encoder/config.json": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
        # DPT-Hybrid: the BiT backbone keeps its widths (its features feed the neck's first two
        # stages) with one block per stage instead of 3/4/9; the ViT keeps 12 layers and 12 heads
        # (its taps are layers 2, 5, 8, 11), 48 channels wide.
        "depth_estimator/config.json": {
            "hidden_size": 48,
            "intermediate_size": 96,
            "neck_hidden_sizes": [256, 512, 64, 64],
            "fusion_hidden_size": 32,
            "backbone_config": {"depths": [1, 1, 1]},
        },
    },
    "blip": {
        # 12 heads of 4 channels in both towers, 12 layers each as published.
        "config.json": {
            "text_config": {"hidden_size": 48, "encoder_hidden_size": 48, "intermediate_size": 96},
            "vision_config": {"hidden_size": 48, "intermediate_size": 96},
        },
    },
}

# BLIP large differs from base in its vision tower (1024 wide, 24 layers, 16 heads) and so in the
# text decoder's cross-attention width; reconstructed from those published sizes (no reference file).
_BLIP_LARGE = {
    "text_config": {"encoder_hidden_size": 1024},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}
_BLIP_LARGE_SHRINK = {"text_config": {"encoder_hidden_size": 64}, "vision_config": {"hidden_size": 64}}

CLIP_VOCAB_SIZE = 49408  # 256 bytes, 256 end-of-word bytes, 48,894 merges, 2 special tokens
BERT_VOCAB_SIZE = 30522


def reference_config(name: str) -> dict:
    """A reference file as published, e.g. ``reference_config("sd2-depth/unet/config.json")``."""
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


def _merge(base: dict, change: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in change.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def write_replicas(root: str | os.PathLike, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write ``sd2-depth``, ``blip-base`` and ``blip-large`` (small replicas) under ``root``."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writers = {
        "sd2-depth": lambda d: _write_sd2_depth(d, seed, "small"),
        "blip-base": lambda d: _write_blip(d, seed + 10, "base"),
        "blip-large": lambda d: _write_blip(d, seed + 20, "large"),
    }
    with _quiet_libraries():
        return {name: _write_atomically(root / name, write) for name, write in writers.items()}


def write_full_size_replica(root: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write ``root/sd2-depth-full``: SD 2 depth at its published sizes, random weights, fp16 files."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _quiet_libraries():
        return _write_atomically(root / "sd2-depth-full", lambda d: _write_sd2_depth(d, seed, "full"))


# -- SD 2 depth ---------------------------------------------------------------------------------


def _sd2_config(name: str, size: str) -> dict:
    config = reference_config(f"sd2-depth/{name}")
    return _merge(config, SHRINK["sd2-depth"].get(name, {})) if size == "small" else config


def _init_args(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _write_sd2_depth(folder: pathlib.Path, seed: int, size: str) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    for name in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ):
        _copy_reference(f"sd2-depth/{name}", folder / name)
    _write_clip_vocabulary(folder / "tokenizer")

    def build(component: str, make, offset: int):
        config = _sd2_config(f"{component}/config.json", size)
        with _seeded(seed + offset):
            model = make(config)
        return component, model, config

    parts = [
        build("unet", lambda c: UNet2DConditionModel(**_init_args(c)), 1),
        build("vae", lambda c: AutoencoderKL(**_init_args(c)), 2),
        build("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**_init_args(c))), 3),
        build("depth_estimator", lambda c: DPTForDepthEstimation(DPTConfig(**_init_args(c))), 4),
    ]
    for component, model, config in parts:
        if component == "depth_estimator":
            with _seeded(seed + 5):
                _keep_depth_varied(model)  # a flat random depth map would make the edit NaN
        target = folder / component
        if size == "small":
            model.save_pretrained(target, safe_serialization=True)
        model.to(torch.float16)
        model.save_pretrained(target, safe_serialization=True, variant="fp16")
        _write_json(target / "config.json", config)  # the published file, not the library's rewrite
        (target / "generation_config.json").unlink(missing_ok=True)
        del model


def _copy_reference(name: str, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((REFERENCE / name).read_bytes())


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_clip_vocabulary(folder: pathlib.Path) -> None:
    """vocab.json and merges.txt of CLIP's size and layout: bytes, end-of-word bytes, merges, specials.

    The merges pair byte symbols in a fixed order (common English pairs first), so ids 49406 and
    49407 are ``<|startoftext|>`` and ``<|endoftext|>`` and "!" is id 0, as in the real vocabulary.
    """
    from .tiny_models import _CLIP_MERGES, _byte_symbols

    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    seen = set(tokens)
    merges = []
    count = CLIP_VOCAB_SIZE - len(tokens) - 2

    def add(left: str, right: str) -> None:
        if len(merges) < count and left + right not in seen and left in seen and right in seen:
            merges.append(f"{left} {right}")
            seen.add(left + right)
            tokens.append(left + right)

    for merge in _CLIP_MERGES:
        add(*merge.split(" "))
    for right_end in ("</w>", ""):
        for left in symbols:
            for right in symbols:
                add(left, right + right_end)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# -- BLIP ---------------------------------------------------------------------------------------


def _blip_config(kind: str) -> dict:
    config = reference_config("blip-base/config.json")
    if kind == "large":
        config = _merge(config, _BLIP_LARGE)
    config = _merge(config, SHRINK["blip"]["config.json"])
    if kind == "large":
        config = _merge(config, _BLIP_LARGE_SHRINK)
    return config


def _write_blip(folder: pathlib.Path, seed: int, kind: str) -> None:
    """BLIP captioning: base ships ``pytorch_model.bin`` only, large ``model.safetensors``."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = _blip_config(kind)
    with _seeded(seed):
        model = BlipForConditionalGeneration(BlipConfig(**_init_args(config)))
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "base":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "generation_config.json").unlink(missing_ok=True)
    _write_json(folder / "config.json", config)
    for name in ("preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json"):
        _copy_reference(f"blip-base/{name}", folder / name)
    _write_bert_vocabulary(folder)


def _write_bert_vocabulary(folder: pathlib.Path) -> None:
    """A 30,522-entry WordPiece vocab.txt in bert-base-uncased's order of special entries.

    [PAD] 0, [unused0..98] 1..99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then more unused
    entries, punctuation, digits, letters and made-up word pieces: every lower-case word can be
    spelled, and the ids BLIP's config names (pad 0, sep 102) are the real ones.
    """
    from .tiny_models import _BERT_WORDS

    entries = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    entries += [f"[unused{i}]" for i in range(99, 994)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    entries += [*".,!?'\"-:;()", *"0123456789", *letters, *(f"##{c}" for c in [*letters, *"0123456789"])]
    entries += [w for w in _BERT_WORDS if w not in entries]
    seen = set(entries)
    for first in letters:
        for second in letters:
            for piece in (first + second, f"##{first}{second}"):
                if piece not in seen:
                    entries.append(piece)
                    seen.add(piece)
    filler = 0
    while len(entries) < BERT_VOCAB_SIZE:
        piece = f"##{letters[filler // 676 % 26]}{letters[filler // 26 % 26]}{letters[filler % 26]}"
        word = piece[2:]
        for candidate in (word, piece):
            if candidate not in seen and len(entries) < BERT_VOCAB_SIZE:
                entries.append(candidate)
                seen.add(candidate)
        filler += 1
    (folder / "vocab.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
