"""NIfTI-1/2 reading and writing (nibabel): sform first, then qform; float32; millimetres."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medidiff.io.atomic import atomic_file
from medidiff.io.errors import ScanError, ScanTooLargeError, check_regular_file
from medidiff.io.limits import check_voxels
from medidiff.io.volume import Volume, check_volume, geometry_problem, nonfinite_problem

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _load_image(path: Path):
    """Open with nibabel (header only), turning every failure into a ScanError that names the file."""
    import nibabel as nib

    check_regular_file(path, "NIfTI file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise ScanError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def _checked_shape(img, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and stored dtype from the header, refused when dimensionless, empty or not greyscale."""
    try:
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:  # noqa: BLE001 - a corrupt header can fail in many ways
        raise ScanError(path, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    if len(shape) < 2:
        raise ScanError(path, f"image has {len(shape)} dimension(s); need at least 2")
    if any(s <= 0 for s in shape):
        raise ScanError(path, f"image has a zero-length axis (shape {'×'.join(map(str, shape))})")
    if dtype.fields is not None or dtype.kind not in "biufc":
        raise ScanError(path, f"voxel type {dtype} (RGB or structured): not a greyscale scan")
    return shape, dtype


def _memory_itemsize(dtype: np.dtype) -> int:
    """Bytes per voxel once read: float32, or the complex type before its magnitude is taken."""
    return max(4, dtype.itemsize) if dtype.kind == "c" else 4


def _to_float32(data: np.ndarray, meta_problems: list[str], complex_mode: str, path: Path) -> np.ndarray:
    """float32 voxels; complex ones become their magnitude (recorded) or are refused."""
    if np.iscomplexobj(data):
        if complex_mode != "magnitude":
            raise ScanError(
                path, f"complex-valued voxels ({data.dtype}): refused (complex_mode={complex_mode!r})"
            )
        message = f"complex-valued voxels ({data.dtype}): read as magnitude |z|"
        if message not in meta_problems:
            meta_problems.append(message)
        return np.abs(data).astype(np.float32)
    return np.asarray(data, dtype=np.float32)


def nifti_affine(img, path: Path) -> tuple[np.ndarray, list[str]]:
    """The voxel → RAS mm affine: sform when its code is set, else qform, else nibabel's fallback (a problem).

    A non-finite or singular affine is a ScanError; sheared axes are returned as a problem.
    """
    problems: list[str] = []
    try:
        sform, scode = img.get_sform(coded=True)
        qform, qcode = img.get_qform(coded=True)
        if sform is not None and int(scode) > 0:
            affine = np.asarray(sform, dtype=np.float64)
        elif qform is not None and int(qcode) > 0:
            affine = np.asarray(qform, dtype=np.float64)
        else:
            affine = np.asarray(img.affine, dtype=np.float64)
            problems.append(
                "neither sform nor qform is set: geometry is only voxel sizes (orientation unknown)"
            )
        unit = img.header.get_xyzt_units()[0]
    except Exception as exc:  # noqa: BLE001 - nibabel fails on corrupt quaternions in many ways
        raise ScanError(path, f"unreadable NIfTI geometry ({type(exc).__name__}: {exc})") from None
    problem = geometry_problem(affine)
    if problem and "not orthonormal" not in problem:
        raise ScanError(path, problem)
    if problem:
        problems.append(problem)
    if unit not in ("mm", "unknown"):
        problems.append(f"spatial unit is {unit!r}, expected mm")
    return affine, problems


def affine_problems(affine: np.ndarray) -> list[str]:
    """Problems with an affine: non-finite, singular (zero-size or parallel axes), sheared axes."""
    problem = geometry_problem(affine)
    return [problem] if problem else []


def nifti_volume_count(path: str | Path) -> int:
    """How many 3D volumes the file holds (product of dimensions 4 and up)."""
    img = _load_image(Path(path))
    shape, _ = _checked_shape(img, Path(path))
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


def read_nifti(
    path: str | Path,
    index: int | None = None,
    *,
    allow_nonfinite: bool = False,
    complex_mode: str = "magnitude",
    max_voxels: int | None = None,
) -> Volume:
    """Read one 3D volume from a NIfTI file (``index`` picks a volume of a 4D file).

    Refused with a ScanError naming the file: a non-finite or singular affine, a zero-length axis, a volume
    larger than the voxel limit (checked on the header, before reading: see ``medidiff.io.limits``),
    NaN/Inf voxels unless ``allow_nonfinite`` (then recorded in ``meta['problems']``). A sheared sform
    (allowed by the NIfTI standard) is kept and recorded in ``meta['problems']``. Complex voxels are read
    as their magnitude, recorded in ``meta['complex']`` and ``meta['problems']``, unless
    ``complex_mode='refuse'``. Voxels are never altered otherwise.
    """
    path = Path(path)
    img = _load_image(path)
    shape, dtype = _checked_shape(img, path)
    affine, problems = nifti_affine(img, path)
    check_voxels(path, shape[:3], _memory_itemsize(dtype), limit=max_voxels)
    try:
        proxy = img.dataobj
        if len(shape) == 2:
            raw = np.asanyarray(proxy)[:, :, None]
        elif len(shape) == 3:
            raw = np.asanyarray(proxy)
        else:
            n = int(np.prod(shape[3:]))
            if index is None:
                if n != 1:
                    raise ScanError(path, f"4D file with {n} volumes: pick one with index=0..{n - 1}")
                index = 0
            if not 0 <= index < n:
                raise ScanError(path, f"volume index {index} out of range 0..{n - 1}")
            multi = np.unravel_index(index, shape[3:], order="F")
            raw = np.asanyarray(proxy[(slice(None),) * 3 + tuple(int(m) for m in multi)])
        data = _to_float32(np.asarray(raw), problems, complex_mode, path)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, bad header ...
        raise ScanError(path, f"voxel data unreadable ({type(exc).__name__}: {exc})") from None
    description = _description(img, path)
    meta = {
        "modality": "MR",
        "description": description,
        "source_files": [str(path)],
        "units": "mm",
        "problems": problems,
    }
    if np.dtype(dtype).kind == "c":
        meta["complex"] = "magnitude"
    if index is not None and len(shape) > 3:
        meta["index"] = int(index)
    vol = Volume(data, affine, meta)
    # NIfTI's sform is a general affine by the standard: a declared shear is kept, and recorded
    return check_volume(vol, path, allow_nonfinite=allow_nonfinite, allow_shear=True)


def _description(img, path: Path) -> str:
    """The header's descrip field, or the file name without suffixes."""
    try:
        raw = bytes(np.asarray(img.header["descrip"]).tobytes()).split(b"\0")[0]
    except Exception:  # noqa: BLE001 - a missing or odd descrip field is not worth refusing the scan
        raw = b""
    return raw.decode("ascii", "replace").strip() or path.name.split(".")[0]


def _nonfinite_counts(data: np.ndarray, shape: tuple[int, ...], n: int) -> np.ndarray:
    """NaN/Inf count of each of the ``n`` 3D volumes in ``data`` (zeros for integer types)."""
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating)):
        return np.zeros(n, dtype=int)
    values = np.asarray(data)
    flat = values.reshape((*shape[:3], n), order="F") if len(shape) > 3 else values.reshape(-1, 1)
    return flat.size // max(n, 1) - np.count_nonzero(np.isfinite(flat), axis=tuple(range(flat.ndim - 1)))


