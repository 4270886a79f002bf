"""Review figures: true aspect for anisotropic voxels, orientation from the affine, fixed colour maps."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from medidiff.io.volume import Volume
from medidiff.review import figures as F


def _marker_volume(affine_kind: str) -> Volume:
    """A 20x24x16 volume whose bright marker sits at the patient's right-anterior-superior corner (world).

    The same anatomy stored with different voxel orders: 'RAS', 'LAS' (first axis flipped),
    'LPS' (DICOM-like), and 'SRA' (axes permuted). World coordinates of every voxel centre are identical
    across kinds.
    """
    shape = (20, 24, 16)
    ras = np.zeros(shape, np.float32)
    ras[15:18, 18:21, 11:14] = 1.0  # high i = Right, high j = Anterior, high k = Superior
    ras[2:4, 2:4, 2:4] = 0.5  # a second, dimmer marker at left-posterior-inferior
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10.0, -12.0, -8.0]
    if affine_kind == "RAS":
        return Volume(ras, affine)
    if affine_kind == "LAS":
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = shape[0] - 1
        return Volume(ras[::-1].copy(), affine @ flip)
    if affine_kind == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        return Volume(ras[::-1, ::-1].copy(), affine @ flip)
    if affine_kind == "SRA":  # array axes (k, i, j): affine columns permuted accordingly
        perm = np.zeros((4, 4))
        perm[2, 0] = perm[0, 1] = perm[1, 2] = perm[3, 3] = 1.0
        return Volume(np.transpose(ras, (2, 0, 1)).copy(), affine @ perm)
    raise ValueError(affine_kind)


@pytest.mark.parametrize("kind", ["RAS", "LAS", "LPS", "SRA"])
def test_world_geometry_of_fixture_is_identical(kind: str) -> None:
    vol = _marker_volume(kind)
    idx = np.argwhere(vol.array == 1.0)
    world = vol.world_coordinates(idx)
    # right, anterior, superior
    assert world[:, 0].min() > 0 and world[:, 1].min() > 0 and world[:, 2].min() > 0


@pytest.mark.parametrize("kind", ["RAS", "LAS", "LPS", "SRA"])
def test_radiological_axial_puts_patient_right_on_screen_left(kind: str) -> None:
    vol = _marker_volume(kind)
    sl = F.oriented_slice(vol, "axial", index=12)  # canonical k=12 goes through the marker
    assert sl.labels == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    rows, cols = np.nonzero(sl.image == 1.0)
    assert cols.max() < sl.image.shape[1] / 2, "patient's right must be on the screen's left"
    assert rows.max() < sl.image.shape[0] / 2, "anterior must be at the top"
    reference = F.oriented_slice(_marker_volume("RAS"), "axial", index=12)
    np.testing.assert_array_equal(sl.image, reference.image)
    assert sl.position_mm == pytest.approx(4.0)  # -8 mm + 12 voxels of 1 mm


@pytest.mark.parametrize("kind", ["RAS", "LPS", "SRA"])
def test_coronal_and_sagittal_orientation(kind: str) -> None:
    vol = _marker_volume(kind)
    cor = F.oriented_slice(vol, "coronal", index=19)
    assert cor.labels == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    rows, cols = np.nonzero(cor.image == 1.0)
    assert cols.max() < cor.image.shape[1] / 2 and rows.max() < cor.image.shape[0] / 2  # right, superior
    sag = F.oriented_slice(vol, "sagittal", index=16)
    assert sag.labels == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    rows, cols = np.nonzero(sag.image == 1.0)
    assert cols.max() < sag.image.shape[1] / 2 and rows.max() < sag.image.shape[0] / 2  # anterior, superior


def test_neurological_convention_mirrors_left_right() -> None:
    sl = F.oriented_slice(_marker_volume("LAS"), "axial", index=12, convention="neurological")
    assert sl.labels["left"] == "L" and sl.labels["right"] == "R"
    _, cols = np.nonzero(sl.image == 1.0)
    assert cols.min() > sl.image.shape[1] / 2


def test_labels_are_drawn_on_each_panel() -> None:
    vol = _marker_volume("LPS")
    fig = F.scan_figure(vol, vol, None, view="axial")
    ax = fig.axes[0]
    drawn = {t.get_gid(): t.get_text() for t in ax.texts if (t.get_gid() or "").startswith("orientation-")}
    assert drawn == {"orientation-left": "R", "orientation-right": "L", "orientation-top": "A",
                     "orientation-bottom": "P"}


def _aniso() -> Volume:
    rng = np.random.default_rng(1)
    affine = np.diag([0.5, 0.8, 3.0, 1.0])
    return Volume(rng.random((40, 50, 10), dtype=np.float32), affine)


@pytest.mark.parametrize(
    "view, shape, extent",
    [("axial", (50, 40), (0, 20, 40, 0)), ("coronal", (10, 40), (0, 20, 30, 0)),
     ("sagittal", (10, 50), (0, 40, 30, 0))],
)
def test_anisotropic_voxels_keep_true_aspect(view: str, shape: tuple, extent: tuple) -> None:
    vol = _aniso()
    sl = F.oriented_slice(vol, view)
    assert sl.image.shape == shape
    assert sl.extent == pytest.approx(extent)
    fig = F.scan_figure(vol, vol, vol, view=view)
    FigureCanvasAgg(fig).draw()
    image_axes = [ax for ax in fig.axes if ax.images and ax.images[0].get_extent() is not None][:4]
    for ax in image_axes:
        assert ax.images[0].get_extent() == pytest.approx(extent)
        assert ax.get_aspect() == 1.0  # 'equal': one mm is as long across as down
        box = ax.get_window_extent()
        expected = abs(extent[2] - extent[3]) / abs(extent[1] - extent[0])
        assert box.height / box.width == pytest.approx(expected, rel=0.03)


def test_colour_maps_limits_and_units() -> None:
    rng = np.random.default_rng(2)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    before = Volume(rng.random((16, 16, 8), dtype=np.float32), affine)
    enhanced = before.with_array(before.array + 0.1 * rng.standard_normal(before.shape).astype(np.float32))
    sd = before.with_array(np.abs(rng.standard_normal(before.shape)).astype(np.float32))
    fig = F.scan_figure(before, enhanced, sd, view="axial", window=2.0, level=0.5, units="ms")
    panels = [ax for ax in fig.axes if ax.images][:4]
    assert [ax.images[0].get_cmap().name for ax in panels] == ["gray", "gray", "RdBu_r", "magma"]
    assert panels[0].images[0].get_clim() == pytest.approx((-0.5, 1.5))  # window 2 around level 0.5
    assert panels[1].images[0].get_clim() == panels[0].images[0].get_clim()
    lo, hi = panels[2].images[0].get_clim()
    assert lo == pytest.approx(-hi) and hi > 0
    labels = [ax.get_xlabel() for ax in fig.axes if not ax.images or ax not in panels]
    assert sum("(ms)" in label for label in labels) == 4  # one colour bar with units under every panel


def test_overlay_marks_voxels_above_the_volume_percentile() -> None:
    affine = np.eye(4)
    base = Volume(np.ones((20, 20, 5), np.float32), affine)
    sd = np.zeros((20, 20, 5), np.float32)
    sd[5:9, 5:9, :] = 1.0  # 16 of 400 voxels per slice = 4 % of the volume are uncertain
    unc = base.with_array(sd)
    limits = F.display_limits(base, base, unc, overlay_percentile=95.0)
    assert limits.uncertainty_threshold == pytest.approx(0.0)
    fig = F.scan_figure(base, base, unc, view="axial", limits=limits)
    overlay = [im for ax in fig.axes for im in ax.images if im.get_gid() == "uncertainty-overlay"]
    assert len(overlay) == 1
    shown = ~np.ma.getmaskarray(overlay[0].get_array())
    assert shown.sum() == 16
    expected = F.oriented_slice(unc, "axial").image > 0
    np.testing.assert_array_equal(shown, expected)


def test_mismatched_grids_are_refused() -> None:
    a = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    b = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(F.ReviewError, match="not on the grid"):
        F.scan_figure(a, b)
    with pytest.raises(F.ReviewError, match="outside"):
        F.oriented_slice(a, "axial", index=4)
    with pytest.raises(F.ReviewError, match="unknown view"):
        F.oriented_slice(a, "transverse")


def test_middle_slices_figure_and_png(tmp_path) -> None:
    vol = _aniso()
    fig = F.middle_slices_figure(vol, vol, None, title="t", metrics={"psnr": 30.0, "note": "x"})
    assert sum(1 for ax in fig.axes if ax.images) >= 9  # 3 views x 3 image panels (+ colour bars)
    path = F.write_png(fig, tmp_path / "sub" / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name != "m.png"]  # no temp files left
