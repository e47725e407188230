"""Random-weight stand-ins for the real models, written in the real on-disk layouts.

Tests and CI cannot download weights (no GPU, no model hub), yet the edit must be exercised through
the exact ``from_pretrained`` code that loads Stable Diffusion 2 depth, BLIP and CLIP. So these
models keep the real classes, folder layouts and the structure the edit depends on (a 5-channel
UNet with SD 2's block types, a VAE that downsamples by 8, a DPT depth estimator, byte-level BPE
and WordPiece tokenizers) and shrink everything else until a 50-step 64x64 run takes about a
second on a 2-core CPU. Their outputs are meaningless; only shapes, wiring and determinism are real.

Importing this module stays cheap: torch, diffusers and transformers are imported by the
function that needs them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
import warnings

__all__ = ["write_tiny_models", "sd2_depth_unet_config", "SD2_DEPTH_SIZES"]

# The sizes of the tiny stand-in for SD 2 depth. The published sizes are in reference_configs/
# (replica_models.py writes the full-size model, DPT-Hybrid included, from them).
SD2_DEPTH_SIZES = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        unet=dict(
            sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4), norm_num_groups=8
        ),
        vae=dict(sample_size=64, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        dpt=dict(
            image_size=64,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            neck_hidden_sizes=(8, 16, 32, 32),
            fusion_hidden_size=16,
        ),
        depth_input=64,
    ),
}

# Small enough to be fast, but every token an English prompt needs exists: the 256 byte symbols
# (and their end-of-word forms) cover any text; the merges only make common words shorter.
_CLIP_MERGES = (
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "i n",
    "in g</w>",
    "o n</w>",
    "e r",
    "e r</w>",
    "o f</w>",
    "i s</w>",
    "t o</w>",
    "a t</w>",
    "e n",
    "o r</w>",
    "r e",
    "s t",
)
_CLIP_MAX_LENGTH = 77
# The ViT image towers of the tiny BLIP and CLIP: 32x32 images in 16 patches.
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_BERT_WORDS = (
    "a an the of in on at with and is are to from by for this that it its there "
    "man woman person people child dog cat bird horse car bus train street road city building "
    "house room table chair bed window door tree trees grass field sky water sea beach mountain "
    "snow river boat plane food plate pizza red blue green white black yellow small large "
    "standing sitting walking running holding looking playing riding flying wearing top next "
    "front group two three couple painting photo picture image video close up view"
).split()


def write_tiny_models(root: str | os.PathLike, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write ``sd2-depth``, ``blip`` and ``clip`` under ``root``, returning their folders.

    Each folder is built next to its final place and renamed in at the end, so an interrupted run
    never leaves a half-written model where a loader would find it. The weights depend only on
    ``seed``, so a cache built twice holds the same models.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writers = {"sd2-depth": _write_sd2_depth, "blip": _write_blip, "clip": _write_clip}
    written = {}
    with _quiet_libraries():
        for offset, (name, write) in enumerate(writers.items()):
            written[name] = _write_atomically(
                root / name, lambda d, write=write, offset=offset: write(d, seed + offset)
            )
    return written


def sd2_depth_unet_config(size: str = "tiny") -> dict:
    """UNet arguments of the tiny stand-in: SD 2 depth's block types and depth channel, toy widths."""
    return dict(
        in_channels=5,  # 4 latent channels + depth
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=SD2_DEPTH_SIZES[size]["text"]["hidden_size"],
        use_linear_projection=True,
        upcast_attention=False,
        act_fn="silu",
        **SD2_DEPTH_SIZES[size]["unet"],
    )


