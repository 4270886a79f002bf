"""Walk a folder tree and list the scans in it, streaming: DICOM series, NIfTI volumes, k-space files.

Every unreadable file becomes a ``ScanSource`` of kind ``'invalid'`` whose ``problems`` say why —
discovery never raises for a bad file. DICOM headers are read with ``stop_before_pixels``; series are
grouped per folder (a series split across folders is listed once per folder).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.errors import ScanError, ScanTooLargeError
from medidiff.io.kspace import KSpaceData, is_hdf5_file, is_kspace_path, probe_kspace, read_kspace
from medidiff.io.nifti import is_nifti_path, read_nifti
from medidiff.io.volume import Volume

# Files that are never scans: skipped silently (outputs of our own tools, notes, pictures).
_SKIP_SUFFIXES = {
    ".json",
    ".txt",
    ".md",
    ".csv",
    ".tsv",
    ".yaml",
    ".yml",
    ".html",
    ".htm",
    ".py",
    ".log",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".svg",
    ".pdf",
    ".db",
    ".sqlite",
    ".ipynb",
    ".xml",
    ".bval",
    ".bvec",
    ".npy",
    ".npz",
    ".pt",
    ".safetensors",
    ".zip",
    ".gz",
    ".tar",
    ".lock",
    ".sh",
    ".toml",
    ".cfg",
    ".ini",
}
_SKIP_SUFFIXES |= {".rst", ".pyc", ".m", ".pkl", ".pickle"}
# Other imaging formats: listed as unsupported (with their name) instead of "not a DICOM file".
_OTHER_FORMATS = {
    ".par": "Philips PAR/REC",
    ".rec": "Philips PAR/REC",
    ".mnc": "MINC",
    ".mgz": "FreeSurfer MGH",
    ".mgh": "FreeSurfer MGH",
    ".hdr": "Analyze / NIfTI-pair header",
    ".head": "AFNI",
    ".brik": "AFNI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".trk": "TrackVis tractography",
    ".tck": "MRtrix tractography",
    ".v": "ECAT",
}
_SKIP_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION"}


@dataclass
class ScanSource:
    """One scan found on disk (or one unreadable file), with what is known about it before loading."""

    path: Path
    kind: str  # 'dicom' | 'nifti' | 'kspace' | 'invalid'
    files: list[Path]
    problems: list[str] = field(default_factory=list)
    description: str = ""
    index: int | None = None
    key: str = ""
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    modality: str = ""
    _group: Any = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        if self.affine is None:
            return None
        return tuple(float(s) for s in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))

    def load(self, *, allow_nonfinite: bool = False, max_voxels: int | None = None) -> Volume | KSpaceData:
        """Read the scan; raises ScanError (file and problem) when it cannot be read correctly.

        ``allow_nonfinite`` and ``max_voxels`` are passed to the reader (see ``read_nifti``).
        """
        if self.kind == "invalid":
            raise ScanError(self.path, "; ".join(self.problems) or "not a readable scan")
        if self.kind == "nifti":
            return read_nifti(self.path, self.index, allow_nonfinite=allow_nonfinite, max_voxels=max_voxels)
        if self.kind == "kspace":
            return read_kspace(self.path, allow_nonfinite=allow_nonfinite, max_voxels=max_voxels)
        if self.kind == "dicom":
            from medidiff.io.dicom_read import load_group

            return load_group(
                self._group, self.path, allow_nonfinite=allow_nonfinite, max_voxels=max_voxels
            )
        raise ScanError(self.path, f"unknown scan kind {self.kind!r}")

    def info(self) -> dict[str, Any]:
        """The JSON-ready summary used by ``medidiff info`` (strict JSON: a non-finite affine is null)."""
        problems = list(self.problems)
        affine = None if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        if affine is not None and not np.all(np.isfinite(affine)):
            affine = None
            if not any("NaN" in p for p in problems):
                problems.append("affine contains NaN or Inf")
        spacing = None if affine is None else np.linalg.norm(affine[:3, :3], axis=0)
        return {
            "path": str(self.path),
            "kind": self.kind,
            "shape": list(self.shape) if self.shape is not None else None,
            "spacing": [round(float(s), 6) for s in spacing] if spacing is not None else None,
            "affine": affine.round(6).tolist() if affine is not None else None,
            "modality": self.modality or None,
            "description": self.description,
            "n_files": len(self.files),
            "problems": problems,
        }


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    return rel if rel not in ("", ".") else ""


def _file_key(path: Path, root: Path, index: int | None = None) -> str:
    rel = _rel(path, root) or path.name
    return rel if index is None else f"{rel}-vol{index}"


def _invalid(path: Path, root: Path, problem: str) -> ScanSource:
    return ScanSource(
        path=path,
        kind="invalid",
        files=[path],
        problems=[problem],
        description=path.name,
        key=_file_key(path, root),
    )


def _nifti_sources(path: Path, root: Path) -> Iterator[ScanSource]:
    """One source per 3D volume of a NIfTI file (problems include NaN/Inf and a bad affine)."""
    from medidiff.io.nifti import probe_nifti

    try:
        volumes = probe_nifti(path)
    except ScanError as exc:
        yield _invalid(path, root, exc.problem)
        return
    for info in volumes:
        yield ScanSource(
            path=path,
            kind="nifti",
            files=[path],
            problems=info["problems"],
            description=info["description"],
            index=info["index"],
            key=_file_key(path, root, info["index"]),
            shape=info["shape"],
            affine=info["affine"],
            modality="MR",
        )


def _kspace_source(path: Path, root: Path) -> ScanSource:
    try:
        info = probe_kspace(path)
    except ScanError as exc:
        return _invalid(path, root, exc.problem)
    return ScanSource(
        path=path,
        kind="kspace",
        files=[path],
        problems=info["problems"],
        description=info["description"],
        key=_file_key(path, root),
        shape=info["shape"],
        affine=info["affine"],
        modality="MR",
    )


def _dicom_sources(
    folder: Path,
    items: list[tuple[Path, Any]],
    root: Path,
    notes: dict[Path, list[str]],
    single: bool = False,
) -> Iterator[ScanSource]:
    """Group one folder's headers into volumes and describe each from headers only."""
    from medidiff.io.dicom_read import (
        _is_localizer,
        check_group_size,
        group_headers,
        pydicom_messages,
        warning_problems,
    )

    with pydicom_messages():
        groups = group_headers(items, notes)
    for group in groups:
        if group.problems and not group.enhanced and _is_localizer(group.headers[0]):
            kind, shape, affine, problems = "invalid", None, None, list(group.problems)
        else:
            with pydicom_messages() as messages:
                affine, geo, shape = _header_geometry(group)
            size: list[str] = []
            if shape is not None:
                try:
                    check_group_size(group, folder)
                except ScanTooLargeError as exc:
                    size = [exc.problem]
            problems = list(group.problems) + geo + size + group.notes + warning_problems(messages)
            if any(
                w in p for p in problems for w in ("missing plane geometry", "refusing to invent", "mosaic")
            ):
                affine = None
            kind = "dicom"
        uid_hash = hashlib.sha1(group.series_uid.encode()).hexdigest()[:8]
        number = f"{group.series_number:04d}" if group.series_number is not None else "xxxx"
        rel = _rel(folder, root)
        name = f"series{number}-{uid_hash}"
        if group.enhanced:
            name += "-" + hashlib.sha1(str(group.files[0].name).encode()).hexdigest()[:6]
        if group.sub_index is not None:
            name += f"-part{group.sub_index}"
        if kind == "invalid":
            name += "-localizer"
        path = group.files[0] if group.enhanced or single else folder
        yield ScanSource(
            path=path,
            kind=kind,
            files=list(group.files),
            problems=problems,
            description=group.description,
            index=group.sub_index,
            key=f"{rel}/{name}" if rel else name,
            shape=shape,
            affine=affine,
            modality=group.modality,
            _group=group,
        )


