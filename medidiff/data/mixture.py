"""A seeded mixture of training-image sources, its torch ``IterableDataset`` and a preview figure.

``TrainingImageSource(patch_size, weights)`` draws reference (high-quality, but noisy like real scans) 2D
images from ``"synthetic"`` (``medidiff.data.generators``), ``"natural"`` (``medidiff.data.natural``, training
split) and ``"mri"`` (``medidiff.data.mri_slices``, shipped training volumes) with the given weights. The
caller applies the task's operator to make (degraded, reference) pairs, so training, sampling and
evaluation keep one definition of each degradation. Every draw takes an explicit ``np.random.Generator``;
``TrainingImageDataset`` seeds one per (seed, epoch, worker), so results do not depend on how many
workers load them beyond which worker yields which image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medidiff.data.generators import SynthConfig, synthetic_image
from medidiff.data.mri_slices import MRISliceConfig, MRISliceSource
from medidiff.data.natural import NaturalConfig, NaturalImageSource

SOURCES = ("synthetic", "natural", "mri")
DEFAULT_WEIGHTS: dict[str, float] = {"synthetic": 0.6, "natural": 0.25, "mri": 0.15}


class TrainingImage(NamedTuple):
    """One reference image and where it came from."""

    image: np.ndarray  # (H, W) float32 magnitude, tissue 99th percentile about 1
    source: str  # one of SOURCES
    params: dict  # the draws that made it (contrast, snr, background, pixel size, ...)


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Mixture weights normalised to sum 1 (ValueError on unknown names, negative or all-zero weights)."""
    unknown = sorted(set(weights) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown training-image source(s) {unknown}; choose from {list(SOURCES)}")
    w = {k: float(v) for k, v in weights.items()}
    if any(not np.isfinite(v) or v < 0 for v in w.values()):
        raise ValueError(f"mixture weights must be finite and >= 0, got {w}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"at least one mixture weight must be > 0, got {w}")
    return {k: w.get(k, 0.0) / total for k in SOURCES}


class TrainingImageSource:
    """Reference images of ``patch_size`` drawn from a weighted mixture of sources.

    A source with weight 0 is never built (its data is never loaded).
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 64,
        weights: Mapping[str, float] | None = None,
        *,
        synth: SynthConfig | None = None,
        natural: NaturalConfig | None = None,
        mri: MRISliceConfig | None = None,
    ) -> None:
        shape = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
        if len(shape) != 2 or min(shape) < 8 or any(s % 2 for s in shape):
            raise ValueError(f"patch_size must be even and >= 8 pixels, got {patch_size}")
        self.shape: tuple[int, int] = shape  # type: ignore[assignment]
        self.weights = check_weights(DEFAULT_WEIGHTS if weights is None else weights)
        self._synth = synth or SynthConfig()
        self._natural = NaturalImageSource("train", natural) if self.weights["natural"] > 0 else None
        self._mri = MRISliceSource(cfg=mri) if self.weights["mri"] > 0 else None
        self._p = np.asarray([self.weights[k] for k in SOURCES])

    def sample(self, rng: np.random.Generator) -> TrainingImage:
        """One reference image from a source drawn with the mixture weights."""
        source = SOURCES[int(rng.choice(len(SOURCES), p=self._p))]
        if source == "synthetic":
            drawn = synthetic_image(rng, self.shape, self._synth)
        elif source == "natural":
            drawn = self._natural.sample(rng, self.shape)  # type: ignore[union-attr]
        else:
            drawn = self._mri.sample(rng, self.shape)  # type: ignore[union-attr]
        return TrainingImage(drawn.image, source, drawn.params)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        """``n`` references as one ``(n, H, W)`` float32 array, and the source of each."""
        drawn = [self.sample(rng) for _ in range(n)]
        return np.stack([d.image for d in drawn]), [d.source for d in drawn]

    def stream(self, seed: int | Sequence[int]) -> Iterator[TrainingImage]:
        """An endless, reproducible stream of references seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.sample(rng)


class TrainingImageDataset(IterableDataset):
    """``torch`` iterable dataset of ``{"image": (1, H, W) float32 tensor, "source": str}``.

    Worker ``w`` of a ``DataLoader`` draws from ``np.random.default_rng([seed, epoch, w])``; with
    ``samples_per_epoch`` the epoch ends after that many items in total (split over the workers), otherwise
    the stream is endless. Call ``set_epoch`` between epochs for fresh images.
    """

    def __init__(
        self, source: TrainingImageSource, seed: int = 0, samples_per_epoch: int | None = None
    ) -> None:
        super().__init__()
        if samples_per_epoch is not None and samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch must be >= 0, got {samples_per_epoch}")
        self.source = source
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still reproducible) set of images in the next iteration."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        if self.samples_per_epoch is None:
            count = None
        else:
            count = self.samples_per_epoch // workers + (worker < self.samples_per_epoch % workers)
        produced = 0
        while count is None or produced < count:
            drawn = self.source.sample(rng)
            produced += 1
            yield {"image": torch.from_numpy(np.ascontiguousarray(drawn.image)[None]), "source": drawn.source}


def _display(arr: np.ndarray) -> np.ndarray:
    """A 2D real image to show: magnitude of complex data, channel 0 of (C, H, W)."""
    a = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
    while a.ndim > 2:
        a = a[0]
    return np.abs(a).astype(np.float32) if np.iscomplexobj(a) else a.astype(np.float32)


def preview_figure(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    *,
    dpi: int = 100,
) -> Path:
    """Write a PNG of training pairs: one row per pair, columns degraded | reference | reference - degraded.

    ``degraded`` may be smaller than the reference (e.g. the low-resolution image of SR); it is then shown
    over the same extent and there is no difference for that row. Complex arrays are shown as
    magnitude, ``(C, H, W)`` arrays by their first channel. Written atomically with matplotlib's Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medidiff.io.atomic import atomic_file

    if not pairs:
        raise ValueError("preview_figure needs at least one (degraded, reference) pair")
    if titles is not None and len(titles) != len(pairs):
        raise ValueError(f"got {len(titles)} titles for {len(pairs)} pairs")
    n = len(pairs)
    shown = [(_display(d), _display(r)) for d, r in pairs]
    cols = 3 if any(low.shape == ref.shape for low, ref in shown) else 2
    fig = Figure(figsize=(2.5 * cols, 2.5 * n), dpi=dpi, layout="constrained", facecolor="white")
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for row, (low, ref) in enumerate(shown):
        h, w = ref.shape
        vmax = float(np.percentile(ref, 99.5)) or 1.0
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        label = f"{titles[row]}: " if titles is not None else ""
        axes[row, 0].imshow(low, cmap="gray", vmin=0, vmax=vmax, extent=extent, interpolation="nearest")
        axes[row, 0].set_title(f"{label}degraded {low.shape[0]}x{low.shape[1]}", fontsize=8)
        axes[row, 1].imshow(ref, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        axes[row, 1].set_title(f"reference {h}x{w}", fontsize=8)
        if low.shape == ref.shape:
            diff = ref - low
            lim = float(np.percentile(np.abs(diff), 99.5)) or 1.0
            axes[row, 2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            axes[row, 2].set_title("reference - degraded", fontsize=8)
        elif cols == 3:
            axes[row, 2].set_axis_off()
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    target = Path(path)
    with atomic_file(target) as tmp:
        FigureCanvasAgg(fig).print_png(str(tmp))
    return target
