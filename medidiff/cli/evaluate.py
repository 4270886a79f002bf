"""`medidiff evaluate`: methods side by side on held-out scans; Markdown/CSV table, figures, MLflow run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medidiff.cli.root import app

if TYPE_CHECKING:
    from rich.console import Console

    from medidiff.evaluation.compare import Case, Method


def _split(text: str | None) -> list[str]:
    """'a,b c' -> ['a', 'b', 'c']."""
    return [t for t in (text or "").replace(",", " ").split() if t]


def _ints(text: str | None, option: str, example: str) -> list[int] | None:
    """The integers of a list option (None when not given); a usage error naming the option otherwise."""
    if not text:
        return None
    try:
        return [int(t) for t in _split(text)]
    except ValueError:
        raise typer.BadParameter(f"{option} must be integers like {example}, got {text!r}") from None


@app.command("evaluate")
def evaluate(
    data: str = typer.Option(
        ..., "--data",
        help="Folder written by `medidiff simulate` (<stem>_lr.nii.gz or "
        "<stem>_kspace.h5 beside <stem>_ref.nii.gz), or 'shipped': every shipped real MR "
        "volume no model trained on, each slice a case, degraded on the fly (SR x2 k-space "
        "truncation; through-plane x4 slice profile; recon x4 equispaced, 8 % centre).",
    ),
    task: str = typer.Option(
        ..., "--task",
        help="sr (in-plane super-resolution), sr_thick (through-plane x4) or recon (undersampled k-space).",
    ),
    panel: str = typer.Option(
        "heldout", "--panel",
        help="With --data shipped: 'heldout' (the held-out real slices), 'ood' (held-out natural images and "
        "phantom with Rician MR noise, and held-out real slices resampled to 0.3 mm and 2 mm pixels), "
        "'lesions' (lesions planted in held-out scans: contrast kept, CNR, invented blobs, flag "
        "precision/recall; sr or recon) or 'trust' (lesions plus calibration of the uncertainty against "
        "--samples).",
    ),
    samples: str = typer.Option(
        "4", "--samples", help="--panel trust: K values to calibrate, e.g. 2,4,8 (each costs K x the time).",
    ),
    save_calibration: str | None = typer.Option(
        None, "--save-calibration",
        help="--panel trust: write the calibrations made with these K (e.g. 4 or 4,8; each must be in "
        "--samples) into the model's folder: the first as its default calibration.json, the others as "
        "calibration_k<K>.json, which `medidiff enhance --samples K` uses for that K.",
    ),
    max_slices: int = typer.Option(
        8, "--max-slices",
        help="With --data shipped: at most this many slices per volume, evenly spread (0: all).",
    ),
    adapt_variant: bool = typer.Option(
        True, "--adapt-variant/--no-adapt-variant",
        help="Also run medidiff with per-scan adaptation (--adapt).",
    ),
    adapt_seconds: float | None = typer.Option(
        None, "--adapt-seconds",
        help="Adaptation time box per case (default: scaled by the scan size, see `medidiff enhance`).",
    ),
    out: str = typer.Option(
        ..., "--out", help="Report folder: report.md, summary.csv, per_scan.csv, figures/."
    ),
    methods: str | None = typer.Option(
        None, "--methods",
        help="Comma-separated subset. sr: sinc,bicubic,unet,"
        "medidiff; recon: zero-filled,cs,unet,medidiff. Default: all available.",
    ),
    steps: str | None = typer.Option(
        None, "--steps",
        help="medidiff sampling step counts to compare, e.g. 1,2,4 (a quality-vs-NFE curve). Default: the "
        "model's own step count.",
    ),
    self_ensemble: str | None = typer.Option(
        None, "--self-ensemble",
        help="Through-plane SR: self-ensemble sizes to compare, e.g. 1,2,4 (flipped copies averaged; each "
        "costs that many network evaluations). Default: the model's own.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="medidiff model folder or name (default: the shipped model for the task)."
    ),
    dc_variant: bool = typer.Option(
        True, "--dc-variant/--no-dc-variant",
        help="Also run medidiff without data "
        "consistency (default); --no-dc-variant runs only the DC version.",
    ),
    unet: str | None = typer.Option(
        None, "--unet",
        help="Regression U-Net checkpoint folder (default: medidiff/weights/unet_<task> if shipped).",
    ),
    cs_lambda: float | None = typer.Option(
        None, "--cs-lambda",
        help="Fix the compressed-sensing weight instead of tuning it on held-in training slices.",
    ),
    cs_iters: int | None = typer.Option(
        None, "--cs-iters", help="Compressed-sensing iterations (default 100)."
    ),
    max_scans: int | None = typer.Option(None, "--max-scans", help="Evaluate only the first N scans."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the learned methods."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch CPU threads (1 is fastest on a shared "
                                "2-core machine; more for a machine of your own)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and on-the-fly simulation."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: "
                                               "MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)."),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="Log one MLflow run with the tables "
                                  "and figures."),
) -> None:
    """Compare medidiff with classical and learned baselines on the same inputs (fastMRI metrics + HFEN).

    Prints the mean table (Markdown) and writes per-scan and mean tables, comparison figures and,
    unless --no-tracking, one MLflow run holding all of them.
    """
    import torch
    from rich.console import Console

    torch.set_num_threads(threads)
    err = Console(stderr=True)
    if task not in ("sr", "sr_thick", "recon"):
        raise typer.BadParameter(f"--task must be 'sr', 'sr_thick' or 'recon', got {task!r}")
    if panel not in ("heldout", "ood", "lesions", "trust"):
        raise typer.BadParameter(f"--panel must be 'heldout', 'ood', 'lesions' or 'trust', got {panel!r}")
    if panel in ("lesions", "trust"):
        _trust(err, task, panel, model, out, samples, save_calibration, seed)
        return
    from medidiff.recipe import SELF_ENSEMBLES

    step_list = _ints(steps, "--steps", "4,10") or [_model_steps(task, model)]
    ensembles = _ints(self_ensemble, "--self-ensemble", "1,2,4")
    if ensembles and (task != "sr_thick" or any(e not in SELF_ENSEMBLES for e in ensembles)):
        raise typer.BadParameter("--self-ensemble takes sizes 1, 2 or 4, for --task sr_thick only")
    options = {"steps": step_list, "self_ensembles": ensembles, "model": model, "dc_variant": dc_variant,
               "unet_dir": unet,
               "cs_lambda": cs_lambda, "cs_iters": cs_iters, "device": device, "adapt_variant": adapt_variant,
               "adapt_seconds": adapt_seconds}
    cases, method_objs, notes = _prepare(err, data, task, max_scans, _split(methods) or None, seed, options,
                                         panel, max_slices)
    rows, outputs = _run(err, cases, method_objs)
    _report(err, out, data, task, cases, method_objs, rows, outputs, notes, step_list, seed, device,
            tracking_uri, tracking)


def _model_steps(task: str, model: str | None) -> int:
    """The default sampling step count of the model evaluate would use."""
    from medidiff.models import default_model, load_model

    return int((load_model(model) if model else default_model(task)).recipe.diffusion.steps)


def _trust(err: Console, task: str, panel: str, model: str | None, out: str, samples: str,
           save_calibration: str | None, seed: int) -> None:
    """The lesion panel (and, for 'trust', the calibration against K) for the sr or recon model."""
    from medidiff.cli.trust import run_trust_panels
    from medidiff.models import default_model, load_model

    if task not in ("sr", "recon"):
        raise typer.BadParameter(f"--panel {panel} covers --task sr and recon, got {task!r}")
    ks = _ints(samples, "--samples", "2,4,8") or []
    save_ks = _ints(save_calibration, "--save-calibration", "4 or 4,8")
    if save_ks and not set(save_ks) <= set(ks):
        raise typer.BadParameter(f"--save-calibration {save_calibration} needs each K in --samples {samples}")
    loaded = load_model(model) if model else default_model(task)
    command = "medidiff " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_trust_panels(loaded, task, Path(out), samples=ks, save_k=save_ks,
                              lesions_only=panel == "lesions", seed=seed, command=command)
    err.print(f"report: {report}")


def _prepare(err: Console, data: str, task: str, max_scans: int | None, methods: list[str] | None, seed: int,
             options: dict[str, Any], panel: str = "heldout",
             max_slices: int = 8) -> tuple[list[Case], list[Method], list[str]]:
    """The cases and the methods to run on them (with notes on skipped methods); exits 2 when none can run."""
    from medidiff.evaluation.compare import EvaluationError, build_methods, load_cases, panel_cases
    from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

    notes: list[str] = []
    try:
        if data == "shipped":
            cases = panel_cases(task, panel, max_slices or None, seed=seed)
            if task == "sr_thick":
                notes.append("through-plane cases: each 2D slice's second axis is taken as the slice "
                             "direction and thickened x4 by the slice profile (the shipped volumes have too "
                             "few slices for their own through-plane axis)")
        elif panel != "heldout":
            raise EvaluationError("--panel needs --data shipped")
        else:
            cases = load_cases(data, task)
        if max_scans:
            cases = cases[:max_scans]
        with err.status("preparing methods (CS lambda tuning, models)..."):
            enhance = enhance_kspace if task == "recon" else enhance_volume
            method_objs = build_methods(
                task, cases, methods, seed=seed, notes=notes, enhance=enhance, **options
            )
    except EvaluationError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except ImportError as exc:  # an optional dependency this evaluation needs is not installed
        err.print(f"[red]error:[/red] --data {data} --task {task} needs {exc.name or exc}: {exc}")
        raise typer.Exit(2) from None
    for n in notes:
        err.print(f"[yellow]note:[/yellow] {n}")
    if not method_objs:
        err.print("[red]error:[/red] no method could be run")
        raise typer.Exit(2)
    return cases, method_objs, notes


def _run(err: Console, cases: list[Case], method_objs: list[Method]) -> tuple[list[dict[str, Any]], dict]:
    """Every method on every case, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medidiff.evaluation.compare import evaluate_cases

    total = len(cases) * len(method_objs)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as bar:
        job = bar.add_task("evaluating", total=total)
        state = {"first": True}

        def tick(scan: str, method: str) -> None:
            if not state["first"]:
                bar.advance(job)
            state["first"] = False
            bar.update(job, description=f"{method} on {scan}")

        rows, outputs = evaluate_cases(cases, method_objs, progress=tick)
        bar.update(job, completed=total, description="done")
    return rows, outputs


