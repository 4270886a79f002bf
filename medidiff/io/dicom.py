"""DICOM in one import: reading lives in ``dicom_read``, derived-series writing in ``dicom_write``."""

from medidiff.io.dicom_read import (
    DicomGroup,
    decode_file,
    group_headers,
    load_group,
    read_dicom_files,
    read_header,
)
from medidiff.io.dicom_write import quantise, write_dicom_series

__all__ = [
    "DicomGroup",
    "decode_file",
    "group_headers",
    "load_group",
    "quantise",
    "read_dicom_files",
    "read_header",
    "write_dicom_series",
]
