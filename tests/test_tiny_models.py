"""The tiny models must load and run through the same code as the real ones.

Every other end-to-end test stands on them, so a layout or wiring mistake here would make those
tests pass against something the real checkpoints are not.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2v_runtime.tiny_models import write_tiny_models

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads spinning on a shared 2-core
    machine can make one denoising run 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="module")
def depth_pipe(tiny):
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny["sd2-depth"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def image():
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return PIL_Image.fromarray(pixels)


def _features(output):
    """transformers 5 returns a model output whose pooler_output holds the projection; 4.x a tensor."""
    return getattr(output, "pooler_output", output)


def test_importing_does_not_import_torch():
    code = "import sys, p2v_runtime.tiny_models; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_unet_takes_depth_and_has_sd2_decoder_self_attention(depth_pipe):
    unet = depth_pipe.unet
    assert unet.config.in_channels == 5
    assert unet.config.out_channels == 4
    decoder_self_attention = [
        f"up_blocks.{block}.attentions.{layer}.transformer_blocks.0.attn1.processor"
        for block in (1, 2, 3)
        for layer in range(3)
    ]
    processors = unet.attn_processors
    assert all(name in processors for name in decoder_self_attention)
    assert len([n for n in processors if n.startswith("up_blocks.") and ".attn1." in n]) == 9


@pytest.mark.slow
def test_vae_downsamples_by_8(depth_pipe):
    assert depth_pipe.vae_scale_factor == 8
    assert depth_pipe.vae.config.latent_channels == 4


@pytest.mark.slow
def test_scaled_latents_have_unit_variance_like_sd(depth_pipe):
    # SD's 0.18215 makes its latents unit-variance; the tiny VAE's factor is calibrated the same way.
    import torch

    ramp = torch.linspace(-1, 1, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), -ramp[None, :].expand(64, 64)])
    with torch.no_grad():
        latent = depth_pipe.vae.encode(image[None]).latent_dist.mean * depth_pipe.vae.config.scaling_factor
    assert 0.5 < float(latent.std()) < 2.0


@pytest.mark.slow
def test_scheduler_is_sd2_ddim(depth_pipe):
    from diffusers import DDIMScheduler

    config = depth_pipe.scheduler.config
    assert isinstance(depth_pipe.scheduler, DDIMScheduler)
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.clip_sample, config.set_alpha_to_one, config.steps_offset) == (False, False, 1)


@pytest.mark.slow
def test_tokenizer_encodes_any_english_prompt_within_the_text_encoder_vocabulary(depth_pipe):
    tokenizer, text_encoder = depth_pipe.tokenizer, depth_pipe.text_encoder
    prompt = "A watercolour painting of a Fox, jumping over 3 lazy dogs at sunset — très jolie!"
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer.model_max_length == 77
    assert len(ids) == 77
    assert max(ids) < text_encoder.config.vocab_size
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.pad_token == "!"
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("a watercolour painting of a fox")


@pytest.mark.slow
def test_depth2img_runs_end_to_end(depth_pipe, image):
    result = depth_pipe(
        prompt="a red car",
        image=image,
        num_inference_steps=2,
        strength=1.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(result) == 1
    assert result[0].size == (64, 64)
    assert np.isfinite(np.asarray(result[0], dtype=np.float32)).all()


@pytest.mark.slow
def test_depth_estimator_produces_a_varied_depth_map(depth_pipe, image):
    pixel_values = depth_pipe.feature_extractor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth = depth_pipe.depth_estimator(pixel_values).predicted_depth
    assert depth.shape == (1, 64, 64)
    assert torch.isfinite(depth).all()
    # The pipeline divides by (max - min); a flat map would turn the whole edit into NaN.
    assert depth.max() - depth.min() > 1e-3


@pytest.mark.slow
def test_blip_captions_an_image(tiny, image):
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny["blip"])
    processor = BlipProcessor.from_pretrained(tiny["blip"])
    assert isinstance(AutoProcessor.from_pretrained(tiny["blip"]), BlipProcessor)
    with torch.no_grad():
        ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=20)
    caption = processor.decode(ids[0], skip_special_tokens=True)
    assert caption.strip(), "generated no words"
    assert "[DEC]" not in caption and "[SEP]" not in caption


@pytest.mark.slow
def test_clip_features_have_the_projection_size(tiny, image):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny["clip"])
    processor = CLIPProcessor.from_pretrained(tiny["clip"])
    size = model.config.projection_dim
    with torch.no_grad():
        text = _features(
            model.get_text_features(**processor(text=["a dog", "a cat on a mat"], padding=True, return_tensors="pt"))
        )
        pixels = _features(model.get_image_features(**processor(images=[image, image], return_tensors="pt")))
    assert text.shape == (2, size)
    assert pixels.shape == (2, size)


@pytest.mark.slow
def test_same_seed_writes_the_same_weights_over_an_existing_folder(tiny, tmp_path):
    from safetensors.torch import load_file

    weights = "unet/diffusion_pytorch_model.safetensors"
    other = load_file(write_tiny_models(tmp_path, seed=1)["sd2-depth"] / weights)
    again = write_tiny_models(tmp_path, seed=0)  # replaces the seed-1 models in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blip", "clip", "sd2-depth"]  # nothing left over

    first, second = load_file(tiny["sd2-depth"] / weights), load_file(again["sd2-depth"] / weights)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The seed-1 weights were other weights, so the equality above shows they were replaced.
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
def test_an_interrupted_rewrite_keeps_the_previous_model(tmp_path, monkeypatch):
    import p2v_runtime.tiny_models as tiny_models

    write_tiny_models(tmp_path)
    before = (tmp_path / "clip" / "model.safetensors").read_bytes()

    def interrupted(folder, seed):
        (folder / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_models, "_write_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_models(tmp_path, seed=5)
    assert (tmp_path / "clip" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blip", "clip", "sd2-depth"]
