"""Conditional diffusion: recipes, the noise process, training and few-step sampling with data consistency."""

from medidiff.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict"]
