"""The per-scan function of the batch: decode (isolated) → choose the task → enhance → write outputs.

The same function runs in the local engine (in the driver process) and in every Ray actor. Nothing here
writes the manifest or talks to MLflow: the function returns the scan's manifest entry and the driver
records it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.volume import Volume
from medidiff.pipeline.decoding import DecodeError, IsolatedDecoder
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume, inplane_slice_axis
from medidiff.pipeline.model_cache import ModelCache
from medidiff.pipeline.outputs import remove_outputs, scan_verdict, trust_maps, write_outputs
from medidiff.pipeline.settings import EnhanceSettings, ScanJob, scan_seed

OUTPUT_KEYS = (
    "enhanced", "uncertainty", "residual", "baseline", "flags", "dicom", "dicom_uncertainty", "dicom_flags",
)
# slice spacing at least this many times the in-plane spacing → through-plane SR
THICK_SLICE_RATIO = 2.0


# ------------------------------------------------------------------------------------------ task choice
def choose_task(data: Any, requested: str) -> str:
    """Pick the task for a loaded scan: k-space → recon; thick slices → sr_thick; else in-plane sr.

    Thick: the slice axis (largest spacing) has at least ``THICK_SLICE_RATIO`` times the spacing of both
    other axes, and more than one slice.
    """
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


def failed_entry(job: ScanJob, error: str | None) -> dict[str, Any]:
    """A manifest entry for ``job`` with status failed and no outputs (filled in as the scan succeeds)."""
    return {
        "key": job.key,
        "input": job.input_rel,
        "kind": job.kind,
        "task": None,
        "status": "failed",
        "fingerprint": job.fingerprint,
        "outputs": {k: None for k in OUTPUT_KEYS},
        "metrics": {},
        "seconds": 0.0,
        "error": error,
    }


def _decode_refusal(job: ScanJob) -> str | None:
    """Why ``job`` is failed without decoding it (not a readable scan, not MR), or None to decode it."""
    if job.kind == "invalid":
        problems = list(getattr(job.source, "problems", []) or [])
        return "; ".join(problems) or "not a readable scan"
    modality = str(getattr(job.source, "modality", "") or "")
    if modality and modality.upper() != "MR":
        return f"modality {modality} is not MR; medidiff enhances MR scans only"
    return None


def needs_decoding(job: ScanJob) -> bool:
    """Whether :func:`process_scan` decodes ``job`` (calls ``decoder.load(job.source)``): the scan is not
    invalid and its modality is MR or unknown. Engines use it to prefetch the next scan's decoding."""
    try:
        return _decode_refusal(job) is None
    except Exception:  # noqa: BLE001 - process_scan fails the same job before loading it
        return False


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
        refusal = _decode_refusal(job)
        if refusal is not None:
            raise DecodeError(refusal)
        data = decoder.load(job.source)
        task = choose_task(data, settings.task)
        entry["task"] = task
        model = models.get(task)
        seed = scan_seed(settings.seed, job.key)
        if task == "recon":
            result = enhance_kspace(
                data,
                model=model,
                steps=settings.steps,
                samples=settings.samples,
                seed=seed,
                progress=progress,
                **settings.enhance_options(),
            )
            source_volume = None
            planes = {"slice_axis": -1}
        else:
            result = enhance_volume(
                data,
                task=task,
                model=model,
                steps=settings.steps,
                samples=settings.samples,
                seed=seed,
                progress=progress,
                self_ensemble=settings.self_ensemble if task == "sr_thick" else None,
                **settings.enhance_options(),
            )
            source_volume = data if data.meta.get("dicom_header") is not None else None
            planes = (
                {"slice_axis": inplane_slice_axis(data)} if task == "sr" else {"thick_axis": data.slice_axis}
            )
        trust = trust_maps(result, task, model, samples=settings.samples, **planes)
        entry["outputs"] = write_outputs(
            job, result, output_root, settings, source_volume, task, trust=trust, model=model
        )
        metrics = {**(result.metrics or {}), **trust.metrics}
        entry["metrics"] = {  # strict JSON: a non-finite metric is stored as null
            k: (float(v) if np.isfinite(float(v)) else None) for k, v in metrics.items() if _is_number(v)
        }
        # the gate's decision and reason are words, not numbers: kept beside the metrics for the report
        entry.update({k: str(metrics[k]) for k in ("gate_decision", "gate_reason") if k in metrics})
        entry["trust"] = {**trust.info, "verdict": scan_verdict(metrics, entry)}
        entry["status"] = "done"
    except Exception as exc:  # noqa: BLE001 - a broken scan is recorded and the batch goes on
        entry["error"] = _scrub_paths(
            f"{type(exc).__name__}: {exc}" if not isinstance(exc, DecodeError) else str(exc),
            input_root,
            output_root,
        )
        remove_outputs(job, output_root, settings)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return entry


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
