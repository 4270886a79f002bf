"""The `medidiff` command. Thin: parses arguments, calls the library, prints.

Each sub-command lives in its own module of this package and registers itself on ``app``
(:mod:`medidiff.cli.root`); importing this package registers them all.
"""

from medidiff.cli.root import app, main

# `medidiff --help` lists the commands in the order they are imported: a user's workflow order.
# isort: off
from medidiff.cli import info, convert, simulate, train, enhance, evaluate, demo, data
# isort: on

__all__ = ["app", "convert", "data", "demo", "enhance", "evaluate", "info", "main", "simulate", "train"]
