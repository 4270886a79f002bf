"""Reading and writing scans: DICOM, NIfTI, fastMRI k-space HDF5."""

from medidiff.io.dicom_write import write_dicom_series
from medidiff.io.discover import ScanSource, discover, read_scan
from medidiff.io.errors import ScanError, ScanTooLargeError
from medidiff.io.kspace import KSpaceData, read_kspace, write_kspace
from medidiff.io.limits import DEFAULT_MAX_VOXELS, ENV_MAX_VOXELS, max_voxels, set_max_voxels
from medidiff.io.nifti import read_nifti, write_nifti
from medidiff.io.volume import Volume, check_volume, geometry_problem

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "ENV_MAX_VOXELS",
    "KSpaceData",
    "ScanError",
    "ScanSource",
    "ScanTooLargeError",
    "Volume",
    "check_volume",
    "discover",
    "geometry_problem",
    "max_voxels",
    "read_kspace",
    "read_nifti",
    "read_scan",
    "set_max_voxels",
    "write_dicom_series",
    "write_kspace",
    "write_nifti",
]
