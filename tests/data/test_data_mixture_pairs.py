"""On-the-fly training pairs from the image mixture: the task's operator, its normalisation, seeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.data.mixture import SOURCES
from medidiff.data.pairs import MixtureSampler, extruded_context, neighbour_index
from medidiff.physics.fft import fft2c
from medidiff.recipe import MIXTURE_SOURCES, RecipeError, load_recipe, with_overrides
from medidiff.tasks import measurement_scale, task_operator

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"
MIX = {"synthetic": 0.6, "natural": 0.4}


def _recipe(kind: str, **extra):
    task = {"sr": {"kind": "sr", "factor": 2}, "sr_thick": {"kind": "sr_thick", "factor": 4},
            "recon": {"kind": "recon", "acceleration": 4.0, "center_fraction": 0.08, "mask": "random"}}[kind]
    model = {"neighbours": 1} if kind == "sr_thick" else {}
    return with_overrides(load_recipe(SMOKE), task=task, model=model, data={"mixture": MIX, **extra})


def test_recipe_names_the_sources_the_mixture_draws_from():
    assert MIXTURE_SOURCES == SOURCES


@pytest.mark.parametrize("mixture, message", [({"brain": 1.0}, "unknown source"),
                                              ({"synthetic": -1.0}, ">= 0"),
                                              ({"synthetic": 0.0}, "at least one")])
def test_bad_mixture_named(tmp_path, mixture, message):
    p = tmp_path / "bad.yaml"
    p.write_text(f"data: {{mixture: {mixture}}}\n".replace("'", ""))
    with pytest.raises(RecipeError, match=rf"bad\.yaml: .*data\.mixture.*{message}"):
        load_recipe(p)


def test_old_recipe_has_no_mixture_and_round_trips():
    r = load_recipe(SMOKE)
    assert r.data.mixture == {}
    mixed = _recipe("sr")
    assert mixed.to_dict()["data"]["mixture"] == MIX


@pytest.mark.parametrize("kind", ["sr", "sr_thick", "recon"])
def test_first_batch_is_seeded(kind):
    s = MixtureSampler(_recipe(kind))
    a = s.batch(3, torch.Generator().manual_seed(5))
    b = s.batch(3, torch.Generator().manual_seed(5))
    c = s.batch(3, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    other_seed = MixtureSampler(_recipe(kind, seed=1)).batch(3, torch.Generator().manual_seed(5))
    assert not torch.equal(a[0], other_seed[0])  # data.seed changes the images too


def test_sr_pair_is_the_task_operator_and_its_normalisation():
    r = _recipe("sr")
    ex = MixtureSampler(r).examples(4, torch.Generator().manual_seed(0))
    op = task_operator(r.task)
    for e in ex:
        low = op.A(e.reference[None])  # normalised reference, degraded again
        assert measurement_scale("sr", low) == pytest.approx(1.0, rel=1e-4)  # normalised by its measurement
        assert torch.allclose(op.pinv(low)[0], e.degraded, atol=1e-5)
        assert torch.allclose(e.cond[0] + e.x0[0], e.reference, atol=1e-5)  # residual target
        assert e.cond.shape == (1, 32, 32)


def test_recon_pair_has_phase_and_a_mask_per_sample():
    r = _recipe("recon")
    ex = MixtureSampler(r).examples(4, torch.Generator().manual_seed(0))
    masks = []
    for e in ex:
        assert e.reference.is_complex() and e.cond.shape == (2, 32, 32) and e.x0.shape == (2, 32, 32)
        phase = torch.angle(e.reference)[e.reference.abs() > 0.2]
        assert float(phase.std()) > 0.01  # not a real-valued image
        k = fft2c(e.degraded).abs()
        sampled = k > 1e-4 * k.max()  # k-space samples the zero-filled image holds
        masks.append(sampled)
        assert 0.15 < float(sampled.float().mean()) < 0.4  # about 1/4 of k-space (x4 with a centre)
        assert measurement_scale("recon", fft2c(e.degraded)) == pytest.approx(1.0, rel=1e-3)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # a random mask is drawn per sample


def test_sr_thick_pair_degrades_the_last_axis_with_neighbours():
    r = _recipe("sr_thick")
    ex = MixtureSampler(r).examples(3, torch.Generator().manual_seed(0))
    op = task_operator(r.task)
    for e in ex:
        assert e.cond.shape == (3, 32, 32) and e.x0.shape == (1, 32, 32)
        assert torch.allclose(op.pinv(op.A(e.reference[None]))[0], e.degraded, atol=1e-5)
        # neighbours are the adjacent slices of one stack: close to, but not the same as, the centre slice
        centre, left, right = e.cond
        assert not torch.equal(left, centre) and not torch.equal(right, centre)
        assert float((left - centre).abs().mean()) < float((left - centre.flip(-1)).abs().mean())
    assert neighbour_index(3, 1, 1) == [0, 2]


def test_references_are_never_the_held_out_natural_images():
    s = MixtureSampler(with_overrides(load_recipe(SMOKE), data={"mixture": {"natural": 1.0}}))
    names = {s.source._natural.images[i][0] for i in range(len(s.source._natural.images))}
    from medidiff.data.natural import natural_images

    assert names.isdisjoint({n for n, _ in natural_images("ood")})
    assert np.isfinite(s.batch(2, torch.Generator().manual_seed(0))[0].numpy()).all()


def test_preview_of_a_recipe_without_mixture_shows_its_fixed_slices():
    from medidiff.data.pairs import preview_pairs

    pairs, titles = preview_pairs(load_recipe(SMOKE), 2, seed=0)
    assert len(pairs) == 2 and titles[0].startswith("slices sr")
    for degraded, reference in pairs:
        assert degraded.shape == reference.shape == (32, 32)
        assert not torch.equal(degraded, reference)


@pytest.mark.parametrize("n", [1, 2])
def test_extruded_context_is_the_neighbours_training_draws(n):
    """An image without neighbouring slices gets the neighbours the 2.5D training shows (MixtureSampler:
    slice s of an extruded object is rows s .. s+P of a taller image): away from the edge rows, exactly the
    rows of the taller image; never copies of the image itself."""
    rng = np.random.default_rng(3)
    p = 12
    tall = torch.from_numpy(rng.random((p + 2 * n, 9)).astype(np.float32))
    stack = torch.stack([tall[s: s + p] for s in range(2 * n + 1)])  # as MixtureSampler.example
    centre = stack[n][None, None]  # (B=1, C=1, P, w)
    ctx = extruded_context(centre, n)
    assert ctx.shape == (1, 2 * n, p, 9)
    for c, j in enumerate(neighbour_index(2 * n + 1, n, n)):
        assert torch.equal(ctx[0, c, n: p - n], stack[j][n: p - n])  # interior rows: the training neighbours
        assert not torch.equal(ctx[0, c], centre[0, 0])
    complex_ctx = extruded_context(torch.cat([centre, 2 * centre], dim=1), n)  # channels stay grouped
    assert torch.equal(complex_ctx[:, 1::2], 2 * complex_ctx[:, 0::2])
    with pytest.raises(ValueError):
        extruded_context(centre, 0)
