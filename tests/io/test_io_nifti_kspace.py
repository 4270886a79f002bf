"""NIfTI (sform/qform, 4D, problems, writing) and fastMRI-layout k-space HDF5."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from medidiff.io import (
    KSpaceData,
    ScanError,
    Volume,
    discover,
    read_kspace,
    read_nifti,
    read_scan,
    write_kspace,
    write_nifti,
)


def _affine(scale=(1.0, 1.2, 2.5), shift=(5.0, -3.0, 8.0)) -> np.ndarray:
    a = np.diag([*scale, 1.0])
    a[:3, 3] = shift
    return a


def test_write_nifti_codes_units_dtype_and_atomic(tmp_path: Path) -> None:
    vol = Volume(np.arange(24, dtype=np.float64).reshape(2, 3, 4), _affine(), {"description": "ok"})
    out = write_nifti(vol, tmp_path / "v.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.get_sform(), vol.affine)
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]  # no temporary file left


def test_sform_is_preferred_then_qform(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    img = nib.Nifti1Image(data, None)
    img.set_qform(_affine((2, 2, 2)), code=1)
    img.set_sform(_affine((3, 3, 3)), code=2)
    nib.save(img, tmp_path / "both.nii")
    np.testing.assert_allclose(read_nifti(tmp_path / "both.nii").affine, _affine((3, 3, 3)))
    img.set_sform(_affine((3, 3, 3)), code=0)
    nib.save(img, tmp_path / "q.nii")
    np.testing.assert_allclose(read_nifti(tmp_path / "q.nii").affine, _affine((2, 2, 2)))


def test_4d_nifti_lists_each_volume(tmp_path: Path) -> None:
    data = np.stack([np.full((3, 4, 5), v, np.float32) for v in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(data, _affine()), tmp_path / "four.nii.gz")
    sources = list(discover(tmp_path))
    assert [s.index for s in sources] == [0, 1, 2]
    assert all(s.kind == "nifti" and s.shape == (3, 4, 5) for s in sources)
    assert len({s.key for s in sources}) == 3
    assert float(sources[2].load().array.mean()) == 2.0
    with pytest.raises(ScanError, match="3 volumes"):
        read_nifti(tmp_path / "four.nii.gz")


def test_nan_and_sheared_affine_are_reported(tmp_path: Path) -> None:
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    sheared = _affine()
    sheared[0, 1] = 0.6
    nib.save(nib.Nifti1Image(data, sheared), tmp_path / "bad.nii.gz")
    (source,) = list(discover(tmp_path))
    assert source.kind == "nifti"
    assert any("2 voxel(s) are NaN or Inf" in p for p in source.problems)
    assert any("not orthonormal" in p for p in source.problems)


def test_garbage_nifti_is_a_named_problem(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "gzipped_garbage.nii.gz").write_bytes(gzip.compress(np.random.default_rng(1).bytes(2000)))
    (tmp_path / "empty.nii").write_bytes(b"")
    sources = {s.path.name: s for s in discover(tmp_path)}
    assert set(sources) == {"garbage.nii.gz", "gzipped_garbage.nii.gz", "empty.nii"}
    for s in sources.values():
        assert s.kind == "invalid" and s.problems
    assert "empty" in sources["empty.nii"].problems[0]
    assert "NIfTI" in sources["garbage.nii.gz"].problems[0]
    with pytest.raises(ScanError, match="garbage.nii.gz"):
        read_scan(tmp_path / "garbage.nii.gz")


def _kspace(coils: int | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (3, 16, 12) if coils is None else (3, coils, 16, 12)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("coils", [None, 4])
def test_kspace_round_trip(tmp_path: Path, coils: int | None) -> None:
    affine = np.array([[0, 0.6, 0, 10], [0.5, 0, 0, -4], [0, 0, 3, 7], [0, 0, 0, 1]], float)
    mask = (np.arange(12) % 3 == 0).astype(np.float32)
    data = KSpaceData(_kspace(coils), mask, affine, np.ones((3, 16, 12), np.float32), {"description": "t"})
    write_kspace(tmp_path / "k.h5", data)
    back = read_kspace(tmp_path / "k.h5")
    np.testing.assert_array_equal(back.kspace, data.kspace)
    np.testing.assert_array_equal(back.mask, mask)
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(back.reference, data.reference)
    assert back.meta["problems"] == []
    assert back.meta["reference_name"] == ("reconstruction_rss" if coils else "reconstruction_esc")
    image = back.image()
    assert image.shape == (16, 12, 3)
    expected = np.abs(
        np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(data.kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
        )
    )
    if coils:
        expected = np.sqrt((expected**2).sum(axis=1))
    np.testing.assert_allclose(image.array, np.moveaxis(expected, 0, -1), rtol=1e-5, atol=1e-6)


def test_fastmri_file_spacing_from_ismrmrd_header(tmp_path: Path) -> None:
    """A file as fastMRI ships them (no affine attribute): spacing from encodedSpace field of view."""
    header = (
        '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>'
        "<matrixSize><x>16</x><y>12</y><z>1</z></matrixSize>"
        "<fieldOfView_mm><x>8.0</x><y>9.0</y><z>3.0</z></fieldOfView_mm></encodedSpace></encoding></ismrmrdHeader>"
    )
    with h5py.File(tmp_path / "file1000001.h5", "w") as f:
        f.create_dataset("kspace", data=_kspace(None))
        f.create_dataset("reconstruction_esc", data=np.ones((3, 8, 8), np.float32))
        f.create_dataset("ismrmrd_header", data=header.encode())
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["patient_id"] = "must-not-be-read"
    data = read_kspace(tmp_path / "file1000001.h5")
    np.testing.assert_allclose(np.linalg.norm(data.affine[:3, :3], axis=0), [0.5, 0.75, 3.0])
    assert "patient_id" not in data.meta
    assert data.meta["acquisition"] == "CORPD_FBK"
    assert any("reconstruction_esc" in p for p in data.meta["problems"])  # cropped reference noted
    (source,) = list(discover(tmp_path))
    assert source.kind == "kspace" and source.shape == (16, 12, 3)


def test_kspace_without_header_or_with_wrong_content(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "nohdr.h5", "w") as f:
        f.create_dataset("kspace", data=_kspace(None))
    with h5py.File(tmp_path / "nokspace.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((2, 2)))
    (tmp_path / "fake.h5").write_bytes(b"not hdf5 at all")
    sources = {s.path.name: s for s in discover(tmp_path)}
    assert sources["nohdr.h5"].kind == "kspace" and "spacing assumed" in sources["nohdr.h5"].problems[0]
    assert sources["nokspace.h5"].kind == "invalid" and "no 'kspace'" in sources["nokspace.h5"].problems[0]
    assert sources["fake.h5"].kind == "invalid" and "not an HDF5" in sources["fake.h5"].problems[0]
