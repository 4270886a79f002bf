"""Linear forward models of MRI degradations, as operators with ``A``, ``A_adjoint`` and data consistency.

Tensors are torch; the last two dims are the image plane ``(H, W)`` and any leading dims are batch.
Every operator offers:

- ``A(x)``, ``A_adjoint(y)`` — the forward model and its exact adjoint (tested: <Ax, y> = <x, A^H y>);
- ``pinv(y)`` — an intensity-preserving back-projection onto the image grid, used as the network's
  conditioning and as the "before" image (sinc upsampling / zero-filled image / interpolation);
  ``A(pinv(y)) == y`` for data in the range of ``A``;
- ``project(x, y)`` — hard data consistency: the nearest ``z`` to ``x`` with ``A z = y``,
  ``z = x + A^+ (y - A x)`` with ``A^+`` the minimum-norm least-squares inverse (idempotent);
- ``prox(x, y, noise_sigma, weight)`` — soft data consistency,
  ``argmin_z  weight / (2 sigma^2) ||A z - y||^2 + 1/2 ||z - x||^2``; ``sigma = 0`` (or ``weight = inf``)
  gives ``project``, ``weight = 0`` gives ``x``;
- ``out_shape(in_shape)``.

Closed forms are used where ``A A^H`` is simple (single-coil Fourier: the mask; k-space truncation:
``I / f^2``; slice profile: a small ``n x n`` matrix). Multi-coil Fourier has no closed form: ``project``
and ``prox`` run conjugate gradients on the normal equations (``cg_iters`` iterations, default 100,
stopping early at relative residual ``cg_tol``); ``pinv`` is the zero-filled SENSE coil combination.

Resolution operators (``KSpaceTruncation``, ``SliceProfile``) are real matrices applied along an axis, so
real images stay real. ``KSpaceTruncation``: LR sample ``i`` sits at HR sample ``f i`` (phase origin at
index 0 on both grids: exactly the centred-FFT crop when the LR size is even, and still true when odd),
a constant image keeps its value, ``A A^H = I / f^2`` and ``pinv = f^2 A^H`` is sinc (zero-padded k-space)
upsampling. For even LR sizes the LR Nyquist line takes ``(X[-n/2] + X[n/2]) / sqrt(2)`` of the HR
spectrum, which keeps the rows orthonormal and real images real.
``SliceProfile``: LR slice ``i`` is a weighted average of HR slices centred at ``f i + (f - 1) / 2`` along
the last dim (rect: ``f`` thin slices; gaussian: FWHM = ``f`` thin slices, rows normalised to sum 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from medidiff.physics.fft import fft2c, ifft2c
from medidiff.physics.masks import SamplingMask, apply_mask

Tensor = torch.Tensor


def _t(x: Tensor | np.ndarray) -> Tensor:
    """Accept numpy arrays too; return a tensor."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Real part of the complex inner product <a, b> over all elements (float64)."""
    if a.is_complex() or b.is_complex():
        return torch.vdot(a.reshape(-1).to(torch.complex128), b.reshape(-1).to(torch.complex128)).real
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-7,
) -> Tensor:
    """Solve ``apply(x) = b`` for a Hermitian positive (semi-)definite ``apply`` by conjugate gradients."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _dot(r, r)
    b_norm = max(float(_dot(b, b)), 1e-30)
    for _ in range(iters):
        if float(rs) <= tol**2 * b_norm:
            break
        ap = apply(p)
        alpha = rs / max(float(_dot(p, ap)), 1e-30)
        x = x + alpha.to(x.real.dtype) * p
        r = r - alpha.to(x.real.dtype) * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs).to(x.real.dtype) * p
        rs = rs_new
    return x


def _along(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """Apply ``matrix`` (n, N) to axis ``dim`` of ``x`` (size N) → size n on that axis."""
    m = matrix.to(device=x.device, dtype=x.dtype)
    return torch.movedim(torch.movedim(x, dim, -1) @ m.T, -1, dim)


class LinearOperator:
    """Base class: subclasses define ``A``, ``A_adjoint``, ``out_shape`` and, if they can, ``_gram_solve``."""

    cg_iters: int = 100
    cg_tol: float = 1e-7

    def A(self, x: Tensor) -> Tensor:
        """Forward model."""
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Adjoint of the forward model."""
        raise NotImplementedError

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for ``x`` of shape ``in_shape``."""
        raise NotImplementedError

    def _gram_solve(self, r: Tensor, eps: float) -> Tensor | None:
        """``(A A^H + eps I)^+ r`` in closed form, or None to fall back to conjugate gradients."""
        return None

    def A_dagger(self, r: Tensor) -> Tensor:
        """Minimum-norm least-squares solution ``A^+ r``."""
        r = _t(r)
        v = self._gram_solve(r, 0.0)
        if v is not None:
            return self.A_adjoint(v)
        rhs = self.A_adjoint(r)
        return conjugate_gradient(
            lambda d: self.A_adjoint(self.A(d)), rhs, iters=self.cg_iters, tol=self.cg_tol
        )

    def pinv(self, y: Tensor) -> Tensor:
        """Intensity-preserving back-projection onto the image grid (default: ``A^+ y``)."""
        return self.A_dagger(y)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """Hard data consistency: the nearest ``z`` to ``x`` with ``A z = y``."""
        x, y = _t(x), _t(y)
        return x + self.A_dagger(y - self.A(x))

    def prox(self, x: Tensor, y: Tensor, noise_sigma: float, weight: float = 1.0) -> Tensor:
        """Soft data consistency: argmin_z weight/(2 sigma^2) ||A z - y||^2 + 1/2 ||z - x||^2."""
        x, y = _t(x), _t(y)
        if weight <= 0:
            return x.clone()
        if noise_sigma <= 0 or math.isinf(weight):
            return self.project(x, y)
        inv_c = noise_sigma**2 / weight
        r = y - self.A(x)
        v = self._gram_solve(r, inv_c)
        if v is not None:
            return x + self.A_adjoint(v)
        rhs = self.A_adjoint(r)
        d = conjugate_gradient(
            lambda z: inv_c * z + self.A_adjoint(self.A(z)), rhs, iters=self.cg_iters, tol=self.cg_tol
        )
        return x + d


class FourierUndersampling(LinearOperator):
    """Undersampled Cartesian Fourier: ``y = M F x`` (single coil) or ``y_c = M F (S_c x)`` (multi-coil).

    ``mask`` is binary, ``(W,)`` columns or ``(H, W)`` (or a ``SamplingMask``); ``sens_maps`` complex
    ``(C, H, W)``. Images ``(..., H, W)`` → k-space ``(..., H, W)`` or ``(..., C, H, W)``.
    """

    def __init__(
        self,
        mask: Tensor | np.ndarray | SamplingMask,
        sens_maps: Tensor | np.ndarray | None = None,
        cg_iters: int = 100,
        cg_tol: float = 1e-7,
    ) -> None:
        if isinstance(mask, SamplingMask):
            mask = mask.mask
        self.mask = _t(mask).to(torch.float32)
        if not torch.all((self.mask == 0) | (self.mask == 1)):
            raise ValueError("FourierUndersampling needs a binary mask (values 0 or 1)")
        self.sens_maps = None if sens_maps is None else _t(sens_maps).to(torch.complex64)
        if self.sens_maps is not None and self.sens_maps.ndim != 3:
            raise ValueError(f"sens_maps must be (C, H, W), got {tuple(self.sens_maps.shape)}")
        self.cg_iters, self.cg_tol = cg_iters, cg_tol

    @property
    def multicoil(self) -> bool:
        """True with coil sensitivity maps."""
        return self.sens_maps is not None

    def _maps(self, like: Tensor) -> Tensor:
        """Sensitivity maps on the tensor's device."""
        assert self.sens_maps is not None
        return self.sens_maps.to(like.device)

    def A(self, x: Tensor) -> Tensor:
        """Masked centred FFT of the image (of each coil image)."""
        x = _t(x)
        if self.multicoil:
            x = x.unsqueeze(-3) * self._maps(x)
        return apply_mask(fft2c(x), self.mask.to(x.device))

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Zero-filled inverse FFT (and conjugate-sensitivity coil sum)."""
        y = _t(y)
        img = ifft2c(apply_mask(y, self.mask.to(y.device)))
        if self.multicoil:
            img = (img * self._maps(img).conj()).sum(dim=-3)
        return img

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Same plane; a coil dim before it for multi-coil."""
        in_shape = tuple(in_shape)
        if self.multicoil:
            return in_shape[:-2] + (int(self.sens_maps.shape[0]),) + in_shape[-2:]  # type: ignore[union-attr]
        return in_shape

    def _gram_solve(self, r: Tensor, eps: float) -> Tensor | None:
        """Single coil: ``A A^H = M`` so the solve is a masked scaling."""
        if self.multicoil:
            return None
        return apply_mask(r, self.mask.to(r.device)) / (1.0 + eps)

    def pinv(self, y: Tensor) -> Tensor:
        """Zero-filled image (single coil) or zero-filled SENSE combination ``S^H F^H y / sum |S|^2``."""
        img = self.A_adjoint(y)
        if not self.multicoil:
            return img
        norm = (self._maps(img).abs() ** 2).sum(dim=0)
        return torch.where(norm > 1e-6, img / norm.clamp_min(1e-6), torch.zeros_like(img))


