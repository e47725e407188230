"""Properties of the Pix2Video edit, on the tiny random-weight models (no mocks of torch/diffusers).

A random model cannot show image quality; these properties fail when a step of the algorithm is
wrong: injection, inversion, the guided update, the cost model, cancel and order.
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
from conftest import ArrayFrames, synthetic_frames

from p2v_runtime.editor import edit_clip
from p2v_runtime.errors import EditCancelled
from p2v_runtime.protocol import EditStats


def run_edit(frames, settings, **kwargs):
    stats = EditStats()
    results = list(edit_clip(ArrayFrames(frames), settings, stats=stats, **kwargs))
    return [rgb for _, rgb in results], stats


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# -- self-attention injection ------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["decoder", "all"])
def test_injecting_own_features_reproduces_plain_sampler_exactly(tiny_settings, monkeypatch, layers):
    # Frame 2 repeats frame 1: its trajectory meets the anchor's features at every step, so
    # K/V from the anchor are its own features and the output must equal the plain (frame 1) one.
    from p2v_runtime.attention import FeatureBank, self_attention_layers
    from p2v_runtime.models import load_depth_pipeline

    injected = FeatureBank.injected
    injections = []

    def counted(bank, layer):
        features = injected(bank, layer)
        if features is not None:
            injections.append(layer)
        return features

    monkeypatch.setattr(FeatureBank, "injected", counted)
    frame = synthetic_frames(1)[0]
    settings = tiny_settings(injection="anchor", update="off", layers=layers)
    outputs, _ = run_edit([frame, frame], settings)
    assert np.array_equal(outputs[0], outputs[1])
    # Not equal because nothing was injected: frame 2 took K/V from the anchor in every chosen
    # layer at every step.
    pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
    chosen = self_attention_layers(pipeline.unet, layers)
    assert sorted(injections) == sorted(chosen * settings.steps)


def test_injection_changes_the_frame_it_is_applied_to(tiny_settings):
    frames = synthetic_frames(2)
    plain, _ = run_edit(frames, tiny_settings(injection="none", update="off"))
    injected, _ = run_edit(frames, tiny_settings(injection="anchor", update="off"))
    assert np.array_equal(plain[0], injected[0]), "frame 1 is never injected"
    assert not np.array_equal(plain[1], injected[1])


class AttentionOutputs:
    """Records every self-attention (attn1) layer's output during the batched edit calls."""

    def __init__(self, unet):
        self.calls: list[dict[str, np.ndarray]] = []
        self.handles = []
        self.current: dict[str, np.ndarray] = {}
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                self.handles.append(module.register_forward_hook(self._hook(name)))
        self.handles.append(unet.register_forward_pre_hook(self._start))

    def _start(self, module, args):
        self.current = {}
        self.calls.append(self.current)

    def _hook(self, name):
        def hook(module, args, output):
            if output.shape[0] == 2:  # edit calls carry both guidance branches; inversion has one
                self.current[name] = output.detach().float().numpy().copy()

        return hook

    def first_step_of(self, frame: int, steps: int) -> dict[str, np.ndarray]:
        edit_calls = [call for call in self.calls if call]
        return edit_calls[frame * steps]

    def close(self):
        for handle in self.handles:
            handle.remove()


def attention_at_first_step(tiny_settings, frames, steps, **overrides):
    from p2v_runtime.models import load_depth_pipeline

    settings = tiny_settings(update="off", steps=steps, **overrides)
    pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
    recorder = AttentionOutputs(pipeline.unet)
    try:
        run_edit(frames, settings)
    finally:
        recorder.close()
    return [recorder.first_step_of(index, steps) for index in range(len(frames))]


