"""`medidiff evaluate` run as a user runs it, on a tiny simulated folder: tables, figures, one MLflow run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.io.kspace import KSpaceData, write_kspace
from medidiff.io.nifti import write_nifti
from medidiff.io.volume import Volume
from medidiff.physics.fft import fft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import KSpaceTruncation

MEDIDIFF = [sys.executable, "-m", "medidiff"]


def _mni_block() -> Volume:
    """A 64 x 64 x 3 block of the MNI152 T1 template shipped with nilearn (axial slices last)."""
    import nilearn

    path = next((Path(nilearn.__file__).parent / "datasets" / "data").glob(
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    img = nib.load(path)
    arr = np.asarray(img.dataobj, dtype=np.float32)[66:130:1, 80:144, 88:91]
    shift = np.eye(4)
    shift[:3, 3] = (66, 80, 88)
    return Volume(arr, img.affine @ shift)


def _write_sr_folder(root: Path) -> None:
    """Two scans as `medidiff simulate --task sr` lays them out: <stem>_lr.nii.gz + <stem>_ref.nii.gz."""
    root.mkdir()
    base = _mni_block()
    for k, stem in enumerate(["scan_a", "scan_b"]):
        ref = base.with_array(np.roll(base.array, 5 * k, axis=0))
        lr = KSpaceTruncation(2).A(torch.from_numpy(np.moveaxis(ref.array, 2, 0))).numpy()
        write_nifti(ref, root / f"{stem}_ref.nii.gz")
        lr_vol = Volume(np.moveaxis(lr, 0, 2), ref.affine @ np.diag([2, 2, 1, 1.0]))
        write_nifti(lr_vol, root / f"{stem}_lr.nii.gz")


def _write_recon_folder(root: Path) -> None:
    """One scan as `medidiff simulate --task recon` lays it out: <stem>_kspace.h5 + <stem>_ref.nii.gz."""
    root.mkdir()
    ref = _mni_block()
    mask = make_mask("equispaced", (64, 64), 4, 0.08, seed=0)
    ksp = fft2c_np(np.moveaxis(ref.array, 2, 0)) * mask.full()
    write_kspace(root / "scan_a_kspace.h5", KSpaceData(ksp, mask.mask, ref.affine))
    write_nifti(ref, root / "scan_a_ref.nii.gz")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run(
        [*MEDIDIFF, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _tiny_models(root: Path) -> tuple[Path, Path]:
    """An (untrained) tiny diffusion model and a 2-step regression U-Net for SR x2, as checkpoints."""
    from medidiff.baselines.unet import save_unet, train_regression_unet
    from medidiff.models import build_model, save_checkpoint
    from medidiff.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "name": "tiny_sr", "task": {"kind": "sr", "factor": 2},
        "model": {"channels": [8, 8, 16, 16], "norm_num_groups": 8, "num_head_channels": 8},
        "diffusion": {"steps": 2},
        "data": {"synthetic_subjects": 1, "real_training": False, "slices_per_volume": 2, "patch_size": 32,
                 "val_subjects": 1, "val_slices": 1},
        "train": {"steps": 2, "batch_size": 2},
    })
    torch.manual_seed(0)
    diffusion_dir = save_checkpoint(root / "diffusion", build_model(recipe), recipe)
    unet, _ = train_regression_unet(recipe, features=(8, 8, 16, 16, 16, 8))
    return diffusion_dir, save_unet(root / "unet", unet)


def test_evaluate_sr_writes_tables_figures_and_an_mlflow_run(tmp_path: Path) -> None:
    import mlflow

    data, out = tmp_path / "sim", tmp_path / "report"
    _write_sr_folder(data)
    diffusion_dir, unet_dir = _tiny_models(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = _run(["evaluate", "--data", str(data), "--task", "sr", "--steps", "1",
                "--model", str(diffusion_dir), "--unet", str(unet_dir), "--no-adapt-variant",
                "--out", str(out), "--tracking-uri", uri], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "| sinc |" in res.stdout and "| medidiff-1 |" in res.stdout  # the Markdown table is printed
    methods = ["sinc", "bicubic", "unet", "medidiff-1", "medidiff-1-nodc"]
    rows = list(csv.DictReader((out / "per_scan.csv").open()))
    assert {(r["scan"], r["method"]) for r in rows} == {(s, m) for s in ("scan_a", "scan_b") for m in methods}
    for r in rows:
        assert not r.get("error"), r
        assert np.isfinite(float(r["psnr"])) and -1 <= float(r["ssim"]) <= 1
        if r["method"] in ("sinc", "bicubic"):  # the untrained tiny networks may score anything
            assert 20 < float(r["psnr"]) < 60 and 0.5 < float(r["ssim"]) <= 1
    assert {float(r["network_evals"]) for r in rows if r["method"].startswith("medidiff")} == {1.0}
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in summary] == methods
    mean_sinc = np.mean([float(r["psnr"]) for r in rows if r["method"] == "sinc"])
    assert float(summary[0]["psnr"]) == pytest.approx(mean_sinc)
    assert "## Mean over scans" in (out / "report.md").read_text()
    assert "## Targets" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "gate_scatter.png", "psnr_per_scan.png", "scan_a.png", "scan_b.png"
    ]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["sinc/psnr"] == pytest.approx(mean_sinc)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.md", "summary.csv", "per_scan.csv", "figures"} <= arts


def test_evaluate_recon_baselines(tmp_path: Path) -> None:
    data, out = tmp_path / "sim", tmp_path / "report"
    _write_recon_folder(data)
    res = _run(["evaluate", "--data", str(data), "--task", "recon", "--methods", "zero-filled,cs",
                "--cs-lambda", "0.001", "--cs-iters", "30", "--out", str(out), "--no-tracking"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["method"]: r for r in csv.DictReader((out / "per_scan.csv").open())}
    assert set(rows) == {"zero-filled", "cs"}
    assert float(rows["cs"]["psnr"]) > 20


def test_evaluate_reports_bad_input_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = _run(["evaluate", "--data", str(tmp_path / "empty"), "--task", "sr", "--out", str(tmp_path / "r"),
                "--no-tracking"], tmp_path)
    assert res.returncode == 2
    assert "empty" in res.stderr and "_lr.nii.gz" in res.stderr
