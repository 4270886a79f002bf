"""Reading and writing scans: DICOM, NIfTI, fastMRI k-space HDF5."""

from medidiff.io.volume import Volume

__all__ = ["Volume"]
