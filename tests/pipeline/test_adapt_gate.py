"""The do-no-harm gate (a model made to hurt falls back to the classical image) and per-scan adaptation
(time box, never touching the shipped weights)."""

import hashlib
import math
import time
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest
import torch

from medidiff.io import Volume
from medidiff.models import default_model
from medidiff.models.checkpoint import weights_dir
from medidiff.physics.operators import KSpaceTruncation
from medidiff.physics.simulate import simulate_sr
from medidiff.pipeline import adapt as adaptation
from medidiff.pipeline import gate
from medidiff.pipeline.adapt import adapt_images
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume
from medidiff.recipe import load_recipe, with_overrides
from tests.pipeline.perturbed import SMOKE, perturbed_model

MNI = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


pytestmark = pytest.mark.usefixtures("one_thread")  # time boxes are measured on a shared machine


@pytest.fixture(scope="module")
def block() -> Volume:
    """A 64 x 64 x 4 block of real anatomy (the MNI152 T1) and its in-plane x2 simulation."""
    img = nib.load(str(MNI))
    arr = np.asarray(img.dataobj, np.float32)[60:124, 80:144, 90:94]
    return Volume(np.ascontiguousarray(arr), img.affine)


@pytest.fixture(scope="module")
def harmful(tmp_path_factory):
    """A tiny DiffusionModelUNet with large random weights: its output is structured noise."""
    recipe = with_overrides(load_recipe(SMOKE), task={"kind": "sr", "factor": 2}, model={"neighbours": 0})
    return perturbed_model(recipe, tmp_path_factory.mktemp("harm") / "m", 0.5, seed=1)


def test_cross_fit_known_values():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 64, 64, generator=g)
    w, pred, lower, fitted = gate.cross_fit(0.5 * e, e)  # the residual is half the truth: weight 1, gain 6 dB
    assert w == pytest.approx(1.0) and fitted == pytest.approx(1.0)
    assert pred == pytest.approx(10 * np.log10(4.0), abs=1e-6) and lower == pytest.approx(pred, abs=1e-6)
    noise = torch.randn(2, 64, 64, generator=g)  # uncorrelated: no held-out gain, declined
    decision = gate.decide(noise, e)
    assert decision.weight == 0.0 and decision.predicted_gain_db < 0.05
    assert decision.reason.startswith(gate.DECLINED)


def test_edge_snr_sees_a_noise_floor():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 64, 64))
    assert gate.edge_snr(noise, (1, 2)) == pytest.approx(1.0, rel=0.3)
    yy, xx = np.mgrid[:64, :64]
    sharp = (((yy - 32) ** 2 + (xx - 32) ** 2) < 400).astype(float)[None].repeat(2, 0)
    assert gate.edge_snr(sharp + 0.001 * rng.standard_normal((2, 64, 64)), (1, 2)) > 10


def test_a_model_made_to_hurt_returns_the_classical_image(block, harmful):
    lr, ref = simulate_sr(block, 2, axis="inplane", seed=0)
    res = enhance_volume(lr, task="sr", model=harmful, seed=0)
    assert np.array_equal(res.enhanced.array, res.baseline.array)
    assert res.metrics["gate_decision"] == "classical" and res.metrics["residual_weight"] == 0.0
    assert res.metrics["gate_reason"].startswith(gate.DECLINED)
    # without the gate the same model does harm: the candidate it would have added is worse than sinc
    off = enhance_volume(lr, task="sr", model=harmful, seed=0, self_check=False)
    err_base = float(np.mean((res.baseline.array - ref.array) ** 2))
    assert float(np.mean((off.enhanced.array - ref.array) ** 2)) > err_base


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adaptation_respects_its_time_box_and_leaves_the_model_alone(block, harmful):
    op = KSpaceTruncation(2)
    refs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(block.array, 2, 0))) / float(block.array.max())
    before = {k: v.clone() for k, v in harmful.net.state_dict().items()}
    t0 = time.perf_counter()
    adapted, report = adapt_images(harmful, op, refs, (2, 2), seconds=10.0, seed=0, max_steps=10**6)
    spent = time.perf_counter() - t0
    assert report.steps > 0 and abs(spent - 10.0) < 3.0 and report.seconds == pytest.approx(spent, abs=0.5)
    assert np.isfinite(report.loss_before) and np.isfinite(report.loss_after)
    assert all(torch.equal(before[k], v) for k, v in harmful.net.state_dict().items())
    if report.kept:
        assert adapted.net is not harmful.net and report.gain_after_db >= report.gain_before_db


def test_adaptation_is_a_fixed_step_budget_and_repeatable(block, harmful):
    """The default budget is a number of steps (not seconds): the same scan gives the same network."""
    op = KSpaceTruncation(2)
    refs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(block.array, 2, 0))) / float(block.array.max())
    runs = [adapt_images(harmful, op, refs, (2, 2), seconds=600.0, seed=3, max_steps=4) for _ in range(2)]
    assert [r.steps for _, r in runs] == [4, 4]
    assert runs[0][1].loss_after == runs[1][1].loss_after
    assert adaptation.auto_steps(4, 256 * 256) == 20
    assert adaptation.auto_steps(1, 32 * 32) == adaptation.MAX_STEPS
    assert adaptation.safety_seconds(64 * 64) == adaptation.safety_seconds(256 * 256 * 160) == 120.0


def test_the_models_recipe_decides_whether_enhance_adapts(block, harmful):
    import dataclasses

    lr, _ = simulate_sr(block, 2, axis="inplane", seed=0)
    recipe = harmful.recipe
    adapting = dataclasses.replace(harmful, recipe=dataclasses.replace(
        recipe, enhance=dataclasses.replace(recipe.enhance, adapt=True)))
    on = enhance_volume(lr, task="sr", model=adapting, seed=0, adapt_seconds=30.0)
    assert on.metrics["adapt_steps"] > 0
    off = enhance_volume(lr, task="sr", model=adapting, seed=0, adapt=False)
    assert "adapt_steps" not in off.metrics
    assert "adapt_steps" not in enhance_volume(lr, task="sr", model=harmful, seed=0).metrics


def test_adapt_never_writes_the_shipped_weights(block):
    path = weights_dir() / "sr_x2" / "model.safetensors"
    digest = _sha256(path)
    model = default_model("sr")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    lr, _ = simulate_sr(block, 2, axis="inplane", seed=0)
    res = enhance_volume(lr, task="sr", model=model, adapt=True, adapt_seconds=3.0, seed=0)
    assert res.metrics["adapt_steps"] >= 0 and "adapt_gain_after_db" in res.metrics
    assert _sha256(path) == digest
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_a_reconstruction_model_made_to_hurt_returns_zero_filling(block, tmp_path):
    from medidiff.physics.simulate import simulate_recon

    recipe = with_overrides(load_recipe(SMOKE),
                            task={"kind": "recon", "acceleration": 4.0, "center_fraction": 0.08},
                            model={"neighbours": 0})
    model = perturbed_model(recipe, tmp_path / "m", 0.5, seed=2)
    data, _ref = simulate_recon(block, 4.0, 0.08, "equispaced", 1, 0)
    res = enhance_kspace(data, model=model, seed=0)
    assert np.allclose(res.enhanced.array, res.baseline.array, atol=1e-6 * float(res.baseline.array.max()))
    assert res.metrics["gate_decision"] == "classical"
    assert res.metrics["gate_reason"].startswith(gate.DECLINED)


def test_settings_carry_adapt_and_gate_without_changing_default_fingerprints():
    from medidiff.pipeline.settings import EnhanceSettings

    plain = EnhanceSettings(task="sr")
    assert "adapt" not in plain.fingerprint_params() and "gate" not in plain.fingerprint_params()
    assert "precision" not in plain.fingerprint_params()
    assert plain.enhance_options() == {"adapt": None, "adapt_seconds": None, "self_check": None,
                                       "precision": "auto"}
    custom = EnhanceSettings(task="sr", adapt=True, adapt_seconds=5.0, gate=False, precision="fp32")
    assert custom.fingerprint_params()["adapt"] is True and custom.fingerprint_params()["precision"] == "fp32"
    assert custom.enhance_options() == {"adapt": True, "adapt_seconds": 5.0, "self_check": False,
                                        "precision": "fp32"}
    with pytest.raises(ValueError):
        EnhanceSettings(adapt_seconds=0.0)
    with pytest.raises(ValueError):
        EnhanceSettings(precision="fp16")


def test_an_adapted_network_is_used_only_where_the_original_check_passes_too():
    yes = gate.GateDecision(0.8, 1.0, 0.6, 0.8, 10.0, gate.ENHANCED, 0.8)
    big = gate.GateDecision(1.0, 8.0, 6.0, 1.0, 10.0, gate.ENHANCED, 1.0)
    no = gate.GateDecision(0.0, 0.4, -0.3, 0.7, 10.0, f"{gate.DECLINED} (lower bound)", 0.7)
    assert gate.combine(no, big).weight == 0.0 and "before adaptation" in gate.combine(no, big).reason
    assert gate.combine(yes, big).weight == pytest.approx(0.8)
    assert gate.combine(yes, no).weight == 0.0


def test_slice_phases_are_every_grid_placement_of_one_image():
    """A thin slab's self-check image gives f check pairs, one per placement of the thick-slice grid."""
    from medidiff.pipeline.enhance import slice_phases

    refs = torch.arange(2 * 3 * 56, dtype=torch.float32).reshape(2, 3, 56)
    out = slice_phases(refs, 4)
    assert out.shape == (8, 3, 52)  # (56 - 3) rounded down to a multiple of 4, 4 placements of 2 images
    for p in range(4):
        assert torch.equal(out[2 * p: 2 * p + 2], refs[..., p: p + 52])
    short = torch.zeros(1, 3, 18)  # too short for 4 placements of at least 4 thick slices: cropped only
    assert slice_phases(short, 4).shape == (1, 3, 16)


def test_a_thin_slab_check_uses_every_grid_placement(monkeypatch):
    """Through-plane SR of one image: the gate's check pairs come from all f placements of the grid, and
    adaptation's pool (whose held-out images must not share pixels with training ones) from one."""
    import medidiff.pipeline.enhance as enh

    seen = []
    real = enh._check_residuals

    def spy(runner, op, refs, task="sr"):
        seen.append(tuple(refs.shape))
        return real(runner, op, refs, task)

    monkeypatch.setattr(enh, "_check_residuals", spy)
    rng = np.random.default_rng(0)
    img = rng.random((1, 64, 16)).astype(np.float32) + 1.0
    vol = Volume(img, np.diag([1.0, 1.0, 4.0, 1.0]))
    res = enhance_volume(vol, task="sr_thick", adapt=False)
    assert res.enhanced.array.shape == (1, 64, 64)
    assert seen == [(4, 16, 60)]  # the image transposed (thick axis first), 4 placements of 60 thin pixels


def test_the_margin_follows_the_kind_of_check():
    """The through-plane check is at the scan's own scale (pessimistic): a lower bound above zero enhances.
    In-plane SR and reconstruction check one step away from the scan (optimistic out of domain): the
    lower bound must clear ``MARGIN_DB``. A residual that is 1.7 % of the truth gains 0.15 dB on every
    fold."""
    assert gate.margin_db("sr_thick") == gate.MARGIN_SAME_SCALE_DB == 0.0
    assert gate.margin_db("sr") == gate.margin_db("recon") == gate.MARGIN_DB > 0.1
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 64, 64, generator=g)
    a = 1 - 10 ** (-0.15 / 20)
    _, pred, lower, _ = gate.cross_fit(a * e, e)
    assert pred == pytest.approx(0.15, abs=1e-6) and lower == pytest.approx(0.15, abs=1e-6)
    assert gate.decide(a * e, e, margin_db=gate.margin_db("sr_thick")).enhanced
    declined = gate.decide(a * e, e, margin_db=gate.margin_db("sr"))
    assert not declined.enhanced and "<= 0.30 dB" in declined.reason


@pytest.mark.parametrize("task", ["sr", "sr_thick"])
def test_enhance_uses_the_tasks_margin_unless_told(monkeypatch, task):
    import medidiff.pipeline.enhance as enh

    seen = []
    real = gate.decide

    def spy(r, e, snr=math.nan, margin_db=gate.MARGIN_DB, seed=0):
        seen.append(margin_db)
        return real(r, e, snr, margin_db, seed)

    monkeypatch.setattr(enh.gate, "decide", spy)
    rng = np.random.default_rng(0)
    shape, zooms = ((32, 32, 3), [1.0, 1.0, 1.0]) if task == "sr" else ((32, 32, 8), [1.0, 1.0, 4.0])
    vol = Volume(rng.random(shape).astype(np.float32) + 1.0, np.diag([*zooms, 1.0]))
    enhance_volume(vol, task=task, adapt=False)
    enhance_volume(vol, task=task, adapt=False, gate_margin_db=1.5)
    assert seen == [gate.margin_db(task), 1.5]


def test_reconstruction_adaptation_trains_where_the_sampler_starts_as_training_did():
    """The zero-shot reconstruction loss noises its targets as training does: with ``train_from_start`` = 1
    the network's noisy input is the same whatever the measured data (a zero residual at the sampler's first
    timestep); with 0 it carries the data."""
    from medidiff.diffusion.process import start_timestep
    from medidiff.models import LoadedModel

    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, t):
            seen.append((x[:, :2].clone(), t.clone()))
            return x[:, :2]

    mask = np.zeros((1, 32), np.float32)
    mask[:, ::2] = 1
    mask[:, 14:18] = 1
    theta, lam = adaptation._line_split(mask, 0.4, seed=0)
    g = torch.Generator().manual_seed(0)
    for share in (1.0, 0.0):
        recipe = with_overrides(load_recipe(SMOKE), task={"kind": "recon"}, diffusion={
            "steps": 1, "timestep_spacing": "trailing", "train_from_start": share, "target": "residual"})
        loaded = LoadedModel(net=Recording(), recipe=recipe, meta={}, path=None)
        for scale in (1.0, 3.0):
            y = scale * torch.randn(2, 32, 32, generator=g, dtype=torch.complex64)
            adaptation._recon_loss(Recording(), loaded, y, theta, lam, torch.Generator().manual_seed(0))
    (a, ta), (b, tb), (c, _), (d, _) = seen
    assert torch.equal(a, b) and (ta == start_timestep(recipe.diffusion)).all() and torch.equal(ta, tb)
    assert not torch.allclose(c, d)
