"""The `Volume`: voxels plus the geometry that places them in the patient (RAS+ millimetres)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# Largest |cos| allowed between two voxel axes of a scan's affine (0.057°): real scanners and NIfTI's
# float32 sform stay far below it; a sheared stack (gantry tilt, a broken orientation) does not.
ORTHOGONALITY_TOLERANCE = 1e-3


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


def geometry_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` cannot place a scan (non-finite, singular, sheared axes), or None when it is sound."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        return f"affine has shape {a.shape}, not 4x4"
    if not np.all(np.isfinite(a)):
        return "affine contains NaN or Inf"
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms < 1e-9) or not np.all(np.isfinite(1.0 / norms)):
        return "affine is singular: a voxel axis has zero length"
    directions = m / norms
    if abs(float(np.linalg.det(directions))) < 1e-6:
        return "affine is singular: voxel axes are parallel"
    worst = float(np.abs(directions.T @ directions - np.eye(3)).max())
    if worst > ORTHOGONALITY_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(worst, 1.0))))
        return f"affine axes are not orthonormal (sheared by up to {angle:.2f}°)"
    return None


def check_volume(
    vol: Volume, path: str | Path, *, allow_nonfinite: bool = False, allow_shear: bool = False
) -> Volume:
    """The invariants every reader guarantees, or a ScanError naming ``path`` and the problem.

    A Volume leaving a reader has at least one voxel along each axis, a finite non-singular affine with
    orthonormal (not sheared) axes, and finite voxels. With ``allow_nonfinite`` NaN/Inf voxels are kept,
    with ``allow_shear`` a sheared (still non-singular) affine is kept; each is then recorded in
    ``meta['problems']`` instead of refused.
    """
    from medidiff.io.errors import ScanError

    if 0 in vol.array.shape:
        raise ScanError(path, f"image has a zero-length axis (shape {'×'.join(map(str, vol.shape))})")
    problem = geometry_problem(vol.affine)
    if problem and not (allow_shear and "not orthonormal" in problem):
        raise ScanError(path, problem)
    if problem:
        problems = vol.meta.setdefault("problems", [])
        if problem not in problems:
            problems.append(problem)
    bad = int(vol.array.size - np.count_nonzero(np.isfinite(vol.array)))
    if bad:
        message = nonfinite_problem(bad, vol.array.size)
        if not allow_nonfinite:
            raise ScanError(path, message)
        problems = vol.meta.setdefault("problems", [])
        if message not in problems:
            problems.append(message)
    return vol


def nonfinite_problem(bad: int, total: int) -> str:
    """The wording of a NaN/Inf count, shared by discovery and the readers."""
    return f"{bad} voxel(s) are NaN or Inf (of {total})"
