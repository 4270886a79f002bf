"""Training recipes for notebooks: find one by its checkout-relative name, write a changed copy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

import medidiff
from medidiff.recipe import load_recipe


def recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """A recipe given as a path, or relative to the checkout.

    ``pipelines/smoke.yaml`` works from any folder.
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path.resolve()
    candidate = Path(medidiff.__file__).resolve().parents[1] / path
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{recipe}: recipe not found (looked here and in {candidate.parent})")


def training_recipe(
    recipe: str | os.PathLike[str], out: str | os.PathLike[str], *,
    folders: Sequence[str | os.PathLike[str]] = (), steps: int | None = None, minutes: float | None = None,
) -> Path:
    """Write a copy of ``recipe`` with training settings changed; returns its path.

    The copy is validated by the recipe loader.

    ``folders`` go into ``data.folders`` (as absolute paths): every scan found there joins the recipe's own
    training data (its synthetic subjects and shipped scans, if any).
    """
    data = yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8")) or {}
    train = dict(data.get("train") or {})
    if steps is not None:  # about five validations and checkpoints whatever the length
        train["steps"] = int(steps)
        for key in ("val_every", "ckpt_every"):
            train[key] = max(int(train.get(key, 1)), int(steps) // 5, 1)
    if minutes is not None:
        train["max_minutes"] = float(minutes)
    data["train"] = train
    if folders:
        data["data"] = {**(data.get("data") or {}), "folders": [str(Path(f).resolve()) for f in folders]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_recipe(out)  # validate now, with the recipe loader's own messages
    return out
