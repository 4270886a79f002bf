"""Regression U-Net baseline (MONAI ``BasicUNet``): one forward pass from the operator's back-projection.

It is trained on **the same data with the same budget** as a diffusion recipe: the recipe's training
slices and patch sampler (``medidiff.data.pairs``: same volumes, operator, normalisation, patches and
flips), its number of steps, batch size and learning rate. The network sees the conditioning the diffusion
model sees (the normalised back-projection ``b`` — sinc-upsampled image for SR, complex zero-filled image
for reconstruction — plus neighbours for 2.5D recipes) and predicts the residual, ``x̂ = b + net(b)``,
with an L1 loss (as fastMRI's U-Net baseline). No data consistency, one network evaluation.

Checkpoints are ``model.safetensors`` + ``config.json`` (``kind: regression_unet``, the recipe, the
feature sizes). Train from the command line::

    python -m medidiff.baselines.unet --config pipelines/sr_x2.yaml --out medidiff/weights/unet_sr
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.data.pairs import PatchSampler, fingerprint, neighbour_index, training_pairs
from medidiff.io import atomic
from medidiff.io.volume import Volume
from medidiff.physics.coils import espirit_maps
from medidiff.physics.operators import FourierUndersampling
from medidiff.recipe import Recipe, load_recipe, recipe_from_dict
from medidiff.tasks import Operator, from_channels, measurement_scale, task_operator, to_channels

__all__ = [
    "DEFAULT_FEATURES",
    "RegressionUNet",
    "build_unet",
    "load_unet",
    "predict_slices",
    "save_unet",
    "train_regression_unet",
    "unet_enhance_kspace",
    "unet_enhance_volume",
]

DEFAULT_FEATURES: tuple[int, ...] = (16, 32, 64, 128, 128, 16)  # ~1.2 M parameters, like the diffusion nets
CHECKPOINT_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_MULTIPLE = 16  # BasicUNet halves the grid four times


@dataclass
class RegressionUNet:
    """A trained regression U-Net with the recipe whose data and operator it was trained on."""

    net: torch.nn.Module
    recipe: Recipe
    features: tuple[int, ...]
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return self.recipe.task.kind


def build_unet(recipe: Recipe, features: Sequence[int] = DEFAULT_FEATURES) -> torch.nn.Module:
    """MONAI 2D ``BasicUNet``: conditioning channels in, image channels (residual) out."""
    from monai.networks.nets import BasicUNet

    if len(features) != 6:
        raise ValueError(f"BasicUNet needs 6 feature sizes, got {tuple(features)}")
    cond_channels = recipe.in_channels - recipe.image_channels
    return BasicUNet(spatial_dims=2, in_channels=cond_channels, out_channels=recipe.image_channels,
                     features=tuple(int(f) for f in features))


def train_regression_unet(
    recipe: Recipe,
    *,
    features: Sequence[int] = DEFAULT_FEATURES,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    time_budget_s: float | None = None,
) -> tuple[RegressionUNet, list[dict[str, float]]]:
    """Train on the recipe's own training pairs for its number of steps (or ``steps`` / ``time_budget_s``).

    The batch size is the recipe's for the device (``batch_size_gpu`` on CUDA) unless ``batch_size`` is given.

    Returns the model and a history of ``{"step", "loss", "seconds"}`` (step 1, every 10, the last).
    """
    if recipe.data.patch_size % _MULTIPLE:
        raise ValueError(f"recipe {recipe.name}: data.patch_size {recipe.data.patch_size} must be a multiple "
                         f"of {_MULTIPLE} for the U-Net")
    tr = recipe.train
    dev = torch.device(device)
    total = int(steps or tr.steps)
    batch_size = int(batch_size or (tr.batch_size_gpu if dev.type == "cuda" else tr.batch_size))
    torch.manual_seed(tr.seed)  # parameter initialisation only; data draws use the explicit generator
    net = build_unet(recipe, features).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    pairs = training_pairs(recipe)
    sampler = PatchSampler(recipe, pairs)
    gen = torch.Generator().manual_seed(tr.seed * 1_000_003)
    residual = recipe.diffusion.target == "residual"
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    net.train()
    for step in range(1, total + 1):
        cond, x0 = sampler.batch(batch_size, gen)
        cond, x0 = cond.to(dev), x0.to(dev)
        target = x0 if residual else x0 - cond[:, : recipe.image_channels]  # always learn the residual
        loss = torch.nn.functional.l1_loss(net(cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tr.grad_clip)
        opt.step()
        elapsed = time.perf_counter() - t0
        last = step == total or (time_budget_s is not None and elapsed >= time_budget_s)
        if step == 1 or step % 10 == 0 or last:
            history.append({"step": step, "loss": float(loss.detach()), "seconds": elapsed})
        if progress is not None:
            progress(step, total, float(loss.detach()))
        if last:
            break
    net.eval()
    meta = {"steps_done": history[-1]["step"], "train_seconds": round(time.perf_counter() - t0, 1),
            "batch_size": batch_size, "device": dev.type, "final_loss": history[-1]["loss"],
            "data_fingerprint": fingerprint(recipe, pairs)}
    return RegressionUNet(net, recipe, tuple(int(f) for f in features), meta), history


def save_unet(out_dir: str | Path, model: RegressionUNet, **extra: Any) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (each written then renamed)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").float().contiguous() for k, v in model.net.state_dict().items()}
    with atomic.atomic_file(out / CHECKPOINT_FILE) as tmp:
        save_file(state, str(tmp))
    doc = {"kind": "regression_unet", "features": list(model.features), "recipe": model.recipe.to_dict(),
           **model.meta, **extra}
    atomic.write_text(out / CONFIG_FILE, json.dumps(doc, indent=2, default=str))
    return out


def load_unet(model_dir: str | Path, device: str = "cpu") -> RegressionUNet:
    """Load a checkpoint written by ``save_unet`` (safetensors, never pickle), in eval mode."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    for name in (CHECKPOINT_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: not a regression U-Net checkpoint (missing {name})")
    doc = json.loads((d / CONFIG_FILE).read_text())
    if doc.get("kind") != "regression_unet":
        raise ValueError(f"{d / CONFIG_FILE}: kind is {doc.get('kind')!r}, expected 'regression_unet'")
    recipe = recipe_from_dict(doc["recipe"], str(d / CONFIG_FILE))
    features = tuple(doc["features"])
    net = build_unet(recipe, features)
    try:
        net.load_state_dict(load_file(str(d / CHECKPOINT_FILE), device="cpu"))
    except RuntimeError as exc:
        raise ValueError(f"{d / CHECKPOINT_FILE}: weights do not match config.json ({exc})") from exc
    meta = {k: v for k, v in doc.items() if k not in ("kind", "features", "recipe")}
    return RegressionUNet(net.to(device).eval(), recipe, features, meta)


