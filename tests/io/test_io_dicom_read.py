"""DICOM reading: geometry against dcm2niix, transfer syntaxes, series splitting, enhanced MR."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medidiff.io import ScanError, discover, read_scan
from tests.io.conftest import PYDICOM_FILES, run_dcm2niix, write_classic_series
from tests.io.conftest import enhanced_from as _enhanced_from


def _canonical(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, np.float32), affine))


def _corners(shape) -> np.ndarray:
    return np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float
    )


def _assert_same_world(ref: nib.Nifti1Image, vol, atol_mm: float = 1e-3) -> None:
    """Same voxel grid and voxels in world (RAS) space after reorienting both to the closest canonical."""
    ref_c = nib.as_closest_canonical(ref)
    mine = _canonical(vol.array, vol.affine)
    assert ref_c.shape[:3] == mine.shape
    corners = _corners(mine.shape)
    world_ref = nib.affines.apply_affine(ref_c.affine, corners)
    world_mine = nib.affines.apply_affine(mine.affine, corners)
    assert np.abs(world_ref - world_mine).max() < atol_mm
    np.testing.assert_allclose(
        np.asarray(ref_c.dataobj, np.float32).reshape(mine.shape), mine.get_fdata(), atol=1e-3
    )


def test_oblique_scrambled_series_matches_dcm2niix(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    truth = write_classic_series(folder, n_slices=9)
    vol = read_scan(folder)
    # truth, independent of any reader: voxel (i, j, k) sits at
    # origin + i*dc*row + j*dr*col + k*step*normal (LPS)
    lps = np.diag([-1, -1, 1, 1]) @ vol.affine
    np.testing.assert_allclose(lps[:3, 0], truth["row"] * truth["spacing"][0], atol=1e-6)
    np.testing.assert_allclose(lps[:3, 1], truth["col"] * truth["spacing"][1], atol=1e-6)
    np.testing.assert_allclose(lps[:3, 2], truth["normal"] * truth["spacing"][2], atol=1e-5)
    np.testing.assert_allclose(lps[:3, 3], truth["positions"][0], atol=1e-5)
    expected = truth["data"].transpose(1, 0, 2) * truth["slope"] + truth["intercept"]
    np.testing.assert_array_equal(vol.array, expected.astype(np.float32))
    nii = run_dcm2niix(folder, tmp_path / "d2n")
    assert len(nii) == 1
    _assert_same_world(nib.load(nii[0]), vol)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in PYDICOM_FILES.glob("MR_small*.dcm")) + ["CT_small.dcm"]
)
def test_pydicom_shipped_files_match_dcm2niix(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(PYDICOM_FILES / name, folder / name)
    vol = read_scan(folder)
    nii = run_dcm2niix(folder, tmp_path / "d2n")
    assert len(nii) == 1
    _assert_same_world(nib.load(nii[0]), vol)


def test_pydicom_dicomdir_mr_series_match_dcm2niix(tmp_path: Path) -> None:
    """The small multi-slice MR series shipped in pydicom's dicomdirtests, each against dcm2niix."""
    root = PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR2"
    sources = [s for s in discover(root) if s.kind == "dicom" and not s.problems]
    assert sources
    for n, source in enumerate(sources):
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        for f in source.files:
            shutil.copy(f, folder / f.name)
        vol = source.load()
        nii = run_dcm2niix(folder, tmp_path / f"d2n{n}")
        assert len(nii) == 1
        _assert_same_world(nib.load(nii[0]), vol)


LOSSY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
}


@pytest.mark.parametrize("path", sorted(PYDICOM_FILES.glob("MR_small*.dcm")), ids=lambda p: p.name)
def test_mr_small_transfer_syntaxes_decode_identically(path: Path) -> None:
    tsyntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if tsyntax in LOSSY or "lossy" in path.name.lower():
        pytest.skip("lossy JPEG variant: pixels legitimately differ from the uncompressed file")
    reference = read_scan(PYDICOM_FILES / "MR_small.dcm")
    vol = read_scan(path)
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine)


def test_every_mr_small_variant_is_covered() -> None:
    names = {p.name for p in PYDICOM_FILES.glob("MR_small*.dcm")}
    assert {
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    } <= names


