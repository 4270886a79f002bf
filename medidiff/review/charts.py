"""Reading what training, evaluation and batch runs left in MLflow, as tables and figures.

Only :mod:`medidiff.tracking` talks to MLflow; this module calls its read helpers and turns what they return
into DataFrames (pandas, imported when used) and matplotlib figures.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medidiff.tracking import download_artifacts, metric_history, resolve_uri, search_runs

_RUN_COLUMNS = {"tags.mlflow.runName": "run_name", "tags.medidiff.kind": "kind", "tags.task": "task"}
_METHOD_STEPS = re.compile(r"^medidiff-(?P<steps>\d+)(?P<nodc>-nodc)?$")


def list_runs(kind: str | None = None, tracking_uri: str | None = None) -> Any:
    """Runs of one kind (train, evaluate, enhance, ...; None for all) as a DataFrame, newest first.

    Columns: run_id, run_name, kind, status, start_time, seconds, then ``params.*`` and ``metrics.*``.
    """
    import pandas as pd

    frame = search_runs(f"medidiff-{kind}" if kind else None, tracking_uri=tracking_uri)
    if frame is None or len(frame) == 0:
        return pd.DataFrame(columns=["run_id", "run_name", "kind", "status", "start_time", "seconds"])
    frame = frame.rename(columns=_RUN_COLUMNS)
    for column in ("run_name", "kind"):
        if column not in frame:
            frame[column] = None
    frame["seconds"] = (frame["end_time"] - frame["start_time"]).dt.total_seconds()
    first = ["run_id", "run_name", "kind", "status", "start_time", "seconds"]
    rest = sorted(c for c in frame.columns if c.startswith(("params.", "metrics.")) and "system/" not in c)
    return frame.sort_values("start_time", ascending=False)[first + rest].reset_index(drop=True)


def latest_run_id(kind: str, tracking_uri: str | None = None, status: str = "FINISHED") -> str | None:
    """Id of the newest run of a kind with the given status, or None."""
    frame = list_runs(kind, tracking_uri)
    frame = frame[frame["status"] == status]
    return None if frame.empty else str(frame.iloc[0]["run_id"])


def curve_metrics(runs: Any) -> list[str]:
    """Metric names logged by the given runs, system metrics excluded.

    ``runs`` are DataFrame rows from :func:`list_runs`.
    """
    names = [
        c[len("metrics."):] for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any()
    ]
    return [n for n in names if not n.startswith("system/")]


def training_curves(
    run_ids: Sequence[str] | None = None, metrics: Sequence[str] | None = None, *,
    tracking_uri: str | None = None, max_runs: int = 5, max_metrics: int = 6,
) -> Figure:
    """Curves of training runs against step.

    One panel per metric, one line per run (newest runs by default).
    """
    runs = list_runs("train", tracking_uri)
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(list(run_ids))]
    else:
        runs = runs.head(max_runs)
    if runs.empty:
        raise LookupError(f"no training runs in the MLflow store {_uri(tracking_uri)}")
    available = set(curve_metrics(runs))
    if metrics is not None:
        names = list(metrics)
    else:
        names = _order_metrics([n for n in available if not n.endswith("_baseline")])[:max_metrics]
    if not names:
        raise LookupError("the selected training runs logged no metrics")
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        baseline = f"{name}_baseline"
        for i, (_, run) in enumerate(runs.iterrows()):
            label = f"{run['run_name'] or ''} ({run['run_id'][:8]})"
            for key, style, suffix in ((name, "-", ""), (baseline, "--", " baseline")):
                history = (
                    metric_history(run["run_id"], key, tracking_uri=tracking_uri) if key in available else []
                )
                if history:
                    steps, values = zip(*history, strict=True)
                    ax.plot(steps, values, style, color=f"C{i}", marker="." if len(steps) < 30 else None,
                            label=label + suffix)
        ax.set_title(name + (" (dashed: degraded baseline)" if baseline in available else ""), fontsize=9)
        ax.set_xlabel("training step")
        if "loss" in name:
            positive = [line.get_ydata() for line in ax.get_lines()]
            if positive and all(np.all(np.asarray(y) > 0) for y in positive):
                ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    fig.suptitle("training runs", fontsize=10)
    return fig


def _order_metrics(names: list[str]) -> list[str]:
    """Loss first, then PSNR-like metrics, then the rest (stable)."""
    def rank(name: str) -> int:
        lowered = name.lower()
        if "loss" in lowered:
            return 0
        if any(word in lowered for word in ("lr", "grad", "seconds")):
            return 5
        return next((i for i, word in enumerate(("psnr", "ssim", "nmse", "hfen"), 1) if word in lowered), 4)
    return sorted(names, key=rank)


def _uri(tracking_uri: str | None) -> str:
    return resolve_uri(tracking_uri)


def evaluation_table(
    run_id: str | None = None, *, tracking_uri: str | None = None, per_scan: bool = False,
    dst: str | os.PathLike[str] | None = None,
) -> Any:
    """The methods table an evaluate run logged (``summary.json``; ``per_scan.json`` with ``per_scan=True``).

    Defaults to the newest finished evaluate run. The DataFrame's ``attrs`` hold ``run_id`` and ``task``.
    """
    import pandas as pd

    if run_id is None:
        run_id = latest_run_id("evaluate", tracking_uri)
        if run_id is None:
            raise LookupError(f"no finished evaluate run in the MLflow store {_uri(tracking_uri)}")
    name = "per_scan.json" if per_scan else "summary.json"
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(run_id, name, dst or tmp, tracking_uri=tracking_uri)
        rows = json.loads(Path(local).read_text(encoding="utf-8"))
    frame = pd.DataFrame(rows)
    runs = list_runs("evaluate", tracking_uri)
    match = runs[runs["run_id"] == run_id]
    frame.attrs.update(run_id=run_id, task=None if match.empty else match.iloc[0].get("params.task"))
    return frame


def step_sweep(table: Any) -> Any:
    """medidiff rows of an evaluation table with their sampling steps and data-consistency flag parsed."""
    import pandas as pd

    records = []
    for _, row in table.iterrows():
        found = _METHOD_STEPS.match(str(row["method"]))
        if found:
            records.append({**row.to_dict(), "steps": int(found["steps"]), "dc": not found["nodc"]})
    return pd.DataFrame(records).sort_values(["dc", "steps"]) if records else pd.DataFrame()


def quality_vs_steps(table: Any, metric: str = "psnr") -> Figure:
    """Quality of medidiff against its sampling step count, baselines as lines.

    medidiff is shown with and without data consistency.
    """
    sweep = step_sweep(table)
    label = {"psnr": "PSNR (dB)", "ssim": "SSIM", "nmse": "NMSE", "hfen": "HFEN"}.get(metric, metric)
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    if sweep.empty or metric not in sweep:
        ax.text(0.5, 0.5, f"no medidiff step sweep with {metric} in this table", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    for dc, group in sweep.groupby("dc", sort=False):
        ax.plot(group["steps"], group[metric], marker="o",
                label="medidiff, data consistency" if dc else "medidiff, no data consistency")
    baselines = table[~table["method"].astype(str).str.startswith("medidiff")]
    styles = ["--", ":", "-."]
    for i, (_, row) in enumerate(baselines.iterrows()):
        if metric in row and pd_notna(row[metric]):
            ax.axhline(float(row[metric]), color=f"C{i + 2}", linestyle=styles[i % 3],
                       label=str(row["method"]))
    ax.set_xlabel("sampling steps (network evaluations per sample)")
    ax.set_ylabel(label)
    ax.set_xticks(sorted(sweep["steps"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    task = table.attrs.get("task")
    ax.set_title(f"quality against sampling steps{f' ({task})' if task else ''}", fontsize=10)
    return fig


def pd_notna(value: Any) -> bool:
    """True for a finite number."""
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def read_evaluation_report(folder: str | os.PathLike[str], per_scan: bool = False) -> Any:
    """The table `medidiff evaluate --out FOLDER` wrote, as a DataFrame.

    ``summary.csv``, or ``per_scan.csv`` with ``per_scan``.
    """
    import pandas as pd

    path = Path(folder) / ("per_scan.csv" if per_scan else "summary.csv")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no evaluation table here; did `medidiff evaluate --out {folder}` finish?"
        )
    return pd.read_csv(path)
