"""`medidiff train`: train a model from a recipe, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import typer

from medidiff.cli.root import app


@app.command(
    "train",
    help="Train a conditional diffusion model from a YAML recipe (pipelines/*.yaml).\n\n"
    "Writes OUT/checkpoint/ (for --resume: EMA + raw weights, optimiser and RNG state, all safetensors/JSON) "
    "and OUT/model/ (the deployable model: model.safetensors + config.json; pass it to `medidiff enhance "
    "--model`). One MLflow run per training: the recipe as params, loss and validation curves (PSNR/SSIM/"
    "NMSE/HFEN of model and degraded baseline), sample grids, system metrics and the final model. "
    "Several processes: `torchrun --nproc_per_node N -m medidiff train ...` (gloo on CPU, NCCL on GPUs).",
)
def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Recipe YAML, e.g. pipelines/sr_x2.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for checkpoint/ and model/."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Train to this step (default: train.steps of the recipe)."
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working "
        "directory).",
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue from OUT/checkpoint exactly: step, weights, optimiser, EMA, RNG (start a new run "
        "there, with --init-from if given, when OUT has no checkpoint yet: one command that restarts after "
        "a kill).",
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda."),
    init_from: Path | None = typer.Option(
        None, "--init-from",
        help="Start from the weights of this model folder (or a shipped model name such as recon_x4) "
        "instead of a random initialisation: fine-tuning.",
    ),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Stop (and save) after this many minutes of wall time."
    ),
) -> None:
    """Train a model."""
    from medidiff.diffusion.train import train
    from medidiff.recipe import RecipeError, load_recipe, with_overrides

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"--device must be auto, cpu or cuda, got {device!r}")
    try:
        recipe = load_recipe(config)
        if max_minutes is not None:
            recipe = with_overrides(recipe, train={"max_minutes": float(max_minutes)})
    except RecipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        result = train(recipe, out, max_steps=max_steps, tracking_uri=tracking_uri, resume=resume,
                       device=device, init_from=init_from)
    except (FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    val = ", ".join(
        f"{k.split('/')[-1]} {v:.4g}"
        for k, v in result.val.items()
        if k.endswith(("psnr", "psnr_baseline", "psnr_gain"))
    )
    typer.echo(f"trained {recipe.name} to step {result.step} in {result.seconds:.0f} s; "
               f"model: {result.model_dir}"
               + (f"; validation: {val}" if val else "")
               + (f"; MLflow run {result.run_id}" if result.run_id else ""))