def probe_nifti(path: str | Path, *, max_voxels: int | None = None) -> list[dict]:
    """Index, shape, affine, description and problems of each 3D volume, reading the voxels only once.

    Used by discovery: a 4D ``.nii.gz`` is decompressed once, not once per volume, when the whole file
    fits in the voxel limit; otherwise volume by volume. A file whose single volume exceeds the limit,
    or whose affine cannot place it, is a ScanError.
    """
    path = Path(path)
    img = _load_image(path)
    shape, dtype = _checked_shape(img, path)
    affine, problems = nifti_affine(img, path)
    n = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    vol_shape = shape[:3] if len(shape) >= 3 else (*shape, 1)
    itemsize = _memory_itemsize(dtype) if dtype.kind == "c" else max(4, dtype.itemsize)
    check_voxels(path, vol_shape, itemsize, limit=max_voxels)
    try:
        try:
            check_voxels(path, (*vol_shape, n), itemsize, limit=max_voxels)
            whole = True
        except ScanTooLargeError:
            whole = False
        if whole:
            data = np.asanyarray(img.dataobj)  # a memory map for .nii; one decompression for .nii.gz
            bad = _nonfinite_counts(data, shape, n)
            del data
        else:
            bad = np.zeros(n, dtype=int)
            for index in range(n):
                multi = np.unravel_index(index, shape[3:], order="F")
                part = np.asanyarray(img.dataobj[(slice(None),) * 3 + tuple(int(m) for m in multi)])
                bad[index] = _nonfinite_counts(part, vol_shape, 1)[0]
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, bad header ...
        raise ScanError(path, f"voxel data unreadable ({type(exc).__name__}: {exc})") from None
    if dtype.kind == "c":
        problems.append(f"complex-valued voxels ({dtype}): read as magnitude |z|")
    description = _description(img, path)
    total = int(np.prod(vol_shape))
    out = []
    for index in range(n):
        vol_problems = list(problems)
        if bad[index]:
            vol_problems.append(nonfinite_problem(int(bad[index]), total))
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
