"""A folder named after a patient never reaches MLflow unless asked (`--log-paths`).

A real local MLflow store (SQLite + artifact folder) is searched byte by byte — parameters, tags, metric
names, the metrics table, figures, every artifact — for the planted name after a batch over
``PID-123_Name^Surname/``. The user's own files in OUT (manifest.json) keep the paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.batch_messy_folder import _nifti
from tests.pipeline.test_batch_enhance_cli import _smoke_checkpoint

REPO = Path(__file__).resolve().parents[2]
FOLDER = "PID-123_Name^Surname"
PLANTED = ("PID-123", "Name^Surname", "Surname")


@pytest.fixture(scope="module")
def smoke_sr(tmp_path_factory) -> Path:
    return _smoke_checkpoint(tmp_path_factory.mktemp("models"), "sr")


def _batch(work: Path, model: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    src = work / "IN"
    (src / FOLDER).mkdir(parents=True)
    _nifti(src / FOLDER / "t1.nii.gz", (24, 24, 2), (1.0, 1.0, 1.0), seed=0)
    (src / FOLDER / "broken.nii.gz").write_bytes(b"not a scan")  # its error names its path
    store = work / "store"
    store.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "medidiff", "enhance", str(src), "--out", str(work / "OUT"),
            "--model", str(model), "--steps", "1", "--threads", "1", "--format", "nifti",
            "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", *extra,
        ],
        cwd=work, capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    return proc, store


def _leaks(store: Path) -> list[str]:
    """Every file of the store (database and artifacts) that holds a planted string."""
    found = []
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(store)}: {s}" for s in PLANTED if s.encode() in data]
    return found


def _artifacts(store: Path) -> set[str]:
    return {p.name for p in store.rglob("*") if p.is_file() and p.name != "mlflow.db"}


def test_mlflow_gets_scan_hashes_not_paths(tmp_path, smoke_sr):
    proc, store = _batch(tmp_path, smoke_sr)
    assert proc.returncode == 3, proc.stderr  # the broken file fails, by name, in the user's terminal
    assert FOLDER in " ".join(proc.stderr.split()) or "broken" in proc.stderr
    assert "scan_metrics.json" in _artifacts(store), _artifacts(store)
    table = json.loads(next(store.rglob("scan_metrics.json")).read_text())
    assert len(table) == 2 and all(row["key"].startswith("scan-") for row in table)
    assert _leaks(store) == []
    manifest = json.loads((tmp_path / "OUT" / "manifest.json").read_text())
    assert any(FOLDER in key for key in manifest["scans"])  # the user's own record keeps the paths


def test_log_paths_sends_paths_on_request(tmp_path, smoke_sr):
    proc, store = _batch(tmp_path, smoke_sr, "--log-paths")
    assert proc.returncode == 3, proc.stderr
    assert _leaks(store), "with --log-paths the keys and the manifest are logged"
    assert "manifest.json" in _artifacts(store)
