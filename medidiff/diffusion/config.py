"""Recipes (kept importable here; they live in :mod:`medidiff.recipe`, under the models that store them)."""

from medidiff.recipe import (
    DataConfig,
    DiffusionConfig,
    EnhanceConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    TrainConfig,
    check_folders,
    load_recipe,
    recipe_from_dict,
    resolve_folder,
    validate,
    with_overrides,
)
from medidiff.tasks import TaskConfig

__all__ = [
    "DataConfig",
    "DiffusionConfig",
    "EnhanceConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "TaskConfig",
    "TrainConfig",
    "check_folders",
    "load_recipe",
    "recipe_from_dict",
    "resolve_folder",
    "validate",
    "with_overrides",
]
