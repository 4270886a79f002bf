"""The `medidiff` command. Thin: parses arguments, calls the library, prints.

Each sub-command lives in its own module of this package and registers itself on ``app``.
Heavy libraries are imported inside the command functions so `medidiff --help` stays fast.
"""

from __future__ import annotations

import importlib

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

_COMMAND_MODULES = ["info", "convert", "simulate", "data", "train", "enhance", "evaluate", "demo"]


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


for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"medidiff.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"medidiff.cli.{_name}":
            raise


def main() -> None:
    app()