def changed_layers(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {name for name in a if not np.array_equal(a[name], b[name])}


def test_injection_modes_change_only_the_expected_layers(tiny_settings):
    frames = synthetic_frames(3)
    steps = 2
    runs = {
        mode: attention_at_first_step(tiny_settings, frames, steps, injection=mode)
        for mode in ("none", "anchor", "previous", "anchor+previous")
    }
    all_decoder = attention_at_first_step(tiny_settings, frames, steps, injection="anchor", layers="all")
    names = set(runs["none"][0])
    decoder = {name for name in names if name.startswith("up_blocks.")}
    encoder = names - decoder
    assert {name.split(".attentions")[0] for name in decoder} == {"up_blocks.1", "up_blocks.2", "up_blocks.3"}
    assert len(decoder) == 9, "SD 2 has three transformer blocks in each of up_blocks 1..3"

    for mode in ("anchor", "previous", "anchor+previous"):
        # Frame 1 is generated without injection in every mode.
        assert changed_layers(runs["none"][0], runs[mode][0]) == set()
        # At the first step of frame 2, only decoder layers see other features; the encoder runs
        # before them and must be untouched.
        assert changed_layers(runs["none"][1], runs[mode][1]) == decoder
    # For frame 2 the anchor is the previous frame: both modes read the same features.
    assert changed_layers(runs["anchor"][1], runs["previous"][1]) == set()
    # For frame 3 they differ (frame 1 vs frame 2), and anchor+previous differs from both.
    assert changed_layers(runs["anchor"][2], runs["previous"][2]) == decoder
    assert changed_layers(runs["anchor+previous"][2], runs["anchor"][2]) == decoder
    assert changed_layers(runs["anchor+previous"][2], runs["previous"][2]) == decoder
    # --layers all injects in the encoder and middle block too.
    assert changed_layers(runs["none"][1], all_decoder[1]) == decoder | encoder


class LiveFeatures:
    """Which frames' recorded self-attention features are still alive in memory (weak references
    to every tensor the feature bank records, by the frame it was recorded for)."""

    def __init__(self, monkeypatch):
        from p2v_runtime.attention import FeatureBank

        self.refs: list[tuple[int, weakref.ref]] = []
        self.frame = -1
        begin_frame, record = FeatureBank.begin_frame, FeatureBank.record
        live = self

        def begin_frame_seen(bank, index):
            live.frame = index
            return begin_frame(bank, index)

        def record_seen(bank, layer, features):
            record(bank, layer, features)
            live.refs.append((live.frame, weakref.ref(bank.current[(bank.step, layer)])))

        monkeypatch.setattr(FeatureBank, "begin_frame", begin_frame_seen)
        monkeypatch.setattr(FeatureBank, "record", record_seen)

    def frames(self) -> set[int]:
        gc.collect()
        return {frame for frame, ref in self.refs if ref() is not None}


def features_alive_at_each_frame(monkeypatch, frames, settings):
    """The frames whose features are alive while each edited frame is handed out, and the stats."""
    live = LiveFeatures(monkeypatch)
    stats = EditStats()
    alive = [live.frames() for _ in edit_clip(ArrayFrames(frames), settings, stats=stats)]
    assert live.refs or settings.injection == "none", "features were recorded"
    return alive, stats


def test_feature_cache_holds_only_frames_still_needed(tiny_settings, monkeypatch):
    short, short_stats = features_alive_at_each_frame(monkeypatch, synthetic_frames(3), tiny_settings(update="off"))
    long, long_stats = features_alive_at_each_frame(monkeypatch, synthetic_frames(6), tiny_settings(update="off"))
    anchor, anchor_stats = features_alive_at_each_frame(
        monkeypatch, synthetic_frames(3), tiny_settings(injection="anchor", update="off")
    )
    previous, _ = features_alive_at_each_frame(
        monkeypatch, synthetic_frames(3), tiny_settings(injection="previous", update="off")
    )
    none, none_stats = features_alive_at_each_frame(
        monkeypatch, synthetic_frames(3), tiny_settings(injection="none", update="off")
    )
    # What is really in memory while frame i is handed out: the anchor's and frame i's features
    # (frame i is the next frame's previous), whatever the clip length.
    assert long == [{0}] + [{0, i} for i in range(1, 6)]
    assert short == long[:3]
    assert anchor == [{0}, {0}, {0}]
    assert previous == [{0}, {1}, {2}]
    assert none == [set(), set(), set()]
    # The bank's own count, reported in the stats, agrees.
    assert short_stats.feature_cache_bytes > 0
    assert long_stats.feature_cache_bytes == short_stats.feature_cache_bytes, "anchor+previous+current, any length"
    # anchor only: the anchor is recorded once, later frames record nothing.
    assert anchor_stats.feature_cache_bytes * 3 == short_stats.feature_cache_bytes
    assert none_stats.feature_cache_bytes == 0


# -- inversion ---------------------------------------------------------------------------------


def test_inversion_then_sampling_with_source_prompt_reconstructs_the_latent(tiny_settings):
    import torch

    from p2v_runtime.inversion import encode_latent
    from p2v_runtime.models import load_depth_pipeline

    frames = synthetic_frames(2)
    prompt = "a grey car on a road"
    settings = tiny_settings(
        prompt=prompt, source_prompt=prompt, guidance=1.0, injection="none", update="off", steps=50
    )
    pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
    outputs, _ = run_edit(frames, settings)

    def roundtrip(rgb):
        latent = encode_latent(pipeline, rgb)
        with torch.no_grad():
            image = pipeline.pipe.vae.decode(latent / pipeline.pipe.vae.config.scaling_factor).sample
        array = pipeline.pipe.image_processor.postprocess(image, output_type="np")[0]
        return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)

    reference = [roundtrip(frame) for frame in frames]
    error = distance(outputs[0], reference[0])
    between_frames = distance(reference[0], reference[1])
    assert error < 0.1 * between_frames, (error, between_frames)


