"""Fixtures for the io tests: DICOM series built in code (independently of medidiff's writer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.spatial.transform import Rotation

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def oblique_frame(angles_deg=(18.0, -12.0, 25.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and normal (LPS) of an oblique plane."""
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    return rot[:, 0], rot[:, 1], rot[:, 2]


def pattern(cols: int, rows: int, n_slices: int) -> np.ndarray:
    """Integer test pattern [row, col, slice] that reveals any flip or swap of axes."""
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(n_slices), indexing="ij")
    return (c + 50 * r + 2500 * k).astype(np.int16)


def write_classic_series(
    folder: Path,
    *,
    cols: int = 40,
    rows: int = 48,
    n_slices: int = 10,
    pixel_spacing=(0.9, 0.8),  # (row spacing, column spacing)
    slice_step: float = 2.5,
    origin=(-30.0, 12.0, 40.0),
    angles_deg=(18.0, -12.0, 25.0),
    slope: float = 0.5,
    intercept: float = -10.0,
    seed: int = 0,
    series_uid: str | None = None,
    series_number: int = 3,
    echo: int | None = None,
    scramble: bool = True,
    skip: tuple[int, ...] = (),
) -> dict:
    """Write an oblique MR series one file per slice with scrambled names and InstanceNumbers.

    Returns the truth: LPS row/col/normal, positions per slice and the stored pixel pattern.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir, normal = oblique_frame(angles_deg)
    series_uid = series_uid or generate_uid()
    study_uid, for_uid = generate_uid(), generate_uid()
    data = pattern(cols, rows, n_slices)
    order = rng.permutation(n_slices) if scramble else np.arange(n_slices)
    instance_numbers = rng.permutation(n_slices) + 1 if scramble else np.arange(n_slices) + 1
    positions = [np.asarray(origin) + k * slice_step * normal for k in range(n_slices)]
    for n, k in enumerate(order):
        if k in skip:
            continue
        ds = Dataset()
        ds.SOPClassUID = MR_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "TEST^PHANTOM",
            "PHANTOM01",
            "",
            "O",
        )
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20240101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, series_number
        ds.SeriesDescription = "oblique phantom"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer = "test"
        ds.InstanceNumber = int(instance_numbers[n])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 20, 500, 1
        if echo is not None:
            ds.EchoNumbers = echo
            ds.EchoTime = 10 * echo
        ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.SliceThickness = f"{slice_step:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
        ds.PixelData = np.ascontiguousarray(data[:, :, k]).astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_STORAGE, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        name = f"{rng.integers(0, 16**8):08x}" if scramble else f"slice{k:03d}"
        ds.save_as(folder / name, enforce_file_format=True)
    return {
        "row": row_dir,
        "col": col_dir,
        "normal": normal,
        "positions": positions,
        "data": data,
        "slope": slope,
        "intercept": intercept,
        "spacing": (pixel_spacing[1], pixel_spacing[0], slice_step),
        "series_uid": series_uid,
    }


@pytest.fixture
def oblique_series(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "oblique"
    return folder, write_classic_series(folder)


def run_dcm2niix(dicom_dir: Path, out_dir: Path) -> list[Path]:
    """Convert with dcm2niix (uncompressed NIfTI); returns the .nii files written."""
    import subprocess
    import sys

    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "%s_%e", "-o", str(out_dir), str(dicom_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(out_dir.glob("*.nii"))


def enhanced_from(folder: Path, out: Path) -> Path:
    """An enhanced (legacy-converted) MR file made by highdicom from a classic series."""
    import highdicom.legacy

    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedMRImage(datasets, generate_uid(), 9, generate_uid(), 1)
    out.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out / "enhanced.dcm")
    return out / "enhanced.dcm"
