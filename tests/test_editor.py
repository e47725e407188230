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
        record = FeatureBank.record
        live = self

        def record_seen(bank, layer, features):
            record(bank, layer, features)
            stored = bank.store.tensors[(bank.turn.index, bank.step)][layer]
            live.refs.append((bank.turn.index, weakref.ref(stored)))

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
    # (frame i is the next frame's previous), whatever the clip length; the last frame is not
    # recorded (no frame reads it) and the anchor's last reader has freed it step by step.
    assert long == [{0}] + [{0, i} for i in range(1, 5)] + [set()]
    assert short == [{0}, {0, 1}, set()]
    assert anchor == [{0}, {0}, set()]
    assert previous == [{0}, {1}, set()]
    assert none == [set(), set(), set()]
    # The bank's own count, reported in the stats, agrees.
    assert short_stats.feature_cache_bytes > 0
    assert anchor_stats.feature_cache_bytes * 2 == short_stats.feature_cache_bytes  # anchor + frame 1
    assert none_stats.feature_cache_bytes == 0


class CountingStore:
    """Wraps the editor's feature store: after every record and every free, sums the bytes of the
    tensors it really holds (not its own counter), and keeps the peak and what it was made of."""

    def __init__(self, monkeypatch):
        from p2v_runtime import editor
        from p2v_runtime.attention import FeatureStore

        counter = self
        self.peak = 0
        self.step_bytes: set[int] = set()  # one frame's features at one step, every layer

        class Counted(FeatureStore):
            def put(self, frame, step, layer, features):
                super().put(frame, step, layer, features)
                counter.look(self)

            def drop(self, frame, step):
                layers = self.tensors.get((frame, step), {})
                counter.step_bytes.add(sum(t.numel() * t.element_size() for t in layers.values()))
                super().drop(frame, step)
                counter.look(self)

        monkeypatch.setattr(editor, "FeatureStore", Counted)

    def look(self, store):
        held = sum(t.numel() * t.element_size() for layers in store.tensors.values() for t in layers.values())
        assert held == store.held_bytes
        self.peak = max(self.peak, held)


@pytest.mark.parametrize("injection", ["anchor+previous", "previous", "anchor", "anchor+random"])
def test_peak_feature_bytes_are_about_two_frames_at_any_clip_length(tiny_settings, monkeypatch, injection):
    """Features of a frame are freed step by step as its last reader goes through that step, and
    nothing is recorded that no frame reads: with anchor+previous the peak is the anchor, the
    previous frame's remaining steps and the current frame's recorded ones, two frames and one step,
    at 4, 6 and 9 frames alike."""
    from p2v_runtime.attention import feature_bytes_per_step, self_attention_layers
    from p2v_runtime.models import load_depth_pipeline
    from p2v_runtime.plan import plan_edit

    steps = 3
    settings = tiny_settings(injection=injection, update="off", steps=steps)
    pipeline, _ = load_depth_pipeline(settings.model, settings.device, settings.dtype)
    layers = self_attention_layers(pipeline.unet, settings.layers)
    per_step = feature_bytes_per_step(pipeline.unet, layers, (8, 8), 4)
    peaks = {}
    for count in (4, 6, 9):
        counter = CountingStore(monkeypatch)
        _, stats = run_edit(synthetic_frames(count), settings)
        assert counter.step_bytes == {per_step}, "the layout formula is what a step records"
        plan = plan_edit(count, 0, injection, settings.seed, update=False)
        assert counter.peak == stats.feature_cache_bytes == plan.feature_steps_peak(steps) * per_step
        peaks[count] = counter.peak // per_step
    frame = steps
    expected = {
        "anchor+previous": {4: 2 * frame + 1, 6: 2 * frame + 1, 9: 2 * frame + 1},
        "previous": {4: frame + 1, 6: frame + 1, 9: frame + 1},
        "anchor": {4: frame, 6: frame, 9: frame},
    }
    if injection in expected:
        assert peaks == expected[injection]
    else:  # random earlier frames are kept until their last reader: more, and it grows with the clip
        assert all(peaks[count] >= 2 * frame for count in peaks)


def test_a_preview_and_injection_none_record_nothing(tiny_settings, monkeypatch):
    counter = CountingStore(monkeypatch)
    _, none = run_edit(synthetic_frames(3), tiny_settings(injection="none"))
    stats = EditStats()
    list(edit_clip(ArrayFrames(synthetic_frames(3)), tiny_settings(), stats=stats, preview=True))
    assert counter.peak == 0 and none.feature_cache_bytes == 0 and stats.feature_cache_bytes == 0


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
    from p2v_runtime.models import load_depth_pipeline

    frames = synthetic_frames(3)
    steps = 3
    text_calls = []
    pipeline, _ = load_depth_pipeline(tiny_settings().model, "cpu", "auto")
    handle = pipeline.pipe.text_encoder.register_forward_pre_hook(lambda module, args: text_calls.append(1))
    try:
        _, first = run_edit(frames, tiny_settings(steps=steps))
        first_text_calls = len(text_calls)
        _, again = run_edit(frames, tiny_settings(steps=steps, prompt="a wooden toy car"))
    finally:
        handle.remove()
    # The source prompt is encoded only for an inversion: a re-edit encodes the edit prompt alone.
    assert len(text_calls) - first_text_calls == first_text_calls - 1
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
    [(64, 64, 64, (64, 64)), (256, 256, 256, (256, 256)), (512, 512, 512, (512, 512)), (512, 288, 512, (512, 320))],
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


