"""Reading what training, evaluation and batch runs left in MLflow, for the run-comparison notebook.

Only :mod:`medidiff.tracking` talks to MLflow; this module calls its read helpers and turns what they return
into tables and figures. It also runs the ``medidiff`` command for notebooks that need a short run first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_MLFLOW_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO (mlflow|alembic)")


class CommandError(RuntimeError):
    """A ``medidiff`` command run from a notebook failed; the message holds the command and its last output."""


def run_medidiff(
    args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, ok_codes: Iterable[int] = (0,),
    env: dict[str, str] | None = None, echo: bool = True, tail_lines: int = 40,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m medidiff ARGS`` as a user would, echo its output, raise :class:`CommandError` on failure."""
    import time

    command = [sys.executable, "-m", "medidiff", *map(str, args)]
    # Plain text: no colours or animated progress bars (ipykernel sets FORCE_COLOR for its children), so an
    # executed notebook keeps the final tables, not thousands of redraws.
    full_env = {key: value for key, value in os.environ.items()
                if key not in ("FORCE_COLOR", "CLICOLOR_FORCE", "CLICOLOR")}
    full_env.update({"COLUMNS": "120", "NO_COLOR": "1", "TTY_INTERACTIVE": "0", "TERM": "dumb", **(env or {})})
    if echo:
        print("$ medidiff " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo and not _MLFLOW_LOG.match(line):
            print(line, end="", flush=True)
    code = proc.wait()
    if echo:
        print(f"[{time.perf_counter() - start:.0f} s, exit status {code}]", flush=True)
    result = subprocess.CompletedProcess(command, code, "".join(lines), "")
    if code not in tuple(ok_codes):
        tail = "".join(lines[-tail_lines:])
        raise CommandError(f"`medidiff {' '.join(map(str, args))}` exited with status {code}:\n{tail}")
    return result


def default_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store the notebooks read: the argument, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the
    checkout's root (where `medidiff train` run from the repository writes), else ``mlflow.db`` here."""
    from medidiff.review.batch import find_project_root
    from medidiff.tracking import resolve_uri

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_uri(tracking_uri)
    root = find_project_root()
    return f"sqlite:///{root / 'mlflow.db'}" if root else resolve_uri(None)


def workspace(name: str) -> Path:
    """A folder for what a notebook writes: ``out/<name>`` at the checkout's root (git-ignored), else ``./<name>``."""
    from medidiff.review.batch import find_project_root

    root = find_project_root()
    folder = (root / "out" / name) if root else Path(name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------- reading
_RUN_COLUMNS = {"tags.mlflow.runName": "run_name", "tags.medidiff.kind": "kind", "tags.task": "task"}
_METHOD_STEPS = re.compile(r"^medidiff-(?P<steps>\d+)(?P<nodc>-nodc)?$")


def list_runs(kind: str | None = None, tracking_uri: str | None = None) -> Any:
    """Runs of one kind (train, evaluate, enhance, ...; None for all) as a DataFrame, newest first.

    Columns: run_id, run_name, kind, status, start_time, seconds, then ``params.*`` and ``metrics.*``.
    """
    import pandas as pd

    from medidiff.tracking import search_runs

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
    """Metric names logged by the given runs (DataFrame rows from :func:`list_runs`), system metrics excluded."""
    names = [c[len("metrics."):] for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any()]
    return [n for n in names if not n.startswith("system/")]


def training_curves(
    run_ids: Sequence[str] | None = None, metrics: Sequence[str] | None = None, *,
    tracking_uri: str | None = None, max_runs: int = 5, max_metrics: int = 6,
) -> Figure:
    """Curves of training runs against step: one panel per metric, one line per run (newest runs by default)."""
    from medidiff.tracking import metric_history

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
    for ax, name in zip(axes, names):
        baseline = f"{name}_baseline"
        for i, (_, run) in enumerate(runs.iterrows()):
            label = f"{run['run_name'] or ''} ({run['run_id'][:8]})"
            for key, style, suffix in ((name, "-", ""), (baseline, "--", " baseline")):
                history = metric_history(run["run_id"], key, tracking_uri=tracking_uri) if key in available else []
                if history:
                    steps, values = zip(*history)
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
    from medidiff.tracking import resolve_uri

    return resolve_uri(tracking_uri)


def evaluation_table(
    run_id: str | None = None, *, tracking_uri: str | None = None, per_scan: bool = False,
    dst: str | os.PathLike[str] | None = None,
) -> Any:
    """The methods table an evaluate run logged (``summary.json``; ``per_scan.json`` with ``per_scan=True``).

    Defaults to the newest finished evaluate run. The DataFrame's ``attrs`` hold ``run_id`` and ``task``.
    """
    import pandas as pd

    from medidiff.tracking import download_artifacts

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
    """Quality of medidiff against its sampling step count (with / without data consistency), baselines as lines."""
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
            ax.axhline(float(row[metric]), color=f"C{i + 2}", linestyle=styles[i % 3], label=str(row["method"]))
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


# ------------------------------------------------------------------------------- making runs for a demo
def recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """A recipe given as a path, or relative to the checkout (``pipelines/smoke.yaml`` works from any folder)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path.resolve()
    import medidiff

    candidate = Path(medidiff.__file__).resolve().parents[1] / path
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{recipe}: recipe not found (looked here and in {candidate.parent})")


def find_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The model folder that ``medidiff train --out folder`` wrote (``model/``; else the newest checkpoint), or None."""
    found = [cfg.parent for cfg in Path(folder).rglob("config.json") if any(cfg.parent.glob("*.safetensors"))]
    if not found:
        return None
    return max(found, key=lambda p: (p.name == "model", max(f.stat().st_mtime for f in p.glob("*.safetensors"))))


def shipped_model_available(task: str = "sr") -> bool:
    """True when the package ships a default diffusion model for ``task``."""
    try:
        from medidiff.models import default_model

        default_model(task)
    except Exception:  # noqa: BLE001 - missing weights or module: not available
        return False
    return True


def ensure_example_runs(
    tracking_uri: str | None = None, *, workdir: str | os.PathLike[str] | None = None,
    recipe: str = "pipelines/smoke.yaml", train_steps: int | None = None, eval_steps: str = "2,4",
    eval_scans: int = 1, eval_methods: str = "sinc,bicubic,medidiff", model: str | None = None,
) -> dict[str, Any]:
    """Make sure the store holds a finished training run and evaluate run, making short ones if it does not.

    Training runs ``medidiff train --config RECIPE``; evaluation runs ``medidiff evaluate --data shipped --task sr``
    on ``eval_scans`` held-out scans with the shipped model (or the model just trained when none is shipped).
    Returns what was found or made: ``{"uri", "train_run", "evaluate_run", "made": [...]}``.
    """
    from medidiff.tracking import resolve_uri

    uri = resolve_uri(tracking_uri)
    workdir = Path(workdir).resolve() if workdir is not None else workspace("compare_runs")
    made: list[str] = []
    train_run = latest_run_id("train", uri)
    if train_run is None:
        args = ["train", "--config", str(recipe_path(recipe)), "--out", str(workdir / "train"), "--tracking-uri", uri]
        if train_steps is not None:
            args += ["--max-steps", str(train_steps)]
        run_medidiff(args)
        train_run = latest_run_id("train", uri)
        made.append("train")
    evaluate_run = latest_run_id("evaluate", uri)
    if evaluate_run is None:
        if model is None and not shipped_model_available("sr"):
            trained = find_checkpoint(workdir / "train")
            model = str(trained) if trained else None
        args = ["evaluate", "--data", "shipped", "--task", "sr", "--methods", eval_methods, "--steps", eval_steps,
                "--max-scans", str(eval_scans), "--out", str(workdir / "evaluate"), "--tracking-uri", uri]
        if model:
            args += ["--model", model]
        run_medidiff(args)
        evaluate_run = latest_run_id("evaluate", uri)
        made.append("evaluate")
    return {"uri": uri, "train_run": train_run, "evaluate_run": evaluate_run, "made": made}


# ----------------------------------------------------------------------------- training on a user's folder
def example_scan_folder(folder: str | os.PathLike[str], n_scans: int = 3, slices: int = 12) -> Path:
    """A small folder of high-quality NIfTI scans made from shipped data (slabs of nilearn's MNI152 T1).

    Stands in for "your data" in the training notebook; nothing is downloaded. Existing files are kept.
    """
    import nibabel as nib
    import nilearn

    source = (Path(nilearn.__file__).parent / "datasets" / "data"
              / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.load(str(source))
    depth = image.shape[2]
    starts = np.linspace(depth * 0.3, depth * 0.65, n_scans).astype(int)
    for number, start in enumerate(starts, 1):
        path = folder / f"mni_slab_{number:02d}.nii.gz"
        if path.exists():
            continue
        slab = image.slicer[18:178, 20:212, int(start):int(start) + slices]  # 160 x 192 in-plane, affine kept
        data = np.asarray(slab.get_fdata(dtype=np.float32), dtype=np.float32)
        out = nib.Nifti1Image(data, slab.affine)
        out.set_qform(slab.affine, code=1)
        out.set_sform(slab.affine, code=1)
        out.header.set_xyzt_units("mm", "sec")
        tmp = path.with_name(f".{path.name}.tmp.nii.gz")
        nib.save(out, str(tmp))
        os.replace(tmp, path)
    return folder


def training_recipe(
    recipe: str | os.PathLike[str], out: str | os.PathLike[str], *, folders: Sequence[str | os.PathLike[str]] = (),
    steps: int | None = None, minutes: float | None = None,
) -> tuple[Path, list[str]]:
    """Write a copy of ``recipe`` with training settings changed; returns its path and notes for the reader.

    ``folders`` go into ``data.folders`` (as absolute paths): every scan found there joins the recipe's own
    training data (its synthetic subjects and shipped scans, if any).
    """
    import yaml

    from medidiff.diffusion.config import load_recipe

    data = yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8")) or {}
    notes: list[str] = []
    train = dict(data.get("train") or {})
    if steps is not None:  # about five validations and checkpoints whatever the length
        train["steps"] = int(steps)
        for key in ("val_every", "ckpt_every"):
            train[key] = max(int(train.get(key, 1)), int(steps) // 5, 1)
    if minutes is not None:
        train["max_minutes"] = float(minutes)
    data["train"] = train
    if folders:
        data["data"] = {**(data.get("data") or {}), "folders": [str(Path(f).resolve()) for f in folders]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_recipe(out)  # validate now, with the recipe loader's own messages
    return out, notes


def read_evaluation_report(folder: str | os.PathLike[str], per_scan: bool = False) -> Any:
    """The table `medidiff evaluate --out FOLDER` wrote (``summary.csv``, or ``per_scan.csv``) as a DataFrame."""
    import pandas as pd

    path = Path(folder) / ("per_scan.csv" if per_scan else "summary.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation table here; did `medidiff evaluate --out {folder}` finish?")
    return pd.read_csv(path)


def stage_inputs(
    simulated: str | os.PathLike[str], dst: str | os.PathLike[str], *, limit: int | None = 1,
    suffixes: Sequence[str] = ("_lr.nii.gz", "_kspace.h5"),
) -> Path:
    """Copy degraded inputs (not their references) from a `medidiff simulate` folder into ``dst`` for enhancing."""
    import shutil

    simulated, dst = Path(simulated), Path(dst)
    inputs = sorted(p for p in simulated.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not inputs:
        raise FileNotFoundError(f"{simulated}: no degraded inputs ({', '.join(suffixes)}) found")
    dst.mkdir(parents=True, exist_ok=True)
    for path in inputs[:limit]:
        target = dst / path.name
        if not target.exists():
            shutil.copy2(path, target)
    return dst
