"""Open a `medidiff enhance` output folder: its manifest, its scans, and each scan's outputs as Volumes.

The manifest schema is the one in docs/interfaces.md ("pipeline (batch) and review"); every output path
in it is relative to the output folder. Volumes are read with nibabel (NIfTI) so that review depends on
nothing but the files a batch leaves behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.discover import read_scan
from medidiff.io.volume import Volume
from medidiff.pipeline.outputs import scan_verdict
from medidiff.review.command import run_medidiff
from medidiff.review.project import find_project_root

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
OUTPUT_KEYS: tuple[str, ...] = ("enhanced", "baseline", "uncertainty", "residual", "flags")
GATE_FIELDS = ("gate_decision", "gate_reason")
_REQUIRED_SCAN_FIELDS = ("status", "outputs")

# What the "before" image is for each task (the operator's back-projection of the input, on the output grid).
BEFORE_LABELS = {
    "sr": "before: sinc upsampling",
    "sr_thick": "before: through-plane interpolation",
    "recon": "before: zero-filled",
}


class BatchError(Exception):
    """A batch folder or one of its files that cannot be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class ScanEntry:
    """One scan's record in the manifest."""

    key: str
    status: str
    task: str | None
    kind: str | None
    input: str | None
    outputs: dict[str, str | None]
    metrics: dict[str, Any]
    seconds: float | None
    error: str | None
    fingerprint: str | None
    trust: dict[str, Any] = field(default_factory=dict)  # coverage, calibration, flagged fraction, verdict
    gate: dict[str, Any] = field(default_factory=dict)  # gate_decision / gate_reason when recorded

    @property
    def done(self) -> bool:
        return self.status == "done"

    def summary(self) -> dict[str, str]:
        """What a reviewer reads first: :func:`trust_summary` of this scan."""
        return trust_summary(self.metrics, self.trust, self.gate)


def trust_summary(
    metrics: dict[str, Any], trust: dict[str, Any] | None = None, gate: dict[str, Any] | None = None
) -> dict[str, str]:
    """One-line verdict, the gate's decision and predicted gain, the uncertainty's meaning, the flagged
    fraction.

    Works with whatever the manifest holds (older batches have no trust fields, or no gate decision).
    """
    trust, gate = dict(trust or {}), dict(gate or {})
    for name in GATE_FIELDS:  # the gate may record its decision among the metrics
        if name not in gate and name in metrics:
            gate[name] = metrics[name]
    verdict = trust.get("verdict") or scan_verdict(metrics, gate)
    weight, gain = metrics.get("residual_weight"), metrics.get("self_check_gain_db")
    parts = []
    if gate.get("gate_decision"):
        parts.append(str(gate["gate_decision"]))
    if weight is not None:
        parts.append(f"model weight {float(weight):.2f}")
    if gain is not None and np.isfinite(float(gain)):
        parts.append(f"predicted gain {float(gain):+.2f} dB")
    if gate.get("gate_reason"):
        parts.append(f"({gate['gate_reason']})")
    if trust.get("coverage"):
        width = metrics.get("mean_interval_halfwidth")
        interval = f"{100 * float(trust['coverage']):g}% interval" + (
            f", mean half-width {float(width):.4g}" if width is not None else ""
        ) + (f" ({trust['calibration']})" if trust.get("calibration") else "")
    elif trust.get("uncertainty"):
        interval = "uncalibrated: SD over samples, no stated coverage"
    else:
        interval = "not sampled (K = 1)"
    fraction = metrics.get("flagged_fraction", trust.get("flagged_fraction"))
    return {
        "verdict": verdict,
        "gate": ", ".join(parts) or "not recorded",
        "interval": interval,
        "flagged": "not computed" if fraction is None else f"{100 * float(fraction):.2f}% of the body",
    }