@lru_cache(maxsize=64)
def _truncation_matrix(n_hr: int, factor: int) -> np.ndarray:
    """Real (n, N) matrix of 1D k-space truncation by ``factor`` (LR sample i at HR sample f i)."""
    n_lr = n_hr // factor
    select = np.zeros((n_lr, n_hr), dtype=np.complex128)
    freqs = np.fft.fftfreq(n_lr, d=1.0 / n_lr).round().astype(int)  # LR freq of each unshifted LR index
    for lr_index, q in enumerate(freqs):
        if (
            n_lr % 2 == 0 and q == -n_lr // 2
        ):  # split Nyquist symmetrically: real stays real, rows orthonormal
            select[lr_index, q % n_hr] = 1 / np.sqrt(2)
            select[lr_index, (-q) % n_hr] = 1 / np.sqrt(2)
        else:
            select[lr_index, q % n_hr] = 1
    fourier_hr = np.fft.fft(np.eye(n_hr), axis=0, norm="ortho")
    matrix = np.fft.ifft(select @ fourier_hr, axis=0, norm="ortho") / np.sqrt(factor)
    assert np.abs(matrix.imag).max() < 1e-9
    return matrix.real.astype(np.float32)


class KSpaceTruncation(LinearOperator):
    """In-plane resolution loss: keep the central ``1/f`` of k-space along both plane axes.

    ``(..., H, W)`` → ``(..., H/f, W/f)``; H and W must be multiples of ``f`` (crop first).
    """

    def __init__(self, factor: int) -> None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"KSpaceTruncation factor must be a positive integer, got {factor}")
        self.factor = int(factor)

    def _matrix(self, n: int) -> Tensor:
        """The per-axis truncation matrix for HR size ``n``."""
        if n % self.factor:
            raise ValueError(
                f"image size {n} is not a multiple of the SR factor {self.factor}; crop it first"
            )
        return torch.from_numpy(_truncation_matrix(n, self.factor))

    def A(self, x: Tensor) -> Tensor:
        """Low-resolution image from the central k-space of ``x``."""
        x = _t(x)
        x = _along(x, self._matrix(x.shape[-2]), -2)
        return _along(x, self._matrix(x.shape[-1]), -1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Zero-pad k-space back to the HR grid (scaled by ``1/f``)."""
        y = _t(y)
        y = _along(y, self._matrix(y.shape[-2] * self.factor).T, -2)
        return _along(y, self._matrix(y.shape[-1] * self.factor).T, -1)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Plane dims divided by the factor."""
        in_shape = tuple(in_shape)
        for n in in_shape[-2:]:
            if n % self.factor:
                raise ValueError(
                    f"image size {n} is not a multiple of the SR factor {self.factor}; crop it first"
                )
        return in_shape[:-2] + (in_shape[-2] // self.factor, in_shape[-1] // self.factor)

    def _gram_solve(self, r: Tensor, eps: float) -> Tensor | None:
        """``A A^H = I / f^2``."""
        return r / (1.0 / self.factor**2 + eps)

    def pinv(self, y: Tensor) -> Tensor:
        """Sinc (zero-padded k-space) upsampling, ``f^2 A^H y``."""
        return self.A_adjoint(_t(y)) * float(self.factor**2)


def _gaussian_fwhm_to_sigma(fwhm: float) -> float:
    """Standard deviation of a Gaussian with the given full width at half maximum."""
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@lru_cache(maxsize=64)
def _slice_matrices(
    n_hr: int, factor: int, profile: str, fwhm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, B^+, pinv) for a slice profile: B (n, N); B^+ = B^T (B B^T)^-1; pinv = interpolate then project."""
    n_lr = n_hr // factor
    centres = factor * np.arange(n_lr) + (factor - 1) / 2.0
    hr = np.arange(n_hr, dtype=np.float64)
    if profile == "rect":
        weights = (np.abs(hr[None, :] - centres[:, None]) < factor / 2.0).astype(np.float64)
    else:
        sigma = _gaussian_fwhm_to_sigma(fwhm)
        dist = hr[None, :] - centres[:, None]
        weights = np.exp(-0.5 * (dist / sigma) ** 2) * (np.abs(dist) <= 3 * sigma + 0.5)
    weights /= weights.sum(axis=1, keepdims=True)
    b_dagger = weights.T @ np.linalg.inv(weights @ weights.T)
    interp = np.zeros((n_hr, n_lr))  # linear interpolation from LR centres, constant beyond the ends
    pos = np.clip(np.interp(hr, centres, np.arange(n_lr)), 0, n_lr - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_lr - 1)
    frac = pos - lo
    interp[np.arange(n_hr), lo] += 1 - frac
    interp[np.arange(n_hr), hi] += frac
    pinv = interp + b_dagger @ (np.eye(n_lr) - weights @ interp)
    return weights.astype(np.float32), b_dagger.astype(np.float32), pinv.astype(np.float32)


class SliceProfile(LinearOperator):
    """Through-plane resolution loss along the last dim: thick slices as weighted averages of thin ones.

    ``(..., H, N)`` → ``(..., H, N/f)``; N must be a multiple of ``f``. ``profile`` is ``'rect'`` (mean
    of ``f`` thin slices) or ``'gaussian'`` (FWHM = ``fwhm`` thin slices, default ``f``).
    """

    def __init__(self, factor: int, profile: str = "rect", fwhm: float | None = None) -> None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"SliceProfile factor must be a positive integer, got {factor}")
        if profile not in ("rect", "gaussian"):
            raise ValueError(f"slice profile must be 'rect' or 'gaussian', got {profile!r}")
        self.factor, self.profile = int(factor), profile
        self.fwhm = float(fwhm if fwhm is not None else factor)

    def _mats(self, n_hr: int) -> tuple[Tensor, Tensor, Tensor]:
        """(B, B^+, pinv) as tensors for HR length ``n_hr``."""
        if n_hr % self.factor:
            raise ValueError(f"{n_hr} slices is not a multiple of the SR factor {self.factor}; crop first")
        return tuple(torch.from_numpy(m) for m in _slice_matrices(n_hr, self.factor, self.profile, self.fwhm))  # type: ignore[return-value]

    def A(self, x: Tensor) -> Tensor:
        """Thick slices from thin ones."""
        x = _t(x)
        return _along(x, self._mats(x.shape[-1])[0], -1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Spread each thick slice back over its thin slices with the profile weights."""
        y = _t(y)
        return _along(y, self._mats(y.shape[-1] * self.factor)[0].T, -1)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Last dim divided by the factor."""
        in_shape = tuple(in_shape)
        if in_shape[-1] % self.factor:
            raise ValueError(
                f"{in_shape[-1]} slices is not a multiple of the SR factor {self.factor}; crop first"
            )
        return in_shape[:-1] + (in_shape[-1] // self.factor,)

    def A_dagger(self, r: Tensor) -> Tensor:
        """``B^T (B B^T)^-1 r`` along the last dim."""
        r = _t(r)
        return _along(r, self._mats(r.shape[-1] * self.factor)[1], -1)

    def _gram_solve(self, r: Tensor, eps: float) -> Tensor | None:
        """``(B B^T + eps I)^-1`` along the last dim (a small n x n matrix)."""
        b = self._mats(r.shape[-1] * self.factor)[0].double()
        inv = torch.linalg.inv(b @ b.T + eps * torch.eye(b.shape[0], dtype=torch.float64))
        return _along(r, inv.float(), -1)

    def pinv(self, y: Tensor) -> Tensor:
        """Linear interpolation onto the thin-slice grid, then projected so that ``A(pinv(y)) = y``."""
        y = _t(y)
        return _along(y, self._mats(y.shape[-1] * self.factor)[2], -1)
