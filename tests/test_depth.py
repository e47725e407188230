"""Depth conventions: Z pass to inverse depth, clip vs frame normalisation, the background."""

from __future__ import annotations

import numpy as np
import pytest

from p2v_runtime.depth import depth_range, normalise, zpass_to_inverse_depth
from p2v_runtime.errors import InputError


def zpass(nearest: float, farthest: float) -> np.ndarray:
    z = np.full((64, 64), 1e10, np.float32)  # Blender's background
    z[32:, :32] = nearest
    z[32:, 32:] = farthest
    return z


def test_background_is_the_clips_farthest_surface_in_every_frame():
    # Frame 0's farthest surface is at 4, frame 1's at 8: with clip normalisation both
    # backgrounds must be the clip's farthest (-1), not each frame's own.
    maps = [zpass_to_inverse_depth(zpass(2.0, far), (8, 8)) for far in (4.0, 8.0)]
    low, high = depth_range(maps)
    assert low == pytest.approx(1 / 8) and high == pytest.approx(1 / 2)
    normalised = [normalise(m, low, high) for m in maps]
    assert normalised[0][0, 0] == normalised[1][0, 0] == -1.0
    assert normalised[0][7, 7] > -1.0  # frame 0's far surface (4) is nearer than the clip's (8)
    assert normalised[0][7, 0] == pytest.approx(1.0)  # the nearest surface


def test_per_frame_normalisation_spans_each_frame():
    inverse = zpass_to_inverse_depth(zpass(2.0, 4.0), (8, 8))
    normalised = normalise(inverse, *depth_range([inverse]))
    assert normalised.min() == -1.0 and normalised.max() == pytest.approx(1.0)


def test_inverse_depth_ratio_and_background_marking():
    inverse = zpass_to_inverse_depth(zpass(2.0, 4.0), (8, 8))
    assert np.isnan(inverse[:3]).all()  # background rows
    assert inverse[7, 0] / inverse[7, 7] == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize(
    "bad, message",
    [(np.nan, "NaN"), (-np.inf, "-inf"), (0.0, "zero"), (-1.0, "negative")],
)
def test_bad_zpass_values_are_refused(bad, message):
    z = zpass(2.0, 4.0)
    z[40, 40] = bad
    with pytest.raises(InputError, match=message):
        zpass_to_inverse_depth(z, (8, 8))


def test_all_background_is_refused():
    with pytest.raises(InputError, match="background"):
        zpass_to_inverse_depth(np.full((16, 16), np.inf, np.float32), (8, 8))


def test_constant_depth_is_refused():
    with pytest.raises(InputError, match="constant"):
        depth_range([np.full((8, 8), 0.5, np.float32)])
