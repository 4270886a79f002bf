"""Per-scan self-supervised adaptation: fine-tune a copy of the network briefly on pairs made from the scan.

The pairs use the task's own operator on the scan itself:

- ``sr`` (ZSSR's principle): the scan's slices degraded once more, the scan is the target;
- ``sr_thick`` (SMORE's principle): the scan's sharp in-plane images degraded along one axis with the slice
  profile, the in-plane image is the target;
- ``recon`` (zero-shot self-supervised reconstruction): the measured k-space lines split into two disjoint
  sets; the network sees one, its image is scored on the other set's measured samples.

Part of the pairs is held out (the last quarter of the slices, or of the image columns for a single slice);
the loss and the gain over the classical image on those are measured before and after. The copy is kept only
when its held-out gain is not lower than the original's. The shipped weights are never touched: training runs
on a deep copy and the caller's model is returned unchanged when adaptation does not pay.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from medidiff.data.pairs import extruded_context
from medidiff.diffusion.process import diffusion_loss, make_scheduler, noisy_training_input, to_x0
from medidiff.diffusion.sampling import padded_call, sample
from medidiff.models import LoadedModel
from medidiff.physics.fft import fft2c
from medidiff.physics.operators import FourierUndersampling
from medidiff.tasks import Operator, from_channels, to_channels

DEFAULT_SECONDS = 30.0
# 30 s for a 256 x 256 x 160 volume, scaled by the voxel count, between these bounds.
MIN_SECONDS, MAX_SECONDS = 3.0, 30.0
REFERENCE_VOXELS = 256 * 256 * 160
# The budget is a number of optimiser steps, so that a scan gives the same result on any machine: as much
# work as 20 steps of 4 slices of 256² (about 30 s on 2 CPU cores), between these bounds. The time box
# (``seconds``) is only a safety stop, by default SAFETY x MAX_SECONDS.
BATCH = 4
WORK_PIXELS = 20 * BATCH * 256 * 256
MIN_STEPS, MAX_STEPS = 20, 100
SAFETY = 4.0
LR_FACTOR = 0.2  # of the recipe's training learning rate



def _optimise(net: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One optimiser step on ``loss`` with the recipe's gradient clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()

def auto_seconds(voxels: int) -> float:
    """Size-scaled seconds for a scan of ``voxels`` output voxels (30 s for 256 x 256 x 160)."""
    return float(np.clip(DEFAULT_SECONDS * voxels / REFERENCE_VOXELS, MIN_SECONDS, MAX_SECONDS))


def auto_steps(batch: int, pixels: int) -> int:
    """Optimiser steps for batches of ``batch`` images of ``pixels`` pixels: ``WORK_PIXELS`` of work,
    clipped to [MIN_STEPS, MAX_STEPS] (20 for 4 slices of 256², 100 for small single slices)."""
    return int(np.clip(round(WORK_PIXELS / max(1, batch * pixels)), MIN_STEPS, MAX_STEPS))


def safety_seconds(voxels: int) -> float:
    """The default time box: a safety stop above what the step budget takes on 2 CPU cores (``WORK_PIXELS``
    of work, about ``MAX_SECONDS``, for slices up to about 256²; the ``MIN_STEPS`` floor makes larger
    slices take longer, and there the stop may end adaptation early, which the manifest records)."""
    del voxels  # the budget, not the scan's size, bounds the work
    return SAFETY * MAX_SECONDS


@dataclass
class AdaptReport:
    """What adaptation did (``adapt_*`` keys in the result metrics and the manifest)."""

    steps: int = 0
    seconds: float = 0.0
    loss_before: float = math.nan
    loss_after: float = math.nan
    gain_before_db: float = math.nan  # held-out pairs: PSNR gain of the model over the classical image
    gain_after_db: float = math.nan
    kept: bool = False

    def metrics(self) -> dict[str, float]:
        return {f"adapt_{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def _crop(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x[..., : h - h % multiple_h, : w - w % multiple_w]


def _split(refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last quarter of the slices, or of the columns for one slice."""
    if len(refs) >= 2:
        k = max(1, len(refs) // 4)
        return refs[:-k], refs[-k:]
    w = refs.shape[-1]
    cut = w - max(w // 4, 1)
    return refs[..., :cut], refs[..., cut:]


def held_out(refs: torch.Tensor) -> torch.Tensor:
    """The images adaptation does not train on (see :func:`adapt_images`)."""
    return _split(refs)[1]


class _ImagePairs:
    """Training batches (cond, x0) of random crops of reference images degraded by ``op``."""

    def __init__(
        self, loaded: LoadedModel, op: Operator, refs: torch.Tensor, factor_axes: tuple[int, int]
    ) -> None:
        self.recipe, self.op = loaded.recipe, op
        m = self.recipe.size_multiple
        fh, fw = factor_axes
        self.refs = _crop(refs, int(np.lcm(m, fh)), int(np.lcm(m, fw)))
        size = min(64, self.refs.shape[-2], self.refs.shape[-1])
        self.ph = max(size - size % int(np.lcm(m, fh)), int(np.lcm(m, fh)))
        self.pw = max(size - size % int(np.lcm(m, fw)), int(np.lcm(m, fw)))

    def usable(self) -> bool:
        return self.refs.shape[-2] >= self.ph and self.refs.shape[-1] >= self.pw and self.refs.numel() > 0

    def cond_x0(self, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.recipe
        base = self.op.pinv(self.op.A(refs))
        cond = to_channels(base, False)
        if r.model.neighbours:
            cond = torch.cat([cond, extruded_context(cond, r.model.neighbours)], dim=1)
        x0 = to_channels(refs - base if r.diffusion.target == "residual" else refs, False)
        return cond.float(), x0.float()

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, w = self.refs.shape
        crops = []
        for _ in range(BATCH):
            i = int(torch.randint(0, n, (1,), generator=gen))
            top = int(torch.randint(0, h - self.ph + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - self.pw + 1, (1,), generator=gen))
            c = self.refs[i, top: top + self.ph, left: left + self.pw]
            if float(torch.rand(1, generator=gen)) < 0.5:
                c = c.flip(-1)
            if float(torch.rand(1, generator=gen)) < 0.5:
                c = c.flip(-2)
            crops.append(c)
        return self.cond_x0(torch.stack(crops))


def _device(loaded: LoadedModel) -> torch.device:
    return next(loaded.net.parameters()).device


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` (random draws are made where the network runs)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def _gain_db(err0: float, err1: float) -> float:
    return float(10 * np.log10(err0 / err1)) if err0 > 0 and err1 > 0 else 0.0


def _image_gain(loaded: LoadedModel, op: Operator, held: torch.Tensor, seed: int) -> float:
    """PSNR gain of the model over the classical image on held-out reference images."""
    y = op.A(held)
    base = op.pinv(y)
    pred = sample(loaded.net, loaded.recipe, op, y, samples=1,
                  context=_context(loaded, base), generator=_generator(seed, _device(loaded))).mean
    pred = pred.to(held.device)
    return _gain_db(float(((held - base) ** 2).sum()), float(((held - pred) ** 2).sum()))


def _context(loaded: LoadedModel, base: torch.Tensor) -> torch.Tensor | None:
    n = loaded.recipe.model.neighbours
    return extruded_context(to_channels(base, loaded.recipe.complex_images), n) if n else None


def _held_loss(
    net: torch.nn.Module, loaded: LoadedModel, cond: torch.Tensor, x0: torch.Tensor, seed: int
) -> float:
    sched = make_scheduler(loaded.recipe.diffusion)
    gen = _generator(seed, cond.device)
    with torch.no_grad():
        return float(
            np.mean([float(diffusion_loss(net, loaded.recipe, sched, cond, x0, gen)) for _ in range(4)])
        )


def adapt_images(loaded: LoadedModel, op: Operator, refs: torch.Tensor, factor_axes: tuple[int, int],
                 seconds: float, seed: int = 0,
                 max_steps: int | None = None) -> tuple[LoadedModel, AdaptReport]:
    """Fine-tune a copy of ``loaded`` on ``refs`` (N, H, W, normalised) degraded by ``op``: ``max_steps``
    optimiser steps (default :func:`auto_steps`), stopped early when ``seconds`` run out.

    ``factor_axes``: the resolution factor along H and W (crops must be multiples of it). Returns the adapted
    model (or ``loaded`` itself when adaptation did not pay) and the report.
    """
    t0 = time.perf_counter()
    report = AdaptReport()
    dev = _device(loaded)
    train, held = _split(refs.float().to(dev))
    pairs = _ImagePairs(loaded, op, train, factor_axes)
    held_pairs = _ImagePairs(loaded, op, held, factor_axes)
    if not pairs.usable() or not held_pairs.usable():
        report.seconds = time.perf_counter() - t0
        return loaded, report
    held_refs = held_pairs.refs
    h_cond, h_x0 = held_pairs.cond_x0(held_refs)
    report.loss_before = _held_loss(loaded.net, loaded, h_cond, h_x0, seed)
    report.gain_before_db = _image_gain(loaded, op, held_refs, seed)
    check_cost = time.perf_counter() - t0
    net = copy.deepcopy(loaded.net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=loaded.recipe.train.lr * LR_FACTOR)
    sched = make_scheduler(loaded.recipe.diffusion)
    gen = torch.Generator().manual_seed(seed)  # crop positions (CPU)
    gen_dev = gen if dev.type == "cpu" else _generator(seed, dev)  # noise and time steps, on the device
    deadline = t0 + seconds - check_cost  # the after-check costs about what the before-check did
    if max_steps is None:
        max_steps = auto_steps(BATCH, pairs.ph * pairs.pw)
    while report.steps < max_steps and time.perf_counter() < deadline:
        cond, x0 = pairs.batch(gen)
        loss = diffusion_loss(net, loaded.recipe, sched, cond, x0, gen_dev)
        _optimise(net, opt, loss, loaded.recipe.train.grad_clip)
        report.steps += 1
    net.eval()
    adapted = dataclasses.replace(loaded, net=net)
    report.loss_after = _held_loss(net, loaded, h_cond, h_x0, seed)
    report.gain_after_db = _image_gain(adapted, op, held_refs, seed)
    report.kept = report.steps > 0 and report.gain_after_db >= report.gain_before_db
    report.seconds = time.perf_counter() - t0
    return (adapted if report.kept else loaded), report


# ------------------------------------------------------------------------------------------ reconstruction


def _line_split(mask: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Θ, Λ) masks: Λ is ``fraction`` of the measured columns outside the fully sampled centre."""
    cols = mask.reshape(-1, mask.shape[-1]).max(axis=0) > 0
    w = len(cols)
    centre = np.zeros(w, bool)
    c = w // 2
    lo = c
    while lo - 1 >= 0 and cols[lo - 1]:
        lo -= 1
    hi = c
    while hi + 1 < w and cols[hi + 1]:
        hi += 1
    centre[lo: hi + 1] = True
    candidates = np.flatnonzero(cols & ~centre)
    rng = np.random.default_rng(seed)
    lam = rng.choice(candidates, size=max(1, round(fraction * len(candidates))), replace=False) \
        if len(candidates) else np.array([], int)
    lam_cols = np.zeros(w, bool)
    lam_cols[lam] = True
    full = np.broadcast_to(mask, mask.shape).astype(np.float32)
    return full * ~lam_cols, full * lam_cols


def _recon_loss(net: torch.nn.Module, loaded: LoadedModel, y: torch.Tensor, theta: np.ndarray,
                lam: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Normalised k-space error on Λ of the network's one-step image from the Θ samples."""
    recipe = loaded.recipe
    op = FourierUndersampling(theta)
    y_t = y * torch.from_numpy(theta).to(y.device)
    base = op.pinv(y_t)
    full = FourierUndersampling(np.maximum(theta, lam)).pinv(y)
    cond = to_channels(base, True).float()
    x0 = to_channels(full - base if recipe.diffusion.target == "residual" else full, True).float()
    sched = make_scheduler(recipe.diffusion)
    d = recipe.diffusion
    x_t, t, _ = noisy_training_input(d, sched, cond, x0, gen)  # as in training (train_from_start too)
    out = padded_call(net, torch.cat([x_t, cond], dim=1), t, recipe.size_multiple).float()
    img = from_channels(to_x0(sched, d.prediction_type, out, x_t, t), True)
    img = img + (base if d.target == "residual" else 0)
    lam_t = torch.from_numpy(lam).to(y.device)
    diff = (fft2c(img) - y) * lam_t
    return (diff.abs() ** 2).sum() / ((y * lam_t).abs() ** 2).sum().clamp_min(1e-12)


def _recon_gain(loaded: LoadedModel, y: torch.Tensor, theta: np.ndarray, lam: np.ndarray, seed: int) -> float:
    """Gain over zero-filling (which predicts 0) of the sampled image on the held-out measured samples Λ."""
    op = FourierUndersampling(theta)
    pred = sample(loaded.net, loaded.recipe, op, y * torch.from_numpy(theta).to(y.device), samples=1,
                  generator=_generator(seed, _device(loaded))).mean.to(y.device)
    lam_t = torch.from_numpy(lam).to(y.device)
    err1 = float((((fft2c(pred) - y) * lam_t).abs() ** 2).sum())
    return _gain_db(float(((y * lam_t).abs() ** 2).sum()), err1)


def adapt_kspace(loaded: LoadedModel, y: torch.Tensor, mask: np.ndarray, seconds: float,
                 seed: int = 0, max_steps: int | None = None) -> tuple[LoadedModel, AdaptReport]:
    """Fine-tune a copy on single-coil normalised k-space ``y`` (S, H, W) by splitting its measured lines:
    ``max_steps`` optimiser steps (default :func:`auto_steps`), stopped early when ``seconds`` run out."""
    t0 = time.perf_counter()
    report = AdaptReport()
    _, lam = _line_split(mask, 0.4, seed)
    h_theta, h_lam = _line_split(mask, 0.4, seed + 1)
    if lam.sum() == 0:
        report.seconds = time.perf_counter() - t0
        return loaded, report
    dev = _device(loaded)
    y = y.to(device=dev, dtype=torch.complex64)
    held = y[-max(1, len(y) // 4):]
    gen_eval = _generator(seed, dev)
    with torch.no_grad():
        report.loss_before = float(_recon_loss(loaded.net, loaded, held, h_theta, h_lam, gen_eval))
    report.gain_before_db = _recon_gain(loaded, held, h_theta, h_lam, seed)
    check_cost = time.perf_counter() - t0
    net = copy.deepcopy(loaded.net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=loaded.recipe.train.lr * LR_FACTOR)
    gen = torch.Generator().manual_seed(seed)  # slice choice (CPU)
    gen_dev = gen if dev.type == "cpu" else _generator(seed, dev)  # noise and time steps, on the device
    deadline = t0 + seconds - check_cost  # the after-check costs about what the before-check did
    rng = np.random.default_rng(seed + 2)
    if max_steps is None:
        max_steps = auto_steps(min(BATCH, len(y)), int(np.prod(y.shape[-2:])))
    while report.steps < max_steps and time.perf_counter() < deadline:
        th, la = _line_split(mask, 0.4, int(rng.integers(1 << 30)))
        idx = torch.randint(0, len(y), (min(BATCH, len(y)),), generator=gen)
        loss = _recon_loss(net, loaded, y[idx.to(dev)], th, la, gen_dev)
        _optimise(net, opt, loss, loaded.recipe.train.grad_clip)
        report.steps += 1
    net.eval()
    adapted = dataclasses.replace(loaded, net=net)
    with torch.no_grad():
        report.loss_after = float(
            _recon_loss(net, loaded, held, h_theta, h_lam, _generator(seed, dev))
        )
    report.gain_after_db = _recon_gain(adapted, held, h_theta, h_lam, seed)
    report.kept = report.steps > 0 and report.gain_after_db >= report.gain_before_db
    report.seconds = time.perf_counter() - t0
    return (adapted if report.kept else loaded), report
