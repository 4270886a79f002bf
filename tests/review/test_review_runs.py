"""Reading a real MLflow store (SQLite, written through medidiff.tracking) into tables and figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from medidiff.review import runs


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two training runs and one evaluate run, logged the way train and evaluate log them."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # a SQLite store puts artifacts in ./mlruns of the working directory
        return _fill_store(root, uri)


def _fill_store(root: Path, uri: str) -> dict:
    from medidiff.evaluation.report import log_to_mlflow
    from medidiff.tracking import tracking_run

    ids = []
    for name, rate in (("smoke-a", 0.5), ("smoke-b", 0.8)):
        with tracking_run("train", run_name=name, tracking_uri=uri, params={"lr": 1e-3},
                          system_metrics=False) as tracker:
            for step in range(0, 50, 10):
                tracker.log_metrics({"loss": rate ** (step / 10), "val/psnr": 25 + step / 10,
                                     "val/psnr_baseline": 24.0, "train/lr": 1e-3}, step=step)
            ids.append(tracker.run_id)
    summary = [
        {"method": "sinc", "n": 2, "failed": 0, "psnr": 30.0, "ssim": 0.90},
        {"method": "bicubic", "n": 2, "failed": 0, "psnr": 29.8, "ssim": 0.89},
        {"method": "medidiff-2", "n": 2, "failed": 0, "psnr": 30.5, "ssim": 0.91, "network_evals": 2},
        {"method": "medidiff-4", "n": 2, "failed": 0, "psnr": 31.0, "ssim": 0.92, "network_evals": 4},
        {"method": "medidiff-4-nodc", "n": 2, "failed": 0, "psnr": 29.0, "ssim": 0.88, "network_evals": 4},
    ]
    report = root / "report"
    report.mkdir()
    paths = {}
    for key, name in (
        ("markdown", "report.md"), ("summary_csv", "summary.csv"), ("per_scan_csv", "per_scan.csv")
    ):
        paths[key] = report / name
        paths[key].write_text("x\n")
    eval_id = log_to_mlflow(paths, task="sr", summary=summary, rows=[{"scan": "a", **summary[0]}],
                            params={"task": "sr"}, tracking_uri=uri)
    assert eval_id
    return {"uri": uri, "train_ids": ids, "eval_id": eval_id}


def test_list_runs(store: dict) -> None:
    frame = runs.list_runs("train", store["uri"])
    assert set(frame["run_id"]) == set(store["train_ids"])
    assert list(frame["run_name"]) == ["smoke-b", "smoke-a"]  # newest first
    assert (frame["status"] == "FINISHED").all() and (frame["seconds"] >= 0).all()
    assert runs.latest_run_id("evaluate", store["uri"]) == store["eval_id"]
    assert runs.latest_run_id("enhance", store["uri"]) is None
    assert runs.list_runs("enhance", store["uri"]).empty


def test_training_curves(store: dict) -> None:
    fig = runs.training_curves(tracking_uri=store["uri"])
    titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(titled) == ["loss", "val/psnr (dashed: degraded baseline)", "train/lr"]  # loss, quality, rest
    quality = titled["val/psnr (dashed: degraded baseline)"]
    baseline = [ln for ln in quality.get_lines() if ln.get_linestyle() == "--"]
    assert len(baseline) == 2 and set(baseline[0].get_ydata()) == {24.0}
    loss_lines = titled["loss"].get_lines()
    assert len(loss_lines) == 2 and titled["loss"].get_yscale() == "log"
    steps = sorted(loss_lines[0].get_xdata())
    assert steps == [0, 10, 20, 30, 40]
    fig = runs.training_curves(store["train_ids"][:1], ["val/psnr"], tracking_uri=store["uri"])
    line, _baseline = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == [25, 26, 27, 28, 29]


def test_evaluation_table_and_quality_vs_steps(store: dict, tmp_path: Path) -> None:
    table = runs.evaluation_table(tracking_uri=store["uri"])
    assert table.attrs["run_id"] == store["eval_id"] and table.attrs["task"] == "sr"
    assert list(table["method"]) == ["sinc", "bicubic", "medidiff-2", "medidiff-4", "medidiff-4-nodc"]
    sweep = runs.step_sweep(table)
    assert [(r.steps, r.dc) for r in sweep.itertuples()] == [(4, False), (2, True), (4, True)]
    fig = runs.quality_vs_steps(table)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    dc = lines["medidiff, data consistency"]
    assert list(dc.get_xdata()) == [2, 4] and list(dc.get_ydata()) == [30.5, 31.0]
    assert math.isclose(lines["sinc"].get_ydata()[0], 30.0)
    assert "sampling steps" in ax.get_xlabel() and ax.get_ylabel() == "PSNR (dB)"
    per_scan = runs.evaluation_table(store["eval_id"], tracking_uri=store["uri"], per_scan=True)
    assert per_scan.loc[0, "scan"] == "a"


def test_empty_store_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(LookupError, match="no training runs"):
        runs.training_curves(tracking_uri=uri)
    with pytest.raises(LookupError, match="no finished evaluate run"):
        runs.evaluation_table(tracking_uri=uri)


def test_run_medidiff_reports_failures() -> None:
    result = runs.run_medidiff(["--version"], echo=False)
    assert result.returncode == 0 and "medidiff" in result.stdout
    with pytest.raises(runs.CommandError, match="exited with status 2"):
        runs.run_medidiff(["no-such-command"], echo=False)


def test_helpers_for_the_training_notebook(tmp_path: Path) -> None:
    import nibabel as nib
    import yaml

    folder = runs.example_scan_folder(tmp_path / "scans", n_scans=2, slices=4)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["mni_slab_01.nii.gz", "mni_slab_02.nii.gz"]
    image = nib.load(str(files[0]))
    assert image.shape == (160, 192, 4) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert int(image.header["sform_code"]) == 1

    recipe = runs.training_recipe("pipelines/smoke.yaml", tmp_path / "r.yaml", folders=[folder], steps=7,
                                  minutes=0.5)
    written = yaml.safe_load(recipe.read_text())
    assert written["train"]["steps"] == 7 and written["train"]["max_minutes"] == 0.5
    assert written["data"]["folders"] == [str(folder.resolve())]

    sim = tmp_path / "sim"
    sim.mkdir()
    for stem in ("b", "a"):
        (sim / f"{stem}_lr.nii.gz").write_bytes(b"lr")
        (sim / f"{stem}_ref.nii.gz").write_bytes(b"ref")
    staged = runs.stage_inputs(sim, tmp_path / "one")
    assert [p.name for p in staged.iterdir()] == ["a_lr.nii.gz"]

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    assert runs.find_checkpoint(tmp_path / "run") == model
    assert runs.find_checkpoint(tmp_path / "sim") is None


def test_default_store_and_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(repo / "tests")
    assert runs.default_tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"  # where `medidiff train` writes
    assert runs.default_tracking_uri("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert runs.default_tracking_uri() == "sqlite:///x.db"
    monkeypatch.chdir(tmp_path)
    assert runs.workspace("nb") == tmp_path / "nb" and (tmp_path / "nb").is_dir()
