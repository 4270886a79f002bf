"""Classical in-plane super-resolution baselines: sinc (zero-padded k-space) and bicubic interpolation.

Both keep the sampling convention of the physics operator ``KSpaceTruncation``: low-resolution sample
``i`` sits at high-resolution sample ``f·i``, so the high-resolution affine is
``affine_lr @ diag(1/f, 1/f, 1, 1)`` on the in-plane axes and both baselines land on the reference grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from medidiff.io.volume import Volume
from medidiff.physics.operators import KSpaceTruncation

__all__ = [
    "bicubic_upsample",
    "hr_affine_inplane",
    "plane_axes_from_shapes",
    "sinc_upsample",
    "upsample_volume",
]


def sinc_upsample(lr: np.ndarray, factor: int) -> np.ndarray:
    """Zero-padded k-space upsampling of ``(..., h, w)`` slices: the physics ``KSpaceTruncation.pinv``."""
    op = KSpaceTruncation(int(factor))
    out = op.pinv(torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32)))
    out = out.real if torch.is_complex(out) else out
    return out.detach().cpu().numpy().astype(np.float32)


def bicubic_upsample(lr: np.ndarray, factor: int) -> np.ndarray:
    """Cubic-spline (scipy order 3) upsampling of ``(..., h, w)`` slices onto the ``f·i`` grid.

    High-resolution sample ``x`` reads the low-resolution image at ``x / f``; the image is treated as
    periodic (``grid-wrap``) like the Fourier model that made it, so edges are handled the same way as
    by sinc interpolation.
    """
    lr = np.asarray(lr, dtype=np.float32)
    f = int(factor)
    h, w = lr.shape[-2:]
    flat = lr.reshape(-1, h, w)
    coords = np.meshgrid(np.arange(h * f) / f, np.arange(w * f) / f, indexing="ij")
    out = np.stack(
        [ndimage.map_coordinates(s, coords, order=3, mode="grid-wrap", prefilter=True) for s in flat]
    )
    return out.reshape(*lr.shape[:-2], h * f, w * f).astype(np.float32)


def plane_axes_from_shapes(
    lr_shape: Sequence[int], hr_shape: Sequence[int]
) -> tuple[tuple[int, ...], int]:
    """The axes that were downsampled (``hr // lr > 1``) and the common integer factor."""
    if len(lr_shape) != len(hr_shape):
        raise ValueError(
            f"low-res shape {tuple(lr_shape)} and reference shape {tuple(hr_shape)} differ in rank"
        )
    axes, factors = [], set()
    for ax, (lo, hi) in enumerate(zip(lr_shape, hr_shape, strict=True)):
        if hi == lo:
            continue
        if hi % lo:
            raise ValueError(
                f"reference shape {tuple(hr_shape)} is not an integer multiple of {tuple(lr_shape)}"
            )
        axes.append(ax)
        factors.add(hi // lo)
    if not axes or len(factors) != 1:
        raise ValueError(f"cannot infer one SR factor from shapes {tuple(lr_shape)} -> {tuple(hr_shape)}")
    return tuple(axes), factors.pop()


def hr_affine_inplane(affine_lr: np.ndarray, factor: int, axes: Sequence[int]) -> np.ndarray:
    """High-resolution affine for LR sample ``i`` at HR sample ``f·i`` along ``axes`` (same origin)."""
    scale = np.ones(4)
    for ax in axes:
        scale[ax] = 1.0 / factor
    return np.asarray(affine_lr, dtype=np.float64) @ np.diag(scale)


def upsample_volume(lr: Volume, factor: int, axes: Sequence[int] = (0, 1), method: str = "sinc") -> Volume:
    """Upsample a Volume by ``factor`` along two in-plane ``axes`` with ``method`` 'sinc' or 'bicubic'."""
    axes = tuple(int(a) % 3 for a in axes)
    if len(axes) != 2 or axes[0] == axes[1]:
        raise ValueError(f"in-plane upsampling needs two distinct axes, got {axes}")
    funcs = {"sinc": sinc_upsample, "bicubic": bicubic_upsample}
    if method not in funcs:
        raise ValueError(f"unknown interpolation method {method!r}; choose from {sorted(funcs)}")
    other = next(a for a in range(3) if a not in axes)
    stack = np.moveaxis(lr.array, (other, *axes), (0, 1, 2))  # (S, h, w)
    up = funcs[method](stack, factor)
    array = np.moveaxis(up, (0, 1, 2), (other, *axes))
    return lr.with_array(
        np.ascontiguousarray(array, dtype=np.float32), hr_affine_inplane(lr.affine, factor, axes)
    )
