"""Centred orthonormal 2D FFT over the last two dims (fastMRI's ``fft2c`` / ``ifft2c`` convention).

The image centre (index ``N // 2``) is the phase origin and the DC sample sits at index ``N // 2``
of the shifted spectrum: ``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))``. Orthonormal,
so ``ifft2c`` is both the inverse and the adjoint of ``fft2c``.
"""

from __future__ import annotations

import numpy as np
import torch

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT of a (real or complex) tensor over its last two dims."""
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT over the last two dims (inverse and adjoint of ``fft2c``)."""
    k = torch.fft.ifftshift(k, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)


def fft2c_np(x: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`fft2c` (complex64 out for float32/complex64 in)."""
    x = np.fft.ifftshift(x, axes=_DIMS)
    out = np.fft.fftshift(np.fft.fft2(x, axes=_DIMS, norm="ortho"), axes=_DIMS)
    return out.astype(np.complex64 if np.asarray(x).dtype in (np.float32, np.complex64) else out.dtype)


def ifft2c_np(k: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`ifft2c`."""
    k = np.fft.ifftshift(k, axes=_DIMS)
    out = np.fft.fftshift(np.fft.ifft2(k, axes=_DIMS, norm="ortho"), axes=_DIMS)
    return out.astype(np.complex64 if np.asarray(k).dtype in (np.float32, np.complex64) else out.dtype)


def rss(x: torch.Tensor | np.ndarray, coil_dim: int = -3) -> torch.Tensor | np.ndarray:
    """Root-sum-of-squares magnitude over the coil dimension."""
    if isinstance(x, torch.Tensor):
        return torch.sqrt((x.abs() ** 2).sum(dim=coil_dim))
    return np.sqrt((np.abs(x) ** 2).sum(axis=coil_dim))