@dataclass
class ScanOutputs:
    """A scan's review material on one voxel grid.

    Before (baseline), enhanced, uncertainty, residual, metrics.
    """

    key: str
    enhanced: Volume
    baseline: Volume
    uncertainty: Volume | None = None
    residual: Volume | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    flags: Volume | None = None  # hallucination flags (0/1)
    trust: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, str]:
        """:func:`trust_summary` of this scan: verdict, gate, interval, flagged fraction."""
        return trust_summary(self.metrics, self.trust, self.gate)

    @property
    def before_label(self) -> str:
        """Panel title of the baseline image for this scan's task."""
        return BEFORE_LABELS.get(self.task or "", "before (baseline)")

    @classmethod
    def from_result(cls, result: Any, key: str = "scan", task: str | None = None) -> ScanOutputs:
        """Wrap an in-memory ``EnhanceResult`` for review without writing files.

        ``EnhanceResult`` comes from medidiff.pipeline.enhance.
        """
        return cls(key=key, enhanced=result.enhanced, baseline=result.baseline,
                   uncertainty=getattr(result, "uncertainty", None),
                   residual=getattr(result, "residual", None),
                   metrics=dict(getattr(result, "metrics", {}) or {}), task=task)


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read one output as a float32 Volume.

    A NIfTI file with nibabel, a DICOM series folder with medidiff.io.
    """
    path = Path(path)
    if not path.exists():
        raise BatchError(path, "output file is missing")
    if path.is_dir():
        vol = read_scan(path)
        if not isinstance(vol, Volume):
            raise BatchError(path, f"expected an image volume, got {type(vol).__name__}")
        return vol
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for broken files
        raise BatchError(path, f"cannot be read as NIfTI: {exc}") from exc
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise BatchError(path, f"expected a 3D volume, got shape {array.shape}")
    return Volume(array, np.asarray(image.affine, dtype=np.float64), {"source_files": [str(path)]})


def _entry(key: str, record: Any, manifest_path: Path) -> ScanEntry:
    if not isinstance(record, dict):
        raise BatchError(manifest_path, f"scan {key!r} is not an object")
    missing = [name for name in _REQUIRED_SCAN_FIELDS if name not in record]
    if missing:
        raise BatchError(manifest_path, f"scan {key!r} lacks {', '.join(missing)}")
    outputs = record.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise BatchError(manifest_path, f"scan {key!r}: 'outputs' is not an object")
    seconds = record.get("seconds")
    return ScanEntry(
        key=str(record.get("key", key)), status=str(record["status"]), task=record.get("task"),
        kind=record.get("kind"), input=record.get("input"), outputs=dict(outputs),
        metrics=dict(record.get("metrics") or {}), seconds=None if seconds is None else float(seconds),
        error=record.get("error"), fingerprint=record.get("fingerprint"),
        trust=dict(record.get("trust") or {}),
        gate={name: record[name] for name in GATE_FIELDS if record.get(name) is not None},
    )


class Batch:
    """An opened output folder. ``batch.keys()`` lists scans; ``batch.load(key)`` reads one scan's outputs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.manifest_path = self.root / MANIFEST_NAME
        if not self.root.is_dir():
            raise BatchError(self.root, "output folder does not exist")
        if not self.manifest_path.is_file():
            raise BatchError(self.manifest_path,
                             "no manifest.json here; is this the --out folder of `medidiff enhance`?")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BatchError(self.manifest_path, f"is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise BatchError(self.manifest_path, "top level is not an object")
        version = manifest.get("version")
        if version != MANIFEST_VERSION:
            raise BatchError(self.manifest_path,
                             f"manifest version {version!r} is not supported (expected {MANIFEST_VERSION})")
        scans = manifest.get("scans")
        if isinstance(scans, list):  # tolerate a list of records
            scans = {
                str(rec.get("key", i)) if isinstance(rec, dict) else str(i): rec
                for i, rec in enumerate(scans)
            }
        if not isinstance(scans, dict):
            raise BatchError(self.manifest_path, "'scans' is missing or not an object")
        self.manifest: dict[str, Any] = manifest
        self.scans: dict[str, ScanEntry] = {
            key: _entry(key, rec, self.manifest_path) for key, rec in scans.items()
        }

    def __repr__(self) -> str:
        counts = self.counts()
        return f"Batch({str(self.root)!r}, " + ", ".join(f"{k}={v}" for k, v in counts.items()) + ")"

    @property
    def params(self) -> dict[str, Any]:
        """The batch's parameters as recorded by the driver (task, steps, samples, model, ...)."""
        return dict(self.manifest.get("params") or {})

    def keys(self, status: str | None = "done") -> list[str]:
        """Scan keys in manifest order, only those with ``status`` (None for all)."""
        return [key for key, entry in self.scans.items() if status is None or entry.status == status]

    def counts(self) -> dict[str, int]:
        """Number of scans per status."""
        result: dict[str, int] = {}
        for entry in self.scans.values():
            result[entry.status] = result.get(entry.status, 0) + 1
        return result

    def entry(self, key: str) -> ScanEntry:
        """The manifest record of one scan."""
        try:
            return self.scans[key]
        except KeyError:
            known = ", ".join(list(self.scans)[:10]) + (" ..." if len(self.scans) > 10 else "")
            raise BatchError(self.manifest_path, f"no scan with key {key!r}; known keys: {known}") from None

    def output_path(self, key: str, name: str) -> Path | None:
        """Absolute path of one output of a scan.

        None when the manifest records none, e.g. no uncertainty.
        """
        entry = self.entry(key)
        rel = entry.outputs.get(name)
        if rel is None:
            return None
        path = (self.root / rel).resolve()
        if Path(rel).is_absolute() or self.root not in path.parents:
            raise BatchError(
                self.manifest_path, f"scan {key!r}: output {name!r} points outside the folder: {rel}"
            )
        return path

    def load(self, key: str | None = None, outputs: Iterable[str] = OUTPUT_KEYS) -> ScanOutputs:
        """Read a finished scan's outputs.

        Enhanced and baseline are required; uncertainty and residual are read if present.

        ``key=None`` picks the first finished scan of the manifest.
        """
        if key is None:
            done = self.keys()
            if not done:
                raise BatchError(
                    self.manifest_path, f"no finished scan to review ({self.counts() or 'no scans'})"
                )
            key = done[0]
        entry = self.entry(key)
        if not entry.done:
            raise BatchError(self.manifest_path,
                             f"scan {key!r} has status {entry.status!r}: {entry.error or 'no outputs'}")
        wanted = set(outputs) | {"enhanced", "baseline"}
        volumes: dict[str, Volume | None] = {}
        for name in OUTPUT_KEYS:
            path = self.output_path(key, name) if name in wanted else None
            if path is None and name in ("enhanced", "baseline"):
                raise BatchError(self.manifest_path, f"scan {key!r} records no {name!r} output")
            volumes[name] = load_volume(path) if path is not None else None
        return ScanOutputs(key=entry.key, task=entry.task, metrics=dict(entry.metrics),  # type: ignore[arg-type]
                           trust=dict(entry.trust), gate=dict(entry.gate), **volumes)

    def table(self) -> list[dict[str, Any]]:
        """One row per scan: key, status, task, kind, seconds, error and the scan's metrics."""
        rows = []
        for entry in self.scans.values():
            row: dict[str, Any] = {"key": entry.key, "status": entry.status, "task": entry.task,
                                   "kind": entry.kind, "seconds": entry.seconds}
            for name, value in entry.metrics.items():  # e.g. the model's own 'seconds' next to the scan's
                row[f"metric_{name}" if name in row else name] = value
            if entry.done:
                row["verdict"] = entry.summary()["verdict"]
            row["error"] = entry.error
            rows.append(row)
        return rows

    def frame(self) -> Any:
        """:meth:`table` as a pandas DataFrame indexed by scan key."""
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("key")


def open_batch(out_dir: str | os.PathLike[str]) -> Batch:
    """Open an enhance output folder (reads and validates its manifest.json)."""
    return Batch(out_dir)


def demo_output(
    demo_dir: str | os.PathLike[str] | None = None, *, make: bool = True, samples: int = 2,
    steps: int | None = None,
) -> Path:
    """The output folder of `make demo` (``demo_out/output`` at the checkout's root), made now if missing.

    Outside a checkout, ``demo_out`` is looked for in the working directory. When there is no manifest yet and
    ``make`` is true, ``medidiff demo --out DEMO_DIR`` runs (a few minutes on a 2-core CPU).
    """
    if demo_dir is None:
        demo_dir = (find_project_root() or Path.cwd()) / "demo_out"
    demo_dir = Path(demo_dir).expanduser().resolve()
    out = demo_dir / "output"
    if (out / MANIFEST_NAME).is_file():
        return out
    if not make:
        raise BatchError(out, "no demo output here; run `make demo` (or `medidiff demo --out DIR`) first")
    args = ["demo", "--out", str(demo_dir), "--samples", str(samples)]
    if steps is not None:
        args += ["--steps", str(steps)]
    run_medidiff(args, ok_codes=(0, 3))  # 3: some scans failed; they are listed in the manifest
    if not (out / MANIFEST_NAME).is_file():
        raise BatchError(out, "`medidiff demo` finished without writing a manifest")
    return out
