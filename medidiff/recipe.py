"""Recipes: frozen dataclasses loaded from YAML and validated with messages that name the file and the key.

A recipe is everything a model needs to be trained and used again: the task (``medidiff.tasks.TaskConfig``),
the network, the noise process, the training data and optimisation, and the inference defaults. It lives
at the task layer, under both the models that store it beside their weights and the diffusion code that
trains and samples with it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medidiff.tasks import TaskConfig

SELF_ENSEMBLES = (1, 2, 4)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    """MONAI DiffusionModelUNet settings (2D) and the 2.5D context."""

    channels: tuple[int, ...] = (16, 32, 64, 64)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: int = 16
    neighbours: int = 0  # slices either side given as extra conditioning channels (2.5D)


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise process, parameterisation and sampling defaults."""

    scheduler: Literal["ddpm", "ddim", "rflow"] = "ddim"
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "sample"
    target: Literal["residual", "image"] = "residual"  # residual = target - operator pinv image
    train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "linear_beta"
    train_t_max: float = 1.0  # train on t < train_t_max * T (sampling starts at <= strength * T)
    steps: int = 4  # network evaluations per sample at inference
    strength: float = 0.5  # start from the noised conditioning at t = strength * T
    # Where the few sampling steps sit on the DDPM/DDIM chain (the names diffusers uses). "leading": the last
    # step is t = 0, a refinement of the data-consistent image (pays for reconstruction's iterated DC);
    # "trailing": t = strength * T, ..., T / n - 1, every step at a noise level the network denoises from
    # (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
    timestep_spacing: Literal["leading", "trailing"] = "leading"
    # Share of training examples noised from the sampler's start (zero residual / the conditioning image) at
    # its first timestep, as the first sampling step sees them (x0 prediction, DDPM/DDIM only). 0 = off.
    train_from_start: float = 0.0
    dc: Literal["hard", "prox", "none"] = "hard"
    dc_weight: float = 1.0  # prox weight (noisy measurements)


@dataclass(frozen=True)
class DataConfig:
    """Training data: synthetic cohort, shipped real training volumes (never the evaluation set) and the
    user's own scans (every scan ``medidiff.io.discover`` finds under ``folders``; relative paths resolve
    against the current working directory) — or, with ``mixture``, pairs made on the fly from the
    training-image mixture (``medidiff.data.mixture``; the cohort/volume fields then do not apply).
    Validation always uses the fixed held-out synthetic slices (``val_subjects``, ``val_slices``)."""

    synthetic_subjects: int = 8
    real_training: bool = True
    folders: tuple[str, ...] = ()
    slices_per_volume: int = 32
    patch_size: int = 64
    val_subjects: int = 1
    val_slices: int = 4
    seed: int = 0
    # On-the-fly training images: weights of the sources of medidiff.data.mixture (synthetic, natural, mri).
    # Empty = the fixed slice pairs above (synthetic subjects, shipped and folder volumes).
    mixture: dict[str, float] = field(default_factory=dict)


