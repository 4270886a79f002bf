"""Valid scans built in memory, and the byte-level edits the bad-input and fuzz tests apply to them."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medidiff.io import KSpaceData, ScanError, Volume, geometry_problem

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# Byte offsets of NIfTI-1 header fields (little endian), from the NIfTI-1 standard.
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "i"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "6f"),
    "srow_x": (280, "4f"),
    "srow_y": (296, "4f"),
    "srow_z": (312, "4f"),
    "magic": (344, "4s"),
}


def nifti_bytes(data: np.ndarray | None = None, affine: np.ndarray | None = None) -> bytearray:
    """An uncompressed single-file NIfTI-1 image (sform and qform code 1) as bytes."""
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) if data is None else data
    affine = np.diag([1.0, 1.2, 2.5, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    bio = io.BytesIO()
    img.to_file_map(img.make_file_map({"image": bio, "header": bio}))
    return bytearray(bio.getvalue())


def patch_nifti(buf: bytearray, field: str, *values) -> bytearray:
    """Overwrite one header field in place (values as struct packs them)."""
    offset, fmt = NIFTI_FIELDS[field]
    struct.pack_into("<" + fmt, buf, offset, *values)
    return buf


def dicom_dataset(
    rows: int = 16, cols: int = 12, *, position=(0.0, 0.0, 0.0), series_uid: str = ""
) -> Dataset:
    """A small valid axial MR slice (explicit VR little endian)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid or generate_uid(), 1
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4", "1.2.3.5"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = ["0.9", "0.8"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.SliceThickness = "2.0"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.PixelData = (np.arange(rows * cols, dtype="<i2") % 97).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_STORAGE, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    bio = io.BytesIO()
    ds.save_as(bio, enforce_file_format=True)
    return bio.getvalue()


def write_series(folder: Path, n: int = 4, edit=None, raw_edit=None) -> list[Path]:
    """An axial series of ``n`` slices 2 mm apart; ``edit(ds, k)`` may change each slice before saving,
    ``raw_edit(bytes)`` its encoded bytes (to store values no valid writer would)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    paths = []
    for k in range(n):
        ds = dicom_dataset(position=(0.0, 0.0, 2.0 * k), series_uid=uid)
        ds.InstanceNumber = k + 1
        if edit is not None:
            edit(ds, k)
        path = folder / f"IM{k:04d}"
        raw = dicom_bytes(ds)
        path.write_bytes(raw_edit(raw) if raw_edit is not None else raw)
        paths.append(path)
    return paths


def kspace_file(path: Path, kspace=None, header: str | bytes | None = None, **attrs) -> Path:
    """A fastMRI-layout file written with h5py directly (not medidiff's writer)."""
    rng = np.random.default_rng(0)
    if kspace is None:
        kspace = (rng.standard_normal((2, 8, 6)) + 1j * rng.standard_normal((2, 8, 6))).astype(np.complex64)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if header is not None:
            header_bytes = header.encode() if isinstance(header, str) else header
            f.create_dataset("ismrmrd_header", data=np.bytes_(header_bytes))
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def ismrmrd_xml(x: str = "8", fov: str = "160") -> str:
    return (
        '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>'
        f"<matrixSize><x>{x}</x><y>6</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov}</x><y>120</y><z>3</z></fieldOfView_mm>"
        "</encodedSpace></encoding></ismrmrdHeader>"
    )


def gz(buf: bytes) -> bytes:
    return gzip.compress(bytes(buf), mtime=0)


def assert_sound(result, path: Path | None = None) -> None:
    """The invariants of anything a reader returns: finite non-degenerate geometry, finite voxels."""
    if isinstance(result, KSpaceData):
        assert geometry_problem(result.affine) is None, result.affine
        assert np.all(np.isfinite(result.kspace)) or any("NaN" in p for p in result.meta["problems"])
        assert np.any(result.kspace)
        assert 0 not in result.kspace.shape
        return
    assert isinstance(result, Volume), type(result)
    problem = geometry_problem(result.affine)
    assert problem is None or ("not orthonormal" in problem and problem in result.meta["problems"]), problem
    assert abs(np.linalg.det(result.affine[:3, :3])) > 0
    assert 0 not in result.array.shape
    assert np.all(np.isfinite(result.array)) or any("NaN" in p for p in result.meta.get("problems", []))


def outcome(read, path: Path):
    """Call ``read(path)``: the result, or the ScanError (any other exception fails the test)."""
    try:
        return read(path)
    except ScanError as exc:
        assert exc.problem, exc
        assert path.name in str(exc) or path.parent.name in str(exc), (str(exc), path)
        return exc

