"""The per-scan function of the batch: decode (isolated) → choose the task → enhance → write outputs atomically.

The same function runs in the local engine (in the driver process) and in every Ray actor. Decoding goes
through a child process (``spawn``) with a timeout, so a native codec that segfaults or hangs fails that
one scan instead of the whole batch. Nothing here writes the manifest or talks to MLflow: the function
returns the scan's manifest entry and the driver records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.pipeline.manifest import TEMP_MARKER

TASKS = ("auto", "sr", "sr_thick", "recon")
FORMATS = ("nifti", "dicom", "both")
# slice spacing at least this many times the in-plane spacing → through-plane SR
THICK_SLICE_RATIO = 2.0


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

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def fingerprint_params(self) -> dict[str, Any]:
        """The settings that change outputs (the decode timeout does not)."""
        params = asdict(self)
        params.pop("decode_timeout_s")
        return params


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
    return {
        "enhanced": f"{base}_enhanced.nii.gz" if want_nifti else None,
        "uncertainty": f"{base}_uncertainty.nii.gz" if settings.samples > 1 else None,
        "residual": f"{base}_residual.nii.gz",
        "baseline": f"{base}_baseline.nii.gz",
        "dicom": f"{base}_enhanced_dicom" if want_dicom else None,
    }


def scan_seed(seed: int, key: str) -> int:
    """A per-scan seed that depends on the batch seed and the key only (same result in any engine/order)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % (2**31 - 1)


# ------------------------------------------------------------------------------------ isolated decoding
def _decode_in_child(source: Any) -> tuple[str, Any]:
    """Runs in the decoding child: load the scan; errors come back as text (exceptions may not pickle)."""
    try:
        return "ok", source.load()
    except Exception as exc:  # noqa: BLE001 - reported to the driver as the scan's error
        return "error", f"{type(exc).__name__}: {exc}" if not hasattr(exc, "problem") else str(exc)


def _decoder_child_main() -> None:
    """The decoding child: read length-prefixed pickled sources on stdin, answer pickled results on stdout.

    The protocol uses a private copy of stdout; anything a library prints goes to stderr instead.
    It exits when its parent closes stdin (including when the parent is killed).
    """
    import os
    import pickle
    import struct
    import sys

    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    while True:
        header = requests.read(8)
        if len(header) < 8:
            return
        (size,) = struct.unpack("<Q", header)
        source = pickle.loads(requests.read(size))
        result = _decode_in_child(source)
        try:
            payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            payload = pickle.dumps(("error", f"decoded scan could not be transferred ({type(exc).__name__})"))
        answers.write(struct.pack("<Q", len(payload)) + payload)
        answers.flush()


class IsolatedDecoder:
    """Decodes scans in a child Python process with a timeout; a codec crash or hang fails one scan only.

    The child is a plain ``python -c`` process (not multiprocessing), so it works the same from the CLI,
    from pytest and inside a Ray actor; it is reused across scans and restarted after a crash.
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._proc: Any = None

    def _start(self) -> Any:
        import subprocess
        import sys

        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from medidiff.pipeline.worker import _decoder_child_main as m; m()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        return self._proc

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        import os
        import selectors

        fd = self._proc.stdout.fileno()
        chunks, got = [], 0
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while got < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(timeout=remaining):
                    raise FutureTimeout()
                chunk = os.read(fd, min(size - got, 1 << 22))
                if not chunk:
                    raise BrokenPipeError()
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def load(self, source: Any) -> Any:
        """Return ``source.load()`` computed in the child; raise ``DecodeError`` on failure, crash or timeout."""
        import pickle
        import struct

        proc = self._start()
        payload = pickle.dumps(source, protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + self.timeout_s
        try:
            proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            proc.stdin.flush()
            (size,) = struct.unpack("<Q", self._read_exactly(8, deadline))
            status, value = pickle.loads(self._read_exactly(size, deadline))
        except FutureTimeout:
            self._kill()
            raise DecodeError(
                f"decoding did not finish within {self.timeout_s:.0f} s (decoder killed)"
            ) from None
        except (BrokenPipeError, EOFError, struct.error, pickle.UnpicklingError, OSError):
            code = self._kill()
            raise DecodeError(
                f"the decoder process crashed (exit status {code}; native codec failure?)"
            ) from None
        if status != "ok":
            raise DecodeError(value)
        return value

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def close(self) -> None:
        """Stop the child process (it exits when its stdin closes)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class DecodeError(RuntimeError):
    """The scan could not be decoded (bad file, codec crash or timeout)."""


