"""What a batch does to each scan and where its outputs go: the settings, one scan's job, output names.

Everything here is small and picklable: it travels from the driver to every worker (local or a Ray actor).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medidiff.recipe import SELF_ENSEMBLES

TASKS = ("auto", "sr", "sr_thick", "recon")
FORMATS = ("nifti", "dicom", "both")


@dataclass(frozen=True)
class EnhanceSettings:
    """Everything that decides a scan's result; part of each scan's fingerprint."""

    task: str = "auto"
    fmt: str = "both"
    samples: int = 1
    steps: int | None = None
    models: tuple[str, ...] = ()  # checkpoint folders / shipped names; each replaces its task's default
    seed: int = 0
    decode_timeout_s: float = 300.0
    adapt: bool | None = None  # fine-tune a copy of the model on each scan first (None: the model's default)
    adapt_seconds: float | None = None  # its safety time box (None: scaled by the scan size)
    gate: bool = True  # the do-no-harm gate (medidiff.pipeline.gate)
    precision: str = "auto"  # network arithmetic: auto (bf16 where native) | fp32 | bf16
    self_ensemble: int | None = None  # through-plane SR: flipped copies averaged (None: the model's default)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.self_ensemble is not None and self.self_ensemble not in SELF_ENSEMBLES:
            raise ValueError(f"self_ensemble must be 1, 2 or 4, got {self.self_ensemble}")
        if self.adapt_seconds is not None and self.adapt_seconds <= 0:
            raise ValueError(f"adapt_seconds must be > 0, got {self.adapt_seconds}")

    def enhance_options(self) -> dict[str, Any]:
        """Keyword arguments of ``enhance_volume`` / ``enhance_kspace`` set by these settings."""
        return {"adapt": self.adapt, "adapt_seconds": self.adapt_seconds,
                "self_check": None if self.gate else False, "precision": self.precision}

    def fingerprint_params(self) -> dict[str, Any]:
        """The settings that change outputs (the decode timeout does not)."""
        params = asdict(self)
        params.pop("decode_timeout_s")
        defaults = {"adapt": None, "adapt_seconds": None, "gate": True, "precision": "auto",
                    "self_ensemble": None}
        for key, value in defaults.items():  # at their defaults they leave earlier fingerprints unchanged
            if params[key] == value:
                params.pop(key)
        params["model_digests"] = model_digests(self.task, self.models)
        return params


def model_digests(task: str, models: tuple[str, ...]) -> dict[str, str]:
    """:func:`medidiff.models.model_digest` of the model each task of a batch uses (``task`` 'auto': every
    task), by task: the shipped default unless one of ``models`` was trained for that task. A new release's
    weights, a retrained folder or an edited recipe thus make a resumed batch redo its scans."""
    from medidiff.models import DEFAULT_MODELS, model_digest, read_config

    chosen: dict[str, str] = dict(DEFAULT_MODELS)
    digests: dict[str, str] = {}
    for ref in models:
        try:
            kind = str(read_config(ref)["recipe"]["task"]["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            digests[str(ref)] = "missing"  # the batch reports it when it loads the model
            continue
        chosen[kind] = ref
    tasks = [t for t in chosen if task in ("auto", t)]
    return {**digests, **{t: model_digest(chosen[t]) for t in tasks}}


@dataclass
class ScanJob:
    """One planned scan: where it is, its anonymous key, where its outputs go."""

    key: str
    source: Any  # medidiff.io.discover.ScanSource (picklable; loaded in a child process)
    input_rel: str
    out_dir_rel: str
    stem: str
    fingerprint: str
    kind: str


# ----------------------------------------------------------------------------------------------- naming
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = (".nii.gz", ".nii", ".h5", ".hdf5", ".dcm", ".ima")


def output_stem(key: str) -> str:
    """File-name stem of a scan's outputs, from its anonymous key (last path part, extension dropped)."""
    last = key.replace("\\", "/").rstrip("/").split("/")[-1] or "scan"
    lowered = last.lower()
    for ext in _EXTENSIONS:
        idx = lowered.find(ext)
        if idx > 0:
            last = last[:idx] + last[idx + len(ext) :]
            break
    stem = _UNSAFE.sub("_", last).strip("._") or "scan"
    return stem


def output_folder_rel(source_path: Path, input_root: Path) -> str:
    """The folder under OUT that mirrors the scan's input folder (a series folder, or a file's parent)."""
    folder = source_path if source_path.is_dir() else source_path.parent
    try:
        rel = folder.resolve().relative_to(input_root.resolve())
    except ValueError:
        rel = Path(".")
    return rel.as_posix()


def output_paths(job: ScanJob, settings: EnhanceSettings) -> dict[str, str | None]:
    """Relative output paths (under OUT) this scan will produce."""
    base = Path(job.out_dir_rel) / job.stem
    want_nifti = settings.fmt in ("nifti", "both")
    want_dicom = settings.fmt in ("dicom", "both")
    sampled = settings.samples > 1
    return {
        "enhanced": f"{base}_enhanced.nii.gz" if want_nifti else None,
        "uncertainty": f"{base}_uncertainty.nii.gz" if sampled else None,
        "residual": f"{base}_residual.nii.gz",
        "baseline": f"{base}_baseline.nii.gz",
        "flags": f"{base}_flags.nii.gz",
        "dicom": f"{base}_enhanced_dicom" if want_dicom else None,
        "dicom_uncertainty": f"{base}_uncertainty_dicom" if want_dicom and sampled else None,
        "dicom_flags": f"{base}_flags_dicom" if want_dicom else None,
    }


def scan_seed(seed: int, key: str) -> int:
    """A per-scan seed that depends on the batch seed and the key only (same result in any engine/order)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % (2**31 - 1)
