"""The `medidiff` command. Thin: parses arguments, calls the library, prints.

Each sub-command lives in its own module of this package and registers itself on ``app``
(:mod:`medidiff.cli.root`); importing this package registers them all.
"""

from medidiff.cli.root import app, main

# isort: split
from medidiff.cli import convert, data, demo, enhance, evaluate, info, simulate, train

__all__ = ["app", "convert", "data", "demo", "enhance", "evaluate", "info", "main", "simulate", "train"]
