"""Networks from recipes, and checkpoints as safetensors + config.json (loading never unpickles)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medidiff import __version__
from medidiff.io import atomic
from medidiff.recipe import Recipe, recipe_from_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_MODELS = {"sr": "sr_x2", "sr_thick": "sr_thick_x4", "recon": "recon_x4"}


def build_model(cfg: Recipe) -> torch.nn.Module:
    """MONAI DiffusionModelUNet (2D) whose input is the noisy target concatenated with the conditioning."""
    from monai.networks.nets import DiffusionModelUNet

    m = cfg.model
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.image_channels,
        channels=tuple(m.channels),
        num_res_blocks=m.num_res_blocks,
        attention_levels=(False,) * len(m.channels),  # attention only in the mid block (lowest resolution)
        norm_num_groups=m.norm_num_groups,
        num_head_channels=m.num_head_channels,
    )


@dataclass
class LoadedModel:
    """A network ready for inference with the recipe it was trained with."""

    net: torch.nn.Module
    recipe: Recipe
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def task(self) -> str:
        return self.recipe.task.kind

    @property
    def name(self) -> str:
        return self.recipe.name


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / AveragedModel
        model = model.module  # type: ignore[assignment]
    return model


def save_checkpoint(directory: str | Path, model: torch.nn.Module, cfg: Recipe, **extra: Any) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically into ``directory``.

    ``config.json`` holds the recipe and the extra JSON fields.

    ``extra`` may hold ``tensors={name: tensor}`` written to ``train_state.safetensors`` (optimiser, RNG);
    every other key goes into config.json.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    extra_tensors = extra.pop("tensors", None)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _unwrap(model).state_dict().items()
    }
    with atomic.atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                      str(tmp / "train_state.safetensors"))
        config = {
            "format": "medidiff-checkpoint/1", "package_version": __version__, "recipe": cfg.to_dict(),
            **extra,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    return directory


TRAIN_MODEL_SUBDIR = "model"
"""Where ``medidiff train --out DIR`` puts the checkpoint: ``DIR/model``."""


def model_dir(directory: str | Path) -> Path:
    """The checkpoint folder of ``directory``.

    Itself, or its ``model/`` when it is a ``train --out`` folder.
    """
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() and (path / TRAIN_MODEL_SUBDIR / CONFIG_FILE).is_file():
        return path / TRAIN_MODEL_SUBDIR
    return path


def resolve_model_dir(dir_or_name: str | Path) -> Path:
    """:func:`model_dir` of a folder, or the folder of a shipped model's name (``sr_x2``) when no such
    folder exists."""
    path = model_dir(dir_or_name)
    if not path.exists() and str(dir_or_name) in DEFAULT_MODELS.values():
        path = weights_dir() / str(dir_or_name)
    return path


def read_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint (or of a ``train --out`` folder's ``model/``, or of a shipped model's
    name), with a clear error when it is missing or broken."""
    path = resolve_model_dir(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_FILE} (not a medidiff model folder, nor a `medidiff train --out` folder)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: broken JSON ({exc})") from exc


def load_model(dir_or_name: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder (a ``train --out`` folder, or a shipped model's name such as ``sr_x2``) from
    safetensors + config.json."""
    from safetensors.torch import load_file

    path = resolve_model_dir(dir_or_name)
    config = read_config(path)
    recipe = recipe_from_dict(config["recipe"], str(path / CONFIG_FILE))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    net = build_model(recipe)
    try:
        net.load_state_dict(load_file(str(weights), device="cpu"))
    except RuntimeError as exc:
        raise ValueError(f"{weights}: weights do not match the recipe in {CONFIG_FILE} ({exc})") from exc
    net.to(device).eval()
    meta = {k: v for k, v in config.items() if k != "recipe"}
    return LoadedModel(net=net, recipe=recipe, meta=meta, path=path)


def model_digest(dir_or_name: str | Path) -> str:
    """A short SHA-256 of everything in a model folder that decides its outputs: the weights, ``config.json``
    (recipe: steps, gate, self-ensemble) and the uncertainty calibrations (``calibration*.json``).

    For batch fingerprints: new weights or a changed recipe make a resumed batch redo its scans. ``missing``
    when the folder has no model (the batch reports that when it loads it)."""
    path = resolve_model_dir(dir_or_name)
    files = [path / WEIGHTS_FILE, path / CONFIG_FILE, *sorted(path.glob("calibration*.json"))]
    if not all(f.is_file() for f in files[:2]):
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            digest.update(f"{file.name}:{hashlib.file_digest(fh, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def weights_dir() -> Path:
    """Folder of the models shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "weights"


def default_model(task: str, device: str | torch.device = "cpu") -> LoadedModel:
    """The shipped default model for a task.

    ``sr`` (in-plane x2), ``sr_thick`` (through-plane x4) or ``recon`` (x4).
    """
    if task not in DEFAULT_MODELS:
        raise ValueError(f"no default model for task {task!r}; tasks: {', '.join(DEFAULT_MODELS)}")
    path = weights_dir() / DEFAULT_MODELS[task]
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path}: the shipped model for task {task!r} is missing; train one with "
            f"`medidiff train --config pipelines/{DEFAULT_MODELS[task]}.yaml --out DIR` "
            "and pass --model DIR/model"
        )
    return load_model(path, device=device)
