"""Lesion panel: seeded placement in tissue, contrast kept, CNR, and the blob detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medidiff.data.shipped import mni_t1
from medidiff.evaluation.lesions import (
    count_blobs,
    lesion_metrics,
    plant_lesions,
    run_lesion_panel,
)
from medidiff.physics.operators import KSpaceTruncation


def _flat_body(size: int = 128, value: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    return np.where(body, value, 0.0).astype(np.float32), body


@pytest.fixture(scope="module")
def mni_slice() -> np.ndarray:
    """An axial slice of the MNI152 T1 (1 mm), scaled to a robust maximum of 1."""
    vol = mni_t1().array
    ref = vol[:192, :224, vol.shape[2] // 2].astype(np.float32)
    return ref / np.percentile(ref, 99.5)


def test_placement_is_seeded_inside_tissue_and_apart() -> None:
    image, body = _flat_body()
    kwargs = {"sizes_mm": (2, 4, 8), "contrasts": (0.2, -0.2), "edges": ("sharp", "smooth"), "mask": body}
    out1, lesions1 = plant_lesions(image, (1.0, 1.0), np.random.default_rng(7), **kwargs)
    out2, lesions2 = plant_lesions(image, (1.0, 1.0), np.random.default_rng(7), **kwargs)
    _, lesions3 = plant_lesions(image, (1.0, 1.0), np.random.default_rng(8), **kwargs)
    assert lesions1 == lesions2 and np.array_equal(out1, out2)
    assert [x.center for x in lesions1] != [x.center for x in lesions3]
    assert len(lesions1) == 12 and np.array_equal(image, _flat_body()[0])  # input untouched
    depth = ndimage.distance_transform_edt(body)
    for i, a in enumerate(lesions1):
        assert depth[a.center] >= a.reach_mm() + 2.0
        assert a.local_mean == pytest.approx(100.0)
        for b in lesions1[i + 1 :]:
            assert np.hypot(*np.subtract(a.center, b.center)) >= a.reach_mm() + b.reach_mm()
    assert np.all(out1[~body] == 0)  # nothing planted outside the body


def test_planted_contrast_matches_nominal_on_flat_tissue() -> None:
    image, body = _flat_body()
    out, lesions = plant_lesions(
        image,
        (0.5, 0.5),
        np.random.default_rng(0),
        sizes_mm=(8,),
        contrasts=(0.2, -0.1),
        edges=("sharp",),
        mask=body,
    )
    rows = lesion_metrics(out, out, out, lesions)
    assert [r["contrast_reference"] for r in rows] == pytest.approx([20.0, -10.0], rel=0.05)
    assert all(r["kept_enhanced"] == pytest.approx(1.0) for r in rows)


def test_identity_enhancer_keeps_every_lesion(mni_slice: np.ndarray) -> None:
    panel = run_lesion_panel(
        [("mni", mni_slice, (1.0, 1.0))],
        enhance_fn=lambda measured: measured,
        classical_fn=lambda measured: ndimage.gaussian_filter(measured, 1.0),
        degrade_fn=lambda reference: reference,
        rng=np.random.default_rng(0),
        contrasts=(-0.2, -0.05, 0.05, 0.2),
        per_image=8,
    )
    rows = panel["lesions"]
    assert len(rows) == 3 * 4 * 2
    assert all(r["kept_enhanced"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert all(r["cnr_enhanced"] == pytest.approx(r["cnr_reference"]) for r in rows)
    summary = panel["summary"]
    assert summary["kept_ge_4mm_ok"] and summary["lesions_worse_than_classical"] == 0
    assert panel["blobs"] == [{"case": "mni", "enhanced": 0, "classical": panel["blobs"][0]["classical"]}]
    assert summary["blobs_ok"]


def test_blurring_enhancer_loses_small_lesions_first(mni_slice: np.ndarray) -> None:
    panel = run_lesion_panel(
        [("mni", mni_slice, (1.0, 1.0))],
        enhance_fn=lambda measured: ndimage.gaussian_filter(measured, 1.0),
        classical_fn=lambda measured: measured,
        degrade_fn=lambda reference: reference,
        rng=np.random.default_rng(1),
        contrasts=(-0.2, 0.2),
        per_image=6,
    )
    kept = {
        d: np.mean([r["kept_enhanced"] for r in panel["lesions"] if r["diameter_mm"] == d])
        for d in (2.0, 4.0, 8.0)
    }
    assert kept[2.0] < kept[4.0] < kept[8.0] and kept[8.0] - kept[2.0] > 0.3, kept
    assert not panel["summary"]["kept_ge_4mm_ok"]
    assert panel["summary"]["lesions_worse_than_classical"] == len(panel["lesions"])


def test_sinc_upsampling_keeps_large_lesions_better(mni_slice: np.ndarray) -> None:
    """SR x2 by k-space truncation: the classical image's contrast kept, per size."""
    op = KSpaceTruncation(2)

    def degrade(x: np.ndarray) -> torch.Tensor:
        return op.A(torch.from_numpy(x[None]))

    def sinc(y: torch.Tensor) -> np.ndarray:
        return op.pinv(y)[0].numpy()

    panel = run_lesion_panel(
        [("mni", mni_slice, (1.0, 1.0))],
        sinc,
        sinc,
        degrade,
        np.random.default_rng(2),
        contrasts=(0.2,),
        per_image=6,
    )
    kept = {r["diameter_mm"]: r["kept_classical"] for r in panel["lesions"] if r["edge"] == "sharp"}
    assert kept[8.0] > 0.9 and kept[2.0] < kept[8.0]
    assert panel["summary"]["lesions_worse_than_classical"] == 0


