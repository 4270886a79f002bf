"""Write a *derived* DICOM series: classic MR Image Storage, one file per slice.

Why classic MR Image Storage written with pydicom (not Enhanced MR through highdicom): every PACS, viewer,
dcm2niix and SimpleITK/GDCM read single-frame MR series, while Enhanced MR support is still patchy;
highdicom has no constructor for single-frame MR images (its ``legacy`` module converts *to* enhanced
objects), so pydicom with an explicit attribute list is the direct way to produce a valid IOD.
The output is checked with dciodvfy in the tests.

References to the source stay small: each file's SourceImageSequence names only the source slice(s)
its own slice overlaps (with ReferencedFrameNumber when the source is an enhanced multi-frame file),
and its ReferencedSeriesSequence lists just those instances under the source SeriesInstanceUID.

Geometry comes from the Volume's RAS affine, converted to DICOM LPS here only. Values are stored as
int16 with one RescaleSlope/RescaleIntercept for the series so readers get floats back within
1/64000 of the value range.
"""

from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medidiff import __version__
from medidiff.io.atomic import atomic_dir
from medidiff.io.dicom_read import LPS_TO_RAS
from medidiff.io.errors import ScanError
from medidiff.io.volume import Volume

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_PURPOSE_SOURCE = ("121322", "DCM", "Source image for image processing operation")
_KEEP_PATIENT = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfPatientID",
)
_KEEP_STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
_KEEP_MR = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "MagneticFieldStrength",
    "ImagedNucleus",
    "SequenceName",
    "FlipAngle",
    "BodyPartExamined",
)
_STORED_RANGE = 32000  # int16 codes used: [-32000, 32000]
_SHARED_STUDY = _KEEP_PATIENT + _KEEP_STUDY + ("FrameOfReferenceUID", "PositionReferenceIndicator")

#: DICOM PS3.16 CID 7203 "Image Derivation" codes (coding scheme DCM) used for derived series.
DERIVATION_CODES: dict[str, tuple[str, str, str]] = {
    "spatial_resampling": ("113085", "DCM", "Spatial resampling"),
    "segmentation": ("113076", "DCM", "Segmentation"),
}


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    return format_number_as_ds(float(value))


def quantise(array: np.ndarray) -> tuple[np.ndarray, str, str]:
    """int16 codes plus slope/intercept strings with ``codes * slope + intercept ≈ array``.

    Integer-valued data that fit int16 are stored exactly (slope 1, intercept 0).
    """
    finite = array[np.isfinite(array)]
    vmin, vmax = float(finite.min()), float(finite.max())
    if np.all(array == np.round(array)) and vmin >= -32768 and vmax <= 32767:
        return array.astype(np.int16), "1", "0"
    span = vmax - vmin
    slope_s = _ds(span / (2 * _STORED_RANGE) if span > 0 else 1.0)
    intercept_s = _ds((vmax + vmin) / 2.0)
    slope, intercept = float(slope_s), float(intercept_s)
    codes = np.clip(np.round((array.astype(np.float64) - intercept) / slope), -32768, 32767)
    return codes.astype(np.int16), slope_s, intercept_s


def _source_header(vol: Volume, source: Volume | None) -> tuple[Volume | None, Dataset | None]:
    """The DICOM header of the source (or of the volume itself when it was read from DICOM)."""
    for candidate in (source, vol):
        if candidate is not None and candidate.meta.get("dicom_header") is not None:
            return candidate, candidate.meta["dicom_header"]
    return None, None


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


@dataclass(frozen=True)
class SliceGeometry:
    """The series' geometry in DICOM LPS: in-plane directions and spacings, slice normal, slice step."""

    lps: np.ndarray  # 4x4 voxel -> LPS mm
    row_dir: np.ndarray  # direction of increasing column index (voxel axis i)
    col_dir: np.ndarray  # direction of increasing row index (voxel axis j)
    spacing_i: float
    spacing_j: float
    normal: np.ndarray
    slice_gap: float

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (centre of its first voxel, LPS mm)."""
        return self.lps[:3, 3] + k * self.lps[:3, 2]


def slice_geometry(affine: np.ndarray, out_dir: Path) -> SliceGeometry:
    """LPS geometry of a RAS affine.

    Refuses in-plane axes that are not orthogonal (DICOM cannot store them).
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_i, col_j, col_k = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    sp_i, sp_j = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    row_dir, col_dir = col_i / sp_i, col_j / sp_j
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ScanError(out_dir, "in-plane axes of the affine are not orthogonal; DICOM cannot store that")
    normal = np.cross(row_dir, col_dir)
    return SliceGeometry(lps, row_dir, col_dir, sp_i, sp_j, normal, abs(float(col_k @ normal)))


