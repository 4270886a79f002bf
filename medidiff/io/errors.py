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


def check_regular_file(path: str | Path, kind: str = "file") -> Path:
    """``path`` if it names a non-empty regular file this process can open; a ScanError naming the problem
    otherwise (``kind`` names what a folder was expected to be, e.g. "NIfTI file")."""
    path = Path(path)
    if not path.exists():
        raise ScanError(path, "file does not exist")
    if path.is_dir():
        raise ScanError(path, f"is a folder, not a {kind}")
    if not path.is_file():
        raise ScanError(path, "not a regular file (a device, socket or pipe)")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ScanError(path, f"cannot open file ({exc.strerror or exc})") from None
    if size == 0:
        raise ScanError(path, "empty file (0 bytes)")
    return path


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
