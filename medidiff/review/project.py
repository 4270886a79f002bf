"""Where notebooks read and write: the medidiff checkout they run in, its MLflow store, a work folder."""

from __future__ import annotations

import os
from pathlib import Path

from medidiff.tracking import resolve_uri


def find_project_root(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The medidiff checkout containing ``start`` (default: the working directory), or None outside one."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "medidiff" / "__init__.py").is_file():
            return folder
    return None


def default_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store the notebooks read: the argument, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the
    checkout's root (where `medidiff train` run from the repository writes), else ``mlflow.db`` here."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_uri(tracking_uri)
    root = find_project_root()
    return f"sqlite:///{root / 'mlflow.db'}" if root else resolve_uri(None)


def workspace(name: str) -> Path:
    """A folder for what a notebook writes.

    ``out/<name>`` at the checkout's root (git-ignored), else ``./<name>``.
    """
    root = find_project_root()
    folder = (root / "out" / name) if root else Path(name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
