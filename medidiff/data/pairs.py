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

from medidiff.data.generators import smooth_fields
from medidiff.data.mixture import TrainingImageSource, check_weights
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


def extruded_context(base: Tensor, n: int) -> Tensor:
    """The neighbours' conditioning channels for images that have none (a single image, a self-check
    image): ``base`` (B, C, h, w) -> (B, 2 n C, h, w), in :func:`neighbour_index` order.

    They are what a 2.5D model meets in training (:class:`MixtureSampler`): an extruded object whose
    neighbouring slices are shifted copies, neighbour ``j`` being the image moved by ``j - n`` rows (edge rows
    repeated). Copies of the image itself, which training never shows, cost the through-plane model
    0.04 dB on the held-out panel (model alone).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    h = base.shape[-2]
    rows = torch.arange(h, device=base.device)
    offsets = [j - n for j in neighbour_index(2 * n + 1, n, n)]
    return torch.cat([base.index_select(-2, (rows + k).clamp(0, h - 1)) for k in offsets], dim=1)


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
            raise RecipeError(f"recipe {recipe.name}: data.folders[{i}] '{folder}' ({root}) holds no "
                              f"readable image scan{why}")


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


def make_pairs(
    recipe: Recipe, volumes: Iterable[np.ndarray], slices_per_volume: int, seed: int
) -> list[SlicePair]:
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


# ---------------------------------------------------------------------------------------------------------
# On-the-fly pairs from the training-image mixture (recipe ``data.mixture``)
# ---------------------------------------------------------------------------------------------------------


def smooth_phase(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random phase map (radians): a constant offset plus a slowly varying field of random
    amplitude, like the B0/B1 phase of a real single-coil image."""
    length = float(rng.uniform(0.25, 1.0)) * min(shape)
    field_ = smooth_fields(rng, 1, shape, (length, length))[0]
    return (rng.uniform(-np.pi, np.pi) + rng.uniform(0.0, np.pi) * field_).astype(np.float32)


@dataclass
class MixturePair:
    """One on-the-fly training example, normalised by the measurement scale of its degraded image."""

    cond: Tensor  # (Cc, P, P): pinv image (+ neighbours' pinv images for sr_thick)
    x0: Tensor  # (C, P, P): residual (reference - pinv) or reference, as the recipe's diffusion.target says
    reference: Tensor  # (P, P) real or complex
    degraded: Tensor  # (P, P) pinv image, real or complex
    source: str


