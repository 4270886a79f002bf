"""Training-image engine: synthetic, natural and real-MR sources and their seeded mixture.

Determinism per seed, shapes and dtypes, statistics (range, noise level on a flat region, zero background),
the fixed out-of-domain split and the real-MR training split.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation, uniform_filter
from torch.utils.data import DataLoader

from medidiff.data import shipped
from medidiff.data.generators import (
    AcquisitionConfig,
    SynthConfig,
    kspace_downsample,
    rician,
    synthetic_image,
)
from medidiff.data.mixture import (
    SOURCES,
    TrainingImageDataset,
    TrainingImageSource,
    check_weights,
    preview_figure,
)
from medidiff.data.mri_slices import MRISliceSource
from medidiff.data.natural import NATURAL_FILES, OOD_NAMES, NaturalImageSource, natural_images
from medidiff.physics.operators import KSpaceTruncation


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- synthetic -------------------------------------------------------------------------------------------


def test_data_generators_synthetic_same_seed_same_image_global_rng_untouched():
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    a, b = synthetic_image(_rng(3), 64), synthetic_image(_rng(3), 64)
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1])
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()
    assert np.array_equal(a.image, b.image) and np.array_equal(a.clean, b.clean)
    assert np.array_equal(a.body, b.body) and a.params == b.params


def test_data_generators_synthetic_different_seeds_differ():
    images = [synthetic_image(_rng(s), 64).image for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(np.corrcoef(images[i].ravel(), images[j].ravel())[0, 1]) < 0.95


def test_data_generators_synthetic_shapes_and_statistics():
    cfg = SynthConfig()
    backgrounds, contrasts = set(), set()
    for seed in range(40):
        s = synthetic_image(_rng(seed), (48, 64), cfg)
        assert s.image.shape == s.clean.shape == s.body.shape == (48, 64)
        assert s.image.dtype == np.float32 and s.clean.dtype == np.float32 and s.body.dtype == bool
        assert np.isfinite(s.image).all() and s.image.min() >= 0 and s.clean.min() >= 0
        # Normalised: the tissue 99th percentile is 1 before noise, and noise does not move it far.
        assert np.percentile(s.clean[s.body], 99) == pytest.approx(1.0, abs=0.02)
        assert 0.8 < np.percentile(s.image[s.body], 99) < 1.5 and s.image.max() < 3.0
        assert cfg.pixel_mm[0] <= s.params["pixel_mm"] <= cfg.pixel_mm[1]
        assert cfg.acquisition.snr[0] <= s.params["snr"] <= cfg.acquisition.snr[1]
        backgrounds.add(s.params["background"])
        contrasts.add(s.params["contrast"])
    assert backgrounds == {"zero", "noise"}
    assert len(contrasts) >= 4


def test_data_generators_zero_background_is_exactly_the_masked_outside():
    cfg = SynthConfig(full_fov_p=0.0, acquisition=AcquisitionConfig(zero_background_p=1.0))
    checked = 0
    for seed in range(30):
        s = synthetic_image(_rng(seed), 96, cfg)
        if s.body.all():
            continue
        grow = s.params["mask_dilation_px"]
        kept = binary_dilation(s.body, iterations=grow) if grow else s.body
        assert np.array_equal(s.image == 0, ~kept)  # Rician noise is never exactly 0 inside
        assert s.params["background_fraction"] == pytest.approx(float((~kept).mean()))
        checked += 1
    assert checked >= 10


def test_data_generators_noise_floor_background_is_rayleigh():
    cfg = SynthConfig(full_fov_p=0.0, acquisition=AcquisitionConfig(zero_background_p=0.0, snr=(20.0, 20.0)))
    for seed in range(10):
        s = synthetic_image(_rng(seed), 128, cfg)
        air = ~binary_dilation(s.body, iterations=6)
        if air.sum() < 2000:
            continue
        assert (s.image > 0).all()
        # Magnitude of pure complex noise: mean sigma * sqrt(pi / 2).
        assert s.image[air].mean() == pytest.approx(np.sqrt(np.pi / 2) / 20.0, rel=0.1)
        return
    pytest.fail("no image with enough background")


def test_data_generators_snr_measured_on_a_flat_region():
    snr = (15.0, 60.0)
    cfg = SynthConfig(
        labels=(2, 2), max_shapes=0, full_fov_p=1.0, texture_free_p=1.0, bias=0.0, ringing_p=0.0,
        acquisition=AcquisitionConfig(snr=snr),
    )  # fmt: skip
    measured = 0
    for seed in range(12):
        s = synthetic_image(_rng(seed), 128, cfg)
        mean = uniform_filter(s.clean, 9)
        local_var = uniform_filter(s.clean**2, 9) - mean**2
        flat = (local_var < 1e-7) & (s.clean > 0.3)
        level = np.median(s.clean[flat]) if flat.any() else 0.0
        flat &= np.abs(s.clean - level) < 2e-3  # one tissue, one intensity
        if flat.sum() < 1000:
            continue
        snr_flat = 1.0 / float(s.image[flat].std())  # tissue 99th percentile = 1, so SNR = 1 / sigma
        assert snr_flat == pytest.approx(s.params["snr"], rel=0.1)
        assert 0.9 * snr[0] <= snr_flat <= 1.1 * snr[1]
        measured += 1
    assert measured >= 4


def test_data_generators_kspace_downsample_and_rician_known_values():
    # A cosine below the new Nyquist survives cropping exactly; a constant keeps its value.
    _, x = np.mgrid[0:64, 0:64]
    wave = np.cos(2 * np.pi * 5 * x / 64).astype(np.float32) + 2.0
    down = kspace_downsample(wave, (32, 32))
    assert np.allclose(down, np.cos(2 * np.pi * 5 * x[::2, ::2] / 64) + 2.0, atol=1e-5)
    assert np.allclose(
        kspace_downsample(np.full((64, 64), 3.0, np.float32), (32, 32), taper=0.7), 3.0, atol=1e-5
    )
    # A step edge truncated without apodisation rings (Gibbs overshoot about 9 %); strong apodisation
    # does not.
    step = (x >= 32).astype(np.float32)[:, :] * 1.0
    fine = np.repeat(np.repeat(step, 2, 0), 2, 1)
    assert kspace_downsample(fine, (64, 64), 0.0).max() > 1.06
    assert kspace_downsample(fine, (64, 64), 1.0).max() < 1.02
    noise = rician(np.zeros((256, 256), np.float32), 0.1, _rng(0))
    assert noise.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.02)


def test_data_generators_bad_configuration_fails_loudly():
    with pytest.raises(ValueError, match="snr"):
        AcquisitionConfig(snr=(50.0, 10.0))
    with pytest.raises(ValueError, match="size"):
        synthetic_image(_rng(0), 31)


# --- natural images --------------------------------------------------------------------------------------


def test_data_generators_natural_ood_split_disjoint_from_train():
    train, ood = natural_images("train"), natural_images("ood")
    train_names, ood_names = {n for n, _ in train}, {n for n, _ in ood}
    assert ood_names == set(OOD_NAMES) and not train_names & ood_names
    assert train_names | ood_names == {n for n, _, _ in NATURAL_FILES}
    for _, img in train + ood:
        assert img.ndim == 2 and img.dtype == np.float32 and not img.flags.writeable
        assert min(img.shape) >= 128 and np.isfinite(img).all()
    for _, a in train:  # no held-out image hides in training under another name
        for _, b in ood:
            assert a.shape != b.shape or not np.allclose(a, b, atol=0.02)
    src = NaturalImageSource("train")
    drawn = {src.sample(_rng(seed), 32).params["image"] for seed in range(60)}
    assert drawn <= train_names and len(drawn) > 10
    with pytest.raises(ValueError, match="split"):
        natural_images("test")


def test_data_generators_natural_source_seeded_and_in_range():
    src = NaturalImageSource("train")
    a, b = src.sample(_rng(5), 64), src.sample(_rng(5), 64)
    assert np.array_equal(a.image, b.image) and a.params == b.params
    assert not np.array_equal(a.image, src.sample(_rng(6), 64).image)
    for seed in range(20):
        s = src.sample(_rng(seed), (64, 48))
        assert s.image.shape == (64, 48) and s.image.dtype == np.float32
        assert np.isfinite(s.image).all() and s.image.min() >= 0
        assert np.percentile(s.clean[s.body], 99) == pytest.approx(1.0, abs=0.02)


# --- real MR -----------------------------------------------------------------------------------------------


def test_data_generators_mri_source_never_touches_held_out_volumes(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the held-out evaluation data was read")

    for name in ("real_evaluation_volumes", "evaluation_paths", "_coronal_slice"):
        monkeypatch.setattr(shipped, name, forbidden)
    evaluation = {rel for _, rel in shipped.EVALUATION_FILES}
    assert not evaluation & {rel for _, rel in shipped.TRAINING_FILES}
    src = MRISliceSource()
    assert src.names == [name for name, _ in shipped.real_training_volumes()]
    for seed in range(8):
        s = src.sample(_rng(seed), 64)
        assert s.params["volume"] in src.names
        assert 0.5 - 1e-6 <= s.params["pixel_mm"] <= 2.0 + 1e-6
        assert s.image.shape == (64, 64) and s.image.dtype == np.float32 and s.image.min() >= 0
        assert s.body.mean() > 0.02  # the patch is centred on signal
    a, b = src.sample(_rng(1), 64), src.sample(_rng(1), 64)
    assert np.array_equal(a.image, b.image)


# --- mixture -------------------------------------------------------------------------------------------


def test_data_generators_mixture_weights_and_batches(monkeypatch):
    with pytest.raises(ValueError, match="unknown"):
        check_weights({"synthetic": 1.0, "brains": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        check_weights({"synthetic": 0.0})
    assert check_weights({"synthetic": 3.0, "natural": 1.0}) == {
        "synthetic": 0.75,
        "natural": 0.25,
        "mri": 0.0,
    }

    def forbidden():
        raise AssertionError("a source with weight 0 was built")

    monkeypatch.setattr(shipped, "real_training_volumes", forbidden)
    src = TrainingImageSource(32, {"synthetic": 0.5, "natural": 0.5})
    images, sources = src.batch(_rng(0), 200)
    assert images.shape == (200, 32, 32) and images.dtype == np.float32
    assert set(sources) <= set(SOURCES) and 0.4 < sources.count("synthetic") / 200 < 0.6
    again, _ = src.batch(_rng(0), 200)
    assert np.array_equal(images, again)
    first = [next(src.stream(9)).image for _ in range(2)]
    assert np.array_equal(first[0], first[1])


def test_data_generators_iterable_dataset_seeded_per_worker_and_epoch():
    ds = TrainingImageDataset(TrainingImageSource(32, {"synthetic": 1.0}), seed=4, samples_per_epoch=6)
    one = [item["image"] for item in DataLoader(ds, batch_size=None)]
    assert len(one) == 6 and one[0].shape == (1, 32, 32) and one[0].dtype == torch.float32
    assert all(torch.equal(x, y["image"]) for x, y in zip(one, DataLoader(ds, batch_size=None), strict=True))
    ds.set_epoch(1)
    assert not torch.equal(one[0], next(iter(DataLoader(ds, batch_size=None)))["image"])
    ds.set_epoch(0)
    two = [item["image"] for item in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(two) == 6
    flat = [x.numpy().tobytes() for x in two]
    assert len(set(flat)) == 6  # the two workers draw different images
    assert one[0].numpy().tobytes() in flat  # worker 0 repeats the single-process stream


def test_data_generators_preview_figure_of_training_pairs(tmp_path):
    src = TrainingImageSource(64, {"synthetic": 1.0, "natural": 1.0})
    op = KSpaceTruncation(2)
    rng = _rng(0)
    references = [src.sample(rng) for _ in range(3)]
    low_res = [(op.A(torch.from_numpy(r.image)).numpy(), r.image) for r in references]
    path = preview_figure(low_res, tmp_path / "pairs.png", [r.source for r in references])
    with Image.open(path) as im:
        width_two, height = im.size
    assert height > 1.3 * width_two  # three rows of two panels
    zero_padded = [(op.A_adjoint(op.A(torch.from_numpy(r.image))).numpy(), r.image) for r in references]
    with Image.open(preview_figure(zero_padded, tmp_path / "same.png")) as im:
        assert im.size[0] > 1.3 * width_two  # a third column: the detail to learn
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError):
        preview_figure([], tmp_path / "none.png")
