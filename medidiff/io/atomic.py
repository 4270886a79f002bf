"""Atomic writes: write under a temporary name beside the target, then rename into place.

Every temporary file or folder medidiff creates is named ``.<target name>.medidiff-tmp-<random>[suffix]``,
so one test (:func:`is_temporary_name`) tells a restarted batch what a killed one left behind, and nothing
else in an output folder is ever mistaken for a temporary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARKER = ".medidiff-tmp-"
_MAX_NAME_PART = 100  # keep temporary names well under the 255-byte file-name limit


def is_temporary_name(name: str) -> bool:
    """True for the name of a temporary file or folder made by this module."""
    return name.startswith(".") and TEMP_MARKER in name


def _prefix(target: Path) -> str:
    return f".{target.name[:_MAX_NAME_PART]}{TEMP_MARKER}"


def _suffixes(name: str) -> str:
    """Keep '.nii.gz'-style double suffixes so writers that look at the name still work."""
    lower = name.lower()
    for double in (".nii.gz", ".tar.gz"):
        if lower.endswith(double):
            return name[-len(double) :]
    return Path(name).suffix


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` if the block succeeds.

    ``fsync=True`` flushes the file to disk before the rename (for records that must survive a power cut).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(target), suffix=_suffixes(target.name), dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically; returns ``target``."""
    with atomic_file(target, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``target`` atomically; returns ``target``."""
    with atomic_file(target, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(target)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` (whole or nothing) on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
    try:
        yield tmp
        if target.exists():
            old = _move_aside(target)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(target: str | Path) -> None:
    """Remove a file or folder; a folder is first renamed to a temporary name, so it vanishes at once."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(_move_aside(target), ignore_errors=True)
    else:
        target.unlink(missing_ok=True)


def _move_aside(target: Path) -> Path:
    """Rename ``target`` to a fresh temporary name in its folder; returns the new path."""
    aside = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    return aside
