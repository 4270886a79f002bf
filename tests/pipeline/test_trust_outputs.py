"""Trust outputs of a scan: calibrated uncertainty, hallucination flags, labelled derived DICOM series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from medidiff.evaluation.calibration import Calibration, save_calibration
from medidiff.io.volume import Volume
from medidiff.pipeline.enhance import EnhanceResult
from medidiff.pipeline.outputs import VERDICTS, scan_verdict, trust_maps, write_outputs
from medidiff.pipeline.settings import EnhanceSettings, ScanJob
from medidiff.tasks import intensity_scale

AFFINE = np.diag([0.5, 0.5, 1.0, 1.0])


def _phantom(shape=(96, 96, 3), seed=0) -> np.ndarray:
    """A smooth head-like disc with soft internal structure (band-limited: nothing above half Nyquist)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    disc = (r < 0.4 * shape[0]).astype(np.float64)
    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape[:2]), 4)
    plane = ndimage.gaussian_filter(disc * (100 + 200 * tex), 1.5)
    return np.repeat(plane[..., None], shape[2], axis=2).astype(np.float32)


def _result(with_hallucination: bool, samples: int = 2) -> EnhanceResult:
    base = _phantom()
    enhanced = base.copy()
    if with_hallucination:  # invented fine texture in one region: energy only above the measured band
        rng = np.random.default_rng(1)
        noise = rng.standard_normal(enhanced.shape[:2])
        f = np.fft.fft2(noise)
        u = np.abs(np.fft.fftfreq(enhanced.shape[0])) / 0.5
        high = np.maximum(u[:, None], u[None, :]) > 0.6
        texture = np.real(np.fft.ifft2(f * high))
        texture *= 40 / texture.std()
        box = np.zeros(enhanced.shape[:2], bool)
        box[30:50, 30:50] = True
        enhanced += (texture * box)[..., None].astype(np.float32)
    std = np.full(base.shape, 2.0, np.float32) * (base > 10)

    def vol(a: np.ndarray, d: str) -> Volume:
        return Volume(np.asarray(a, np.float32), AFFINE, {"description": d})

    return EnhanceResult(
        enhanced=vol(enhanced, "enhanced"),
        uncertainty=vol(std, "std") if samples > 1 else None,
        residual=vol(np.zeros_like(base), "residual"),
        baseline=vol(base, "baseline"),
        metrics={"residual_weight": 0.8, "self_check_gain_db": 1.5, "samples": float(samples)},
    )


def _job() -> ScanJob:
    return ScanJob("site/scan.nii.gz", None, "site/scan.nii.gz", "site", "scan", "fp", "nifti")


def _model(folder: Path | None) -> SimpleNamespace:
    task = SimpleNamespace(factor=2, acceleration=4.0, kind="sr")
    return SimpleNamespace(name="sr_test", path=folder, recipe=SimpleNamespace(task=task))


def test_planted_hallucination_is_flagged_through_the_outputs(tmp_path: Path) -> None:
    settings = EnhanceSettings(task="sr", fmt="nifti", samples=2)
    for planted in (False, True):
        result = _result(planted)
        trust = trust_maps(result, "sr", _model(None), samples=2, slice_axis=2)
        out = tmp_path / str(planted)
        written = write_outputs(_job(), result, out, settings, None, "sr", trust=trust, model=_model(None))
        img = nib.load(str(out / written["flags"]))
        assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, AFFINE)
        flagged = np.asarray(img.dataobj)
        assert set(np.unique(flagged)) <= {0, 1}
        if not planted:
            assert flagged.sum() == 0 and trust.metrics["flagged_fraction"] == 0.0
            assert scan_verdict({**result.metrics, **trust.metrics}) == VERDICTS["enhanced"]
        else:
            inside = flagged[30:50, 30:50].mean()
            outside = flagged[70:, :].mean()
            assert inside > 0.8 and outside == 0.0, (inside, outside)
            assert trust.metrics["flagged_fraction"] > 0.01
            assert scan_verdict({**result.metrics, **trust.metrics}) == VERDICTS["flagged"]
    assert scan_verdict({"residual_weight": 0.0}) == VERDICTS["classical"]
    assert scan_verdict({"residual_weight": 0.5}, {"gate_decision": "classical"}) == VERDICTS["classical"]


