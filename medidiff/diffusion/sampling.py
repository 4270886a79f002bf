"""Few-step conditional sampling with data consistency inside the loop, and K-sample uncertainty.

Read top to bottom: ``set_timesteps``; start from the noised conditioning at an intermediate step; per
step predict x̂0, make it agree with the measurement using the *same* operator that degraded the data
(hard projection when noiseless, a proximal step when a noise level is given), then step the scheduler.
All tensors here are normalised (divided by the scan's robust scale); callers scale back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler

from medidiff.diffusion.process import Scheduler, from_x0, make_scheduler, sampling_timesteps, to_x0
from medidiff.recipe import Recipe
from medidiff.tasks import Operator, from_channels, to_channels

Tensor = torch.Tensor

__all__ = ["DataConsistency", "SampleOutput", "from_channels", "padded_call", "sample", "to_channels"]


@dataclass(frozen=True)
class DataConsistency:
    """Agreement with the measurement, with the operator that made it.

    ``mode``: ``"hard"`` projects onto ``{x : A x = y}``; ``"prox"`` takes the proximal step for a noise
    level ``noise_sigma`` (normalised units) and ``weight`` (falls back to the projection when
    ``noise_sigma`` is 0); ``"none"`` leaves the image as it is.
    """

    operator: Operator
    mode: str = "hard"
    noise_sigma: float = 0.0
    weight: float = 1.0

    @classmethod
    def from_recipe(cls, operator: Operator, recipe: Recipe, mode: str | None = None,
                    noise_sigma: float | None = None) -> DataConsistency:
        """The recipe's data consistency, unless overridden.

        From ``diffusion.dc``, ``task.noise_sigma`` and ``diffusion.dc_weight``.
        """
        d = recipe.diffusion
        return cls(operator, mode or d.dc, recipe.task.noise_sigma if noise_sigma is None else noise_sigma,
                   d.dc_weight)

    def __call__(self, img: Tensor, y: Tensor) -> Tensor:
        if self.mode == "none":
            return img
        if self.mode == "prox" and self.noise_sigma > 0:
            return self.operator.prox(img, y, self.noise_sigma, self.weight)
        return self.operator.project(img, y)


@dataclass
class SampleOutput:
    """Sampler result for a batch of slices: mean over K samples, per-voxel std, DC residual, cost."""

    mean: Tensor  # (B, H, W) real or complex
    std: Tensor | None  # (B, H, W) real, K > 1
    dc_residual: Tensor  # (B, *measurement) y - A(mean)
    network_evals: int


def padded_call(net: torch.nn.Module, inp: Tensor, t: Tensor, multiple: int) -> Tensor:
    """Run the network on an input reflect-padded to sizes it accepts; crop the output back."""
    h, w = inp.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        inp = torch.nn.functional.pad(inp, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
    out = net(inp, t)
    return out[..., ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]


def scheduler_step(scheduler: Scheduler, model_output: Tensor, t: Tensor, x: Tensor, next_t: Tensor | None,
                   generator: torch.Generator | None) -> Tensor:
    """One reverse step of any of MONAI's schedulers (deterministic DDIM: ``eta=0``)."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.step(model_output, t, x, next_t)[0]
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(model_output, int(t), x, eta=0.0, generator=generator)[0]
    return scheduler.step(model_output, int(t), x, generator=generator)[0]


@torch.no_grad()
def sample(
    net: torch.nn.Module,
    recipe: Recipe,
    operator: Operator,
    y: Tensor,
    *,
    context: Tensor | None = None,
    steps: int | None = None,
    strength: float | None = None,
    samples: int = 1,
    dc: DataConsistency | None = None,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Draw ``samples`` samples per slice for measurements ``y`` (B, ...) in one batch.

    ``context``: extra conditioning channels (B, 2 n C, H, W) for 2.5D models (the neighbours' pinv images).
    ``dc``: the data consistency (default: the recipe's, with ``operator``).
    Returns the mean, the per-voxel standard deviation (K > 1) and the data-consistency residual of the mean.
    """
    d = recipe.diffusion
    cplx = recipe.complex_images
    steps = steps or d.steps
    strength = strength or d.strength
    dc = dc if dc is not None else DataConsistency.from_recipe(operator, recipe)
    device = next(net.parameters()).device
    caller_device = y.device  # results go back where the measurement came from (CPU stacks, CUDA model)
    y = y.to(device)
    k = int(samples)

    base = operator.pinv(y)  # (B, H, W): sinc-upsampled / zero-filled / interpolated image
    y_k = y.repeat_interleave(k, dim=0)
    base_k = base.repeat_interleave(k, dim=0)
    cond = to_channels(base_k, cplx)
    if context is not None:
        cond = torch.cat([cond, context.to(device).repeat_interleave(k, dim=0)], dim=1)
    residual = d.target == "residual"

    scheduler = make_scheduler(d)
    timesteps = sampling_timesteps(scheduler, steps, strength, device=device, spacing=d.timestep_spacing)
    image_cond = cond[:, : recipe.image_channels]
    start = torch.zeros_like(image_cond) if residual else image_cond
    noise = torch.randn(start.shape, generator=generator, device=device, dtype=start.dtype)
    x = scheduler.add_noise(start, noise, timesteps[:1].repeat(start.shape[0]))

    img = base_k
    for i, t in enumerate(timesteps):
        t_batch = t.repeat(x.shape[0])
        output = padded_call(net, torch.cat([x, cond], dim=1), t_batch, recipe.size_multiple).float()
        x0 = to_x0(scheduler, d.prediction_type, output, x, t_batch)
        img = from_channels(x0, cplx) + (base_k if residual else 0)
        img = dc(img, y_k)
        x0 = to_channels(img - base_k if residual else img, cplx)
        model_output = from_x0(scheduler, d.prediction_type, x0, x, t_batch)
        next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler_step(scheduler, model_output, t, x, next_t, generator)

    stacked = img.reshape(-1, k, *img.shape[1:])
    mean = stacked.mean(dim=1)
    std = stacked.abs().std(dim=1) if k > 1 else None
    if k > 1:  # the mean of data-consistent samples is data-consistent for hard DC (a linear constraint)
        mean = dc(mean, y)
    return SampleOutput(
        mean=mean.to(caller_device),
        std=None if std is None else std.to(caller_device),
        dc_residual=(y - operator.A(mean)).to(caller_device),
        network_evals=len(timesteps),
    )
