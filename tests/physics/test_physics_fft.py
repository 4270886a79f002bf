"""Centred orthonormal FFT against numpy.fft with norm='ortho'."""

import numpy as np
import torch

from medidiff.physics.fft import fft2c, fft2c_np, ifft2c, ifft2c_np


def _reference_fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def test_fft2c_matches_numpy_ortho_even_and_odd_sizes():
    rng = np.random.default_rng(0)
    for shape in [(2, 16, 12), (3, 15, 9)]:
        x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        expected = _reference_fft2c(x)
        np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(fft2c_np(x), expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ifft2c(fft2c(torch.from_numpy(x))).numpy(), x, atol=1e-10)
        np.testing.assert_allclose(ifft2c_np(fft2c_np(x)), x, atol=1e-10)


def test_fft2c_is_unitary_and_dc_at_centre():
    x = torch.ones(8, 10, dtype=torch.float64)
    k = fft2c(x)
    assert torch.isclose(k[4, 5].real, torch.tensor(np.sqrt(80.0), dtype=torch.float64))
    assert float(k.abs().sum() - k[4, 5].abs()) < 1e-9
    y = torch.randn(8, 10, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    assert abs(float(torch.linalg.norm(fft2c(y)) - torch.linalg.norm(y))) < 1e-10