def _header_geometry(group: Any) -> tuple[np.ndarray | None, list[str], tuple[int, int, int] | None]:
    """Affine, geometry problems and shape of a DICOM group from its headers (never raises)."""
    from medidiff.io.dicom_read import group_geometry, group_shape

    try:
        _, affine, geo = group_geometry(group)
        shape = group_shape(group)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:  # malformed values
        return None, [f"unreadable geometry ({type(exc).__name__}: {exc})"], None
    return affine, geo, shape


_GZIPPED_DICOM = (".dcm.gz", ".ima.gz", ".dicom.gz")


def _is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name in _SKIP_NAMES:
        return False
    if is_nifti_path(name) or name.lower().endswith(_GZIPPED_DICOM):
        return True
    return path.suffix.lower() not in _SKIP_SUFFIXES


def discover(root: str | Path) -> Iterator[ScanSource]:
    """Yield every scan (and every unreadable file or folder) under ``root``, folder by folder, sorted.

    The tree is walked iteratively (any depth), symbolic links to folders are not followed (no loops), and
    a folder that cannot be listed or a broken link is an ``'invalid'`` source naming the problem. A single
    file given as ``root`` is reported under its own path.
    """
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        raise ScanError(root, "path does not exist")
    if not root.is_dir():
        if not root.is_file():
            yield _invalid(root, root.parent, _not_a_file(root))
            return
        yield from _sources_for_files(root.parent, [root], root.parent, single=True)
        return
    for folder, files, error in _walk(root):
        if error:
            yield _invalid(folder, root, error)
            continue
        yield from _sources_for_files(folder, files, root)


