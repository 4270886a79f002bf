"""Writing one scan's outputs under OUT: NIfTI maps and derived DICOM series, each atomically.

Besides the enhanced image the outputs say how far to trust it:

* ``<scan>_uncertainty.nii.gz`` (K >= 2 samples): with the model's calibration (``calibration.json``, or the
  ``calibration_k<K>.json`` made with the same K; split-conformal, see
  :mod:`medidiff.evaluation.calibration`) the half-width of a per-voxel interval at the stated coverage,
  ``q * (std + eps * scale)`` with ``scale`` the robust intensity scale of the scan's baseline image (the
  same number the calibration cases were made with); without it the raw standard deviation over the
  samples, labelled uncalibrated.
* ``<scan>_flags.nii.gz`` (uint8 0/1): where the enhanced image holds structure in the model-filled
  frequency band that the classical (data-consistent) baseline does not support
  (:mod:`medidiff.evaluation.hallucination`), summarised as the flagged fraction of the body.
* With ``--format dicom|both`` the uncertainty and flags maps are also written as derived series sharing
  the enhanced series' patient, study and Frame of Reference, so any viewer can overlay them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff import __version__
from medidiff.evaluation.calibration import Calibration, apply, body_mask, load_calibration
from medidiff.evaluation.hallucination import flag_summary, flags
from medidiff.io import atomic
from medidiff.io.dicom_write import DERIVATION_CODES, write_dicom_series
from medidiff.io.nifti import write_nifti
from medidiff.io.volume import Volume
from medidiff.pipeline.model_cache import model_identity
from medidiff.pipeline.settings import EnhanceSettings, ScanJob, output_paths
from medidiff.tasks import intensity_scale

MAPS = ("enhanced", "uncertainty", "residual", "baseline")
#: a scan whose body is flagged above this fraction gets the verdict "flagged"
FLAG_ALERT_FRACTION = 0.01
VERDICTS = {
    "enhanced": "enhanced",
    "classical": "returned classical image: model not expected to help",
    "flagged": "flagged: check highlighted regions",
}
_IMAGE_TYPE = {"sr": "RESAMPLED", "sr_thick": "RESAMPLED", "recon": "OTHER"}
_DERIVATION = {"sr": "spatial_resampling", "sr_thick": "spatial_resampling"}
_TASK_WORDS = {"sr": "in-plane SR", "sr_thick": "through-plane SR", "recon": "reconstruction"}


@dataclass
class TrustMaps:
    """The maps and numbers that say where an enhanced scan may be wrong."""

    uncertainty: Volume | None  # calibrated half-width, or the raw std (uncalibrated), or None for K = 1
    flags: Volume  # uint8 0/1
    uncertainty_label: str  # <= 79 characters: the NIfTI description
    calibration: Calibration | None
    info: dict[str, Any] = field(default_factory=dict)  # manifest "trust" fields (JSON)
    metrics: dict[str, float] = field(default_factory=dict)  # numeric summaries for the manifest metrics


def clean_volume(vol: Volume, description: str) -> Volume:
    """A copy of ``vol`` with no source metadata (no DICOM header): what goes into NIfTI files."""
    return Volume(np.asarray(vol.array, dtype=np.float32), vol.affine, {"description": description})


def write_mask_nifti(vol: Volume, path: Path, description: str) -> Path:
    """A 0/1 map as uint8 NIfTI-1 (sform/qform code 1, mm), atomically: a mask, not an image."""
    import nibabel as nib

    affine = np.asarray(vol.affine, dtype=np.float64)
    img = nib.Nifti1Image((np.asarray(vol.array) != 0).astype(np.uint8), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_data_dtype(np.uint8)
    img.header["descrip"] = description[:79].encode("ascii", "replace")
    with atomic.atomic_file(path) as tmp:
        nib.save(img, str(tmp))
    return path


def model_calibration(model: Any, task: str, samples: int | None = None) -> Calibration | None:
    """The model folder's calibration when it was made for ``task``, else None: the one made with
    ``samples`` samples where the folder has it, else its default ``calibration.json``."""
    path = getattr(model, "path", None)
    if path is None:
        return None
    calib = load_calibration(path, samples)
    return calib if calib is not None and calib.task in ("", task) else None


def calibration_set(calib: Calibration) -> str:
    """The calibration scans, short: ``n`` cases from the named scans (slice suffixes dropped)."""
    scans = sorted({name.split("/")[0] for name in calib.cases})
    return f"{calib.n_cases} cases from {', '.join(scans)}" if scans else f"{calib.n_cases} cases"


def uncertainty_label(calib: Calibration | None, samples: int) -> str:
    """The uncertainty map's short description (a NIfTI descrip holds 80 bytes)."""
    if calib is None:
        return f"medidiff SD over K={samples} samples (uncalibrated)"
    return f"medidiff {100 * calib.coverage:g}% interval half-width (conformal, n={calib.n_cases})"


