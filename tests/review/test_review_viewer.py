"""The notebook viewer: widget tree, controls that change the view, PNG export; and the static review."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medidiff.io.volume import Volume
from medidiff.review import ReviewViewer, ScanOutputs, open_batch, static_review
from tests.review.test_review_batch import make_batch


def _scan(with_sd: bool = True) -> ScanOutputs:
    rng = np.random.default_rng(3)
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])  # LAS storage, anisotropic
    before = Volume(rng.random((24, 20, 9), dtype=np.float32), affine)
    enhanced = before.with_array(before.array * 1.05)
    sd = before.with_array(rng.random(before.shape, dtype=np.float32) * 0.1) if with_sd else None
    return ScanOutputs("site1/t1_0001", enhanced, before, sd, None, {"dc_residual_rel": 1e-4}, "sr")


def _walk(widget) -> list:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += _walk(child)
    return found


def test_widget_tree_and_controls() -> None:
    import ipywidgets as w

    viewer = ReviewViewer(_scan())
    tree = _walk(viewer.widget)
    for kind in (w.ToggleButtons, w.IntSlider, w.FloatSlider, w.Checkbox, w.Image, w.HTML, w.Button):
        assert any(isinstance(item, kind) for item in tree), kind
    assert viewer.view.options == ("axial", "coronal", "sagittal")
    assert (viewer.slice.max, viewer.slice.value) == (8, 4)  # 9 axial slices, middle shown
    first = viewer.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    viewer.view.value = "sagittal"
    assert (viewer.slice.max, viewer.slice.value) == (23, 12)
    assert viewer.image.value != first
    assert "sagittal_012" in viewer.export_name.value
    viewer.window.value = viewer.window.value / 2  # window/level drive both anatomy panels
    fig = viewer.figure()
    clims = [ax.images[0].get_clim() for ax in fig.axes if ax.images][:2]
    assert clims[0] == clims[1]
    assert clims[0][1] - clims[0][0] == pytest.approx(viewer.window.value)
    assert "dc_residual_rel" in viewer.metrics.value


def test_overlay_controls_change_the_highlighted_voxels() -> None:
    viewer = ReviewViewer(_scan())
    def highlighted() -> int:
        fig = viewer.figure()
        overlay = [im for ax in fig.axes for im in ax.images if im.get_gid() == "uncertainty-overlay"]
        return int((~np.ma.getmaskarray(overlay[0].get_array())).sum()) if overlay else 0
    at95 = highlighted()
    viewer.percentile.value = 80.0
    assert highlighted() > at95 > 0
    viewer.overlay.value = False
    assert highlighted() == 0


def test_export_writes_a_valid_png(tmp_path: Path) -> None:
    viewer = ReviewViewer(_scan(), export_dir=tmp_path)
    viewer.set_view("coronal", 3)
    path = viewer.export_png()
    assert path == tmp_path / "review_site1_t1_0001_coronal_003.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800
    viewer.export_name.value = "report.png"
    viewer.export_button.click()
    assert (tmp_path / "report.png").is_file() and "saved" in viewer.status.value


def test_without_uncertainty_the_overlay_is_disabled() -> None:
    viewer = ReviewViewer(_scan(with_sd=False))
    assert viewer.overlay.disabled and not viewer.overlay.value
    fig = viewer.figure()
    assert any("no uncertainty map" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_static_review_from_a_batch_folder(tmp_path: Path) -> None:
    make_batch(tmp_path / "out")
    batch = open_batch(tmp_path / "out")
    scan = batch.load(batch.keys()[0])
    fig = static_review(scan, out_png=tmp_path / "middle.png")
    titles = " ".join(ax.get_title() for ax in fig.axes)
    for view in ("axial", "coronal", "sagittal"):
        assert view in titles
    data = (tmp_path / "middle.png").read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
    viewer = ReviewViewer(scan)
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_single_slice_scans_show_only_their_plane() -> None:
    rng = np.random.default_rng(4)
    affine = np.diag([-0.3, -0.3, 0.8, 1.0])  # LPS storage, one slice, as a DICOM image often is
    before = Volume(rng.random((64, 64, 1), dtype=np.float32), affine)
    scan = ScanOutputs("dicom/series1", before.with_array(before.array + 0.1), before, None, None, {}, "sr")
    viewer = ReviewViewer(scan, view="coronal")
    assert viewer.view.options == ("axial",) and viewer.view.value == "axial"
    fig = static_review(scan)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "axial" in titles and "coronal" not in titles and "sagittal" not in titles
