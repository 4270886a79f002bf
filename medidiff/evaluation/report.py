"""Evaluation report: Markdown + CSV tables, comparison figures, the targets check, and the MLflow run."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io import atomic
from medidiff.io.volume import Volume
from medidiff.tracking import tracking_run

__all__ = [
    "comparison_figure",
    "log_to_mlflow",
    "markdown_tables",
    "psnr_chart",
    "target_checks",
    "write_csv",
    "write_report",
]

METRICS_NOTE = (
    "PSNR and SSIM use the reference volume's maximum as data range (fastMRI); SSIM is the mean over "
    "2D slices; NMSE = ||ref − x||² / ||ref||²; HFEN = ||LoG(x) − LoG(ref)|| / ||LoG(ref)|| "
    "(2D LoG, σ = 1.5 px). Seconds are wall time per scan on this machine."
)
_COLUMNS = (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("nmse", "NMSE", "{:.5f}"),
            ("hfen", "HFEN", "{:.4f}"), ("seconds", "s / scan", "{:.2f}"), ("network_evals", "NFE", "{:.0f}"))


def _fmt(value: Any, spec: str) -> str:
    """Format a number for the table; blanks for missing, 'inf' for infinite."""
    if value is None or value == "":
        return ""
    v = float(value)
    return "inf" if math.isinf(v) else spec.format(v)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown_tables(summary: Sequence[dict], rows: Sequence[dict]) -> tuple[str, str]:
    """(mean table, per-scan table) in Markdown."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in summary)]
    mean = _md_table(
        ["method", "scans", *[c[1] for c in cols]],
        [[r["method"], f"{r['n']}" + (f" ({r['failed']} failed)" if r.get("failed") else ""),
          *[_fmt(r.get(c[0]), c[2]) for c in cols]] for r in summary],
    )
    scan_cols = [c for c in _COLUMNS[:4]]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["scan"], r["method"], *["" for _ in scan_cols], f"error: {r['error']}"])
        else:
            body.append([r["scan"], r["method"], *[_fmt(r.get(c[0]), c[2]) for c in scan_cols], ""])
    per_scan = _md_table(["scan", "method", *[c[1] for c in scan_cols], "note"], body)
    return mean, per_scan


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows as CSV (union of keys, in first-seen order), written atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return _write_text(path, buf.getvalue())


def _write_text(path: str | Path, text: str) -> Path:
    """Write text through a temp file in the same folder, then rename."""
    return atomic.write_text(path, text)


def _middle_slice(vol: Volume, slice_axis: int) -> np.ndarray:
    """The middle 2D slice along ``slice_axis``, transposed for display (rows = second in-plane axis)."""
    arr = np.moveaxis(vol.array, slice_axis, 0)
    return arr[arr.shape[0] // 2].T


def comparison_figure(
    reference: Volume, outputs: Mapping[str, Volume], slice_axis: int, title: str,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
):
    """Figure: reference and every method's middle slice (top row) and absolute error ×5 (bottom row)."""
    from matplotlib.figure import Figure

    names = list(outputs)
    ref = _middle_slice(reference, slice_axis)
    vmax = float(np.percentile(reference.array, 99.5)) or float(reference.array.max()) or 1.0
    ncol = len(names) + 1
    aspect = ref.shape[0] / max(ref.shape[1], 1)
    fig = Figure(figsize=(2.4 * ncol, 2.4 * 2 * aspect + 0.6), layout="constrained")
    axes = fig.subplots(2, ncol, squeeze=False)
    axes[0, 0].imshow(ref, cmap="gray", vmin=0, vmax=vmax, origin="lower")
    axes[0, 0].set_title("reference", fontsize=8)
    axes[1, 0].axis("off")
    for j, name in enumerate(names, start=1):
        img = _middle_slice(outputs[name], slice_axis)
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=vmax, origin="lower")
        label = name
        if metrics and name in metrics and "psnr" in metrics[name]:
            label += f"\n{metrics[name]['psnr']:.2f} dB / {metrics[name].get('ssim', float('nan')):.3f}"
        axes[0, j].set_title(label, fontsize=8)
        axes[1, j].imshow(np.abs(img - ref), cmap="magma", vmin=0, vmax=vmax / 5, origin="lower")
        axes[1, j].set_title("|error| (x5)", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def psnr_chart(rows: Sequence[dict], methods: Sequence[str], title: str):
    """Grouped bars: PSNR of every method on every scan (the per-scan table at a glance)."""
    from matplotlib.figure import Figure

    scans = list(dict.fromkeys(r["scan"] for r in rows))
    value = {(r["scan"], r["method"]): r["psnr"] for r in rows if "psnr" in r and math.isfinite(r["psnr"])}
    width = max(4.0, 1.2 * len(scans) * max(1, len(methods)) / 3 + 2)
    fig = Figure(figsize=(width, 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(scans))]
        ax.bar(xs, [value.get((s, m), np.nan) for s in scans], width, label=m)
    finite = list(value.values())
    if finite:
        ax.set_ylim(min(finite) - 2, max(finite) + 1)
    ax.set_xticks(range(len(scans)), scans, rotation=20, fontsize=7)
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=7, ncols=min(len(methods), 4))
    ax.set_title(title, fontsize=9)
    return fig


