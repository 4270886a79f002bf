"""The noise process: MONAI schedulers from a recipe, parameterisation conversions and the training loss.

The network always sees ``[x_t, conditioning]`` (channel concatenation) and outputs the recipe's
``prediction_type``. Sampling converts that output to x̂0, applies data consistency, and converts back, so
every scheduler step sees a consistent prediction.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medidiff.recipe import DiffusionConfig, Recipe

Tensor = torch.Tensor
Scheduler = DDPMScheduler | DDIMScheduler | RFlowScheduler


def make_scheduler(cfg: DiffusionConfig) -> Scheduler:
    """DDPM / DDIM / RFlow scheduler from MONAI, with ``clip_sample`` off.

    MRI intensities are not in [-1, 1].
    """
    if cfg.scheduler == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.train_timesteps, use_discrete_timesteps=True,
                              sample_method="uniform", use_timestep_transform=False)
    schedule = cfg.schedule
    if cfg.scheduler == "ddim":
        return DDIMScheduler(num_train_timesteps=cfg.train_timesteps, schedule=schedule, clip_sample=False,
                             prediction_type=cfg.prediction_type, set_alpha_to_one=True)
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, schedule=schedule, clip_sample=False,
                         prediction_type=cfg.prediction_type)


def is_rflow(scheduler: Scheduler) -> bool:
    """True for MONAI's rectified-flow scheduler (x_t = (1 - t/T) x0 + t/T noise, v = x0 - noise)."""
    return isinstance(scheduler, RFlowScheduler)


def _ab(scheduler: Scheduler, t: Tensor, like: Tensor) -> Tensor:
    """alpha-bar at timesteps ``t`` shaped to broadcast against ``like``."""
    ab = scheduler.alphas_cumprod.to(like.device)[t.long().to(like.device)]
    return ab.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _s(scheduler: Scheduler, t: Tensor, like: Tensor) -> Tensor:
    """RFlow time in [0, 1] shaped to broadcast against ``like``."""
    s = t.to(like.device, torch.float32) / scheduler.num_train_timesteps
    return s.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_x0(scheduler: Scheduler, prediction_type: str, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The network's output converted to a prediction of the clean sample x̂0."""
    if prediction_type == "sample":
        return output
    if is_rflow(scheduler):  # v = x0 - noise, x_t = x0 - s v
        return x_t + _s(scheduler, t, x_t) * output
    ab = _ab(scheduler, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - ab).sqrt() * output) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * output  # v_prediction


def from_x0(scheduler: Scheduler, prediction_type: str, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The output the scheduler expects, given a (data-consistent) x̂0 (inverse of :func:`to_x0`)."""
    if is_rflow(scheduler):  # the RFlow scheduler always steps with a velocity
        return (x0 - x_t) / _s(scheduler, t, x_t).clamp_min(1e-6)
    if prediction_type == "sample":
        return x0
    ab = _ab(scheduler, t, x_t)
    eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt().clamp_min(1e-8)
    if prediction_type == "epsilon":
        return eps
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def training_target(
    scheduler: Scheduler, prediction_type: str, x0: Tensor, noise: Tensor, t: Tensor
) -> Tensor:
    """What the network should output for this prediction type."""
    if prediction_type == "sample":
        return x0
    if is_rflow(scheduler):
        return x0 - noise
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


def noisy_training_input(d: DiffusionConfig, scheduler: Scheduler, cond: Tensor, x0: Tensor,
                         generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, t, noise)``: ``x0`` noised at a random training timestep.

    With ``diffusion.train_from_start`` = p, a share p of the examples is noised from where the sampler
    starts (a zero residual, or the conditioning image for the image target) at the sampler's first timestep,
    as the first sampling step sees it, instead of from ``x0``: the network learns to predict ``x0`` from the
    conditioning when the noisy input carries none of it.
    """
    t_max = max(1, round(d.train_t_max * d.train_timesteps))
    t = torch.randint(0, t_max, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_in = x0
    if d.train_from_start > 0:
        pick = torch.rand(x0.shape[0], generator=generator, device=x0.device) < d.train_from_start
        start = torch.zeros_like(x0) if d.target == "residual" else cond[:, : x0.shape[1]]
        x_in = torch.where(pick[:, None, None, None], start, x0)
        t = torch.where(pick, torch.full_like(t, start_timestep(d)), t)
    return scheduler.add_noise(x_in, noise, t), t, noise


def diffusion_loss(net: torch.nn.Module, recipe: Recipe, scheduler: Scheduler, cond: Tensor, x0: Tensor,
                   generator: torch.Generator) -> Tensor:
    """MSE of the network's prediction at a random noise level (:func:`noisy_training_input`); ``x0`` is the
    clean target in channel form."""
    d = recipe.diffusion
    x_t, t, noise = noisy_training_input(d, scheduler, cond, x0, generator)
    output = net(torch.cat([x_t, cond], dim=1), t)
    target = training_target(scheduler, d.prediction_type, x0, noise, t)
    return torch.nn.functional.mse_loss(output.float(), target.float())


def _chain(num_train_timesteps: int, steps: int, strength: float, spacing: str) -> tuple[int, list[int]]:
    """``(n_total, timesteps)`` of a DDPM/DDIM chain of ``n_total`` steps whose last ``steps`` are sampled."""
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"timestep spacing must be 'leading' or 'trailing', got {spacing!r}")
    n_total = min(max(steps, round(steps / strength)), num_train_timesteps)
    ratio = num_train_timesteps // n_total
    if spacing == "trailing":
        return n_total, [k * ratio - 1 for k in range(n_total, 0, -1)]
    return n_total, [k * ratio for k in range(n_total - 1, -1, -1)]


def start_timestep(d: DiffusionConfig) -> int:
    """The timestep of the sampler's first network evaluation at the recipe's defaults (DDPM/DDIM)."""
    return _chain(d.train_timesteps, d.steps, d.strength, d.timestep_spacing)[1][-d.steps]


def sampling_timesteps(scheduler: Scheduler, steps: int, strength: float,
                       device: torch.device | str = "cpu", spacing: str = "leading") -> Tensor:
    """``set_timesteps`` for the whole chain, keeping the last ``steps`` (start at ``strength * T``).

    DDPM/DDIM timesteps are evenly spaced by ``T // n`` so that the scheduler's own ``prev_timestep``
    arithmetic lands exactly on the next timestep of the loop. ``spacing`` (DDPM/DDIM): ``"leading"`` puts
    them at ``(n - 1) r, ..., r, 0`` (the last step at t = 0); ``"trailing"`` at ``n r - 1, ..., r - 1`` (each
    step at a noise level: one step at strength 0.5 is t = T / 2 - 1, not t = 0).
    """
    n_total, chain = _chain(scheduler.num_train_timesteps, steps, strength, spacing)
    scheduler.set_timesteps(n_total, device=device)
    if not is_rflow(scheduler):
        scheduler.timesteps = torch.tensor(chain, device=device, dtype=torch.long)
    return scheduler.timesteps[-steps:]
