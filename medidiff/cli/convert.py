"""`medidiff convert`: every scan under a path to NIfTI files or derived DICOM series."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from medidiff.cli.root import app
from medidiff.io.dicom_read import pydicom_messages, warning_problems
from medidiff.io.dicom_write import write_dicom_series
from medidiff.io.discover import discover
from medidiff.io.errors import ScanError
from medidiff.io.kspace import KSpaceData
from medidiff.io.nifti import write_nifti


@app.command("convert")
def convert(
    path: Annotated[
        Path, typer.Argument(help="A scan file or a folder to walk (DICOM, NIfTI, fastMRI k-space).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if needed).")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Output format: 'nifti' (one .nii.gz per scan) or 'dicom' "
            "(one folder with a derived MR series per scan).",
        ),
    ] = "nifti",
) -> None:
    """Convert every scan under PATH, keeping its world geometry. k-space files are converted as their
    magnitude image. Problems are printed per file; the exit code is 1 when nothing could be converted."""
    to = to.lower()
    if to not in ("nifti", "dicom"):
        typer.echo(f"error: --to must be 'nifti' or 'dicom', not {to!r}", err=True)
        raise typer.Exit(2)
    if not path.exists():
        typer.echo(f"error: {path}: path does not exist", err=True)
        raise typer.Exit(2)
    sources = list(discover(path))
    converted, failed = 0, 0
    say = typer.echo  # plain lines on stdout (never wrapped); the progress bar goes to stderr
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        transient=True,
        console=Console(stderr=True),
        redirect_stdout=False,
        redirect_stderr=False,
    ) as progress:
        task = progress.add_task("converting", total=len(sources))
        for source in sources:
            progress.advance(task)
            if source.kind == "invalid":
                failed += 1
                say(f"skipped {source.path}: {'; '.join(source.problems)}")
                continue
            name = source.key.replace("/", "__")
            try:
                with pydicom_messages() as messages:  # never let pydicom print on stderr
                    target = _convert_one(source, out, to, name)
            except (ScanError, ValueError, OSError) as exc:
                failed += 1
                say(f"failed {source.path}: {getattr(exc, 'problem', exc)}")
                continue
            converted += 1
            for problem in dict.fromkeys(list(source.problems) + target[1] + warning_problems(messages)):
                say(f"note {source.path}: {problem}")
            say(f"wrote {target[0]}")
    typer.echo(f"{converted} scan(s) converted, {failed} not converted, into {out}")
    if converted == 0:
        raise typer.Exit(1)


def _convert_one(source, out: Path, to: str, name: str) -> tuple[Path, list[str]]:
    """Load one scan and write it; returns the output path and the problems found while loading."""
    scan = source.load()
    vol = scan.image() if isinstance(scan, KSpaceData) else scan
    if to == "nifti":
        target = write_nifti(vol, out / f"{_strip(name)}.nii.gz")
    else:
        target = out / _strip(name)
        write_dicom_series(
            vol,
            target,
            source=vol if vol.meta.get("dicom_header") is not None else None,
            series_description=(source.description or "medidiff")[:52] + " (converted)",
            derivation_description="Converted by medidiff convert; values rescaled "
            "to int16 with RescaleSlope/Intercept",
        )
    return target, list(vol.meta.get("problems") or [])


def _strip(name: str) -> str:
    """Output name of a scan key without NIfTI/HDF5 suffixes."""
    for suffix in (".nii.gz", ".nii", ".h5", ".hdf5", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
        if f"{suffix}-vol" in name.lower():
            i = name.lower().rindex(suffix)
            return name[:i] + name[i + len(suffix) :]
    return name
