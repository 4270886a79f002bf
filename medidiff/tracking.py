"""MLflow tracking: the only module that imports mlflow. Everything logged passes the PHI scrubber.

``tracking_run(kind)`` opens one run per job. The store is ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` or
a local SQLite file ``mlflow.db`` in the working directory; new experiments of a SQLite store keep their
artifacts in ``mlartifacts/`` beside the database file (not in ``./mlruns`` of the working directory). If
the server cannot be reached (or mlflow is not installed) the job goes on with a no-op tracker after one
warning; a failure mid-run does the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_PHI = re.compile(r"patient[\W_]*(name|id|birth[\W_]*date)|accession[\W_]*number|\bdob\b", re.IGNORECASE)


def scrub(value: Any) -> Any:
    """Drop keys and values that look like patient identifiers.

    PatientName, PatientID, birth date, accession.
    """
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not _PHI.search(str(k)) and not _looks_phi(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v) for v in value if not _looks_phi(v))
    if isinstance(value, str) and _looks_phi(value):
        return "[removed]"
    return value


def _looks_phi(value: Any) -> bool:
    return isinstance(value, str) and bool(_PHI.search(value))


def _scrub_text(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not _PHI.search(line))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_uri(tracking_uri: str | None = None) -> str:
    """The argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _reachable(uri: str) -> str | None:
    """None if the store looks usable, else the reason."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as resp:
                if resp.status != 200:
                    return f"health check answered {resp.status}"
        except Exception as exc:  # noqa: BLE001 - any network failure means unreachable
            return str(exc)
    return None


def sqlite_artifact_root(uri: str) -> str | None:
    """For a ``sqlite:///PATH`` store, ``file://`` URI of the ``mlartifacts/`` folder beside the database.

    None for any other store.

    A relative PATH resolves against the current working directory, as SQLAlchemy does.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = uri[len(prefix):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).expanduser().absolute().parent / "mlartifacts").as_uri()


def _use_experiment(mlflow_module: Any, name: str, uri: str) -> None:
    """Make ``name`` the active experiment.

    A new one in a SQLite store keeps its artifacts beside the database.

    Without this MLflow would put them in ``./mlruns`` of whatever the working directory is; experiments that
    already exist keep their artifact location.
    """
    root = sqlite_artifact_root(uri)
    if root is not None and mlflow_module.get_experiment_by_name(name) is None:
        with contextlib.suppress(Exception):  # made meanwhile by another process: use that one
            mlflow_module.create_experiment(name, artifact_location=root)
    mlflow_module.set_experiment(name)