def display_window(array: np.ndarray) -> tuple[float, float]:
    """WindowCenter and WindowWidth covering the 0.5-99.5 percentile range of the values.

    Computed once over the whole series (every slice carries the same window: no brightness jumps)."""
    lo, hi = np.percentile(array, [0.5, 99.5]) if array.size else (0.0, 1.0)
    width = float(hi - lo) if hi > lo else float(max(abs(hi), 1.0))
    return float((hi + lo) / 2), width


def _patient_study(src_hdr: Dataset | None, date: str, time: str) -> Dataset:
    """Patient, study, frame of reference (and MR acquisition attributes).

    The source's, or new placeholders.
    """
    common = Dataset()
    if src_hdr is not None:
        keep = ("SpecificCharacterSet",) + _KEEP_PATIENT + _KEEP_STUDY
        if str(src_hdr.get("Modality", "MR")) == "MR":
            keep += _KEEP_MR
        for kw in keep:
            if kw in src_hdr and src_hdr[kw].VR != "SQ":
                setattr(common, kw, src_hdr[kw].value)
        common.FrameOfReferenceUID = src_hdr.get("FrameOfReferenceUID") or generate_uid()
        common.PositionReferenceIndicator = src_hdr.get("PositionReferenceIndicator", "")
        common.PatientPosition = src_hdr.get("PatientPosition", "")
    else:
        common.PatientName = "ANONYMOUS^MEDIDIFF"
        common.PatientID = f"MEDIDIFF-{secrets.token_hex(4).upper()}"
        common.StudyInstanceUID = generate_uid()
        common.StudyDate, common.StudyTime = date, time
        common.StudyID = "1"
        common.FrameOfReferenceUID = generate_uid()
        common.PositionReferenceIndicator = ""
        common.PatientPosition = ""
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if kw not in common:
            setattr(common, kw, "")
    common.ScanningSequence = common.get("ScanningSequence") or "RM"
    common.SequenceVariant = common.get("SequenceVariant") or "NONE"
    for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        if kw not in common:
            setattr(common, kw, None)
    if "RepetitionTime" not in common:
        common.RepetitionTime = None
    if "IR" in list(np.atleast_1d(common.ScanningSequence)) and "InversionTime" not in common:
        common.InversionTime = None
    common.Modality = "MR"
    if "Laterality" not in common:
        # type 2C: dciodvfy errors when it is absent and it cannot tell the body part is unpaired, and only
        # warns when it is empty, so the source's value (or empty, "unknown") is written
        common.Laterality = src_hdr.get("Laterality", "") if src_hdr is not None else ""
    return common


def _series_number(src_hdr: Dataset | None) -> int:
    """1000 + the source's series number (mod 1000), so the derived series sorts next to its source."""
    src_number = None
    if src_hdr is not None:
        try:
            src_number = int(src_hdr.get("SeriesNumber"))
        except (TypeError, ValueError):
            src_number = None
    return 1000 + (src_number or 0) % 1000