def test_reedit_with_another_prompt_inverts_nothing(tiny_settings):
    frames = synthetic_frames(3)
    steps = 3
    _, first = run_edit(frames, tiny_settings(steps=steps))
    _, again = run_edit(frames, tiny_settings(steps=steps, prompt="a wooden toy car"))
    assert first.unet_calls_inversion == steps * len(frames)
    assert first.unet_calls_edit == steps * len(frames)
    assert first.unet_calls == 2 * steps * len(frames)
    assert first.inversion_cache_hits == 0
    assert again.unet_calls_inversion == 0
    assert again.inversion_cache_hits == len(frames)
    assert again.unet_calls == steps * len(frames)
    # Another source prompt is another inversion.
    _, other_source = run_edit(frames, tiny_settings(steps=steps, source_prompt="a blue van"))
    assert other_source.inversion_cache_hits == 0


def test_cached_inversion_gives_the_same_edit(tiny_settings):
    frames = synthetic_frames(2)
    first, _ = run_edit(frames, tiny_settings())
    second, stats = run_edit(frames, tiny_settings())
    assert stats.inversion_cache_hits == 2
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# -- guided latent update ----------------------------------------------------------------------


def test_guided_update_pulls_towards_previous_frame_and_modes_agree(tiny_settings):
    frames = synthetic_frames(2)
    common = dict(injection="none", steps=10)  # the paper's delta: the same pull at every working size
    off, _ = run_edit(frames, tiny_settings(update="off", **common))
    x0, _ = run_edit(frames, tiny_settings(update="x0", **common))
    autograd, _ = run_edit(frames, tiny_settings(update="autograd", **common))
    assert np.array_equal(off[0], x0[0]) and np.array_equal(off[0], autograd[0]), "frame 1 is never updated"
    gap_off = distance(off[1], off[0])
    assert distance(x0[1], x0[0]) < gap_off
    assert distance(autograd[1], autograd[0]) < gap_off
    # Both modes move frame 2 the same way.
    move_x0 = x0[1].astype(np.float64) - off[1]
    move_autograd = autograd[1].astype(np.float64) - off[1]
    cosine = (move_x0 * move_autograd).sum() / (np.linalg.norm(move_x0) * np.linalg.norm(move_autograd))
    assert cosine > 0.5, cosine


