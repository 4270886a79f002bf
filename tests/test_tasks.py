"""The task layer: one operator factory and one intensity normalisation for training, evaluation, enhance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medidiff.baselines.recon import _coil_kspace
from medidiff.data.pairs import crop_multiple, degrade_stack, make_pairs
from medidiff.evaluation.compare import degrade_recon, degrade_sr_inplane
from medidiff.io import Volume
from medidiff.physics.fft import ifft2c_np, rss
from medidiff.physics.operators import FourierUndersampling, KSpaceTruncation, SliceProfile
from medidiff.pipeline.enhance import slice_stack
from medidiff.recipe import Recipe, with_overrides
from medidiff.tasks import (
    TaskConfig,
    denormalise,
    intensity_scale,
    measurement_scale,
    normalise,
    task_operator,
)


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    """A smooth positive volume with an empty border (what percentiles see in a head scan)."""
    a = gaussian_filter(np.random.default_rng(0).random((40, 36, 12)), 2.0).astype(np.float32) * 1000
    a[:4] = 0
    return a


def test_normalise_round_trip_and_fallback():
    a = (np.random.default_rng(1).random((20, 20, 5)) * 500).astype(np.float32)
    n, s = normalise(a)
    assert n.dtype == np.float32 and s == pytest.approx(np.percentile(a, 99.5), rel=1e-6)
    assert np.allclose(denormalise(n, s), a, rtol=1e-6)
    assert torch.allclose(denormalise(torch.from_numpy(n), s), torch.from_numpy(a), rtol=1e-6)
    for empty in (np.zeros((4, 4, 4), np.float32), np.zeros(0, np.float32), np.full(3, np.nan, np.float32)):
        assert intensity_scale(empty) == 1.0
    assert intensity_scale(torch.from_numpy(a)) == intensity_scale(a)


def test_task_operator_per_kind():
    assert isinstance(task_operator(TaskConfig("sr", 3)), KSpaceTruncation)
    assert isinstance(task_operator(TaskConfig("sr_thick", 4, profile="gaussian")), SliceProfile)
    op = task_operator(TaskConfig("recon", acceleration=4.0), (32, 24), seed=5)
    assert isinstance(op, FourierUndersampling)
    again = task_operator(TaskConfig("recon", acceleration=4.0), mask=np.asarray(op.mask))
    assert np.array_equal(np.asarray(again.mask), np.asarray(op.mask))
    with pytest.raises(ValueError, match="plane shape"):
        task_operator(TaskConfig("recon"))
    with pytest.raises(ValueError, match="unknown task kind"):
        task_operator(TaskConfig("denoise"))  # type: ignore[arg-type]


def test_recon_scale_is_that_of_the_coil_combined_zero_filled_image():
    rng = np.random.default_rng(2)
    k = (rng.standard_normal((3, 4, 16, 16)) + 1j * rng.standard_normal((3, 4, 16, 16))).astype(np.complex64)
    expect = float(np.percentile(rss(ifft2c_np(k), 1), 99.5))
    assert measurement_scale("recon", k, coil_dim=1) == pytest.approx(expect, rel=1e-6)
    assert measurement_scale("recon", torch.from_numpy(k), coil_dim=1) == pytest.approx(expect, rel=1e-5)


def test_training_evaluation_and_enhance_use_the_same_sr_scale(head):
    """The same HR volume: training degrades its stack, evaluation simulates the LR scan, enhance reads it."""
    task = TaskConfig("sr", 2)
    training = degrade_stack(task, crop_multiple(np.transpose(head, (2, 0, 1)), 2), seed=0)[2]
    lr, _ = degrade_sr_inplane(Volume(head, np.eye(4)), 2)
    enhance = measurement_scale("sr", slice_stack(lr, "sr", 2).stack)
    assert training == pytest.approx(enhance, rel=1e-6)
    # ... and that is the scale of the degraded (LR) image, not of the back-projection or the reference.
    assert enhance == pytest.approx(float(np.percentile(np.abs(lr.array), 99.5)), rel=1e-6)
    recipe = with_overrides(Recipe(), task={"kind": "sr", "factor": 2}, data={"patch_size": 16})
    pairs = make_pairs(recipe, [head], slices_per_volume=6, seed=0)
    stacks = [crop_multiple(np.moveaxis(head, ax, 0), 2) for ax in range(3)]
    per_stack = {round(degrade_stack(task, st, seed=0)[2], 3) for st in stacks if min(st.shape[1:]) >= 16}
    assert pairs and {round(p.scale, 3) for p in pairs} <= per_stack
    for p in pairs:  # every tensor of a pair is divided by the same scale
        assert torch.allclose(KSpaceTruncation(2).A(p.target), p.y, atol=1e-5)


def test_training_evaluation_and_enhance_use_the_same_recon_scale(head):
    task = TaskConfig("recon", acceleration=4.0, center_fraction=0.08, mask="equispaced")
    stack = np.moveaxis(head, 2, 0)
    training = degrade_stack(task, stack, seed=7)[2]
    data, _ = degrade_recon(Volume(head, np.eye(4)), 4.0, 0.08, "equispaced", seed=7)
    cs = measurement_scale("recon", _coil_kspace(data), coil_dim=1)  # compressed sensing (evaluation)
    enhance = measurement_scale("recon", torch.from_numpy(np.asarray(data.kspace, np.complex64)))
    assert training == pytest.approx(enhance, rel=1e-5)
    assert cs == pytest.approx(enhance, rel=1e-5)