class Tracker:
    """Logging handle of one run; every method is a no-op when ``active`` is False."""

    def __init__(self, mlflow_module: Any = None, run: Any = None, uri: str = "") -> None:
        self._mlflow, self._run, self.uri = mlflow_module, run, uri
        self._warned = False

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        return self._run.info.run_id if self._run is not None else None

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the job
            if not self._warned:
                warnings.warn(
                    f"MLflow tracking at {self.uri} failed ({what}: {exc}); going on without tracking",
                    stacklevel=3,
                )
                self._warned = True
            self._run = None
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log (nested) parameters, flattened with dots."""
        if not self.active:
            return
        flat = {
            k: (json.dumps(v) if isinstance(v, (list, tuple)) else v)
            for k, v in _flatten(scrub(params)).items()
        }
        self._call("log_params", self._mlflow.log_params, flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-finite values are skipped)."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in scrub(metrics).items() if v is not None and np.isfinite(float(v))}
        self._call("log_metrics", self._mlflow.log_metrics, clean, step=step)

    def log_image(self, image: Any, path: str) -> None:
        """Log a 2D/RGB array (scaled to uint8) or a matplotlib figure as an artifact file."""
        if not self.active:
            return
        if hasattr(image, "savefig"):
            self._call("log_figure", self._mlflow.log_figure, image, path)
            return
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a8 = np.clip((a - lo) / (hi - lo if hi > lo else 1.0) * 255, 0, 255).astype(np.uint8)
        self._call("log_image", self._mlflow.log_image, a8, artifact_file=path)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Log a file or a whole folder."""
        if not self.active:
            return
        path = Path(path)
        fn = self._mlflow.log_artifacts if path.is_dir() else self._mlflow.log_artifact
        self._call("log_artifact", fn, str(path), subdir)

    def log_table(self, rows: list[dict[str, Any]], path: str) -> None:
        """Log rows of a table (JSON or CSV by extension)."""
        rows = [scrub(r) for r in rows]
        if path.endswith(".csv"):
            import csv
            import io

            buf = io.StringIO()
            keys = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            self.log_text(buf.getvalue(), path)
        else:
            self.log_text(json.dumps(rows, indent=2, default=str), path)

    def log_text(self, text: str, path: str) -> None:
        """Log text (lines that look like patient identifiers are dropped)."""
        if not self.active:
            return
        self._call("log_text", self._mlflow.log_text, _scrub_text(text), path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""
        if not self.active:
            return
        self._call("set_tags", self._mlflow.set_tags, {k: str(v) for k, v in scrub(tags).items()})

    def register_model(self, artifact_path: str, name: str) -> None:
        """Register an artifact folder of this run as a model version in the MLflow registry."""
        if not self.active:
            return
        uri = f"runs:/{self.run_id}/{artifact_path}"
        self._call("register_model", self._mlflow.register_model, uri, name)


_NO_MLFLOW_WARNED = False


@contextlib.contextmanager
def tracking_run(kind: str, *, run_name: str | None = None, tracking_uri: str | None = None,
                 params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
                 system_metrics: bool = True, resume_run_id: str | None = None) -> Iterator[Tracker]:
    """One MLflow run in experiment ``medidiff-<kind>``; yields a Tracker (a no-op one when tracking fails).

    ``resume_run_id`` continues an earlier run of the same store (``train --resume``) when it exists there.
    """
    global _NO_MLFLOW_WARNED
    uri = resolve_uri(tracking_uri)
    try:
        import mlflow
    except ImportError:
        if not _NO_MLFLOW_WARNED:
            warnings.warn("mlflow is not installed; running without tracking", stacklevel=3)
            _NO_MLFLOW_WARNED = True
        yield Tracker()
        return
    problem = _reachable(uri)
    if problem is not None:
        warnings.warn(
            f"MLflow tracking server {uri} is unreachable ({problem}); "
            f"medidiff {kind} goes on without tracking",
            stacklevel=3,
        )
        yield Tracker()
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    run = None
    try:
        mlflow.set_tracking_uri(uri)
        _use_experiment(mlflow, f"medidiff-{kind}", uri)
        use_sys = system_metrics
        if use_sys:
            try:
                import psutil  # noqa: F401
            except ImportError:
                use_sys = False
        if resume_run_id:
            try:
                run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=use_sys)
                params = None  # logged when the run began (MLflow params cannot change)
            except Exception:  # noqa: BLE001 - not in this store: start a new run
                run = None
        if run is None:
            run = mlflow.start_run(run_name=run_name, log_system_metrics=use_sys)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"MLflow tracking at {uri} failed to start a run ({exc}); going on without tracking",
                      stacklevel=3)
        yield Tracker()
        return
    tracker = Tracker(mlflow, run, uri)
    status = "FINISHED"
    try:
        if params:
            tracker.log_params(params)
        tracker.set_tags({"medidiff.kind": kind, **(tags or {})})
        yield tracker
    except Exception:
        status = "FAILED"
        raise
    except BaseException:  # Ctrl-C / SIGTERM: the job was stopped, not broken
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


# ---- read helpers for the review notebooks -------------------------------------------------------

def search_runs(experiment: str | None = None, tracking_uri: str | None = None):
    """All runs (of one experiment, e.g. ``medidiff-train``) as a pandas DataFrame, newest first."""
    import mlflow

    client_uri = resolve_uri(tracking_uri)
    mlflow.set_tracking_uri(client_uri)
    if experiment is None:
        return mlflow.search_runs(search_all_experiments=True)
    return mlflow.search_runs(experiment_names=[experiment])


def metric_history(run_id: str, key: str, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of one run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri))
    return [(int(m.step), float(m.value)) for m in sorted(client.get_metric_history(run_id, key),
                                                          key=lambda m: (m.step, m.timestamp))]


def download_artifacts(run_id: str, path: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Copy an artifact (file or folder) of a run to ``dst``; returns the local path."""
    import mlflow

    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                tracking_uri=resolve_uri(tracking_uri))
    return Path(local)