class GuidedUpdateCalls:
    """Where the guided update really runs: (frame, step) of every call the editor makes to
    ``guidance.apply_update`` and to the gradient functions.

    Frame and step come from the real UNet calls of the edit (one per denoising step, with both
    guidance branches in the batch; inversion calls carry one): the k-th edit call of the clip is
    step ``k % steps`` of frame ``k // steps``. The wrapped functions still do their work.
    """

    def __init__(self, monkeypatch, unet, steps: int):
        from p2v_runtime import editor  # the names the editor calls (imported from guidance)

        self.steps = steps
        self.edit_unet_calls = 0
        self.calls: dict[str, list[tuple[int, int]]] = {"apply_update": [], "x0_gradient": [], "autograd_gradient": []}
        for name in self.calls:
            monkeypatch.setattr(editor, name, self._wrap(name, getattr(editor, name)))
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if args[0].shape[0] == 2:
            self.edit_unet_calls += 1

    def _wrap(self, name, function):
        def wrapped(*args, **kwargs):
            k = self.edit_unet_calls - 1
            self.calls[name].append((k // self.steps, k % self.steps))
            return function(*args, **kwargs)

        return wrapped

    def steps_by_frame(self, name: str, frames: int) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {frame: [] for frame in range(frames)}
        for frame, step in self.calls[name]:
            found[frame].append(step)
        return found

    def close(self):
        self.handle.remove()


def guided_update_calls(monkeypatch, tiny_settings, frames, **overrides):
    from p2v_runtime.models import load_depth_pipeline

    settings = tiny_settings(injection="none", update_delta=10.0, **overrides)
    pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
    recorder = GuidedUpdateCalls(monkeypatch, pipeline.unet, settings.steps)
    try:
        run_edit(frames, settings)
    finally:
        recorder.close()
    assert recorder.edit_unet_calls == settings.steps * len(frames)
    return settings, recorder


@pytest.mark.parametrize(
    "update, steps, update_steps, last",
    [
        ("x0", 4, 25, 2),  # the defaults on 4 steps: 25 of 50 -> index 2
        ("autograd", 4, 25, 2),
        ("x0", 10, 25, 5),
        ("x0", 10, 26, 5),  # 5.2 -> 5
        ("x0", 10, 30, 6),
        ("x0", 5, 25, 3),  # 2.5: halves round up (round() would give 2)
        ("x0", 10, 0, 0),  # the first step only
        ("x0", 10, 50, 9),  # every step
    ],
)
def test_update_is_limited_to_the_early_steps(monkeypatch, tiny_settings, update, steps, update_steps, last):
    frames = synthetic_frames(3)
    settings, recorder = guided_update_calls(
        monkeypatch, tiny_settings, frames, update=update, steps=steps, update_steps=update_steps
    )
    assert settings.last_update_step() == last
    early = list(range(last + 1))
    expected = {0: [], 1: early, 2: early}  # frame 1 has no previous frame to be pulled towards
    assert recorder.steps_by_frame("apply_update", len(frames)) == expected
    gradient, unused = ("x0_gradient", "autograd_gradient") if update == "x0" else ("autograd_gradient", "x0_gradient")
    assert recorder.steps_by_frame(gradient, len(frames)) == expected
    assert recorder.calls[unused] == []


def test_update_off_runs_no_update(monkeypatch, tiny_settings):
    _, recorder = guided_update_calls(monkeypatch, tiny_settings, synthetic_frames(3), update="off")
    assert recorder.calls == {"apply_update": [], "x0_gradient": [], "autograd_gradient": []}


class UpdateMoves:
    """The x0 difference each guided update sees and how far it moves the sample, per call."""

    def __init__(self, monkeypatch):
        from p2v_runtime import editor

        self.differences, self.moves, self.deltas = [], [], []
        x0_gradient, apply_update = editor.x0_gradient, editor.apply_update

        def gradient_seen(x0_hat, x0_previous):
            self.differences.append((x0_hat.float() - x0_previous.float()).numpy().astype(np.float64))
            return x0_gradient(x0_hat, x0_previous)

        def update_seen(sample, gradient, delta):
            updated = apply_update(sample, gradient, delta)
            self.moves.append((sample.float() - updated.float()).numpy().astype(np.float64))
            self.deltas.append(delta)
            return updated

        monkeypatch.setattr(editor, "x0_gradient", gradient_seen)
        monkeypatch.setattr(editor, "apply_update", update_seen)


@pytest.mark.parametrize(
    "width, height, size, working",
    [(64, 64, 64, (64, 64)), (64, 64, 256, (256, 256)), (64, 64, 512, (512, 512)), (160, 90, 512, (512, 320))],
)
def test_the_update_pulls_by_the_papers_fraction_at_every_working_size(
    tiny_settings, monkeypatch, width, height, size, working
):
    """--update-delta is the paper's pull at any working size and aspect: each step moves every
    latent value by 2 delta / 16384 of its x0 difference (what delta does at 512x512, N = 16384),
    not 2 delta / N; at 512x512 the step size is delta itself, bit for bit."""
    moves = UpdateMoves(monkeypatch)
    settings = tiny_settings(injection="none", steps=2, size=size, update_delta=100.0)
    _, stats = run_edit(synthetic_frames(2, width=width, height=height), settings)
    assert stats.working_size == working
    expected = 2 * 100.0 / 16384
    assert len(moves.moves) == settings.last_update_step() + 1
    for difference, move in zip(moves.differences, moves.moves):
        assert np.abs(difference).max() > 0
        assert np.allclose(move, expected * difference, rtol=1e-3, atol=1e-6), np.abs(
            move - expected * difference
        ).max()
    latent_values = 4 * (working[0] // 8) * (working[1] // 8)
    assert moves.deltas == [100.0 * latent_values / 16384] * len(moves.moves)
    if working == (512, 512):
        assert moves.deltas[0] == 100.0


def test_the_size_scale_is_exactly_one_at_the_papers_size():
    from p2v_runtime.guidance import PAPER_LATENT_VALUES, size_scaled_delta

    assert PAPER_LATENT_VALUES == 4 * 64 * 64
    for delta in (100.0, 0.1, 37.3, 1e-7, 12345.678):
        assert size_scaled_delta(delta, PAPER_LATENT_VALUES) == delta
    assert size_scaled_delta(100.0, 4 * 40 * 64) == 62.5  # 512x320: 16:9 at --size 512
    assert size_scaled_delta(100.0, 4 * 96 * 96) == 225.0  # 768x768


# -- cost model, cancel, order, determinism ----------------------------------------------------


def test_generator_yields_in_order_as_each_frame_is_done(tiny_settings):
    frames = synthetic_frames(4)
    source = ArrayFrames(frames)
    stats = EditStats()
    steps = 2
    indices = []
    for index, rgb in edit_clip(source, tiny_settings(steps=steps), stats=stats):
        indices.append(index)
        assert rgb.shape == frames[0].shape and rgb.dtype == np.uint8
        # As soon as it is done: this frame's denoising has run, the next frame's has not begun.
        assert stats.unet_calls_edit == (index + 1) * steps, (index, stats.unet_calls_edit)
    assert indices == [0, 1, 2, 3]


def test_progress_reports_every_stage(tiny_settings):
    seen = []
    run_edit(
        synthetic_frames(2),
        tiny_settings(steps=2, source_prompt=None),
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    stages = [stage for stage, _, _ in seen]
    for stage in ("load", "depth", "caption", "inversion", "edit"):
        assert stage in stages
    assert ("edit", 4, 4) in seen and ("inversion", 4, 4) in seen
    assert all(0 <= done <= total for _, done, total in seen)


@pytest.mark.parametrize("stage", ["inversion", "edit"])
def test_cancel_stops_within_one_denoising_step(tiny_settings, stage):
    cancel = threading.Event()
    stats = EditStats()
    calls_when_cancelled = []

    def progress(current, done, total):
        if current == stage and done == 5 and not cancel.is_set():
            cancel.set()
            calls_when_cancelled.append(stats.unet_calls)

    results = []
    with pytest.raises(EditCancelled) as raised:
        for item in edit_clip(
            ArrayFrames(synthetic_frames(3)), tiny_settings(steps=4), progress=progress, cancel=cancel, stats=stats
        ):
            results.append(item)
    assert calls_when_cancelled, "the cancel point was reached"
    assert stats.unet_calls - calls_when_cancelled[0] <= 1
    assert raised.value.frames_done == len(results)


def test_same_inputs_give_bit_identical_output_whatever_the_random_state(tiny_settings, tmp_path):
    """DDIM with eta 0 from inverted noise has no randomness: the whole chain (inversion, injection,
    the guided update, decoding) must not draw from any random generator. Each run moves every
    global generator (torch, NumPy, Python) to another state before every stage and step, so a
    random draw anywhere in the chain would make the two runs differ."""
    import random

    import torch

    frames = synthetic_frames(3)

    def scramble(run: int):
        counter = [0]

        def progress(stage, done, total):
            counter[0] += 1
            seed = 1000 * run + counter[0]
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

        return progress

    runs = []
    for run in (1, 2):  # separate caches: both runs invert
        settings = tiny_settings(cache_dir=str(tmp_path / f"cache{run}"), source_prompt=None)
        outputs, stats = run_edit(frames, settings, progress=scramble(run))
        assert stats.unet_calls_inversion == settings.steps * len(frames) and stats.inversion_cache_hits == 0
        runs.append((outputs, stats.source_prompt))
    (first, first_caption), (second, second_caption) = runs
    assert first_caption == second_caption
    assert len(first) == len(second) == len(frames)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_output_has_input_size_for_any_aspect(tiny_settings):
    frames = synthetic_frames(2, width=100, height=60)
    outputs, stats = run_edit(frames, tiny_settings(size=128))
    assert stats.working_size == (128, 64)
    assert all(out.shape == (60, 100, 3) for out in outputs)


def test_caption_is_the_source_prompt_when_none_is_given(tiny_settings):
    _, stats = run_edit(synthetic_frames(1), tiny_settings(source_prompt=None, steps=1))
    from p2v_runtime.caption import caption_frame
    from p2v_runtime.models import load_captioner

    captioner, _ = load_captioner(tiny_settings().captioner, "cpu")
    from p2v_runtime.frames import resize_rgb

    caption = caption_frame(captioner, resize_rgb(synthetic_frames(1)[0], (64, 64)))
    assert caption.strip(), "an empty caption would equal an unset source prompt"
    assert stats.source_prompt == caption


def test_guidance_scale_changes_the_edit(tiny_settings):
    frames = synthetic_frames(1)
    low, _ = run_edit(frames, tiny_settings(guidance=1.0))
    high, _ = run_edit(frames, tiny_settings(guidance=7.5))
    assert not np.array_equal(low[0], high[0])


def test_steps_beyond_the_schedule_are_refused():
    from p2v_runtime.settings import EditSettings, SettingsError

    with pytest.raises(SettingsError, match="--steps"):
        EditSettings(prompt="x", steps=501).validate()


@pytest.mark.parametrize("depth_norm", ["clip", "frame"])
def test_preview_is_the_whole_edits_first_frame_and_leaves_its_inversion(tiny_settings, depth_norm):
    """A preview edits the anchor only, exactly as the whole edit will (frame 0 has no injection and
    no update), reads every frame when the depth range needs them, and caches the anchor's inversion."""
    frames = synthetic_frames(4)
    settings = tiny_settings(depth_norm=depth_norm)
    source = ArrayFrames(frames)
    stats = EditStats()
    preview = list(edit_clip(source, settings, stats=stats, preview=True))
    assert [index for index, _ in preview] == [0]
    assert (
        stats.frames == 1 and stats.unet_calls_inversion == settings.steps and stats.unet_calls_edit == settings.steps
    )
    assert source.reads >= (len(frames) if depth_norm == "clip" else 1)
    whole, whole_stats = run_edit(frames, settings)
    assert np.array_equal(preview[0][1], whole[0])
    assert whole_stats.inversion_cache_hits == 1  # the anchor's inversion came from the preview
