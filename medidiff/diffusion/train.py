"""The training loop.

AdamW, bf16 autocast (CUDA, and CPUs with native bf16), EMA, gradient clipping, validation, checkpoints,
MLflow, DDP.

Run it with ``medidiff train`` (or under ``torchrun`` for several processes: gloo on CPU, NCCL on GPUs).
Layout of ``OUT``: ``checkpoint/`` (EMA weights + ``train_state.safetensors`` with the raw weights, optimiser
and RNG state, for ``--resume``) and ``model/`` (the deployable EMA model: safetensors + config.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medidiff import __version__
from medidiff.data.pairs import MixtureSampler, PatchSampler, SlicePair, training_sampler, validation_pairs
from medidiff.diffusion.process import Scheduler, diffusion_loss, make_scheduler
from medidiff.diffusion.sampling import sample
from medidiff.metrics import all_metrics
from medidiff.models import build_model, load_model, save_checkpoint
from medidiff.models.runtime import has_native_bf16
from medidiff.recipe import Recipe, TrainConfig, recipe_from_dict, with_overrides
from medidiff.tasks import task_operator
from medidiff.tracking import Tracker, tracking_run

Tensor = torch.Tensor


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    model_dir: Path
    step: int
    run_id: str | None
    seconds: float
    val: dict[str, float] = field(default_factory=dict)


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dist_setup(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimiser state as flat tensors (for safetensors) plus the JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def _panel(a: np.ndarray, vmax: float) -> np.ndarray:
    return np.clip(np.abs(a) / (vmax if vmax > 0 else 1.0), 0, 1)


@torch.no_grad()
def validate(net: torch.nn.Module, recipe: Recipe, pairs: list[SlicePair], device: torch.device,
             steps: int, seed: int) -> tuple[dict[str, float], np.ndarray | None]:
    """Model vs degraded baseline on held-out slices (few DDIM steps, DC on).

    Returns metrics and a grid image.
    """
    net.eval()
    rows: list[dict[str, float]] = []
    grid = None
    gen = torch.Generator(device=device).manual_seed(seed)
    for i, q in enumerate(pairs):
        op = task_operator(recipe.task, tuple(q.base.shape[-2:]), mask=q.mask)
        k = 2 if i == 0 else 1
        ctx = None if q.context is None else q.context[None]
        out = sample(net, recipe, op, q.y[None], context=ctx, steps=steps, samples=k, generator=gen)
        ref = q.target.abs().numpy() if q.target.is_complex() else q.target.numpy()
        pred = out.mean[0].abs().cpu().numpy()
        base = q.base.abs().numpy()
        m, b = all_metrics(ref, pred), all_metrics(ref, base)
        rows.append({**m, **{f"{k_}_baseline": v for k_, v in b.items()}})
        if i == 0:
            vmax = float(ref.max())
            unc = out.std[0].cpu().numpy() if out.std is not None else np.zeros_like(ref)
            grid = np.concatenate([_panel(base, vmax), _panel(pred, vmax), _panel(ref, vmax),
                                   _panel(5 * (pred - ref), vmax), _panel(5 * unc, vmax)], axis=1)
    net.train()
    metrics = {f"val/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    if rows:
        metrics["val/psnr_gain"] = metrics["val/psnr"] - metrics["val/psnr_baseline"]
    return metrics, grid


@dataclass
class _State:
    """Everything a checkpoint restores: weights, EMA, optimiser, generators, step and MLflow run."""

    net: torch.nn.Module
    ema: AveragedModel
    opt: torch.optim.Optimizer
    data_gen: torch.Generator
    noise_gen: torch.Generator
    step: int = 0
    run_id: str | None = None


def _set_up(recipe: Recipe, dev: torch.device, rank: int, init_from: str | Path | None,
            resume: bool) -> _State:
    """A seeded network (or another model's weights to fine-tune), its EMA, optimiser and generators."""
    tr = recipe.train
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(tr.seed)
        net = build_model(recipe)
    if init_from is not None and not resume:  # fine-tune: start from another model's weights (same network)
        start = load_model(init_from)
        if start.recipe.model != recipe.model:
            raise RuntimeError(f"{init_from}: its network settings differ from the recipe's; "
                               "cannot start from it")
        net.load_state_dict(start.net.state_dict())
    net = net.to(dev)
    return _State(
        net=net,
        ema=AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(tr.ema_decay)),
        opt=torch.optim.AdamW(net.parameters(), lr=tr.lr, weight_decay=tr.weight_decay),
        data_gen=torch.Generator().manual_seed(tr.seed * 1_000_003 + rank),
        noise_gen=torch.Generator(device=dev).manual_seed(tr.seed * 7_919 + 17 + rank),
    )


#: Train settings that say how long and where to run, not what is trained: changing them on --resume
#: (a new wall-time cap, more steps, another device) is not a recipe change.
RUN_CONTROL = ("max_minutes", "steps", "device")


def _what_is_trained(recipe: Recipe) -> dict[str, Any]:
    """The recipe without its run-control settings."""
    doc = recipe.to_dict()
    doc["train"] = {k: v for k, v in doc["train"].items() if k not in RUN_CONTROL}
    return doc


