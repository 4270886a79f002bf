"""enhance_volume / enhance_kspace: output grid, data consistency, units, seeds.

The output grid is the simulation's source grid.
"""

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest

from medidiff.io import Volume
from medidiff.physics.simulate import simulate_recon, simulate_sr
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume
from medidiff.recipe import load_recipe, with_overrides
from tests.pipeline.perturbed import SMOKE, perturbed_model

MNI = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TASKS = {"sr": {"kind": "sr", "factor": 2}, "sr_thick": {"kind": "sr_thick", "factor": 4},
         "recon": {"kind": "recon", "acceleration": 4.0, "center_fraction": 0.08}}


@pytest.fixture(scope="module")
def mni() -> Volume:
    img = nib.load(str(MNI))
    return Volume(np.asarray(img.dataobj, np.float32), img.affine)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained networks with a non-trivial output (MONAI zero-initialises the last conv)."""
    out = {}
    for task, cfg in TASKS.items():
        recipe = with_overrides(
            load_recipe(SMOKE), task=cfg, model={"neighbours": 1 if task == "sr_thick" else 0}
        )
        out[task] = perturbed_model(recipe, tmp_path_factory.mktemp(task) / "m", 0.02)
    return out


def _crop(vol: Volume, sl) -> Volume:
    a = vol.array[sl]
    shift = np.eye(4)
    shift[:3, 3] = [s.start or 0 for s in sl]
    return Volume(a, vol.affine @ shift)


def test_inplane_sr_lands_on_source_grid_and_keeps_data(mni, models):
    x = _crop(mni, (slice(50, 130), slice(60, 160), slice(80, 86)))
    lr, _ref = simulate_sr(x, 2, axis="inplane", seed=0)
    calls = []
    res = enhance_volume(lr, task="sr", model=models["sr"], samples=2, seed=3, batch_slices=4,
                         progress=lambda d, t: calls.append((d, t)))
    assert res.enhanced.shape == x.shape and np.allclose(res.enhanced.affine, x.affine)
    for v in (res.baseline, res.residual, res.uncertainty):
        assert v.shape == x.shape and np.allclose(v.affine, x.affine)
    assert calls == [(4, 6), (6, 6)]
    again, _ = simulate_sr(res.enhanced, 2, axis="inplane", seed=0)  # A(output) reproduces the input
    assert np.linalg.norm(again.array - lr.array) / np.linalg.norm(lr.array) < 1e-3
    assert res.metrics["dc_residual_rel"] < 1e-3 and res.metrics["network_evals"] <= 10
    assert 0.0 <= res.metrics["residual_weight"] <= 1.0


def test_through_plane_sr_lands_on_source_grid(mni, models):
    x = _crop(mni, (slice(60, 64), slice(70, 130), slice(60, 100)))
    lr, _ = simulate_sr(x, 4, axis="through", seed=0)
    res = enhance_volume(lr, task="sr_thick", model=models["sr_thick"], seed=0)
    assert res.enhanced.shape == x.shape and np.allclose(res.enhanced.affine, x.affine)
    again, _ = simulate_sr(res.enhanced, 4, axis="through", seed=0)
    assert np.linalg.norm(again.array - lr.array) / np.linalg.norm(lr.array) < 1e-3


def test_units_seed_and_do_no_harm_switch(mni, models):
    # fp32 arithmetic: the scale equivariance checked here is the algorithm's (bf16 rounds at ~0.4 %)
    x = _crop(mni, (slice(50, 114), slice(60, 124), slice(90, 92)))
    lr, _ = simulate_sr(x, 2, axis="inplane", seed=0)
    a = enhance_volume(lr, task="sr", model=models["sr"], seed=5, self_check=False, precision="fp32")
    b = enhance_volume(lr, task="sr", model=models["sr"], seed=5, self_check=False, precision="fp32")
    assert np.array_equal(a.enhanced.array, b.enhanced.array)
    scaled = enhance_volume(lr.with_array(lr.array * 1000.0), task="sr", model=models["sr"], seed=5,
                            self_check=False, precision="fp32")  # outputs are in the input's units
    np.testing.assert_allclose(scaled.enhanced.array, a.enhanced.array * 1000.0, rtol=1e-3, atol=1e-2)
    assert a.metrics["residual_weight"] == 1.0
    checked = enhance_volume(lr, task="sr", model=models["sr"], seed=5, precision="fp32")
    # with the self-check the output is baseline + w (model - baseline), w from the scan itself
    w = checked.metrics["residual_weight"]
    blended = a.baseline.array + w * (a.enhanced.array - a.baseline.array)
    np.testing.assert_allclose(checked.enhanced.array, blended,
                               rtol=1e-4, atol=1e-3 * float(np.abs(x.array).max()))
    with pytest.raises(ValueError, match="trained for task 'sr'"):
        enhance_volume(lr, task="sr_thick", model=models["sr"])
    with pytest.raises(ValueError, match="does factor 2, not 4"):
        enhance_volume(lr, task="sr", model=models["sr"], factor=4)


def test_recon_keeps_measured_kspace_on_ifft_scale(mni, models):
    from medidiff.physics.fft import fft2c_np

    x = _crop(mni, (slice(40, 136), slice(50, 146), slice(90, 93)))
    data, _ref = simulate_recon(x, 4.0, 0.08, "equispaced", 1, 0)
    res = enhance_kspace(data, model=models["recon"], samples=2, seed=0)
    assert res.enhanced.shape == data.image_shape and np.allclose(res.enhanced.affine, data.affine)
    assert res.uncertainty is not None and res.metrics["dc_residual_rel"] < 1e-3
    zero_filled = data.image().array
    np.testing.assert_allclose(res.baseline.array, zero_filled, rtol=1e-4, atol=1e-4 * zero_filled.max())
    mask = np.broadcast_to(data.mask, data.kspace.shape[-2:]) > 0
    # magnitude output: its k-space on the measured samples matches where the image is real and positive
    k_out = fft2c_np(np.moveaxis(res.enhanced.array, -1, 0).astype(np.complex64))
    rel = np.linalg.norm((k_out - data.kspace)[:, mask]) / np.linalg.norm(data.kspace[:, mask])
    assert rel < 0.05


def test_slice_batches_are_capped_by_area_unless_asked():
    """Bounded memory: big slices go through the network a few at a time; an explicit size is obeyed."""
    from medidiff.pipeline.enhance import MAX_BATCH_PIXELS, slices_per_batch

    assert slices_per_batch(None, 8, 256 * 256) == 8
    assert slices_per_batch(None, 8, 512 * 512) == 2
    assert slices_per_batch(None, 8, 2048 * 2048) == 1
    assert slices_per_batch(5, 8, 2048 * 2048) == 5
    assert slices_per_batch(None, 8, 512 * 512) * 512 * 512 <= MAX_BATCH_PIXELS


def test_through_plane_self_ensemble_averages_flipped_copies(mni, models):
    """The self-ensemble is the mean of the flipped copies' outputs, flipped back, each drawn with the
    runner's generator in turn; it keeps the data (the operator commutes with the flips) and counts its
    network evaluations."""
    import torch

    from medidiff.pipeline.enhance import _Runner, ensemble_flips, slice_stack
    from medidiff.tasks import measurement_scale, task_operator

    loaded = models["sr_thick"]
    x = _crop(mni, (slice(60, 63), slice(70, 134), slice(60, 100)))
    lr, _ = simulate_sr(x, 4, axis="through", seed=0)
    stack = slice_stack(lr, "sr_thick", 4).stack
    y = torch.from_numpy(np.ascontiguousarray(stack)) / measurement_scale("sr_thick", stack)
    op = task_operator(loaded.recipe.task)
    single = _Runner(loaded, None, 1, seed=7, precision="fp32", self_ensemble=1)
    outs = [single.run(op, y.flip(d) if d else y).mean for d in ensemble_flips(4)]
    back = [o.flip(d) if d else o for o, d in zip(outs, ensemble_flips(4), strict=True)]
    expected = torch.stack(back).mean(dim=0)
    ens = _Runner(loaded, None, 1, seed=7, precision="fp32", self_ensemble=4)
    got = ens.run(op, y)
    torch.testing.assert_close(got.mean, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got.mean, outs[0], atol=1e-4)  # the copies differ: the average is not a copy
    assert float((op.A(got.mean) - y).norm() / y.norm()) < 1e-4  # data-consistent
    assert got.network_evals == 4 * single.steps == ens.network_evals

    res = enhance_volume(lr, task="sr_thick", model=loaded, seed=0, self_ensemble=2, self_check=False)
    assert res.metrics["network_evals"] == 2 * loaded.recipe.diffusion.steps
    again, _ = simulate_sr(res.enhanced, 4, axis="through", seed=0)
    assert np.linalg.norm(again.array - lr.array) / np.linalg.norm(lr.array) < 1e-3
    with pytest.raises(ValueError, match="self-ensemble 4 is for through-plane SR"):
        enhance_volume(lr, task="sr", model=models["sr"], self_ensemble=4)


def test_self_ensemble_recipe_and_settings_checks():
    from medidiff.pipeline.settings import EnhanceSettings
    from medidiff.recipe import RecipeError, validate

    thick = with_overrides(load_recipe(SMOKE), task=TASKS["sr_thick"], enhance={"self_ensemble": 4})
    assert validate(thick).enhance.self_ensemble == 4
    with pytest.raises(RecipeError, match="enhance.self_ensemble must be one of"):
        validate(with_overrides(thick, enhance={"self_ensemble": 3}))
    with pytest.raises(RecipeError, match="is for through-plane SR"):
        validate(with_overrides(load_recipe(SMOKE), task=TASKS["sr"], enhance={"self_ensemble": 2}))
    with pytest.raises(ValueError, match="self_ensemble must be 1, 2 or 4"):
        EnhanceSettings(self_ensemble=3)
    # at its default it leaves the scan fingerprints of earlier batches unchanged
    assert "self_ensemble" not in EnhanceSettings().fingerprint_params()
    assert EnhanceSettings(self_ensemble=1).fingerprint_params()["self_ensemble"] == 1
