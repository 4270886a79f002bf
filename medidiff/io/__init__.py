"""Reading and writing scans: DICOM, NIfTI, fastMRI k-space HDF5.

Every reader either returns a sound result or raises ``ScanError`` (``.path``, ``.problem``) naming the
file and the problem; discovery never raises for a bad file and lists it as kind ``'invalid'``.
A sound Volume has no zero-length axis, a finite non-singular affine with orthonormal axes (a sheared
NIfTI sform, which the standard allows, is kept and recorded in ``meta['problems']``) and finite voxels
(``allow_nonfinite=True`` keeps NaN/Inf, recorded). k-space that is all zero or holds NaN/Inf is refused.
Complex NIfTI voxels are read as their magnitude, recorded in ``meta['complex']``.

Sizes declared by headers are checked before any voxel is read against the voxel limit of
``medidiff.io.limits`` (default 2**29 voxels = 2 GiB as float32; ``MEDIDIFF_MAX_VOXELS``,
``set_max_voxels`` or a reader's ``max_voxels`` argument); a scan over it raises ``ScanTooLargeError``.
"""

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
