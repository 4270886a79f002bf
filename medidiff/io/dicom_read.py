"""Read DICOM MR/CT images into Volumes: classic one-file-per-slice series and enhanced multi-frame files.

Headers are read with ``stop_before_pixels`` so discovery stays cheap; pixels are decoded only on load,
by pydicom with whichever decoders are installed (gdcm, pylibjpeg-openjpeg/-rle, pyjpegls).
Geometry: DICOM patient coordinates are LPS; the affine returned is RAS (flip of x and y) — this is
the only place that conversion happens on the way in.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.errors import ScanError
from medidiff.io.limits import check_voxels
from medidiff.io.volume import ORTHOGONALITY_TOLERANCE, Volume, check_volume, geometry_problem

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DEFLATED = "1.2.840.10008.1.2.1.99"
_ORIENT_DECIMALS = 4


# ------------------------------------------------------------------------------------------ pydicom messages
class _ListHandler(logging.Handler):
    """Logging handler that appends each record's message to a list."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextmanager
def pydicom_messages() -> Iterator[list[str]]:
    """Collect pydicom's warnings and warning-level log records instead of printing them.

    The yielded list is filled (deduplicated, in order) when the block exits. Warnings raised by other
    libraries inside the block are re-issued unchanged.
    """
    messages: list[str] = []
    logger = logging.getLogger("pydicom")
    handler = _ListHandler(messages)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    others: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for w in caught:
            if "pydicom" in (w.filename or "") or w.category.__module__.startswith("pydicom"):
                messages.append(str(w.message))
            else:
                others.append(w)
        unique = list(dict.fromkeys(m.strip() for m in messages if m.strip()))
        messages[:] = unique
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def warning_problems(messages: list[str]) -> list[str]:
    """pydicom's complaints about a file, worded as problems."""
    return [f"malformed DICOM encoding (pydicom: {m})" for m in messages]


