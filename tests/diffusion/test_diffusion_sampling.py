"""The sampler: data consistency with the degrading operator, seeds, K-sample uncertainty, schedulers."""

import pytest
import torch

from medidiff.diffusion.config import Recipe, with_overrides
from medidiff.diffusion.pairs import task_operator
from medidiff.diffusion.sampling import sample
from medidiff.models import build_model

TINY = {"channels": [8, 8, 16], "num_res_blocks": 1, "norm_num_groups": 8, "num_head_channels": 8}


def _setup(kind: str, **diffusion):
    task = {"sr": {"kind": "sr", "factor": 2}, "sr_thick": {"kind": "sr_thick", "factor": 4},
            "recon": {"kind": "recon", "acceleration": 4.0}}[kind]
    recipe = with_overrides(Recipe(), task=task, model=TINY, diffusion={"steps": 4, **diffusion},
                            data={"patch_size": 32})
    torch.manual_seed(0)
    net = build_model(recipe).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # MONAI zero-initialises the output conv; give the network a non-trivial output
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.rand(2, 40, 48, generator=g)
    op = task_operator(recipe.task, (40, 48), seed=3)
    y = op.A(x.to(torch.complex64) if kind == "recon" else x)
    return recipe, net, op, y


@pytest.mark.parametrize("kind", ["sr", "sr_thick", "recon"])
@pytest.mark.parametrize("scheduler", ["ddim", "rflow"])
def test_hard_dc_reproduces_measurement(kind, scheduler):
    recipe, net, op, y = _setup(kind, scheduler=scheduler)
    out = sample(net, recipe, op, y, samples=2, generator=torch.Generator().manual_seed(0))
    rel = float((op.A(out.mean) - y).abs().norm() / y.abs().norm())
    assert rel < 1e-3
    assert out.std is not None and out.std.shape == out.mean.shape[-3:] and float(out.std.mean()) > 0
    assert out.network_evals == 4


def test_same_seed_same_output_and_different_seed_differs():
    recipe, net, op, y = _setup("sr")
    a = sample(net, recipe, op, y, generator=torch.Generator().manual_seed(7)).mean
    b = sample(net, recipe, op, y, generator=torch.Generator().manual_seed(7)).mean
    c = sample(net, recipe, op, y, generator=torch.Generator().manual_seed(8)).mean
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_and_other_parameterisations_run_with_dc(prediction_type):
    recipe, net, op, y = _setup("sr", scheduler="ddpm", prediction_type=prediction_type)
    out = sample(net, recipe, op, y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.mean).all()
    assert float((op.A(out.mean) - y).norm() / y.norm()) < 1e-3


def test_prox_dc_sits_between_none_and_hard():
    recipe, net, op, y = _setup("recon")
    res = {}
    for mode in ("none", "prox", "hard"):
        out = sample(net, recipe, op, y, dc=mode, noise_sigma=0.5, generator=torch.Generator().manual_seed(0))
        res[mode] = float((op.A(out.mean) - y).abs().norm() / y.abs().norm())
    assert res["hard"] < 1e-3 < res["prox"] < res["none"]
