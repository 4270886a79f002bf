"""`medidiff enhance` end to end, run as a user runs it (a subprocess), with the real models.

One messy archive (DICOM series, NIfTI, k-space, a truncated DICOM, a garbage .nii.gz, a CT) goes through the
local engine; the same folder through a real local Ray must give the same outputs. A second run is killed
with SIGKILL after its first scan and then resumed. Tiny untrained checkpoints (the smoke recipe's network,
one per task) keep the real diffusion sampling fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.pipeline.batch_messy_folder import PLANTED_STRINGS, build_messy_folder, tree_digest

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "nifti/brain.nii.gz": "sr",
    "nifti/thick.nii.gz": "sr_thick",
    "kspace/knee.h5": "recon",
}
BROKEN = {"broken/truncated.dcm": "truncated", "broken/garbage.nii.gz": "NIfTI", "other/": "not MR"}


def _smoke_checkpoint(directory: Path, task: str) -> Path:
    """An untrained tiny network for ``task`` saved as a real checkpoint (safetensors + config.json).

    Self-check is off: an untrained network would be switched off by it and every sample would be equal.
    """
    import torch

    from medidiff.models import build_model, save_checkpoint
    from medidiff.recipe import DiffusionConfig, EnhanceConfig, ModelConfig, Recipe
    from medidiff.tasks import TaskConfig

    torch.manual_seed(0)
    recipe = Recipe(
        name=f"smoke_{task}",
        task=TaskConfig(kind=task, factor=4 if task == "sr_thick" else 2),
        model=ModelConfig(channels=(8, 8, 16, 16), num_res_blocks=1, norm_num_groups=8, num_head_channels=8),
        diffusion=DiffusionConfig(steps=2, strength=0.5),
        enhance=EnhanceConfig(samples=1, batch_slices=8, self_check=False),
    )
    net = build_model(recipe)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # MONAI zero-initialises the output layer: give it weights so samples differ
        for param in net.parameters():
            if not param.any():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return save_checkpoint(directory / f"smoke_{task}", net, recipe)


def _enhance(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        check=False,
        args=[sys.executable, "-m", "medidiff", "enhance", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _args(src: Path, out: Path, models: list[Path], *extra: str) -> list[str]:
    args = [
        str(src),
        "--out",
        str(out),
        "--samples",
        "2",
        "--steps",
        "2",
        "--seed",
        "7",
        "--threads",
        "1",
        "--tracking-uri",
        f"sqlite:///{out.parent / 'mlflow.db'}",
    ]
    for m in models:
        args += ["--model", str(m)]
    return args + list(extra)


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [_smoke_checkpoint(root, task) for task in ("sr", "sr_thick", "recon")]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, smoke_models) -> SimpleNamespace:
    """The messy folder enhanced once with the local engine."""
    work = tmp_path_factory.mktemp("batch")
    src = build_messy_folder(work / "IN")
    before = tree_digest(src)
    out = work / "OUT"
    t0 = time.perf_counter()
    proc = _enhance(*_args(src, out, smoke_models), cwd=work)
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return SimpleNamespace(
        work=work,
        src=src,
        out=out,
        proc=proc,
        before=before,
        manifest=manifest,
        seconds=seconds,
        logs=[proc.stdout + proc.stderr],
    )


def _scan(manifest: dict, prefix: str) -> dict:
    matches = [e for k, e in manifest["scans"].items() if k.startswith(prefix)]
    assert len(matches) == 1, f"{prefix}: {list(manifest['scans'])}"
    return matches[0]


def _dicom_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*_enhanced_dicom") if p.is_dir())


def _all_dicom_dirs(out: Path) -> list[Path]:
    """The enhanced series and the uncertainty / flags series written beside them."""
    return sorted(p for p in out.rglob("*_dicom") if p.is_dir())


def _output_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_messy_folder_end_to_end(messy):
    import nibabel as nib

    proc, out, manifest = messy.proc, messy.out, messy.manifest
    assert proc.returncode == 3, proc.stdout + proc.stderr  # documented: 3 = some scans failed
    assert tree_digest(messy.src) == messy.before, "input files must stay byte-identical"
    scans = manifest["scans"]
    assert len(scans) == 8
    for key, task in GOOD.items():
        entry = scans[key]
        assert entry["status"] == "done", entry
        assert entry["task"] == task
        assert entry["error"] is None and entry["seconds"] > 0
        assert "dc_residual_rel" in entry["metrics"] and "mean_uncertainty" in entry["metrics"]
    series = [e for k, e in scans.items() if k.startswith("site-a/exam-1/series")]
    assert len(series) == 2 and all(e["status"] == "done" and e["task"] == "sr" for e in series)
    text = proc.stdout + proc.stderr
    for prefix, words in BROKEN.items():
        entry = _scan(manifest, prefix)
        assert entry["status"] == "failed" and words in entry["error"], entry
        assert entry["key"] in text, f"failure of {entry['key']} not reported"

    # outputs mirror the input folders and are valid NIfTI with the new geometry
    brain = scans["nifti/brain.nii.gz"]["outputs"]
    assert brain["enhanced"] == "nifti/brain_enhanced.nii.gz" and brain["uncertainty"]
    img = nib.load(str(out / brain["enhanced"]))
    assert img.shape == (64, 64, 3) and np.allclose(img.header.get_zooms(), (0.5, 0.5, 1.0))
    assert img.get_data_dtype() == np.float32 and np.isfinite(img.get_fdata()).all()
    thick = nib.load(str(out / scans["nifti/thick.nii.gz"]["outputs"]["enhanced"]))
    assert thick.shape[2] == 12 and np.isclose(thick.header.get_zooms()[2], 1.0)
    for entry in scans.values():
        for name, rel in (entry["outputs"] or {}).items():
            if rel and not name.startswith("dicom"):
                assert np.isfinite(nib.load(str(out / rel)).get_fdata()).all(), rel
    for e in series:
        assert e["outputs"]["enhanced"].startswith("site-a/exam-1/series")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or "medidiff-tmp" in p.name]
    assert (out / "report.html").is_file()


def test_dicom_outputs_are_valid_derived_series(messy):
    import pydicom

    dirs = _dicom_dirs(messy.out)
    assert len(dirs) == 5  # one derived series per enhanced scan (--format both)
    dciodvfy = shutil.which("dciodvfy")
    for folder in dirs:
        files = sorted(folder.glob("*.dcm"))
        assert files, folder
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.Modality == "MR" and "DERIVED" in ds.ImageType
            if dciodvfy:
                res = subprocess.run(
                    check=False, args=[dciodvfy, str(f)], capture_output=True, text=True, timeout=60
                )
                errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
                assert not errors, f"{f}: {errors}"
    src_series = [d for d in dirs if "series" in d.name]
    ds = pydicom.dcmread(next(src_series[0].glob("*.dcm")))
    assert str(ds.PatientName) == "Doe^Planted", "a derived series keeps the source's patient"
    if not dciodvfy:
        pytest.skip("dciodvfy not installed: DICOM outputs checked with pydicom only")


def test_rerun_skips_done_scans(messy, smoke_models):
    before = {p: p.stat().st_mtime_ns for p in messy.out.rglob("*.nii.gz")}
    t0 = time.perf_counter()
    proc = _enhance(*_args(messy.src, messy.out, smoke_models), cwd=messy.work)
    seconds = time.perf_counter() - t0
    messy.logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 3  # the broken scans are retried and fail again
    manifest = json.loads((messy.out / "manifest.json").read_text())
    assert sum(e["status"] == "done" for e in manifest["scans"].values()) == 5
    assert {p: p.stat().st_mtime_ns for p in messy.out.rglob("*.nii.gz")} == before, "done scans untouched"
    assert "5 already done" in proc.stderr or "│       5 │" in proc.stderr
    assert seconds < max(messy.seconds, 60.0), (seconds, messy.seconds)  # no scan is enhanced again
    assert tree_digest(messy.src) == messy.before


def test_no_patient_data_outside_dicom_outputs(messy):
    """The planted name/ID may only appear inside the derived DICOM series (kept from the source)."""
    dicom_dirs = set(_all_dicom_dirs(messy.out))
    checked = 0
    for path in messy.work.rglob("*"):
        if not path.is_file() or messy.src in path.parents or any(d in path.parents for d in dicom_dirs):
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        for planted in PLANTED_STRINGS:
            assert planted.encode() not in data, f"{planted!r} leaked into {path}"
        checked += 1
    assert (messy.work / "mlflow.db").is_file(), "the MLflow store was written"
    assert checked > 20
    for log in messy.logs:
        for planted in PLANTED_STRINGS:
            assert planted not in log


def test_report_is_self_contained_and_renders_in_chromium(messy, tmp_path):
    report = messy.out / "report.html"
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 5 * 3
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for key in GOOD:
        assert key in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed: report checked as HTML only")
    shot = tmp_path / "report.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'p'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        report.as_uri(),
    ]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    grey = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2]) < 0.02
    dark_grey = grey & (pixels.mean(axis=-1) < 0.6) & (pixels.mean(axis=-1) > 0.02)
    coloured = ~grey
    assert dark_grey.mean() > 0.02, "no grey-scale image content rendered"
    assert coloured.mean() > 0.005, "no colour-mapped panels (difference / uncertainty) rendered"
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_ray_engine_gives_the_same_outputs(messy, smoke_models):
    out = messy.work / "OUT_ray"
    proc = _enhance(*_args(messy.src, out, smoke_models, "--engine", "ray", "--workers", "2"), cwd=messy.work)
    messy.logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    local, ray = messy.manifest["scans"], json.loads((out / "manifest.json").read_text())["scans"]
    assert {k: e["status"] for k, e in local.items()} == {k: e["status"] for k, e in ray.items()}
    assert _output_files(out) - {"report.html", "manifest.json"} == _output_files(messy.out) - {
        "report.html",
        "manifest.json",
    }
    import nibabel as nib

    for key, entry in local.items():
        if entry["status"] != "done":
            continue
        scale = float(np.abs(nib.load(str(messy.out / entry["outputs"]["enhanced"])).get_fdata()).max())
        for name, rel in (entry["outputs"] or {}).items():
            if rel and not name.startswith("dicom"):
                a = nib.load(str(messy.out / rel)).get_fdata()
                b = nib.load(str(out / rel)).get_fdata()
                assert np.allclose(a, b, atol=2e-3 * scale), f"{key} {name}: max diff {np.abs(a - b).max()}"
    assert tree_digest(messy.src) == messy.before


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def test_kill_9_mid_batch_then_rerun_completes(tmp_path, smoke_models):
    src = build_messy_folder(tmp_path / "IN", broken=False)
    inputs_before = tree_digest(src)
    out = tmp_path / "OUT"
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medidiff", "enhance", *_args(src, out, smoke_models)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 300
    children: set[int] = set()
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        children |= _children(proc.pid)
        try:
            manifest = json.loads((out / "manifest.json").read_text())
            done = sum(e["status"] == "done" for e in manifest["scans"].values())
        except (OSError, json.JSONDecodeError):
            done = 0
        if done >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the batch finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= done < 5
    for child in children:  # the decoding child exits when its parent dies
        for _ in range(100):
            if not Path(f"/proc/{child}").exists() or "zombie" in _status(child):
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{child}").exists() or "zombie" in _status(child), f"orphan process {child}"

    rerun = _enhance(*_args(src, out, smoke_models), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["scans"]) == 5 and all(e["status"] == "done" for e in manifest["scans"].values())
    expected = {"manifest.json", "report.html"}
    for entry in manifest["scans"].values():
        for name, rel in entry["outputs"].items():
            if rel and not name.startswith("dicom"):
                expected.add(rel)
    files = _output_files(out)
    dicom_files = {f for f in files if "_dicom/" in f}
    assert files - dicom_files == expected, "no duplicate, partial or temporary files"
    for entry in manifest["scans"].values():
        folder = out / entry["outputs"]["dicom"]
        assert folder.is_dir() and len(list(folder.iterdir())) >= 1
    assert len(_dicom_dirs(out)) == 5
    assert tree_digest(src) == inputs_before


def _status(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status")).read_text().lower()
    except OSError:
        return ""