# ----------------------------------------------------------------------------------------------- headers
def read_header(path: str | Path, notes: list[str] | None = None):
    """Header of one file (no pixels) checked to be a readable, complete 2D image; else ScanError.

    pydicom's warnings about the file are not printed; they are appended to ``notes`` as problems.
    """
    try:
        with pydicom_messages() as messages:
            ds = _read_header(Path(path))
    except ScanError as exc:
        if not messages:
            raise
        raise ScanError(exc.path, "; ".join([exc.problem, *warning_problems(messages)[:2]])) from None
    if notes is not None:
        notes.extend(warning_problems(messages))
    return ds


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ScanError(path, f"cannot open file ({exc.strerror})") from None
    if not path.is_file():
        raise ScanError(path, "is a folder, not a file" if path.is_dir() else "not a regular file")
    if size == 0:
        raise ScanError(path, "empty file (0 bytes)")
    forced = False
    try:
        with open(path, "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
            except InvalidDicomError:
                fh.seek(0)
                forced = True
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            pixel_offset = fh.tell()
        ds.walk(lambda _ds, _elem: None)  # convert every element now: a malformed one is this file's problem
    except Exception as exc:  # noqa: BLE001 - any parse failure of arbitrary bytes is a named problem
        raise ScanError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    try:
        _check_header(path, ds, forced, size, pixel_offset)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed values (Rows 'abc', odd VRs) in arbitrary bytes
        raise ScanError(path, f"malformed DICOM header ({type(exc).__name__}: {exc})") from None
    return ds


def _check_header(path: Path, ds, forced: bool, size: int, pixel_offset: int) -> None:
    """Raise ScanError unless ``ds`` is the complete header of a greyscale image within the voxel limit."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class and getattr(ds, "file_meta", None) is not None:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))  # e.g. a DICOMDIR
    if forced and not sop_class:
        raise ScanError(path, "not a DICOM file (no DICM preamble and no SOP Class UID)")
    if "Rows" not in ds or "Columns" not in ds:
        if not sop_class or _is_image_sop(sop_class):
            raise ScanError(
                path,
                f"truncated / not a complete DICOM file ({size} bytes; the header ends before "
                "Rows/Columns and the pixel data)",
            )
        raise ScanError(path, f"not an image: SOP class {_sop_name(sop_class)} has no pixel data")
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.481"):  # RT dose/plan/struct ...
        raise ScanError(path, f"not an MR/CT image: SOP class {_sop_name(sop_class)}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        photometric = str(ds.get("PhotometricInterpretation", "")) or "colour"
        raise ScanError(path, f"colour image ({photometric}, {_sop_name(sop_class)}): not a greyscale scan")
    rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    if min(rows, cols, frames) <= 0:
        raise ScanError(path, f"image has a zero-length axis (Rows {rows}, Columns {cols}, frames {frames})")
    check_voxels(path, (cols, rows, frames), (int(ds.get("BitsAllocated", 16) or 16) + 7) // 8)
    _check_pixel_data(path, ds, fh_size=size, offset=pixel_offset)


def _is_image_sop(uid: str) -> bool:
    """True for image storage SOP classes (MR, CT, enhanced, secondary capture ...)."""
    from pydicom.uid import UID

    return "Image" in UID(uid).name


def _sop_name(uid: str) -> str:
    """Readable SOP class name, e.g. 'RT Structure Set Storage'."""
    from pydicom.uid import UID

    if not uid:
        return "(missing SOP Class UID)"
    name = UID(uid).name
    return f"'{name}'" if name != uid else uid


def _check_pixel_data(path: Path, ds, fh_size: int, offset: int) -> None:
    """Raise ScanError when the pixel data element is missing or shorter than the header promises."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if tsyntax == _DEFLATED:
        return  # positions refer to the inflated stream; decoding will tell
    if offset >= fh_size:
        raise ScanError(path, "no pixel data (file ends after the header)")
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(12)
    if len(head) < 8:
        raise ScanError(path, "truncated file: pixel data element is cut off")
    implicit, little = ds.original_encoding
    end = "<" if little is not False else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group, elem) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        raise ScanError(path, f"no pixel data (found tag ({group:04X},{elem:04X}) where pixels should start)")
    if not implicit and head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OV", b"OL"):
        if len(head) < 12:
            raise ScanError(path, "truncated file: pixel data element is cut off")
        length, header_len = struct.unpack(end + "I", head[8:12])[0], 12
    else:
        length, header_len = struct.unpack(end + "I", head[4:8])[0], 8
    if length == 0xFFFFFFFF:
        return  # encapsulated (compressed): decoding checks it
    bits = int(ds.get("BitsAllocated", 16) or 16)
    expected = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1) or 1)
        * int(ds.get("NumberOfFrames", 1) or 1)
        * bits
        // 8
    )
    available = fh_size - offset - header_len
    if available < min(length, expected):
        raise ScanError(path, f"truncated file: pixel data has {max(available, 0)} of {expected} bytes")
    if length < expected:
        raise ScanError(path, f"pixel data too short: {length} of {expected} bytes")


# ----------------------------------------------------------------------------------------------- grouping
@dataclass
class DicomGroup:
    """Files (or frames of one enhanced file) that make exactly one 3D volume."""

    files: list[Path]
    headers: list[Any]
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    problems: list[str] = field(default_factory=list)
    enhanced: bool = False
    frames: list[int] | None = None  # enhanced: 0-based frame numbers of this volume
    sub_index: int | None = None  # which split of the series (None when the series is one volume)
    notes: list[str] = field(default_factory=list)  # non-fatal problems (e.g. pydicom's warnings)