def _series_dataset(
    src_hdr: Dataset | None,
    geometry: SliceGeometry,
    array: np.ndarray,
    slope_intercept: tuple[str, str],
    *,
    series_description: str,
    derivation_description: str,
    series_number: int,
    image_type_value3: str = "OTHER",
    derivation_code: tuple[str, str, str] | None = None,
    study_of: Dataset | None = None,
) -> Dataset:
    """The attributes every file of the series shares.

    Patient/study, series, image plane and pixel encoding.
    """
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    common = _patient_study(src_hdr, date, time)
    if study_of is not None:  # a companion series: same patient, study and frame of reference
        for kw in _SHARED_STUDY:
            if kw in study_of:
                setattr(common, kw, study_of[kw].value)
    common.SeriesInstanceUID = generate_uid()
    common.SeriesNumber = int(series_number)
    common.SeriesDescription = series_description[:64]
    common.SeriesDate, common.SeriesTime = date, time
    common.Manufacturer = "medidiff"
    common.SoftwareVersions = f"medidiff {__version__}"
    common.ImageType = ["DERIVED", "SECONDARY", image_type_value3]
    common.ContentQualification = "RESEARCH"  # not for primary diagnosis
    common.DerivationDescription = derivation_description[:1024]
    if derivation_code is not None:
        common.DerivationCodeSequence = Sequence([_code_item(derivation_code)])
    common.ContentDate, common.ContentTime = date, time
    common.InstanceCreationDate, common.InstanceCreationTime = date, time
    common.PixelSpacing = [_ds(geometry.spacing_j), _ds(geometry.spacing_i)]  # row spacing (j), column (i)
    common.ImageOrientationPatient = [_ds(v) for v in (*geometry.row_dir, *geometry.col_dir)]
    common.SliceThickness = _ds(geometry.slice_gap)
    common.SpacingBetweenSlices = _ds(geometry.slice_gap)
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows, common.Columns = int(array.shape[1]), int(array.shape[0])
    common.BitsAllocated, common.BitsStored, common.HighBit = 16, 16, 15
    common.PixelRepresentation = 1
    common.RescaleSlope, common.RescaleIntercept = slope_intercept
    common.RescaleType = "US"
    center, width = display_window(array)
    common.WindowCenter, common.WindowWidth = _ds(center), _ds(width)
    if width < 1:
        common.VOILUTFunction = "LINEAR_EXACT"
    common.SOPClassUID = MR_IMAGE_STORAGE
    return common


