"""A messy archive export for the batch tests, built in code from packages' shipped data.

Two MR DICOM series in one folder (one RLE-compressed, both carrying a planted patient name and ID), a
NIfTI volume, a thick-slice NIfTI, a fastMRI-style k-space file, a truncated DICOM, a garbage ``.nii.gz``
and a CT (non-MR) DICOM. Everything is tiny so the real diffusion models run in seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

PLANTED_NAME = "Doe^Planted"
PLANTED_ID = "PID-PLANTED-123"
PLANTED_STRINGS = (PLANTED_NAME, PLANTED_ID, "Planted", "PLANTED")

GOOD_KEYS_HINT = ("brain", "thick", "knee", "series")
BROKEN_NAMES = ("truncated.dcm", "garbage.nii.gz", "ct_scan.dcm")


def pydicom_files() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def _mr_series(folder: Path, template: str, n_slices: int, series_number: int, seed: int) -> None:
    """A small MR series made from a shipped single-slice file: new UIDs, stacked positions, planted PHI."""
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    series_uid = generate_uid(entropy_srcs=[f"series-{series_number}-{seed}"])
    study_uid = generate_uid(entropy_srcs=[f"study-{seed}"])
    for k in range(n_slices):
        ds = pydicom.dcmread(pydicom_files() / template)
        ds.PatientName = PLANTED_NAME
        ds.PatientID = PLANTED_ID
        ds.PatientBirthDate = "19700101"
        ds.AccessionNumber = "ACC-PLANTED-9"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = f"t{series_number} test"
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.5 * k]
        ds.SliceThickness = 0.5
        ds.SliceLocation = z + 0.5 * k
        if not ds.file_meta.TransferSyntaxUID.is_compressed:  # vary the slices a little
            arr = ds.pixel_array.astype(np.int32)
            arr = np.clip(arr + rng.integers(0, 20, arr.shape), 0, 32000).astype(ds.pixel_array.dtype)
            ds.PixelData = arr.tobytes()
        ds.save_as(folder / f"IM{series_number:02d}{k:03d}.dcm", enforce_file_format=True)


def _nifti(path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float], seed: int) -> None:
    """A smooth blob phantom with a planted patient name in the header description."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    arr = gaussian_filter(rng.random(shape), 2.0) * 1000.0
    img = nib.Nifti1Image(arr.astype(np.float32), np.diag([*zooms, 1.0]))
    img.header["descrip"] = PLANTED_NAME.encode()
    img.set_sform(np.diag([*zooms, 1.0]), code=1)
    nib.save(img, str(path))


def _kspace(path: Path, seed: int) -> None:
    """A single-coil ×4 equispaced k-space file of two phantom slices."""
    from scipy.ndimage import gaussian_filter

    from medidiff.io import KSpaceData, write_kspace

    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.random((2, 32, 32)), 1.5).astype(np.float32) * 100
    full = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    mask = np.zeros(32, dtype=np.float32)
    mask[::4] = 1
    mask[14:18] = 1
    kspace = (full * mask[None, None, :]).astype(np.complex64)
    write_kspace(
        path,
        KSpaceData(
            kspace=kspace,
            mask=mask,
            affine=np.diag([1.0, 1.0, 2.0, 1.0]),
            reference=image,
            meta={"description": "phantom"},
        ),
    )


def build_messy_folder(root: Path, *, broken: bool = True) -> Path:
    """Write the messy archive under ``root`` and return it."""
    series = root / "site-a" / "exam-1"
    series.mkdir(parents=True)
    _mr_series(series, "MR_small.dcm", 3, 3, seed=1)
    _mr_series(series, "MR_small_RLE.dcm", 2, 5, seed=2)
    (root / "nifti").mkdir()
    _nifti(root / "nifti" / "brain.nii.gz", (32, 32, 3), (1.0, 1.0, 1.0), seed=3)
    _nifti(root / "nifti" / "thick.nii.gz", (24, 24, 3), (1.0, 1.0, 4.0), seed=4)
    (root / "kspace").mkdir()
    _kspace(root / "kspace" / "knee.h5", seed=5)
    (root / "notes.txt").write_text("not a scan\n")
    if broken:
        bad = root / "broken"
        bad.mkdir()
        whole = (series / "IM03000.dcm").read_bytes()
        (bad / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
        (bad / "garbage.nii.gz").write_bytes(np.random.default_rng(6).bytes(3000))
        import pydicom

        ct = pydicom.dcmread(pydicom_files() / "CT_small.dcm")
        ct.PatientName = PLANTED_NAME
        ct.PatientID = PLANTED_ID
        (root / "other").mkdir()
        ct.save_as(root / "other" / "ct_scan.dcm", enforce_file_format=True)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → digest), plus the set of folders."""
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            digests[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath) / name
            digests[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return digests


class CrashingSource:
    """A scan whose decoding kills the process the way a broken native codec does (SIGSEGV)."""

    kind = "dicom"
    problems: tuple[str, ...] = ()

    def load(self):
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)


class HangingSource:
    """A scan whose decoding never finishes."""

    kind = "dicom"
    problems: tuple[str, ...] = ()

    def load(self):
        import time

        time.sleep(3600)


class SmallSource:
    """A scan that decodes to a small Volume."""

    kind = "nifti"
    problems: tuple[str, ...] = ()

    def load(self):
        from medidiff.io import Volume

        return Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4), {"modality": "MR"})