def _report(err: Console, out: str, data: str, task: str, cases: list[Case], method_objs: list[Method],
            rows: list[dict[str, Any]], outputs: dict, notes: list[str], step_list: list[int], seed: int,
            device: str, tracking_uri: str | None, tracking: bool) -> None:
    """Write the tables and figures, log the MLflow run, print the mean table and any failures."""
    from medidiff.evaluation.compare import summarise
    from medidiff.evaluation.report import log_to_mlflow, write_report

    order = [m.name for m in method_objs]
    summary = summarise(rows, order)
    command = "medidiff " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_report(
        out, task=task, rows=rows, summary=summary, outputs=outputs,
        references={c.name: c.reference for c in cases}, slice_axes={c.name: c.slice_axis for c in cases},
        notes=notes, command=command,
    )
    if tracking:
        params = {"task": task, "data": "shipped" if data == "shipped" else Path(data).name,
                  "methods": ",".join(order), "steps": ",".join(map(str, step_list)), "scans": len(cases),
                  "seed": seed, "device": device}
        for m in method_objs:
            params.update({f"{m.name}.{k}": v for k, v in m.params.items()})
        run_id = log_to_mlflow(paths, task=task, summary=summary, rows=rows, params=params,
                               tracking_uri=tracking_uri)
        if run_id:
            err.print(f"MLflow run {run_id}")
    typer.echo(paths["delta_table"])
    typer.echo("")
    for line in paths["gate"]:
        typer.echo(f"- gate {line}")
    typer.echo(paths["mean_table"])
    for line in paths["checks"]:
        typer.echo(f"- {line}")
    failures = [r for r in rows if "error" in r]
    for r in failures:
        err.print(f"[red]failed:[/red] {r['method']} on {r['scan']}: {r['error']}")
    err.print(f"report: {paths['markdown']}")
