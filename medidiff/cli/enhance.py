"""`medidiff enhance`: the main job — enhance every scan under a folder (resumable, atomic, tracked, Ray)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medidiff.cli.root import app

EXIT_USAGE = 2

EXIT_STATUS_HELP = (
    "Exit status: 0 all scans succeeded; 3 some scans failed (each named with its problem in the summary "
    "and OUT/manifest.json); 2 usage error; 130 stopped by Ctrl-C (SIGINT); 143 stopped by SIGTERM. "
    "A stopped batch finishes or discards the file being written and prints "
    "'stopped; N done, M pending; rerun to continue'."
)


@app.command(
    "enhance",
    help="Enhance every scan under IN (DICOM series, NIfTI, fastMRI k-space) into OUT.\n\n"
    "Task auto: k-space → reconstruction (recon); slice spacing ≥ 2× in-plane → through-plane SR (sr_thick); "
    "otherwise in-plane SR ×2 (sr). Outputs mirror IN's folders under OUT: <scan>_enhanced.nii.gz, "
    "<scan>_baseline.nii.gz (the 'before' image), <scan>_residual.nii.gz (data-consistency residual), "
    "<scan>_uncertainty.nii.gz (with --samples > 1) and <scan>_enhanced_dicom/ (a derived DICOM series). "
    "OUT/manifest.json records every scan; OUT/report.html shows them. Rerunning resumes: finished scans are "
    "skipped (by input fingerprint and settings), interrupted ones redone. IN is never written to. "
    + EXIT_STATUS_HELP,
)
def enhance(
    input_dir: Path = typer.Argument(
        ..., help="Folder to scan recursively for DICOM, NIfTI and k-space files."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must not be inside IN)."),
    task: str = typer.Option(
        "auto", "--task", help="auto | sr (in-plane ×2) | sr_thick (through-plane) | recon."
    ),
    fmt: str = typer.Option(
        "both", "--format", help="nifti | dicom | both: how the enhanced image is written."
    ),
    samples: int = typer.Option(
        1, "--samples", "-k", min=1, help="Diffusion samples per scan; K > 1 also writes an uncertainty map "
        "(a calibrated interval half-width where the model ships a calibration: the shipped SR and "
        "reconstruction models carry one for K = 4 and one for K = 8; K = 8 ranks the error best). Costs K "
        "times the network time."
    ),
    steps: int | None = typer.Option(
        None, "--steps", min=1,
        help="Sampling steps = network evaluations per sample (default: the model's: 2 for SR, 1 for "
        "through-plane SR, 4 for reconstruction). --steps 1 halves SR's network time for a little quality "
        "out of domain (see the README's quality-vs-NFE tables).",
    ),
    factor: int | None = typer.Option(
        None,
        "--factor",
        min=2,
        help="Super-resolution factor you expect (with --task sr or sr_thick). The factor is the model's "
        "(shipped: in-plane ×2, through-plane ×4); a model for another factor is refused before anything "
        "runs.",
    ),
    model: list[str] | None = typer.Option(
        None,
        "--model",
        help="Checkpoint folder or shipped model name; replaces the shipped model of the task it was "
        "trained for (repeat for several tasks).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Batch seed; each scan's seed derives from it and the scan key."
    ),
    engine: str = typer.Option("local", "--engine", help="local (this process) | ray (actor pool)."),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray cluster address to join (e.g. 'auto' or HOST:6379); default starts a local Ray.",
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Ray actors (default: one per GPU, else one per CPU)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch threads per worker (default: CPUs - 1 for local, the actor's CPUs for ray).",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (GPU when visible) | cpu | cuda: where the models run."
    ),
    force: bool = typer.Option(False, "--force", help="Redo scans already done."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be done, write nothing."),
    tracking_uri: str | None = typer.Option(
        None,
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).",
    ),
    decode_timeout: float = typer.Option(
        300.0,
        "--decode-timeout",
        min=1.0,
        help="Seconds allowed to decode one scan (in an isolated process).",
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write OUT/report.html."),
    max_voxels: int | None = typer.Option(
        None,
        "--max-voxels",
        min=1,
        help="Refuse scans declaring more voxels (default 2**29, or $MEDIDIFF_MAX_VOXELS).",
    ),
    log_paths: bool = typer.Option(
        False, "--log-paths", help="Log scan keys (paths under IN) to MLflow; by default only their hashes."
    ),
    adapt: bool | None = typer.Option(
        None, "--adapt/--no-adapt",
        help="Fine-tune a copy of the model briefly on pairs made from each scan "
        "first (in-plane SR: the scan degraded once more; through-plane: its sharp in-plane axes; recon: its "
        "measured k-space split in two). The shipped weights are never changed. Default: the model's own "
        "choice, on for reconstruction (where it was measured to pay) and off for SR. A fixed number of "
        "steps, so results do not depend on the machine.",
    ),
    adapt_seconds: float | None = typer.Option(
        None, "--adapt-seconds", min=0.1,
        help="Safety time box of the adaptation per scan: it stops early when this runs out (default: 4x "
        "what the step budget takes on 2 CPU cores: 120 s).",
    ),
    gate: bool = typer.Option(
        True, "--gate/--no-gate",
        help="Do-no-harm gate (default on): where the scan's own held-out self-check "
        "does not predict a gain, the classical image comes back and the manifest says why."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="auto | fp32 | bf16: arithmetic of the network. auto uses bf16 where the "
        "CPU or GPU has native bf16 (about 2x faster on CPU, < 0.02 dB); on other CPUs the network runs in "
        "ONNX Runtime, fp32 (about 1.5x torch's fp32); fp32 runs it in torch. Data consistency always runs "
        "in fp32."
    ),
    self_ensemble: int | None = typer.Option(
        None, "--self-ensemble", min=1, max=4,
        help="Through-plane SR only: enhance 1, 2 or 4 flipped copies of each image (none; along the thick "
        "axis; along either axis and both), flip back and average. Costs that many network evaluations; "
        "default: the model's (4 for the shipped sr_thick_x4, measured to pay on the held-out and "
        "out-of-domain panels). Ignored by the other tasks.",
    ),
) -> None:
    """Enhance every scan under IN into OUT."""
    # heavy modules (torch, MLflow, matplotlib) load only when the command runs: `--help` stays fast
    from medidiff.io.limits import set_max_voxels
    from medidiff.pipeline.batch import BatchStopped, BatchUsageError, run_batch
    from medidiff.pipeline.settings import EnhanceSettings
    from medidiff.review.report import preview_strip, write_report

    console = Console(stderr=True)
    try:
        if max_voxels is not None:
            set_max_voxels(max_voxels)
        settings = EnhanceSettings(
            task=task,
            fmt=fmt,
            samples=samples,
            steps=steps,
            models=tuple(model or ()),
            seed=seed,
            decode_timeout_s=decode_timeout,
            adapt=adapt,
            adapt_seconds=adapt_seconds,
            gate=gate,
            precision=precision,
            self_ensemble=self_ensemble,
        )
        if factor is not None:
            _check_factor(factor, task, tuple(model or ()))
        if engine not in ("local", "ray"):
            raise BatchUsageError(f"--engine must be local or ray, got {engine!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise BatchUsageError(f"--device must be auto, cpu or cuda, got {device!r}")
        if address and engine != "ray":
            raise BatchUsageError("--address needs --engine ray")
    except (BatchUsageError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        summary = run_batch(
            input_dir,
            out,
            settings,
            engine=engine,
            address=address,
            force=force,
            dry_run=dry_run,
            tracking_uri=tracking_uri,
            num_workers=workers,
            threads=threads,
            device=device,
            console=console,
            log_paths=log_paths,
            report=None if no_report else write_report,
            preview=preview_strip,
        )
    except BatchUsageError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except BatchStopped as stop:
        console.print(str(stop), markup=False)
        raise typer.Exit(stop.exit_code) from None
    if not dry_run:
        console.print(f"manifest: {summary.manifest}")
        if summary.report:
            console.print(f"report:   {summary.report}")
    raise typer.Exit(summary.exit_code)


def _check_factor(factor: int, task: str, models: tuple[str, ...]) -> None:
    """Refuse --factor when the model that would run for the SR task does another factor."""
    from medidiff.models import DEFAULT_MODELS, read_config, weights_dir
    from medidiff.pipeline.batch import BatchUsageError

    if task not in ("sr", "sr_thick"):
        raise BatchUsageError(f"--factor needs --task sr or --task sr_thick (got --task {task})")
    chosen = weights_dir() / DEFAULT_MODELS[task]
    for name in models:
        path = Path(name) if Path(name).exists() else weights_dir() / name
        if read_config(path)["recipe"]["task"]["kind"] == task:
            chosen = path
    model_factor = int(read_config(chosen)["recipe"]["task"]["factor"])
    if model_factor != factor:
        raise BatchUsageError(
            f"--factor {factor}: the model for task {task} ({chosen.name}) does factor {model_factor}; "
            f"train one for x{factor} (pipelines/*.yaml, task.factor) and pass it with --model"
        )
