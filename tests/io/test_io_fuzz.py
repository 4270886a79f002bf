"""Property-based fuzzing of the readers: mutated headers and truncations of valid DICOM, NIfTI and HDF5
files made here. Every outcome is a sound Volume / k-space or a ScanError naming the file.

Profiles (``MEDIDIFF_FUZZ_PROFILE``): ``short`` (default, 50 examples per property, part of the normal
suite) and ``long`` (2000 examples, ``make fuzz``).
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from medidiff.io import ScanError, read_kspace, read_nifti, read_scan
from medidiff.io.dicom_read import read_dicom_files
from tests.io.badinput import (
    NIFTI_FIELDS,
    assert_sound,
    dicom_bytes,
    dicom_dataset,
    ismrmrd_xml,
    kspace_file,
    nifti_bytes,
)

settings.register_profile(
    "short", max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("MEDIDIFF_FUZZ_PROFILE", "short"))

# Small limit so that headers claiming huge sizes are refused instead of allocated.
LIMIT = 2**22

_NIFTI = bytes(nifti_bytes(np.random.default_rng(1).random((6, 5, 4), dtype=np.float32)))
_DICOM = dicom_bytes(dicom_dataset(rows=12, cols=10))
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
INT16 = st.integers(-(2**15), 2**15 - 1)


def _check(read, path: Path, original: bytes) -> None:
    try:
        result = read(path)
    except ScanError as exc:
        assert exc.problem and path.name in str(exc)
        event(f"refused: {exc.problem.split('(')[0][:40]}")
    else:
        for item in result if isinstance(result, list) else [result]:
            assert_sound(item, path)
        event("read")
    if original is not None:
        assert path.read_bytes() == original


def _field_values(field: str):
    _, fmt = NIFTI_FIELDS[field]
    count = int(fmt[:-1]) if fmt[:-1] else 1
    kind = fmt[-1]
    if kind == "s":
        return st.tuples(st.binary(min_size=count, max_size=count))
    element = FLOATS if kind == "f" else INT16 if kind == "h" else st.integers(-(2**31), 2**31 - 1)
    return st.lists(element, min_size=count, max_size=count).map(tuple)


nifti_edit = st.sampled_from(sorted(NIFTI_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), _field_values(f)))


@given(
    edits=st.lists(nifti_edit, min_size=1, max_size=4),
    cut=st.none() | st.integers(0, len(_NIFTI)),
    zipped=st.booleans(),
)
def test_fuzz_nifti_header_and_truncation(edits, cut, zipped) -> None:
    buf = bytearray(_NIFTI)
    for field, values in edits:
        offset, fmt = NIFTI_FIELDS[field]
        struct.pack_into("<" + fmt, buf, offset, *values)
    raw = bytes(buf[:cut] if cut is not None else buf)
    if zipped:
        raw = gzip.compress(raw, mtime=0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.nii.gz" if zipped else "f.nii")
        path.write_bytes(raw)
        _check(lambda p: read_nifti(p, 0 if _is4d(buf) else None, max_voxels=LIMIT), path, raw)


def _is4d(buf: bytearray) -> bool:
    ndim = struct.unpack_from("<h", buf, 40)[0]
    return ndim > 3


@given(
    flips=st.lists(st.tuples(st.integers(0, len(_DICOM) - 1), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, len(_DICOM)),
)
def test_fuzz_dicom_bytes(flips, cut) -> None:
    buf = bytearray(_DICOM)
    for pos, value in flips:
        buf[pos] = value
    raw = bytes(buf[:cut] if cut is not None else buf)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "IM0001"
        path.write_bytes(raw)
        _check(lambda p: read_dicom_files([p], max_voxels=LIMIT), path, raw)


_DICOM_VALUES = {
    "PixelSpacing": st.lists(
        st.sampled_from(["0.9", "-1", "0", "nan", "1e308", "abc", ""]), min_size=0, max_size=3
    ),
    "ImageOrientationPatient": st.lists(
        st.sampled_from(["1", "0", "-1", "0.5", "nan", "inf", "1e-9", "x"]), min_size=0, max_size=7
    ),
    "ImagePositionPatient": st.lists(
        st.sampled_from(["0", "-5.5", "nan", "1e300", "q"]), min_size=0, max_size=4
    ),
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "NumberOfFrames": st.sampled_from(["1", "0", "10", "-3", "abc", "4294967295"]),
    "RescaleSlope": st.sampled_from(["1", "0", "nan", "inf", "-2.5", "x"]),
    "BitsAllocated": st.sampled_from([1, 8, 16, 32, 64, 0, 3]),
    "SamplesPerPixel": st.sampled_from([1, 3, 0]),
    "SliceThickness": st.sampled_from(["2", "0", "-1", "nan"]),
}


@given(
    edits=st.sets(st.sampled_from(sorted(_DICOM_VALUES)), min_size=1, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: _DICOM_VALUES[k] for k in sorted(keys)})
    ),
    n=st.integers(1, 3),
)
def test_fuzz_dicom_header_values(edits, n) -> None:
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for k in range(n):
            ds = dicom_dataset(rows=12, cols=10, position=(0.0, 0.0, 2.0 * k), series_uid="1.2.3.9")
            for key, value in edits.items():
                _set_raw(ds, key, value)
            raw = dicom_bytes(ds)
            path = Path(d) / f"IM{k}"
            path.write_bytes(raw)
            paths.append((path, raw))
        _check(lambda p: read_scan(p, max_voxels=LIMIT), Path(d), None)  # the folder: discover + load
        for path, raw in paths:
            assert path.read_bytes() == raw


def _set_raw(ds, keyword: str, value) -> None:
    """Store ``value`` as the element's encoded bytes, unchecked (what a broken writer would produce)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    if isinstance(value, list):
        value = "\\".join(value)
    if isinstance(value, int):
        data = struct.pack("<H", value)
    else:
        data = str(value).encode("latin-1")
        data += b" " * (len(data) % 2)
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


