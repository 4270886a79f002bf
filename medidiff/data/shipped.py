"""Shipped real MR data (MNI152, dipy, pydicom).

Everything is read from the installed packages' own data folders; nothing is ever downloaded (no fetchers).

Training / evaluation split (the evaluation set is **held out**: never used to train, tune or synthesise):

- Training (``real_training_volumes``): the nilearn MNI152 2009c T1 template (1 mm, 197x233x189).
  It is also the anatomy behind every synthetic subject (``medidiff.data.synth``).
- Evaluation (``real_evaluation_volumes``):
  ``dipy/data/files/t1_coronal_slice.npy`` (one 256x256 T1 slice; dipy documents no geometry, so it is a
  1-slice Volume with 1 mm isotropic voxels and an identity-orientation affine),
  ``dipy/data/files/aniso_vox.nii.gz`` (58x58x24, 4x4x5 mm),
  ``dipy/data/files/S0_10slices.nii.gz`` (128x128x10 b0 image, first volume),
  ``pydicom/data/test_files/MR_small.dcm`` (64x64, one slice).
- Deliberately excluded from both: ``MR_small_*.dcm`` (the same image as ``MR_small.dcm`` in other
  encodings: training on them would leak the evaluation image), ``dipy ascm_out_test.nii.gz`` (a denoised
  copy of ``aniso_vox``: leak), ``dipy test_piesno.nii.gz`` (a noise-estimation test image),
  ``dipy small_*`` diffusion files (at most 10 voxels per side: too small for slices) and the non-MR
  pydicom files.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from medidiff.io import Volume, read_nifti, read_scan

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"

#: Held-out evaluation files, as (package, path inside the package).
EVALUATION_FILES: tuple[tuple[str, str], ...] = (
    ("dipy", "data/files/t1_coronal_slice.npy"),
    ("dipy", "data/files/aniso_vox.nii.gz"),
    ("dipy", "data/files/S0_10slices.nii.gz"),
    ("pydicom", "data/test_files/MR_small.dcm"),
)
#: Training files, as (package, path inside the package).
TRAINING_FILES: tuple[tuple[str, str], ...] = (("nilearn", f"datasets/data/{MNI_T1}"),)


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package (FileNotFoundError naming it if missing)."""
    import importlib

    mod = importlib.import_module(package)
    path = Path(mod.__file__).parent / relative  # type: ignore[arg-type]
    if not path.exists():
        raise FileNotFoundError(f"{path}: shipped data file of {package!r} is missing from this installation")
    return path


def evaluation_paths() -> list[Path]:
    """Paths of the held-out evaluation files."""
    return [package_file(p, r) for p, r in EVALUATION_FILES]


def training_paths() -> list[Path]:
    """Paths of the shipped real training files."""
    return [package_file(p, r) for p, r in TRAINING_FILES]


@lru_cache(maxsize=4)
def _load_nifti_cached(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI once per process (array, affine); callers get copies."""
    vol = read_nifti(path)
    return vol.array, vol.affine


def _fresh(path: Path, **meta: object) -> Volume:
    """A Volume with its own copy of a cached NIfTI."""
    arr, aff = _load_nifti_cached(str(path))
    return Volume(arr.copy(), aff.copy(), dict(meta))


def mni_t1() -> Volume:
    """The MNI152 2009c symmetric T1 template (1 mm, intensities 0..255)."""
    return _fresh(
        package_file("nilearn", f"datasets/data/{MNI_T1}"), description="MNI152 2009c T1", modality="MR"
    )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes of a 3D mask (background components not touching the array border)."""
    from scipy.ndimage import label

    lab, _ = label(~mask)
    faces = np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel(), lab[:, :, [0, -1]].ravel()])
    outside = np.isin(lab, np.unique(faces[faces > 0]))
    return mask | ((lab > 0) & ~outside)


def mni_tissue_maps() -> dict[str, np.ndarray]:
    """Tissue probability maps (0..1) on the MNI152 grid.

    ``gm`` and ``wm`` are shipped; ``csf`` is the brain minus both.
    """
    from scipy.ndimage import gaussian_filter

    gm, _ = _load_nifti_cached(str(package_file("nilearn", f"datasets/data/{MNI_GM}")))
    wm, _ = _load_nifti_cached(str(package_file("nilearn", f"datasets/data/{MNI_WM}")))
    t1, _ = _load_nifti_cached(str(package_file("nilearn", f"datasets/data/{MNI_T1}")))
    gm = np.clip(gm / max(float(gm.max()), 1e-6), 0, 1).astype(np.float32)
    wm = np.clip(wm / max(float(wm.max()), 1e-6), 0, 1).astype(np.float32)
    t1n = t1 / max(float(t1.max()), 1e-6)
    brain = _fill_holes(gaussian_filter(gm + wm, 1.5) > 0.2)
    # CSF: inside the (filled) brain, neither GM nor WM, and dark on T1.
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1) * np.clip((0.55 - t1n) / 0.25, 0, 1)
    return {"gm": gm, "wm": wm, "csf": csf.astype(np.float32)}


def mni_head_mask() -> np.ndarray:
    """Boolean head mask of the MNI152 T1 (not background; the nilearn template is brain-extracted)."""
    t1, _ = _load_nifti_cached(str(package_file("nilearn", f"datasets/data/{MNI_T1}")))
    return _fill_holes(t1 > 0.04 * float(t1.max()))


def _coronal_slice() -> Volume:
    """dipy's 2D T1 coronal slice as a 1-slice Volume (1 mm; dipy documents no geometry)."""
    path = package_file("dipy", "data/files/t1_coronal_slice.npy")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D slice, got shape {arr.shape}")
    return Volume(
        np.asarray(arr, np.float32)[:, :, None],
        np.eye(4),
        {"description": "dipy t1_coronal_slice", "modality": "MR", "source_files": [str(path)]},
    )


def real_training_volumes() -> list[tuple[str, Volume]]:
    """Shipped real MR for training: the MNI152 T1 only (see the module docstring for why)."""
    return [("mni152_t1", mni_t1())]


def real_evaluation_volumes() -> list[tuple[str, Volume]]:
    """The held-out real evaluation scans.

    ``(name, Volume)`` for the four files listed in the module docstring.
    """
    out = [("dipy_t1_coronal_slice", _coronal_slice())]
    for name, rel in (
        ("dipy_aniso_vox", "data/files/aniso_vox.nii.gz"),
        ("dipy_S0_10slices", "data/files/S0_10slices.nii.gz"),
    ):
        out.append((name, read_scan(package_file("dipy", rel))))
    out.append(("pydicom_MR_small", read_scan(package_file("pydicom", "data/test_files/MR_small.dcm"))))
    for name, vol in out:
        if not isinstance(vol, Volume):
            raise TypeError(f"{name}: expected an image volume, got {type(vol).__name__}")
    return out