def _is_enhanced(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(t in ("LOCALIZER", "SCOUT") for t in image_type)


def _orientation_key(iop) -> tuple[float, ...] | None:
    try:
        if iop is None or len(iop) != 6:
            return None
        return tuple(round(float(v), _ORIENT_DECIMALS) + 0.0 for v in iop)
    except (TypeError, ValueError, OverflowError):
        return None


def _group_notes(files: list[Path], notes: dict[Path, list[str]] | None) -> list[str]:
    """The files' non-fatal problems, each once, with how many files it concerns."""
    if not notes:
        return []
    counts: dict[str, int] = defaultdict(int)
    for f in files:
        for note in notes.get(f, []):
            counts[note] += 1
    n = len(files)
    return [note if n == 1 else f"{note} in {c} of {n} files" for note, c in counts.items()]


def group_headers(
    items: list[tuple[Path, Any]], notes: dict[Path, list[str]] | None = None
) -> list[DicomGroup]:
    """Split headers into one group per volume: series, then orientation, echo, size, acquisition.

    Localizer/scout images are dropped (reported in a group with only problems); enhanced files are
    split into their volumes by frame. ``notes`` (per file, from ``read_header``) become each group's
    non-fatal ``notes``.
    """
    groups = _group_headers(items)
    for group in groups:
        group.notes = _group_notes(group.files, notes)
    return groups


def _group_headers(items: list[tuple[Path, Any]]) -> list[DicomGroup]:
    """``group_headers`` without notes."""
    by_series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    groups: list[DicomGroup] = []
    for path, ds in items:
        if _is_enhanced(ds):
            groups.extend(_enhanced_groups(path, ds))
        else:
            by_series[str(ds.get("SeriesInstanceUID", "")) or f"(no series uid) {path.parent}"].append(
                (path, ds)
            )
    for uid, members in by_series.items():
        first = members[0][1]
        base = {
            "series_uid": uid,
            "series_number": _int_or_none(first.get("SeriesNumber")),
            "description": str(first.get("SeriesDescription", "") or ""),
            "modality": str(first.get("Modality", "") or ""),
        }
        localizers = [(p, d) for p, d in members if _is_localizer(d)]
        images = [(p, d) for p, d in members if not _is_localizer(d)]
        if localizers:
            groups.append(
                DicomGroup(
                    [p for p, _ in localizers],
                    [d for _, d in localizers],
                    problems=[f"localizer/scout images skipped ({len(localizers)} file(s))"],
                    **base,
                )
            )
        splits: dict[tuple, list[tuple[Path, Any]]] = defaultdict(list)
        for p, d in images:
            key = (
                _orientation_key(d.get("ImageOrientationPatient")),
                str(d.get("EchoNumbers", "")),
                _float_or_none(d.get("EchoTime"), 3),
                _int_or_none(d.get("Rows")),
                _int_or_none(d.get("Columns")),
            )
            splits[key].append((p, d))
        parts: list[list[tuple[Path, Any]]] = []
        for key in sorted(splits, key=str):
            parts.extend(_split_repeated_positions(splits[key]))
        for n, part in enumerate(parts):
            groups.append(
                DicomGroup(
                    [p for p, _ in part],
                    [d for _, d in part],
                    sub_index=n if len(parts) > 1 else None,
                    problems=_duplicate_uids([d for _, d in part]),
                    **base,
                )
            )
    return groups


def _duplicate_uids(headers: list[Any]) -> list[str]:
    """A problem when several files of one volume carry the same SOP Instance UID (copies of one image)."""
    uids = [str(d.get("SOPInstanceUID", "")) for d in headers]
    counts: dict[str, int] = defaultdict(int)
    for uid in uids:
        if uid:
            counts[uid] += 1
    repeated = sum(c for c in counts.values() if c > 1)
    if not repeated:
        return []
    shared = sum(c > 1 for c in counts.values())
    return [
        f"duplicate SOP Instance UIDs: {repeated} files share {shared} UID(s) (copies of the same image?)"
    ]


def _float_or_none(value, decimals: int) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, decimals) if np.isfinite(v) else None


