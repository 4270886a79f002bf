"""`medidiff info`: list the scans under a path with their geometry and problems."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medidiff.cli.root import app


@app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A scan file (DICOM, .nii/.nii.gz, fastMRI .h5) or a folder.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a JSON list, one object per scan or unreadable file, with keys path, kind, "
            "shape, spacing, affine (4x4, RAS mm), modality, description, n_files, problems.",
        ),
    ] = False,
    max_voxels: Annotated[
        int | None,
        typer.Option("--max-voxels", min=1, help="Report scans declaring more voxels as too large "
                     "(default 2**29 or $MEDIDIFF_MAX_VOXELS)."),
    ] = None,
) -> None:
    """List the scans found under PATH: kind, shape, spacing, RAS affine, modality, description, file count
    and problems. Broken files are listed with their problem; the exit code is 0 whenever PATH could be
    scanned, 2 when it does not exist."""
    from medidiff.io import ScanError, discover, set_max_voxels

    if max_voxels is not None:
        set_max_voxels(max_voxels)
    if not path.exists():
        typer.echo(f"error: {path}: path does not exist", err=True)
        raise typer.Exit(2)
    try:
        rows = [_info(source) for source in discover(path)]
    except ScanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} scan(s) under {path}")
    for column in ("path", "kind", "shape", "spacing (mm)", "modality", "description", "files", "problems"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shape = "×".join(str(s) for s in row["shape"]) if row["shape"] else "-"
        spacing = " ".join(f"{s:.3g}" for s in row["spacing"]) if row["spacing"] else "-"
        problems = "; ".join(row["problems"])
        table.add_row(
            _short(row["path"], path),
            row["kind"],
            shape,
            spacing,
            row["modality"] or "-",
            row["description"],
            str(row["n_files"]),
            f"[red]{problems}[/red]" if problems else "ok",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def _info(source) -> dict:
    """The source's info row; a failure of one scan becomes that scan's problem, never the listing's."""
    try:
        return source.info()
    except (Exception, MemoryError) as exc:  # noqa: BLE001
        return {"path": str(source.path), "kind": "invalid", "shape": None, "spacing": None, "affine": None,
                "modality": None, "description": "", "n_files": len(getattr(source, "files", None) or [1]),
                "problems": [f"{type(exc).__name__}: {exc}"]}


def _short(p: str, root: Path) -> str:
    """The path relative to the scanned root when possible."""
    try:
        rel = Path(p).relative_to(root if root.is_dir() else root.parent)
        return str(rel) if str(rel) != "." else str(root)
    except ValueError:
        return p
