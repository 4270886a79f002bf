"""Networks (MONAI DiffusionModelUNet) built from recipes; safetensors checkpoints; shipped default models."""

from medidiff.models.checkpoint import (
    DEFAULT_MODELS,
    LoadedModel,
    build_model,
    default_model,
    load_model,
    model_digest,
    read_config,
    save_checkpoint,
    weights_dir,
)

__all__ = [
    "DEFAULT_MODELS",
    "LoadedModel",
    "build_model",
    "default_model",
    "load_model",
    "model_digest",
    "read_config",
    "save_checkpoint",
    "weights_dir",
]
