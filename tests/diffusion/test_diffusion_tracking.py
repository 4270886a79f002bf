"""tracking.py: PHI never reaches the store; no mlflow → a no-op tracker; read helpers see what was logged."""

import sqlite3
import sys
import warnings

import numpy as np

from medidiff import tracking
from medidiff.tracking import metric_history, scrub, search_runs, tracking_run


def test_scrub_drops_patient_identifiers():
    clean = scrub({"PatientName": "DOE^JOHN", "patient_id": "123", "AccessionNumber": "A1",
                   "PatientBirthDate": "1970", "nested": {"Patient ID": "9", "ok": 1},
                   "note": "PatientName=DOE", "steps": 4})
    assert clean == {"nested": {"ok": 1}, "steps": 4}


def test_logged_run_has_no_phi_and_reads_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with tracking_run("unit", run_name="r", tracking_uri=uri, system_metrics=False,
                      params={"task": {"kind": "sr"}, "PatientName": "DOE^JOHN"},
                      tags={"AccessionNumber": "X"}) as tr:
        assert tr.active and tr.run_id
        tr.log_metrics({"psnr": 30.0}, step=1)
        tr.log_metrics({"psnr": 31.0, "bad": float("nan")}, step=2)
        tr.log_text("PatientID: 123\nsteps: 4", "notes.txt")
        tr.log_image(np.random.default_rng(0).random((8, 8)), "img.png")
        tr.log_table([{"scan": "a", "psnr": 1.0, "PatientName": "X"}], "table.csv")
        run_id = tr.run_id
    with sqlite3.connect(tmp_path / "m.db") as db:
        dump = "\n".join(
            str(r) for t in ("params", "tags", "metrics") for r in db.execute(f"select * from {t}")
        )
    assert "DOE" not in dump and "Accession" not in dump and "task.kind" in dump
    assert metric_history(run_id, "psnr", tracking_uri=uri) == [(1, 30.0), (2, 31.0)]
    assert len(search_runs("medidiff-unit", tracking_uri=uri)) == 1
    text = (tmp_path / "dl").mkdir() or tracking.download_artifacts(run_id, "notes.txt", tmp_path / "dl",
                                                                     tracking_uri=uri).read_text()
    assert "PatientID" not in text and "steps: 4" in text


def test_without_mlflow_a_noop_tracker(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    monkeypatch.setattr(tracking, "_NO_MLFLOW_WARNED", False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with tracking_run("unit") as tr:
            tr.log_metrics({"a": 1.0})
            tr.log_params({"b": 2})
            assert not tr.active and tr.run_id is None
    assert sum("mlflow is not installed" in str(w.message) for w in record) == 1


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """A new experiment of a SQLite store puts artifacts in mlartifacts/ beside the .db.

    Not in ./mlruns of the cwd."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "sub").mkdir()
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    with tracking_run("artifacts", tracking_uri=uri, system_metrics=False) as tr:
        assert tr.active
        tr.log_text("hello", "notes/hello.txt")
        run_id = tr.run_id
    found = list((tmp_path / "sub" / "mlartifacts").rglob("hello.txt"))
    assert len(found) == 1 and run_id in str(found[0]) and found[0].read_text() == "hello"
    assert list(elsewhere.iterdir()) == []  # no mlruns/ (or anything else) in the working directory
    with sqlite3.connect(tmp_path / "sub" / "mlflow.db") as db:
        location = db.execute(
            "select artifact_location from experiments where name = 'medidiff-artifacts'"
        ).fetchone()
    assert location[0] == (tmp_path / "sub" / "mlartifacts").as_uri()
