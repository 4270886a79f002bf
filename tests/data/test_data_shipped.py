"""Shipped real data: the held-out evaluation set never leaks into training."""

from __future__ import annotations

import numpy as np

from medidiff.data import shipped
from medidiff.io import Volume


def test_data_evaluation_files_are_held_out():
    train_paths = {p.resolve() for p in shipped.training_paths()}
    eval_paths = {p.resolve() for p in shipped.evaluation_paths()}
    assert len(eval_paths) == 4 and not train_paths & eval_paths
    train = shipped.real_training_volumes()
    evaluation = shipped.real_evaluation_volumes()
    assert not {n for n, _ in train} & {n for n, _ in evaluation}
    for _, tv in train:  # no training volume is (a copy of) an evaluation volume
        for _, ev in evaluation:
            assert tv.shape != ev.shape or not np.allclose(tv.array, ev.array)
        for p in tv.source_files:
            assert p.resolve() not in eval_paths


def test_data_evaluation_volumes_load():
    vols = dict(shipped.real_evaluation_volumes())
    expected = {
        "dipy_t1_coronal_slice": (256, 256, 1),
        "dipy_aniso_vox": (58, 58, 24),
        "dipy_S0_10slices": (128, 128, 10),
        "pydicom_MR_small": (64, 64, 1),
    }
    assert {k: v.shape for k, v in vols.items()} == expected
    for name, v in vols.items():
        assert isinstance(v, Volume) and v.array.dtype == np.float32, name
        assert np.isfinite(v.array).all() and v.array.max() > 0, name
    assert np.allclose(vols["dipy_t1_coronal_slice"].spacing, 1.0)
    assert np.allclose(vols["dipy_aniso_vox"].spacing, (4, 4, 5), atol=1e-4)


def test_data_mni_and_tissue_maps():
    t1 = shipped.mni_t1()
    assert t1.shape == (197, 233, 189) and np.allclose(t1.spacing, 1.0)
    maps = shipped.mni_tissue_maps()
    assert set(maps) == {"gm", "wm", "csf"}
    for name, m in maps.items():
        assert m.shape == t1.shape and m.dtype == np.float32, name
        assert m.min() >= 0 and m.max() <= 1 and m.sum() > 1e4, name
    # Known contrast of a T1 template: WM brighter than GM brighter than CSF.
    means = {k: float((t1.array * m).sum() / m.sum()) for k, m in maps.items()}
    assert means["wm"] > means["gm"] > means["csf"]
    # The cache hands out copies: editing one does not change the next.
    t1.array[:] = 0
    assert shipped.mni_t1().array.max() > 0