def test_blob_counter_finds_a_planted_blob_and_not_noise_or_ridges() -> None:
    rng = np.random.default_rng(0)
    shape = (128, 128)
    mask = np.ones(shape, bool)
    noise = 0.02 * rng.standard_normal(shape)
    assert count_blobs(noise, mask, (1.0, 1.0)) == 0
    blob, _ = plant_lesions(
        np.ones(shape, np.float32),
        (1.0, 1.0),
        rng,
        sizes_mm=(6,),
        contrasts=(0.06,),
        edges=("sharp",),
        mask=mask,
    )
    assert count_blobs(blob - 1 + noise, mask, (1.0, 1.0)) == 1
    two, _ = plant_lesions(
        np.ones(shape, np.float32),
        (1.0, 1.0),
        rng,
        sizes_mm=(4, 8),
        contrasts=(-0.2,),
        edges=("smooth",),
        mask=mask,
    )
    assert count_blobs(two - 1 + noise, mask, (1.0, 1.0)) == 2
    ridge = np.zeros(shape)
    ridge[:, 60:63] = 0.3  # an edge-like residue: long, not a blob
    assert count_blobs(ridge + noise, mask, (1.0, 1.0)) == 0
    assert count_blobs(blob - 1 + noise, mask, (1.0, 1.0), min_amplitude=0.5) == 0


def test_volume_lesions_are_discs_in_one_slice() -> None:
    image2d, body2d = _flat_body(96)
    volume = np.repeat(image2d[:, :, None], 6, axis=2)
    out, lesions = plant_lesions(
        volume, (1.0, 1.0, 3.0), np.random.default_rng(3), sizes_mm=(4, 8), contrasts=(0.3,), edges=("sharp",)
    )
    changed = np.argwhere(out != volume)
    for lesion in lesions:
        assert lesion.slice_axis == 2
    assert set(changed[:, 2]) == {les.center[2] for les in lesions}
    blobs = count_blobs(out - volume, np.repeat(body2d[:, :, None], 6, axis=2), (1.0, 1.0, 3.0))
    assert blobs == 2
