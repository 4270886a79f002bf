"""The memory limit every reader checks against what a header declares, before reading any voxels.

The limit is a number of voxels (default ``2**29`` = 536,870,912, i.e. 2 GiB as float32, the
precision scans are held in). A scan is refused when it declares more elements than that, or when its
elements, at their in-memory size (at least 4 bytes, 8 for complex64), would take more than
``limit * 4`` bytes. Set it per process with the ``MEDIDIFF_MAX_VOXELS`` environment variable
(inherited by decoding child processes; ``set_max_voxels`` writes it) or per call with a reader's
``max_voxels`` argument.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from medidiff.io.errors import ScanTooLargeError

ENV_MAX_VOXELS = "MEDIDIFF_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**29
_BYTES_PER_VOXEL = 4  # float32


def _parse(value: str | float) -> int:
    """A positive voxel count from an int or a string such as '600000000', '6e8' or '600_000_000'."""
    try:
        n = int(value) if isinstance(value, int) else int(float(str(value).strip().replace("_", "")))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"{ENV_MAX_VOXELS} / --max-voxels must be a positive integer, got {value!r}"
        ) from None
    if n <= 0:
        raise ValueError(f"{ENV_MAX_VOXELS} / --max-voxels must be a positive integer, got {value!r}")
    return n


def max_voxels(override: int | None = None) -> int:
    """The voxel limit in force: ``override`` if given, else ``$MEDIDIFF_MAX_VOXELS``, else the default."""
    if override is not None:
        return _parse(override)
    env = os.environ.get(ENV_MAX_VOXELS, "").strip()
    return _parse(env) if env else DEFAULT_MAX_VOXELS


def set_max_voxels(n: int | None) -> None:
    """Set the process-wide limit (``None`` restores the default); child processes inherit it."""
    if n is None:
        os.environ.pop(ENV_MAX_VOXELS, None)
    else:
        os.environ[ENV_MAX_VOXELS] = str(_parse(n))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_voxels(
    path: str | Path,
    shape: Iterable[int],
    itemsize: int = _BYTES_PER_VOXEL,
    *,
    what: str = "voxels",
    limit: int | None = None,
) -> int:
    """Raise ``ScanTooLargeError`` when ``shape`` declares more than the limit; return the element count.

    ``itemsize`` is the in-memory size of one element (values below 4 count as 4: voxels become float32).
    Arithmetic is in Python integers, so absurd header values cannot overflow.
    """
    dims = [int(s) for s in shape]
    n = math.prod(dims) if dims else 0
    cap = max_voxels(limit)
    nbytes = n * max(int(itemsize), _BYTES_PER_VOXEL)
    if n > cap or nbytes > cap * _BYTES_PER_VOXEL:
        shown = "×".join(str(d) for d in dims)
        raise ScanTooLargeError(
            path,
            f"declares {n:,} {what} ({shown}, {_gb(nbytes)}), more than the limit of {cap:,} voxels "
            f"({_gb(cap * _BYTES_PER_VOXEL)}); raise it with --max-voxels / {ENV_MAX_VOXELS}",
            voxels=n,
            nbytes=nbytes,
            limit=cap,
        )
    return n
