"""The paper's metrics on cases with known answers, and `p2v eval` end to end on the tiny CLIP."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, ArrayFrames, write_png_clip

from p2v_runtime import metrics
from p2v_runtime.cli import main
from p2v_runtime.errors import InputError


def texture(height: int, width: int) -> np.ndarray:
    """A smooth, non-repeating colour texture: optical flow can lock onto it everywhere."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        np.sin(x / 5.0) + np.cos(y / 7.0),
        np.sin((x + y) / 6.0) + 0.5 * np.cos(x / 11.0),
        np.cos(x / 4.0 - y / 9.0) + 0.5 * np.sin(y / 13.0),
    ]
    return np.clip(np.stack(channels, axis=-1) * 55 + 128, 0, 255).astype(np.uint8)


def panning_clip(count: int = 5, step: int = 2, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """A camera panning right over the texture by ``step`` pixels a frame."""
    big = texture(height + 8, width + 8 + step * count)
    return [np.ascontiguousarray(big[4 : 4 + height, 4 + step * i : 4 + step * i + width]) for i in range(count)]


# --- CLIP-Text and CLIP-Image ----------------------------------------------------------------


def test_clip_text_score_is_the_mean_cosine_with_the_prompt():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    text = np.array([1.0, 0.0])
    np.testing.assert_allclose(metrics.clip_text_scores(rows, text), [1.0, 0.0, np.sqrt(0.5)])
    assert metrics.clip_text_score(rows, text) == pytest.approx((1.0 + np.sqrt(0.5)) / 3)


def test_clip_image_score_averages_consecutive_pairs_only():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(metrics.clip_image_scores(rows), [0.0, 1.0])
    assert metrics.clip_image_score(rows) == pytest.approx(0.5)
    assert metrics.clip_image_score(rows[:1]) is None


@pytest.fixture(scope="module")
def tiny_clip(tiny_models):
    from p2v_runtime.models import load_clip

    return load_clip(str(tiny_models["clip"]), "cpu")[0]


def test_clip_is_loaded_once_per_model_and_device(tiny_models, tiny_clip):
    from p2v_runtime.models import load_clip

    assert load_clip(str(tiny_models["clip"]), "cpu") == (tiny_clip, False)


def test_identical_frames_have_clip_image_one(tiny_clip):
    frame = panning_clip(1)[0]
    rows = metrics.image_embeddings(tiny_clip, [frame] * 4)
    assert rows.shape[0] == 4
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-9)
    assert metrics.clip_image_score(rows) == pytest.approx(1.0, abs=1e-6)


def test_a_frame_of_noise_lowers_clip_image(tiny_clip):
    frames = panning_clip(4)
    noise = np.random.default_rng(0).integers(0, 256, frames[0].shape, dtype=np.uint8)
    smooth = metrics.clip_image_score(metrics.image_embeddings(tiny_clip, frames))
    noisy = metrics.clip_image_score(metrics.image_embeddings(tiny_clip, [*frames[:2], noise, frames[3]]))
    assert noisy < smooth - 1e-3


def test_text_embedding_is_a_unit_vector_of_the_image_size(tiny_clip):
    text = metrics.text_embedding(tiny_clip, "a red sports car")
    image = metrics.image_embeddings(tiny_clip, panning_clip(1))
    assert text.shape == image.shape[1:]
    assert np.linalg.norm(text) == pytest.approx(1.0)
    assert -1.0 <= metrics.clip_text_score(image, text) <= 1.0


# --- flow, warp, occlusion, Pixel-MSE --------------------------------------------------------