def _deltas(rows: Sequence[dict], method: str, baseline: str) -> list[float]:
    """Per-scan PSNR(method) - PSNR(baseline) over the scans both succeeded on."""
    base = {r["scan"]: r["psnr"] for r in rows if r["method"] == baseline and "psnr" in r}
    return [r["psnr"] - base[r["scan"]] for r in rows
            if r["method"] == method and "psnr" in r and r["scan"] in base
            and math.isfinite(r["psnr"]) and math.isfinite(base[r["scan"]])]


CLASSICAL = {"sr": ("sinc", "bicubic"), "sr_thick": ("linear", "cubic"), "recon": ("zero-filled", "cs")}
SR_TARGET_DB = {"sr": 1.0, "sr_thick": 1.5}
FALLBACK = {"recon": "zero-filled"}  # where the gate's fallback is not the better classical method
MAX_CASE_FIGURES = 4  # per-case comparison figures kept in a report (evenly spread over the cases)
HARM_DB = -0.1  # no case may lose more than this against the better classical method


def add_classical_deltas(task: str, rows: list[dict]) -> None:
    """Add ``delta_vs_classical_db`` to every learned row: PSNR minus the best classical PSNR on that case."""
    best: dict[str, float] = {}
    for r in rows:
        if r["method"] in CLASSICAL.get(task, ()) and "psnr" in r and math.isfinite(r["psnr"]):
            best[r["scan"]] = max(best.get(r["scan"], -math.inf), float(r["psnr"]))
    fallback = {r["scan"]: float(r["psnr"]) for r in rows
                if r["method"] == FALLBACK.get(task) and "psnr" in r}
    for r in rows:
        if r["method"] not in CLASSICAL.get(task, ()) and "psnr" in r and r["scan"] in best:
            r["delta_vs_classical_db"] = float(r["psnr"]) - best[r["scan"]]
        if r["method"] not in CLASSICAL.get(task, ()) and "psnr" in r and r["scan"] in fallback:
            r["delta_vs_fallback_db"] = float(r["psnr"]) - fallback[r["scan"]]


def delta_table(rows: Sequence[dict], methods: Sequence[str], task: str = "") -> str:
    """Markdown: per learned method, mean and worst ΔPSNR vs the better classical method on each case, and
    how many cases the gate enhanced (for reconstruction also the worst case against zero-filling, the
    image the gate falls back to)."""
    fb = FALLBACK.get(task)
    body = []
    for m in methods:
        d = [(r["delta_vs_classical_db"], r["scan"]) for r in rows
             if r["method"] == m and "delta_vs_classical_db" in r
             and math.isfinite(r["delta_vs_classical_db"])]
        if not d:
            continue
        vals = np.array([v for v, _ in d])
        worst = min(d)
        enhanced = sum(1 for r in rows if r["method"] == m and r.get("gate_decision") == "enhanced")
        gated = sum(1 for r in rows if r["method"] == m and "gate_decision" in r)
        row = [m, str(len(d)), f"{vals.mean():+.2f}", f"{np.median(vals):+.2f}", f"{worst[0]:+.2f}",
               worst[1], str(int((vals < HARM_DB).sum())), f"{enhanced}/{gated}" if gated else ""]
        if fb:
            f = [r["delta_vs_fallback_db"] for r in rows if r["method"] == m and "delta_vs_fallback_db" in r]
            row.append(f"{min(f):+.2f}" if f else "")
        body.append(row)
    header = ["method", "cases", "mean Δ (dB)", "median Δ", "worst Δ", "worst case", f"cases < {HARM_DB} dB",
              "enhanced by gate"]
    return _md_table(header + ([f"worst Δ vs {fb}"] if fb else []), body)


def gate_points(rows: Sequence[dict]) -> dict[str, list[tuple[float, float, bool]]]:
    """Per medidiff method: (predicted gain, actual gain of the candidate, enhanced?) for every case."""
    out: dict[str, list[tuple[float, float, bool]]] = {}
    for r in rows:
        p, a = r.get("gate_predicted_gain_db"), r.get("actual_gain_db")
        if p is None or a is None or not (math.isfinite(float(p)) and math.isfinite(float(a))):
            continue
        out.setdefault(r["method"], []).append((float(p), float(a), r.get("gate_decision") == "enhanced"))
    return out


