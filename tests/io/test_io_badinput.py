"""A bad-input corpus generated in code: each case is read with ``read_scan`` and listed with ``discover``.

Every outcome must be a sound Volume / k-space (finite, non-degenerate geometry, finite voxels) or a
``ScanError`` that names the file and the expected problem; no other exception escapes, nothing hangs,
and the input bytes are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from medidiff.io import KSpaceData, ScanError, ScanTooLargeError, Volume, discover, read_scan
from tests.io.badinput import (
    assert_sound,
    dicom_bytes,
    dicom_dataset,
    gz,
    ismrmrd_xml,
    kspace_file,
    nifti_bytes,
    outcome,
    patch_nifti,
    write_series,
)

Case = Callable[[Path], tuple[Path, str | None]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------------------------------------ DICOM
@case
def dicom_cut_at_132_bytes(tmp: Path):
    (tmp / "IM1").write_bytes(dicom_bytes(dicom_dataset())[:132])
    return tmp / "IM1", "truncated / not a complete DICOM file"


@case
def dicom_cut_in_pixel_data(tmp: Path):
    raw = dicom_bytes(dicom_dataset())
    (tmp / "IM1").write_bytes(raw[: len(raw) - 100])
    return tmp / "IM1", "truncated"


@case
def dicom_cut_in_header(tmp: Path):
    (tmp / "IM1").write_bytes(dicom_bytes(dicom_dataset())[:300])
    return tmp / "IM1", ""


@case
def dicom_wrong_magic(tmp: Path):
    raw = bytearray(dicom_bytes(dicom_dataset()))
    raw[128:132] = b"DICX"
    (tmp / "IM1").write_bytes(bytes(raw))
    return tmp / "IM1", None  # pydicom may still parse the dataset: a sound volume or a named problem


@case
def dicom_empty_file(tmp: Path):
    (tmp / "IM1").write_bytes(b"")
    return tmp / "IM1", "empty file"


@case
def dicom_text_file(tmp: Path):
    (tmp / "IM1").write_bytes(b"hello, this is not an image\n" * 10)
    return tmp / "IM1", "not a"


@case
def dicom_negative_pixel_spacing(tmp: Path):
    write_series(tmp / "s", edit=lambda ds, k: setattr(ds, "PixelSpacing", ["-0.9", "0.8"]))
    return tmp / "s", "PixelSpacing must be positive"


@case
def dicom_zero_pixel_spacing(tmp: Path):
    write_series(tmp / "s", edit=lambda ds, k: setattr(ds, "PixelSpacing", ["0", "0.8"]))
    return tmp / "s", "PixelSpacing must be positive"


@case
def dicom_duplicate_sop_instance_uids(tmp: Path):
    write_series(tmp / "s", edit=lambda ds, k: setattr(ds, "SOPInstanceUID", "1.2.3.4.5.6"))
    return tmp / "s", "duplicate SOP Instance UIDs"


@case
def dicom_non_orthogonal_orientation(tmp: Path):
    iop = ["1", "0", "0", "0.5", "0.8660254", "0"]  # 60° between row and column
    write_series(tmp / "s", edit=lambda ds, k: setattr(ds, "ImageOrientationPatient", iop))
    return tmp / "s", "not orthogonal"


@case
def dicom_orientation_zero_vector(tmp: Path):
    write_series(tmp / "s", edit=lambda ds, k: setattr(ds, "ImageOrientationPatient", ["0"] * 6))
    return tmp / "s", "zero-length direction"


@case
def dicom_gantry_tilt_shear(tmp: Path):
    write_series(
        tmp / "s", edit=lambda ds, k: setattr(ds, "ImagePositionPatient", ["0", f"{k * 1.5}", f"{2 * k}"])
    )
    return tmp / "s", "stacked at an angle"


@case
def dicom_position_not_numbers(tmp: Path):
    def edit(ds, k):
        ds.ImagePositionPatient = ["9.87654", "0", f"{2 * k}"]

    write_series(tmp / "s", edit=edit, raw_edit=lambda raw: raw.replace(b"9.87654", b"a\\b\\c  "))
    return tmp / "s", ""


@case
def dicom_nan_rescale_slope(tmp: Path):
    write_series(
        tmp / "s",
        edit=lambda ds, k: setattr(ds, "RescaleSlope", "7.12345"),
        raw_edit=lambda raw: raw.replace(b"7.12345", b"nan    "),
    )
    return tmp / "s", "NaN"


@case
def dicom_zero_rows(tmp: Path):
    ds = dicom_dataset()
    ds.Rows = 0
    (tmp / "IM1").write_bytes(dicom_bytes(ds))
    return tmp / "IM1", "zero-length"


@case
def dicom_huge_declared_size(tmp: Path):
    ds = dicom_dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    (tmp / "IM1").write_bytes(dicom_bytes(ds))
    return tmp / "IM1", "MEDIDIFF_MAX_VOXELS"


@case
def dicom_multiframe_without_geometry(tmp: Path):
    ds = dicom_dataset(rows=8, cols=8)
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        delattr(ds, tag)
    ds.NumberOfFrames = 10
    ds.PixelData = np.zeros((10, 8, 8), "<i2").tobytes()
    (tmp / "IM1").write_bytes(dicom_bytes(ds))
    return tmp / "IM1", "multi-frame"


@case
def dicom_single_slice_ok(tmp: Path):
    (tmp / "IM1").write_bytes(dicom_bytes(dicom_dataset()))
    return tmp / "IM1", "ok"


# ------------------------------------------------------------------------------------------------ NIfTI
@case
def nifti_empty(tmp: Path):
    (tmp / "a.nii").write_bytes(b"")
    return tmp / "a.nii", "empty file"


@case
def nifti_truncated_header(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(nifti_bytes())[:200])
    return tmp / "a.nii", "not a readable NIfTI"


@case
def nifti_truncated_voxels(tmp: Path):
    raw = nifti_bytes()
    (tmp / "a.nii").write_bytes(bytes(raw)[: len(raw) - 64])
    return tmp / "a.nii", "unreadable"


@case
def nifti_truncated_gzip(tmp: Path):
    raw = gz(nifti_bytes(np.random.default_rng(0).random((20, 20, 20), dtype=np.float32)))
    (tmp / "a.nii.gz").write_bytes(raw[: len(raw) // 2])
    return tmp / "a.nii.gz", "unreadable"


@case
def nifti_gzip_of_garbage(tmp: Path):
    (tmp / "a.nii.gz").write_bytes(gz(b"not a nifti header at all" * 30))
    return tmp / "a.nii.gz", "not a readable NIfTI"


@case
def nifti_plain_garbage(tmp: Path):
    (tmp / "a.nii").write_bytes(os.urandom(64) * 10)
    return tmp / "a.nii", "not a readable NIfTI"


@case
def nifti_wrong_magic(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(nifti_bytes(), "magic", b"xx1\0")))
    return tmp / "a.nii", ""


@case
def nifti_nan_sform(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(nifti_bytes(), "srow_x", np.nan, 0, 0, 0)))
    return tmp / "a.nii", "affine contains NaN or Inf"


@case
def nifti_nan_pixdim_no_codes(tmp: Path):
    raw = patch_nifti(nifti_bytes(), "sform_code", 0)
    patch_nifti(raw, "qform_code", 0)
    patch_nifti(raw, "pixdim", 1, np.nan, 1, 1, 1, 1, 1, 1)
    (tmp / "a.nii").write_bytes(bytes(raw))
    return tmp / "a.nii", "NaN or Inf"


@case
def nifti_singular_sform(tmp: Path):
    (tmp / "a.nii.gz").write_bytes(gz(patch_nifti(nifti_bytes(), "srow_z", 0, 0, 0, 0)))
    return tmp / "a.nii.gz", "singular"


@case
def nifti_parallel_axes(tmp: Path):
    raw = patch_nifti(nifti_bytes(), "srow_x", 1, 1, 0, 0)
    patch_nifti(raw, "srow_y", 1, 1, 0, 0)
    (tmp / "a.nii").write_bytes(bytes(raw))
    return tmp / "a.nii", "singular"


@case
def nifti_sheared_affine(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(nifti_bytes(), "srow_x", 1, 0.6, 0, 0)))
    return tmp / "a.nii", "not orthonormal"


@case
def nifti_zero_length_axis(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(nifti_bytes(), "dim", 3, 4, 5, 0, 1, 1, 1, 1)))
    return tmp / "a.nii", "zero-length axis"


@case
def nifti_negative_dim(tmp: Path):
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(nifti_bytes(), "dim", 3, 4, -5, 6, 1, 1, 1, 1)))
    return tmp / "a.nii", ""


@case
def nifti_huge_claimed_size(tmp: Path):
    raw = patch_nifti(nifti_bytes(np.zeros((2, 2, 2), np.float32)), "dim", 3, 2048, 2048, 512, 1, 1, 1, 1)
    (tmp / "a.nii.gz").write_bytes(gz(raw))
    return tmp / "a.nii.gz", "declares 2,147,483,648 voxels"


@case
def nifti_absurd_claimed_size(tmp: Path):
    raw = patch_nifti(
        nifti_bytes(np.zeros((2, 2, 2), np.float32)), "dim", 4, 32767, 32767, 32767, 32767, 1, 1, 1
    )
    (tmp / "a.nii").write_bytes(bytes(raw))
    return tmp / "a.nii", "more than the limit"


@case
def nifti_nan_voxels(tmp: Path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    (tmp / "a.nii.gz").write_bytes(gz(nifti_bytes(data)))
    return tmp / "a.nii.gz", "1 voxel(s) are NaN or Inf"


@case
def nifti_inf_scale_slope(tmp: Path):
    raw = nifti_bytes(np.ones((4, 4, 4), np.int16))
    (tmp / "a.nii").write_bytes(bytes(patch_nifti(raw, "scl_slope", np.inf)))
    return tmp / "a.nii", None


@case
def nifti_complex_is_magnitude(tmp: Path):
    data = (np.full((4, 4, 4), 3.0) + 4j).astype(np.complex64)
    (tmp / "a.nii.gz").write_bytes(gz(nifti_bytes(data)))
    return tmp / "a.nii.gz", "ok"


@case
def nifti_rgb(tmp: Path):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    (tmp / "a.nii").write_bytes(bytes(nifti_bytes(rgb)))
    return tmp / "a.nii", "not a greyscale scan"


@case
def nifti_directory_named_nii(tmp: Path):
    (tmp / "a.nii").mkdir()
    return tmp / "a.nii", "no readable scan"


# ------------------------------------------------------------------------------------------------ HDF5
@case
def kspace_malformed_matrix_size(tmp: Path):
    return kspace_file(tmp / "k.h5", header=ismrmrd_xml(x="abc")), "not a number"


@case
def kspace_header_not_xml(tmp: Path):
    return kspace_file(tmp / "k.h5", header="<ismrmrdHeader><encoding>"), "not valid XML"


@case
def kspace_header_entity_expansion(tmp: Path):
    bomb = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>'
    return kspace_file(tmp / "k.h5", header=bomb), "refused"


@case
def kspace_negative_field_of_view(tmp: Path):
    return kspace_file(tmp / "k.h5", header=ismrmrd_xml(fov="-160")), "gives no positive spacing"


@case
def kspace_all_zero(tmp: Path):
    return kspace_file(tmp / "k.h5", kspace=np.zeros((2, 8, 6), np.complex64)), "all zero"


@case
def kspace_nan_samples(tmp: Path):
    k = np.ones((2, 8, 6), np.complex64)
    k[0, 0, 0] = np.nan
    return kspace_file(tmp / "k.h5", kspace=k), "NaN or Inf"


@case
def kspace_nan_affine_attribute(tmp: Path):
    return kspace_file(tmp / "k.h5", affine=np.full((4, 4), np.nan)), "stored 'affine' attribute ignored"


@case
def kspace_singular_affine_attribute(tmp: Path):
    return kspace_file(tmp / "k.h5", affine=np.zeros((4, 4))), "stored 'affine' attribute ignored"


@case
def kspace_huge_chunked_dataset(tmp: Path):
    with h5py.File(tmp / "k.h5", "w") as f:
        f.create_dataset(
            "kspace", shape=(100_000, 64, 10_000, 10_000), dtype=np.complex64, chunks=(1, 1, 64, 64)
        )
    return tmp / "k.h5", "MEDIDIFF_MAX_VOXELS"


@case
def kspace_never_written(tmp: Path):
    with h5py.File(tmp / "k.h5", "w") as f:
        f.create_dataset("kspace", shape=(2, 8, 6), dtype=np.complex64, chunks=(1, 8, 6))
    return tmp / "k.h5", "nothing was measured"


@case
def kspace_missing_dataset(tmp: Path):
    with h5py.File(tmp / "k.h5", "w") as f:
        f.create_dataset("image", data=np.ones((2, 2)))
    return tmp / "k.h5", "no 'kspace' dataset"


@case
def kspace_real_valued(tmp: Path):
    return kspace_file(tmp / "k.h5", kspace=np.ones((2, 8, 6), np.float32)), "real-valued"


@case
def kspace_zero_length_axis(tmp: Path):
    return kspace_file(tmp / "k.h5", kspace=np.ones((0, 8, 6), np.complex64)), "zero-length axis"


@case
def kspace_truncated(tmp: Path):
    raw = kspace_file(tmp / "full.h5", header=ismrmrd_xml()).read_bytes()
    (tmp / "full.h5").unlink()
    (tmp / "k.h5").write_bytes(raw[: len(raw) // 2])
    return tmp / "k.h5", "unreadable HDF5"


@case
def kspace_empty(tmp: Path):
    (tmp / "k.h5").write_bytes(b"")
    return tmp / "k.h5", "empty file"


@case
def kspace_not_hdf5(tmp: Path):
    (tmp / "k.h5").write_bytes(b"\x89HDX" + os.urandom(200))
    return tmp / "k.h5", "not an HDF5 file"


@case
def kspace_good_with_header(tmp: Path):
    return kspace_file(tmp / "k.h5", header=ismrmrd_xml()), "ok"


# ------------------------------------------------------------------------------------------------ file system
@case
def symlink_loop(tmp: Path):
    (tmp / "a.nii").symlink_to(tmp / "b.nii")
    (tmp / "b.nii").symlink_to(tmp / "a.nii")
    return tmp / "a.nii", "broken symbolic link"


@case
def dangling_symlink(tmp: Path):
    (tmp / "IM1").symlink_to(tmp / "gone")
    return tmp / "IM1", "broken symbolic link"


@case
def folder_symlink_loop(tmp: Path):
    (tmp / "d").mkdir()
    (tmp / "d" / "IM1").write_bytes(dicom_bytes(dicom_dataset()))
    (tmp / "d" / "loop").symlink_to(tmp / "d")
    return tmp / "d", "ok"


@case
def fifo_named_nii(tmp: Path):
    os.mkfifo(tmp / "a.nii")
    return tmp / "a.nii", "not a regular file"


@case
def unreadable_file(tmp: Path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    (tmp / "a.nii").write_bytes(bytes(nifti_bytes()))
    (tmp / "a.nii").chmod(0)
    return tmp / "a.nii", "cannot open file"


@case
def unreadable_folder(tmp: Path):
    if os.geteuid() == 0:
        pytest.skip("root lists folders whatever their permissions")
    (tmp / "d").mkdir()
    (tmp / "d" / "sub").mkdir()
    (tmp / "d" / "sub").chmod(0)
    return tmp / "d", "cannot list folder"


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and os.access(p, os.R_OK):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_a_named_problem(name: str, tmp_path: Path) -> None:
    target, expect = CASES[name](tmp_path)
    before = _digest(tmp_path)
    t0 = time.perf_counter()
    result = outcome(read_scan, target)
    try:
        sources = list(discover(target))
    finally:
        for p in tmp_path.rglob("*"):  # let pytest clean up folders made unreadable
            if not p.is_symlink():
                p.chmod(0o755)
    assert time.perf_counter() - t0 < 10, "reading a bad input must not hang"
    for source in sources:
        assert source.kind in ("dicom", "nifti", "kspace", "invalid")
        if source.kind == "invalid":
            assert source.problems and all(isinstance(p, str) and p for p in source.problems)
        info = source.info()  # strict-JSON ready: no NaN
        assert info["affine"] is None or np.all(np.isfinite(info["affine"]))
    problems = [p for s in sources for p in s.problems]
    if isinstance(result, (Volume, KSpaceData)):
        assert_sound(result, target)
        assert expect in ("ok", None) or any(expect in p for p in problems + result.meta["problems"]), (
            expect,
            problems,
            result.meta["problems"],
        )
    else:
        assert expect != "ok", result
        if expect:
            named = expect in result.problem or any(expect in p for p in problems)
            assert named, (expect, str(result), problems)
    assert _digest(tmp_path) == before, "inputs must be left byte-identical"


def test_corpus_size() -> None:
    assert len(CASES) >= 40


def test_huge_nifti_is_refused_without_allocating(tmp_path: Path) -> None:
    target, _ = CASES["nifti_huge_claimed_size"](tmp_path)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    message = r"declares 2,147,483,648 voxels .*8.59 GB.*--max-voxels"
    with pytest.raises(ScanTooLargeError, match=message) as err:
        read_scan(target)
    assert err.value.voxels == 2048 * 2048 * 512 and err.value.limit == 2**29
    (source,) = list(discover(target))
    assert source.kind == "invalid" and "more than the limit" in source.problems[0]
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # kB: nothing near 8.6 GB


def test_voxel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medidiff.io import max_voxels, set_max_voxels

    path = tmp_path / "a.nii"
    path.write_bytes(bytes(nifti_bytes()))  # 4×5×6 = 120 voxels
    assert read_scan(path).shape == (4, 5, 6)
    with pytest.raises(ScanTooLargeError, match="declares 120 voxels"):
        read_scan(path, max_voxels=100)
    monkeypatch.setenv("MEDIDIFF_MAX_VOXELS", "100")
    assert max_voxels() == 100
    with pytest.raises(ScanTooLargeError):
        read_scan(path)
    (source,) = list(discover(path))
    assert source.kind == "invalid"
    assert "raise it with --max-voxels / MEDIDIFF_MAX_VOXELS" in source.problems[0]
    set_max_voxels(1000)
    assert os.environ["MEDIDIFF_MAX_VOXELS"] == "1000" and read_scan(path).shape == (4, 5, 6)
    monkeypatch.setenv("MEDIDIFF_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="positive integer"):
        max_voxels()


def test_nonfinite_voxels_can_be_allowed(tmp_path: Path) -> None:
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0] = np.inf
    path = tmp_path / "a.nii"
    path.write_bytes(bytes(nifti_bytes(data)))
    with pytest.raises(ScanError, match="1 voxel\\(s\\) are NaN or Inf"):
        read_scan(path)
    vol = read_scan(path, allow_nonfinite=True)
    assert np.isinf(vol.array[0, 0, 0]) and any("NaN or Inf" in p for p in vol.meta["problems"])


def test_complex_nifti_is_read_as_recorded_magnitude(tmp_path: Path) -> None:
    from medidiff.io import read_nifti

    CASES["nifti_complex_is_magnitude"](tmp_path)
    vol = read_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(vol.array, 5.0)  # |3 + 4j|
    assert vol.meta["complex"] == "magnitude" and any("magnitude" in p for p in vol.meta["problems"])
    with pytest.raises(ScanError, match="complex-valued"):
        read_nifti(tmp_path / "a.nii.gz", complex_mode="refuse")


def test_malformed_kspace_header_falls_back_with_a_problem(tmp_path: Path) -> None:
    path, _ = CASES["kspace_malformed_matrix_size"](tmp_path)
    data = read_scan(path)
    assert isinstance(data, KSpaceData)
    assert any("encodedSpace/matrixSize/x is 'abc', not a number" in p for p in data.meta["problems"])
    np.testing.assert_allclose(np.linalg.norm(data.affine[:3, :3], axis=0), 1.0)


def test_multiframe_without_geometry_reports_its_frames(tmp_path: Path) -> None:
    target, _ = CASES["dicom_multiframe_without_geometry"](tmp_path)
    (source,) = list(discover(target))
    assert source.shape == (8, 8, 10)


def test_single_file_is_reported_under_its_own_name(tmp_path: Path) -> None:
    target, _ = CASES["dicom_single_slice_ok"](tmp_path)
    (source,) = list(discover(target))
    assert source.path == target and source.kind == "dicom"
    assert source.info()["path"] == str(target)


def _make_chain(top: Path, levels: int, nifti_at: int) -> None:
    """``levels`` nested folders ``d/d/...`` under ``top`` (made with relative paths, so PATH_MAX does not
    stop it), with a NIfTI file at depth ``nifti_at``."""
    old = os.getcwd()
    try:
        os.chdir(top)
        for level in range(levels):
            os.mkdir("d")
            os.chdir("d")
            if level == nifti_at:
                Path("a.nii").write_bytes(bytes(nifti_bytes()))
    finally:
        os.chdir(old)


def _remove_chain(top: Path) -> None:
    """Delete the chain iteratively (shutil.rmtree, and so pytest's cleanup, recurses once per level)."""
    old = os.getcwd()
    try:
        os.chdir(top)
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for _ in range(depth):
            for name in os.listdir("."):
                os.unlink(name)
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(old)


@pytest.fixture
def deep_tree():
    """A 2100-level folder chain (deeper than PATH_MAX allows to name), removed afterwards.

    Made outside pytest's temporary folders: pytest cleans those with shutil.rmtree, which recurses once
    per level and would fail on this chain if a run were interrupted before the teardown.
    """
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="medidiff-deep-"))
    try:
        _make_chain(top, 2100, nifti_at=5)
        yield top
    finally:
        _remove_chain(top)
        top.rmdir()


def test_deep_folder_tree_has_no_recursion_error(deep_tree: Path) -> None:
    """2100 levels: discovery walks iteratively, lists what it can and names the folders it cannot list."""
    sources = list(discover(deep_tree))
    assert [s.path.name for s in sources if s.kind == "nifti"] == ["a.nii"]
    assert all(s.kind == "nifti" or (s.kind == "invalid" and s.problems) for s in sources)
    assert any("cannot list folder" in p for s in sources for p in s.problems)  # beyond PATH_MAX


def test_scan_errors_cross_process_boundaries(tmp_path: Path) -> None:
    """Decoding may run in a child process: the errors pickle with their path, problem and sizes."""
    import pickle

    target, _ = CASES["nifti_huge_claimed_size"](tmp_path)
    with pytest.raises(ScanTooLargeError) as err:
        read_scan(target)
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is ScanTooLargeError and str(again) == str(err.value)
    assert (again.path, again.problem, again.voxels, again.limit) == (
        err.value.path,
        err.value.problem,
        err.value.voxels,
        err.value.limit,
    )
    plain = pickle.loads(pickle.dumps(ScanError(target, "empty file (0 bytes)")))
    assert plain.path == target and plain.problem == "empty file (0 bytes)"
