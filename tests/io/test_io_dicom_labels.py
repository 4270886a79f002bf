"""Labels of a derived series.

Research use, image type, derivation code, one window, a shared frame of reference.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medidiff.io import Volume, read_scan, write_dicom_series
from medidiff.io.dicom_write import DERIVATION_CODES
from tests.io.conftest import PYDICOM_FILES, run_dcm2niix


def _errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def _read(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


@pytest.mark.parametrize("with_source", [False, True])
def test_labels_and_shared_frame_of_reference(tmp_path: Path, with_source: bool) -> None:
    if with_source:
        source = read_scan(PYDICOM_FILES / "MR_small.dcm")
        vol = source.with_array(source.array * 0.7 + 3.3)
    else:
        source = None
        ramp = np.linspace(1.0, 4.0, 4, dtype=np.float32)  # slices of very different brightness
        vol = Volume(np.random.default_rng(0).random((20, 16, 4)).astype(np.float32) * 100 * ramp, np.eye(4))
    main = write_dicom_series(
        vol, tmp_path / "enhanced", source=source, series_description="medidiff enhanced in-plane SR (sr_x2)",
        derivation_description="medidiff; research use only", image_type_value3="RESAMPLED",
        derivation_code=DERIVATION_CODES["spatial_resampling"],
    )
    first = pydicom.dcmread(main[0])
    flags = Volume((vol.array > np.median(vol.array)).astype(np.float32), vol.affine)
    maps = write_dicom_series(
        flags, tmp_path / "flags", source=source, series_description="medidiff hallucination flags",
        derivation_description="flags", series_number=3000, derivation_code=DERIVATION_CODES["segmentation"],
        study_of=first,
    )
    enhanced, flagged = _read(main), _read(maps)
    for ds in enhanced + flagged:
        assert ds.ContentQualification == "RESEARCH"
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    if with_source:
        assert first.StudyInstanceUID == source.meta["dicom_header"].StudyInstanceUID
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "RESAMPLED"]
    code = first.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113085", "DCM", "Spatial resampling"
    )
    assert flagged[0].DerivationCodeSequence[0].CodeValue == "113076"
    assert flagged[0].SeriesInstanceUID != first.SeriesInstanceUID and int(flagged[0].SeriesNumber) == 3000
    assert len({(ds.WindowCenter, ds.WindowWidth) for ds in enhanced}) == 1, "one window for the whole series"
    values = np.concatenate([ds.pixel_array.ravel() * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                             for ds in enhanced])
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert np.isclose(float(first.WindowCenter), (lo + hi) / 2, rtol=0.02)
    assert np.isclose(float(first.WindowWidth), hi - lo, rtol=0.02)
    flag_values = {int(v) for ds in flagged for v in np.unique(ds.pixel_array)}
    assert flag_values <= {0, 1} and str(flagged[0].RescaleSlope) == "1"
    if shutil.which("dciodvfy"):
        for f in main + maps:
            assert _errors(f) == [], f
    # dcm2niix reads the map on the enhanced image's grid
    import nibabel as nib

    grids = []
    for name in ("enhanced", "flags"):
        (nii,) = run_dcm2niix(tmp_path / name, tmp_path / f"nii_{name}")
        img = nib.load(str(nii))
        grids.append((img.shape, img.affine))
    assert grids[0][0] == grids[1][0] and np.allclose(grids[0][1], grids[1][1], atol=1e-4)
