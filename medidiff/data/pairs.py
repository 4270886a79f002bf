"""Training pairs (conditioning, target) made with the task's operator, and the patch sampler.

Each training volume is cut into stacks of slices along several orientations. A whole stack is degraded
with the task's operator (``medidiff.tasks.task_operator``) and normalised by
``medidiff.tasks.measurement_scale`` of that degraded stack — the same array and formula ``enhance``
uses on a user's scan. Selected slices become pairs, cut into random patches with flips.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medidiff.data.shipped import real_training_volumes
from medidiff.data.synth import synth_subject
from medidiff.io import ScanError, discover
from medidiff.physics.noise import add_noise
from medidiff.recipe import Recipe, RecipeError, check_folders, resolve_folder
from medidiff.tasks import (
    Operator,
    TaskConfig,
    intensity_scale,
    measurement_scale,
    task_operator,
    to_channels,
)

Tensor = torch.Tensor


def crop_multiple(stack: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crop the last two dims to multiples of ``multiple``."""
    h, w = stack.shape[-2:]
    hh, ww = h - h % multiple, w - w % multiple
    top, left = (h - hh) // 2, (w - ww) // 2
    return stack[..., top: top + hh, left: left + ww]


def neighbour_index(n_slices: int, s: int, n: int) -> list[int]:
    """Indices of the 2n neighbours of slice ``s`` (clamped at the ends)."""
    return [min(max(s + o, 0), n_slices - 1) for o in range(-n, n + 1) if o != 0]


def _training_volumes(recipe: Recipe) -> Iterator[np.ndarray]:
    """Synthetic subjects, the shipped real training volumes (never the evaluation set) and the scans under
    ``data.folders``, one at a time (a user's folder may not fit in memory at once)."""
    d = recipe.data
    for i in range(d.synthetic_subjects):
        yield synth_subject(d.seed * 1000 + i).array
    if d.real_training:
        for _, v in real_training_volumes():
            yield v.array
    yield from folder_volumes(recipe)


def folder_volumes(recipe: Recipe) -> Iterator[np.ndarray]:
    """Image volumes of every scan found under ``data.folders`` (k-space and unreadable entries skipped)."""
    check_folders(recipe, f"recipe {recipe.name}")
    for i, folder in enumerate(recipe.data.folders):
        root = resolve_folder(folder)
        used, skipped = 0, []
        for source in discover(root):
            if source.kind in ("invalid", "kspace"):
                skipped.append(source.kind)
                continue
            try:
                vol = source.load()
            except ScanError as exc:
                warnings.warn(f"data.folders[{i}]: skipping {exc}", stacklevel=2)
                skipped.append("unreadable")
                continue
            used += 1
            yield np.nan_to_num(np.asarray(vol.array, np.float32))
        if used == 0:
            why = f" ({len(skipped)} entries skipped: k-space or unreadable)" if skipped else ""
            raise RecipeError(f"recipe {recipe.name}: data.folders[{i}] '{folder}' ({root}) holds no readable "
                              f"image scan{why}")


def _validation_volumes(recipe: Recipe) -> list[np.ndarray]:
    """Held-out synthetic subjects (seeds disjoint from training)."""
    d = recipe.data
    return [synth_subject(10_000 + d.seed * 1000 + i).array for i in range(d.val_subjects)]


