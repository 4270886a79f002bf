"""The sampler: data consistency with the degrading operator, seeds, K-sample uncertainty, schedulers."""

import pytest
import torch

from medidiff.diffusion.process import from_x0, make_scheduler, sampling_timesteps, to_x0
from medidiff.diffusion.sampling import DataConsistency, sample
from medidiff.models import build_model
from medidiff.recipe import DiffusionConfig, Recipe, with_overrides
from medidiff.tasks import task_operator

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
        dc = DataConsistency(op, mode, noise_sigma=0.5)
        out = sample(net, recipe, op, y, dc=dc, generator=torch.Generator().manual_seed(0))
        res[mode] = float((op.A(out.mean) - y).abs().norm() / y.abs().norm())
    assert res["hard"] < 1e-3 < res["prox"] < res["none"]


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "rflow"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_to_x0_and_from_x0_invert_each_other(scheduler, prediction_type):
    """The sampler converts the network output to x̂0 and back; both directions must agree for every
    scheduler class and parameterisation (RFlow always steps with a velocity, so it is checked for that)."""
    if scheduler == "rflow" and prediction_type == "epsilon":
        pytest.skip("rflow with epsilon is rejected by recipe validation")
    sch = make_scheduler(DiffusionConfig(scheduler=scheduler, prediction_type=prediction_type))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 600, 999])
    x0 = to_x0(sch, prediction_type, out, x_t, t)
    assert not torch.allclose(x0, out) or prediction_type == "sample"
    back = from_x0(sch, prediction_type, x0, x_t, t)
    if scheduler == "rflow" and prediction_type == "sample":  # the scheduler gets the velocity for x0
        assert torch.allclose(to_x0(sch, "v_prediction", back, x_t, t), x0, atol=1e-9)
    else:
        assert torch.allclose(back, out, atol=1e-9)
        assert torch.allclose(to_x0(sch, prediction_type, back, x_t, t), x0, atol=1e-9)


@pytest.mark.parametrize(
    "spacing, steps, expected",
    [
        ("leading", 1, [0]),  # one step at t = 0: the network sees (almost) no noise level at all
        ("leading", 2, [250, 0]),
        ("trailing", 1, [499]),
        ("trailing", 2, [499, 249]),
        ("trailing", 4, [499, 374, 249, 124]),
    ],
)
def test_timestep_spacing_known_values_and_ddim_lands_on_them(spacing, steps, expected):
    """Strength 0.5 of a 1000-step chain: leading ends at t = 0, trailing starts at T/2 - 1. The scheduler's
    own step arithmetic (t - T / n) must land exactly on the next timestep, and the last one on -1 (alpha = 1,
    the clean image) or 0."""
    sch = make_scheduler(DiffusionConfig(scheduler="ddim", timestep_spacing=spacing))
    ts = sampling_timesteps(sch, steps, 0.5, spacing=spacing)
    assert ts.tolist() == expected
    stride = sch.num_train_timesteps // sch.num_inference_steps
    nxt = [int(t) - stride for t in ts]
    assert nxt[:-1] == ts.tolist()[1:]
    assert nxt[-1] == (-1 if spacing == "trailing" else -stride)
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(sch, steps, 0.5, spacing="linspace")


@pytest.mark.parametrize("spacing, expected", [("leading", [250, 0]), ("trailing", [499, 249])])
def test_sampler_calls_the_network_at_the_recipe_timesteps(spacing, expected):
    recipe, net, op, y = _setup("sr", timestep_spacing=spacing, steps=2)
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, timesteps, **kw):
            seen.append(sorted(set(timesteps.tolist())))
            return self.inner(x, timesteps, **kw)

    out = sample(Recording(net), recipe, op, y, generator=torch.Generator().manual_seed(0))
    assert seen == [[t] for t in expected] and out.network_evals == 2
    assert float((op.A(out.mean) - y).norm() / y.norm()) < 1e-3


def test_start_timestep_is_the_samplers_first():
    from medidiff.diffusion.process import start_timestep

    cases = (("trailing", 1, 499), ("trailing", 2, 499), ("leading", 2, 250), ("leading", 1, 0))
    for spacing, steps, first in cases:
        d = DiffusionConfig(steps=steps, strength=0.5, timestep_spacing=spacing)
        assert start_timestep(d) == first
        sch = make_scheduler(d)
        assert int(sampling_timesteps(sch, steps, 0.5, spacing=spacing)[0]) == first


def test_training_from_the_samplers_start_hides_the_target_from_the_noisy_input():
    """train_from_start = 1: every example is noised from a zero residual at the sampler's first timestep, so
    the network's noisy input is the same whatever the target; 0: it carries the target."""
    from medidiff.diffusion.process import diffusion_loss, start_timestep

    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, t):
            seen.append((x[:, :1].clone(), t.clone()))
            return x[:, :1]

    cond = torch.rand(3, 1, 16, 16)
    for share in (1.0, 0.0):
        recipe = with_overrides(Recipe(), diffusion={"steps": 1, "timestep_spacing": "trailing",
                                                     "train_from_start": share})
        sch = make_scheduler(recipe.diffusion)
        for x0 in (torch.zeros(3, 1, 16, 16), torch.ones(3, 1, 16, 16)):
            diffusion_loss(Recording(), recipe, sch, cond, x0, torch.Generator().manual_seed(0))
    (a, ta), (b, tb), (c, _), (d, _) = seen
    assert torch.equal(a, b) and (ta == start_timestep(recipe.diffusion)).all() and torch.equal(ta, tb)
    assert not torch.allclose(c, d)
