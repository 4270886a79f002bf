"""Regression U-Net baseline: trains on a recipe's data (loss falls), round-trips via safetensors, applies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.baselines.unet import (
    RegressionUNet,
    build_unet,
    load_unet,
    save_unet,
    train_regression_unet,
    unet_enhance_kspace,
    unet_enhance_volume,
)
from medidiff.io.kspace import KSpaceData
from medidiff.io.volume import Volume
from medidiff.physics.fft import fft2c_np
from medidiff.physics.masks import make_mask
from medidiff.physics.operators import KSpaceTruncation
from medidiff.recipe import recipe_from_dict

SMALL = (8, 8, 16, 16, 16, 8)


def _recipe(kind: str, steps: int = 12):
    """A tiny recipe: one synthetic subject, a few 32² patches per step."""
    task = {"kind": kind, "factor": 2} if kind == "sr" else {"kind": kind, "acceleration": 4.0}
    return recipe_from_dict({
        "name": f"tiny_{kind}", "task": task,
        "model": {"channels": [8, 8, 16, 16], "norm_num_groups": 8, "num_head_channels": 8},
        "data": {"synthetic_subjects": 1, "real_training": False, "slices_per_volume": 6, "patch_size": 32,
                 "val_subjects": 1, "val_slices": 1},
        "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1},
    })


def _phantom_stack(n: int = 48, slices: int = 2) -> np.ndarray:
    """Smooth test slices (S, n, n)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    return np.stack([np.exp(-((xx - 0.2 * s) ** 2 + yy**2) * 3).astype(np.float32) for s in range(slices)])


def test_sr_unet_trains_round_trips_and_lands_on_the_hr_grid(tmp_path: Path) -> None:
    model, history = train_regression_unet(_recipe("sr"), features=SMALL)
    assert history[0]["step"] == 1 and history[-1]["step"] == 12
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]  # it learns

    out = save_unet(tmp_path / "unet", model)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    loaded = load_unet(out)
    assert loaded.features == SMALL and loaded.recipe == model.recipe and loaded.task == "sr"

    hr = _phantom_stack(40)  # 40 is not a multiple of 16: the network input is padded
    lr_stack = KSpaceTruncation(2).A(torch.from_numpy(hr)).numpy()
    lr = Volume(np.moveaxis(lr_stack, 0, 2), np.diag([2.0, 2.0, 3.0, 1.0]))
    a, b = unet_enhance_volume(model, lr), unet_enhance_volume(loaded, lr)
    assert a.shape == (40, 40, 2)
    np.testing.assert_allclose(a.affine, np.diag([1.0, 1.0, 3.0, 1.0]))
    np.testing.assert_array_equal(a.array, b.array)  # identical after the safetensors round trip


def test_recon_unet_uses_complex_channels(tmp_path: Path) -> None:
    model, _ = train_regression_unet(_recipe("recon", steps=3), features=SMALL)
    assert model.net.conv_0.conv_0.conv.in_channels == 2  # real + imaginary zero-filled image
    ref = _phantom_stack(48)
    mask = make_mask("equispaced", (48, 48), 4, 0.08, seed=0)
    data = KSpaceData(fft2c_np(ref) * mask.full(), mask.mask, np.eye(4))
    out = unet_enhance_kspace(load_unet(save_unet(tmp_path / "u", model)), data)
    assert out.shape == (48, 48, 2) and out.array.dtype == np.float32 and (out.array >= 0).all()


def test_load_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_unet(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"kind": "diffusion"}')
    with pytest.raises(ValueError, match="regression_unet"):
        load_unet(tmp_path)


def test_build_is_monai_basicunet() -> None:
    from monai.networks.nets import BasicUNet

    net = build_unet(_recipe("sr"), SMALL)
    assert isinstance(net, BasicUNet)
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert isinstance(RegressionUNet(net, _recipe("sr"), SMALL, {}).task, str)