def _orientations(recipe: Recipe, vol: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Stacks (S, H, W) of a volume in the orientations used for training (W = through-plane for sr_thick)."""
    stacks = []
    for s_axis in range(3):
        rest = [a for a in range(3) if a != s_axis]
        if min(vol.shape[a] for a in rest) < 16 or vol.shape[s_axis] < 1:
            continue
        if recipe.task.kind == "sr_thick" and rng.random() < 0.5:
            rest = rest[::-1]
        stacks.append(np.transpose(vol, (s_axis, *rest)))
    return stacks


@dataclass
class SlicePair:
    """One normalised training/validation slice (every tensor divided by ``scale``)."""

    y: Tensor  # measurement
    base: Tensor  # pinv image (H, W)
    target: Tensor  # reference (H, W)
    context: Tensor | None  # neighbours' pinv images as channels (2 n C, H, W)
    mask: np.ndarray | None = None
    scale: float = 1.0  # measurement_scale of the degraded stack the slice came from


def degrade_stack(task: TaskConfig, stack: np.ndarray, seed: int,
                  generator: torch.Generator | None = None) -> tuple[Operator, Tensor, float]:
    """Degrade a whole stack (S, H, W) with the task's operator (plus measurement noise when the task has
    some); return the operator, the measurement and its :func:`medidiff.tasks.measurement_scale`."""
    x = torch.from_numpy(np.ascontiguousarray(stack))
    op = task_operator(task, tuple(x.shape[-2:]), seed=seed)
    meas = op.A(x.to(torch.complex64) if task.kind == "recon" else x)
    if task.noise_sigma > 0:
        meas = add_noise(meas, task.noise_sigma * intensity_scale(x), generator=generator)
    return op, meas, measurement_scale(task.kind, meas)


def _stack_pairs(recipe: Recipe, stack: np.ndarray, chosen: np.ndarray, op: Operator, meas: Tensor,
                 scale: float) -> list[SlicePair]:
    """Normalised pairs for the ``chosen`` slices of a degraded stack (with their neighbours' context)."""
    n, cplx = recipe.model.neighbours, recipe.complex_images
    needed = sorted({j for s in chosen for j in [s, *neighbour_index(len(stack), s, n)]})
    pos = {j: i for i, j in enumerate(needed)}
    x = torch.from_numpy(np.ascontiguousarray(stack[needed]))
    y = meas[needed]
    base = op.pinv(y)
    pairs = []
    for s in chosen:
        ctx = None
        if n:
            ctx = torch.cat([to_channels(base[pos[j]][None], cplx)[0]
                             for j in neighbour_index(len(stack), s, n)]) / scale
        pairs.append(SlicePair(y=y[pos[s]] / scale, base=base[pos[s]] / scale, target=x[pos[s]] / scale,
                               context=ctx, mask=getattr(op, "mask", None), scale=scale))
    return pairs


def make_pairs(recipe: Recipe, volumes: Iterable[np.ndarray], slices_per_volume: int, seed: int) -> list[SlicePair]:
    """Degrade each stack of each volume with the task operator, normalise it, keep selected slices."""
    rng = np.random.default_rng(seed)
    task = recipe.task
    multiple = task.factor if task.kind != "recon" else 2
    gen = torch.Generator().manual_seed(seed)
    pairs: list[SlicePair] = []
    for v_index, vol in enumerate(volumes):
        stacks = _orientations(recipe, np.asarray(vol, np.float32), rng)
        if not stacks:
            continue
        per = max(1, slices_per_volume // len(stacks))
        for stack in stacks:
            stack = crop_multiple(stack, multiple)
            energy = np.abs(stack).reshape(len(stack), -1).mean(axis=1)
            keep = np.flatnonzero(energy > 0.25 * energy.max())
            if len(keep) == 0:
                continue
            chosen = np.sort(rng.choice(keep, size=min(per, len(keep)), replace=False))
            op, meas, scale = degrade_stack(task, stack, seed + v_index, gen)
            pairs += _stack_pairs(recipe, stack, chosen, op, meas, scale)
    return pairs


class PatchSampler:
    """Random patches (with flips) from a list of slice pairs, drawn with an explicit generator."""

    def __init__(self, recipe: Recipe, pairs: list[SlicePair]) -> None:
        if not pairs:
            raise ValueError("no training slices: the training volumes are empty or too small")
        self.recipe, self.pairs = recipe, pairs
        p = recipe.data.patch_size
        self.pairs = [q for q in pairs if min(q.base.shape[-2:]) >= p]
        if not self.pairs:
            raise ValueError(f"no training slice is at least {p}x{p}; lower data.patch_size")

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(cond (B, Cc, P, P), x0 (B, C, P, P))`` with x0 the residual or the image (recipe ``target``)."""
        r, p = self.recipe, self.recipe.data.patch_size
        cplx = r.complex_images
        conds, targets = [], []
        idx = torch.randint(0, len(self.pairs), (batch_size,), generator=generator).tolist()
        for i in idx:
            q = self.pairs[i]
            h, w = q.base.shape[-2:]
            top = int(torch.randint(0, h - p + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - p + 1, (1,), generator=generator))
            base = to_channels(q.base[None], cplx)[0]
            tgt = to_channels(q.target[None], cplx)[0]
            cond = base if q.context is None else torch.cat([base, q.context])
            x0 = tgt - base if r.diffusion.target == "residual" else tgt
            cond, x0 = cond[:, top: top + p, left: left + p], x0[:, top: top + p, left: left + p]
            flips = torch.rand(3, generator=generator)
            if flips[0] < 0.5:
                cond, x0 = cond.flip(-1), x0.flip(-1)
            if flips[1] < 0.5:
                cond, x0 = cond.flip(-2), x0.flip(-2)
            if r.task.kind == "sr" and flips[2] < 0.5:
                cond, x0 = cond.transpose(-1, -2), x0.transpose(-1, -2)
            conds.append(cond)
            targets.append(x0)
        return torch.stack(conds).float(), torch.stack(targets).float()


def fingerprint(recipe: Recipe, pairs: list[SlicePair]) -> str:
    """A short hash of the training data as the model saw it (task, data settings and every target slice,
    the slices of the scans under ``data.folders`` included)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr(recipe.task).encode())
    h.update(repr(recipe.data).encode())
    for q in pairs:
        h.update(q.target.numpy().tobytes())
    return h.hexdigest()


def training_pairs(recipe: Recipe) -> list[SlicePair]:
    """All training slices of a recipe."""
    return make_pairs(recipe, _training_volumes(recipe), recipe.data.slices_per_volume, recipe.data.seed)


def validation_pairs(recipe: Recipe) -> list[SlicePair]:
    """Full held-out slices for validation."""
    pairs = make_pairs(recipe, _validation_volumes(recipe), recipe.data.val_slices, recipe.data.seed + 1)
    return pairs[: recipe.data.val_slices]
