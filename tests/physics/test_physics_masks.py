"""Sampling masks: acceleration, fully sampled centre, seeds, global RNG untouched, no negative zeros."""

import numpy as np
import pytest
import torch

from medidiff.physics.masks import apply_mask, make_mask


def _centre_columns(w: int, cf: float) -> slice:
    n_low = round(w * cf)
    pad = (w - n_low + 1) // 2
    return slice(pad, pad + n_low)


@pytest.mark.parametrize("acceleration,cf", [(4, 0.08), (8, 0.04)])
def test_equispaced_acceleration_exact_and_centre(acceleration, cf):
    for seed in range(5):
        m = make_mask("equispaced", (320, 368), acceleration, cf, seed)
        assert m.mask.shape == (368,) and m.mask.dtype == np.float32
        assert m.acceleration == pytest.approx(368 / m.mask.sum())
        # within 2 % of nominal, or one column where 2 % is less than a column (fastMRI rounding)
        assert abs(m.mask.sum() - 368 / acceleration) <= max(1.0, 0.02 * 368 / acceleration)
        assert np.all(m.mask[_centre_columns(368, cf)] == 1)


def test_random_mask_expected_acceleration_and_centre():
    accs = []
    for seed in range(200):
        m = make_mask("random", (320, 368), 4, 0.08, seed)
        assert np.all(m.mask[_centre_columns(368, 0.08)] == 1)
        accs.append(m.mask.mean())
    assert abs((1 / np.mean(accs)) / 4 - 1) < 0.02  # fastMRI semantics: expected fraction 1/R


def test_poisson_mask_acceleration_and_calibration():
    m = make_mask("poisson", (96, 80), 4, 0.1, seed=3)
    assert m.mask.shape == (96, 80)
    assert abs(m.acceleration / 4 - 1) < 0.02
    assert np.all(m.mask[48 - 5 : 48 + 5, 40 - 4 : 40 + 4] == 1)


@pytest.mark.parametrize("kind", ["equispaced", "random", "poisson"])
def test_seeds_reproducible_and_global_rng_untouched(kind):
    np.random.seed(123)
    torch.manual_seed(7)
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    a = make_mask(kind, (64, 64), 4, 0.08, seed=11)
    b = make_mask(kind, (64, 64), 4, 0.08, seed=11)
    c = make_mask(kind, (64, 64), 4, 0.08, seed=12)
    np.testing.assert_array_equal(a.mask, b.mask)
    if kind != "equispaced":  # equispaced differs only by offset; may coincide
        assert not np.array_equal(a.mask, c.mask)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_apply_mask_produces_no_negative_zeros():
    k = -torch.ones(4, 6, dtype=torch.complex64)
    mask = np.array([1, 0, 1, 0, 0, 1], dtype=np.float32)
    out = apply_mask(k, mask)
    assert not torch.any(torch.signbit(out.real[:, mask == 0])) and not torch.any(
        torch.signbit(out.imag[:, mask == 0])
    )
    out_np = apply_mask(-np.ones((4, 6), dtype=np.complex64), mask)
    assert not np.any(np.signbit(out_np.real[:, mask == 0]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("spiral", (8, 8), 4, 0.08)
    with pytest.raises(ValueError, match="acceleration"):
        make_mask("random", (8, 8), 1, 0.08)
