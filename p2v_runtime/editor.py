"""The per-clip orchestration of Pix2Video: a generator that yields edited frames in order.

Per clip: depth for every frame (clip-wide normalisation needs them all first), a caption of the
first frame for the source prompt. Then per frame, in order: DDIM inversion (or a cache hit),
denoising with the edit prompt, feature injection from the anchor and previous frames and the
guided update towards the previous frame's prediction, decoding. Each frame is yielded as soon
as it exists; memory holds only the anchor's and the previous frame's features and predictions,
whatever the clip length.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import depth as depth_conv
from .errors import EditCancelled, GpuOutOfMemory, InputError
from .protocol import EditStats, Frames
from .settings import EditSettings

ProgressCallback = Callable[[str, int, int], None]


def edit_clip(
    frames: Frames,
    settings: EditSettings,
    *,
    depth: Frames | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    stats: EditStats | None = None,
    save_depth_dir: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Edit a clip with Pix2Video; yield ``(index, HxWx3 uint8 RGB)`` at the input size, in order.

    ``frames`` has ``__len__``, ``size`` (width, height) and ``read(i)``; ``depth`` (optional)
    reads a Z pass per frame. Setting ``cancel`` stops within one denoising step with
    :class:`EditCancelled`.
    """
    settings.validate()
    editor = _ClipEditor(frames, settings, depth, progress, cancel, stats or EditStats(), save_depth_dir, warn)
    yield from editor.run()


