"""The paper's three metrics of an edited clip: CLIP-Text, CLIP-Image and Pixel-MSE.

As in the Pix2Video paper's evaluation (docs/algorithm.md, section 5):

- **CLIP-Text**: mean cosine similarity between the CLIP embedding of the edit prompt and that of
  each edited frame (does the clip show what was asked for?).
- **CLIP-Image**: mean cosine similarity of the CLIP image embeddings of consecutive edited
  frames (does the clip stay the same thing from frame to frame?).
- **Pixel-MSE**: optical flow between consecutive *source* frames warps edited frame i onto
  frame i+1; the mean squared error (on 0..255 pixel values) between the warped and the actual
  edited frame i+1, over the pixels that are visible in both frames (does the edit move with the
  video, without flicker?). Pixels the flow cannot follow (occluded or disoccluded, or carried
  outside the frame) are masked by the usual forward-backward consistency check, so a correct
  edit is not blamed for what the source itself hides or reveals.

Why these choices:

- Flow comes from OpenCV (DIS by default, Farneback as an alternative): offline, no weights, so
  the metric runs on any machine, tests included. RAFT (torchvision) is the stronger estimator
  and is offered when torchvision is installed; without it, asking for it is a clear error.
- Flow is computed on the source frames, never on the edit: the edit's own motion is what is
  being judged.
- Edited frames are compared at the source's size and count; a mismatch is an error rather than
  a silent resize, because a resize would blur the very flicker Pixel-MSE measures.
- CLIP (ViT-L/14 by default, the paper's family) and RAFT stay warm in ``models.py``'s cache with
  the other models: ``p2v ablate`` scores six variants, and a server may score many clips,
  without reloading them.
- Frames are read one at a time (CLIP embeddings are batched in small groups), so memory does not
  grow with clip length beyond one small embedding vector per frame.

Importing this module does not import torch, transformers or OpenCV; the functions that need
them do.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .files import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover - models imports torch, which this module defers
    from .models import ClipScorer

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
FLOW_METHODS = ("dis", "farneback", "raft")
DEFAULT_FLOW = "dis"

# Forward-backward consistency (Sundaram, Brox & Keutzer 2010, as used for video style transfer):
# a pixel is trusted when |w + w_back|^2 <= ALPHA_1 (|w|^2 + |w_back|^2) + ALPHA_2.
_CONSISTENCY_ALPHA_1 = 0.01
_CONSISTENCY_ALPHA_2 = 0.5
_CLIP_BATCH = 16


# --------------------------------------------------------------------------------------------
# CLIP-Text and CLIP-Image


def _unit_rows(features) -> np.ndarray:
    """Features as float64 rows of length 1 (transformers 5 wraps them in an output object)."""
    tensor = getattr(features, "pooler_output", features)
    array = tensor.detach().float().cpu().numpy().astype(np.float64)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def image_embeddings(scorer: ClipScorer, frames: Sequence[np.ndarray]) -> np.ndarray:
    """Unit CLIP image embeddings, one row per HxWx3 uint8 frame."""
    import torch

    if len(frames) == 0:
        return np.zeros((0, 0))
    rows = []
    for start in range(0, len(frames), _CLIP_BATCH):
        batch = [np.ascontiguousarray(f) for f in frames[start : start + _CLIP_BATCH]]
        inputs = scorer.processor(images=batch, return_tensors="pt")
        with torch.no_grad():
            features = scorer.model.get_image_features(pixel_values=inputs["pixel_values"].to(scorer.device))
        rows.append(_unit_rows(features))
    return np.concatenate(rows)


def text_embedding(scorer: ClipScorer, prompt: str) -> np.ndarray:
    """Unit CLIP text embedding of ``prompt`` (truncated to CLIP's 77 tokens, as CLIP was trained)."""
    import torch

    inputs = scorer.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
    inputs = {k: v.to(scorer.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        features = scorer.model.get_text_features(**inputs)
    return _unit_rows(features)[0]


def clip_text_scores(image_rows: np.ndarray, text_row: np.ndarray) -> np.ndarray:
    """Cosine of the prompt's embedding with each frame's (rows are unit vectors)."""
    return np.asarray(image_rows, np.float64) @ np.asarray(text_row, np.float64)


def clip_text_score(image_rows: np.ndarray, text_row: np.ndarray) -> float:
    """CLIP-Text: the mean over frames of :func:`clip_text_scores`."""
    return float(np.mean(clip_text_scores(image_rows, text_row)))


def clip_image_scores(image_rows: np.ndarray) -> np.ndarray:
    """Cosine of each frame's embedding with the next frame's; n-1 values for n frames."""
    rows = np.asarray(image_rows, np.float64)
    return np.sum(rows[:-1] * rows[1:], axis=1)


def clip_image_score(image_rows: np.ndarray) -> float | None:
    """CLIP-Image: mean of :func:`clip_image_scores`; None for a one-frame clip (no pairs)."""
    scores = clip_image_scores(image_rows)
    return float(np.mean(scores)) if len(scores) else None


# --------------------------------------------------------------------------------------------
# Pixel-MSE: flow, warp, occlusion mask


def optical_flow(first: np.ndarray, second: np.ndarray, method: str = DEFAULT_FLOW) -> np.ndarray:
    """HxWx2 float32 flow from ``first`` to ``second``: first(p) matches second(p + flow(p)).

    ``flow[..., 0]`` is the x (column) displacement, ``flow[..., 1]`` the y (row) one.
    """
    if first.shape != second.shape:
        raise InputError(f"optical flow needs frames of one size, got {first.shape} and {second.shape}")
    if method == "raft":
        return _raft_flow(first, second)
    import cv2

    a, b = _gray(first), _gray(second)
    if method == "dis":
        # The medium preset stops at a quarter of the resolution; refining down to full resolution
        # costs about 4x (still ~0.2 s a flow at 512x512 on one core) and lowers the warp error of
        # the source itself by a third on the shared DAVIS-like clips: worth it for a metric.
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(0)
        flow = dis.calc(a, b, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0)
    else:
        raise InputError(f"--flow must be one of {', '.join(FLOW_METHODS)}; got {method!r}")
    return np.ascontiguousarray(flow, dtype=np.float32)


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    if rgb.ndim == 2:
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` sampled at p + flow(p) for every pixel p (bilinear), as float32.

    With ``flow`` the flow from frame i+1 to frame i, this carries frame i onto frame i+1.
    Positions outside the image read 0; :func:`inside_mask` says which those are.
    """
    import cv2

    map_x, map_y = _sample_positions(flow)
    source = np.asarray(image, dtype=np.float32)
    return cv2.remap(
        source, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def _sample_positions(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = flow.shape[:2]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    return grid_x + flow[..., 0].astype(np.float32), grid_y + flow[..., 1].astype(np.float32)


def inside_mask(flow: np.ndarray) -> np.ndarray:
    """True where p + flow(p) lies inside the image, so :func:`warp` read real pixels."""
    height, width = flow.shape[:2]
    map_x, map_y = _sample_positions(flow)
    return (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)


def consistent_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """True where the flows agree: following ``backward`` then ``forward`` returns home.

    ``backward`` is the flow from frame i+1 to frame i, ``forward`` the flow from i to i+1; a pixel
    of frame i+1 that is occluded in frame i (or that the flow got wrong) fails the check.
    Pixels carried outside the frame fail too.
    """
    forward_there = warp(forward, backward)
    round_trip = backward + forward_there
    magnitude = np.sum(backward**2, axis=-1) + np.sum(forward_there**2, axis=-1)
    agree = np.sum(round_trip**2, axis=-1) <= _CONSISTENCY_ALPHA_1 * magnitude + _CONSISTENCY_ALPHA_2
    return agree & inside_mask(backward)


def warp_error(
    edited_prev: np.ndarray, edited_next: np.ndarray, backward: np.ndarray, mask: np.ndarray | None = None
) -> float | None:
    """Mean squared error (0..255 values, over channels and the masked pixels) of warped vs actual.

    ``backward`` is the source's flow from frame i+1 to frame i. None when no pixel is usable.
    """
    warped = warp(edited_prev, backward)
    if mask is None:
        mask = inside_mask(backward)
    if not mask.any():
        return None
    difference = warped[mask] - np.asarray(edited_next, dtype=np.float32)[mask]
    return float(np.mean(difference.astype(np.float64) ** 2))


@dataclass
class PairError:
    """Pixel-MSE of one consecutive pair and the share of pixels the mask kept."""

    mse: float | None
    valid_fraction: float


def pair_pixel_mse(
    source_prev: np.ndarray,
    source_next: np.ndarray,
    edited_prev: np.ndarray,
    edited_next: np.ndarray,
    method: str = DEFAULT_FLOW,
) -> PairError:
    """Pixel-MSE of one pair: source flow warps edited_prev onto edited_next, occlusions masked."""
    backward = optical_flow(source_next, source_prev, method)
    forward = optical_flow(source_prev, source_next, method)
    mask = consistent_mask(backward, forward)
    return PairError(warp_error(edited_prev, edited_next, backward, mask), float(mask.mean()))


def pixel_mse(source: Sequence[np.ndarray], edited: Sequence[np.ndarray], method: str = DEFAULT_FLOW) -> float | None:
    """Pixel-MSE of a clip: the mean over consecutive pairs of :func:`pair_pixel_mse`."""
    errors = [
        pair_pixel_mse(source[i], source[i + 1], edited[i], edited[i + 1], method).mse for i in range(len(source) - 1)
    ]
    return _mean(errors)


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


# --------------------------------------------------------------------------------------------
# RAFT (optional)

_RAFT_MIN_SIDE = 128


def _raft_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """RAFT-Large flow from torchvision.

    The frames are padded (edge pixels repeated) to multiples of 8 and at least 128 a side, as
    RAFT's correlation pyramid needs.
    """
    import torch

    model, device = _raft_model()
    height, width = first.shape[:2]
    pad_h = max(_RAFT_MIN_SIDE, height + (-height) % 8) - height
    pad_w = max(_RAFT_MIN_SIDE, width + (-width) % 8) - width

    def tensor(rgb: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return (x / 127.5 - 1.0).to(device)

    with torch.no_grad():
        flows = model(tensor(first), tensor(second))
    flow = flows[-1][0, :, :height, :width].permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(flow, dtype=np.float32)


def raft_available() -> bool:
    """Whether torchvision (and so RAFT) can be imported here."""
    return _torchvision_problem() is None


def _torchvision_problem() -> str | None:
    """Why torchvision's RAFT cannot be used, or None.

    A torchvision built for another torch (e.g. the CUDA wheel beside a CPU torch) fails at import
    with a RuntimeError rather than an ImportError; both mean "no RAFT here".
    """
    try:
        import torchvision.models.optical_flow  # noqa: F401
    except ImportError:
        return "--flow raft needs torchvision (pip install torchvision matching your torch)"
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"--flow raft: torchvision does not load with this torch ({first[:160]}); install the matching build"
    return None


def _raft_model():
    """The warm RAFT and its device; a clear error when torchvision cannot provide it."""
    problem = _torchvision_problem()
    if problem is not None:
        raise InputError(f"{problem}; or use --flow dis or farneback")
    from .models import load_raft, resolve_device

    device = resolve_device("auto")
    model, _ = load_raft(device)
    return model, device


# --------------------------------------------------------------------------------------------
# a whole clip


@dataclass
class ClipMetrics:
    """The three metrics of one edited clip, with their per-frame values (for plots)."""

    clip_text: float
    clip_image: float | None
    pixel_mse: float | None
    frames: int
    size: tuple[int, int]
    prompt: str
    clip_model: str
    flow: str
    valid_fraction: float | None  # mean share of pixels Pixel-MSE kept after the occlusion mask
    seconds: float = 0.0
    per_frame: dict[str, list] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        return {"clip_text": self.clip_text, "clip_image": self.clip_image, "pixel_mse": self.pixel_mse}

    def to_dict(self) -> dict:
        values = asdict(self)
        values["size"] = list(self.size)
        return values


def check_same_shape(source, edited) -> None:
    """Source and edit must have the same frame count and size; say which differs and how."""
    if len(edited) != len(source):
        raise InputError(
            f"the edit has {len(edited)} frame(s) but the source has {len(source)}; compare the same frames "
            "(--frames A:B selects part of the source)"
        )
    if tuple(edited.size) != tuple(source.size):
        raise InputError(
            f"edited frames are {edited.size[0]}x{edited.size[1]} but source frames are "
            f"{source.size[0]}x{source.size[1]}; the metrics compare frames of the same size"
        )


def evaluate_clip(
    source,
    edited,
    prompt: str,
    *,
    clip_model: str = DEFAULT_CLIP_MODEL,
    device: str = "auto",
    flow: str = DEFAULT_FLOW,
    progress: Callable[[int, int], None] | None = None,
) -> ClipMetrics:
    """The metrics of ``edited`` (a clip with ``__len__``, ``size``, ``read``) against ``source``.

    Reads each frame once, keeping only the previous pair and the embeddings.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError('the prompt is empty: give --prompt "the edit prompt the clip was made with"')
    if flow not in FLOW_METHODS:
        raise InputError(f"--flow must be one of {', '.join(FLOW_METHODS)}; got {flow!r}")
    check_same_shape(source, edited)
    if len(source) == 0:
        raise InputError("no frames to evaluate")
    if flow == "raft" and not raft_available():
        _raft_model()  # raises the clear error before any work is done
    from .models import load_clip
    from .progress import ProgressBars

    started = time.perf_counter()
    bars = ProgressBars()  # a CLIP missing from the cache is downloaded: say so, with progress
    try:
        scorer, _ = load_clip(clip_model, device, progress=bars, warn=bars.warn)
    finally:
        bars.close()
    text_row = text_embedding(scorer, prompt)
    rows, pending, pairs = [], [], []
    previous = None
    count = len(source)
    for index in range(count):
        source_frame, edited_frame = source.read(index), edited.read(index)
        if source_frame.shape != edited_frame.shape:
            raise InputError(
                f"frame {index}: edited frame is {edited_frame.shape[1]}x{edited_frame.shape[0]}, "
                f"source frame is {source_frame.shape[1]}x{source_frame.shape[0]}"
            )
        pending.append(edited_frame)
        if len(pending) == _CLIP_BATCH:
            rows.append(image_embeddings(scorer, pending))
            pending = []
        if previous is not None:
            pairs.append(pair_pixel_mse(previous[0], source_frame, previous[1], edited_frame, flow))
        previous = (source_frame, edited_frame)
        if progress is not None:
            progress(index + 1, count)
    if pending:
        rows.append(image_embeddings(scorer, pending))
    image_rows = np.concatenate(rows)
    text_scores = clip_text_scores(image_rows, text_row)
    image_scores = clip_image_scores(image_rows)
    return ClipMetrics(
        clip_text=float(np.mean(text_scores)),
        clip_image=float(np.mean(image_scores)) if len(image_scores) else None,
        pixel_mse=_mean(p.mse for p in pairs),
        frames=count,
        size=tuple(source.size),
        prompt=prompt,
        clip_model=clip_model,
        flow=flow,
        valid_fraction=float(np.mean([p.valid_fraction for p in pairs])) if pairs else None,
        seconds=time.perf_counter() - started,
        per_frame={
            "clip_text": [float(v) for v in text_scores],
            "clip_image": [float(v) for v in image_scores],
            "pixel_mse": [p.mse for p in pairs],
            "valid_fraction": [p.valid_fraction for p in pairs],
        },
    )


def format_number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(metrics: ClipMetrics) -> str:
    """The small table ``p2v eval`` prints."""
    kept = (
        "" if metrics.valid_fraction is None else f", {metrics.valid_fraction:.0%} of pixels pass the occlusion check"
    )
    lines = [
        f"{'metric':<11} {'value':>10}   notes",
        f"{'CLIP-Text':<11} {format_number(metrics.clip_text, 4):>10}   "
        f"{metrics.clip_model}, {metrics.frames} frame(s)",
        f"{'CLIP-Image':<11} {format_number(metrics.clip_image, 4):>10}   consecutive frames",
        f"{'Pixel-MSE':<11} {format_number(metrics.pixel_mse, 2):>10}   flow {metrics.flow}{kept}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# p2v eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import choice_values

    parser.add_argument("--source", required=True, help="the input clip: folder of frames or a video file")
    parser.add_argument("--edited", required=True, help="the edited clip: folder of frames or a video file")
    parser.add_argument("--prompt", required=True, help="the edit prompt (for CLIP-Text)")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"id or folder (default {DEFAULT_CLIP_MODEL})")
    parser.add_argument(
        "--flow",
        default=DEFAULT_FLOW,
        choices=FLOW_METHODS,
        help="optical flow for Pixel-MSE: OpenCV dis (default) or farneback, or raft (torchvision)",
    )
    parser.add_argument("--frames", metavar="A:B", help="compare with source frames A..B-1 (as given to p2v edit)")
    parser.add_argument("--device", default="auto", choices=choice_values("device"))
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON ('-': to stdout, no table)")


def eval_main(args: argparse.Namespace) -> int:
    from .frames import open_frames

    source = open_frames(args.source, args.frames)
    edited = open_frames(args.edited)
    metrics = evaluate_clip(source, edited, args.prompt, clip_model=args.clip_model, device=args.device, flow=args.flow)
    text = json.dumps(metrics.to_dict(), indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return 0
    print(format_table(metrics))
    if args.json:
        try:
            atomic_write_text(args.json, text)
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json}: {exc.strerror or exc}") from None
    return 0