def predict_slices(model: RegressionUNet, op: Operator, y: torch.Tensor, stack_y: torch.Tensor | None = None,
                   index: Sequence[int] | None = None, batch: int = 8) -> torch.Tensor:
    """``b + net(b)`` for normalised measurements ``y`` (B, ...) with ``b = op.pinv(y)``; torch (B, H, W)."""
    from monai.inferers import sliding_window_inference

    recipe = model.recipe
    cplx, n = recipe.complex_images, recipe.model.neighbours
    device = next(model.net.parameters()).device
    outs = []
    for start in range(0, y.shape[0], batch):
        yb = y[start:start + batch]
        base = op.pinv(yb)
        cond = to_channels(base, cplx)
        if n:
            ctx = []
            for k in range(yb.shape[0]):
                s = (index[start + k] if index is not None else start + k)
                src = stack_y if stack_y is not None else y
                nb = neighbour_index(len(src), s, n)
                ctx.append(torch.cat([to_channels(op.pinv(src[j][None]), cplx)[0] for j in nb]))
            cond = torch.cat([cond, torch.stack(ctx)], dim=1)
        h, w = cond.shape[-2:]
        ph, pw = (-h) % _MULTIPLE, (-w) % _MULTIPLE
        mode = "reflect" if ph < h and pw < w else "replicate"
        padded = cond.float()
        if ph or pw:
            padded = torch.nn.functional.pad(padded, (0, pw, 0, ph), mode=mode)
        patch = recipe.data.patch_size
        with torch.inference_mode():
            if max(padded.shape[-2:]) > patch:
                # instance norm makes the net depend on the field of view: infer on training-size patches
                res = sliding_window_inference(padded.to(device), (patch, patch), sw_batch_size=16,
                                               predictor=model.net, overlap=0.5, mode="gaussian",
                                               padding_mode="reflect")
            else:
                res = model.net(padded.to(device))
            res = res[..., :h, :w].float().cpu()
        outs.append(base + from_channels(res, cplx))
    return torch.cat(outs)


