"""The batch manifest (``OUT/manifest.json``): what was done to which scan.

It is rewritten atomically after each scan.

Schema (docs/interfaces.md)::

    {"version": 1, "input_root": str, "output_root": str, "params": {...},
     "scans": {key: {"key", "input", "kind", "task", "status": "done"|"failed", "fingerprint",
                     "outputs": {"enhanced", "uncertainty", "residual", "baseline", "dicom"},
                     "metrics": {...}, "seconds": float, "error": str|None}},
     "writing": {key: "<output folder>/<stem>"}}   # scans started, not yet recorded

Scans are recorded in ``writing`` before their first output is written, so a restarted batch knows which
temporaries are its own (:func:`clean_stale_temporaries`) and removes nothing else.

Keys and ``input`` are paths relative to the input root, so they carry whatever the user named folders and
files (which may be a patient's name): the manifest and the report are the user's own records in OUT, and
only hashes of the keys go to MLflow (``medidiff.pipeline.batch``; ``--log-paths`` to log keys). Only the
batch driver writes this file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medidiff.io import atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
OUTPUT_KINDS = ("enhanced", "uncertainty", "residual", "baseline", "dicom")
ROOT_FILES = (MANIFEST_NAME, "report.html")
"""Files a batch writes at the top of OUT."""


def input_fingerprint(files: Iterable[Path], root: Path, settings: dict[str, Any]) -> str:
    """A stable id of a scan's input files (relative name, size, mtime) and of the settings that process it.

    Stat-based so a rerun over 100 000 scans decides "already done" without reading the pixel data;
    changing a file, or any setting that changes the result (task, model, steps, samples, seed,
    format, and the digest of each task's model files: :func:`medidiff.pipeline.settings.model_digests`),
    changes the fingerprint and the scan is redone.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for file in sorted(Path(f) for f in files):
        try:
            rel = file.relative_to(root)
        except ValueError:
            rel = file
        try:
            st = file.stat()
            digest.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}|missing\n".encode())
    return digest.hexdigest()[:32]


@dataclass
class Manifest:
    """In-memory manifest; ``save()`` rewrites ``OUT/manifest.json`` atomically."""

    input_root: str
    output_root: str
    params: dict[str, Any] = field(default_factory=dict)
    scans: dict[str, dict[str, Any]] = field(default_factory=dict)
    writing: dict[str, str] = field(default_factory=dict)
    """Scans started and not yet recorded: key → ``<output folder>/<stem>``.

    What a kill can leave half-written.
    """

    @property
    def path(self) -> Path:
        return Path(self.output_root) / MANIFEST_NAME

    @classmethod
    def load_or_new(cls, input_root: Path, output_root: Path, params: dict[str, Any]) -> Manifest:
        """Load OUT/manifest.json when it exists (resume), else start an empty one."""
        path = Path(output_root) / MANIFEST_NAME
        manifest = cls(str(input_root), str(output_root), dict(params))
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: unreadable manifest ({exc}); move it away to start over") from exc
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(
                    f"{path}: manifest version {data.get('version')!r}, expected {MANIFEST_VERSION}"
                )
            manifest.scans = dict(data.get("scans", {}))
            manifest.writing = {str(k): str(v) for k, v in (data.get("writing") or {}).items()}
            manifest.params["model_identity"] = dict((data.get("params") or {}).get("model_identity") or {})
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "input_root": self.input_root,
            "output_root": self.output_root,
            "params": self.params,
            "scans": self.scans,
            "writing": self.writing,
        }

    def save(self) -> Path:
        """Rewrite the manifest atomically (temp file in OUT, fsync, rename)."""
        return atomic.write_text(
            self.path, json.dumps(self.to_dict(), indent=1, default=str, allow_nan=False), fsync=True
        )

    def record(self, entry: dict[str, Any]) -> None:
        """Store one scan's entry (replacing an earlier one with the same key)."""
        self.scans[entry["key"]] = entry
        self.writing.pop(entry["key"], None)

    def is_done(self, key: str, fingerprint: str) -> bool:
        """True when ``key`` finished with this fingerprint and all its recorded outputs are still on disk."""
        entry = self.scans.get(key)
        if not entry or entry.get("status") != "done" or entry.get("fingerprint") != fingerprint:
            return False
        out = Path(self.output_root)
        return all((out / rel).exists() for rel in entry.get("outputs", {}).values() if rel)

    def counts(self) -> dict[str, int]:
        """Number of scans per status."""
        counts: dict[str, int] = {"done": 0, "failed": 0}
        for entry in self.scans.values():
            counts[entry.get("status", "failed")] = counts.get(entry.get("status", "failed"), 0) + 1
        return counts


def _owned_prefixes(manifest: Manifest) -> dict[Path, set[str]]:
    """Folder under OUT → name prefixes of the temporaries a batch recorded in this manifest can leave there.

    The root holds the manifest's and the report's temporaries; each scan's output folder holds those of
    its ``<stem>_*`` outputs (done, failed or started scans, all recorded before anything is written).
    """
    out = Path(manifest.output_root)
    owned: dict[Path, set[str]] = {out: {f".{name}{atomic.TEMP_MARKER}" for name in ROOT_FILES}}
    bases = [b for b in manifest.writing.values() if b]
    for entry in manifest.scans.values():
        bases.extend(
            str(Path(rel).parent / (Path(rel).name.rsplit("_", 1)[0]))
            for rel in (entry.get("outputs") or {}).values()
            if rel
        )
    for base in bases:
        rel = Path(base)
        if rel.is_absolute() or ".." in rel.parts:
            continue
        # atomic.py names a temporary '.<target name, cut at 100 chars>.medidiff-tmp-...'
        owned.setdefault(out / rel.parent, set()).add(f".{rel.name}_"[:101])
    return owned


_RANDOM_PART = re.compile(r"[a-z0-9_]{8}(\.[A-Za-z0-9.]+)?")


def _made_by_atomic(name: str) -> bool:
    """A temporary name as :mod:`medidiff.io.atomic` makes them: marker, 8 random characters (tempfile's
    alphabet), then the target's suffix."""
    if not atomic.is_temporary_name(name):
        return False
    return _RANDOM_PART.fullmatch(name.rsplit(atomic.TEMP_MARKER, 1)[1]) is not None


def clean_stale_temporaries(manifest: Manifest) -> list[Path]:
    """Remove the temporaries a killed batch of this manifest left under OUT; returns what was removed.

    Only names made by :mod:`medidiff.io.atomic` (:func:`~medidiff.io.atomic.is_temporary_name`) for a
    target this manifest records, directly inside the folder that target lives in, are removed: a user's
    file is never touched, even one that looks temporary or carries the marker somewhere else.
    """
    removed: list[Path] = []
    for folder, prefixes in _owned_prefixes(manifest).items():
        if folder.is_symlink() or not folder.is_dir():
            continue
        for child in folder.iterdir():
            name = child.name
            if not _made_by_atomic(name) or not any(name.startswith(p) for p in prefixes):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed
