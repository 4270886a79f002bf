"""Coil sensitivity maps: synthetic birdcage-like maps for simulation, ESPIRiT (sigpy) for estimation."""

from __future__ import annotations

import numpy as np

from medidiff.physics.fft import rss


def synthetic_coil_maps(num_coils: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth complex maps ``(C, H, W)`` from coils on a ring around the field of view, sum |S|^2 = 1.

    Each coil has a Gaussian-like magnitude falloff from its position plus a linear phase; the maps are
    normalised so their root-sum-of-squares is 1 everywhere (as ESPIRiT maps are inside the object).
    """
    if num_coils < 1:
        raise ValueError(f"num_coils must be >= 1, got {num_coils}")
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    start = rng.uniform(0, 2 * np.pi)
    maps = []
    for c in range(num_coils):
        angle = start + 2 * np.pi * c / num_coils
        cy, cx = 1.3 * np.sin(angle), 1.3 * np.cos(angle)
        dist2 = (yy - cy) ** 2 + (xx - cx) ** 2
        mag = np.exp(-dist2 / (2 * 0.6**2))
        phase = (
            rng.uniform(-np.pi, np.pi) + 0.5 * rng.standard_normal() * xx + 0.5 * rng.standard_normal() * yy
        )
        maps.append(mag * np.exp(1j * phase))
    maps = np.stack(maps)
    maps /= rss(maps, coil_dim=0)[None]
    return maps.astype(np.complex64)


def espirit_maps(
    kspace: np.ndarray,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    max_iter: int = 100,
) -> np.ndarray:
    """ESPIRiT sensitivity maps ``(C, H, W)`` from multi-coil k-space ``(C, H, W)`` (sigpy, centred FFT).

    ``calib_width`` is the side of the fully sampled central calibration square (clipped to the data).
    Deterministic (sigpy's power iteration starts from ones).
    """
    import sigpy.mri

    kspace = np.asarray(kspace)
    if kspace.ndim != 3:
        raise ValueError(f"ESPIRiT needs multi-coil k-space (C, H, W), got shape {kspace.shape}")
    calib_width = int(min(calib_width, *kspace.shape[1:]))
    maps = sigpy.mri.app.EspiritCalib(
        kspace.astype(np.complex64),
        calib_width=calib_width,
        thresh=thresh,
        kernel_width=min(kernel_width, calib_width),
        crop=crop,
        max_iter=max_iter,
        show_pbar=False,
    ).run()
    return np.asarray(maps).astype(np.complex64)
