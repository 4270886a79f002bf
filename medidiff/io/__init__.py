"""Reading and writing scans: DICOM, NIfTI, fastMRI k-space HDF5."""

from medidiff.io.dicom_write import write_dicom_series
from medidiff.io.discover import ScanSource, discover, read_scan
from medidiff.io.errors import ScanError
from medidiff.io.kspace import KSpaceData, read_kspace, write_kspace
from medidiff.io.nifti import read_nifti, write_nifti
from medidiff.io.volume import Volume

__all__ = [
    "KSpaceData",
    "ScanError",
    "ScanSource",
    "Volume",
    "discover",
    "read_kspace",
    "read_nifti",
    "read_scan",
    "write_dicom_series",
    "write_kspace",
    "write_nifti",
]