def _slice_dataset(
    common: Dataset, geometry: SliceGeometry, k: int, codes: np.ndarray, source_slices: list[int] | None,
    refs: _SourceRefs | None,
) -> Dataset:
    """One file of the series: the shared attributes plus slice ``k``'s position, references and pixels."""
    ds = Dataset()
    ds.update(common)
    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    position = geometry.position(k)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(position @ geometry.normal))
    if refs is not None and source_slices is not None:
        refs.add_to(ds, source_slices)
    ds.PixelData = np.ascontiguousarray(codes[:, :, k].T).astype("<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_dicom_series(
    vol: Volume,
    out_dir: str | Path,
    *,
    source: Volume | None = None,
    series_description: str = "medidiff derived",
    derivation_description: str = "medidiff",
    series_number: int | None = None,
    image_type_value3: str = "OTHER",
    derivation_code: tuple[str, str, str] | None = None,
    study_of: Dataset | None = None,
) -> list[Path]:
    """Write ``vol`` as a derived MR series into ``out_dir`` (replaced whole or not at all).

    Every series is marked ``ContentQualification = RESEARCH`` (not for primary diagnosis) with ImageType
    ``DERIVED\\SECONDARY\\<image_type_value3>``; ``derivation_code`` (a CID 7203 code, see
    :data:`DERIVATION_CODES`) goes into DerivationCodeSequence. ``study_of``: a file's header whose patient,
    study and frame of reference this series shares, so that maps written beside an enhanced series
    overlay it in a viewer.

    Patient, study and frame of reference are kept when the source was DICOM, otherwise new
    placeholders. Each file references the source slice(s) its slice overlaps along the normal
    (SourceImageSequence, with ReferencedFrameNumber for an enhanced source) and lists those instances
    under the source series in ReferencedSeriesSequence (Common Instance Reference module).
    """
    out_dir = Path(out_dir)
    array = np.asarray(vol.array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ScanError(out_dir, "volume has NaN or Inf values; cannot store them in DICOM")
    geometry = slice_geometry(vol.affine, out_dir)
    codes, slope_s, intercept_s = quantise(array)
    src_vol, src_hdr = _source_header(vol, source)
    common = _series_dataset(
        src_hdr,
        geometry,
        array,
        (slope_s, intercept_s),
        series_description=series_description,
        derivation_description=derivation_description,
        series_number=_series_number(src_hdr) if series_number is None else series_number,
        image_type_value3=image_type_value3,
        derivation_code=derivation_code,
        study_of=study_of,
    )
    refs = _SourceRefs(src_vol, src_hdr) if src_vol is not None else None
    if refs is not None and not refs.uids:
        refs = None
    written: list[Path] = []
    with atomic_dir(out_dir) as tmp:
        for k in range(array.shape[2]):
            overlap = (
                _overlapping_source_slices(src_vol, vol.affine, array.shape, k) if refs is not None else None
            )
            ds = _slice_dataset(common, geometry, k, codes, overlap, refs)
            name = f"IM{k + 1:05d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            written.append(out_dir / name)
    return written


class _SourceRefs:
    """The source's instances (and frames, for an enhanced source) per source slice."""

    def __init__(self, src: Volume, header) -> None:
        self.uids = [str(u) for u in src.meta.get("source_sop_instance_uids", []) if u]
        self.frames: list[int | None] = list(src.meta.get("source_frame_numbers") or [None] * len(self.uids))
        if len(self.uids) == 1 and src.shape[2] > 1 and "NumberOfFrames" in header:
            # one multi-frame instance recorded once (older meta): frames follow the slice order
            self.uids, self.frames = self.uids * src.shape[2], list(range(1, src.shape[2] + 1))
        if len(self.frames) != len(self.uids):
            self.frames = [None] * len(self.uids)
        self.sop_class = src.meta.get("source_sop_class_uid") or str(
            header.get("SOPClassUID", MR_IMAGE_STORAGE)
        )
        self.series_uid = str(src.meta.get("series_uid") or "")

    def add_to(self, ds, slices: list[int]) -> None:
        """Add SourceImageSequence (one item per instance, with its frames) and the matching
        ReferencedSeriesSequence (Common Instance Reference module) for source ``slices``."""
        by_uid: dict[str, list[int]] = {}
        for s in slices:
            s = min(max(s, 0), len(self.uids) - 1)
            frames = by_uid.setdefault(self.uids[s], [])
            if self.frames[s] is not None and self.frames[s] not in frames:
                frames.append(int(self.frames[s]))
        items, instances = [], []
        for uid, frames in by_uid.items():
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = self.sop_class, uid
            if frames:
                item.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
            item.PurposeOfReferenceCodeSequence = Sequence([_code_item(_PURPOSE_SOURCE)])
            items.append(item)
            instance = Dataset()
            instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = self.sop_class, uid
            instances.append(instance)
        ds.SourceImageSequence = Sequence(items)
        if self.series_uid:
            series = Dataset()
            series.SeriesInstanceUID = self.series_uid
            series.ReferencedInstanceSequence = Sequence(instances)
            ds.ReferencedSeriesSequence = Sequence([series])


def _overlapping_source_slices(src: Volume, affine: np.ndarray, shape, k: int) -> list[int]:
    """Source slices whose slab overlaps the slab of output slice ``k`` along the source slice normal.

    Both slabs are one slice spacing thick and centred on their slice; when none overlaps (output
    outside the source), the nearest source slice.
    """
    src_aff = np.asarray(src.affine, dtype=np.float64)
    out_aff = np.asarray(affine, dtype=np.float64)
    n_src = src.shape[2]
    if n_src == 1:
        return [0]
    centre = out_aff @ np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, k, 1.0])
    c = float(np.linalg.solve(src_aff, centre)[2])  # continuous source slice index
    normal = np.cross(src_aff[:3, 0], src_aff[:3, 1])
    normal /= np.linalg.norm(normal)
    src_gap = abs(float(src_aff[:3, 2] @ normal))
    half = 0.5 * abs(float(out_aff[:3, 2] @ normal)) / src_gap if src_gap > 0 else 0.0
    eps = 1e-3  # slabs that only touch do not overlap
    lo, hi = int(np.ceil(c - half - 0.5 + eps)), int(np.floor(c + half + 0.5 - eps))
    inside = [s for s in range(lo, hi + 1) if 0 <= s < n_src]
    return inside or [int(np.clip(np.round(c), 0, n_src - 1))]