class MixtureSampler:
    """Training pairs made on the fly.

    Reference images from :class:`medidiff.data.mixture.TrainingImageSource` (weights ``data.mixture``)
    degraded with the task's operator and normalised with :func:`medidiff.tasks.measurement_scale` — the
    same operator and normalisation ``enhance`` uses.

    - ``sr``: k-space truncation of the reference patch.
    - ``recon``: the magnitude reference gets a smooth random phase; a mask (``task.mask``,
      ``task.acceleration``, ``task.center_fraction``) is drawn per sample.
    - ``sr_thick``: the last axis is the through-plane axis (as in the slice stacks of :func:`make_pairs`).
      With ``model.neighbours = n`` the reference is drawn ``2n`` rows taller and slice ``s`` of the stack is
      rows ``s .. s+P``: an extruded 3D object whose neighbouring slices are shifted copies of each other.

    Each example draws its own seed from the training loop's ``torch.Generator`` and builds a
    ``np.random.Generator`` from ``(data.seed, that seed)``, so a batch depends only on the generator state
    (restored by ``--resume``) and not on which process or worker makes it.
    """

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        try:
            self.weights = check_weights(recipe.data.mixture)
        except ValueError as exc:
            raise RecipeError(f"recipe {recipe.name}: data.mixture: {exc}") from exc
        p, n = recipe.data.patch_size, recipe.model.neighbours
        extra = 2 * n if recipe.task.kind == "sr_thick" else 0
        self.source = TrainingImageSource((p + extra, p), self.weights)

    def example(self, rng: np.random.Generator) -> MixturePair:
        """One (cond, x0) example drawn with ``rng``."""
        r = self.recipe
        task, p, cplx = r.task, r.data.patch_size, r.complex_images
        drawn = self.source.sample(rng)
        image = np.ascontiguousarray(drawn.image, dtype=np.float32)
        seed = int(rng.integers(2**31))
        gen = torch.Generator().manual_seed(seed)
        if task.kind == "sr_thick":
            n = r.model.neighbours
            stack = np.stack([image[s: s + p] for s in range(2 * n + 1)])
            if rng.random() < 0.5:
                stack = stack[::-1]
            x = torch.from_numpy(np.ascontiguousarray(stack))
            centre, others = n, neighbour_index(2 * n + 1, n, n)
        else:
            if cplx:
                image = image * np.exp(1j * smooth_phase(rng, image.shape)).astype(np.complex64)
            x = torch.from_numpy(np.ascontiguousarray(image))[None]
            centre, others = 0, []
        op = task_operator(task, (p, p), seed=seed)
        meas = op.A(x.to(torch.complex64) if cplx else x)
        if task.noise_sigma > 0:
            meas = add_noise(meas, task.noise_sigma * intensity_scale(x), generator=gen)
        scale = measurement_scale(task.kind, meas)
        base = op.pinv(meas) / scale
        target = x / scale
        if not cplx:
            base = base.real if base.is_complex() else base
        base_c = to_channels(base[centre][None], cplx)[0]
        cond = torch.cat([base_c, *[to_channels(base[j][None], cplx)[0] for j in others]])
        tgt = to_channels(target[centre][None], cplx)[0]
        x0 = tgt - base_c if r.diffusion.target == "residual" else tgt
        return MixturePair(cond.float(), x0.float(), target[centre], base[centre], drawn.source)

    def examples(self, count: int, generator: torch.Generator) -> list[MixturePair]:
        """``count`` examples, each seeded from ``generator``."""
        seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
        return [self.example(np.random.default_rng([self.recipe.data.seed, s])) for s in seeds]

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(cond (B, Cc, P, P), x0 (B, C, P, P))``, as :meth:`PatchSampler.batch`."""
        ex = self.examples(batch_size, generator)
        return torch.stack([e.cond for e in ex]), torch.stack([e.x0 for e in ex])


def training_sampler(recipe: Recipe) -> tuple[PatchSampler | MixtureSampler, str, int]:
    """The recipe's training sampler, the fingerprint of its data and the number of fixed training slices
    (0 for the on-the-fly mixture)."""
    if recipe.data.mixture:
        h = hashlib.blake2b(digest_size=12)
        h.update(repr(recipe.task).encode())
        h.update(repr(recipe.data).encode())
        return MixtureSampler(recipe), h.hexdigest(), 0
    pairs = training_pairs(recipe)
    return PatchSampler(recipe, pairs), fingerprint(recipe, pairs), len(pairs)


def preview_pairs(recipe: Recipe, n: int, seed: int = 0) -> tuple[list[tuple[Tensor, Tensor]], list[str]]:
    """``n`` (degraded, reference) training examples of a recipe, as its training loop draws them (the
    on-the-fly mixture, or patches of the fixed slice pairs), and a title for each."""
    gen = torch.Generator().manual_seed(seed)
    factor = recipe.task.factor if recipe.task.kind != "recon" else recipe.task.acceleration
    what = f"{recipe.task.kind} x{factor:g}"
    if recipe.data.mixture:
        ex = MixtureSampler(recipe).examples(n, gen)
        return [(e.degraded, e.reference) for e in ex], [f"{e.source} {what}" for e in ex]
    cond, x0 = PatchSampler(recipe, training_pairs(recipe)).batch(n, gen)
    c = recipe.image_channels
    base = cond[:, :c]
    ref = base + x0 if recipe.diffusion.target == "residual" else x0
    if recipe.complex_images:
        base, ref = torch.complex(base[:, 0], base[:, 1]), torch.complex(ref[:, 0], ref[:, 1])
    else:
        base, ref = base[:, 0], ref[:, 0]
    return [(base[i], ref[i]) for i in range(n)], [f"slices {what}"] * n