def _write_atomically(target: pathlib.Path, write) -> pathlib.Path:
    """Build in a hidden sibling, then swap it in, so readers see the old model or the new one."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _quiet_libraries():
    """Random weights and tiny configs set off advice meant for real checkpoints; hide it."""
    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, (verbosity, progress_bar) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            if progress_bar:
                lib.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed weight initialisation without disturbing the caller's random stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- tokenizers -------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 bytes, in CLIP's vocabulary order.

    Printable bytes come first, as in the real vocab.json, so SD 2's pad token "!" gets id 0.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _write_clip_tokenizer(folder: pathlib.Path, pad_token: str) -> None:
    """Write vocab.json and merges.txt by hand, the layout of the real CLIP tokenizer folders.

    No tokenizer.json is written, so loading goes through the same vocab/merges conversion the
    real SD 2 tokenizer folder goes through.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    tokens += [merge.replace(" ", "") for merge in _CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n", encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_bert_tokenizer(folder: pathlib.Path) -> None:
    """Write a WordPiece vocab.txt whose single letters let any lower-case word be spelled."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [*_BERT_SPECIALS, *".,!?'\"-:;()", *"0123456789", *letters]
    pieces += [f"##{c}" for c in [*letters, *"0123456789"]]
    pieces += [w for w in _BERT_WORDS if w not in pieces]
    pieces += ["##s", "##ing", "##ed"]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "processor_class": "BlipProcessor",
        "do_lower_case": True,
        "model_max_length": 512,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "bos_token": "[DEC]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _load_tokenizer(tokenizer_class, write, scratch_parent: pathlib.Path):
    """Load the tokenizer from the hand-made files, so the object saved is the one a loader sees."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=scratch_parent))
    try:
        write(scratch)
        return tokenizer_class.from_pretrained(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _replace_tokenizer_files(folder: pathlib.Path, write) -> None:
    """Swap what ``save_pretrained`` wrote for the hand-made files the real repositories ship."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
    ):
        (folder / name).unlink(missing_ok=True)
    write(folder)


def _clip_text_config(tokenizer, **overrides):
    """CLIP text sizes shared by SD 2's encoder and the CLIP model; ids follow the tokenizer."""
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.update(overrides)
    return config


def _set_json(path: pathlib.Path, **values) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_legacy_preprocessor_config(folder: pathlib.Path, image_processor: str, processor: str) -> None:
    """Keep the hub's preprocessor_config.json layout rather than transformers 5's processor_config.json.

    The real BLIP and CLIP repositories predate processor_config.json, so loading them goes
    through the older file; the tiny models should exercise the same path.
    """
    combined = folder / "processor_config.json"
    legacy = folder / "preprocessor_config.json"
    config = json.loads(combined.read_text(encoding="utf-8")) if combined.exists() else {}
    image_config = config.pop("image_processor", None)
    if image_config is not None:  # transformers 5 nests it; 4.x already wrote the legacy file
        legacy.write_text(json.dumps(image_config), encoding="utf-8")
        if set(config) <= {"processor_class"}:
            combined.unlink()
        else:
            combined.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # Without torchvision the image processor is the PIL fallback, whose class name exists only
    # there; record the name that exists everywhere.
    _set_json(legacy, image_processor_type=image_processor, processor_class=processor)


# --- models -----------------------------------------------------------------------------------


def _write_sd2_depth(folder: pathlib.Path, seed: int, size: str = "tiny") -> None:
    """SD 2 depth's structure at toy width: what the edit hooks into must exist by the same names."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionDepth2ImgPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

    write_tokenizer = functools.partial(_write_clip_tokenizer, pad_token="!")  # SD 2 pads with "!"
    tokenizer = _load_tokenizer(CLIPTokenizer, write_tokenizer, folder)

    sizes = SD2_DEPTH_SIZES[size]
    with _seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(tokenizer, hidden_act="gelu", **sizes["text"])))
    with _seeded(seed + 1):
        # SD 2: heads of 64 channels in every block, linear projections; here heads of 16.
        unet = UNet2DConditionModel(**sd2_depth_unet_config(size))
        _smooth_noise_prediction(unet)
    with _seeded(seed + 2):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            scaling_factor=0.18215,
            **sizes["vae"],
        )
        _calibrate_latent_scale(vae)
    with _seeded(seed + 3):
        depth_estimator = DPTForDepthEstimation(
            DPTConfig(
                patch_size=16,
                backbone_out_indices=(0, 1, 2, 3),
                readout_type="project",
                **sizes["dpt"],
            )
        )
        _keep_depth_varied(depth_estimator)
    feature_extractor = DPTImageProcessor(
        size={"height": sizes["depth_input"], "width": sizes["depth_input"]},
        keep_aspect_ratio=False,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        depth_estimator=depth_estimator,
        feature_extractor=feature_extractor,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_files(folder / "tokenizer", write_tokenizer)
    # Without torchvision the processor is the PIL variant; record the name that exists either way.
    _set_json(folder / "model_index.json", feature_extractor=["transformers", "DPTImageProcessor"])
    _set_json(folder / "feature_extractor" / "preprocessor_config.json", image_processor_type="DPTImageProcessor")


def _smooth_noise_prediction(unet) -> None:
    """Damp the UNet's output layer so its noise prediction varies slowly with its input.

    A trained denoiser is a smooth function of the noisy sample, which is what makes DDIM
    inversion invertible; a randomly initialised UNet is not, and inverting then sampling with it
    diverges. Scaling the last convolution keeps the architecture and makes the tiny model behave
    like a denoiser in that one respect, so the inversion property can be tested.
    """
    import torch

    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)


def _calibrate_latent_scale(vae) -> None:
    """Set the VAE's scaling factor the way SD's 0.18215 was chosen: latents of unit variance."""
    import torch

    height = width = 64
    ramp_x = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    ramp_y = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    images = torch.stack([torch.stack([ramp_x, ramp_y, -ramp_x]), torch.stack([ramp_y, -ramp_x, ramp_x * ramp_y])])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _keep_depth_varied(depth_estimator) -> None:
    """The pipeline rescales depth by (max - min), so a flat random depth map would give NaN.

    transformers draws conv weights with std 0.02, which shrinks the signal through DPT's neck
    until every pixel's depth is the same float, and the final ReLU can zero it all; PyTorch's own
    initialisation and a positive last bias keep the map varied.
    """
    import torch

    conv_types = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    convs = [m for m in depth_estimator.modules() if isinstance(m, conv_types)]
    for conv in convs:
        conv.reset_parameters()
    with torch.no_grad():
        convs[-1].bias.fill_(1.0)


def _write_blip(folder: pathlib.Path, seed: int) -> None:
    """BLIP captioning at toy width: generate() must run and decode to some string."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _load_tokenizer(BertTokenizer, _write_bert_tokenizer, folder)

    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
            eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(_TINY_VISION),
        projection_dim=32,
    )
    with _seeded(seed):
        model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    model.save_pretrained(folder, safe_serialization=True)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    _replace_tokenizer_files(folder, _write_bert_tokenizer)
    _write_legacy_preprocessor_config(folder, "BlipImageProcessor", "BlipProcessor")


def _write_clip(folder: pathlib.Path, seed: int) -> None:
    """CLIP at toy width: text and image features must come out with matching sizes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tokenizer = functools.partial(_write_clip_tokenizer, pad_token="<|endoftext|>")  # as openai/clip
    tokenizer = _load_tokenizer(CLIPTokenizer, write_tokenizer, folder)

    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer, projection_dim=16),
        vision_config=dict(_TINY_VISION, projection_dim=16),
        projection_dim=16,
    )
    with _seeded(seed):
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
    )
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    _replace_tokenizer_files(folder, write_tokenizer)
    _write_legacy_preprocessor_config(folder, "CLIPImageProcessor", "CLIPProcessor")