def gate_summary(points: Mapping[str, Sequence[tuple[float, float, bool]]]) -> list[str]:
    """One line per method: correlation of predicted and actual gain, false accepts and missed gains."""
    lines = []
    for m, pts in points.items():
        if not pts:
            continue
        p = np.array([q[0] for q in pts])
        a = np.array([q[1] for q in pts])
        acc = np.array([q[2] for q in pts])
        r = float(np.corrcoef(p, a)[0, 1]) if len(pts) > 2 and p.std() > 0 and a.std() > 0 else float("nan")
        bad = int((acc & (a < HARM_DB)).sum())
        missed = int((~acc & (a > 0.3)).sum())
        below = int((p <= a).sum())
        lines.append(f"{m}: {len(pts)} cases, r(predicted, actual) = {r:+.2f}, predicted ≤ actual in {below} "
                     f"(the check is pessimistic there); enhanced {int(acc.sum())} "
                     f"(of which the candidate lost > {-HARM_DB} dB: {bad}); declined {int((~acc).sum())} "
                     f"(of which the candidate would have gained > 0.3 dB: {missed})")
    return lines


def gate_scatter(points: Mapping[str, Sequence[tuple[float, float, bool]]], title: str):
    """Predicted gain (the gate's held-out self-check) against the candidate's actual gain, per case."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.0), layout="constrained")
    ax = fig.subplots()
    markers = "osD^v<>"
    allv = []
    for j, (m, pts) in enumerate(points.items()):
        for acc, colour, label in ((True, "tab:green", "enhanced"), (False, "tab:red", "declined")):
            sel = [q for q in pts if q[2] == acc]
            if sel:
                ax.scatter([q[0] for q in sel], [q[1] for q in sel], s=18, c=colour, marker=markers[j % 7],
                           alpha=0.75, label=f"{m} ({label})")
                allv += [v for q in sel for v in q[:2]]
    if allv:
        lo, hi = min(allv) - 0.2, max(allv) + 0.2
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
    ax.axhline(HARM_DB, color="tab:red", lw=0.6, ls=":")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xlabel("predicted gain (dB, held-out self-check)")
    ax.set_ylabel("actual gain of the candidate (dB)")
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return fig


def target_checks(task: str, summary: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """The issue's targets for each learned method, as 'PASS'/'FAIL' lines (empty without baselines)."""
    means = {r["method"]: r.get("psnr") for r in summary}
    learned = [r["method"] for r in summary if r["method"].startswith("medidiff") or r["method"] == "unet"]
    lines = []
    if task in ("sr", "sr_thick"):
        cands = [m for m in CLASSICAL[task] if means.get(m) is not None]
        if not cands:
            return []
        ref = max(cands, key=lambda m: means[m])
        target = SR_TARGET_DB[task]
        for m in learned:
            d = _deltas(rows, m, ref)
            if not d:
                continue
            ok = np.mean(d) >= target and min(d) >= HARM_DB
            lines.append(f"{'PASS' if ok else 'FAIL'} {m}: mean ΔPSNR vs {ref} {np.mean(d):+.2f} dB "
                         f"(target ≥ +{target:g}), worst scan {min(d):+.2f} dB (target ≥ −0.1)")
    else:
        for m in learned:
            d_cs, d_zf = _deltas(rows, m, "cs"), _deltas(rows, m, "zero-filled")
            parts, ok = [], True
            if d_cs:
                ok &= np.mean(d_cs) >= 3.0
                parts.append(f"mean ΔPSNR vs cs {np.mean(d_cs):+.2f} dB (target ≥ +3)")
            if d_zf:
                ok &= min(d_zf) >= 0.0
                parts.append(f"worst scan vs zero-filled {min(d_zf):+.2f} dB (target ≥ 0)")
            if parts:
                lines.append(f"{'PASS' if ok else 'FAIL'} {m}: " + ", ".join(parts))
    for m in learned:
        nfe = next((r.get("network_evals") for r in summary if r["method"] == m), None)
        if nfe is not None and m.startswith("medidiff"):
            word = "evaluation" if nfe == 1 else "evaluations"
            lines.append(f"{'PASS' if nfe <= 10 else 'FAIL'} {m}: {nfe:.0f} network {word} per sample "
                         f"(target ≤ 10)")
    return lines