def unet_enhance_volume(model: RegressionUNet, lr: Volume) -> Volume:
    """In-plane SR of a low-resolution Volume on the HR grid.

    Slices run along axis 2, as in ``enhance_volume``.
    """
    if model.task != "sr":
        raise ValueError(
            f"regression U-Net trained for {model.task!r}; unet_enhance_volume does in-plane 'sr'"
        )
    f = model.recipe.task.factor
    stack = np.moveaxis(np.asarray(lr.array, np.float32), 2, 0)
    scale = measurement_scale("sr", stack)
    y = torch.from_numpy(np.ascontiguousarray(stack)) / scale
    out = predict_slices(model, task_operator(model.recipe.task), y).numpy() * scale
    affine = np.asarray(lr.affine) @ np.diag([1.0 / f, 1.0 / f, 1.0, 1.0])
    return lr.with_array(np.ascontiguousarray(np.moveaxis(out, 0, 2), np.float32), affine,
                         description=f"regression U-Net sr x{f}")


def unet_enhance_kspace(model: RegressionUNet, data) -> Volume:
    """Reconstruction of undersampled k-space (single-coil, or multi-coil via ESPIRiT maps): |b + net(b)|."""
    if model.task != "recon":
        raise ValueError(f"regression U-Net trained for {model.task!r}; unet_enhance_kspace needs 'recon'")
    k = torch.from_numpy(np.asarray(data.kspace, np.complex64))
    h, w = k.shape[-2:]
    if data.mask is not None:
        mask = np.broadcast_to(np.asarray(data.mask, np.float32), (h, w)).astype(np.float32)
    else:
        mask = (np.abs(data.kspace).reshape(-1, h, w).sum(axis=0) > 0).astype(np.float32)
    scale = measurement_scale("recon", k, coil_dim=1 if k.ndim == 4 else None)
    out = np.empty((k.shape[0], h, w), np.float32)
    if k.ndim == 3:
        out[:] = predict_slices(model, FourierUndersampling(mask), k / scale).abs().numpy() * scale
    else:
        for s in range(k.shape[0]):
            op = FourierUndersampling(mask, sens_maps=espirit_maps(data.kspace[s]))
            out[s] = predict_slices(model, op, k[s:s + 1] / scale)[0].abs().numpy() * scale
    return Volume(np.ascontiguousarray(np.moveaxis(out, 0, -1)), data.affine,
                  {"description": "regression U-Net recon"})


def main(argv: Sequence[str] | None = None) -> None:
    """Train the regression U-Net with a diffusion recipe's data and budget and save it."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True, help="the diffusion recipe (pipelines/*.yaml) to match")
    ap.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's train.steps")
    ap.add_argument(
        "--batch-size", type=int, default=None,
        help="override the recipe's batch size (default: train.batch_size, batch_size_gpu on CUDA)",
    )
    ap.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    recipe = load_recipe(args.config)

    def report(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f}", flush=True)

    model, history = train_regression_unet(
        recipe, steps=args.steps, batch_size=args.batch_size, device=args.device, progress=report,
        time_budget_s=args.time_budget,
    )
    out = save_unet(args.out, model, recipe_file=Path(args.config).name)
    print(f"saved {out} after {history[-1]['step']} steps, {model.meta['train_seconds']} s")


if __name__ == "__main__":
    main()
