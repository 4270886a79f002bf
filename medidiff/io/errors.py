"""The exceptions the io package raises for a scan it cannot read or write.

Every one is a ``ScanError`` (catch that); ``ScanTooLargeError`` is the one kind callers may want to
tell apart, to suggest raising the voxel limit (see ``medidiff.io.limits``).
"""

from __future__ import annotations

from pathlib import Path


class ScanError(Exception):
    """A scan could not be read (or written); names the file and the problem.

    ``path`` is the file or series folder, ``problem`` a short human-readable reason
    (never patient data).
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # picklable across the decoding child process boundary
        return (type(self), (self.path, self.problem))


class ScanTooLargeError(ScanError):
    """A scan whose header declares more voxels than the memory limit allows; nothing was read.

    ``voxels`` is the declared element count, ``nbytes`` the memory it would take, ``limit`` the
    voxel limit in force.
    """

    def __init__(self, path: str | Path, problem: str, voxels: int = 0, nbytes: int = 0, limit: int = 0):
        super().__init__(path, problem)
        self.voxels, self.nbytes, self.limit = int(voxels), int(nbytes), int(limit)

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.voxels, self.nbytes, self.limit))