class _ClipEditor:
    """State of one clip's edit; only ``edit_clip`` creates it."""

    def __init__(self, frames, settings, depth, progress, cancel, stats, save_depth_dir, warn):
        self.frames = frames
        self.settings = settings
        self.depth_files = depth
        self.report = progress or (lambda stage, done, total: None)
        self.cancel = cancel
        self.stats = stats
        self.save_depth_dir = Path(save_depth_dir) if save_depth_dir else None
        self.warn = warn or (lambda message: print(f"p2v: {message}", file=sys.stderr))
        self.frames_done = 0
        self.count = len(frames)

    # -- the clip -----------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[int, np.ndarray]]:
        import torch

        started = time.perf_counter()
        try:
            self._check_inputs()
            self._load()
            yield from self._edit_frames()
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
        if self.save_depth_dir is not None:
            try:
                self.save_depth_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create --save-depth folder {self.save_depth_dir}: {exc.strerror}") from exc

    def _load(self) -> None:
        import torch

        from .frames import working_size
        from .inversion import InversionCache, default_cache_dir
        from .models import dtype_name, load_depth_pipeline

        self.report("load", 0, 1)
        self.pipeline, loaded = load_depth_pipeline(self.settings.model, self.settings.device, self.settings.dtype)
        if loaded:
            self.stats.model_load_seconds += self.pipeline.load_seconds
        self.report("load", 1, 1)
        self.stats.device = self.pipeline.device
        self.stats.dtype = dtype_name(self.pipeline.dtype)
        self.stats.steps = self.settings.steps
        self.stats.depth_source = "file" if self.depth_files is not None else "estimate"
        width, height = working_size(*self.frames.size, self.settings.size)
        scale = self.pipeline.pipe.vae_scale_factor
        self.work_size = (width, height)
        self.latent_hw = (height // scale, width // scale)
        self.stats.working_size = self.work_size
        cache_dir = self.settings.cache_dir or default_cache_dir()
        self.cache = InversionCache(cache_dir, warn=self.warn)
        if self.pipeline.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _edit_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        from .attention import FeatureBank, self_attention_layers
        from .inversion import ddim_schedulers

        clip_range = self._clip_depth_range() if self.settings.depth_norm == "clip" else None
        self._check_cancel()  # loading and depth can take long; the caption cannot be interrupted
        first = self._work_frame(0)
        source_prompt = self._source_prompt(first)
        self.stats.source_prompt = source_prompt
        self.source_embedding = self._embed(source_prompt, guided=False)
        self.edit_embedding = self._embed(self.settings.prompt, guided=True)
        self.scheduler, self.inverse_scheduler = ddim_schedulers(self.pipeline, self.settings.steps)
        self.bank = FeatureBank(self.settings.injection)
        self.layers = self_attention_layers(self.pipeline.unet, self.settings.layers)
        self.previous_x0: list | None = None
        for index in range(self.count):
            rgb = first if index == 0 else self._work_frame(index)
            model_depth = self._model_depth(index, rgb, clip_range)
            start = self._inverted(index, rgb, model_depth)
            latent = self._denoise(index, start, model_depth)
            edited = self._decode(latent)
            self.frames_done += 1
            self.stats.frames = self.frames_done
            yield index, edited

    # -- depth and prompts --------------------------------------------------------------------

    def _work_frame(self, index: int) -> np.ndarray:
        from .frames import resize_rgb

        return resize_rgb(self.frames.read(index), self.work_size)

    def _inverse_depth(self, index: int, rgb: np.ndarray) -> np.ndarray:
        if self.depth_files is not None:
            return depth_conv.zpass_to_inverse_depth(self.depth_files.read(index), self.latent_hw, f"depth of frame {index}")
        return depth_conv.estimate_inverse_depth(self.pipeline, rgb, self.latent_hw)

    def _clip_depth_range(self) -> tuple[float, float]:
        """Min and max inverse depth over the clip; keeps the small latent-size maps for later."""
        self.inverse_depths = []
        for index in range(self.count):
            self._check_cancel()
            rgb = self._work_frame(index)
            self.inverse_depths.append(self._inverse_depth(index, rgb))
            self.report("depth", index + 1, self.count)
        return depth_conv.depth_range(self.inverse_depths, "clip")

    def _model_depth(self, index: int, rgb: np.ndarray, clip_range):
        """The (1, 1, h, w) depth the UNet sees, in [-1, 1]; also written for --save-depth."""
        import torch

        if clip_range is not None:
            inverse, (low, high) = self.inverse_depths[index], clip_range
            self.inverse_depths[index] = None  # used once; frees as the clip goes
        else:
            inverse = self._inverse_depth(index, rgb)
            low, high = depth_conv.depth_range([inverse], f"depth of frame {index}")
            self.report("depth", index + 1, self.count)
        model_depth = depth_conv.normalise(inverse, low, high)
        if self.save_depth_dir is not None:
            from .frames import write_depth_png

            write_depth_png(self.save_depth_dir / f"{index:06d}.png", depth_conv.to_display(model_depth))
        return torch.from_numpy(model_depth)[None, None].to(self.pipeline.device, self.pipeline.dtype)

    def _source_prompt(self, first: np.ndarray) -> str:
        if self.settings.source_prompt is not None:
            return self.settings.source_prompt
        from .caption import caption_frame
        from .models import load_captioner

        self.report("caption", 0, 1)
        captioner, loaded = load_captioner(self.settings.captioner, self.settings.device)
        if loaded:
            self.stats.model_load_seconds += captioner.load_seconds
        caption = caption_frame(captioner, first)
        self.report("caption", 1, 1)
        return caption

    def _embed(self, prompt: str, guided: bool):
        """Text embeddings; guided ones are [unconditional (the negative prompt), conditional]."""
        import torch

        with torch.no_grad():
            positive, negative = self.pipeline.pipe.encode_prompt(
                prompt, self.pipeline.device, 1, guided, negative_prompt=self.settings.negative_prompt if guided else None
            )
        return torch.cat([negative, positive]) if guided else positive

    # -- inversion ----------------------------------------------------------------------------

    def _inverted(self, index: int, rgb: np.ndarray, model_depth):
        """x_T of this frame, from the cache when the same frame was inverted before."""
        import torch

        from .inversion import encode_latent, inversion_key, invert

        steps = self.settings.steps
        key = inversion_key(
            rgb,
            model_depth.float().cpu().numpy(),
            self.pipeline.fingerprint,
            self.stats.source_prompt,
            steps,
            self.pipeline.device,
            self.stats.dtype,
        )
        cached = self.cache.load(key)
        expected = (1, self.pipeline.unet.config.out_channels, *self.latent_hw)
        if cached is not None and cached.shape == expected:
            self.stats.inversion_cache_hits += 1
            self.report("inversion", (index + 1) * steps, self.count * steps)
            return torch.from_numpy(cached).to(self.pipeline.device)

        def before_step(step: int) -> None:
            self._check_cancel()
            self.report("inversion", index * steps + step, self.count * steps)

        with self._counting("unet_calls_inversion"):
            latent = encode_latent(self.pipeline, rgb)
            start = invert(self.pipeline, latent, model_depth, self.source_embedding, self.inverse_scheduler,
                           before_step)
        self.report("inversion", (index + 1) * steps, self.count * steps)
        self.cache.store(key, start.cpu().numpy())
        return start

    # -- the edit -----------------------------------------------------------------------------

    def _denoise(self, index: int, start, model_depth):
        """Sample frame ``index`` from its inverted noise with injection and the guided update."""
        import torch

        from .attention import injection_installed
        from .guidance import apply_update, autograd_gradient, x0_gradient

        settings = self.settings
        last_update = settings.last_update_step()
        keep_x0 = settings.update != "off"  # the next frame's update needs this frame's predictions
        guided_update = keep_x0 and index > 0 and self.previous_x0 is not None
        depth_pair = torch.cat([model_depth] * 2)
        x0_trajectory = []
        sample = start
        self.bank.begin_frame(index)
        with self._counting("unet_calls_edit"), injection_installed(self.pipeline.unet, self.layers, self.bank):
            for step, timestep in enumerate(self.scheduler.timesteps):
                self._check_cancel()
                self.report("edit", index * settings.steps + step, self.count * settings.steps)
                self.bank.step = step
                update_now = guided_update and step <= last_update
                if update_now and settings.update == "autograd":
                    sample_in = sample.detach().requires_grad_(True)
                    with torch.enable_grad():
                        prev_sample, x0_hat = self._ddim_step(sample_in, timestep, depth_pair)
                        gradient = autograd_gradient(sample_in, x0_hat, self.previous_x0[step])
                    prev_sample, x0_hat = prev_sample.detach(), x0_hat.detach()
                else:
                    with torch.no_grad():
                        prev_sample, x0_hat = self._ddim_step(sample, timestep, depth_pair)
                    if update_now:
                        gradient = x0_gradient(x0_hat, self.previous_x0[step])
                if update_now:
                    prev_sample = apply_update(prev_sample, gradient, settings.update_delta)
                if keep_x0 and step <= last_update:
                    x0_trajectory.append(x0_hat)
                sample = prev_sample
        self.bank.end_frame(index)
        self.stats.feature_cache_bytes = self.bank.peak_bytes
        self.previous_x0 = x0_trajectory if keep_x0 else None
        self.report("edit", (index + 1) * settings.steps, self.count * settings.steps)
        return sample

    def _ddim_step(self, sample, timestep, depth_pair):
        """One DDIM (eta 0) step with classifier-free guidance batched into one UNet call."""
        import torch

        model_input = torch.cat([torch.cat([sample] * 2).to(self.pipeline.dtype), depth_pair], dim=1)
        noise = self.pipeline.unet(model_input, timestep, encoder_hidden_states=self.edit_embedding).sample
        unconditional, conditional = noise.float().chunk(2)
        guided = unconditional + self.settings.guidance * (conditional - unconditional)
        out = self.scheduler.step(guided, timestep, sample, eta=0.0)
        return out.prev_sample, out.pred_original_sample

    def _decode(self, latent) -> np.ndarray:
        import torch

        from .frames import resize_rgb

        pipe = self.pipeline.pipe
        with torch.no_grad():
            image = pipe.vae.decode((latent / pipe.vae.config.scaling_factor).to(self.pipeline.dtype)).sample
        array = pipe.image_processor.postprocess(image, output_type="np")[0]
        rgb = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return resize_rgb(rgb, tuple(self.frames.size))

    # -- bookkeeping --------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise EditCancelled(self.frames_done)

    @contextlib.contextmanager
    def _counting(self, field: str):
        """Count real UNet forward calls (a hook on the module) into ``stats.<field>``."""

        def count(module, args):
            setattr(self.stats, field, getattr(self.stats, field) + 1)
            self.stats.unet_calls += 1

        handle = self.pipeline.unet.register_forward_pre_hook(count)
        try:
            yield
        finally:
            handle.remove()

    def _out_of_memory_message(self) -> str:
        s = self.settings
        hints = [f"lower --size (now {s.size})"]
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
        if getattr(self, "pipeline", None) is not None and self.pipeline.device == "cuda":
            import torch

            self.stats.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
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
