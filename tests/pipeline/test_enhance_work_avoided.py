"""Work avoided in enhance: air is not sent through the network, and a gate that returns the classical image
costs no network evaluation beyond its own self-check."""

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest

from medidiff.io import Volume
from medidiff.io.kspace import KSpaceData
from medidiff.metrics import psnr
from medidiff.models import default_model
from medidiff.physics.fft import fft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.simulate import simulate_sr
from medidiff.pipeline import enhance as enhance_mod
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume
from medidiff.recipe import load_recipe, with_overrides
from tests.pipeline.perturbed import SMOKE, perturbed_model

MNI = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


def _head_with_air(n_anatomy: int, n_air: int, seed: int = 0) -> np.ndarray:
    """Whole axial MNI152 slices (head and the air around it) followed by slices of air only; Rician noise
    on everything, as a magnitude scanner image has."""
    arr = np.asarray(nib.load(str(MNI)).dataobj, np.float32)[:, :, 80:80 + n_anatomy]
    arr = arr[: arr.shape[0] // 4 * 4, : arr.shape[1] // 4 * 4]
    vol = np.concatenate([arr, np.zeros((*arr.shape[:2], n_air), np.float32)], axis=2)
    rng = np.random.default_rng(seed)
    sigma = 0.01 * float(arr.max())
    return np.abs(vol + sigma * rng.standard_normal(vol.shape) + 1j * sigma * rng.standard_normal(vol.shape))


@pytest.fixture(scope="module")
def scan():
    hr = Volume(_head_with_air(3, 3).astype(np.float32), np.eye(4))
    lr, ref = simulate_sr(hr, 2, axis="inplane", seed=0)
    return lr, ref


def test_air_slices_come_back_classical_and_the_body_is_enhanced(scan):
    lr, _ = scan
    res = enhance_volume(lr, task="sr", self_check=False, seed=0)  # gate off: the model is used everywhere
    enh, base = res.enhanced.array, res.baseline.array
    # slice 3 is next to anatomy (the mask keeps one slice of margin); slices 4 and 5 are air only
    for k in (4, 5):
        assert np.array_equal(enh[..., k], base[..., k]), f"air slice {k} went through the network"
    for k in (0, 1, 2):
        assert not np.allclose(enh[..., k], base[..., k]), f"anatomy slice {k} was not enhanced"
    assert 0.0 < res.metrics["foreground_fraction"] < 0.8


def test_skipping_air_slices_leaves_the_body_slices_alone(scan):
    lr, ref = scan
    on = enhance_volume(lr, task="sr", self_check=False, seed=0)
    off = enhance_volume(lr, task="sr", self_check=False, seed=0, skip_background=False)
    body = slice(0, 3)
    p_on = psnr(ref.array[..., body], on.enhanced.array[..., body])
    p_off = psnr(ref.array[..., body], off.enhanced.array[..., body])
    p_base = psnr(ref.array[..., body], on.baseline.array[..., body])
    assert p_off > p_base + 0.3, "the shipped model helps on this head"
    assert abs(p_on - p_off) < 0.05, (p_on, p_off)
    assert on.metrics["dc_residual_rel"] < 1e-4
    assert off.metrics["foreground_fraction"] == 1.0


def test_a_declined_scan_costs_only_the_self_check(scan, tmp_path, monkeypatch):
    lr, _ = scan
    recipe = with_overrides(load_recipe(SMOKE), task={"kind": "sr", "factor": 2}, model={"neighbours": 0})
    harmful = perturbed_model(recipe, tmp_path / "m", 0.5)
    calls = []
    real_run = enhance_mod._Runner.run

    def counting(self, op, y, *args, **kwargs):
        calls.append(tuple(y.shape))
        return real_run(self, op, y, *args, **kwargs)

    monkeypatch.setattr(enhance_mod._Runner, "run", counting)
    res = enhance_volume(lr, task="sr", model=harmful, seed=0, batch_slices=2)
    assert res.metrics["gate_decision"] == "classical"
    assert len(calls) == 1, "only the self-check ran the network"
    assert np.array_equal(res.enhanced.array, res.baseline.array) and res.candidate is None
    calls.clear()
    kept = enhance_volume(lr, task="sr", model=harmful, seed=0, batch_slices=2, keep_candidate=True)
    assert len(calls) > 1 and kept.candidate is not None  # evaluation asks for what the gate weighed
    assert np.array_equal(kept.enhanced.array, res.enhanced.array)


def test_recon_skips_slices_of_air_only():
    vol = _head_with_air(2, 3, seed=1)
    vol = vol[::2, ::2]  # 96 x 116 keeps the test short
    mask = make_mask("equispaced", vol.shape[:2], 4.0, 0.08, 0)
    ksp = fft2c_np(np.moveaxis(vol, 2, 0)) * mask.full()
    data = KSpaceData(ksp.astype(np.complex64), mask.mask, np.eye(4))
    model = default_model("recon")
    res = enhance_kspace(data, model=model, self_check=False, seed=0)
    enh, base = res.enhanced.array, res.baseline.array
    assert res.metrics["slices_skipped_as_air"] == 2.0  # slices 3 and 4 (slice 2 is the mask's margin)
    for k in (3, 4):
        assert np.array_equal(enh[..., k], base[..., k])
    assert not np.allclose(enh[..., 0], base[..., 0])
