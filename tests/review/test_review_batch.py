"""Reading an enhance output folder through a hand-written manifest (docs/interfaces.md schema)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.review import BatchError, open_batch


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return str(path)


def make_batch(out: Path, seed: int = 0) -> dict:
    """A small OUT folder: two finished scans (one with uncertainty) and one failed scan."""
    rng = np.random.default_rng(seed)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10, -12, -6]
    arrays = {}
    scans = {}
    for key, folder, with_sd in [("site1/t1_0001", "site1", True), ("site2/t2_0002", "site2", False)]:
        stem = key.split("/")[1]
        outputs = {}
        for name in ("enhanced", "baseline", "uncertainty", "residual"):
            if name == "uncertainty" and not with_sd:
                outputs[name] = None
                continue
            arr = rng.random((12, 14, 5), dtype=np.float32)
            arrays[(key, name)] = arr
            rel = f"{folder}/{stem}_{name}.nii.gz"
            _write(out / rel, arr, affine)
            outputs[name] = rel
        outputs["dicom"] = None
        scans[key] = {"key": key, "input": f"{folder}/{stem}.nii.gz", "kind": "nifti", "task": "sr",
                      "status": "done", "fingerprint": "f" * 32, "outputs": outputs,
                      "metrics": {"dc_residual_rel": 2e-4, "mean_uncertainty": 0.01, "network_evals": 10},
                      "seconds": 1.5, "error": None}
    scans["bad/broken"] = {"key": "bad/broken", "input": "bad/broken.nii.gz", "kind": "invalid", "task": None,
                           "status": "failed", "fingerprint": "0" * 32, "outputs": {}, "metrics": {},
                           "seconds": 0.01, "error": "bad/broken.nii.gz: not a NIfTI file"}
    manifest = {"version": 1, "input_root": "/data/in", "output_root": str(out),
                "params": {"task": "auto", "steps": 10, "samples": 4}, "scans": scans}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return {"arrays": arrays, "affine": affine}


def test_lists_and_loads_scans(tmp_path: Path) -> None:
    made = make_batch(tmp_path)
    batch = open_batch(tmp_path)
    assert batch.keys() == ["site1/t1_0001", "site2/t2_0002"]
    assert batch.keys(status=None)[-1] == "bad/broken"
    assert batch.counts() == {"done": 2, "failed": 1}
    assert batch.params["samples"] == 4
    scan = batch.load("site1/t1_0001")
    for name in ("enhanced", "baseline", "uncertainty", "residual"):
        vol = getattr(scan, name)
        np.testing.assert_array_equal(vol.array, made["arrays"][("site1/t1_0001", name)])
        np.testing.assert_allclose(vol.affine, made["affine"])
        assert vol.array.dtype == np.float32
    assert scan.metrics["network_evals"] == 10 and scan.task == "sr"
    assert scan.before_label.startswith("before: sinc")
    assert batch.load().key == "site1/t1_0001"  # the first finished scan
    other = batch.load("site2/t2_0002")
    assert other.uncertainty is None and other.residual is not None


def test_table_and_frame(tmp_path: Path) -> None:
    make_batch(tmp_path)
    batch = open_batch(tmp_path)
    rows = batch.table()
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert rows[2]["error"].endswith("not a NIfTI file")
    frame = batch.frame()
    assert frame.loc["site1/t1_0001", "dc_residual_rel"] == pytest.approx(2e-4)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="no manifest.json"):
        open_batch(tmp_path)
    make_batch(tmp_path)
    batch = open_batch(tmp_path)
    with pytest.raises(BatchError, match="status 'failed': bad/broken.nii.gz: not a NIfTI file"):
        batch.load("bad/broken")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["scans"] = {"bad/broken": manifest["scans"]["bad/broken"]}
    (tmp_path / "none_done").mkdir()
    (tmp_path / "none_done" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BatchError, match=r"no finished scan to review \({'failed': 1}\)"):
        open_batch(tmp_path / "none_done").load()
    with pytest.raises(BatchError, match="no scan with key 'nope'; known keys: site1/t1_0001"):
        batch.load("nope")
    (tmp_path / "site1" / "t1_0001_residual.nii.gz").unlink()
    with pytest.raises(BatchError, match="t1_0001_residual.nii.gz: output file is missing"):
        batch.load("site1/t1_0001")
    (tmp_path / "site1" / "t1_0001_enhanced.nii.gz").write_bytes(b"garbage")
    with pytest.raises(BatchError, match="cannot be read as NIfTI"):
        batch.load("site1/t1_0001", outputs=("enhanced",))


def test_manifest_problems_are_named(tmp_path: Path) -> None:
    make_batch(tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["scans"]["site1/t1_0001"]["outputs"]["enhanced"] = "../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BatchError, match="points outside the folder"):
        open_batch(tmp_path).load("site1/t1_0001")
    manifest["version"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(BatchError, match="version 2 is not supported"):
        open_batch(tmp_path)
    path.write_text("{not json")
    with pytest.raises(BatchError, match="manifest.json: is not valid JSON"):
        open_batch(tmp_path)


def test_demo_output_finds_or_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medidiff.review.batch import demo_output
    from medidiff.review.project import find_project_root

    assert find_project_root(Path(__file__).parent) == Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    assert find_project_root() is None
    with pytest.raises(BatchError, match="run `make demo`"):
        demo_output(make=False)
    make_batch(tmp_path / "demo_out" / "output")
    assert demo_output(make=False) == (tmp_path / "demo_out" / "output").resolve()