def _not_a_file(path: Path) -> str:
    """The problem with a path that is neither a folder nor a regular file."""
    if path.is_symlink():
        return "broken symbolic link (its target is missing, or the link loops)"
    return "not a regular file (a device, socket or pipe)"


def _walk(root: Path) -> Iterator[tuple[Path, list[Path], str | None]]:
    """(folder, candidate files, listing error) for each folder under ``root``, depth first in sorted order.

    Iterative, so any depth works; hidden folders, ``__pycache__`` and links to folders are skipped.
    Broken links among the files are returned too (reported as invalid by the caller).
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield folder, [], f"cannot list folder ({exc.strerror or type(exc).__name__})"
            continue
        files: list[Path] = []
        folders: list[Path] = []
        for entry in entries:
            path = folder / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith(".") and entry.name != "__pycache__":
                        folders.append(path)
                elif (entry.is_file() or (entry.is_symlink() and not entry.is_dir())) and _is_candidate(path):
                    files.append(path)
            except OSError:
                if _is_candidate(path):
                    files.append(path)
        yield folder, files, None
        stack.extend(reversed(folders))


def _sources_for_files(
    folder: Path, files: list[Path], root: Path, single: bool = False
) -> Iterator[ScanSource]:
    """Sources of one folder's files; an unexpected failure on one file is that file's problem."""
    from medidiff.io.dicom_read import read_header

    headers: list[tuple[Path, Any]] = []
    notes: dict[Path, list[str]] = {}
    for path in files:
        try:
            if not path.is_file():
                yield _invalid(path, root, _not_a_file(path))
                continue
            other = _OTHER_FORMATS.get(path.suffix.lower())
            if other:
                yield _invalid(
                    path,
                    root,
                    f"unsupported format ({other}): medidiff reads DICOM, NIfTI and fastMRI k-space HDF5",
                )
            elif path.name.lower().endswith(_GZIPPED_DICOM):
                yield _invalid(path, root, "gzip-compressed DICOM file: decompress it (gunzip) to read it")
            elif is_nifti_path(path):
                yield from list(_nifti_sources(path, root))
            elif is_kspace_path(path) or is_hdf5_file(path):
                yield _kspace_source(path, root)
            else:
                notes[path] = []
                try:
                    headers.append((path, read_header(path, notes[path])))
                except ScanError as exc:
                    yield _invalid(path, root, exc.problem)
        except (ScanError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            problem = getattr(exc, "problem", None) or f"unreadable ({type(exc).__name__}: {exc})"
            yield _invalid(path, root, problem)
    if headers:
        try:
            found = list(_dicom_sources(folder, headers, root, notes, single=single))
        except (
            ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, NotImplementedError
        ) as exc:
            problem = f"DICOM headers could not be grouped ({type(exc).__name__}: {exc})"
            found = [_invalid(path, root, problem) for path, _ in headers]
        yield from found


def read_scan(
    path: str | Path, *, allow_nonfinite: bool = False, max_voxels: int | None = None
) -> Volume | KSpaceData:
    """Read one scan: a NIfTI file, a k-space file, a DICOM file or a folder holding exactly one scan.

    Every failure is a ScanError naming the path (``ScanTooLargeError`` for the voxel limit).
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(path, _not_a_file(path) if path.is_symlink() else "path does not exist")
    opts = {"allow_nonfinite": allow_nonfinite, "max_voxels": max_voxels}
    if path.is_file():
        if is_nifti_path(path):
            return read_nifti(path, **opts)
        if is_kspace_path(path) or is_hdf5_file(path):
            return read_kspace(path, **opts)
        from medidiff.io.dicom_read import read_dicom_files

        volumes = read_dicom_files([path], **opts)
        if len(volumes) != 1:
            raise ScanError(path, f"file holds {len(volumes)} volumes; use discover() to pick one")
        return volumes[0]
    if not path.is_dir():
        raise ScanError(path, _not_a_file(path))
    found = list(discover(path))
    sources = [s for s in found if s.kind != "invalid"]
    if not sources:
        why = "; ".join(f"{s.path.name}: {s.problems[0]}" for s in found[:3] if s.problems)
        raise ScanError(path, "no readable scan in this folder" + (f" ({why})" if why else ""))
    if len(sources) > 1:
        raise ScanError(path, f"folder holds {len(sources)} scans; use discover() to pick one")
    return sources[0].load(**opts)
