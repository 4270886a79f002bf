"""The `medidiff` Typer application that every command module registers itself on."""

from __future__ import annotations

import warnings

import typer

from medidiff import __version__

app = typer.Typer(
    name="medidiff",
    help="Conditional diffusion for MRI: super-resolution and reconstruction with data consistency "
    "and uncertainty. Reads DICOM / NIfTI / fastMRI k-space, writes NIfTI and derived DICOM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medidiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """medidiff command line."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings reach a command-line user as one plain line, without Python's source location."""
    return f"warning: {message}\n"


def main() -> None:
    """Entry point of the `medidiff` console script."""
    app()
