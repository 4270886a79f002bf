"""Random 2D slices of the shipped real MR training volumes, at several pixel sizes.

Only ``medidiff.data.shipped.real_training_volumes()`` is read (the held-out evaluation scans never are).
Each sample: a random volume, orientation (any of the three axes) and slice with enough signal; a random
zoom (log-uniform 0.5-2 output pixels per millimetre of the finest in-plane spacing, antialiased when
shrinking), in-plane rotation and flip; a patch centred on a random pixel with signal; a mild bias field;
then the shared acquisition (Rician noise over the SNR range, background sometimes exactly zero). The
shipped MNI152 template is brain-extracted and noise-free, so the noise comes only from that last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medidiff.data.generators import (
    AcquisitionConfig,
    SyntheticImage,
    acquire,
    bias_field,
    log_uniform,
    normalise_tissue,
)
from medidiff.io import Volume


@dataclass(frozen=True)
class MRISliceConfig:
    """Ranges of the real-MR slice source."""

    zoom: tuple[float, float] = (0.5, 2.0)  # output pixels per millimetre of the finest in-plane spacing
    min_signal_fraction: float = 0.1  # slices with less signal than this are never drawn
    bias: float = 0.2
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)


class MRISliceSource:
    """Reference patches from 2D slices of real MR volumes (by default the shipped training split only)."""

    def __init__(
        self, volumes: list[tuple[str, Volume]] | None = None, cfg: MRISliceConfig | None = None
    ) -> None:
        if volumes is None:
            from medidiff.data.shipped import real_training_volumes

            volumes = real_training_volumes()
        if not volumes:
            raise ValueError("MRISliceSource needs at least one volume")
        self.cfg = cfg or MRISliceConfig()
        self.names = [name for name, _ in volumes]
        self._arrays: list[np.ndarray] = []
        self._spacings: list[tuple[float, float, float]] = []
        self._slices: list[list[np.ndarray]] = []  # per volume, per axis: indices of slices with signal
        for name, vol in volumes:
            arr = np.asarray(vol.array, np.float32)
            if arr.ndim != 3:
                raise ValueError(f"{name}: expected a 3D volume, got shape {arr.shape}")
            arr = np.clip(arr, 0.0, None)
            p99 = float(np.percentile(arr[::2, ::2, ::2], 99))
            arr = arr / (p99 if p99 > 0 else 1.0)
            signal = arr > 0.05
            per_axis = []
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                frac = signal.mean(axis=other)
                per_axis.append(np.flatnonzero(frac >= self.cfg.min_signal_fraction))
            if not any(len(s) for s in per_axis):
                raise ValueError(
                    f"{name}: no slice has {self.cfg.min_signal_fraction:.0%} of its pixels with signal"
                )
            self._arrays.append(arr)
            self._spacings.append(tuple(float(s) for s in vol.spacing))
            self._slices.append(per_axis)

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int] = 128) -> SyntheticImage:
        """One reference patch of ``size`` (float32 magnitude; tissue 99th percentile about 1)."""
        from scipy.ndimage import gaussian_filter, map_coordinates

        cfg = self.cfg
        shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        v = int(rng.integers(len(self._arrays)))
        axes = [a for a in range(3) if len(self._slices[v][a])]
        axis = int(rng.choice(axes))
        index = int(rng.choice(self._slices[v][axis]))
        plane = np.take(self._arrays[v], index, axis=axis)
        spacing = [s for a, s in enumerate(self._spacings[v]) if a != axis]
        zoom = log_uniform(rng, *cfg.zoom)
        pixel_mm = min(spacing) / zoom
        step = np.asarray([pixel_mm / s for s in spacing])  # source pixels per output pixel, per axis
        sigma = 0.5 * np.sqrt(np.clip(step**2 - 1.0, 0.0, None))
        if np.any(sigma > 0.05):
            plane = gaussian_filter(plane, sigma, mode="constant")
        ys, xs = np.nonzero(plane > 0.05)
        pick = int(rng.integers(len(ys)))
        cy, cx = float(ys[pick]), float(xs[pick])
        angle = rng.uniform(0, 2 * np.pi)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        yy = (np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2)[:, None]
        xx = (np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2)[None, :]
        c, s = np.cos(angle), np.sin(angle)
        src_y = cy + step[0] * (c * yy - s * xx * flip)
        src_x = cx + step[1] * (s * yy + c * xx * flip)
        patch = map_coordinates(plane, [src_y, src_x], order=1, mode="constant", cval=0.0, output=np.float32)
        patch = np.clip(patch, 0.0, None)
        body = patch > 0.02
        patch *= bias_field(rng, shape, cfg.bias)
        clean = normalise_tissue(patch, body)
        image, acq = acquire(clean, body, rng, cfg.acquisition)
        params = {"volume": self.names[v], "axis": axis, "slice": index, "pixel_mm": pixel_mm, **acq}
        return SyntheticImage(image, clean, body, params)