def trust_maps(
    result: Any,
    task: str,
    model: Any = None,
    *,
    samples: int = 1,
    slice_axis: int = -1,
    thick_axis: int = -1,
    factor: float | None = None,
) -> TrustMaps:
    """Calibrated uncertainty (when the model has a calibration and K >= 2) and hallucination flags.

    ``slice_axis``: the output volume's axis across which 2D planes were enhanced (``thick_axis`` for
    through-plane SR); ``factor``: the task's resolution factor or acceleration (from the model's recipe
    when omitted).
    """
    enhanced = np.asarray(result.enhanced.array, np.float32)
    baseline = np.asarray(result.baseline.array, np.float32)
    scale = intensity_scale(baseline)
    if factor is None:
        recipe_task = getattr(getattr(model, "recipe", None), "task", None)
        if recipe_task is not None:
            factor = recipe_task.acceleration if task == "recon" else recipe_task.factor
        else:
            factor = float((result.metrics or {}).get("acceleration", 2.0))
    calib = model_calibration(model, task, samples) if samples >= 2 else None
    info: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    unc_vol = None
    if result.uncertainty is not None:
        std = np.asarray(result.uncertainty.array, np.float32)
        label = uncertainty_label(calib, samples)
        if calib is not None:
            halfwidth = apply(calib, std, scale)
            unc_vol = clean_volume(result.uncertainty.with_array(halfwidth), label)
            info["uncertainty"] = "calibrated interval half-width"
            info["coverage"] = calib.coverage
            info["calibration"] = calib.describe()
            info["calibration_set"] = calibration_set(calib)
            metrics["uncertainty_coverage"] = calib.coverage
            if calib.samples_k != samples:
                info["calibration_note"] = f"calibrated with K={calib.samples_k}, run with K={samples}"
        else:
            unc_vol = clean_volume(result.uncertainty, label)
            info["uncertainty"] = "standard deviation over samples (uncalibrated)"
            info["coverage"] = None
        body = body_mask(enhanced)
        metrics["mean_interval_halfwidth" if calib is not None else "mean_uncertainty_body"] = float(
            np.mean(np.asarray(unc_vol.array)[body])
        )
    else:
        label = ""
        info["uncertainty"] = None
    flag_map = flags(
        enhanced, baseline, task=task, factor=float(factor), slice_axis=slice_axis, thick_axis=thick_axis,
        scale=scale,
    )
    summary = flag_summary(flag_map, body_mask(enhanced))
    metrics["flagged_fraction"] = summary["flagged_fraction"]
    info["flagged_fraction"] = summary["flagged_fraction"]
    flag_vol = Volume(flag_map.astype(np.uint8), result.enhanced.affine, {"description": "medidiff flags"})
    flag_vol.meta["description"] = "medidiff hallucination flags (1 = unsupported structure)"
    return TrustMaps(unc_vol, flag_vol, label, calib, info, metrics)


def scan_verdict(metrics: dict[str, Any], entry: dict[str, Any] | None = None) -> str:
    """One line for a reviewer: enhanced, classical image returned (gate), or flagged regions to check."""
    entry = entry or {}
    decision = str(entry.get("gate_decision") or metrics.get("gate_decision") or "").lower()
    weight = metrics.get("residual_weight")
    if any(w in decision for w in ("classical", "baseline", "skip", "reject", "off")) or (
        weight is not None and float(weight) == 0.0
    ):
        return VERDICTS["classical"]
    fraction = metrics.get("flagged_fraction")
    if fraction is not None and float(fraction) > FLAG_ALERT_FRACTION:
        return VERDICTS["flagged"]
    return VERDICTS["enhanced"]


