"""Operators: adjointness, projections, prox limits, intensity and geometry conventions."""

import numpy as np
import pytest
import torch

from medidiff.physics.coils import espirit_maps, synthetic_coil_maps
from medidiff.physics.fft import fft2c
from medidiff.physics.masks import make_mask
from medidiff.physics.noise import add_noise, rician
from medidiff.physics.operators import FourierUndersampling, KSpaceTruncation, SliceProfile


def _maps(shape=(48, 40), coils=8):
    return torch.from_numpy(synthetic_coil_maps(coils, shape, seed=0))


def _operators():
    mask = make_mask("random", (48, 40), 4, 0.08, seed=0)
    return [
        ("fourier-1coil", FourierUndersampling(mask), (2, 48, 40), True),
        (
            "fourier-poisson",
            FourierUndersampling(make_mask("poisson", (48, 40), 3, 0.1, seed=0)),
            (48, 40),
            True,
        ),
        ("fourier-8coil", FourierUndersampling(mask, _maps()), (2, 48, 40), True),
        ("truncation-x2", KSpaceTruncation(2), (2, 48, 40), False),
        ("truncation-x3-odd", KSpaceTruncation(3), (15, 21), False),
        ("slice-rect-x4", SliceProfile(4), (3, 10, 32), False),
        ("slice-gauss-x3", SliceProfile(3, "gaussian"), (10, 33), False),
    ]


OPS = _operators()


