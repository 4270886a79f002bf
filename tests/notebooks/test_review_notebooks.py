"""The clinician notebooks run top to bottom, with short settings injected.

They run under nbclient, as `pytest --nbmake` would. Each notebook is executed in a temporary working
directory; parameters are injected papermill-style as a cell right after the one tagged ``parameters``.
Committed notebooks must carry no outputs (they can hold patient data).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_review_batch.ipynb", "02_compare_runs.ipynb", "03_train_on_your_data.ipynb"]


def execute(name: str, workdir: Path, params: dict[str, Any], timeout: int = 600) -> tuple[Any, float]:
    """Execute a notebook with injected parameters in ``workdir``.

    Returns the executed notebook and seconds."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, workdir / f"executed_{name}")  # kept for inspection when a test fails
    return nb, time.perf_counter() - start


def outputs_of(nb: Any, mime: str) -> list[Any]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if mime in out.get("data", {})]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_import_only(name: str) -> None:
    path = NOTEBOOKS / name
    if not path.exists():
        pytest.fail(f"{path} is missing")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
        "strip outputs before committing"
    )
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in nb.cells) == 1
    for cell in code:  # library logic lives in medidiff/, notebooks only call it
        tree = ast.parse(cell.source)
        defined = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        assert not defined, f"{name}: define functions in medidiff/review, not in the notebook"


def test_01_review_batch_on_a_given_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.review.test_review_batch import make_batch

    monkeypatch.chdir(tmp_path)
    make_batch(tmp_path / "out")
    nb, seconds = execute("01_review_batch.ipynb", tmp_path, {"OUTPUT_DIR": str(tmp_path / "out")})
    print(f"01_review_batch (hand-made batch): {seconds:.1f} s")
    assert len(outputs_of(nb, "image/png")) >= 2  # static middle slices + exported view
    assert outputs_of(nb, "application/vnd.jupyter.widget-view+json"), "the viewer widget was not displayed"
    exported = list((tmp_path / "review_exports").glob("review_site1_t1_0001_axial_*.png"))
    assert len(exported) == 1 and exported[0].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_01_review_batch_makes_the_demo_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default settings in a fresh folder: the demo output is made on the spot (a short sampling run)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb, seconds = execute("01_review_batch.ipynb", tmp_path, {"DEMO_STEPS": 2, "DEMO_SAMPLES": 2})
    print(f"01_review_batch (demo made in the notebook): {seconds:.1f} s")
    assert (tmp_path / "demo_out" / "output" / "manifest.json").is_file()
    assert len(outputs_of(nb, "image/png")) >= 2
    assert seconds < 300


@pytest.mark.slow
def test_02_compare_runs_on_a_fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty store: the notebook trains the smoke recipe and evaluates on one scan.

    Then it plots and tabulates."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb, seconds = execute("02_compare_runs.ipynb", tmp_path, {"EVAL_STEPS": "2", "EVAL_SCANS": 1})
    print(f"02_compare_runs (fresh store): {seconds:.1f} s")
    assert (tmp_path / "mlflow.db").is_file()
    assert len(outputs_of(nb, "image/png")) >= 2  # training curves, quality against steps
    assert outputs_of(nb, "text/html"), "the evaluation table was not shown"
    assert seconds < 300


@pytest.mark.slow
def test_03_train_on_your_data_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default example folder, a training run of a few steps, evaluation and one enhanced scan."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb, seconds = execute("03_train_on_your_data.ipynb", tmp_path, {"TRAIN_STEPS": 5, "TRAIN_MINUTES": 1.0,
                                                                     "EVAL_SCANS": 1, "EVAL_STEPS": "2"})
    print(f"03_train_on_your_data (5 training steps, 1 scan evaluated): {seconds:.1f} s")
    assert len(outputs_of(nb, "image/png")) >= 1
    assert seconds < 300