def derivation_text(
    task: str, model: Any, settings: EnhanceSettings, result: Any, trust: TrustMaps | None
) -> str:
    """DerivationDescription: what made the image (model, version, weights), the gate and the coverage."""
    ident = model_identity(model, task) if model is not None else {"name": "?"}
    m = result.metrics or {}
    parts = [
        f"medidiff {__version__} {_TASK_WORDS.get(task, task)}: conditional diffusion with data consistency",
        f"model {ident.get('name', '?')}"
        + (f" weights sha256 {ident['weights_sha256']}" if "weights_sha256" in ident else ""),
        f"K={settings.samples} sample(s), steps={settings.steps or 'default'}",
    ]
    if "residual_weight" in m:
        gain = m.get("self_check_gain_db")
        gain_txt = (
            f", predicted gain {float(gain):.2f} dB" if gain is not None and np.isfinite(float(gain)) else ""
        )
        parts.append(f"gate weight {float(m['residual_weight']):.3f}{gain_txt}")
    if trust is not None and trust.calibration is not None:
        parts.append(f"uncertainty: {trust.calibration.describe()} from {calibration_set(trust.calibration)}")
    elif trust is not None and trust.uncertainty is not None:
        parts.append("uncertainty: SD over samples, uncalibrated")
    parts.append("research use only, not for primary diagnosis")
    return "; ".join(parts)[:1024]


def write_outputs(
    job: ScanJob,
    result: Any,
    output_root: Path,
    settings: EnhanceSettings,
    source_volume: Volume | None,
    task: str,
    trust: TrustMaps | None = None,
    model: Any = None,
) -> dict[str, str | None]:
    """Write the scan's NIfTI maps and (optionally) its derived DICOM series; returns the paths written.

    ``result`` is an ``EnhanceResult``; ``source_volume`` is the scan as read when it was DICOM (its header
    makes the written series a derived series of the source), else None. ``trust`` (from
    :func:`trust_maps`) replaces the raw uncertainty by its labelled version and adds the flags map.
    """
    rel = output_paths(job, settings)
    (output_root / job.out_dir_rel).mkdir(parents=True, exist_ok=True)
    written: dict[str, str | None] = {k: None for k in rel}
    maps = {name: getattr(result, name) for name in MAPS}
    labels = {name: f"medidiff {task} {name}" for name in MAPS}
    if trust is not None:
        maps["uncertainty"], labels["uncertainty"] = trust.uncertainty, trust.uncertainty_label
        maps["flags"], labels["flags"] = trust.flags, str(trust.flags.meta["description"])
    for name, vol in maps.items():
        if rel.get(name) is None or vol is None:
            continue
        if name == "flags":
            write_mask_nifti(vol, output_root / rel[name], labels[name])
        else:
            write_nifti(clean_volume(vol, labels[name][:79]), output_root / rel[name])
        written[name] = rel[name]
    if rel["dicom"] is not None:
        _write_dicom(job, result, output_root, settings, source_volume, task, trust, model, rel, written)
    return written


def _write_dicom(job, result, output_root, settings, source_volume, task, trust, model, rel, written) -> None:
    """The enhanced series and, beside it, the uncertainty and flags series in the same Frame of Reference."""
    import pydicom

    target = output_root / rel["dicom"]
    atomic.remove(target)  # a series left by an earlier, unrecorded attempt
    enhanced = result.enhanced if source_volume is not None else clean_volume(result.enhanced, "")
    name = str(getattr(model, "name", "") or task)
    files = write_dicom_series(
        enhanced,
        target,
        source=source_volume,
        series_description=f"medidiff enhanced {_TASK_WORDS.get(task, task)} ({name})",
        derivation_description=derivation_text(task, model, settings, result, trust),
        image_type_value3=_IMAGE_TYPE.get(task, "OTHER"),
        derivation_code=DERIVATION_CODES.get(_DERIVATION.get(task, ""), None),
    )
    written["dicom"] = rel["dicom"]
    if trust is None:
        return
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    number = int(first.SeriesNumber)
    companions = (
        ("dicom_uncertainty", trust.uncertainty, trust.uncertainty_label.removeprefix("medidiff "), 1000,
         None),
        ("dicom_flags", trust.flags, "hallucination flags", 2000, DERIVATION_CODES["segmentation"]),
    )
    for key, vol, what, offset, code in companions:
        if rel.get(key) is None or vol is None:
            continue
        out = output_root / rel[key]
        atomic.remove(out)
        arr = np.asarray(vol.array, np.float32)
        write_dicom_series(
            Volume(arr, vol.affine, {}),
            out,
            source=source_volume,
            series_description=f"medidiff {what} ({name})",
            derivation_description=f"{what} of series {number} ({rel['dicom'].rsplit('/', 1)[-1]}); "
            + derivation_text(task, model, settings, result, trust),
            series_number=number + offset,
            derivation_code=code,
            study_of=first,
        )
        written[key] = rel[key]


def remove_outputs(job: ScanJob, output_root: Path, settings: EnhanceSettings) -> None:
    """Remove whatever a failed attempt wrote for ``job``: a failed scan leaves no partial outputs."""
    for rel in output_paths(job, settings).values():
        if rel:
            with contextlib.suppress(OSError):
                atomic.remove(output_root / rel)
