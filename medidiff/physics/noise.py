"""Noise models: complex Gaussian in k-space (or image space; the FFT is unitary) and Rician magnitude.

``sigma`` is the standard deviation of *each* of the real and imaginary parts. Every function takes an
explicit ``seed`` or generator and never touches global random state.
"""

from __future__ import annotations

import numpy as np
import torch


def _generator(seed: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A seeded torch generator (explicit generator wins)."""
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def add_noise(
    y: torch.Tensor, sigma: float, seed: int | None = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``y`` plus white Gaussian noise: complex (std ``sigma`` per part) for complex ``y``, real otherwise."""
    if sigma <= 0:
        return y.clone()
    g = _generator(seed, generator, y.device)
    if y.is_complex():
        real_dtype = y.real.dtype
        noise = torch.complex(
            torch.randn(y.shape, generator=g, dtype=real_dtype, device=y.device),
            torch.randn(y.shape, generator=g, dtype=real_dtype, device=y.device),
        )
        return y + sigma * noise
    return y + sigma * torch.randn(y.shape, generator=g, dtype=y.dtype, device=y.device)


def rician(
    image: torch.Tensor, sigma: float, seed: int | None = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Magnitude of ``image`` plus complex Gaussian noise: Rician-distributed for a real image."""
    x = image if image.is_complex() else image.to(torch.complex64)
    return add_noise(x, sigma, seed, generator).abs()


def rician_np(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """NumPy Rician magnitude noise with an explicit ``np.random.Generator``; float32 out."""
    if sigma <= 0:
        return np.abs(image).astype(np.float32)
    n1 = rng.standard_normal(image.shape, dtype=np.float32)
    n2 = rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)
