"""Trust panels on held-out real scans: calibrated uncertainty, lesions kept / none invented, flag quality.

* :func:`calibration_panel` enhances calibration cases with K samples, fits the split-conformal quantile
  (:mod:`medidiff.evaluation.calibration`) and measures it on *disjoint* held-out cases: empirical coverage,
  Spearman correlation of per-voxel uncertainty and |error| inside the body, per-scan mean uncertainty vs
  per-scan error, a reliability diagram, the time per scan; optionally writes ``calibration.json`` into a
  model folder.
* :func:`lesion_panel` plants lesions (:mod:`medidiff.evaluation.lesions`), degrades with the task's
  operator, restores with the classical and the enhanced method, and reports contrast kept, CNR before and
  after, invented blob counts and the issue's targets; it also measures the hallucination flags against the
  top-5 % error voxels of the lesion scans.
* :func:`ood_flags_panel` does the same flag measurement on out-of-domain natural images with Rician noise.

The restoration methods are callables passed in, so evaluation never imports the pipeline. Cases come from
:func:`trust_cases`: the shipped held-out real volumes (``medidiff.data.shipped``), each multi-slice volume
split into a calibration block and a test block of contiguous slices (disjoint slices; single-slice volumes
go wholly to one side), each degraded with the task's operator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.data.generators import AcquisitionConfig, acquire
from medidiff.data.natural import natural_images
from medidiff.data.shipped import real_evaluation_volumes
from medidiff.evaluation.calibration import (
    CalibrationCase,
    assess,
    body_mask,
    calibrate,
    reliability_curve,
    save_calibration,
)
from medidiff.evaluation.compare import Case, degrade_recon, degrade_sr_inplane
from medidiff.evaluation.hallucination import flag_precision_recall, flags
from medidiff.evaluation.lesions import plant_lesions, run_lesion_panel
from medidiff.io import Volume, atomic
from medidiff.tasks import TaskConfig, intensity_scale, task_operator

__all__ = [
    "COVERAGE_TOLERANCE",
    "SPEARMAN_TARGET",
    "calibration_panel",
    "lesion_cases",
    "lesion_panel",
    "ood_flags_panel",
    "trust_cases",
]

#: (enhanced, std or None, baseline) on the case's reference grid, from K samples
SampledEnhance = Callable[[Case, int], tuple[np.ndarray, np.ndarray | None, np.ndarray]]
ImageFn = Callable[[np.ndarray], np.ndarray]

COVERAGE_TOLERANCE = 0.05
SPEARMAN_TARGET = 0.5
MIN_BODY_FRACTION = 0.05  # slices with less body than this are not cases (edge slices of a volume)
# single-slice volumes: which side they go to (the rest are split into a calibration and a test block)
_WHOLE = {"pydicom_MR_small": "cal", "dipy_t1_coronal_slice": "test"}


def _as_task(task: TaskConfig | str) -> TaskConfig:
    return task if isinstance(task, TaskConfig) else TaskConfig(kind=task)


def _block(vol: Volume, start: int, stop: int) -> Volume:
    """Slices ``start:stop`` along axis 2, the affine shifted to match."""
    shift = np.eye(4)
    shift[2, 3] = start
    return vol.with_array(np.ascontiguousarray(vol.array[:, :, start:stop]), vol.affine @ shift)


def _degrade(task: TaskConfig, name: str, vol: Volume, seed: int) -> Case:
    if task.kind == "sr":
        lr, ref = degrade_sr_inplane(vol, task.factor)
        return Case(name=name, reference=ref, lr=lr)
    if task.kind == "recon":
        data, ref = degrade_recon(vol, task.acceleration, task.center_fraction, task.mask, seed=seed)
        return Case(name=name, reference=ref, kspace=data)
    raise ValueError(f"trust panels cover tasks sr and recon, got {task.kind!r}")


def trust_cases(task: TaskConfig | str, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """(calibration, test) cases from the shipped held-out volumes, disjoint in slices.

    Multi-slice volumes: the first half of the slices (a contiguous block) calibrates, the second half tests.
    """
    task = _as_task(task)
    cal, test = [], []
    for i, (name, vol) in enumerate(real_evaluation_volumes()):
        vol = vol.with_array(np.abs(np.asarray(vol.array, np.float32)))
        n = vol.shape[2]
        if n == 1:
            side = cal if _WHOLE.get(name, "test") == "cal" else test
            side.append(_degrade(task, name, vol, seed + i))
            continue
        half = n // 2
        cal.append(_degrade(task, f"{name}[0:{half}]", _block(vol, 0, half), seed + i))
        test.append(_degrade(task, f"{name}[{half}:{n}]", _block(vol, half, n), seed + 100 + i))
    return cal, test


def _slice_cases(
    case: Case, enhanced: np.ndarray, std: np.ndarray, baseline: np.ndarray
) -> list[CalibrationCase]:
    """One calibration case per slice (axis 2) with body.

    Intensities are scaled by the scan's baseline scale."""
    reference = np.asarray(case.reference.array, np.float32)
    if enhanced.shape != reference.shape or std.shape != reference.shape:
        raise ValueError(
            f"{case.name}: enhanced {enhanced.shape} / std {std.shape} vs reference {reference.shape}"
        )
    scale = intensity_scale(baseline)  # exactly as the pipeline applies the calibration
    out = []
    for z in range(reference.shape[2]):
        mask = body_mask(enhanced[:, :, z])
        if mask.mean() < MIN_BODY_FRACTION:
            continue
        out.append(
            CalibrationCase(
                name=f"{case.name}/z{z}",
                std=std[:, :, z],
                abs_err=np.abs(enhanced[:, :, z] - reference[:, :, z]),
                mask=mask,
                scale=scale,
            )
        )
    return out