# -- anchor and edit order ---------------------------------------------------------------------


def test_an_anchor_in_the_middle_edits_outwards_and_hands_frames_out_in_order(tiny_settings):
    """From anchor 2 of 5 the edit runs 2, 1, 0 and then 3, 4, each frame attending to the anchor
    and to its neighbour already edited, pulled towards that neighbour's predictions: the forward
    half is the edit of frames 2..4 from their first frame, the backward half the edit of frames
    2, 1, 0 (reversed) from theirs, bit for bit. Frames still come out in frame order: 0..2 once
    the backward pass reaches frame 0, then each as it is done."""
    frames = synthetic_frames(5, seed=3)
    for index in range(5):
        frames[index] = np.roll(frames[index], 5 * index, axis=0)  # moves down and across
    common = dict(depth_norm="frame", steps=3)
    source = ArrayFrames(frames)
    stats = EditStats()
    calls_at_yield = []
    outputs = []
    for index, rgb in edit_clip(source, tiny_settings(anchor="middle", **common), stats=stats):
        outputs.append(index)
        calls_at_yield.append(stats.unet_calls_edit)
        outputs[-1] = (index, rgb)
    assert [index for index, _ in outputs] == [0, 1, 2, 3, 4]
    steps = common["steps"]
    assert calls_at_yield == [3 * steps, 3 * steps, 3 * steps, 4 * steps, 5 * steps]
    edited = [rgb for _, rgb in outputs]
    forward, _ = run_edit(frames[2:], tiny_settings(**common))
    backward, _ = run_edit(frames[2::-1], tiny_settings(**common))
    assert all(np.array_equal(a, b) for a, b in zip(edited[2:], forward))
    assert all(np.array_equal(a, b) for a, b in zip(edited[2::-1], backward))
    # The anchor is the frame the edit starts from, not a copy of the first frame's edit.
    numbered, _ = run_edit(frames, tiny_settings(anchor="2", **common))
    assert all(np.array_equal(a, b) for a, b in zip(edited, numbered))
    first, _ = run_edit(frames, tiny_settings(**common))
    assert not np.array_equal(first[0], edited[0])


