"""The `Volume`: voxels plus the geometry that places them in the patient (RAS+ millimetres)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D scan: float32 voxels indexed ``array[i, j, k]`` and a 4x4 affine mapping (i, j, k, 1) to RAS+ mm.

    This is nibabel's convention. For DICOM, i runs along a row (column index), j down the columns
    (row index) and k through the slices. Spacing and orientation derive from the affine; they are never
    stored twice.

    ``meta`` keys used across the package (all optional):
      modality (str), series_uid (str), description (str), source_files (list[str]),
      dicom_header (pydicom Dataset of one source slice, used to write a derived series),
      source_sop_instance_uids (list[str], slice order), units (str).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume needs a 4x4 affine, got shape {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Anatomical direction each array axis points to, e.g. ('R', 'A', 'S')."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    @property
    def slice_axis(self) -> int:
        """The axis with the largest spacing (the last one on ties): the through-plane axis."""
        sp = np.asarray(self.spacing)
        return int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-4, atol=1e-6))[-1])

    @property
    def source_files(self) -> list[Path]:
        return [Path(p) for p in self.meta.get("source_files", [])]

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None, **meta: Any) -> Volume:
        """A new Volume sharing this one's metadata, with new voxels (and optionally a new affine)."""
        new_meta = dict(self.meta)
        new_meta.update(meta)
        return replace(self, array=array, affine=self.affine if affine is None else affine, meta=new_meta)

    def world_coordinates(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices (N, 3) to RAS mm (N, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
