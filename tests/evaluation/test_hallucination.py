"""Hallucination flags: texture / blobs planted in the model-filled band are flagged, faithful output not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medidiff.data.shipped import mni_t1
from medidiff.evaluation.calibration import body_mask
from medidiff.evaluation.hallucination import (
    band_masks,
    flag_precision_recall,
    flag_scores,
    flag_summary,
    flags,
)
from medidiff.physics.operators import KSpaceTruncation

FACTOR = 2
OP = KSpaceTruncation(FACTOR)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32)[None])


def _highpass(img: np.ndarray) -> np.ndarray:
    """The model-filled band of ``img``: what sinc upsampling of its LR version cannot hold."""
    return img - OP.pinv(OP.A(_t(img)))[0].numpy()


@pytest.fixture(scope="module")
def scene() -> dict:
    """An axial MNI slice (1 mm), its SR x2 measurement, classical image and a faithful SR output."""
    vol = mni_t1().array
    ref = vol[:192, :224, vol.shape[2] // 2].astype(np.float32)
    ref /= np.percentile(ref, 99.5)
    y = OP.A(_t(ref))
    classical = OP.pinv(y)[0].numpy()
    rng = np.random.default_rng(0)
    good = OP.project(_t(ref + 0.01 * rng.standard_normal(ref.shape)), y)[0].numpy()
    yy, xx = np.mgrid[: ref.shape[0], : ref.shape[1]]
    return {
        "ref": ref,
        "classical": classical,
        "good": good,
        "mask": body_mask(classical),
        "rng": rng,
        "yy": yy,
        "xx": xx,
    }


def _bump(scene: dict, cy: int, cx: int, r: float) -> np.ndarray:
    return np.exp(-((scene["yy"] - cy) ** 2 + (scene["xx"] - cx) ** 2) / (2 * r**2))


def _texture(scene: dict, amplitude: float = 0.15) -> np.ndarray:
    tex = _highpass(scene["rng"].standard_normal(scene["ref"].shape))
    return amplitude * tex / tex.std() * _bump(scene, 60, 70, 10)


def test_band_masks_split_the_spectrum() -> None:
    filled, upper = band_masks("sr", 2, 32)
    assert not (filled & upper).any()
    assert not filled[0, 0] and not filled[7, 7] and filled[16, 0] and filled[0, 16]
    thick_filled, _ = band_masks("sr_thick", 4, 32)
    assert thick_filled[:, 12].all() and not thick_filled[:, 3].any()  # only along the thick (last) axis
    with pytest.raises(ValueError, match="task"):
        band_masks("denoise", 2, 32)


def test_faithful_outputs_are_not_flagged(scene: dict) -> None:
    for output in (scene["ref"], scene["classical"], scene["good"]):
        assert (
            flag_summary(flags(output, scene["classical"], task="sr", factor=FACTOR), scene["mask"])[
                "flagged_fraction"
            ]
            == 0.0
        )


def test_planted_texture_is_flagged(scene: dict) -> None:
    out = scene["good"] + _texture(scene)
    flag_map = flags(out, scene["classical"], task="sr", factor=FACTOR)
    assert flag_map[60, 70]
    assert not flag_map[100:, :110].any()  # a clean quadrant of the brain stays clean
    pr = flag_precision_recall(flag_map, np.abs(out - scene["ref"]), scene["mask"], top=0.05)
    assert pr["precision"] > 0.5 and pr["recall"] > 0.5, pr
    assert 0 < flag_summary(flag_map, scene["mask"])["flagged_fraction"] < 0.1


def test_planted_dot_is_flagged_by_small_patches(scene: dict) -> None:
    """A fake bright dot (0.8 px, tissue-bright) in the model-filled band.

    Diluted in 32 px patches, not in 16.
    """
    out = scene["good"] + _highpass(1.0 * _bump(scene, 130, 150, 0.8))
    fine = flags(out, scene["classical"], task="sr", factor=FACTOR, patch=16, stride=8)
    assert fine[130, 150] and fine.sum() < 400
    assert not flags(scene["good"], scene["classical"], task="sr", factor=FACTOR, patch=16, stride=8).any()


def test_disagreeing_samples_flag_more_than_one_image(scene: dict) -> None:
    """K samples that each invent a different texture in one region.

    The mean hides it, the spread does not.
    """
    rng = scene["rng"]
    samples = np.stack(
        [
            scene["good"] + _texture(scene) + _highpass(0.01 * rng.standard_normal(scene["ref"].shape))
            for _ in range(4)
        ]
    )
    mean = samples.mean(axis=0)
    region = _bump(scene, 60, 70, 10) > 0.3
    single = flags(mean, scene["classical"], task="sr", factor=FACTOR)
    multi = flags(mean, scene["classical"], samples, task="sr", factor=FACTOR)
    assert multi[region].mean() > 0.9 > single[region].mean()
    assert not multi[100:, :110].any()
    pr = flag_precision_recall(multi, np.abs(samples[0] - scene["ref"]), scene["mask"])
    assert pr["recall"] > 0.5


def test_volume_input_is_scored_plane_by_plane(scene: dict) -> None:
    out = scene["good"] + _texture(scene)
    vol_out = np.stack([scene["good"], out, scene["good"]], axis=0)  # planes along axis 0
    vol_cls = np.stack([scene["classical"]] * 3, axis=0)
    scores = flag_scores(
        vol_out,
        vol_cls,
        task="sr",
        factor=FACTOR,
        slice_axis=0,
        scale=float(np.percentile(scene["classical"], 99.5)),
    )
    assert scores.shape == vol_out.shape and scores.dtype == np.float32
    assert scores[1].max() >= 1 and scores[0].max() < 1 and scores[2].max() < 1
    plane = flag_scores(
        out,
        scene["classical"],
        task="sr",
        factor=FACTOR,
        scale=float(np.percentile(scene["classical"], 99.5)),
    )
    np.testing.assert_allclose(scores[1], plane, rtol=1e-5)


def test_thick_slice_volumes_use_planes_that_contain_the_thick_axis() -> None:
    rng = np.random.default_rng(5)
    vol = rng.random((40, 6, 48)).astype(np.float32)  # thick axis 2
    cls = vol * 0.5
    scores = flag_scores(vol, cls, task="sr_thick", factor=4, thick_axis=2, slice_axis=2, scale=1.0)
    # planes across axis 0 (the first non-thick axis), each (6, 48) with the thick axis last
    for i in (0, 17):
        plane = flag_scores(vol[i], cls[i], task="sr_thick", factor=4, scale=1.0, patch=32, stride=16)
        np.testing.assert_allclose(scores[i], plane, rtol=1e-5)
    across_1 = flag_scores(vol, cls, task="sr_thick", factor=4, thick_axis=2, slice_axis=1, scale=1.0)
    np.testing.assert_allclose(
        across_1[:, 3], flag_scores(vol[:, 3], cls[:, 3], task="sr_thick", factor=4, scale=1.0), rtol=1e-5
    )


def test_precision_recall_known_values() -> None:
    err = np.zeros((10, 10))
    err[0, :5] = 1.0  # the top 5 % of 100 voxels
    flag_map = np.zeros((10, 10), bool)
    flag_map[0, :10] = True
    pr = flag_precision_recall(flag_map, err, top=0.05)
    assert pr["precision"] == 0.5 and pr["recall"] == 1.0 and pr["flagged_fraction"] == 0.1
