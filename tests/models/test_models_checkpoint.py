"""Checkpoints: safetensors + config.json round trip, never unpickled, clear errors; shipped defaults."""

import json
from pathlib import Path

import pytest
import torch

from medidiff.models import (
    DEFAULT_MODELS,
    build_model,
    default_model,
    load_model,
    save_checkpoint,
    weights_dir,
)
from medidiff.recipe import load_recipe

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


def test_round_trip_and_recipe_travel(tmp_path):
    recipe = load_recipe(SMOKE)
    torch.manual_seed(0)
    net = build_model(recipe)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = save_checkpoint(tmp_path / "m", net, recipe, step=7, data_fingerprint="abc")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(out)
    assert loaded.recipe == recipe and loaded.meta["step"] == 7 and loaded.meta["data_fingerprint"] == "abc"
    x, t = torch.randn(1, recipe.in_channels, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(net.eval()(x, t), loaded.net(x, t))


def test_loading_never_unpickles(tmp_path):
    recipe = load_recipe(SMOKE)
    out = save_checkpoint(tmp_path / "m", build_model(recipe), recipe)
    (out / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors
    with pytest.raises(Exception) as info:
        load_model(out)
    assert "pickle" not in type(info.value).__name__.lower()


def test_mismatched_recipe_and_missing_files_are_clear(tmp_path):
    recipe = load_recipe(SMOKE)
    out = save_checkpoint(tmp_path / "m", build_model(recipe), recipe)
    cfg = json.loads((out / "config.json").read_text())
    cfg["recipe"]["model"]["channels"] = [16, 16, 16, 16]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the recipe"):
        load_model(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no default model for task 'denoise'"):
        default_model("denoise")


@pytest.mark.parametrize("task", sorted(DEFAULT_MODELS))
def test_shipped_default_models(task):
    folder = weights_dir() / DEFAULT_MODELS[task]
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} not shipped in this tree")
    loaded = default_model(task)
    assert loaded.task == task
    assert (folder / "model.safetensors").stat().st_size < 25 * 2**20
    assert loaded.recipe.diffusion.steps <= 10