def write_report(
    out_dir: str | Path,
    *,
    task: str,
    rows: Sequence[dict],
    summary: Sequence[dict],
    outputs: Mapping[str, Mapping[str, Volume]],
    references: Mapping[str, Volume],
    slice_axes: Mapping[str, int],
    notes: Sequence[str] = (),
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``summary.csv``, ``per_scan.csv`` and ``figures/<scan>.png``.

    Returns their paths."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    add_classical_deltas(task, rows)
    mean_md, scan_md = markdown_tables(summary, rows)
    delta_md = delta_table(rows, [r["method"] for r in summary], task)
    points = gate_points(rows)
    gate_lines = gate_summary(points)
    checks = target_checks(task, summary, rows)
    figures = []
    shown = list(outputs)
    if len(shown) > MAX_CASE_FIGURES:  # evenly spread over the cases
        shown = [shown[i] for i in np.linspace(0, len(shown) - 1, MAX_CASE_FIGURES).round().astype(int)]
    for scan in shown:
        outs = outputs[scan]
        if not outs:
            continue
        per_method = {r["method"]: r for r in rows if r["scan"] == scan and "error" not in r}
        fig = comparison_figure(references[scan], outs, slice_axes[scan], f"{task}: {scan}", per_method)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scan)
        path = out / "figures" / f"{safe}.png"
        with atomic.atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=72, format="png")
        figures.append(path)
    methods = [r["method"] for r in summary]
    if points:
        path = out / "figures" / "gate_scatter.png"
        with atomic.atomic_file(path) as tmp:
            gate_scatter(points, f"{task}: gate predicted vs actual gain").savefig(tmp, dpi=110, format="png")
        figures.insert(0, path)
    if any("psnr" in r for r in rows):
        chart = psnr_chart(rows, methods, f"{task}: PSNR per scan")
        path = out / "figures" / "psnr_per_scan.png"
        with atomic.atomic_file(path) as tmp:
            chart.savefig(tmp, dpi=110, format="png")
        figures.insert(0, path)
    parts = [f"# medidiff evaluation: {task}", ""]
    if command:
        parts += ["```", command, "```", ""]
    parts += ["## Against the better classical method, case by case", "", delta_md, ""]
    if gate_lines:
        parts += ["## Do-no-harm gate", "", "![gate scatter](figures/gate_scatter.png)", "",
                  *[f"- {g}" for g in gate_lines], "",
                  ("Predicted gain: the cross-fitted gain of the model's residual on the scan's own "
                   "self-check pairs (the gate decides on its worst fold); actual gain: PSNR of the "
                   "candidate the gate weighed (classical image + candidate weight × model residual) minus "
                   "the classical image's, against the reference. Per-case numbers are in per_scan.csv "
                   "(gate_* and actual_gain_db columns)."), ""]
    parts += ["## Mean over scans", "", mean_md, ""]
    if checks:
        parts += ["## Targets", "", *[f"- {c}" for c in checks], ""]
    parts += ["## Per scan", "", scan_md, ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    parts += [METRICS_NOTE, ""]
    if figures:
        parts += ["## Figures", "", *[f"![{p.stem}](figures/{p.name})" for p in figures], ""]
    md = _write_text(out / "report.md", "\n".join(parts))
    return {
        "markdown": md,
        "summary_csv": write_csv(summary, out / "summary.csv"),
        "per_scan_csv": write_csv(rows, out / "per_scan.csv"),
        "figures": figures,
        "mean_table": mean_md,
        "delta_table": delta_md,
        "gate": gate_lines,
        "checks": checks,
    }


def log_to_mlflow(
    paths: Mapping[str, Any], *, task: str, summary: Sequence[dict], rows: Sequence[dict],
    params: Mapping[str, Any], tracking_uri: str | None = None, run_name: str | None = None,
) -> str | None:
    """One MLflow run with the parameters, mean metrics per method, tables and figures; returns its id."""
    with tracking_run("evaluate", run_name=run_name or f"evaluate-{task}", tracking_uri=tracking_uri,
                      params=dict(params), tags={"task": task}) as tracker:
        metrics = {}
        for r in summary:
            for key in ("psnr", "ssim", "nmse", "hfen", "seconds"):
                if key in r and math.isfinite(float(r[key])):
                    metrics[f"{r['method']}/{key}"] = float(r[key])
        tracker.log_metrics(metrics)
        tracker.log_table([dict(r) for r in rows], "per_scan.json")
        tracker.log_table([dict(r) for r in summary], "summary.json")
        for key in ("markdown", "summary_csv", "per_scan_csv"):
            tracker.log_artifact(str(paths[key]))
        for fig in paths.get("figures", []):
            tracker.log_artifact(str(fig), "figures")
        return tracker.run_id if getattr(tracker, "active", True) else None
