"""The `medidiff` Typer application that every command module registers itself on."""

from __future__ import annotations

import signal
import sys
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


class _Interrupted(BaseException):
    """Ctrl-C outside a batch: not a KeyboardInterrupt, so the CLI framework does not turn it into 'Aborted!'
    with exit 1 (atomic writers still unwind on it: they clean up on any BaseException)."""


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted


def main() -> None:
    """Entry point of the `medidiff` console script.

    Ctrl-C ends with one line and exit 130 whenever it comes (also while libraries load); `enhance` installs
    its own handlers while its batch runs, which finish or discard the file being written.
    """
    previous = signal.signal(signal.SIGINT, _interrupted)
    try:
        app()
    except _Interrupted:
        sys.stderr.write("stopped (Ctrl-C)\n")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGINT, previous)
