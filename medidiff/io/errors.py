"""The one exception the io package raises for a scan it cannot read or write."""

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
