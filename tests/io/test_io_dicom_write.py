"""Derived DICOM series: round trips, dciodvfy, SimpleITK and dcm2niix read it back with our geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from medidiff.io import Volume, read_nifti, read_scan, write_dicom_series, write_nifti
from tests.io.conftest import PYDICOM_FILES, enhanced_from, run_dcm2niix, write_classic_series


def oblique_volume(shape=(36, 30, 7), seed: int = 0) -> Volume:
    """A smooth float volume on an oblique, anisotropic grid (values not integers)."""
    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("xyz", [20.0, -15.0, 30.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.93, 1.07, 3.3])
    affine[:3, 3] = [12.5, -40.25, 33.0]
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    data = 800 * np.exp(-(i**2 + 2 * j**2 + 0.5 * k**2)) + 40 * i - 15 + rng.normal(0, 3, shape)
    return Volume(data.astype(np.float32), affine, {"description": "oblique test"})


def _world_corners(vol_affine: np.ndarray, shape) -> np.ndarray:
    corners = np.array(
        [[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
    )
    return nib.affines.apply_affine(vol_affine, corners)


def _value_range(a: np.ndarray) -> float:
    return float(a.max() - a.min())


def test_nifti_dicom_nifti_round_trip_keeps_geometry_and_values(tmp_path: Path) -> None:
    vol = oblique_volume()
    write_nifti(vol, tmp_path / "in.nii.gz")
    from_nifti = read_nifti(tmp_path / "in.nii.gz")
    files = write_dicom_series(
        from_nifti,
        tmp_path / "dicom",
        source=None,
        series_description="round trip",
        derivation_description="test",
    )
    assert len(files) == vol.shape[2] and all(f.exists() for f in files)
    back = read_scan(tmp_path / "dicom")
    write_nifti(back, tmp_path / "out.nii.gz")
    final = read_nifti(tmp_path / "out.nii.gz")
    assert final.shape == vol.shape
    assert (
        np.abs(_world_corners(final.affine, vol.shape) - _world_corners(vol.affine, vol.shape)).max() < 0.01
    )
    assert np.abs(final.array - vol.array).max() < 1e-3 * _value_range(vol.array)


def test_written_series_attributes(tmp_path: Path) -> None:
    truth_dir = tmp_path / "src"
    write_classic_series(truth_dir, n_slices=5)
    source = read_scan(truth_dir)
    enhanced = source.with_array(source.array * 1.5 + 0.25)
    files = write_dicom_series(
        enhanced,
        tmp_path / "derived",
        source=source,
        series_description="enhanced",
        derivation_description="medidiff test derivation",
        series_number=77,
    )
    src_header = source.meta["dicom_header"]
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.DerivationDescription == "medidiff test derivation"
        assert ds.SeriesInstanceUID != source.meta["series_uid"]
        assert ds.StudyInstanceUID == src_header.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src_header.FrameOfReferenceUID
        assert ds.PatientID == src_header.PatientID
        assert ds.SeriesNumber == 77
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in source.meta["source_sop_instance_uids"]
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(files)
    # slice k of the output references source slice k (same grid)
    refs = [pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID for f in files]
    assert refs == source.meta["source_sop_instance_uids"]
    back = read_scan(tmp_path / "derived")
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-4)
    assert np.abs(back.array - enhanced.array).max() <= 1e-3 * _value_range(enhanced.array)


def test_superresolved_geometry_is_recomputed(tmp_path: Path) -> None:
    """A volume on a finer grid (twice the slices) gets new spacing and positions."""
    vol = oblique_volume(shape=(20, 18, 6))
    fine_affine = vol.affine @ np.diag([1, 1, 0.5, 1])
    fine = Volume(np.repeat(vol.array, 2, axis=2), fine_affine)
    write_dicom_series(
        fine, tmp_path / "fine", source=None, series_description="fine", derivation_description="t"
    )
    back = read_scan(tmp_path / "fine")
    np.testing.assert_allclose(back.affine, fine_affine, atol=1e-4)
    ds = pydicom.dcmread(min((tmp_path / "fine").iterdir()))
    assert float(ds.SpacingBetweenSlices) == pytest.approx(1.65, abs=1e-4)


def test_simpleitk_reads_our_series_with_same_geometry(tmp_path: Path) -> None:
    import SimpleITK as sitk

    vol = oblique_volume()
    write_dicom_series(
        vol, tmp_path / "dicom", source=None, series_description="sitk", derivation_description="t"
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    image = reader.Execute()
    assert image.GetSize() == vol.shape
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for ijk in [(0, 0, 0), (35, 0, 0), (0, 29, 6), (35, 29, 6), (10, 7, 3)]:
        world_sitk = lps_to_ras @ np.asarray(image.TransformIndexToPhysicalPoint(ijk))
        world_ours = vol.world_coordinates(np.array([ijk]))[0]
        assert np.abs(world_sitk - world_ours).max() < 0.01
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # sitk is (k, j, i)
    assert np.abs(values - vol.array).max() < 1e-3 * _value_range(vol.array)


def test_dcm2niix_reads_our_series_with_same_geometry(tmp_path: Path) -> None:
    vol = oblique_volume()
    write_dicom_series(
        vol, tmp_path / "dicom", source=None, series_description="d2n", derivation_description="t"
    )
    (nii,) = run_dcm2niix(tmp_path / "dicom", tmp_path / "d2n")
    ref = nib.as_closest_canonical(nib.load(nii))
    mine = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    assert ref.shape == mine.shape
    assert (
        np.abs(_world_corners(ref.affine, ref.shape) - _world_corners(mine.affine, mine.shape)).max() < 0.01
    )
    assert np.abs(ref.get_fdata() - mine.get_fdata()).max() < 1e-3 * _value_range(vol.array)


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def _shifted(affine: np.ndarray, scale_k: float, shift_k: float) -> np.ndarray:
    """``affine`` with slice spacing times ``scale_k`` and origin moved ``shift_k`` new slices."""
    out = affine @ np.diag([1.0, 1.0, scale_k, 1.0])
    out[:3, 3] += shift_k * out[:3, 2]
    return out


def _slice_distance(ds, other_position, normal) -> float:
    """Distance along ``normal`` (LPS) between a file's slice and a position."""
    return abs(
        float((np.asarray(ds.ImagePositionPatient, float) - np.asarray(other_position, float)) @ normal)
    )


