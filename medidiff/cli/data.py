"""`medidiff data ...`: training data tools (synthetic cohort, preview of a recipe's training pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medidiff.cli.root import app
from medidiff.data.synth import head_shape, write_cohort

data_app = typer.Typer(
    name="data",
    help="Training data: synthetic subjects from the shipped MNI152 template (no download, no patient data) "
    "and a preview of the training pairs a recipe makes.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def synth(
    n: Annotated[int, typer.Option("--n", min=1, help="Number of synthetic subjects to write.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created if missing).")],
    seed: Annotated[int, typer.Option("--seed", help="Cohort seed: subject i uses seed*100000+i.")] = 0,
    downsample: Annotated[
        int,
        typer.Option(
            "--downsample", min=1, help="Integer downsampling of the 1 mm grid (2 = 2 mm, ~3x faster)."
        ),
    ] = 1,
) -> None:
    """Write N synthetic MR subjects as NIfTI (synth_<i>_seed<s>.nii.gz) for training or inspection.

    Each subject is the MNI152 anatomy with a random elastic deformation, random per-tissue contrast
    (T1-, T2-, PD-, FLAIR-like or random), fine texture, blur, bias field, intensity scale and Rician noise.
    The same --seed always gives the same files.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shape = None if downsample == 1 else tuple(max(1, s // downsample) for s in head_shape())
    try:
        with Progress(
            TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        ) as bar:
            task = bar.add_task("synth", total=n)
            paths = write_cohort(
                n, out, seed=seed, shape=shape, progress=lambda done, total: bar.update(task, completed=done)
            )
    except OSError as exc:
        typer.echo(f"error: cannot write to {out}: {exc}", err=True)
        raise typer.Exit(1) from None
    for p in paths:
        typer.echo(str(p))
    typer.echo(f"wrote {len(paths)} synthetic subject(s) to {out}")


@data_app.command("preview")
def preview(
    config: Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML, e.g. pipelines/sr_x2.yaml.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("preview.png"),
    n: Annotated[int, typer.Option("--n", min=1, max=64, help="Number of training pairs to show.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the drawn batch.")] = 0,
) -> None:
    """Write a figure of a batch of the recipe's training pairs: degraded | reference | residual per row.

    The pairs are made exactly as `medidiff train` makes them (operator, noise, intensity normalisation),
    from the recipe's data.mixture when set, else from its fixed training slices.
    """
    from medidiff.data.mixture import preview_figure
    from medidiff.data.pairs import preview_pairs
    from medidiff.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(config)
        pairs, titles = preview_pairs(recipe, n, seed)
    except RecipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        path = preview_figure([(d.numpy(), r.numpy()) for d, r in pairs], out, titles)
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {len(pairs)} training pairs of {recipe.name} to {path}")