# ------------------------------------------------------------------------------------------- the models
class ModelCache:
    """Loads each task's model once per process (one model per Ray actor), on the GPU when there is one.

    Each of ``models`` (checkpoint folders or shipped names) replaces the shipped default for the task its
    recipe was trained for; other tasks keep their shipped defaults.
    """

    def __init__(self, models: tuple[str, ...] | list[str] | str | None = (), device: str = "auto") -> None:
        if isinstance(models, str):
            models = (models,)
        self.requested = tuple(models or ())
        self.device = device
        self._models: dict[str, Any] = {}
        self._custom: dict[str, Any] | None = None

    def _device(self) -> str:
        """'cuda' when asked for, or on 'auto' when a GPU is visible; else 'cpu'."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def get(self, task: str) -> Any:
        if task not in self._models:
            from medidiff.models import default_model, load_model

            if self._custom is None:
                self._custom = {}
                for ref in self.requested:
                    loaded = load_model(ref, device=self._device())
                    self._custom[loaded.task] = loaded
            self._models[task] = self._custom.get(task) or default_model(task, device=self._device())
        return self._models[task]


def model_identity(model: Any, task: str) -> dict[str, str]:
    """Name, folder and weights digest of a loaded model, for the manifest params and MLflow."""
    ident = {"task": task, "name": str(getattr(model, "name", "?"))}
    path = getattr(model, "path", None)
    if path is not None:
        ident["path"] = Path(path).name
        weights = Path(path) / "model.safetensors"
        if weights.is_file():
            digest = hashlib.sha256()
            with open(weights, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            ident["weights_sha256"] = digest.hexdigest()[:16]
    return ident


# ------------------------------------------------------------------------------------------ task choice
def choose_task(data: Any, requested: str) -> str:
    """Pick the task for a loaded scan: k-space → recon; thick slices → sr_thick; else in-plane sr.

    Thick: the slice axis (largest spacing) has at least ``THICK_SLICE_RATIO`` times the spacing of both
    other axes, and more than one slice.
    """
    from medidiff.io.volume import Volume

    is_volume = isinstance(data, Volume)
    if requested == "recon":
        if is_volume:
            raise ValueError("task 'recon' needs k-space input; this scan is an image")
        return "recon"
    if not is_volume:
        if requested in ("sr", "sr_thick"):
            raise ValueError(
                f"task {requested!r} needs an image; this scan is k-space (use --task recon/auto)"
            )
        return "recon"
    if requested != "auto":
        return requested
    return geometry_task(data.affine, data.shape)


def geometry_task(affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """'sr_thick' when the slice axis is coarser than *both* other axes by ``THICK_SLICE_RATIO`` (and holds
    more than one slice), else 'sr'. A low-resolution in-plane image (2 x 2 x 1 mm) is not thick-slice."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    axis = int(
        np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=1e-4, atol=1e-6))[-1]
    )  # Volume.slice_axis
    inplane = float(np.max(np.delete(spacing, axis)))
    if len(shape) > axis and shape[axis] > 1 and spacing[axis] >= THICK_SLICE_RATIO * inplane * (1 - 1e-6):
        return "sr_thick"
    return "sr"


# ------------------------------------------------------------------------------------------- the scan
def _clean_volume(vol: Any, description: str) -> Any:
    """A copy of ``vol`` with no source metadata (no DICOM header): what goes into NIfTI files."""
    from medidiff.io.volume import Volume

    return Volume(np.asarray(vol.array, dtype=np.float32), vol.affine, {"description": description})


def _remove_existing(path: Path) -> None:
    """Remove an output left by an earlier, unrecorded attempt (moved aside first, so removal is atomic)."""
    if not path.exists():
        return
    if path.is_dir():
        aside = path.parent / f"{TEMP_MARKER}-old-{path.name}"
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink()



def failed_entry(job: ScanJob, error: str | None) -> dict[str, Any]:
    """A manifest entry for ``job`` with status failed and no outputs (filled in as the scan succeeds)."""
    return {
        "key": job.key,
        "input": job.input_rel,
        "kind": job.kind,
        "task": None,
        "status": "failed",
        "fingerprint": job.fingerprint,
        "outputs": {k: None for k in ("enhanced", "uncertainty", "residual", "baseline", "dicom")},
        "metrics": {},
        "seconds": 0.0,
        "error": error,
    }