@pytest.mark.parametrize(
    ("scale_k", "shift_k", "refs_per_file"),
    [(1.0, 0.0, 1), (0.5, -0.5, 1), (2.0, 0.25, 2)],
    ids=["same-grid", "twice-the-slices", "half-the-slices"],
)
def test_each_file_references_only_the_source_slices_it_overlaps(
    tmp_path: Path, scale_k: float, shift_k: float, refs_per_file: int
) -> None:
    """SourceImageSequence names the overlapping source slice(s); ReferencedSeriesSequence only those."""
    truth = write_classic_series(tmp_path / "src", n_slices=8, slice_step=2.5)
    source = read_scan(tmp_path / "src")
    n_out = {1.0: 8, 0.5: 16, 2.0: 4}[scale_k]
    vol = Volume(
        np.zeros(source.shape[:2] + (n_out,), np.float32) + 7.5, _shifted(source.affine, scale_k, shift_k)
    )
    files = write_dicom_series(
        vol, tmp_path / "out", source=source, series_description="r", derivation_description="r"
    )
    src_position = {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(
            f, stop_before_pixels=True
        ).ImagePositionPatient
        for f in (tmp_path / "src").iterdir()
    }
    out_gap, src_gap = 2.5 * scale_k, 2.5
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        refs = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        assert len(refs) == refs_per_file == len(set(refs))
        for uid in refs:  # every referenced source slab overlaps this file's slab
            assert _slice_distance(ds, src_position[uid], truth["normal"]) < (out_gap + src_gap) / 2
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == source.meta["series_uid"]
        assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == refs
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(files[0]) == []


def test_enhanced_source_references_the_frame(tmp_path: Path) -> None:
    """A derived series of an enhanced multi-frame source points at the frame of each slice."""
    write_classic_series(tmp_path / "classic", n_slices=6)
    path = enhanced_from(tmp_path / "classic", tmp_path / "enh")
    source = read_scan(path)
    enhanced = pydicom.dcmread(path, stop_before_pixels=True)
    frame_position = {
        n + 1: item.PlanePositionSequence[0].ImagePositionPatient
        for n, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence)
    }
    normal = np.cross(
        *np.reshape(
            np.asarray(
                enhanced.SharedFunctionalGroupsSequence[0]
                .PlaneOrientationSequence[0]
                .ImageOrientationPatient,
                float,
            ),
            (2, 3),
        )
    )
    files = write_dicom_series(
        source.with_array(source.array * 2.0),
        tmp_path / "out",
        source=source,
        series_description="e",
        derivation_description="e",
    )
    frames = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert item.ReferencedSOPClassUID == enhanced.SOPClassUID
        frame = int(item.ReferencedFrameNumber)
        assert _slice_distance(ds, frame_position[frame], normal) < 1e-3  # the frame at this position
        frames.append(frame)
    assert sorted(frames) == list(range(1, 7))
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(files[0]) == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("case", ["nifti-source", "dicom-source", "ct-source", "normalised-floats"])
def test_dciodvfy_reports_zero_errors(tmp_path: Path, case: str) -> None:
    if case == "nifti-source":
        vol, source = oblique_volume(), None
    elif case == "normalised-floats":
        vol, source = Volume(np.random.default_rng(1).random((16, 12, 3)), np.eye(4)), None
    else:
        name = "MR_small.dcm" if case == "dicom-source" else "CT_small.dcm"
        source = read_scan(PYDICOM_FILES / name)
        vol = source.with_array(source.array * 0.7 + 3.3)
    files = write_dicom_series(
        vol,
        tmp_path / "out",
        source=source,
        series_description="dciodvfy check",
        derivation_description="validation",
    )
    for f in (files[0], files[-1]):
        assert _dciodvfy_errors(f) == [], f


def test_nan_volume_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    from medidiff.io import ScanError

    arr = np.zeros((4, 4, 2), np.float32)
    arr[0, 0, 0] = np.nan
    with pytest.raises(ScanError, match="NaN"):
        write_dicom_series(
            Volume(arr, np.eye(4)),
            tmp_path / "x",
            source=None,
            series_description="x",
            derivation_description="x",
        )
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []
