"""`medidiff convert`: every scan under a path to NIfTI files or derived DICOM series."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from medidiff.cli.root import app

EXIT_SOME_FAILED = 3


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
    max_voxels: Annotated[
        int | None,
        typer.Option("--max-voxels", min=1, help="Refuse scans declaring more voxels "
                     "(default 2**29 or $MEDIDIFF_MAX_VOXELS)."),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Convert images holding NaN/Inf voxels (noted) instead of "
                     "refusing them."),
    ] = False,
) -> None:
    """Convert every scan under PATH, keeping its world geometry. k-space files are converted as their
    magnitude image. Every scan that cannot be converted is named with its problem and the others go on.
    Exit status: 0 all converted; 3 some scans not converted; 2 usage error."""
    from medidiff.io import ScanError, discover, set_max_voxels
    from medidiff.io.dicom_read import pydicom_messages, warning_problems

    if max_voxels is not None:
        set_max_voxels(max_voxels)
    to = to.lower()
    if to not in ("nifti", "dicom"):
        typer.echo(f"error: --to must be 'nifti' or 'dicom', not {to!r}", err=True)
        raise typer.Exit(2)
    if not path.exists():
        typer.echo(f"error: {path}: path does not exist", err=True)
        raise typer.Exit(2)
    for parent in (out.resolve(), *out.resolve().parents):
        if parent.exists():
            if not parent.is_dir():
                typer.echo(
                    f"error: {out}: cannot create the output folder, {parent} is not a folder", err=True
                )
                raise typer.Exit(2)
            break
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
                    target = _convert_one(source, out, to, name, allow_nonfinite)
            except ScanError as exc:
                failed += 1
                say(f"failed {source.path}: {exc.problem}")
                continue
            except (Exception, MemoryError) as exc:  # noqa: BLE001 - one scan never stops the others
                failed += 1
                say(f"failed {source.path}: {type(exc).__name__}: {exc}")
                continue
            converted += 1
            for problem in dict.fromkeys(list(source.problems) + target[1] + warning_problems(messages)):
                say(f"note {source.path}: {problem}")
            say(f"wrote {target[0]}")
    typer.echo(f"{converted} scan(s) converted, {failed} not converted, into {out}")
    if failed or converted == 0:
        raise typer.Exit(EXIT_SOME_FAILED)


def _convert_one(
    source, out: Path, to: str, name: str, allow_nonfinite: bool = False
) -> tuple[Path, list[str]]:
    """Load one scan and write it; returns the output path and the problems found while loading."""
    from medidiff.io import KSpaceData, write_dicom_series, write_nifti

    scan = source.load(allow_nonfinite=allow_nonfinite)
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