def _resume(state: _State, recipe: Recipe, ckpt_dir: Path, dev: torch.device, rank: int) -> Recipe:
    """Restore ``state`` from ``ckpt_dir`` exactly; returns the checkpoint's recipe (warns if it differs)."""
    from safetensors.torch import load_file

    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: nothing to resume (no checkpoint/config.json)")
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    saved = recipe_from_dict(cfg["recipe"], str(ckpt_dir / "config.json"))
    if _what_is_trained(saved) != _what_is_trained(recipe):
        warnings.warn(f"{ckpt_dir}: the recipe differs from the one the checkpoint was trained with; "
                      "resuming with the checkpoint's recipe", stacklevel=3)
        run_control = {k: getattr(recipe.train, k) for k in RUN_CONTROL}
        recipe = with_overrides(saved, train=run_control)
    tensors = load_file(str(ckpt_dir / "train_state.safetensors"), device="cpu")
    state.net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    state.ema.load_state_dict({k[len("ema."):]: v.to(dev) for k, v in tensors.items()
                               if k.startswith("ema.")})
    _load_optimizer(state.opt, {k: v.to(dev) for k, v in tensors.items()}, cfg["optimizer"])

    def rng(kind: str) -> torch.Tensor:  # this rank's state, else rank 0's (resuming on fewer/more ranks)
        return tensors.get(f"rng.{kind}.{rank}", tensors[f"rng.{kind}.0"])

    state.data_gen.set_state(rng("data"))
    try:  # fails only when resuming on another device type than the checkpoint was written on
        state.noise_gen.set_state(rng("noise"))
    except RuntimeError:
        warnings.warn(f"{ckpt_dir}: noise RNG state is from another device type; reseeded", stacklevel=3)
    state.step, state.run_id = int(cfg["step"]), cfg.get("run_id")
    return recipe


def _rng_states(state: _State, world: int) -> dict[str, torch.Tensor]:
    """Every rank's generator states (collective under DDP: all ranks must call it)."""
    mine = (state.data_gen.get_state(), state.noise_gen.get_state().cpu())
    if world == 1:
        states = [mine]
    else:
        states = [None] * world
        dist.all_gather_object(states, mine)
    out = {}
    for r, (d_state, n_state) in enumerate(states):
        out[f"rng.data.{r}"], out[f"rng.noise.{r}"] = d_state, n_state
    return out


def _save(directory: Path, state: _State, recipe: Recipe, info: dict[str, Any],
          rngs: dict[str, torch.Tensor] | None = None) -> None:
    """The EMA model into ``directory`` (+ the full training state when ``rngs`` are given: ``--resume``)."""
    extra: dict[str, Any] = {"step": state.step, **info}
    if rngs is not None:
        tensors, groups = _optimizer_tensors(state.opt)
        tensors.update({f"net.{k}": v for k, v in state.net.state_dict().items()})
        tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
        tensors.update(rngs)
        extra.update(tensors=tensors, optimizer=groups)
    save_checkpoint(directory, state.ema.module, recipe, **extra)