def test_warp_with_the_exact_flow_of_a_translation_reproduces_the_next_frame():
    big = texture(60, 80).astype(np.float32)
    dx, dy = 3, -2
    previous = big[10:50, 10:70]
    following = big[10 + dy : 50 + dy, 10 + dx : 70 + dx]  # following(q) = previous(q + (dx, dy))
    flow = np.zeros((*previous.shape[:2], 2), np.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    warped = metrics.warp(previous, flow)
    inside = metrics.inside_mask(flow)
    assert inside.sum() == (60 - dx) * (40 - abs(dy))
    assert np.abs(warped[inside] - following[inside]).max() < 1e-3
    assert metrics.warp_error(previous, following, flow) == pytest.approx(0.0, abs=1e-6)


def test_warp_error_of_a_subpixel_translation_is_small():
    big = texture(60, 80).astype(np.float32)
    previous = big[10:50, 10:70]
    flow = np.full((40, 60, 2), 0.5, np.float32)
    y, x = np.mgrid[0:40, 0:60]
    # Bilinear sampling at half-pixel offsets is the average of four neighbours.
    following = 0.25 * (big[10 + y, 10 + x] + big[11 + y, 10 + x] + big[10 + y, 11 + x] + big[11 + y, 11 + x])
    assert metrics.warp_error(previous, following, flow) < 1e-6


def test_wrong_flow_gives_a_large_warp_error():
    frames = panning_clip(2)
    zero = np.zeros((*frames[0].shape[:2], 2), np.float32)
    assert metrics.warp_error(frames[0], frames[1], zero) > 50


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_optical_flow_recovers_a_pan(method):
    frames = panning_clip(2, step=2)
    backward = metrics.optical_flow(frames[1], frames[0], method)  # frame 1's pixels sit 2 px right in frame 0
    assert backward.shape == (*frames[0].shape[:2], 2) and backward.dtype == np.float32
    interior = backward[8:-8, 8:-8]
    assert np.median(interior[..., 0]) == pytest.approx(2.0, abs=0.25)
    assert np.median(interior[..., 1]) == pytest.approx(0.0, abs=0.25)


def test_consistency_check_masks_pixels_whose_flows_disagree():
    backward = np.zeros((20, 30, 2), np.float32)
    backward[..., 0] = 2.0
    forward = np.zeros_like(backward)
    forward[..., 0] = -2.0
    forward[5:10, 10:20] = 0.0  # what frame i+1 shows there is hidden in frame i
    mask = metrics.consistent_mask(backward, forward)
    assert not mask[:, -2:].any(), "carried outside the frame"
    assert not mask[5:10, 8:18].any(), "forward flow does not return"
    assert mask[12:, :20].all()


def test_pixel_mse_of_an_edit_that_follows_the_source_is_near_zero():
    source = panning_clip(5)
    edited = [255 - frame for frame in source]  # any per-pixel edit moves with the source
    assert metrics.pixel_mse(source, edited) < 5.0


def test_shuffled_frames_score_worse_than_ordered_on_pixel_mse():
    source = panning_clip(6)
    edited = [np.ascontiguousarray(frame[..., ::-1]) for frame in source]
    order = [3, 0, 5, 1, 4, 2]
    ordered = metrics.pixel_mse(source, edited)
    shuffled = metrics.pixel_mse(source, [edited[i] for i in order])
    assert shuffled > 20 * max(ordered, 1.0)


class _BrokenTorchvision:
    """A meta-path finder for a torchvision built for another torch: importing it raises RuntimeError."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.mark.parametrize(
    "torchvision, message",
    [
        ("missing", "--flow raft needs torchvision"),
        ("broken", "torchvision does not load with this torch (operator torchvision::nms does not exist)"),
    ],
)
def test_raft_without_a_working_torchvision_is_a_clear_error(monkeypatch, torchvision, message):
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    if torchvision == "missing":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    else:
        monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    assert not metrics.raft_available()
    frames = panning_clip(2)
    with pytest.raises(InputError) as raised:
        metrics.optical_flow(frames[0], frames[1], "raft")
    assert message in str(raised.value) and "use --flow dis or farneback" in str(raised.value)


class _CoordinateRaft:
    """Stands in for RAFT's network: records its inputs and returns, for the padded size it was
    given, a flow whose x is the column and whose y is 1000 + the row (RAFT returns a list of
    refinements, (N, 2, H, W) each, the last the best)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, first, second):
        import torch

        self.inputs.append((first.clone(), second.clone()))
        _, _, height, width = first.shape
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        best = torch.stack([columns, rows + 1000]).float()[None]
        return [torch.zeros_like(best), best]


@pytest.mark.parametrize("height, width, padded", [(50, 70, (128, 128)), (130, 150, (136, 152))])
def test_raft_flow_pads_normalises_and_crops_back(monkeypatch, height, width, padded):
    """What runs around the network: inputs padded with edge pixels to multiples of 8 and at
    least 128 a side, scaled to [-1, 1], the frames in order; the last refinement cropped back
    to the frame and laid out as (H, W, [x, y])."""
    network = _CoordinateRaft()
    monkeypatch.setattr(metrics, "_raft_model", lambda: (network, "cpu"))
    frames = panning_clip(2, height=height, width=width)
    flow = metrics.optical_flow(frames[0], frames[1], "raft")

    assert flow.shape == (height, width, 2) and flow.dtype == np.float32
    rows, columns = np.mgrid[0:height, 0:width]
    np.testing.assert_array_equal(flow[..., 0], columns)
    np.testing.assert_array_equal(flow[..., 1], rows + 1000)
    assert len(network.inputs) == 1
    for given, frame in zip(network.inputs[0], frames):
        given = given.numpy()
        assert given.shape == (1, 3, *padded)
        expected = frame.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(given[0, :, :height, :width], expected, atol=1e-6)
        # The padding repeats the last row and column.
        np.testing.assert_allclose(given[0, :, height:, :width], np.repeat(expected[:, -1:, :], padded[0] - height, 1))
        np.testing.assert_allclose(given[0, :, :height, width:], np.repeat(expected[:, :, -1:], padded[1] - width, 2))