@pytest.mark.parametrize("name,op,shape,complex_", OPS, ids=[o[0] for o in OPS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adjointness(name, op, shape, complex_, dtype):
    g = torch.Generator().manual_seed(0)
    cdtype = torch.complex64 if dtype == "float32" else torch.complex128
    x = torch.randn(shape, generator=g, dtype=cdtype)
    y = torch.randn(op.out_shape(shape), generator=g, dtype=cdtype)
    lhs = torch.vdot(op.A(x).flatten(), y.flatten()).to(torch.complex128)
    rhs = torch.vdot(x.flatten(), op.A_adjoint(y).flatten()).to(torch.complex128)
    scale = float(torch.linalg.norm(op.A(x)) * torch.linalg.norm(y))
    assert float(abs(lhs - rhs)) / scale < 1e-5
    if dtype == "float64":
        assert float(abs(lhs - rhs) / abs(lhs)) < 1e-5


@pytest.mark.parametrize(
    "name,op,shape,complex_",
    [o for o in OPS if o[0] != "fourier-8coil"],
    ids=[o[0] for o in OPS if o[0] != "fourier-8coil"],
)
def test_project_is_consistent_and_idempotent(name, op, shape, complex_):
    g = torch.Generator().manual_seed(1)
    dtype = torch.complex64 if complex_ else torch.float32
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = op.A(torch.randn(shape, generator=g, dtype=dtype))
    p = op.project(x, y)
    assert float(torch.linalg.norm(op.A(p) - y) / torch.linalg.norm(y)) < 1e-5
    assert float(torch.linalg.norm(op.project(p, y) - p) / torch.linalg.norm(p)) < 1e-5
    assert float(torch.linalg.norm(op.A(op.pinv(y)) - y) / torch.linalg.norm(y)) < 1e-5
    if not complex_:
        assert not p.is_complex() and not op.pinv(y).is_complex()
    # prox limits: weight 0 keeps x, tiny sigma gives the projection, in between moves towards y
    assert torch.equal(op.prox(x, y, 0.1, 0.0), x)
    assert float(torch.linalg.norm(op.prox(x, y, 1e-4, 1.0) - p) / torch.linalg.norm(p)) < 1e-4
    mid = op.prox(x, y, 1.0, 1.0)
    assert (
        torch.linalg.norm(op.A(p) - y) <= torch.linalg.norm(op.A(mid) - y) <= torch.linalg.norm(op.A(x) - y)
    )


def test_multicoil_projection_and_prox_by_cg():
    """Multi-coil: CG projection is exact where A^H A is well conditioned (R=2, 8 coils)."""
    mask = make_mask("equispaced", (48, 40), 2, 0.08, seed=0)
    op = FourierUndersampling(mask, _maps(), cg_iters=100)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 40, generator=g, dtype=torch.complex64)
    y = op.A(torch.randn(48, 40, generator=g, dtype=torch.complex64))
    p = op.project(x, y)
    assert float(torch.linalg.norm(op.A(p) - y) / torch.linalg.norm(y)) < 1e-5
    assert float(torch.linalg.norm(op.project(p, y) - p) / torch.linalg.norm(p)) < 1e-5
    assert float(torch.linalg.norm(op.prox(x, y, 1e-4, 1.0) - p) / torch.linalg.norm(p)) < 1e-4
    # zero-filled SENSE combination of fully sampled data is the image itself
    full = FourierUndersampling(np.ones(40, np.float32), _maps())
    np.testing.assert_allclose(full.pinv(full.A(x)).numpy(), x.numpy(), atol=1e-5)


def test_truncation_keeps_intensity_and_grid_convention():
    op = KSpaceTruncation(2)
    const = torch.full((32, 24), 7.5)
    np.testing.assert_allclose(op.A(const).numpy(), 7.5, rtol=1e-5)
    np.testing.assert_allclose(op.pinv(op.A(const)).numpy(), 7.5, rtol=1e-5)
    # a band-limited image is sampled exactly: LR sample i equals HR sample f*i
    for n in (32, 30):  # LR size even and odd
        i = torch.arange(n, dtype=torch.float64)
        hr = 1.0 + torch.cos(2 * np.pi * 3 * i / n)[:, None] * torch.sin(2 * np.pi * 2 * i / n)[None, :]
        lr = op.A(hr)
        np.testing.assert_allclose(lr.numpy(), hr[::2, ::2].numpy(), atol=1e-5)
        # and sinc upsampling of a band-limited LR image recovers the HR image
        np.testing.assert_allclose(op.pinv(lr).numpy(), hr.numpy(), atol=1e-5)
    # the operator is the central k-space crop of the centred FFT (scaled by 1/f)
    x = torch.randn(16, 16, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    k_lr = fft2c(op.A(x))
    k_hr = fft2c(x)[4:12, 4:12] / 2
    np.testing.assert_allclose(k_lr[1:, 1:].numpy(), k_hr[1:, 1:].numpy(), atol=1e-6)


def test_slice_profile_centres_and_intensity():
    rect = SliceProfile(4)
    x = torch.arange(16, dtype=torch.float32).expand(3, 16)
    np.testing.assert_allclose(rect.A(x)[0].numpy(), 4 * np.arange(4) + 1.5, atol=1e-5)  # centre f*i+(f-1)/2
    gauss = SliceProfile(4, "gaussian")
    np.testing.assert_allclose(gauss.A(x)[0, 1:-1].numpy(), 4 * np.arange(1, 3) + 1.5, atol=1e-4)
    np.testing.assert_allclose(gauss.A(torch.full((2, 16), 3.0)).numpy(), 3.0, atol=1e-5)
    # pinv interpolates: a linear ramp of thick slices comes back as the thin-slice ramp inside
    ramp = rect.pinv(rect.A(x))
    np.testing.assert_allclose(ramp[0, 4:-4].numpy(), np.arange(4, 12), atol=1e-4)


def test_sizes_not_multiple_of_factor_raise():
    with pytest.raises(ValueError, match="multiple"):
        KSpaceTruncation(3).A(torch.zeros(10, 12))
    with pytest.raises(ValueError, match="multiple"):
        SliceProfile(4).out_shape((8, 10))
    with pytest.raises(ValueError, match="binary"):
        FourierUndersampling(np.full(8, 0.5, np.float32))


def test_espirit_recovers_synthetic_maps():
    maps = synthetic_coil_maps(8, (64, 64), seed=1)
    img = np.zeros((64, 64), np.complex64)
    img[8:56, 10:54] = 1.0
    kspace = fft2c(torch.from_numpy(maps * img)).numpy()
    est = espirit_maps(kspace, calib_width=24)
    inside = np.abs(img) > 0
    # maps are defined up to one common phase; compare the coil-combined projection |sum conj(est) * maps|
    agree = np.abs((est.conj() * maps).sum(axis=0))[inside]
    assert agree.mean() > 0.98


def test_noise_is_seeded_and_sized():
    y = torch.zeros(200, 200, dtype=torch.complex64)
    a, b = add_noise(y, 0.5, seed=4), add_noise(y, 0.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, add_noise(y, 0.5, seed=5))
    assert abs(float(a.real.std()) - 0.5) < 0.02 and abs(float(a.imag.std()) - 0.5) < 0.02
    # Rician magnitude of a zero image is Rayleigh: mean sigma*sqrt(pi/2)
    r = rician(torch.zeros(200, 200), 1.0, seed=0)
    assert abs(float(r.mean()) - np.sqrt(np.pi / 2)) < 0.03
