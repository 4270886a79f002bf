"""Foreground mask: air slices found, body kept with its margin, zero and Rician backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medidiff.physics.foreground import air_noise_sigma, foreground_mask


def _disk_stack(n: int = 8, size: int = 64, body_slices=(3, 4), radius: int = 14) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
    texture = 0.6 + 0.4 * np.cos(xx / 3.0) ** 2  # tissue contrast inside the body
    stack = np.zeros((n, size, size), np.float32)
    for i in body_slices:
        stack[i] = disk * texture
    return stack


def test_zero_background_body_kept_with_exact_margin():
    stack = _disk_stack()
    mask = foreground_mask(stack, margin=3, slice_margin=1)
    body = stack > 0
    assert mask[body].all()
    # box margin: exactly the pixels within chessboard distance 3 of the body
    dist = ndimage.distance_transform_cdt(~body[3], metric="chessboard")
    np.testing.assert_array_equal(mask[3], dist <= 3)
    air = ~mask.any(axis=(1, 2))
    np.testing.assert_array_equal(np.flatnonzero(air), [0, 1, 6, 7])  # 2 and 5 kept as slice margin


def test_rician_noise_floor_background():
    rng = np.random.default_rng(0)
    clean = _disk_stack(n=6, body_slices=(2, 3))
    sigma = 0.02
    noisy = np.abs(clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)))
    assert air_noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    mask = foreground_mask(noisy, margin=2, slice_margin=0)
    assert mask[clean > 0].all()
    far = ndimage.distance_transform_cdt(clean[2] == 0, metric="chessboard") > 3
    assert not mask[2][far].any()  # no noise speckle survives away from the body
    np.testing.assert_array_equal(np.flatnonzero(~mask.any(axis=(1, 2))), [0, 1, 4, 5])


def test_air_inside_the_body_stays_with_it():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    ring = ((r2 < 20**2) & (r2 >= 10**2)).astype(np.float32)  # a lung-like hole of air inside
    mask = foreground_mask(ring[None], margin=0, slice_margin=0)
    assert mask[0][r2 < 10**2].all()


def test_complex_input_and_empty_and_bad_shape():
    stack = _disk_stack().astype(np.complex64) * np.exp(1j * 0.7)
    np.testing.assert_array_equal(foreground_mask(stack), foreground_mask(np.abs(stack)))
    assert not foreground_mask(np.zeros((3, 16, 16), np.float32)).any()
    with pytest.raises(ValueError, match="slices"):
        foreground_mask(np.ones((16, 16), np.float32))
