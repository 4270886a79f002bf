"""Few-step conditional sampling with data consistency inside the loop, and K-sample uncertainty.

Read top to bottom: ``set_timesteps``; start from the noised conditioning at an intermediate step; per
step predict x̂0, make it agree with the measurement using the *same* operator that degraded the data
(hard projection when noiseless, a proximal step when a noise level is given), then step the scheduler.
All tensors here are normalised (divided by the scan's robust scale); callers scale back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medidiff.diffusion.config import Recipe
from medidiff.diffusion.process import from_x0, make_scheduler, sampling_timesteps, to_x0

Tensor = torch.Tensor


def to_channels(img: Tensor, complex_images: bool) -> Tensor:
    """(B, H, W) real or complex image → (B, C, H, W) real network channels (C = 2 for complex)."""
    if complex_images:
        img = img if img.is_complex() else img.to(torch.complex64)
        return torch.stack([img.real, img.imag], dim=1)
    return img.real.unsqueeze(1) if img.is_complex() else img.unsqueeze(1)


def from_channels(ch: Tensor, complex_images: bool) -> Tensor:
    """Inverse of :func:`to_channels`."""
    if complex_images:
        return torch.complex(ch[:, 0].float(), ch[:, 1].float())
    return ch[:, 0].float()


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


def apply_dc(operator, img: Tensor, y: Tensor, mode: str, noise_sigma: float, weight: float) -> Tensor:
    """Data consistency with the operator that made the measurement."""
    if mode == "none":
        return img
    if mode == "prox" and noise_sigma > 0:
        return operator.prox(img, y, noise_sigma, weight)
    return operator.project(img, y)


@torch.no_grad()
def sample(
    net: torch.nn.Module,
    recipe: Recipe,
    operator,
    y: Tensor,
    *,
    context: Tensor | None = None,
    steps: int | None = None,
    strength: float | None = None,
    samples: int = 1,
    dc: str | None = None,
    noise_sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Draw ``samples`` samples per slice for measurements ``y`` (B, ...) in one batch.

    ``context``: extra conditioning channels (B, 2 n C, H, W) for 2.5D models (the neighbours' pinv images).
    Returns the mean, the per-voxel standard deviation (K > 1) and the data-consistency residual of the mean.
    """
    d = recipe.diffusion
    cplx = recipe.complex_images
    steps = steps or d.steps
    strength = strength or d.strength
    dc = dc or d.dc
    sigma = recipe.task.noise_sigma if noise_sigma is None else noise_sigma
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
    timesteps = sampling_timesteps(scheduler, steps, strength, device=device)
    start = torch.zeros_like(cond[:, : recipe.image_channels]) if residual else cond[:, : recipe.image_channels]
    noise = torch.randn(start.shape, generator=generator, device=device, dtype=start.dtype)
    x = scheduler.add_noise(start, noise, timesteps[:1].repeat(start.shape[0]))

    img = base_k
    for i, t in enumerate(timesteps):
        t_batch = t.repeat(x.shape[0])
        output = padded_call(net, torch.cat([x, cond], dim=1), t_batch, recipe.size_multiple).float()
        x0 = to_x0(scheduler, d.prediction_type, output, x, t_batch)
        img = from_channels(x0, cplx) + (base_k if residual else 0)
        img = apply_dc(operator, img, y_k, dc, sigma, d.dc_weight)
        x0 = to_channels(img - base_k if residual else img, cplx)
        model_output = from_x0(scheduler, d.prediction_type, x0, x, t_batch)
        if type(scheduler).__name__ == "RFlowScheduler":
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x, _ = scheduler.step(model_output, t, x, nxt)
        elif type(scheduler).__name__ == "DDIMScheduler":
            x, _ = scheduler.step(model_output, int(t), x, eta=0.0, generator=generator)
        else:
            x, _ = scheduler.step(model_output, int(t), x, generator=generator)

    stacked = img.reshape(-1, k, *img.shape[1:])
    mean = stacked.mean(dim=1)
    std = stacked.abs().std(dim=1) if k > 1 else None
    if k > 1:  # the mean of data-consistent samples is data-consistent for hard DC (a linear constraint)
        mean = apply_dc(operator, mean, y, dc, sigma, d.dc_weight)
    return SampleOutput(
        mean=mean.to(caller_device),
        std=None if std is None else std.to(caller_device),
        dc_residual=(y - operator.A(mean)).to(caller_device),
        network_evals=len(timesteps),
    )