def test_an_anchor_past_the_clip_is_refused_before_any_model_loads(tiny_settings, monkeypatch):
    from p2v_runtime import editor
    from p2v_runtime.settings import SettingsError

    monkeypatch.setattr(editor, "load_depth_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SettingsError, match=r"Anchor \(--anchor\) 3 is past the clip: it has 3 frame"):
        run_edit(synthetic_frames(3), tiny_settings(anchor="3"))


@pytest.mark.parametrize("depth_norm", ["clip", "frame"])
def test_a_preview_edits_the_chosen_anchor(tiny_settings, depth_norm):
    frames = synthetic_frames(5)
    settings = tiny_settings(anchor="middle", depth_norm=depth_norm, source_prompt=None)
    stats = EditStats()
    preview = list(edit_clip(ArrayFrames(frames), settings, stats=stats, preview=True))
    assert [index for index, _ in preview] == [2]
    whole, whole_stats = run_edit(frames, settings)
    assert np.array_equal(preview[0][1], whole[2])
    assert whole_stats.inversion_cache_hits == 1 and whole_stats.source_prompt == stats.source_prompt
    # The caption is the anchor's: a clip of the anchor alone (what the add-on sends for a
    # per-frame-depth preview) gets the same source prompt.
    _, alone = run_edit([frames[2]], tiny_settings(source_prompt=None))
    assert alone.source_prompt == stats.source_prompt


# -- anchor + a random earlier frame -----------------------------------------------------------


def test_anchor_plus_random_reads_the_frames_the_seed_picks(tiny_settings, monkeypatch):
    """Each frame attends to the anchor and to an earlier frame drawn from the seed ahead of the
    edit: the same seed gives the same edit whatever the global random state, another seed other
    draws; a frame whose draw is its previous neighbour is edited as anchor+previous edits it."""
    import random

    from p2v_runtime.plan import plan_edit

    frames = synthetic_frames(6)
    common = dict(injection="anchor+random", update="off", steps=2)
    random.seed(1)
    a, _ = run_edit(frames, tiny_settings(seed=7, **common))
    random.seed(2)
    b, _ = run_edit(frames, tiny_settings(seed=7, **common))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    plans = {seed: plan_edit(6, 0, "anchor+random", seed) for seed in range(40)}
    draws = {seed: tuple(turn.sources[1] for turn in plan.turns[1:]) for seed, plan in plans.items()}
    other = next(seed for seed in draws if draws[seed] != draws[7])
    c, _ = run_edit(frames, tiny_settings(seed=other, **common))
    differing = [i for i in range(6) if not np.array_equal(a[i], c[i])]
    first_difference = 1 + next(i for i, (x, y) in enumerate(zip(draws[7], draws[other])) if x != y)
    assert differing and min(differing) == first_difference
    # Frame 1 can only draw the anchor and frame 2 only frame 1: both are edited as anchor+previous.
    assert all(plan.turns[1].sources == (0, 0) and plan.turns[2].sources == (0, 1) for plan in plans.values())
    previous, _ = run_edit(frames, tiny_settings(**{**common, "injection": "anchor+previous"}))
    assert np.array_equal(a[1], previous[1]) and np.array_equal(a[2], previous[2])


# -- where features are kept -------------------------------------------------------------------


@pytest.mark.parametrize("injection", ["anchor+previous", "anchor+random"])
def test_features_in_host_memory_give_the_same_edit_bit_for_bit(tiny_settings, injection):
    frames = synthetic_frames(4)
    on_device, device_stats = run_edit(frames, tiny_settings(injection=injection, feature_store="gpu"))
    on_host, host_stats = run_edit(frames, tiny_settings(injection=injection, feature_store="cpu"))
    assert all(np.array_equal(a, b) for a, b in zip(on_device, on_host))
    assert (device_stats.feature_store, host_stats.feature_store) == ("gpu", "cpu")
    assert device_stats.feature_cache_bytes == host_stats.feature_cache_bytes > 0
    _, auto = run_edit(frames, tiny_settings(feature_store="auto"))
    assert auto.feature_store == "gpu", "off CUDA the device's memory is the host's: nothing to move"


def test_the_host_store_copies_features_and_hands_back_equal_tensors():
    import torch

    from p2v_runtime.attention import FeatureStore

    store = FeatureStore("cpu", "cpu")
    features = torch.randn(2, 16, 8, dtype=torch.float16)
    store.put(3, 0, "layer", features)
    held = store.tensors[(3, 0)]["layer"]
    assert held.data_ptr() != features.data_ptr(), "recorded into a buffer of its own"
    assert torch.equal(store.get(3, 0, "layer"), features)
    assert store.held_bytes == store.peak_bytes == features.numel() * 2 and store.device_bytes() == 0
    store.drop(3, 0)
    assert store.held_bytes == 0 and store.tensors == {}


@pytest.mark.parametrize(
    "setting, device, needed, free, chosen",
    [
        ("auto", "cpu", 10**12, 0, "gpu"),
        ("auto", "mps", 10**12, 0, "gpu"),
        ("auto", "cuda", 2_750_000_000, 21 * 2**30, "gpu"),  # SD 2 depth at 512 on a 24 GB card
        ("auto", "cuda", 2_750_000_000, 3 * 2**30, "cpu"),  # ... on a 6 GB card, weights loaded
        ("gpu", "cuda", 10**12, 0, "gpu"),
        ("cpu", "cuda", 0, 10**12, "cpu"),
        ("cpu", "cpu", 0, 0, "cpu"),
    ],
)
def test_auto_feature_store_chooses_from_free_device_memory(setting, device, needed, free, chosen):
    from p2v_runtime.editor import choose_feature_store

    assert choose_feature_store(setting, device, needed, lambda: free) == chosen


# -- cancel while a model loads or captions ----------------------------------------------------


@pytest.mark.parametrize("slow", ["load", "caption"])
def test_cancel_takes_effect_within_a_second_while_a_model_loads_or_captions(tiny_settings, monkeypatch, slow):
    import time

    from p2v_runtime import editor, models

    release = threading.Event()
    load_depth_pipeline, caption_frame = editor.load_depth_pipeline, editor.caption_frame

    def slow_load(*args, **kwargs):
        release.wait(30)  # a cold load from a slow disk
        return load_depth_pipeline(*args, **kwargs)

    def slow_caption(*args, **kwargs):
        release.wait(30)
        return caption_frame(*args, **kwargs)

    if slow == "load":
        models.release_all()  # cold: the load really happens
        monkeypatch.setattr(editor, "load_depth_pipeline", slow_load)
    else:
        monkeypatch.setattr(editor, "caption_frame", slow_caption)
    cancel = threading.Event()
    stages = []
    cancelled_at = []

    def cancel_now():
        cancelled_at.append(time.monotonic())
        cancel.set()

    def progress(stage, done, total):
        stages.append(stage)
        if stage == slow and done == 0:
            threading.Timer(0.2, cancel_now).start()

    try:
        with pytest.raises(EditCancelled) as raised:
            run_edit(synthetic_frames(2), tiny_settings(source_prompt=None), progress=progress, cancel=cancel)
        waited = time.monotonic() - cancelled_at[0]
    finally:
        release.set()  # the abandoned load or caption finishes in its thread
    assert raised.value.frames_done == 0
    assert slow in stages and "edit" not in stages and "inversion" not in stages
    assert waited < 1.0, f"the cancel took {waited:.2f} s"


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