def process_scan(
    job: ScanJob,
    input_root: Path,
    output_root: Path,
    settings: EnhanceSettings,
    models: ModelCache,
    decoder: IsolatedDecoder,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Enhance one scan and write its outputs; returns its manifest entry (status done or failed)."""
    start = time.perf_counter()
    entry = failed_entry(job, None)
    try:
        problems = list(getattr(job.source, "problems", []) or [])
        if job.kind == "invalid":
            raise DecodeError("; ".join(problems) or "not a readable scan")
        modality = str(getattr(job.source, "modality", "") or "")
        if modality and modality.upper() != "MR":
            raise DecodeError(f"modality {modality} is not MR; medidiff enhances MR scans only")
        data = decoder.load(job.source)
        task = choose_task(data, settings.task)
        entry["task"] = task
        model = models.get(task)
        seed = scan_seed(settings.seed, job.key)
        from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

        if task == "recon":
            result = enhance_kspace(
                data,
                model=model,
                steps=settings.steps,
                samples=settings.samples,
                seed=seed,
                progress=progress,
            )
            source_volume = None
        else:
            result = enhance_volume(
                data,
                task=task,
                model=model,
                steps=settings.steps,
                samples=settings.samples,
                seed=seed,
                progress=progress,
            )
            source_volume = data if data.meta.get("dicom_header") is not None else None
        entry["outputs"] = _write_outputs(job, result, output_root, settings, source_volume, task)
        entry["metrics"] = {  # strict JSON: a non-finite metric is stored as null
            k: (float(v) if np.isfinite(float(v)) else None)
            for k, v in (result.metrics or {}).items()
            if _is_number(v)
        }
        entry["status"] = "done"
    except Exception as exc:  # noqa: BLE001 - a broken scan is recorded and the batch goes on
        entry["error"] = _scrub_paths(
            f"{type(exc).__name__}: {exc}" if not isinstance(exc, DecodeError) else str(exc),
            input_root,
            output_root,
        )
        for rel in output_paths(job, settings).values():  # a failed scan leaves no partial outputs
            if rel:
                with contextlib.suppress(OSError):
                    _remove_existing(output_root / rel)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return entry


def _write_outputs(
    job: ScanJob, result: Any, output_root: Path, settings: EnhanceSettings, source_volume: Any, task: str
) -> dict[str, str | None]:
    """Write the scan's NIfTI maps and (optionally) its derived DICOM series, each atomically."""
    from medidiff.io import write_nifti

    rel = output_paths(job, settings)
    (output_root / job.out_dir_rel).mkdir(parents=True, exist_ok=True)
    maps = {
        "enhanced": result.enhanced,
        "uncertainty": result.uncertainty,
        "residual": result.residual,
        "baseline": result.baseline,
    }
    written: dict[str, str | None] = {k: None for k in rel}
    for name, vol in maps.items():
        if rel[name] is None or vol is None:
            continue
        write_nifti(_clean_volume(vol, f"medidiff {task} {name}"), output_root / rel[name])
        written[name] = rel[name]
    if rel["dicom"] is not None:
        from medidiff.io import write_dicom_series

        target = output_root / rel["dicom"]
        _remove_existing(target)
        enhanced = result.enhanced if source_volume is not None else _clean_volume(result.enhanced, "")
        write_dicom_series(
            enhanced,
            target,
            source=source_volume,
            series_description=f"medidiff {task}",
            derivation_description=f"medidiff {task}: conditional diffusion with data consistency, "
            f"{settings.samples} sample(s), steps={settings.steps or 'default'}",
        )
        written["dicom"] = rel["dicom"]
    return written


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _scrub_paths(text: str, input_root: Path, output_root: Path) -> str:
    """Show paths relative to IN/OUT in error messages."""
    for root, label in (
        (Path(input_root).resolve(), "IN"),
        (Path(output_root).resolve(), "OUT"),
        (Path(input_root), "IN"),
        (Path(output_root), "OUT"),
    ):
        text = text.replace(str(root) + "/", f"{label}/").replace(str(root), label)
    return text