MIXTURE_SOURCES = ("synthetic", "natural", "mri")  # the sources medidiff.data.mixture draws from


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, EMA, validation and checkpoint cadence."""

    steps: int = 2000
    batch_size: int = 16
    batch_size_gpu: int = 64
    lr: float = 3e-4
    # after warm-up: hold lr, or cosine-decay it to 0 at `steps`
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    val_every: int = 250
    val_steps: int = 4
    ckpt_every: int = 250
    log_every: int = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast where the device has native bf16 (CUDA; CPUs with AVX-512 BF16 / AMX)
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    register_as: str = ""  # register the final model in the MLflow registry under this name


@dataclass(frozen=True)
class EnhanceConfig:
    """Inference defaults stored with the model."""

    samples: int = 1
    batch_slices: int = 8
    self_check: bool = True  # per-scan do-no-harm check that sets how much of the model's residual to keep
    self_check_slices: int = 6
    adapt: bool = False  # per-scan self-supervised fine-tuning by default (medidiff.pipeline.adapt)
    # geometric self-ensemble (through-plane SR only): 1 = off, 2 = also the image flipped along the thick
    # axis, 4 = flipped along either axis and both; outputs flipped back and averaged (x this many NFE)
    self_ensemble: int = 1


@dataclass(frozen=True)
class Recipe:
    """A whole training + inference recipe."""

    name: str = "unnamed"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)

    @property
    def complex_images(self) -> bool:
        """Reconstruction works on complex images (real/imag as two channels)."""
        return self.task.kind == "recon"

    @property
    def image_channels(self) -> int:
        return 2 if self.complex_images else 1

    @property
    def in_channels(self) -> int:
        """Noisy target + conditioning image (+ neighbours' conditioning images)."""
        return self.image_channels * (2 + 2 * self.model.neighbours)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        return 2 ** (len(self.model.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists), the form stored beside checkpoints and logged to MLflow."""
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _check_type(value: Any, tp: Any, where: str, src: str, allow_empty: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{src}: {where} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or not (value or allow_empty):
            kind = "list" if allow_empty else "non-empty list"
            raise RecipeError(f"{src}: {where} must be a {kind}, got {value!r}")
        return tuple(_check_type(v, inner, f"{where}[{i}]", src) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{src}: {where} must be a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _check_type(v, inner, f"{where}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{src}: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{src}: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{src}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{src}: {where} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where, src)
    if isinstance(tp, types.UnionType):  # pragma: no cover - not used by the recipe types
        raise RecipeError(f"{src}: {where}: unsupported type {tp}")
    return value


def _build(cls: type, data: Any, where: str, src: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(
            f"{src}: {where or 'the recipe'} must be a mapping of keys, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(f"{src}: unknown key '{full}' (allowed here: {', '.join(names)})")
        kwargs[key] = _check_type(value, hints[key], full, src, allow_empty=fields[key].default == ())
    return cls(**kwargs)


def validate(recipe: Recipe, src: str = "recipe") -> Recipe:
    """Check value ranges and combinations that cannot work together; return the recipe."""
    t, m, d = recipe.task, recipe.model, recipe.diffusion
    da, tr, en = recipe.data, recipe.train, recipe.enhance
    problems: list[str] = []
    if t.kind in ("sr", "sr_thick") and t.factor < 2:
        problems.append(f"task.factor must be >= 2 for {t.kind}, got {t.factor}")
    if t.kind == "recon" and t.acceleration <= 1:
        problems.append(f"task.acceleration must be > 1, got {t.acceleration}")
    if not 0 < t.center_fraction < 1:
        problems.append(f"task.center_fraction must be in (0, 1), got {t.center_fraction}")
    if t.noise_sigma < 0:
        problems.append(f"task.noise_sigma must be >= 0, got {t.noise_sigma}")
    if d.dc == "prox" and t.noise_sigma == 0:
        problems.append("diffusion.dc 'prox' needs task.noise_sigma > 0 (noiseless data takes dc: hard)")
    if d.scheduler == "rflow" and d.prediction_type == "epsilon":
        problems.append(
            "diffusion.scheduler 'rflow' cannot use prediction_type 'epsilon' (use sample or v_prediction)"
        )
    if not 1 <= d.steps <= d.train_timesteps:
        problems.append(f"diffusion.steps must be in [1, train_timesteps={d.train_timesteps}], got {d.steps}")
    if not 0 < d.strength <= 1:
        problems.append(f"diffusion.strength must be in (0, 1], got {d.strength}")
    if not 0 < d.train_t_max <= 1:
        problems.append(f"diffusion.train_t_max must be in (0, 1], got {d.train_t_max}")
    if d.train_t_max < d.strength:
        problems.append(
            f"diffusion.train_t_max ({d.train_t_max}) < strength ({d.strength}): sampling would start at "
            "noise levels the model never saw"
        )
    if d.timestep_spacing == "trailing" and d.scheduler == "rflow":
        problems.append(
            "diffusion.timestep_spacing 'trailing' applies to ddpm/ddim; rflow has its own schedule"
        )
    if not 0 <= d.train_from_start <= 1:
        problems.append(f"diffusion.train_from_start must be in [0, 1], got {d.train_from_start}")
    elif d.train_from_start > 0 and (d.prediction_type != "sample" or d.scheduler == "rflow"):
        problems.append("diffusion.train_from_start needs prediction_type 'sample' with ddpm or ddim")
    if d.schedule == "cosine" and d.scheduler == "rflow":
        problems.append("diffusion.schedule does not apply to rflow; leave it at linear_beta")
    if any(c % m.norm_num_groups for c in m.channels):
        problems.append(
            f"model.channels {list(m.channels)} must all be multiples of norm_num_groups={m.norm_num_groups}"
        )
    if m.neighbours < 0:
        problems.append(f"model.neighbours must be >= 0, got {m.neighbours}")
    if da.patch_size % recipe.size_multiple:
        problems.append(
            f"data.patch_size {da.patch_size} must be a multiple of {recipe.size_multiple} "
            f"(2^(levels-1) for {len(m.channels)} levels)"
        )
    if t.kind in ("sr", "sr_thick") and da.patch_size % t.factor:
        problems.append(f"data.patch_size {da.patch_size} must be a multiple of task.factor {t.factor}")
    if da.synthetic_subjects < 0:
        problems.append(f"data.synthetic_subjects must be >= 0, got {da.synthetic_subjects}")
    elif da.synthetic_subjects == 0 and not da.real_training and not da.folders and not da.mixture:
        problems.append("data: no training volumes (synthetic_subjects is 0, real_training is false and "
                        "no data.folders are given)")
    if da.mixture:
        unknown = sorted(set(da.mixture) - set(MIXTURE_SOURCES))
        if unknown:
            problems.append(
                f"data.mixture: unknown source(s) {unknown} (choose from {list(MIXTURE_SOURCES)})"
            )
        if any(not math.isfinite(w) or w < 0 for w in da.mixture.values()):
            problems.append(f"data.mixture weights must be finite and >= 0, got {da.mixture}")
        elif sum(da.mixture.values()) <= 0:
            problems.append(f"data.mixture: at least one weight must be > 0, got {da.mixture}")
        if da.patch_size < 16:
            problems.append(f"data.patch_size must be >= 16 with data.mixture, got {da.patch_size}")
    if any(not f.strip() for f in da.folders):
        problems.append("data.folders entries must be non-empty paths")
    if tr.steps < 1 or tr.batch_size < 1 or tr.batch_size_gpu < 1:
        problems.append("train.steps, train.batch_size and train.batch_size_gpu must be >= 1")
    if not 0 <= tr.ema_decay < 1:
        problems.append(f"train.ema_decay must be in [0, 1), got {tr.ema_decay}")
    if tr.lr <= 0:
        problems.append(f"train.lr must be > 0, got {tr.lr}")
    if tr.val_every < 1 or tr.ckpt_every < 1 or tr.log_every < 1:
        problems.append("train.val_every, train.ckpt_every and train.log_every must be >= 1")
    if en.samples < 1 or en.batch_slices < 1:
        problems.append("enhance.samples and enhance.batch_slices must be >= 1")
    if en.self_ensemble not in SELF_ENSEMBLES:
        problems.append(
            f"enhance.self_ensemble must be one of {list(SELF_ENSEMBLES)}, got {en.self_ensemble}"
        )
    elif en.self_ensemble > 1 and t.kind != "sr_thick":
        problems.append(
            "enhance.self_ensemble > 1 is for through-plane SR (sr_thick), whose operator commutes with "
            f"flips; task {t.kind!r} takes 1"
        )
    if problems:
        raise RecipeError(f"{src}: " + "; ".join(problems))
    return recipe


def recipe_from_dict(data: dict[str, Any], src: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a plain mapping (as read from YAML or config.json).

    Paths in ``data.folders`` are not checked here (a trained model's stored recipe stays loadable after its
    training folders are gone); :func:`load_recipe` and training check them with :func:`check_folders`.
    """
    return validate(_build(Recipe, data, "", src), src)


def resolve_folder(folder: str) -> Path:
    """A ``data.folders`` entry as an absolute path.

    ``~`` is expanded; relative paths resolve against the current working directory.
    """
    return Path(folder).expanduser().absolute()


def check_folders(recipe: Recipe, src: str = "recipe") -> Recipe:
    """Raise RecipeError (naming ``src`` and the key) when a ``data.folders`` entry does not exist."""
    missing = [
        f"data.folders[{i}] '{folder}' does not exist (looked for {resolve_folder(folder)})"
        for i, folder in enumerate(recipe.data.folders)
        if not resolve_folder(folder).exists()
    ]
    if missing:
        raise RecipeError(f"{src}: " + "; ".join(missing) + " — relative paths resolve against the current "
                          f"working directory ({Path.cwd()})")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; raise RecipeError naming the file and the problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    return check_folders(recipe_from_dict(data or {}, str(path)), str(path))


def with_overrides(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy of the recipe with some fields replaced; validated.

    E.g. ``with_overrides(r, train={'steps': 5})``.
    """
    data = recipe.to_dict()
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return recipe_from_dict(data, f"recipe {recipe.name}")
