"""NIfTI-1/2 reading and writing (nibabel): sform first, then qform; float32; millimetres."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medidiff.io.atomic import atomic_file
from medidiff.io.errors import ScanError
from medidiff.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _load_image(path: Path):
    """Open with nibabel, turning every failure into a ScanError that names the file."""
    import nibabel as nib

    if not path.exists():
        raise ScanError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise ScanError(path, "empty file (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise ScanError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def nifti_affine(img, path: Path) -> tuple[np.ndarray, list[str]]:
    """The voxel → RAS mm affine: sform when its code is set, else qform, else nibabel's fallback (a problem)."""
    problems: list[str] = []
    sform, scode = img.get_sform(coded=True)
    qform, qcode = img.get_qform(coded=True)
    if sform is not None and int(scode) > 0:
        affine = np.asarray(sform, dtype=np.float64)
    elif qform is not None and int(qcode) > 0:
        affine = np.asarray(qform, dtype=np.float64)
    else:
        affine = np.asarray(img.affine, dtype=np.float64)
        problems.append("neither sform nor qform is set: geometry is only voxel sizes (orientation unknown)")
    if not np.all(np.isfinite(affine)):
        raise ScanError(path, "affine contains NaN or Inf")
    problems += affine_problems(affine)
    unit = img.header.get_xyzt_units()[0]
    if unit not in ("mm", "unknown"):
        problems.append(f"spatial unit is {unit!r}, expected mm")
    return affine, problems


def affine_problems(affine: np.ndarray) -> list[str]:
    """Problems with an affine's 3x3 part: zero-size voxels and non-orthogonal (sheared) axes."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms < 1e-9):
        return ["affine has a zero-length voxel axis (singular)"]
    directions = m / norms
    off = directions.T @ directions - np.eye(3)
    worst = float(np.abs(off).max())
    if worst > 1e-3:
        return [
            f"affine axes are not orthonormal (sheared by up to {np.degrees(np.arcsin(min(worst, 1))):.2f}°)"
        ]
    return []


def nifti_volume_count(path: str | Path) -> int:
    """How many 3D volumes the file holds (product of dimensions 4 and up)."""
    img = _load_image(Path(path))
    shape = img.shape
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


def read_nifti(path: str | Path, index: int | None = None) -> Volume:
    """Read one 3D volume from a NIfTI file (``index`` picks a volume of a 4D file).

    Non-finite voxels and a non-orthonormal affine are recorded in ``meta['problems']``;
    voxels are never altered.
    """
    path = Path(path)
    img = _load_image(path)
    affine, problems = nifti_affine(img, path)
    shape = img.shape
    if len(shape) < 2:
        raise ScanError(path, f"image has {len(shape)} dimension(s); need at least 2")
    try:
        proxy = img.dataobj
        if len(shape) == 2:
            data = np.asarray(proxy, dtype=np.float32)[:, :, None]
        elif len(shape) == 3:
            data = np.asarray(proxy, dtype=np.float32)
        else:
            n = int(np.prod(shape[3:]))
            if index is None:
                if n != 1:
                    raise ScanError(path, f"4D file with {n} volumes: pick one with index=0..{n - 1}")
                index = 0
            if not 0 <= index < n:
                raise ScanError(path, f"volume index {index} out of range 0..{n - 1}")
            multi = np.unravel_index(index, shape[3:], order="F")
            data = np.asarray(proxy[(slice(None),) * 3 + tuple(int(m) for m in multi)], dtype=np.float32)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, bad header ...
        raise ScanError(path, f"voxel data unreadable ({type(exc).__name__}: {exc})") from None
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        problems.append(f"{bad} voxel(s) are NaN or Inf")
    description = _description(img, path)
    meta = {
        "modality": "MR",
        "description": description,
        "source_files": [str(path)],
        "units": "mm",
        "problems": problems,
    }
    if index is not None and len(shape) > 3:
        meta["index"] = int(index)
    return Volume(data, affine, meta)


def _description(img, path: Path) -> str:
    """The header's descrip field, or the file name without suffixes."""
    raw = bytes(np.asarray(img.header["descrip"]).tobytes()).split(b"\0")[0]
    return raw.decode("ascii", "replace").strip() or path.name.split(".")[0]


def probe_nifti(path: str | Path) -> list[dict]:
    """Index, shape, affine, description and problems of each 3D volume, reading the voxels only once.

    Used by discovery: a 4D ``.nii.gz`` is decompressed once, not once per volume.
    """
    path = Path(path)
    img = _load_image(path)
    affine, problems = nifti_affine(img, path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise ScanError(path, f"image has {len(shape)} dimension(s); need at least 2")
    n = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    try:
        data = np.asanyarray(img.dataobj)  # a memory map for .nii; one decompression for .nii.gz
        if np.issubdtype(data.dtype, np.floating):
            flat = data.reshape((*shape[:3], n), order="F") if len(shape) > 3 else data.reshape(-1, 1)
            bad = np.count_nonzero(~np.isfinite(flat), axis=tuple(range(flat.ndim - 1)))
        else:
            bad = np.zeros(n, dtype=int)
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, bad header ...
        raise ScanError(path, f"voxel data unreadable ({type(exc).__name__}: {exc})") from None
    vol_shape = shape[:3] if len(shape) >= 3 else (*shape, 1)
    description = _description(img, path)
    out = []
    for index in range(n):
        vol_problems = list(problems)
        if bad[index]:
            vol_problems.append(f"{int(bad[index])} voxel(s) are NaN or Inf")
        out.append(
            {
                "index": index if len(shape) > 3 and n > 1 else None,
                "shape": vol_shape,
                "affine": affine,
                "description": description,
                "problems": vol_problems,
            }
        )
    return out


def write_nifti(vol: Volume, path: str | Path) -> Path:
    """Write float32 NIfTI-1 with sform and qform code 1 (scanner) and units mm, atomically."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz name")
    img = nib.Nifti1Image(np.asarray(vol.array, dtype=np.float32), np.asarray(vol.affine, dtype=np.float64))
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_data_dtype(np.float32)
    desc = str(vol.meta.get("description", ""))[:79]
    if desc:
        img.header["descrip"] = desc.encode("ascii", "replace")
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))
    return path