def test_uncertainty_is_calibrated_when_the_model_has_a_calibration(tmp_path: Path) -> None:
    result = _result(False)
    settings = EnhanceSettings(task="sr", fmt="nifti", samples=2)
    raw = trust_maps(result, "sr", _model(tmp_path), samples=2, slice_axis=2)
    written = write_outputs(_job(), result, tmp_path / "raw", settings, None, "sr", trust=raw)
    img = nib.load(str(tmp_path / "raw" / written["uncertainty"]))
    assert b"uncalibrated" in img.header["descrip"].tobytes()
    assert np.allclose(img.get_fdata(), result.uncertainty.array)
    assert raw.info["coverage"] is None

    calib = Calibration(0.9, 1.7, 0.01, 2, "sr", 24, 10_000, [f"c{i}" for i in range(24)])
    save_calibration(calib, tmp_path)
    cal = trust_maps(result, "sr", _model(tmp_path), samples=2, slice_axis=2)
    written = write_outputs(_job(), result, tmp_path / "cal", settings, None, "sr", trust=cal)
    img = nib.load(str(tmp_path / "cal" / written["uncertainty"]))
    descrip = img.header["descrip"].tobytes().split(b"\0")[0].decode()
    assert descrip == "medidiff 90% interval half-width (conformal, n=24)"
    scale = intensity_scale(result.baseline.array)
    assert np.allclose(img.get_fdata(), 1.7 * (result.uncertainty.array + 0.01 * scale), rtol=1e-5)
    assert cal.info["coverage"] == 0.9 and cal.metrics["uncertainty_coverage"] == 0.9
    assert "24 calibration cases" in cal.info["calibration"]
    assert "calibration_note" not in cal.info
    # a run with another K uses the calibration made with that K where the model has one
    save_calibration(Calibration(0.9, 2.5, 0.02, 4, "sr", 30, 10_000, ["d"] * 30), tmp_path, default=False)
    k4 = trust_maps(result, "sr", _model(tmp_path), samples=4, slice_axis=2)
    assert k4.calibration.samples_k == 4 and "calibration_note" not in k4.info
    k8 = trust_maps(result, "sr", _model(tmp_path), samples=8, slice_axis=2)
    assert k8.calibration.samples_k == 2
    assert k8.info["calibration_note"] == "calibrated with K=2, run with K=8"
    # a calibration made for another task is not applied
    save_calibration(Calibration(0.9, 1.7, 0.01, 2, "recon", 24, 10_000, ["x"]), tmp_path)
    assert trust_maps(result, "sr", _model(tmp_path), samples=2, slice_axis=2).calibration is None


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def _series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def test_derived_series_are_labelled_valid_and_share_the_frame_of_reference(tmp_path: Path) -> None:
    import SimpleITK as sitk

    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    save_calibration(Calibration(0.9, 1.7, 0.01, 2, "sr", 24, 10_000, ["c"] * 24), weights)
    model = _model(weights)
    result = _result(True)
    settings = EnhanceSettings(task="sr", fmt="both", samples=2)
    trust = trust_maps(result, "sr", model, samples=2, slice_axis=2)
    out = tmp_path / "OUT"
    written = write_outputs(_job(), result, out, settings, None, "sr", trust=trust, model=model)
    series = {k: _series(out / written[k]) for k in ("dicom", "dicom_uncertainty", "dicom_flags")}
    enhanced = series["dicom"]
    first = enhanced[0]
    assert first.ContentQualification == "RESEARCH"
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "RESAMPLED"]
    assert first.DerivationCodeSequence[0].CodeValue == "113085"
    assert first.DerivationCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert "enhanced" in first.SeriesDescription and len(first.SeriesDescription) <= 64
    text = first.DerivationDescription
    assert "sr_test" in text and "weights sha256" in text
    assert "gate weight 0.800" in text and "90%" in text
    windows = {(float(d.WindowCenter), float(d.WindowWidth)) for d in enhanced}
    assert len(windows) == 1, "one window per series"
    for key, datasets in series.items():
        assert len(datasets) == 3
        assert {d.FrameOfReferenceUID for d in datasets} == {first.FrameOfReferenceUID}, key
        assert {d.StudyInstanceUID for d in datasets} == {first.StudyInstanceUID}, key
        assert {d.PatientID for d in datasets} == {first.PatientID}, key
        assert datasets[0].ContentQualification == "RESEARCH"
        assert datasets[0].SeriesInstanceUID != first.SeriesInstanceUID or key == "dicom"
    assert series["dicom_flags"][0].DerivationCodeSequence[0].CodeValue == "113076"
    assert "interval half-width" in series["dicom_uncertainty"][0].SeriesDescription
    # the flags read back on the enhanced grid, with the same 0/1 values
    reader = sitk.ImageSeriesReader()
    grids = {}
    for key in ("dicom", "dicom_flags"):
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out / written[key])))
        img = reader.Execute()
        grids[key] = (img.GetOrigin(), img.GetSpacing(), img.GetDirection(), img.GetSize())
        if key == "dicom_flags":
            back = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
            assert np.array_equal(back, np.asarray(trust.flags.array))
    assert np.allclose(grids["dicom"][0], grids["dicom_flags"][0])
    assert grids["dicom"][1:] == grids["dicom_flags"][1:]
    if shutil.which("dciodvfy"):
        for key, folder in written.items():
            if key.startswith("dicom") and folder:
                for f in sorted((out / folder).glob("*.dcm")):
                    assert _dciodvfy_errors(f) == [], f


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_reconstruction_series_uses_a_defined_image_type(tmp_path: Path) -> None:
    result = _result(False, samples=1)
    settings = EnhanceSettings(task="recon", fmt="dicom", samples=1)
    trust = trust_maps(result, "recon", None, samples=1, factor=4.0)
    assert trust.uncertainty is None
    written = write_outputs(_job(), result, tmp_path, settings, None, "recon", trust=trust)
    assert written["dicom_uncertainty"] is None and written["dicom_flags"]
    first = _series(tmp_path / written["dicom"])[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert "DerivationCodeSequence" not in first
    proc = subprocess.run(["dciodvfy", str(min((tmp_path / written["dicom"]).glob("*.dcm")))],
                          capture_output=True, text=True, check=False)
    assert "Error" not in proc.stdout + proc.stderr and "Image Type" not in proc.stdout + proc.stderr