def _run_cases(
    enhance: SampledEnhance, cases: Sequence[Case], samples_k: int
) -> tuple[list[CalibrationCase], list[float]]:
    calib_cases, seconds = [], []
    for case in cases:
        t0 = time.perf_counter()
        enhanced, std, baseline = enhance(case, samples_k)
        seconds.append(time.perf_counter() - t0)
        if std is None:
            raise ValueError(f"{case.name}: the method returned no spread; calibration needs K >= 2 samples")
        calib_cases += _slice_cases(case, np.asarray(enhanced, np.float32), np.asarray(std, np.float32),
                                    np.asarray(baseline, np.float32))
    return calib_cases, seconds


def calibration_panel(
    task: TaskConfig | str,
    enhance: SampledEnhance,
    cases_cal: Sequence[Case],
    cases_test: Sequence[Case],
    samples_k: int,
    coverage: float,
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    default: bool = True,
) -> dict[str, Any]:
    """Calibrate on ``cases_cal`` with K samples, assess on ``cases_test``; figure + Markdown under ``out``.

    With ``model_dir`` the calibration is saved there, as ``calibration.json`` (``default``) or as
    ``calibration_k<K>.json``. Returns the numbers (and the
    Markdown under ``"markdown"``).
    """
    task = _as_task(task)
    if samples_k < 2:
        raise ValueError("calibration needs K >= 2 samples (the spread of one sample is zero)")
    names_cal = {c.name for c in cases_cal}
    if names_cal & {c.name for c in cases_test}:
        overlap = sorted(names_cal & {c.name for c in cases_test})
        raise ValueError(f"calibration and test cases overlap: {overlap}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cal, sec_cal = _run_cases(enhance, cases_cal, samples_k)
    test, sec_test = _run_cases(enhance, cases_test, samples_k)
    calib = calibrate(cal, coverage, samples_k=samples_k, task=task.kind)
    result = assess(calib, test)
    curve = reliability_curve(cal, test)
    if model_dir is not None:
        result["calibration_file"] = str(save_calibration(calib, model_dir, default=default))
    figure = out / f"reliability_{task.kind}_k{samples_k}.png"
    _reliability_figure(curve, figure, f"{task.kind}, K={samples_k}")
    seconds = sec_cal + sec_test
    summary = {
        "task": task.kind,
        "samples_k": samples_k,
        "nominal": coverage,
        "coverage": result["coverage"],
        "coverage_ok": abs(result["coverage"] - coverage) <= COVERAGE_TOLERANCE,
        "spearman": result["spearman"],
        "spearman_ok": bool(result["spearman"] >= SPEARMAN_TARGET),
        "scan_spearman": result["scans"]["spearman"],
        "quantile": calib.quantile,
        "epsilon": calib.epsilon,
        "n_cal": len(cal),
        "n_test": len(test),
        "seconds_per_scan": float(np.mean(seconds)),
        "mean_halfwidth_rel": float(
            np.mean([r["mean_halfwidth"] / c.scale for r, c in zip(result["per_case"], test, strict=True)])
        ),
        "curve": curve,
        "per_case": result["per_case"],
        "scans": result["scans"],
        "figure": figure.name,
        "calibration": calib,
    }
    summary["markdown"] = _calibration_markdown(summary)
    return summary


def _reliability_figure(curve: Sequence[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.4), dpi=120, layout="constrained")
    ax = fig.subplots()
    nominal = [r["nominal"] for r in curve]
    ax.plot([0.4, 1], [0.4, 1], color="0.6", lw=1, ls="--", label="ideal")
    ax.fill_between([0.4, 1], [0.35, 0.95], [0.45, 1.05], color="0.9", label="±5 points")
    ax.plot(nominal, [r["empirical"] for r in curve], "o-", color="C0", label="held-out")
    ax.set(xlabel="nominal coverage", ylabel="empirical coverage", xlim=(0.45, 1.0), ylim=(0.4, 1.02),
           title=title)
    ax.legend(loc="lower right", fontsize=8)
    FigureCanvasAgg(fig)
    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")


def _calibration_markdown(s: dict[str, Any]) -> str:

    def ok(b: Any) -> str:
        return "PASS" if b else "FAIL"

    lines = [
        f"### Calibrated uncertainty: {s['task']}, K = {s['samples_k']}",
        "",
        (f"Split-conformal on {s['n_cal']} calibration slices, assessed on {s['n_test']} disjoint held-out "
        f"slices (q = {s['quantile']:.3g}, eps = {s['epsilon']:g} of the scan scale; "
        f"{s['seconds_per_scan']:.2f} s per scan)."),
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        (f"| empirical coverage | {s['coverage']:.3f} | {s['nominal']:.2f} ± {COVERAGE_TOLERANCE:.2f} "
        f"| {ok(s['coverage_ok'])} |"),
        (f"| Spearman(uncertainty, abs error), body voxels | {s['spearman']:.3f} | ≥ {SPEARMAN_TARGET} "
        f"| {ok(s['spearman_ok'])} |"),
        f"| Spearman across slices (mean half-width vs mean error) | {s['scan_spearman']:.3f} | | |",
        f"| mean half-width / scan scale | {s['mean_halfwidth_rel']:.4f} | | |",
        "",
        f"![reliability]({s['figure']})",
        "",
        "| nominal | " + " | ".join(f"{r['nominal']:.2f}" for r in s["curve"]) + " |",
        "|---|" + "---|" * len(s["curve"]),
        "| empirical | " + " | ".join(f"{r['empirical']:.3f}" for r in s["curve"]) + " |",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- lesions
def lesion_cases(task: TaskConfig | str) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    """2D lesion-panel images from the held-out volumes with room for lesions: the dipy T1 slice and the
    middle slice of the dipy b0 volume (each cropped to a multiple of the SR factor)."""
    task = _as_task(task)
    f = task.factor if task.kind == "sr" else 1
    out = []
    for name, vol in real_evaluation_volumes():
        if name not in ("dipy_t1_coronal_slice", "dipy_S0_10slices"):
            continue
        plane = np.abs(np.asarray(vol.array[:, :, vol.shape[2] // 2], np.float32))
        h, w = (plane.shape[0] // f) * f, (plane.shape[1] // f) * f
        out.append((name, np.ascontiguousarray(plane[:h, :w]), tuple(float(s) for s in vol.spacing[:2])))
    return out


def degrade_fn(task: TaskConfig | str, seed: int = 0) -> ImageFn:
    """The task's measurement of a 2D reference image: LR image (sr) or masked centred k-space (recon)."""
    task = _as_task(task)

    def degrade(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        if task.kind == "recon":
            op = task_operator(task, tuple(image.shape), seed=seed)
            return op.A(x.to(torch.complex64))[0].numpy()
        return task_operator(task).A(x)[0].numpy()

    return degrade


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; nan when there are none (precision is nan where nothing is flagged)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _factor(task: TaskConfig) -> float:
    return float(task.acceleration if task.kind == "recon" else task.factor)


def lesion_panel(
    task: TaskConfig | str,
    enhance: ImageFn,
    classical: ImageFn,
    cases: Sequence[tuple[str, np.ndarray, Sequence[float]]],
    out: str | Path,
    seed: int = 0,
    *,
    per_image: int = 8,
) -> dict[str, Any]:
    """Lesion panel (:func:`medidiff.evaluation.lesions.run_lesion_panel`) plus flag precision / recall.

    ``enhance`` and ``classical`` map a measurement (from :func:`degrade_fn`) to an image on the reference
    grid. Returns the panel's rows and summary, the flag measurement and the Markdown.
    """
    task = _as_task(task)
    degrade = degrade_fn(task, seed)
    panel = run_lesion_panel(
        cases, enhance, classical, degrade, np.random.default_rng(seed), per_image=per_image
    )
    # flags against the largest errors on scans with lesions (one copy per case, all sizes and contrasts)
    rng = np.random.default_rng(seed + 1)
    hits = {"precision": [], "recall": [], "flagged_fraction": []}
    for _name, reference, spacing in cases:
        body = body_mask(reference)
        planted, _ = plant_lesions(reference, spacing, rng, (4.0, 8.0), (-0.4, 0.4), ("sharp",), mask=body)
        measured = degrade(planted)
        enh, cls = enhance(measured), classical(measured)
        fl = flags(enh, cls, task=task.kind, factor=_factor(task))
        pr = flag_precision_recall(fl, np.abs(enh - planted), body_mask(enh))
        for key, values in hits.items():
            values.append(pr[key])
    panel["flags"] = {k: _nanmean(v) for k, v in hits.items()}
    panel["markdown"] = _lesion_markdown(task.kind, panel)
    Path(out).mkdir(parents=True, exist_ok=True)
    return panel


def _lesion_markdown(kind: str, panel: dict[str, Any]) -> str:
    s = panel["summary"]

    def ok(b: Any) -> str:
        return "PASS" if b else "FAIL"

    lines = [
        f"### Lesion panel: {kind}",
        "",
        ("Contrast kept = (lesion − ring) of the restored image / that of the reference, paired with the "
        "lesion-free image; CNR = contrast / ring SD (reference, classical = before, enhanced = after)."),
        "",
        ("| diameter (mm) | contrast | n | kept (enhanced) | kept (classical) "
         "| CNR ref | CNR before | CNR after |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["table"]:
        lines.append(
            f"| {r['diameter_mm']:g} | {100 * r['contrast']:+.0f} % | {r['n']} | {r['kept_enhanced']:.3f} | "
            f"{r['kept_classical']:.3f} | {r['cnr_reference']:.2f} | {r['cnr_classical']:.2f} | "
            f"{r['cnr_enhanced']:.2f} |"
        )
    lines += [
        "",
        "| target | measured | |",
        "|---|---|---|",
        (f"| lesions ≥ 4 mm keep ≥ 90 % of their contrast | min {s['min_kept_ge_4mm']:.3f} | "
        f"{ok(s['kept_ge_4mm_ok'])} |"),
        (f"| no lesion loses more than the classical image (2-point tolerance) | "
        f"{s['lesions_worse_than_classical']} lesion(s) worse | "
        f"{ok(s['lesions_worse_than_classical'] == 0)} |"),
        (f"| invented blobs: enhanced − reference ≤ classical − reference | {s['blobs_enhanced']} vs "
        f"{s['blobs_classical']} | {ok(s['blobs_ok'])} |"),
        "",
    ]
    return "\n".join(lines)


def ood_flags_panel(
    task: TaskConfig | str, enhance: ImageFn, classical: ImageFn, seed: int = 0, size: int = 128
) -> dict[str, Any]:
    """Flag precision / recall vs the top-5 % error voxels on out-of-domain natural images with Rician noise
    (``medidiff.data.generators.acquire``): the acquired image is the reference, degraded and restored."""
    task = _as_task(task)
    degrade = degrade_fn(task, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for name, image in natural_images("ood"):
        h0, w0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        if h0 < 0 or w0 < 0:
            continue
        clean = np.ascontiguousarray(image[h0 : h0 + size, w0 : w0 + size], dtype=np.float32)
        reference, _ = acquire(
            clean, np.ones(clean.shape, bool), rng, AcquisitionConfig(zero_background_p=0.0)
        )
        measured = degrade(reference)
        enh, cls = enhance(measured), classical(measured)
        fl = flags(enh, cls, task=task.kind, factor=_factor(task))
        pr = flag_precision_recall(fl, np.abs(enh - reference))
        rows.append({"case": name, **pr})
    mean = {k: _nanmean([r[k] for r in rows]) for k in ("precision", "recall", "flagged_fraction")}
    return {"rows": rows, **mean}


def flags_markdown(kind: str, lesion_flags: dict[str, float], ood: dict[str, Any]) -> str:
    """The flag-quality table of a trust report."""
    lines = [
        f"### Hallucination flags: {kind} (K = 1, support test)",
        "",
        "Precision / recall of flagged voxels against the top-5 % absolute-error voxels of the body.",
        "",
        "| panel | precision | recall | flagged fraction |",
        "|---|---|---|---|",
        (f"| lesion scans | {lesion_flags['precision']:.3f} | {lesion_flags['recall']:.3f} | "
        f"{lesion_flags['flagged_fraction']:.4f} |"),
        (f"| out-of-domain natural images ({len(ood['rows'])}) | {ood['precision']:.3f} | "
        f"{ood['recall']:.3f} | {ood['flagged_fraction']:.4f} |"),
        "",
        "(nan precision: nothing flagged.)",
        "",
    ]
    return "\n".join(lines)
