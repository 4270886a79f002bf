"""Simulate degraded acquisitions from high-quality scans with the same operators the model uses.

- ``simulate_sr(vol, factor, axis)``: ``axis='inplane'`` truncates k-space in the two in-plane axes
  (the axes other than ``vol.slice_axis``); ``axis='through'`` averages ``factor`` thin slices along the
  slice axis (rect profile by default). Sizes are cropped at the high end to multiples of ``factor``, so
  voxel 0 keeps its position; the reference is the cropped input.
- ``simulate_recon(...)``: each slice along the slice axis is Fourier transformed (centred orthonormal),
  optionally multiplied by synthetic coil maps, and masked with one mask per volume. The k-space grid is
  ``(S, H, W)`` = (slice axis, then the two remaining axes in order); its image grid ``(H, W, S)`` and
  affine are those axes permuted, so world coordinates are unchanged. The reference is the magnitude
  image the k-space came from (``|x|``; for multi-coil the root-sum-of-squares, equal to ``|x|`` as the
  synthetic maps have unit root-sum-of-squares).

Affine conventions: in-plane LR voxel ``i`` sits at HR voxel ``f i`` (``affine_lr = affine_hr @ diag(f, f, 1,
1)`` on those axes); through-plane LR slice ``i`` is centred at HR slice ``f i + (f - 1) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medidiff.io.kspace import KSpaceData
from medidiff.io.volume import Volume
from medidiff.physics.coils import synthetic_coil_maps
from medidiff.physics.fft import fft2c
from medidiff.physics.masks import apply_mask, make_mask
from medidiff.physics.noise import add_noise
from medidiff.physics.operators import KSpaceTruncation, SliceProfile


def sr_affine(affine_hr: np.ndarray, factor: int, axes: Sequence[int], centred: bool = False) -> np.ndarray:
    """Affine of the low-resolution grid: voxel ``i`` at HR voxel ``f i`` (``+ (f-1)/2`` if ``centred``)."""
    out = np.array(affine_hr, dtype=np.float64, copy=True)
    for ax in axes:
        if centred:
            out[:3, 3] += (factor - 1) / 2.0 * affine_hr[:3, ax]
        out[:3, ax] = affine_hr[:3, ax] * factor
    return out


def hr_affine(affine_lr: np.ndarray, factor: int, axes: Sequence[int], centred: bool = False) -> np.ndarray:
    """Inverse of :func:`sr_affine`: the high-resolution grid of a low-resolution affine."""
    out = np.array(affine_lr, dtype=np.float64, copy=True)
    for ax in axes:
        out[:3, ax] = affine_lr[:3, ax] / factor
        if centred:
            out[:3, 3] -= (factor - 1) / 2.0 * out[:3, ax]
    return out


def inplane_axes(vol: Volume) -> tuple[int, int]:
    """The two axes other than the slice axis, in order."""
    k = vol.slice_axis
    a, b = (ax for ax in range(3) if ax != k)
    return a, b


def crop_to_multiple(vol: Volume, factor: int, axes: Sequence[int]) -> Volume:
    """Crop the high end of ``axes`` to a multiple of ``factor`` (voxel 0 and the affine unchanged)."""
    index = [slice(None)] * 3
    for ax in axes:
        n = vol.shape[ax] - vol.shape[ax] % factor
        if n == 0:
            raise ValueError(f"axis {ax} has {vol.shape[ax]} voxels, fewer than the factor {factor}")
        index[ax] = slice(0, n)
    return vol.with_array(vol.array[tuple(index)])


def simulate_sr(
    vol: Volume,
    factor: int,
    axis: str = "inplane",
    seed: int = 0,
    noise_sigma: float = 0.0,
    profile: str = "rect",
) -> tuple[Volume, Volume]:
    """(low-resolution volume with its coarser affine, reference) for in-plane or through-plane SR.

    ``noise_sigma`` (image units, default 0) adds real Gaussian noise to the LR image, seeded by ``seed``.
    """
    factor = int(factor)
    if factor < 2:
        raise ValueError(f"SR factor must be an integer >= 2, got {factor}")
    if axis == "inplane":
        axes: tuple[int, ...] = inplane_axes(vol)
        ref = crop_to_multiple(vol, factor, axes)
        x = torch.from_numpy(np.moveaxis(ref.array, axes, (-2, -1)).copy())
        lr = KSpaceTruncation(factor).A(x)
        centred = False
    elif axis == "through":
        axes = (vol.slice_axis,)
        ref = crop_to_multiple(vol, factor, axes)
        x = torch.from_numpy(np.moveaxis(ref.array, axes[0], -1).copy())
        lr = SliceProfile(factor, profile).A(x)
        centred = True
    else:
        raise ValueError(f"axis must be 'inplane' or 'through', got {axis!r}")
    if noise_sigma > 0:
        lr = add_noise(lr, noise_sigma, seed=seed)
    dest = (-2, -1) if axis == "inplane" else (-1,)
    lr_arr = np.moveaxis(lr.numpy(), dest, axes).astype(np.float32)
    desc = f"simulated SR x{factor} {axis}"
    lr_vol = ref.with_array(
        lr_arr,
        sr_affine(ref.affine, factor, axes, centred),
        description=desc,
        simulation={
            "task": "sr",
            "factor": factor,
            "axis": axis,
            "axes": list(axes),
            "profile": profile if axis == "through" else None,
            "seed": seed,
            "noise_sigma": noise_sigma,
        },
    )
    return lr_vol, ref


def simulate_recon(
    vol: Volume,
    acceleration: float,
    center_fraction: float,
    mask_kind: str = "equispaced",
    coils: int = 1,
    seed: int = 0,
    noise_sigma: float = 0.0,
) -> tuple[KSpaceData, Volume]:
    """Undersampled k-space and the reference it was made from.

    Returns (k-space (S, H, W) or (S, C, H, W) with its mask, reference magnitude Volume (H, W, S)).
    """
    k = vol.slice_axis
    a, b = inplane_axes(vol)
    order = (a, b, k)
    image = np.transpose(vol.array, order)  # (H, W, S)
    affine = vol.affine[:, list(order) + [3]]
    ref = vol.with_array(np.abs(image).astype(np.float32), affine)
    h, w = image.shape[:2]
    mask = make_mask(mask_kind, (h, w), acceleration, center_fraction, seed)
    x = torch.from_numpy(np.moveaxis(image, -1, 0).copy())  # (S, H, W)
    if coils > 1:
        maps = torch.from_numpy(synthetic_coil_maps(coils, (h, w), seed=seed))
        x = x.unsqueeze(1) * maps  # (S, C, H, W)
    elif coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    kspace = fft2c(x.to(torch.complex64))
    if noise_sigma > 0:
        kspace = add_noise(kspace, noise_sigma, seed=seed)
    kspace = apply_mask(kspace, torch.from_numpy(mask.mask))
    meta = {
        "description": (
            f"simulated {mask_kind} R{mask.acceleration:.2f} {'multi' if coils > 1 else 'single'}coil"
        ),
        "modality": "MR",
        "simulation": {
            "task": "recon",
            "acceleration": mask.acceleration,
            "nominal_acceleration": acceleration,
            "center_fraction": center_fraction,
            "mask": mask_kind,
            "coils": coils,
            "seed": seed,
            "noise_sigma": noise_sigma,
        },
    }
    data = KSpaceData(kspace.numpy(), mask.mask, affine, np.moveaxis(ref.array, -1, 0), meta)
    return data, ref