@given(
    shape=st.lists(st.integers(0, 9), min_size=2, max_size=5),
    dtype=st.sampled_from(["complex64", "complex128", "float32", "int16"]),
    fill=st.sampled_from(["random", "zero", "nan", "inf"]),
    header=st.none() | st.sampled_from(["good", "abc", "<x>", "", "\x00\xff", "neg", "huge"]),
    affine=st.none() | st.sampled_from(["good", "nan", "zero", "shape"]),
    cut=st.none() | st.floats(0, 1),
)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_fuzz_kspace_hdf5(shape, dtype, fill, header, affine, cut) -> None:
    rng = np.random.default_rng(0)
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex128)
    if fill == "zero":
        k[...] = 0
    elif fill != "random" and k.size:
        k.flat[0] = np.nan if fill == "nan" else np.inf
    k = k.astype(dtype) if "complex" in dtype else k.real.astype(dtype)
    xml = {
        None: None,
        "good": ismrmrd_xml(),
        "abc": ismrmrd_xml(x="abc"),
        "neg": ismrmrd_xml(fov="-3"),
        "huge": ismrmrd_xml(x="1e400"),
    }.get(header, header)
    attrs = {}
    if affine == "good":
        attrs["affine"] = np.eye(4)
    elif affine == "nan":
        attrs["affine"] = np.full((4, 4), np.nan)
    elif affine == "zero":
        attrs["affine"] = np.zeros((4, 4))
    elif affine == "shape":
        attrs["affine"] = np.eye(3)
    with tempfile.TemporaryDirectory() as d:
        path = kspace_file(Path(d) / "k.h5", kspace=k, header=xml, **attrs)
        raw = path.read_bytes()
        if cut is not None:
            raw = raw[: int(len(raw) * cut)]
            path.write_bytes(raw)
        _check(lambda p: read_kspace(p, max_voxels=LIMIT), path, raw)
