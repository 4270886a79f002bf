"""Recipes load from YAML and fail with messages that name the file, the key and the problem."""

from pathlib import Path

import pytest

from medidiff.recipe import RecipeError, load_recipe, with_overrides

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.mark.parametrize("name", ["smoke", "sr_x2", "sr_thick", "recon_4x"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(PIPELINES / f"{name}.yaml")
    assert recipe.diffusion.steps <= 10  # issue 5: at most 10 network evaluations at default settings
    assert recipe.data.patch_size % recipe.size_multiple == 0


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_named(tmp_path):
    p = _write(tmp_path, "task: {kind: sr, facter: 2}\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: unknown key 'task\.facter'"):
        load_recipe(p)


def test_wrong_type_named(tmp_path):
    p = _write(tmp_path, "train: {steps: many}\n")
    with pytest.raises(RecipeError, match=r"train\.steps must be an integer, got 'many'"):
        load_recipe(p)


def test_bad_choice_named(tmp_path):
    p = _write(tmp_path, "diffusion: {scheduler: euler}\n")
    with pytest.raises(RecipeError, match=r"diffusion\.scheduler must be one of \['ddpm', 'ddim', 'rflow'\]"):
        load_recipe(p)


@pytest.mark.parametrize(
    "text, message",
    [
        ("diffusion: {scheduler: rflow, prediction_type: epsilon}\n", "rflow.*epsilon"),
        ("diffusion: {dc: prox}\n", "prox.*noise_sigma"),
        ("data: {patch_size: 60}\n", "patch_size 60 must be a multiple of 8"),
        ("diffusion: {strength: 0.8, train_t_max: 0.5}\n", "never saw"),
        ("task: {kind: sr, factor: 1}\n", "factor must be >= 2"),
        ("diffusion: {scheduler: rflow, timestep_spacing: trailing}\n", "trailing.*rflow"),
        ("diffusion: {timestep_spacing: linspace}\n", "timestep_spacing"),
        ("diffusion: {train_from_start: 1.5}\n", r"train_from_start must be in \[0, 1\]"),
        ("diffusion: {train_from_start: 0.5, prediction_type: epsilon}\n", "train_from_start needs"),
    ],
)
def test_impossible_combinations(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, text))


def test_missing_file_and_overrides(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    recipe = load_recipe(PIPELINES / "smoke.yaml")
    assert with_overrides(recipe, train={"steps": 3}).train.steps == 3
    with pytest.raises(RecipeError):
        with_overrides(recipe, train={"steps": 0})


def test_training_folders_must_exist(tmp_path, monkeypatch):
    """data.folders: a missing folder is named with the recipe file and the key.

    Relative paths use the cwd."""
    (tmp_path / "scans").mkdir()
    monkeypatch.chdir(tmp_path)
    text = "data: {synthetic_subjects: 0, real_training: false, folders: [scans, missing_scans]}\n"
    missing = r"bad\.yaml: data\.folders\[1\] 'missing_scans' does not exist"
    with pytest.raises(RecipeError, match=missing) as err:
        load_recipe(_write(tmp_path, text))
    assert str(tmp_path / "missing_scans") in str(err.value)
    recipe = load_recipe(
        _write(tmp_path, "data: {synthetic_subjects: 0, real_training: false, folders: [scans]}\n")
    )
    assert recipe.data.folders == ("scans",) and recipe.to_dict()["data"]["folders"] == ["scans"]
    with pytest.raises(RecipeError, match="no training volumes"):  # still needs some data
        load_recipe(_write(tmp_path, "data: {synthetic_subjects: 0, real_training: false, folders: []}\n"))
