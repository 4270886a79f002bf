"""Classical baselines: geometry of the upsampled grids, sinc == the physics pinv, CS beats zero-filled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from medidiff.baselines.interpolation import (
    bicubic_upsample,
    plane_axes_from_shapes,
    sinc_upsample,
    upsample_volume,
)
from medidiff.baselines.recon import compressed_sensing, zero_filled
from medidiff.evaluation.tuning import tune_cs_lambda
from medidiff.io.kspace import KSpaceData
from medidiff.io.volume import Volume
from medidiff.metrics import psnr
from medidiff.physics.fft import fft2c_np, ifft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import KSpaceTruncation


def _phantom(n: int) -> np.ndarray:
    """Shepp-Logan phantom (shipped with scikit-image) resized to n x n, float32."""
    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)


def _oblique_affine() -> np.ndarray:
    """A rotated, anisotropic voxel-to-RAS affine."""
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[c, -s, 0, 10.0], [s, c, 0, -5.0], [0, 0, 1, 3.0], [0, 0, 0, 1.0]])
    return aff @ np.diag([0.9, 0.8, 2.5, 1.0])


def _lr_volume(hr: Volume, axes: tuple[int, int], factor: int = 2) -> Volume:
    """Degrade a Volume in-plane along ``axes`` with the physics operator; LR affine = HR @ diag(f)."""
    other = next(a for a in range(3) if a not in axes)
    stack = np.moveaxis(hr.array, (other, *axes), (0, 1, 2))
    lr = KSpaceTruncation(factor).A(torch.from_numpy(np.ascontiguousarray(stack))).numpy()
    scale = np.ones(4)
    scale[list(axes)] = factor
    return Volume(np.moveaxis(lr, (0, 1, 2), (other, *axes)), hr.affine @ np.diag(scale))


@pytest.mark.parametrize("axes", [(0, 1), (0, 2)])
@pytest.mark.parametrize("method", ["sinc", "bicubic"])
def test_upsampled_volume_lands_on_the_reference_grid(axes: tuple[int, int], method: str) -> None:
    rng = np.random.default_rng(0)
    hr = Volume(rng.random((32, 24, 16)).astype(np.float32), _oblique_affine())
    lr = _lr_volume(hr, axes)
    up = upsample_volume(lr, 2, axes, method=method)
    assert up.shape == hr.shape
    assert up.array.dtype == np.float32
    np.testing.assert_allclose(up.affine, hr.affine, atol=1e-12)
    # the LR voxel i and the HR voxel 2i are the same point in the patient
    np.testing.assert_allclose(lr.world_coordinates(np.array([[3, 5, 7]]) if axes == (0, 1) else
                                                    np.array([[3, 5, 4]])),
                               up.world_coordinates(np.array([[6, 10, 7]]) if axes == (0, 1) else
                                                    np.array([[6, 5, 8]])), atol=1e-9)


def test_sinc_is_the_physics_pinv_and_zero_padded_kspace() -> None:
    x = _phantom(64)[None]
    op = KSpaceTruncation(2)
    lr = op.A(torch.from_numpy(x))
    up = sinc_upsample(lr.numpy(), 2)
    np.testing.assert_allclose(up, op.pinv(lr).numpy(), atol=1e-6)
    # independent check: centred zero-padding of the LR spectrum (Nyquist line split in two), times f
    k_lr = fft2c_np(lr.numpy().astype(np.complex64))[0]
    k_hr = np.zeros((64, 64), np.complex64)
    k_hr[16:48, 16:48] = k_lr
    k_hr[16, :] /= 2 ** 0.5
    k_hr[48, :] = k_hr[16, :]
    k_hr[:, 16] /= 2 ** 0.5
    k_hr[:, 48] = k_hr[:, 16]
    zero_padded = 2 * ifft2c_np(k_hr).real
    assert psnr(up[0], zero_padded) > 60


def test_bicubic_interpolates_the_lr_samples_and_keeps_constants() -> None:
    lr = _phantom(48)[None]
    up = bicubic_upsample(lr, 2)
    assert up.shape == (1, 96, 96)
    np.testing.assert_allclose(up[:, ::2, ::2], lr, atol=1e-5)  # LR sample i sits at HR sample 2i
    np.testing.assert_allclose(bicubic_upsample(np.full((2, 8, 6), 3.0, np.float32), 2), 3.0, atol=1e-5)


def test_sinc_and_bicubic_are_close_on_a_smooth_image() -> None:
    hr = _phantom(128)
    lr = KSpaceTruncation(2).A(torch.from_numpy(hr)).numpy()
    p_sinc, p_cubic = psnr(hr, sinc_upsample(lr, 2)), psnr(hr, bicubic_upsample(lr, 2))
    assert abs(p_sinc - p_cubic) < 1.5  # FINDINGS: within a fraction of a dB on real MR


def test_plane_axes_from_shapes() -> None:
    assert plane_axes_from_shapes((16, 12, 5), (32, 24, 5)) == ((0, 1), 2)
    assert plane_axes_from_shapes((16, 12, 5), (16, 12, 20)) == ((2,), 4)
    with pytest.raises(ValueError, match="integer multiple"):
        plane_axes_from_shapes((16, 12, 5), (33, 24, 5))
    with pytest.raises(ValueError, match="one SR factor"):
        plane_axes_from_shapes((16, 12, 5), (32, 36, 5))


def _kspace_case(kind: str, n: int = 96, slices: int = 1, seed: int = 1) -> tuple[KSpaceData, np.ndarray]:
    """Single-coil undersampled k-space of the phantom (S, H, W) and its (H, W, S) reference."""
    stack = np.stack([np.roll(_phantom(n), 3 * s, axis=0) for s in range(slices)])
    mask = make_mask(kind, (n, n), 4, 0.08, seed=seed)
    data = KSpaceData(fft2c_np(stack) * mask.full(), mask.mask, np.diag([0.7, 0.7, 3.0, 1.0]))
    return data, np.moveaxis(stack, 0, -1)


def test_zero_filled_geometry_and_full_sampling() -> None:
    data, ref = _kspace_case("equispaced", n=64, slices=2)
    zf = zero_filled(data)
    assert zf.shape == (64, 64, 2) == data.image_shape
    np.testing.assert_allclose(zf.affine, data.affine)
    np.testing.assert_allclose(zf.array, data.image().array, atol=1e-6)
    full = KSpaceData(fft2c_np(np.moveaxis(ref, -1, 0)), None, np.eye(4))
    np.testing.assert_allclose(zero_filled(full).array, ref, atol=1e-5)


def test_compressed_sensing_beats_zero_filled_on_random_masks() -> None:
    data, ref = _kspace_case("random", n=96)
    zf = psnr(ref, zero_filled(data).array)
    cs = compressed_sensing(data, lamda=1e-3, max_iter=100)
    assert cs.shape == ref.shape and cs.array.dtype == np.float32
    assert psnr(ref, cs.array) > zf + 0.3
    # incoherent 2D sampling is where CS shines: a large margin
    data2, ref2 = _kspace_case("poisson", n=96)
    assert psnr(ref2, compressed_sensing(data2, 1e-3).array) > psnr(ref2, zero_filled(data2).array) + 5


def test_cs_is_scale_invariant_and_tuning_picks_the_best() -> None:
    data, ref = _kspace_case("poisson", n=64)
    scaled = KSpaceData(data.kspace * 1000, data.mask, data.affine)
    np.testing.assert_allclose(compressed_sensing(scaled, 3e-3, 30).array / 1000,
                               compressed_sensing(data, 3e-3, 30).array, rtol=1e-3, atol=1e-4)
    tuning = tune_cs_lambda([(data, ref)], lambdas=(1e-5, 1e-3, 1.0), max_iter=50)
    assert tuning.lamda == max(tuning.psnr_by_lambda, key=tuning.psnr_by_lambda.get)
    assert tuning.psnr_by_lambda[tuning.lamda] > tuning.zero_filled_psnr
    assert tuning.lamda != 1.0  # an absurd weight wipes the image out
