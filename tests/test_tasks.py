"""Slice datasets: documented shapes, cond = operator pinv of A(target), normalise round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medidiff.data.datasets import Degradation, SliceDataset, denormalise, make_operator, normalise


@pytest.fixture(scope="module")
def volumes():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    vols = []
    for shape in [(36, 40, 24), (30, 32, 28)]:
        a = gaussian_filter(rng.random(shape), 2.0).astype(np.float32) * 1000
        a[:3] = 0  # some empty border
        vols.append(a)
    return vols


def test_data_normalise_round_trip():
    rng = np.random.default_rng(1)
    a = (rng.random((20, 20, 5)) * 500).astype(np.float32)
    n, s = normalise(a)
    assert n.dtype == np.float32 and s == pytest.approx(np.percentile(a, 99.5), rel=1e-6)
    assert np.allclose(denormalise(n, s), a, rtol=1e-6)
    assert normalise(np.zeros((4, 4, 4), np.float32))[1] == 1.0
    assert torch.allclose(denormalise(torch.from_numpy(n), s), torch.from_numpy(a), rtol=1e-6)


@pytest.mark.parametrize(
    "task",
    [
        Degradation("sr", 2),
        Degradation("sr_thick", 4, profile="gaussian"),
        Degradation("recon", acceleration=4, center_fraction=0.1, mask="equispaced"),
    ],
)
def test_data_cond_is_pinv_of_degraded_target(volumes, task):
    ds = SliceDataset(volumes, task, seed=3)
    assert len(ds) > 0 and {it["axis"] for it in ds.data} == {0, 1, 2}
    for i in [0, len(ds) // 2, len(ds) - 1]:
        item = ds[i]
        cond, target = item["cond"], item["target"]
        c = 2 if task.kind == "recon" else 1
        assert cond.dtype == torch.float32 and target.dtype == torch.float32
        assert cond.shape == (c, *target.shape[-2:]) and target.shape[0] == 1
        mh, mw = (
            (1, task.factor)
            if task.kind == "sr_thick"
            else ((task.factor,) * 2 if task.kind == "sr" else (2, 2))
        )
        assert target.shape[-2] % mh == 0 and target.shape[-1] % mw == 0
        # Independently: the same slice, the operator's pinv of its measurement, the same scale.
        v, axis, s = item["volume"], item["axis"], item["slice"]
        raw = torch.from_numpy(ds.stack(v, axis)[s].copy())
        assert torch.allclose(target[0] * item["scale"], raw, rtol=1e-5, atol=1e-3)
        assert item["scale"] == pytest.approx(normalise(volumes[v])[1])
        op = make_operator(task, tuple(raw.shape), seed=3 * 1000 + 3 * v + axis)
        x = target[0].to(torch.complex64) if task.kind == "recon" else target[0]
        expect = op.pinv(op.A(x))
        if task.kind == "recon":
            expect = torch.stack([expect.real, expect.imag])
        assert torch.allclose(cond, expect.reshape(cond.shape).float(), atol=1e-5)


def test_data_neighbours_patches_and_monai_loader(volumes):
    from monai.data import DataLoader
    from monai.transforms import RandFlipd

    ds = SliceDataset(
        volumes,
        Degradation("sr", 2),
        neighbours=1,
        patch_size=16,
        seed=0,
        transform=RandFlipd(keys=["cond", "target"], prob=1.0, spatial_axis=1),
    )
    item = ds[5]
    assert item["cond"].shape == (3, 16, 16) and item["target"].shape == (1, 16, 16)
    assert torch.equal(ds[5]["cond"], item["cond"])  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)))
    assert tuple(batch["cond"].shape) == (4, 3, 16, 16) and tuple(batch["target"].shape) == (4, 1, 16, 16)
    assert batch["scale"].shape == (4,)
    # The MONAI transform flips cond and target together.
    plain = SliceDataset(volumes, Degradation("sr", 2), neighbours=1, patch_size=16, seed=0)
    plain.set_epoch(1)
    ref = plain[2]
    flipped = ds[2]
    assert torch.equal(flipped["cond"], ref["cond"].flip(-1))
    assert torch.equal(flipped["target"], ref["target"].flip(-1))