def test_evaluate_clip_reports_per_frame_values(tiny_models):
    source = panning_clip(4)
    result = metrics.evaluate_clip(
        ArrayFrames(source), ArrayFrames(source), "a red sports car", clip_model=str(tiny_models["clip"]), device="cpu"
    )
    assert result.frames == 4 and result.size == (64, 48)
    assert 0.9 < result.clip_image <= 1.0 + 1e-9
    assert result.pixel_mse < 5.0
    assert len(result.per_frame["clip_text"]) == 4 and len(result.per_frame["pixel_mse"]) == 3
    assert result.clip_text == pytest.approx(np.mean(result.per_frame["clip_text"]))


# --- p2v eval ---------------------------------------------------------------------------------


def test_p2v_eval_end_to_end_writes_json(tiny_models, tmp_path):
    source = panning_clip(4)
    write_png_clip(tmp_path / "source", source)
    write_png_clip(tmp_path / "edited", [255 - f for f in source])
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2v_runtime.cli",
            "eval",
            "--source",
            str(tmp_path / "source"),
            "--edited",
            str(tmp_path / "edited"),
            "--prompt",
            "a red sports car",
            "--clip-model",
            str(tiny_models["clip"]),
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "CLIP-Text" in result.stdout and "Pixel-MSE" in result.stdout
    values = json.loads(out.read_text())
    assert values["frames"] == 4 and values["size"] == [64, 48]
    for name in ("clip_text", "clip_image", "pixel_mse"):
        assert isinstance(values[name], float)
    assert values["pixel_mse"] < 5.0


def test_p2v_eval_compares_with_a_range_of_the_source(tiny_models, tmp_path, capsys):
    source = panning_clip(5)
    write_png_clip(tmp_path / "source", source)
    write_png_clip(tmp_path / "edited", source[1:4])
    code = main(
        [
            "eval",
            "--source",
            str(tmp_path / "source"),
            "--edited",
            str(tmp_path / "edited"),
            "--prompt",
            "a car",
            "--clip-model",
            str(tiny_models["clip"]),
            "--device",
            "cpu",
            "--frames",
            "1:4",
            "--json",
            "-",
        ]
    )
    assert code == 0
    values = json.loads(capsys.readouterr().out)
    assert values["frames"] == 3 and values["pixel_mse"] < 5.0


@pytest.mark.parametrize(
    "edited_frames, message",
    [
        (lambda s: s[:3], "the edit has 3 frame(s) but the source has 4"),
        (lambda s: [f[:32, :48] for f in s], "edited frames are 48x32 but source frames are 64x48"),
    ],
    ids=["frame-count", "frame-size"],
)
def test_p2v_eval_refuses_mismatched_clips(tiny_models, tmp_path, capsys, edited_frames, message):
    source = panning_clip(4)
    write_png_clip(tmp_path / "source", source)
    write_png_clip(tmp_path / "edited", [np.ascontiguousarray(f) for f in edited_frames(source)])
    code = main(
        [
            "eval",
            "--source",
            str(tmp_path / "source"),
            "--edited",
            str(tmp_path / "edited"),
            "--prompt",
            "a car",
            "--clip-model",
            str(tiny_models["clip"]),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("p2v: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_p2v_eval_refuses_an_empty_prompt_and_a_missing_clip_model(tiny_models, tmp_path, capsys):
    write_png_clip(tmp_path / "clip", panning_clip(2))
    common = ["eval", "--source", str(tmp_path / "clip"), "--edited", str(tmp_path / "clip"), "--device", "cpu"]
    assert main([*common, "--prompt", " ", "--clip-model", str(tiny_models["clip"])]) == 1
    assert "prompt is empty" in capsys.readouterr().err
    assert main([*common, "--prompt", "a car", "--clip-model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert "cannot load CLIP model" in err and len(err.strip().splitlines()) == 1
