"""simulate_sr / simulate_recon geometry and the `medidiff simulate` CLI run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.io.volume import Volume
from medidiff.physics.fft import ifft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import FourierUndersampling, KSpaceTruncation, SliceProfile
from medidiff.physics.simulate import hr_affine, simulate_recon, simulate_sr, sr_affine

DIPY = Path(__import__("dipy").__file__).parent / "data" / "files"


def _oblique_volume(shape=(33, 40, 9), spacing=(0.9, 0.9, 3.0), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-12.0, 30.0, 7.0]
    return Volume(rng.random(shape).astype(np.float32) + 1, affine)


def test_sr_inplane_geometry_and_consistency():
    vol = _oblique_volume()
    lr, ref = simulate_sr(vol, 2, "inplane")
    assert ref.shape == (32, 40, 9) and lr.shape == (16, 20, 9)
    np.testing.assert_allclose(ref.affine, vol.affine)  # cropped at the high end: voxel 0 unchanged
    np.testing.assert_allclose(lr.affine, vol.affine @ np.diag([2, 2, 1, 1]))
    # same field of view: extent along each in-plane axis equal; LR voxel i at HR voxel 2i in world space
    np.testing.assert_allclose(
        np.array(lr.shape[:2]) * lr.spacing[:2], np.array(ref.shape[:2]) * ref.spacing[:2]
    )
    np.testing.assert_allclose(lr.world_coordinates([[3, 5, 2]]), ref.world_coordinates([[6, 10, 2]]))
    np.testing.assert_allclose(hr_affine(lr.affine, 2, (0, 1)), ref.affine)
    # the LR data is exactly the operator applied to the reference slices
    op = KSpaceTruncation(2)
    expected = op.A(torch.from_numpy(np.moveaxis(ref.array, 2, 0))).numpy()
    np.testing.assert_allclose(np.moveaxis(lr.array, 2, 0), expected, atol=1e-5)
    assert abs(float(lr.array.mean()) - float(ref.array.mean())) < 1e-3 * float(ref.array.mean())


def test_sr_through_plane_geometry():
    vol = _oblique_volume(shape=(20, 9, 18), spacing=(1.0, 3.0, 1.0))  # slice axis is 1
    lr, ref = simulate_sr(vol, 3, "through", profile="rect")
    assert vol.slice_axis == 1 and ref.shape == (20, 9, 18) and lr.shape == (20, 3, 18)
    np.testing.assert_allclose(lr.spacing, (1.0, 9.0, 1.0), rtol=1e-6)
    # LR slice i centred at HR slice 3i + 1
    np.testing.assert_allclose(lr.world_coordinates([[4, 2, 5]]), ref.world_coordinates([[4, 7, 5]]))
    np.testing.assert_allclose(lr.array[:, 2, :], ref.array[:, 6:9, :].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(hr_affine(lr.affine, 3, (1,), centred=True), ref.affine)
    np.testing.assert_allclose(sr_affine(ref.affine, 3, (1,), centred=True), lr.affine)
    op = SliceProfile(3)
    np.testing.assert_allclose(
        op.A(torch.from_numpy(np.moveaxis(ref.array, 1, -1))).numpy(), np.moveaxis(lr.array, 1, -1), atol=1e-5
    )


@pytest.mark.parametrize("coils", [1, 4])
def test_recon_kspace_layout_and_reference(coils):
    vol = _oblique_volume(
        shape=(24, 6, 32), spacing=(1.0, 4.0, 1.0)
    )  # slice axis 1 → kspace (6, [C,] 24, 32)
    data, ref = simulate_recon(vol, 4, 0.08, "equispaced", coils=coils, seed=3)
    expected_shape = (6, 24, 32) if coils == 1 else (6, coils, 24, 32)
    assert data.kspace.shape == expected_shape and data.kspace.dtype == np.complex64
    assert ref.shape == (24, 32, 6)
    np.testing.assert_allclose(ref.array, np.transpose(vol.array, (0, 2, 1)))
    # same world positions for the permuted grid
    np.testing.assert_allclose(ref.world_coordinates([[5, 7, 2]]), vol.world_coordinates([[5, 2, 7]]))
    np.testing.assert_allclose(data.affine, ref.affine)
    mask = make_mask("equispaced", (24, 32), 4, 0.08, seed=3)
    np.testing.assert_array_equal(data.mask, mask.mask)
    assert data.meta["simulation"]["acceleration"] == pytest.approx(mask.acceleration)
    # measured data equal the operator's output on the reference slices; unmeasured are +0
    from medidiff.physics.coils import synthetic_coil_maps

    maps = None if coils == 1 else synthetic_coil_maps(coils, (24, 32), seed=3)
    op = FourierUndersampling(mask, maps)
    y = op.A(torch.from_numpy(np.moveaxis(ref.array, -1, 0)).to(torch.complex64)).numpy()
    np.testing.assert_allclose(data.kspace, y, atol=1e-5)
    assert not np.any(np.signbit(data.kspace.real[..., mask.mask == 0]))


def test_recon_mask_where_centre_covers_the_fraction():
    vol = _oblique_volume(shape=(16, 12, 5), spacing=(1.0, 1.0, 2.0))
    data, _ = simulate_recon(vol, 2, 0.5, "equispaced", seed=0)  # centre alone = 1/R of the columns
    assert data.mask.sum() == 6 and data.meta["simulation"]["acceleration"] == pytest.approx(2.0)
    zero_filled = ifft2c_np(data.kspace)
    assert zero_filled.shape == (5, 16, 12)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medidiff", "simulate", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_simulate_cli_sr_and_recon(tmp_path):
    src = DIPY / "aniso_vox.nii.gz"
    out = tmp_path / "sr"
    proc = _run_cli(str(src), "--out", str(out), "--task", "sr", "--factor", "2")
    assert proc.returncode == 0, proc.stderr
    lr, ref, orig = (nib.load(p) for p in (out / "aniso_vox_lr.nii.gz", out / "aniso_vox_ref.nii.gz", src))
    assert ref.shape == orig.shape[:3] and lr.shape == (29, 29, 24)
    np.testing.assert_allclose(lr.affine, ref.affine @ np.diag([2, 2, 1, 1]), atol=1e-4)
    np.testing.assert_allclose(ref.affine, orig.affine, atol=1e-4)
    assert lr.get_data_dtype() == np.float32

    out = tmp_path / "recon"
    proc = _run_cli(
        str(src),
        "--out",
        str(out),
        "--task",
        "recon",
        "--acceleration",
        "4",
        "--center-fraction",
        "0.08",
        "--mask",
        "random",
        "--coils",
        "2",
        "--seed",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out / "aniso_vox_kspace.h5") as f:
        assert f["kspace"].shape == (24, 2, 58, 58) and f["kspace"].dtype == np.complex64
        assert f["mask"].shape == (58,)
        assert f["reconstruction_rss"].shape == (24, 58, 58)
    assert (out / "aniso_vox_ref.nii.gz").exists()

    proc = _run_cli(str(tmp_path / "missing"), "--out", str(out), "--task", "sr")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
