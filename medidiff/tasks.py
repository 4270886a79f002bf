"""What a task is, its degradation operator and its intensity normalisation — one definition for all.

Training pairs, data consistency during sampling, the baselines, evaluation and ``enhance`` all build the
operator with :func:`task_operator` and divide images by :func:`measurement_scale`, so training and
inference cannot drift apart.

Intensity normalisation: a scan is divided by the 99.5th percentile of the magnitude of the *degraded input
image as a user gives it* — the low-resolution stack for super-resolution, the coil-combined (root sum of
squares) zero-filled image for reconstruction. Training computes it from the simulated measurement of the
whole stack in the same way, so a network sees the same intensities in training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from medidiff.physics.fft import ifft2c, ifft2c_np, rss
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import FourierUndersampling, KSpaceTruncation, LinearOperator, SliceProfile

Tensor = torch.Tensor
Operator = LinearOperator  # A, A_adjoint, pinv, project, prox
TASK_KINDS = ("sr", "sr_thick", "recon")


@dataclass(frozen=True)
class TaskConfig:
    """The degradation the model undoes; it defines the operator used for training and data consistency."""

    kind: Literal["sr", "sr_thick", "recon"] = "sr"
    factor: int = 2  # sr / sr_thick: resolution factor
    profile: Literal["rect", "gaussian"] = "rect"  # sr_thick: slice profile
    acceleration: float = 4.0  # recon
    center_fraction: float = 0.08  # recon
    mask: Literal["equispaced", "random", "poisson"] = "equispaced"  # recon
    noise_sigma: float = 0.0  # measurement noise (fraction of the robust max); 0 = noiseless

    @property
    def complex_images(self) -> bool:
        """Reconstruction works on complex images (real/imag as two network channels)."""
        return self.kind == "recon"


def task_operator(
    task: TaskConfig,
    plane_shape: tuple[int, int] | None = None,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> Operator:
    """The degradation operator of a task (recon draws its mask for ``plane_shape`` with ``seed``, or takes
    an explicit ``mask``)."""
    if task.kind == "sr":
        return KSpaceTruncation(task.factor)
    if task.kind == "sr_thick":
        return SliceProfile(task.factor, profile=task.profile)
    if task.kind != "recon":
        raise ValueError(f"unknown task kind {task.kind!r} (expected one of {', '.join(TASK_KINDS)})")
    if mask is None:
        if plane_shape is None:
            raise ValueError("a recon operator needs the plane shape or an explicit mask")
        mask = make_mask(task.mask, tuple(plane_shape), task.acceleration, task.center_fraction, seed).mask
    return FourierUndersampling(mask)


def intensity_scale(images: np.ndarray | Tensor) -> float:
    """Robust scale: the 99.5th percentile of ``|images|`` (1 if that is 0, empty or not finite)."""
    if isinstance(images, torch.Tensor):
        mag = images.detach().abs().float().cpu().numpy()
    else:
        mag = np.abs(np.asarray(images)).astype(np.float32, copy=False)
    scale = float(np.percentile(mag, 99.5)) if mag.size else 0.0
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def input_image(kind: str, y: np.ndarray | Tensor, coil_dim: int | None = None) -> np.ndarray | Tensor:
    """The degraded image a user's scan is: the measurement itself for super-resolution, the zero-filled
    magnitude (root sum of squares over ``coil_dim`` when given) for reconstruction's k-space."""
    if kind != "recon":
        return y
    img = ifft2c(y) if isinstance(y, torch.Tensor) else ifft2c_np(np.asarray(y))
    if coil_dim is not None:
        return rss(img, coil_dim)
    return img.abs() if isinstance(img, torch.Tensor) else np.abs(img)


def measurement_scale(kind: str, y: np.ndarray | Tensor, coil_dim: int | None = None) -> float:
    """The one intensity normalisation: :func:`intensity_scale` of :func:`input_image` (a whole stack)."""
    return intensity_scale(input_image(kind, y, coil_dim))


def normalise(arr: np.ndarray) -> tuple[np.ndarray, float]:
    """``(arr / scale, scale)`` with ``scale`` from :func:`intensity_scale` (float32 or complex64)."""
    a = np.asarray(arr)
    scale = intensity_scale(a)
    out = a / scale
    return out.astype(np.complex64 if np.iscomplexobj(out) else np.float32), scale


def denormalise(arr_n: np.ndarray | Tensor, scale: float) -> np.ndarray | Tensor:
    """Inverse of :func:`normalise`: back to the input's units."""
    return arr_n * scale


def to_channels(img: Tensor, complex_images: bool) -> Tensor:
    """(B, H, W) real or complex image → (B, C, H, W) real network channels (C = 2 for complex)."""
    if complex_images:
        img = img if img.is_complex() else img.to(torch.complex64)
        return torch.stack([img.real, img.imag], dim=1)
    return img.real.unsqueeze(1) if img.is_complex() else img.unsqueeze(1)


def from_channels(ch: Tensor, complex_images: bool) -> Tensor:
    """Inverse of :func:`to_channels`."""
    if complex_images:
        return torch.complex(ch[:, 0].float(), ch[:, 1].float())
    return ch[:, 0].float()