def _split_repeated_positions(members: list[tuple[Path, Any]]) -> list[list[tuple[Path, Any]]]:
    """When slice positions repeat, split by acquisition / temporal position (time series, repeats)."""
    positions = [_position_key(d.get("ImagePositionPatient")) for _, d in members]
    if len(set(positions)) == len(positions):
        return [members]
    for attr in ("AcquisitionNumber", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue"):
        by: dict[str, list] = defaultdict(list)
        for p, d in members:
            by[str(d.get(attr, ""))].append((p, d))
        if len(by) > 1:
            return [by[k] for k in sorted(by, key=lambda s: (len(s), s))]
    return [members]


def _position_key(ipp) -> tuple:
    """Rounded ImagePositionPatient (a unique placeholder when it is missing or malformed)."""
    try:
        return tuple(np.round(np.asarray(list(ipp), float), 3)) if ipp is not None and len(ipp) == 3 else ()
    except (TypeError, ValueError):
        return ()


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


# ----------------------------------------------------------------------------------------------- geometry
def stack_geometry(
    iop, pixel_spacing, positions: list, thickness: float | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Slice order (by position along the normal) and RAS affine of a stack of parallel slices.

    Returns ``(order, affine_ras, problems)``; problems are fatal for building a volume
    (missing geometry, repeated positions, missing slices, non-uniform spacing).
    """
    problems: list[str] = []
    n = len(positions)
    if (
        iop is None
        or len(iop) != 6
        or pixel_spacing is None
        or len(pixel_spacing) != 2
        or any(p is None or len(p) != 3 for p in positions)
    ):
        problem = "missing plane geometry (ImageOrientationPatient, ImagePositionPatient or PixelSpacing)"
        return np.arange(n), np.eye(4), [problem]
    try:
        row = np.asarray([float(v) for v in iop[:3]])
        col = np.asarray([float(v) for v in iop[3:]])
        ps = [float(v) for v in pixel_spacing]
        pos = np.asarray([[float(v) for v in p] for p in positions])
    except (TypeError, ValueError):
        return np.arange(n), np.eye(4), ["plane geometry values are not numbers"]
    problem = _plane_problem(row, col, ps, pos)
    if problem:
        return np.arange(n), np.eye(4), [problem]
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    pos, dist = pos[order], dist[order]
    if n > 1:
        step = (pos[-1] - pos[0]) / (n - 1)
        gaps = np.diff(dist)
        if np.any(gaps < 1e-4):
            problems.append(
                f"{int(np.sum(gaps < 1e-4)) + 1} slices share a position (several volumes mixed?)"
            )
        else:
            median = float(np.median(gaps))
            tol = max(0.02 * median, 0.01)
            big = gaps > median + max(0.5 * median, tol)
            if np.any(big):
                missing = int(np.sum(np.round(gaps[big] / median) - 1))
                where = ", ".join(f"{dist[i]:.2f}..{dist[i + 1]:.2f} mm" for i in np.flatnonzero(big)[:3])
                problems.append(
                    f"missing slice(s): about {max(missing, 1)} absent between {where} along the normal"
                )
            elif np.max(np.abs(gaps - median)) > tol:
                problems.append(f"non-uniform slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm)")
            line = pos[0] + np.arange(n)[:, None] * step
            if not problems and np.max(np.linalg.norm(pos - line, axis=1)) > max(0.02 * median, 0.01):
                problems.append("slice positions do not lie on a straight line")
    else:
        step = normal * float(thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]  # i runs along a row: spacing between columns
    lps[:3, 1] = col * ps[0]  # j runs down a column: spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    affine = LPS_TO_RAS @ lps
    if not problems:
        bad = geometry_problem(affine)
        if bad and "not orthonormal" in bad:
            bad = f"slices are stacked at an angle to their plane (gantry tilt?): {bad}"
        if bad:
            problems.append(bad)
    return order, affine, problems


def _plane_problem(row: np.ndarray, col: np.ndarray, spacing: list[float], pos: np.ndarray) -> str | None:
    """Why plane geometry values cannot place a slice.

    Non-finite values, non-positive spacing, bad direction cosines.
    """
    if not (np.all(np.isfinite(row)) and np.all(np.isfinite(col)) and np.all(np.isfinite(pos))):
        return "ImageOrientationPatient or ImagePositionPatient contains NaN or Inf"
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        return f"PixelSpacing must be positive, got {[round(v, 6) for v in spacing]}"
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if min(nr, nc) < 1e-6:
        return "ImageOrientationPatient has a zero-length direction"
    if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01:
        return f"ImageOrientationPatient directions are not unit vectors (lengths {nr:.4f}, {nc:.4f})"
    cos = float(row @ col) / (nr * nc)
    if abs(cos) > ORTHOGONALITY_TOLERANCE:
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        return f"ImageOrientationPatient row and column are not orthogonal ({angle:.2f}° apart)"
    return None


def classic_geometry(group: DicomGroup) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Order, RAS affine and problems of a classic series group (headers only)."""
    heads = group.headers
    first = heads[0]
    iops = {_orientation_key(d.get("ImageOrientationPatient")) for d in heads}
    problems: list[str] = []
    if len(iops) > 1:
        problems.append("slices have different orientations")
    spacings = {tuple(round(float(v), 4) for v in (d.get("PixelSpacing") or [])) for d in heads}
    if len(spacings) > 1:
        problems.append("slices have different pixel spacings")
    if any("MOSAIC" in [str(v).upper() for v in (d.get("ImageType") or [])] for d in heads):
        problems.append(
            "Siemens mosaic (ImageType MOSAIC): the slices tiled in each image are not unpacked, so the "
            "header geometry would be wrong; convert with dcm2niix first"
        )
        return np.arange(len(heads)), np.eye(4), problems
    if any((_int_or_none(d.get("NumberOfFrames")) or 1) > 1 for d in heads):
        problems.append("multi-frame file without functional groups (not an enhanced image): unsupported")
    thickness = _float_or_none(first.get("SpacingBetweenSlices"), 9) or _float_or_none(
        first.get("SliceThickness"), 9
    )
    order, affine, geo = stack_geometry(
        first.get("ImageOrientationPatient"),
        first.get("PixelSpacing"),
        [d.get("ImagePositionPatient") for d in heads],
        thickness,
    )
    return order, affine, problems + geo


def _fg(ds, frame_item, seq: str, attr: str):
    """Functional-group attribute: the per-frame item first, then the shared one."""
    for holder in (frame_item, _shared(ds)):
        if holder is not None and seq in holder and len(holder[seq].value):
            item = holder[seq].value[0]
            if attr in item:
                return item[attr].value
    return None


def _shared(ds):
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _enhanced_groups(path: Path, ds) -> list[DicomGroup]:
    """Split an enhanced multi-frame file into volumes by orientation, echo, time and stack."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    base = {
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "description": str(ds.get("SeriesDescription", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
    }
    if len(per_frame) != n_frames:
        return [
            DicomGroup(
                [path],
                [ds],
                enhanced=True,
                frames=list(range(n_frames)),
                problems=[
                    f"enhanced file: {len(per_frame)} per-frame functional groups for {n_frames} frames"
                ],
                **base,
            )
        ]
    missing = [
        i
        for i, item in enumerate(per_frame)
        if _fg(ds, item, "PlanePositionSequence", "ImagePositionPatient") is None
        or _fg(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient") is None
        or _fg(ds, item, "PixelMeasuresSequence", "PixelSpacing") is None
    ]
    if missing:
        problem = (
            f"enhanced file: plane geometry (position/orientation/pixel spacing) missing for "
            f"{len(missing)} of {n_frames} frames; refusing to invent it"
        )
        return [
            DicomGroup([path], [ds], enhanced=True, frames=list(range(n_frames)), problems=[problem], **base)
        ]
    splits: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(per_frame):
        key = (
            _orientation_key(_fg(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient")),
            str(_fg(ds, item, "MREchoSequence", "EffectiveEchoTime")),
            str(_fg(ds, item, "FrameContentSequence", "TemporalPositionIndex")),
            str(_fg(ds, item, "FrameContentSequence", "StackID")),
            str(_fg(ds, item, "MRDiffusionSequence", "DiffusionBValue")),
        )
        splits[key].append(i)
    keys = sorted(splits, key=str)
    groups = []
    for n, key in enumerate(keys):
        groups.append(
            DicomGroup(
                [path],
                [ds],
                enhanced=True,
                frames=splits[key],
                sub_index=n if len(keys) > 1 else None,
                **base,
            )
        )
    return groups


def enhanced_geometry(group: DicomGroup) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Order (of ``group.frames``), RAS affine and problems of an enhanced-file volume."""
    ds = group.headers[0]
    if group.problems:
        return np.arange(len(group.frames or [])), np.eye(4), []
    per_frame = ds.PerFrameFunctionalGroupsSequence
    items = [per_frame[i] for i in group.frames]
    first = items[0]
    thickness = _fg(ds, first, "PixelMeasuresSequence", "SpacingBetweenSlices") or _fg(
        ds, first, "PixelMeasuresSequence", "SliceThickness"
    )
    return stack_geometry(
        _fg(ds, first, "PlaneOrientationSequence", "ImageOrientationPatient"),
        _fg(ds, first, "PixelMeasuresSequence", "PixelSpacing"),
        [_fg(ds, it, "PlanePositionSequence", "ImagePositionPatient") for it in items],
        _float_or_none(thickness, 9),
    )


def group_geometry(group: DicomGroup) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Order, RAS affine and problems of any group, from headers only."""
    if group.enhanced:
        return enhanced_geometry(group)
    return classic_geometry(group)


def group_shape(group: DicomGroup) -> tuple[int, int, int]:
    """(columns, rows, slices) — the Volume shape; frames of multi-frame files count as slices."""
    ds = group.headers[0]
    if group.enhanced and group.frames is not None:
        n = len(group.frames)
    else:
        n = sum(max(_int_or_none(d.get("NumberOfFrames")) or 1, 1) for d in group.headers)
    return (int(ds.Columns), int(ds.Rows), n)


def check_group_size(group: DicomGroup, where: Path, max_voxels: int | None = None) -> None:
    """ScanTooLargeError when rows × columns × frames × files exceeds the voxel limit (headers only)."""
    ds = group.headers[0]
    bits = _int_or_none(ds.get("BitsAllocated")) or 16
    check_voxels(where, group_shape(group), (bits + 7) // 8, limit=max_voxels)


# ----------------------------------------------------------------------------------------------- pixels
def _rescale(arr: np.ndarray, slope, intercept) -> np.ndarray:
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    arr = arr.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        arr = arr * np.float32(slope) + np.float32(intercept)
    return arr


def decode_file(path: Path, notes: list[str] | None = None):
    """Full read + pixel decode of one file; ScanError naming the transfer syntax on failure.

    pydicom's warnings are not printed; they are appended to ``notes`` as problems.
    """
    import pydicom

    ds = None
    try:
        with pydicom_messages() as messages:
            ds = pydicom.dcmread(path, force=True)
            arr = ds.pixel_array
        if notes is not None:
            notes.extend(warning_problems(messages))
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types; name the file instead
        ts = ""
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            ts = meta.TransferSyntaxUID.name
        raise ScanError(
            path, f"pixel data could not be decoded{f' ({ts})' if ts else ''}: {type(exc).__name__}: {exc}"
        ) from None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ScanError(path, "colour image (SamplesPerPixel > 1): not a greyscale scan")
    return ds, arr


def load_group(
    group: DicomGroup,
    root_path: Path | None = None,
    *,
    allow_nonfinite: bool = False,
    max_voxels: int | None = None,
) -> Volume:
    """Decode the pixels of a group into a Volume (RAS affine); ScanError if its geometry has problems.

    The size declared by the headers is checked against the voxel limit before any pixel is decoded.
    NaN/Inf voxels (float pixel data, a non-finite rescale) are refused unless ``allow_nonfinite``.
    Non-fatal problems (the group's notes, pydicom's warnings while decoding) go to ``meta['problems']``.
    """
    notes: list[str] = []
    where = _where(group, root_path)
    with pydicom_messages() as messages:
        try:
            vol = _load_group(group, where, notes, max_voxels)
        except ScanError:
            raise
        except (
            ValueError, TypeError, IndexError, AttributeError, KeyError, OverflowError, NotImplementedError
        ) as exc:
            raise ScanError(where, f"malformed DICOM header values ({type(exc).__name__}: {exc})") from None
    problems = list(dict.fromkeys(group.notes + notes + warning_problems(messages)))
    vol.meta["problems"] = problems
    return check_volume(vol, where, allow_nonfinite=allow_nonfinite)


def _where(group: DicomGroup, root_path: Path | None) -> Path:
    """The path that names a group in messages: the given root, the file, or the series folder."""
    return root_path or (group.files[0].parent if len(group.files) > 1 else group.files[0])


def _load_group(group: DicomGroup, where: Path, notes: list[str], max_voxels: int | None) -> Volume:
    """``load_group`` without the collection of pydicom's messages."""
    if group.problems:
        raise ScanError(where, "; ".join(group.problems))
    order, affine, problems = group_geometry(group)
    if problems:
        raise ScanError(where, "; ".join(problems))
    check_group_size(group, where, max_voxels)
    frame_numbers: list[int] | None = None
    if group.enhanced:
        path = group.files[0]
        ds, arr = decode_file(path, notes)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if arr.size != n_frames * int(ds.Rows) * int(ds.Columns):
            raise ScanError(
                path, f"decoded {arr.shape} pixels for {n_frames} frame(s) of {ds.Rows}×{ds.Columns}"
            )
        arr = arr.reshape((n_frames,) + arr.shape[-2:])
        per_frame = ds.PerFrameFunctionalGroupsSequence
        frames = [group.frames[i] for i in order]
        slices = [
            _rescale(
                arr[f],
                _fg(ds, per_frame[f], "PixelValueTransformationSequence", "RescaleSlope"),
                _fg(ds, per_frame[f], "PixelValueTransformationSequence", "RescaleIntercept"),
            )
            for f in frames
        ]
        header = ds
        sop_uids = [str(ds.get("SOPInstanceUID", ""))] * len(frames)
        frame_numbers = [f + 1 for f in frames]  # DICOM frame numbers are 1-based
        files = [str(path)]
    else:
        slices, sop_uids, header = [], [], None
        files = [str(group.files[i]) for i in order]
        for i in order:
            ds, arr = decode_file(group.files[i], notes)
            if arr.ndim != 2 or arr.shape != (int(ds.Rows), int(ds.Columns)):
                raise ScanError(group.files[i], f"expected a 2D slice, decoded shape {arr.shape}")
            if slices and arr.shape != slices[0].shape:
                raise ScanError(group.files[i], f"slice shape {arr.shape} differs from {slices[0].shape}")
            slices.append(_rescale(arr, ds.get("RescaleSlope"), ds.get("RescaleIntercept")))
            sop_uids.append(str(ds.get("SOPInstanceUID", "")))
            if header is None:
                header = ds
        header = _header_only(header)
    data = np.stack([s.T for s in slices], axis=-1).astype(np.float32)  # (columns, rows, slices)
    meta = {
        "modality": group.modality,
        "series_uid": group.series_uid,
        "series_number": group.series_number,
        "description": group.description,
        "source_files": files,
        "dicom_header": _header_only(header) if group.enhanced else header,
        "source_sop_instance_uids": sop_uids,
        "source_sop_class_uid": str(header.get("SOPClassUID", "")),
        "problems": [],
    }
    if frame_numbers is not None:
        meta["source_frame_numbers"] = frame_numbers
    if group.sub_index is not None:
        meta["index"] = group.sub_index
    return Volume(data, affine, meta)


def _header_only(ds):
    """A copy of the dataset without pixel data (kept in Volume.meta to write derived series)."""
    if ds is None:
        return None
    out = ds.copy()
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in out:
            del out[tag]
    if "PerFrameFunctionalGroupsSequence" in out:
        del out["PerFrameFunctionalGroupsSequence"]
    return out


def read_dicom_files(
    files: list[str | Path],
    root_path: Path | None = None,
    *,
    allow_nonfinite: bool = False,
    max_voxels: int | None = None,
) -> list[Volume]:
    """Read the given files as DICOM; one Volume per volume-group found (ScanError on any bad file)."""
    notes: dict[Path, list[str]] = defaultdict(list)
    items = [(Path(f), read_header(f, notes[Path(f)])) for f in files]
    with pydicom_messages():
        found = group_headers(items, notes)
    groups = [
        g for g in found if not (g.problems and not g.enhanced and g.headers and _is_localizer(g.headers[0]))
    ]
    if not groups:
        raise ScanError(root_path or Path(files[0]), "no image volume (only localizers?)")
    return [load_group(g, root_path, allow_nonfinite=allow_nonfinite, max_voxels=max_voxels) for g in groups]
