"""OUT/report.html: panels drawn with the review figures, self-contained HTML.

The panels follow RAS orientation with true aspect.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
from scipy import ndimage

from medidiff.review.report import render_report, write_report

SHAPE = (24, 20, 12)  # i: R-L, j: A-P, k: I-S (DICOM's LPS voxel order)
SPACING = (0.6, 1.2, 3.0)  # anisotropic in-plane too, so a wrong aspect shows
MARKER = (slice(1, 7), slice(1, 6))  # low i = patient's right, low j = anterior (LPS)


def _lps_affine() -> np.ndarray:
    """Voxel → RAS mm for an LPS-stored scan: i runs to the patient's left, j to posterior."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [7.0, 12.0, -15.0]
    return affine


def _save(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array.astype(np.float32), _lps_affine()), str(path))


def _output_folder(root: Path) -> dict:
    """A tiny batch output: one in-plane SR scan with a marker at the right-anterior, one sr_thick scan."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    body = 0.2 + 0.3 * (i + j + k) / float(sum(SHAPE))  # 0.2 .. 0.5, grey in the window
    enhanced = body.copy()
    enhanced[MARKER] = 1.0  # through every slice, so the middle axial slice shows it
    baseline = body * 0.9
    uncertainty = 0.01 + 0.02 * j / SHAPE[1]
    scans = {}
    for key, task in (("scan_a", "sr"), ("scan_b", "sr_thick")):
        folder = root / key
        folder.mkdir(parents=True)
        for name, arr in (("enhanced", enhanced), ("baseline", baseline), ("uncertainty", uncertainty),
                          ("residual", enhanced - baseline)):
            _save(folder / f"{name}.nii.gz", arr)
        scans[key] = {
            "key": key, "input": f"in/{key}.nii.gz", "kind": "nifti", "task": task, "status": "done",
            "fingerprint": "0" * 16,
            "outputs": {
                name: f"{key}/{name}.nii.gz" for name in ("enhanced", "uncertainty", "residual", "baseline")
            }
            | {"dicom": None},
            "metrics": {"self_check_psnr": 31.25, "data_consistency": 0.0123},
            "seconds": 1.5, "error": None,
        }
    scans["scan_c"] = {"key": "scan_c", "input": "in/scan_c", "kind": "dicom", "task": None,
                       "status": "failed",
                       "fingerprint": None, "outputs": {}, "metrics": {}, "seconds": 0.1,
                       "error": "ValueError: no pixel data"}
    manifest = {"version": 1, "input_root": "in", "output_root": str(root), "params": {"steps": 4},
                "scans": scans}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _panel(text: str, key: str, name: str) -> np.ndarray:
    """Decode the embedded PNG of one scan's panel (RGB floats in 0..1)."""
    section = text[text.index(f"<h2>{key}</h2>"):]
    match = re.search(rf"<img alt='{name}' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", section)
    assert match, f"no {name} panel for {key}"
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(match.group(1))), format="png")[..., :3]


def _image_box(pixels: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the drawn slice.

    The largest connected non-white region (the colour bar is separate).
    """
    labels, count = ndimage.label(pixels.mean(axis=-1) < 0.9)
    assert count, "the panel is blank"
    sizes = ndimage.sum_labels(np.ones(labels.shape), labels, index=np.arange(1, count + 1))
    return ndimage.find_objects((labels == 1 + int(np.argmax(sizes))).astype(np.int32))[0]


def test_report_panels_follow_the_anatomy_not_the_voxel_order(tmp_path: Path) -> None:
    manifest = _output_folder(tmp_path)
    path = write_report(tmp_path, manifest)
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") == 2 * 4
    assert "31.25" in text and "0.0123" in text and "no pixel data" in text

    pixels = _panel(text, "scan_a", "after")
    rows, cols = _image_box(pixels)
    box = pixels[rows, cols]
    height, width = box.shape[:2]
    # true aspect: 24 x 0.6 mm wide (R-L), 20 x 1.2 mm high (A-P)
    assert abs(height / width - (20 * 1.2) / (24 * 0.6)) < 0.08, (height, width)
    white, count = ndimage.label(box.min(axis=-1) > 0.97)
    sizes = ndimage.sum_labels(np.ones(white.shape), white, index=np.arange(1, count + 1))
    marker = np.argwhere(white == 1 + int(np.argmax(sizes)))
    y, x = marker.mean(axis=0) / (height, width)
    # radiological axial view: patient's right on the screen's left, anterior at the top
    assert abs(x - 4 / 24) < 0.06 and abs(y - 3.5 / 20) < 0.06, (x, y)
    assert len(marker) > 0.5 * (6 / 24) * (5 / 20) * height * width

    # through-plane SR: a plane containing the slice (S) direction, here coronal:
    # 12 x 3 mm high, 24 x 0.6 wide
    assert "coronal" in text[text.index("<h2>scan_b</h2>"):]
    rows, cols = _image_box(_panel(text, "scan_b", "after"))
    ratio = (rows.stop - rows.start) / (cols.stop - cols.start)
    assert abs(ratio - (12 * 3.0) / (24 * 0.6)) < 0.15, ratio


def test_report_lists_failures_and_is_deterministic_in_content(tmp_path: Path) -> None:
    manifest = _output_folder(tmp_path)
    text = render_report(tmp_path, manifest)
    assert "failed scans" in text and "scan_c" in text
    assert "axial" in text[text.index("<h2>scan_a</h2>"):text.index("<h2>scan_b</h2>")]


def test_report_states_verdict_gate_interval_and_shows_flags_in_red(tmp_path: Path) -> None:
    manifest = _output_folder(tmp_path)
    flags = np.zeros(SHAPE, np.uint8)
    flags[12:20, 10:16, :] = 1  # a flagged block through every slice
    nib.save(nib.Nifti1Image(flags, _lps_affine()), str(tmp_path / "scan_a" / "flags.nii.gz"))
    a = manifest["scans"]["scan_a"]
    a["outputs"]["flags"] = "scan_a/flags.nii.gz"
    a["metrics"].update({"residual_weight": 0.75, "self_check_gain_db": 1.25, "flagged_fraction": 0.1,
                         "mean_interval_halfwidth": 0.031})
    a["trust"] = {
        "coverage": 0.9,
        "calibration": "90% interval half-width (split-conformal, sr, K=4, 24 calibration cases)",
        "flagged_fraction": 0.1,
    }
    a["gate_decision"] = "enhance"
    b = manifest["scans"]["scan_b"]
    b["metrics"].update({"residual_weight": 0.0, "self_check_gain_db": 0.0})
    text = render_report(tmp_path, manifest)
    section_a = text[text.index("<h2>scan_a</h2>"): text.index("<h2>scan_b</h2>")]
    section_b = text[text.index("<h2>scan_b</h2>"):]
    assert "verdict: flagged: check highlighted regions" in section_a
    assert "model weight 0.75" in section_a and "predicted gain +1.25 dB" in section_a
    assert "enhance" in section_a
    assert "90% interval" in section_a and "calibrated interval half-width" in section_a
    assert "verdict: returned classical image: model not expected to help" in section_b
    assert "uncalibrated" in section_b  # an uncertainty map without a calibration says so
    flagged = _panel(text, "scan_a", "flags")
    red = (flagged[..., 0] > 0.6) & (flagged[..., 1] < 0.45) & (flagged[..., 2] < 0.45)
    assert red.sum() > 50, "the flagged block is drawn in red"
    assert "<img alt='flags'" not in section_b  # no flags recorded: no panel
