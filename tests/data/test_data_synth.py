"""Synthetic subjects: deterministic per seed, distinct across seeds, global RNG untouched."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from medidiff.data.synth import head_shape, synth_subject

HALF = tuple(s // 2 for s in head_shape())


def test_data_synth_same_seed_same_subject_and_rng_untouched():
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    a, b = synth_subject(7, shape=HALF), synth_subject(7, shape=HALF)
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()
    assert np.array_equal(a.array, b.array) and np.array_equal(a.affine, b.affine)
    assert a.meta["synth"] == b.meta["synth"]


def test_data_synth_different_seeds_differ():
    vols = [synth_subject(s, shape=HALF) for s in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            x, y = vols[i].array, vols[j].array
            r = np.corrcoef(x.ravel(), y.ravel())[0, 1]
            assert r < 0.99, (i, j, r)
    for v in vols:
        assert v.shape == HALF and v.array.dtype == np.float32
        assert np.isfinite(v.array).all() and v.array.min() >= 0 and v.array.max() > 0
        assert np.allclose(v.spacing, 2.0, atol=0.05)


def test_data_synth_full_resolution_geometry_and_speed():
    t = time.perf_counter()
    v = synth_subject(11)
    seconds = time.perf_counter() - t
    assert v.shape == head_shape() and np.allclose(v.spacing, 1.0)
    assert seconds < 10, f"one subject took {seconds:.1f} s"
    # Same field of view at 1 mm and 2 mm: the centre voxel of both grids maps to (almost) the same point.
    h = synth_subject(11, shape=HALF)
    c_full = v.world_coordinates(np.asarray([[(n - 1) / 2 for n in v.shape]]))
    c_half = h.world_coordinates(np.asarray([[(n - 1) / 2 for n in h.shape]]))
    assert np.abs(c_full - c_half).max() < 1.5
    # The brain sits in the field of view: the bright voxels are not on the border.
    a = v.array
    inner = a[10:-10, 10:-10, 10:-10].sum()
    assert inner > 0.9 * a.sum()