def learning_rate(tr: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    ``lr`` held (``lr_schedule: constant``) or cosine-decayed to zero at ``steps`` (``cosine``)."""
    warm = max(1, tr.warmup_steps)
    if step + 1 < warm or tr.lr_schedule == "constant":
        return tr.lr * min(1.0, (step + 1) / warm)
    span = max(1, tr.steps - warm)
    done = min(1.0, max(0.0, (step + 1 - warm) / span))
    return tr.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def _train_step(state: _State, model: torch.nn.Module, recipe: Recipe, scheduler: Scheduler,
                sampler: PatchSampler | MixtureSampler, batch_size: int, dev: torch.device,
                use_amp: bool) -> tuple[float, float]:
    """One optimiser step (warm-up learning rate, bf16 autocast, clipping, EMA); returns (loss, grad norm)."""
    tr = recipe.train
    for group in state.opt.param_groups:
        group["lr"] = learning_rate(tr, state.step)
    cond, x0 = sampler.batch(batch_size, state.data_gen)
    cond, x0 = cond.to(dev, non_blocking=True), x0.to(dev, non_blocking=True)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
        loss = diffusion_loss(model, recipe, scheduler, cond, x0, state.noise_gen)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), tr.grad_clip)
    state.opt.step()
    state.ema.update_parameters(state.net)
    state.step += 1
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value} at step {state.step}; lower train.lr")
    return value, float(grad_norm)


def _out_of_time(recipe: Recipe, t0: float, world: int, dev: torch.device) -> bool:
    """``train.max_minutes`` spent (agreed by all ranks, which must stop together)."""
    max_minutes = recipe.train.max_minutes
    out = max_minutes > 0 and (time.perf_counter() - t0) > 60 * max_minutes
    if world > 1 and max_minutes > 0:
        flag = torch.tensor([float(out)], device=dev)
        dist.all_reduce(flag)
        out = bool(flag.item() > 0)
    return out


def _progress_bar(recipe: Recipe, total_steps: int, step: int):
    """A rich progress bar (started) and its task id."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    progress.start()
    return progress, progress.add_task("train", total=total_steps, completed=step, name=recipe.name, loss="-")


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train a model from a recipe into ``out_dir``; see the module docstring for the layout."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dev = resolve_device(device or recipe.train.device)
    rank, world = _dist_setup(dev)
    main = rank == 0
    total_steps = int(max_steps or recipe.train.steps)
    batch_size = recipe.train.batch_size_gpu if dev.type == "cuda" else recipe.train.batch_size
    use_amp = recipe.train.amp and has_native_bf16(dev)  # bf16 where the hardware multiplies it natively

    ckpt_dir = out_dir / "checkpoint"
    if resume and not (ckpt_dir / "config.json").is_file():  # nothing yet: start (the same command restarts)
        if main:
            print(f"{ckpt_dir}: no checkpoint yet; starting a new run", flush=True)
        resume = False
    state = _set_up(recipe, dev, rank, init_from, resume)
    if resume:
        recipe = _resume(state, recipe, ckpt_dir, dev, rank)
    tr = recipe.train
    model: torch.nn.Module = state.net
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(state.net, device_ids=ids)

    sampler, data_fp, n_slices = training_sampler(recipe)
    val_pairs = validation_pairs(recipe) if main else []
    scheduler = make_scheduler(recipe.diffusion)
    if dev.type == "cuda":
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dev)

    runtime = {"device": dev.type, "world_size": world, "batch_size": batch_size, "bf16_autocast": use_amp,
               "total_steps": total_steps, "package_version": __version__, "data_fingerprint": data_fp,
               "train_slices": n_slices, "parameters": sum(p.numel() for p in state.net.parameters())}
    params = {**recipe.to_dict(), "runtime": runtime}
    ctx = tracking_run("train", run_name=recipe.name, tracking_uri=tracking_uri, params=params,
                       resume_run_id=state.run_id) if main else nullcontext(None)
    val_metrics: dict[str, float] = {}
    with ctx as tracker_or_none:
        tracker = tracker_or_none or Tracker()

        def info() -> dict[str, Any]:
            return {"data_fingerprint": data_fp, "val": val_metrics, "world_size": world, "device": dev.type,
                    "run_id": tracker.run_id, "train_seconds": round(time.perf_counter() - t0, 1)}

        interactive = show_progress and sys.stdout.isatty()
        progress, bar = (
            _progress_bar(recipe, total_steps, state.step) if main and interactive else (None, None)
        )
        first_step, t_loop = state.step, time.perf_counter()
        state.net.train()
        losses: list[float] = []
        try:
            while state.step < total_steps:
                loss, grad_norm = _train_step(
                    state, model, recipe, scheduler, sampler, batch_size, dev, use_amp
                )
                losses.append(loss)
                step = state.step
                if main and (step % tr.log_every == 0 or step == total_steps):
                    tracker.log_metrics({"train/loss": float(np.mean(losses[-tr.log_every:])),
                                         "train/grad_norm": grad_norm,
                                         "train/lr": state.opt.param_groups[0]["lr"]},
                                        step=step)
                if progress is not None:
                    progress.update(bar, completed=step, loss=f"{np.mean(losses[-tr.log_every:]):.4f}")
                elif main and show_progress and step % tr.log_every == 0:  # plain lines for a log file
                    rate = (step - first_step) / max(time.perf_counter() - t_loop, 1e-9)
                    print(f"step {step}/{total_steps} loss {np.mean(losses[-tr.log_every:]):.5f} "
                          f"{rate:.3f} steps/s", flush=True)
                out_of_time = _out_of_time(recipe, t0, world, dev)
                last = step == total_steps or out_of_time
                if main and (step % tr.val_every == 0 or last) and val_pairs:
                    val_metrics, grid = validate(
                        state.ema.module, recipe, val_pairs, dev, tr.val_steps, tr.seed
                    )
                    if show_progress and progress is None:
                        gain = val_metrics.get("val/psnr_gain", float("nan"))
                        print(f"step {step} validation psnr gain {gain:+.3f} dB", flush=True)
                    tracker.log_metrics(val_metrics, step=step)
                    if grid is not None:
                        tracker.log_image(grid, f"samples/step_{step:06d}.png")
                if step % tr.ckpt_every == 0 or last:
                    rngs = _rng_states(state, world)
                    if main:
                        _save(ckpt_dir, state, recipe, info(), rngs=rngs)
                if world > 1:
                    dist.barrier()
                if out_of_time:
                    break
        finally:
            if progress is not None:
                progress.stop()
        model_dir = out_dir / "model"
        if main:
            _save(model_dir, state, recipe, info())
            tracker.log_metrics({"train/seconds": time.perf_counter() - t0}, step=state.step)
            tracker.log_artifact(model_dir, "model")
            if tr.register_as:
                tracker.register_model("model", tr.register_as)
        run = tracker.run_id
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out_dir=out_dir, model_dir=model_dir, step=state.step, run_id=run,
                       seconds=time.perf_counter() - t0, val=val_metrics)