def _gdcm_transcode(src: Path, dst: Path, syntax) -> Path:
    """Re-encode a file with GDCM (an independent codec) into another transfer syntax."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write()
    return dst


@pytest.mark.parametrize("syntax_name", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14"])
def test_jpeg_lossless_decodes_identically(tmp_path: Path, syntax_name: str) -> None:
    import gdcm

    path = _gdcm_transcode(
        PYDICOM_FILES / "MR_small.dcm", tmp_path / "jpeg.dcm", getattr(gdcm.TransferSyntax, syntax_name)
    )
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_scan(path).array, read_scan(PYDICOM_FILES / "MR_small.dcm").array)


def test_jpeg_baseline_8bit_decodes_close_to_source(tmp_path: Path) -> None:
    """JPEG baseline is 8-bit and lossy.

    An 8-bit copy of MR_small, re-encoded, decodes within a few grey levels.
    """
    import gdcm

    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    arr = ds.pixel_array.astype(np.float64)
    arr8 = np.round(255 * (arr - arr.min()) / (arr.max() - arr.min())).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr8.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.save_as(tmp_path / "u8.dcm")
    path = _gdcm_transcode(
        tmp_path / "u8.dcm", tmp_path / "baseline.dcm", gdcm.TransferSyntax.JPEGBaselineProcess1
    )
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    vol = read_scan(path)
    assert np.abs(vol.array - arr8.T[:, :, None]).mean() < 3.0


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPEGLSNearLossless_16.dcm"])
def test_other_shipped_compressed_greyscale_files_decode(name: str) -> None:
    from medidiff.io.dicom_read import decode_file

    _, arr = decode_file(PYDICOM_FILES / name)
    assert arr.ndim == 2 and arr.std() > 0


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_12bit_jpeg_extended_is_a_named_problem(name: str) -> None:
    """12-bit JPEG extended needs the GPL libjpeg plugin, which we do not install by default."""
    from medidiff.io.dicom_read import decode_file

    try:
        _, arr = decode_file(PYDICOM_FILES / name)
    except ScanError as exc:
        assert "could not be decoded" in exc.problem and "JPEG Extended" in exc.problem
        assert name in str(exc)
    else:  # a decoder plugin able to do it is installed
        assert arr.std() > 0


def test_two_series_in_one_folder_are_listed_apart(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_classic_series(folder, n_slices=5, series_number=3, seed=1)
    write_classic_series(folder, n_slices=7, series_number=4, seed=2, angles_deg=(0, 0, 0))
    sources = [s for s in discover(tmp_path) if s.kind == "dicom"]
    assert sorted(s.shape[2] for s in sources) == [5, 7]
    assert len({s.key for s in sources}) == 2
    assert all(not s.problems for s in sources)
    assert sorted(s.load().shape[2] for s in sources) == [5, 7]
    with pytest.raises(ScanError, match="2 scans"):
        read_scan(folder)


def test_two_echoes_in_one_series_become_two_volumes(tmp_path: Path) -> None:
    uid = generate_uid()
    write_classic_series(tmp_path / "e", n_slices=4, series_uid=uid, echo=1, seed=1)
    write_classic_series(tmp_path / "e", n_slices=4, series_uid=uid, echo=2, seed=2)
    sources = list(discover(tmp_path))
    assert [s.kind for s in sources] == ["dicom", "dicom"]
    assert {s.index for s in sources} == {0, 1}
    assert all(s.shape == (40, 48, 4) and not s.problems for s in sources)


def test_missing_slice_is_reported_not_built(tmp_path: Path) -> None:
    write_classic_series(tmp_path / "gap", n_slices=8, skip=(4,))
    (source,) = list(discover(tmp_path))
    assert source.kind == "dicom"
    assert any("missing slice" in p for p in source.problems)
    with pytest.raises(ScanError, match="missing slice"):
        source.load()


def test_localizer_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "loc"
    write_classic_series(folder, n_slices=3)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
    (source,) = list(discover(tmp_path))
    assert source.kind == "invalid" and "localizer" in source.problems[0]


def test_repeated_acquisitions_become_separate_volumes(tmp_path: Path) -> None:
    uid = generate_uid()
    for acquisition in (1, 2):
        folder = tmp_path / "tmp" / str(acquisition)
        write_classic_series(folder, n_slices=4, series_uid=uid, seed=acquisition)
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            ds.AcquisitionNumber = acquisition
            ds.save_as(tmp_path / f"a{acquisition}_{f.name}")
    shutil.rmtree(tmp_path / "tmp")
    sources = list(discover(tmp_path))
    assert len(sources) == 2 and all(s.shape == (40, 48, 4) and not s.problems for s in sources)


def test_non_uniform_spacing_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    truth = write_classic_series(folder, n_slices=6, scramble=False)
    last = pydicom.dcmread(folder / "slice005")  # unscrambled names: sliceNNN
    moved = np.asarray(truth["positions"][5]) + 0.6 * truth["normal"]  # 2.5 mm → 3.1 mm for the last gap
    last.ImagePositionPatient = [f"{v:.6f}" for v in moved]
    last.save_as(folder / "slice005")
    (source,) = list(discover(folder))
    assert any("non-uniform slice spacing" in p for p in source.problems)


def test_enhanced_multiframe_geometry_from_functional_groups(tmp_path: Path) -> None:
    write_classic_series(tmp_path / "classic", n_slices=6)
    path = _enhanced_from(tmp_path / "classic", tmp_path / "enh")
    classic = read_scan(tmp_path / "classic")
    enhanced = read_scan(path)
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-6)
    np.testing.assert_array_equal(enhanced.array, classic.array)


def test_enhanced_without_plane_geometry_is_a_problem(tmp_path: Path) -> None:
    write_classic_series(tmp_path / "classic", n_slices=4)
    path = _enhanced_from(tmp_path / "classic", tmp_path / "enh")
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        if "PlanePositionSequence" in item:
            del item.PlanePositionSequence
    if "PlanePositionSequence" in ds.SharedFunctionalGroupsSequence[0]:
        del ds.SharedFunctionalGroupsSequence[0].PlanePositionSequence
    ds.save_as(path)
    (source,) = list(discover(tmp_path / "enh"))
    assert source.kind == "dicom" and source.affine is None
    assert any("plane geometry" in p for p in source.problems)
    with pytest.raises(ScanError, match="plane geometry"):
        source.load()
