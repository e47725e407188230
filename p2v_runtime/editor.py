"""The per-clip orchestration of Pix2Video: a generator that yields edited frames in order.

Per clip: depth for every frame (clip-wide normalisation needs them all first), a caption of the
anchor for the source prompt, the edit's plan (``plan.py``: the order from the anchor, what each
frame reads). Then per frame, in the plan's order: DDIM inversion (or a cache hit), denoising
with the edit prompt, feature injection from the anchor and the previous (or a random earlier)
frame and the guided update towards the previous frame's prediction, decoding. Frames are
yielded in frame order, each as soon as it and every frame before it exist; memory holds only
the features and predictions a later frame will read (about two frames' features with the
paper's settings), whatever the clip length.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from . import depth as depth_conv
from .attention import FeatureBank, FeatureStore, feature_bytes_per_step, injection_installed, self_attention_layers
from .caption import caption_frame
from .errors import EditCancelled, GpuOutOfMemory, InputError
from .frames import resize_rgb, working_size
from .guidance import apply_update, autograd_gradient, size_scaled_delta, x0_gradient
from .inversion import (
    InversionCache,
    InversionRequest,
    InversionSpec,
    ddim_schedulers,
    default_cache_dir,
    embed_prompt,
    inversion_key,
    invert_frame,
)
from .models import DepthPipeline, dtype_name, load_captioner, load_depth_pipeline
from .plan import EditPlan, Turn, plan_edit
from .protocol import EditStats, Frames
from .settings import EditSettings

ProgressCallback = Callable[[str, int, int], None]
DepthSink = Callable[[int, np.ndarray], None]

CANCEL_POLL = 0.05  # seconds between looks at the cancel flag while a model loads or captions


def edit_clip(
    frames: Frames,
    settings: EditSettings,
    *,
    depth: Frames | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    stats: EditStats | None = None,
    depth_sink: DepthSink | None = None,
    warn: Callable[[str], None] | None = None,
    preview: bool = False,
    shared_inversions: SharedInversions | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Edit a clip with Pix2Video; yield ``(index, HxWx3 uint8 RGB)`` at the input size, in order.

    ``frames`` has ``__len__``, ``size`` (width, height) and ``read(i)``; ``depth`` (optional)
    reads a Z pass per frame. ``depth_sink(index, depth)`` receives the depth the model was
    conditioned on, at latent size, scaled to [0, 1] with near = 1 (``p2v edit --save-depth``,
    or sent back by the server). Setting ``cancel`` stops within one denoising step with
    :class:`EditCancelled`, also while a model loads or captions. ``preview`` edits the anchor
    (``settings.anchor``) only and yields it with its index: what the whole edit will make of that
    frame, bit for bit, and its inversion is cached for it (with clip normalisation every frame is
    still read, for the depth range).

    Frames are edited from the anchor outwards (``plan.py``); with another anchor than the first
    frame, frames before it are handed out once the backward pass reaches frame 0, so the output
    is always in frame order. They wait as latents (64 KiB a frame at 512x512), decoded when due.

    ``shared_inversions`` (``p2v serve --ray``): inversions other processes compute at the same
    time. Before the first frame the editor announces every inversion it will need to it, in the
    plan's order; it then asks it for each one in turn, and inverts itself only what nobody else
    has taken.
    """
    settings.validate()
    editor = _ClipEditor(frames, settings, depth, progress, cancel, stats or EditStats(), depth_sink, warn)
    editor.preview = preview
    editor.shared = shared_inversions
    yield from editor.run()


class SharedInversions(Protocol):
    """Inversions shared with other processes: an :class:`InversionCache` that is also told, up
    front, which inversions the clip needs (``pool/shared.py`` is the one in use)."""

    def attach(self, disk: InversionCache) -> SharedInversions:
        """Use ``disk`` as this process's own cache under the shared one; return self."""
        ...

    def has(self, key: str) -> bool:
        """Whether this process's own cache holds the inversion (it is then not announced)."""
        ...

    def announce(self, spec: InversionSpec, requests: list[InversionRequest]) -> None:
        """The inversions this edit needs and has not cached, in the order it needs them."""
        ...

    def load(self, key: str) -> np.ndarray | None:
        """The inverted latent, waiting for it while another process computes it; None: invert it here."""
        ...

    def store(self, key: str, latent: np.ndarray) -> None: ...


@dataclass(frozen=True)
class ClipContext:
    """What one clip's edit fixes before its first frame; ``_ClipEditor._load`` builds it once."""

    pipeline: DepthPipeline
    work_size: tuple[int, int]  # (width, height) the model sees the frames at
    latent_hw: tuple[int, int]  # (height, width) of the latents and of the model depth
    inversion_cache: InversionCache
    depth_range: tuple[float, float] | None  # the clip's inverse-depth range; None: each frame's own
    source_prompt: str  # inversion's condition, part of its cache key
    source_embedding: Callable[[], torch.Tensor]  # conditional only (guidance 1); made on the first inversion
    edit_embedding: torch.Tensor  # [unconditional, conditional], for classifier-free guidance
    scheduler: DDIMScheduler
    inverse_scheduler: DDIMInverseScheduler
    layers: tuple[str, ...]  # the self-attention layers that record and inject
    plan: EditPlan  # edit order from the anchor, what each frame reads and who reads it last
    feature_store: str  # "gpu" or "cpu": where the recorded features live ("auto" resolved)


class _ClipEditor:
    """One clip's edit; only ``edit_clip`` creates it.

    The inputs are fixed at construction and what the clip fixes is built once into a
    :class:`ClipContext`; what changes from frame to frame is named in :meth:`_edit_frames`.
    """

    def __init__(self, frames, settings, depth, progress, cancel, stats, depth_sink, warn):
        self.frames = frames
        self.settings = settings
        self.depth_files = depth
        self.report = progress or (lambda stage, done, total: None)
        self.cancel = cancel
        self.stats = stats
        self.depth_sink = depth_sink
        self.warn = warn or (lambda message: print(f"p2v: {message}", file=sys.stderr))
        self.frames_done = 0  # frames handed out
        self.count = len(frames)
        self.preview = False
        self.shared: SharedInversions | None = None
        self.edited = self.count  # frames inverted and edited: 1 for a preview of the anchor

    # -- the clip -----------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[int, np.ndarray]]:
        started = time.perf_counter()
        try:
            self._check_inputs()
            plan = self._plan()
            clip, anchor_rgb, clip_depths = self._load(plan)
            if self.shared is not None and not self.preview:
                clip_depths = self._announce_inversions(clip, anchor_rgb, clip_depths)
            yield from self._edit_frames(clip, anchor_rgb, clip_depths)
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemory(self._out_of_memory_message()) from exc
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise GpuOutOfMemory(self._out_of_memory_message()) from exc
        finally:
            self._finish_stats(started)

    def _check_inputs(self) -> None:
        if self.count == 0:
            raise InputError(f"{getattr(self.frames, 'description', 'input')}: no frames to edit")
        if self.depth_files is not None:
            if len(self.depth_files) != self.count:
                raise InputError(f"depth has {len(self.depth_files)} frame(s) but the clip has {self.count}")
            if tuple(self.depth_files.size) != tuple(self.frames.size):
                raise InputError(
                    f"depth maps are {self.depth_files.size[0]}x{self.depth_files.size[1]} but frames are "
                    f"{self.frames.size[0]}x{self.frames.size[1]}"
                )

    def _plan(self) -> EditPlan:
        """The edit's order and sources, drawn before anything loads (a bad anchor is refused first)."""
        settings = self.settings
        plan = plan_edit(
            self.count,
            settings.anchor_index(self.count),
            settings.injection,
            settings.seed,
            update=settings.update != "off",
            limit=1 if self.preview else None,
        )
        self.edited = len(plan.turns)
        return plan

    def _load(self, plan: EditPlan) -> tuple[ClipContext, np.ndarray, list | None]:
        """Everything fixed for the clip, in the order the progress shows: model, depth, caption.

        Also returns what was computed on the way and is used once later: the anchor at the
        working size (captioned here, edited first) and, with clip normalisation, every frame's
        inverse depth (the range needs them all before the first frame).
        """
        settings, stats = self.settings, self.stats
        self.report("load", 0, 1)
        pipeline, loaded = self._interruptible(
            lambda: load_depth_pipeline(
                settings.model, settings.device, settings.dtype, progress=self._download_progress, warn=self.warn
            ),
            "model-load",
        )
        if loaded:
            stats.model_load_seconds += pipeline.load_seconds
        self.report("load", 1, 1)
        stats.device = pipeline.device
        stats.dtype = dtype_name(pipeline.dtype)
        stats.steps = settings.steps
        stats.depth_source = "file" if self.depth_files is not None else "estimate"
        width, height = working_size(*self.frames.size, settings.size)
        scale = pipeline.pipe.vae_scale_factor
        work_size, latent_hw = (width, height), (height // scale, width // scale)
        stats.working_size = work_size
        inversion_cache = InversionCache(settings.cache_dir or default_cache_dir(), warn=self.warn)
        if self.shared is not None:
            inversion_cache = self.shared.attach(inversion_cache)
        if pipeline.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        clip_depths, depth_range = None, None
        if settings.depth_norm == "clip":
            clip_depths = self._clip_inverse_depths(pipeline, work_size, latent_hw)
            depth_range = depth_conv.depth_range(clip_depths, "clip")
        self._check_cancel()
        anchor_rgb = self._work_frame(plan.anchor, work_size)
        source_prompt = self._source_prompt(anchor_rgb)
        stats.source_prompt = source_prompt
        # A re-edit whose inversions are all cached never needs it: encoded on first use.
        source_embedding = functools.cache(lambda: self._embed(pipeline, source_prompt, guided=False))
        edit_embedding = self._embed(pipeline, settings.prompt, guided=True)
        scheduler, inverse_scheduler = ddim_schedulers(pipeline, settings.steps)
        layers = tuple(self_attention_layers(pipeline.unet, settings.layers))
        clip = ClipContext(
            pipeline=pipeline,
            work_size=work_size,
            latent_hw=latent_hw,
            inversion_cache=inversion_cache,
            depth_range=depth_range,
            source_prompt=source_prompt,
            source_embedding=source_embedding,
            edit_embedding=edit_embedding,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            layers=layers,
            plan=plan,
            feature_store=self._feature_store_kind(pipeline, layers, latent_hw, plan),
        )
        return clip, anchor_rgb, clip_depths

    def _feature_store_kind(self, pipeline: DepthPipeline, layers, latent_hw, plan: EditPlan) -> str:
        """``--feature-store``, with ``auto`` resolved: the device unless the plan's peak of features
        would take more than half the device's free memory (the rest is for activations)."""
        element = torch.empty((), dtype=pipeline.dtype).element_size()
        per_step = feature_bytes_per_step(pipeline.unet, layers, latent_hw, element)
        peak_steps = plan.feature_steps_peak(self.settings.steps)
        needed = peak_steps * per_step
        if self.settings.injection == "anchor+random" and peak_steps > 3 * self.settings.steps:
            self.warn(
                f"injection anchor+random keeps up to {peak_steps / self.settings.steps:.1f} frames' features at "
                f"once here ({needed / 2**30:.2f} GiB): a frame drawn as a random earlier frame waits for its "
                "last reader (anchor+previous keeps two)"
            )
        kind = choose_feature_store(
            self.settings.feature_store, pipeline.device, needed, lambda: torch.cuda.mem_get_info()[0]
        )
        self.stats.feature_store = kind
        return kind

    def _edit_frames(
        self, clip: ClipContext, anchor_rgb: np.ndarray, clip_depths: list | None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The frame loop over the plan's turns. From one turn to the next carry only ``bank``,
        ``predictions``, ``waiting``, ``self.frames_done`` and the unused rest of ``clip_depths``."""
        plan = clip.plan
        bank = FeatureBank(plan, FeatureStore(clip.feature_store, clip.pipeline.device))
        predictions: dict[int, list] = {}  # x0 at each updated step, of frames a later update pulls towards
        waiting: dict[int, torch.Tensor] = {}  # edited latents, until every frame before them is out
        due = plan.output_order()
        for turn in plan.turns:
            rgb = anchor_rgb if turn.index == plan.anchor else self._work_frame(turn.index, clip.work_size)
            model_depth = self._model_depth(clip, turn, rgb, clip_depths)
            start = self._inverted(clip, turn, rgb, model_depth)
            latent, x0_trajectory = self._denoise(clip, bank, turn, start, model_depth, predictions.get(turn.previous))
            if turn.keep_x0:
                predictions[turn.index] = x0_trajectory
            if turn.previous is not None and plan.last_pull.get(turn.previous) == turn.position:
                del predictions[turn.previous]
            waiting[turn.index] = latent
            while due and due[0] in waiting:
                index = due.pop(0)
                edited = self._decode(clip, waiting.pop(index))
                self.frames_done += 1
                self.stats.frames = self.frames_done
                yield index, edited

    # -- depth and prompts --------------------------------------------------------------------

    def _work_frame(self, index: int, work_size: tuple[int, int]) -> np.ndarray:
        return resize_rgb(self.frames.read(index), work_size)

    def _inverse_depth(
        self, pipeline: DepthPipeline, latent_hw: tuple[int, int], index: int, rgb: np.ndarray
    ) -> np.ndarray:
        if self.depth_files is not None:
            return depth_conv.zpass_to_inverse_depth(self.depth_files.read(index), latent_hw, f"depth of frame {index}")
        return depth_conv.estimate_inverse_depth(pipeline, rgb, latent_hw)

    def _clip_inverse_depths(
        self, pipeline: DepthPipeline, work_size: tuple[int, int], latent_hw: tuple[int, int]
    ) -> list[np.ndarray]:
        """Every frame's inverse depth at latent size (small), for the clip's range and for later."""
        maps = []
        for index in range(self.count):
            self._check_cancel()
            rgb = self._work_frame(index, work_size)
            maps.append(self._inverse_depth(pipeline, latent_hw, index, rgb))
            self.report("depth", index + 1, self.count)
        return maps

    def _model_depth(self, clip: ClipContext, turn: Turn, rgb: np.ndarray, clip_depths: list | None) -> torch.Tensor:
        """The (1, 1, h, w) depth the UNet sees, in [-1, 1]; also given to the depth sink."""
        index = turn.index
        inverse = clip_depths[index] if clip_depths is not None else None
        if inverse is not None:
            clip_depths[index] = None  # used once; frees as the clip goes
        else:
            inverse = self._inverse_depth(clip.pipeline, clip.latent_hw, index, rgb)
            self.report("depth", turn.position + 1, self.edited)
        model_depth = self._normalised(clip, index, inverse)
        if self.depth_sink is not None:
            self.depth_sink(index, depth_conv.to_display(model_depth).astype(np.float32))
        return depth_tensor(clip.pipeline, model_depth)

    @staticmethod
    def _normalised(clip: ClipContext, index: int, inverse: np.ndarray) -> np.ndarray:
        """Inverse depth in [-1, 1], by the clip's range or, without one, the frame's own."""
        if clip.depth_range is not None:
            low, high = clip.depth_range
        else:
            low, high = depth_conv.depth_range([inverse], f"depth of frame {index}")
        return depth_conv.normalise(inverse, low, high)

    def _source_prompt(self, anchor_rgb: np.ndarray) -> str:
        """The given source prompt, else a caption of the anchor (the frame a preview also sees)."""
        if self.settings.source_prompt is not None:
            return self.settings.source_prompt
        self.report("caption", 0, 1)

        def caption() -> tuple[str, float]:
            captioner, loaded = load_captioner(
                self.settings.captioner, self.settings.device, progress=self._download_progress, warn=self.warn
            )
            return caption_frame(captioner, anchor_rgb), captioner.load_seconds if loaded else 0.0

        text, load_seconds = self._interruptible(caption, "caption")
        self.stats.model_load_seconds += load_seconds
        self.report("caption", 1, 1)
        return text

    def _embed(self, pipeline: DepthPipeline, prompt: str, guided: bool) -> torch.Tensor:
        """Text embeddings; guided ones are [unconditional (the negative prompt), conditional]."""
        return embed_prompt(pipeline, prompt, guided, self.settings.negative_prompt if guided else None)

    # -- inversion ----------------------------------------------------------------------------

    def _inverted(self, clip: ClipContext, turn: Turn, rgb: np.ndarray, model_depth: torch.Tensor) -> torch.Tensor:
        """x_T of this frame, from the cache when the same frame was inverted before."""
        pipeline, steps, position = clip.pipeline, self.settings.steps, turn.position
        key = self._inversion_key(clip, rgb, model_depth)
        cached = clip.inversion_cache.load(key)
        expected = (1, pipeline.unet.config.out_channels, *clip.latent_hw)
        if cached is not None and cached.shape == expected:
            self.stats.inversion_cache_hits += 1
            self.report("inversion", (position + 1) * steps, self.edited * steps)
            return torch.from_numpy(cached).to(pipeline.device)

        def before_step(step: int) -> None:
            self._check_cancel()
            self.report("inversion", position * steps + step, self.edited * steps)

        with self._counting(pipeline.unet, "unet_calls_inversion"):
            start = invert_frame(
                pipeline, rgb, model_depth, clip.source_embedding(), clip.inverse_scheduler, before_step
            )
        self.report("inversion", (position + 1) * steps, self.edited * steps)
        clip.inversion_cache.store(key, start.cpu().numpy())
        return start

    def _inversion_key(self, clip: ClipContext, rgb: np.ndarray, model_depth: torch.Tensor) -> str:
        pipeline = clip.pipeline
        return inversion_key(
            rgb,
            model_depth.float().cpu().numpy(),
            pipeline.fingerprint,
            clip.source_prompt,
            self.settings.steps,
            pipeline.device,
            dtype_name(pipeline.dtype),
        )

    def _announce_inversions(self, clip: ClipContext, anchor_rgb: np.ndarray, clip_depths: list | None) -> list:
        """Tell the shared inversions every frame this edit will invert, in the plan's order, so
        idle processes start on them now. Each frame's inverse depth is computed here once and
        kept for its turn (the clip's, or with per-frame normalisation the frame's own)."""
        pipeline, plan = clip.pipeline, clip.plan
        depths = clip_depths if clip_depths is not None else [None] * self.count
        requests = []
        for position, turn in enumerate(plan.turns):
            self._check_cancel()
            index = turn.index
            rgb = anchor_rgb if index == plan.anchor else self._work_frame(index, clip.work_size)
            if depths[index] is None:
                depths[index] = self._inverse_depth(pipeline, clip.latent_hw, index, rgb)
                self.report("depth", position + 1, self.edited)
            model_depth = self._normalised(clip, index, depths[index])
            key = self._inversion_key(clip, rgb, depth_tensor(pipeline, model_depth))
            if not clip.inversion_cache.has(key):
                requests.append(InversionRequest(key=key, index=index, model_depth=model_depth))
        spec = InversionSpec(
            settings=self.settings.to_wire(),
            work_size=clip.work_size,
            source_prompt=clip.source_prompt,
            fingerprint=pipeline.fingerprint,
            device=pipeline.device,
            dtype=dtype_name(pipeline.dtype),
        )
        self.shared.announce(spec, requests)
        return depths

    # -- the edit -----------------------------------------------------------------------------

    def _denoise(
        self,
        clip: ClipContext,
        bank: FeatureBank,
        turn: Turn,
        start: torch.Tensor,
        model_depth: torch.Tensor,
        previous_x0: list | None,
    ) -> tuple[torch.Tensor, list | None]:
        """Sample the turn's frame from its inverted noise with injection and the guided update.

        Returns the clean latent and this frame's x0 predictions (None unless a later frame's
        update pulls towards them).
        """
        settings = self.settings
        last_update = settings.last_update_step()
        keep_x0 = turn.keep_x0
        guided_update = settings.update != "off" and previous_x0 is not None
        delta = size_scaled_delta(settings.update_delta, start.numel())  # the paper's pull at any size
        depth_pair = torch.cat([model_depth] * 2)
        x0_trajectory = []
        sample = start
        bank.begin_turn(turn)
        unet = clip.pipeline.unet
        position = turn.position
        with self._counting(unet, "unet_calls_edit"), injection_installed(unet, clip.layers, bank):
            for step, timestep in enumerate(clip.scheduler.timesteps):
                self._check_cancel()
                self.report("edit", position * settings.steps + step, self.edited * settings.steps)
                bank.step = step
                update_now = guided_update and step <= last_update
                if update_now and settings.update == "autograd":
                    sample_in = sample.detach().requires_grad_(True)
                    with torch.enable_grad():
                        prev_sample, x0_hat = self._ddim_step(clip, sample_in, timestep, depth_pair)
                        gradient = autograd_gradient(sample_in, x0_hat, previous_x0[step])
                    prev_sample, x0_hat = prev_sample.detach(), x0_hat.detach()
                else:
                    with torch.no_grad():
                        prev_sample, x0_hat = self._ddim_step(clip, sample, timestep, depth_pair)
                    if update_now:
                        gradient = x0_gradient(x0_hat, previous_x0[step])
                if update_now:
                    prev_sample = apply_update(prev_sample, gradient, delta)
                if keep_x0 and step <= last_update:
                    x0_trajectory.append(x0_hat)
                sample = prev_sample
                bank.end_step()
        bank.end_turn()
        self.stats.feature_cache_bytes = bank.peak_bytes
        self.report("edit", (position + 1) * settings.steps, self.edited * settings.steps)
        return sample, (x0_trajectory if keep_x0 else None)

    def _ddim_step(self, clip: ClipContext, sample, timestep, depth_pair):
        """One DDIM (eta 0) step with classifier-free guidance batched into one UNet call."""
        pipeline = clip.pipeline
        model_input = torch.cat([torch.cat([sample] * 2).to(pipeline.dtype), depth_pair], dim=1)
        noise = pipeline.unet(model_input, timestep, encoder_hidden_states=clip.edit_embedding).sample
        unconditional, conditional = noise.float().chunk(2)
        guided = unconditional + self.settings.guidance * (conditional - unconditional)
        out = clip.scheduler.step(guided, timestep, sample, eta=0.0)
        return out.prev_sample, out.pred_original_sample

    def _decode(self, clip: ClipContext, latent: torch.Tensor) -> np.ndarray:
        pipe = clip.pipeline.pipe
        with torch.no_grad():
            image = pipe.vae.decode((latent / pipe.vae.config.scaling_factor).to(clip.pipeline.dtype)).sample
        array = pipe.image_processor.postprocess(image, output_type="np")[0]
        rgb = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return resize_rgb(rgb, tuple(self.frames.size))

    # -- bookkeeping --------------------------------------------------------------------------

    def _download_progress(self, stage: str, done: int, total: int) -> None:
        """A model being downloaded reports bytes like any stage, and stops when the job is cancelled."""
        self._check_cancel()
        self.report(stage, done, total)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise EditCancelled(self.frames_done)

    def _interruptible(self, work: Callable, name: str):
        """``work()``, in a worker thread while this one watches the cancel flag: a cancel (or a
        client hang-up) takes effect within ``CANCEL_POLL`` even while a model loads from disk or
        BLIP captions, neither of which can be stopped midway. The abandoned work finishes on its
        own; a model it loads lands in the warm cache for the next job."""
        if self.cancel is None:
            return work()
        self._check_cancel()
        outcome: dict = {}
        finished = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc
            finally:
                finished.set()

        threading.Thread(target=run, name=f"p2v-{name}", daemon=True).start()
        while not finished.wait(CANCEL_POLL):
            self._check_cancel()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    @contextlib.contextmanager
    def _counting(self, unet, field: str):
        """Count real UNet forward calls (a hook on the module) into ``stats.<field>``."""

        def count(module, args):
            setattr(self.stats, field, getattr(self.stats, field) + 1)
            self.stats.unet_calls += 1

        handle = unet.register_forward_pre_hook(count)
        try:
            yield
        finally:
            handle.remove()

    def _out_of_memory_message(self) -> str:
        s = self.settings
        hints = [f"lower --size (now {s.size})"]
        if self.stats.feature_store == "gpu" and s.injection != "none":
            hints.append("use --feature-store cpu (recorded features in host memory)")
        if s.update == "autograd":
            hints.append("use --update x0 (no backward pass)")
        if s.layers == "all":
            hints.append("use --layers decoder")
        if s.dtype != "fp16":
            hints.append("use --dtype fp16")
        return "out of GPU memory: " + ", or ".join(hints)

    def _finish_stats(self, started: float) -> None:
        self.stats.seconds = time.perf_counter() - started
        self.stats.frames = self.frames_done
        self.stats.seconds_per_frame = self.stats.seconds / self.frames_done if self.frames_done else None
        self.stats.peak_rss_bytes = peak_rss_bytes()
        if self.stats.device == "cuda":  # set once the model is loaded, on the edit's device
            self.stats.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())


def depth_tensor(pipeline: DepthPipeline, model_depth: np.ndarray) -> torch.Tensor:
    """The (1, 1, h, w) model depth on the device, in the model's dtype (what the UNet is given)."""
    return torch.from_numpy(model_depth)[None, None].to(pipeline.device, pipeline.dtype)


def choose_feature_store(setting: str, device: str, needed: int, free_memory: Callable[[], int]) -> str:
    """``gpu`` or ``cpu`` for ``--feature-store``. ``auto`` keeps the features on a CUDA device when
    ``needed`` (the plan's peak of recorded features) is at most half its free memory, the other
    half being left to activations and decoding; elsewhere the device's memory is the host's (CPU)
    or shared with it (MPS), so they stay where they are."""
    if setting != "auto":
        return setting
    if device != "cuda":
        return "gpu"
    return "gpu" if needed <= free_memory() // 2 else "cpu"


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS).

    On Linux the high-water mark of this process's own memory (``VmHWM``) comes first:
    ``ru_maxrss`` also counts the parent's resident size at the moment it started this process
    (Linux carries it across exec), so a runtime started by Blender would report Blender's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except (ImportError, AttributeError):
            return None
