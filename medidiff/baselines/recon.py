"""Reconstruction baselines for undersampled k-space: zero-filled and compressed sensing (sigpy L1-wavelet).

Both return a magnitude ``Volume`` ``(H, W, S)`` on the grid of ``KSpaceData.affine``.
Compressed sensing works on k-space divided by ``medidiff.tasks.measurement_scale`` (the 99.5th percentile
of the coil-combined zero-filled image, the normalisation every method shares), so a regularisation weight
tuned on one set of scans (``medidiff.evaluation.tuning``) transfers to others; the output is scaled back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medidiff.io.volume import Volume
from medidiff.physics.fft import ifft2c_np, rss
from medidiff.tasks import measurement_scale

__all__ = [
    "DEFAULT_CS_ITERS",
    "compressed_sensing",
    "cs_slice",
    "zero_filled",
]

DEFAULT_CS_ITERS = 100


def _coil_kspace(data) -> np.ndarray:
    """k-space as ``(S, C, H, W)`` complex64 (single-coil data gets C = 1)."""
    ksp = np.asarray(data.kspace)
    if ksp.ndim == 3:
        ksp = ksp[:, None]
    if ksp.ndim != 4:
        raise ValueError(
            f"k-space of {getattr(data, 'path', '<memory>')} must be (S,H,W) or (S,C,H,W), got {ksp.shape}"
        )
    return ksp.astype(np.complex64, copy=False)


def _mask2d(data, shape_hw: tuple[int, int]) -> np.ndarray:
    """The sampling mask as a float32 (H, W) array; all ones if the file carries none."""
    if data.mask is None:
        measured = np.abs(_coil_kspace(data)).sum(axis=(0, 1)) > 0
        return measured.astype(np.float32)
    return np.broadcast_to(np.asarray(data.mask, dtype=np.float32), shape_hw).copy()


def _zero_filled_stack(ksp: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares magnitude of the centred inverse FFT: ``(S, C, H, W)`` -> ``(S, H, W)``."""
    return rss(ifft2c_np(ksp), coil_dim=1).astype(np.float32)


def _as_volume(stack_shw: np.ndarray, data) -> Volume:
    """``(S, H, W)`` slices -> a ``Volume`` ``(H, W, S)`` on the k-space file's image grid."""
    source_meta = dict(getattr(data, "meta", {}) or {})
    meta = {k: v for k, v in source_meta.items() if isinstance(v, (str, int, float))}
    return Volume(np.ascontiguousarray(np.moveaxis(stack_shw, 0, -1), dtype=np.float32), data.affine, meta)


def zero_filled(data) -> Volume:
    """Zero-filled reconstruction: ``|ifft2c(kspace)|`` per slice, root-sum-of-squares over coils."""
    return _as_volume(_zero_filled_stack(_coil_kspace(data)), data)


def _calib_width(mask_hw: np.ndarray) -> int:
    """Width of the fully sampled block of columns around the k-space centre."""
    cols = mask_hw.max(axis=0) > 0
    c = cols.size // 2
    lo, hi = c, c
    while lo - 1 >= 0 and cols[lo - 1]:
        lo -= 1
    while hi + 1 < cols.size and cols[hi + 1]:
        hi += 1
    return max(hi - lo + 1, 4)


def cs_slice(
    kspace_chw: np.ndarray, mask_hw: np.ndarray, lamda: float, max_iter: int = DEFAULT_CS_ITERS
) -> np.ndarray:
    """L1-wavelet compressed sensing of one slice ``(C, H, W)`` (already scaled); returns ``|x|`` (H, W)."""
    import sigpy as sp
    from sigpy.mri.app import EspiritCalib, L1WaveletRecon

    y = np.asarray(kspace_chw, dtype=np.complex64) * mask_hw[None]
    if y.shape[0] == 1:
        mps = np.ones_like(y)
    else:
        mps = EspiritCalib(y, calib_width=min(24, _calib_width(mask_hw)), show_pbar=False).run()
    weights = np.broadcast_to(mask_hw, y.shape).astype(np.float32)
    x = L1WaveletRecon(y, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False).run()
    return np.abs(sp.to_device(x)).astype(np.float32)


def compressed_sensing(
    data,
    lamda: float,
    max_iter: int = DEFAULT_CS_ITERS,
    progress: Callable[[int, int], None] | None = None,
) -> Volume:
    """sigpy L1-wavelet reconstruction of every slice (ESPIRiT maps for multi-coil data)."""
    ksp = _coil_kspace(data)
    mask = _mask2d(data, ksp.shape[-2:])
    scale = measurement_scale("recon", ksp, coil_dim=1)
    out = np.empty((ksp.shape[0], *ksp.shape[-2:]), np.float32)
    for s in range(ksp.shape[0]):
        out[s] = cs_slice(ksp[s] / scale, mask, lamda, max_iter) * scale
        if progress is not None:
            progress(s + 1, ksp.shape[0])
    return _as_volume(out, data)
