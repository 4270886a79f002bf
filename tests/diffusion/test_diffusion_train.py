"""Training through the real code path: MLflow stores (SQLite and a real server), --resume, torchrun DDP."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medidiff.cli import app
from medidiff.diffusion.train import train
from medidiff.recipe import load_recipe
from medidiff.tracking import download_artifacts, metric_history, search_runs

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smoke_training_cli_writes_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default store: sqlite:///mlflow.db in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["train", "--config", str(SMOKE), "--out", "run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlflow.db").is_file()
    cfg = json.loads((tmp_path / "run/model/config.json").read_text())
    assert cfg["step"] == 20 and cfg["recipe"]["name"] == "smoke" and cfg["data_fingerprint"]
    assert cfg["package_version"]
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.pkl"))

    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # read the store itself, not through our helpers
        params = dict(db.execute("select key, value from params").fetchall())
        loss_points = db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]
        val = db.execute("select value from metrics where key = 'val/psnr'").fetchall()
    assert params["task.kind"] == "sr" and params["train.steps"] == "20"
    assert params["diffusion.scheduler"] == "ddim"
    assert loss_points >= 4 and len(val) >= 1 and val[0][0] > 10

    runs = search_runs("medidiff-train")
    run_id = runs.iloc[0]["run_id"]
    assert [s for s, _ in metric_history(run_id, "train/loss")][:2] == [5, 10]
    samples = download_artifacts(run_id, "samples", tmp_path / "dl")
    assert list(samples.glob("*.png"))
    model = download_artifacts(run_id, "model", tmp_path / "dl")
    assert (model / "model.safetensors").is_file()


def test_training_against_real_mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(1)
        recipe = load_recipe(SMOKE)
        res = train(
            recipe, tmp_path / "run", max_steps=10, tracking_uri=uri, device="cpu", show_progress=False
        )
        assert res.run_id
        hist = metric_history(res.run_id, "train/loss", tracking_uri=uri)
        assert [s for s, _ in hist] == [5, 10]
        assert metric_history(res.run_id, "val/psnr", tracking_uri=uri)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_unreachable_server_warns_once_and_training_goes_on(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.warns(UserWarning, match="unreachable") as record:
        res = train(load_recipe(SMOKE), tmp_path / "run", max_steps=3, tracking_uri=uri, device="cpu",
                    show_progress=False)
    assert res.step == 3 and res.run_id is None
    assert sum("MLflow" in str(w.message) for w in record) == 1
    assert (tmp_path / "run/model/model.safetensors").is_file()


def test_resume_continues_exactly(tmp_path):
    recipe = load_recipe(SMOKE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    straight = train(recipe, tmp_path / "a", max_steps=6, tracking_uri=uri, device="cpu", show_progress=False)
    train(recipe, tmp_path / "b", max_steps=3, tracking_uri=uri, device="cpu", show_progress=False)
    state3 = load_file(str(tmp_path / "b/checkpoint/train_state.safetensors"))
    resumed = train(recipe, tmp_path / "b", max_steps=6, tracking_uri=uri, resume=True, device="cpu",
                    show_progress=False)
    assert straight.step == resumed.step == 6
    a = load_file(str(tmp_path / "a/checkpoint/train_state.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoint/train_state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # weights, EMA, optimiser moments and RNG states all equal the uninterrupted run
        assert torch.equal(a[key], b[key]), key
    assert int(state3["optim.0.step"]) == 3 and int(b["optim.0.step"]) == 6
    assert json.loads((tmp_path / "b/checkpoint/config.json").read_text())["step"] == 6
    assert resumed.run_id == json.loads((tmp_path / "b/checkpoint/config.json").read_text())["run_id"]


def test_resume_with_a_new_time_cap_is_not_a_recipe_change(tmp_path):
    """--resume --max-minutes N changes how long to run, not what is trained.

    No warning, and the new cap holds."""
    import warnings

    from medidiff.recipe import with_overrides

    recipe = load_recipe(SMOKE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(recipe, tmp_path / "run", max_steps=2, tracking_uri=uri, device="cpu", show_progress=False)
    capped = with_overrides(recipe, train={"max_minutes": 30.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = train(capped, tmp_path / "run", max_steps=3, tracking_uri=uri, resume=True, device="cpu",
                    show_progress=False)
    assert res.step == 3
    other = with_overrides(recipe, train={"lr": recipe.train.lr * 2})
    with pytest.warns(UserWarning, match="recipe differs"):
        train(other, tmp_path / "run", max_steps=4, tracking_uri=uri, resume=True, device="cpu",
              show_progress=False)


def test_torchrun_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medidiff", "train", "--config", str(SMOKE), "--out", str(tmp_path / "ddp"),
           "--max-steps", "4", "--device", "cpu"]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "ddp/model/config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["step"] == 4


def test_init_from_starts_from_the_given_weights(tmp_path):
    """Fine-tuning: with --init-from, step 0 weights are the source model's.

    Training moves on from there."""
    recipe = load_recipe(SMOKE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from medidiff.recipe import with_overrides

    other_init = with_overrides(recipe, train={"seed": 123})  # a source model with a different initialisation
    train(other_init, tmp_path / "src", max_steps=3, tracking_uri=uri, device="cpu", show_progress=False)
    src = load_file(str(tmp_path / "src/model/model.safetensors"))
    fresh = train(
        recipe, tmp_path / "fresh", max_steps=1, tracking_uri=uri, device="cpu", show_progress=False
    )
    tuned = train(
        recipe, tmp_path / "tuned", max_steps=1, tracking_uri=uri, device="cpu", show_progress=False,
        init_from=tmp_path / "src/model",
    )
    assert fresh.step == tuned.step == 1
    fresh_w = load_file(str(tmp_path / "fresh/checkpoint/train_state.safetensors"))
    tuned_w = load_file(str(tmp_path / "tuned/checkpoint/train_state.safetensors"))
    # after one small step the tuned weights sit next to the source's, far from a random start
    key = next(k for k in src if k.endswith("weight") and src[k].numel() > 100)
    d_tuned = (tuned_w[f"net.{key}"] - src[key]).norm()
    d_fresh = (fresh_w[f"net.{key}"] - src[key]).norm()
    assert d_tuned < 0.1 * d_fresh


def test_training_on_a_folder_of_user_scans_alone(tmp_path, monkeypatch):
    """data.folders (relative to the cwd) with no synthetic or shipped data.

    The model trains on those scans only."""
    import nilearn

    from medidiff.data.pairs import fingerprint, training_pairs
    from medidiff.io import Volume, read_nifti, write_nifti
    from medidiff.recipe import with_overrides

    mni_name = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    mni = read_nifti(Path(nilearn.__file__).parent / "datasets/data" / mni_name)
    crop = Volume(mni.array[66:130, 84:148, 90:98], mni.affine)  # 64 x 64 x 8 through the brain
    (tmp_path / "my_scans" / "site").mkdir(parents=True)
    write_nifti(crop, tmp_path / "my_scans" / "site" / "t1.nii.gz")
    (tmp_path / "my_scans" / "notes.txt").write_text("not a scan")  # skipped, not fatal
    monkeypatch.chdir(tmp_path)

    smoke = load_recipe(SMOKE)
    mine = with_overrides(
        smoke, data={"folders": ["my_scans"], "synthetic_subjects": 0, "real_training": False}
    )
    pairs = training_pairs(mine)
    assert pairs and all(q.target.shape == (64, 64) for q in pairs)  # only the 64x64 planes of the crop
    # no store: this test is about the data, and stays fast
    with pytest.warns(UserWarning, match="unreachable"):
        res = train(mine, tmp_path / "mine", max_steps=2, tracking_uri=f"http://127.0.0.1:{_free_port()}",
                    device="cpu", show_progress=False)
    assert res.step == 2 and (tmp_path / "mine/model/model.safetensors").is_file()
    recorded = json.loads((tmp_path / "mine/model/config.json").read_text())["data_fingerprint"]
    assert recorded == fingerprint(mine, pairs)  # the folder's slices are what the run trained on
    # a run without the folder records the smoke recipe's fingerprint (computed as train() does, to stay fast)
    assert recorded != fingerprint(smoke, training_pairs(smoke))


def _mixture_recipe(kind: str):
    from medidiff.recipe import with_overrides

    task = {
        "sr": {"kind": "sr", "factor": 2},
        "sr_thick": {"kind": "sr_thick", "factor": 4},
        "recon": {"kind": "recon", "acceleration": 4.0, "center_fraction": 0.08, "mask": "equispaced"},
    }[kind]
    return with_overrides(load_recipe(SMOKE), task=task,
                          model={"neighbours": 1 if kind == "sr_thick" else 0},
                          data={"mixture": {"synthetic": 0.5, "natural": 0.3, "mri": 0.2}},
                          train={"val_every": 100, "ckpt_every": 3})


@pytest.mark.parametrize("kind", ["sr", "sr_thick", "recon"])
def test_training_on_the_image_mixture_moves_the_weights(tmp_path, kind):
    """data.mixture: pairs made on the fly train the network through the real loop, and --resume continues."""
    recipe = _mixture_recipe(kind)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = train(recipe, tmp_path / "init", max_steps=1, tracking_uri=uri, device="cpu", show_progress=False)
    assert start.step == 1
    res = train(recipe, tmp_path / "run", max_steps=5, tracking_uri=uri, device="cpu", show_progress=False)
    assert res.step == 5 and res.val  # validation stays on the fixed held-out slices
    w1 = load_file(str(tmp_path / "init/checkpoint/train_state.safetensors"))
    w5 = load_file(str(tmp_path / "run/checkpoint/train_state.safetensors"))
    moved = [k for k in w5 if k.startswith("net.") and not torch.equal(w1[k], w5[k])]
    assert len(moved) > 0.5 * sum(k.startswith("net.") for k in w5)
    assert all(torch.isfinite(v).all() for k, v in w5.items() if v.is_floating_point())
    cfg = json.loads((tmp_path / "run/model/config.json").read_text())
    assert cfg["recipe"]["data"]["mixture"] == {"synthetic": 0.5, "natural": 0.3, "mri": 0.2}
    resumed = train(recipe, tmp_path / "run", max_steps=7, tracking_uri=uri, resume=True, device="cpu",
                    show_progress=False)
    assert resumed.step == 7
    assert json.loads((tmp_path / "run/checkpoint/config.json").read_text())["step"] == 7


def test_mixture_training_is_seeded(tmp_path):
    recipe = _mixture_recipe("sr")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("a", "b"):
        train(recipe, tmp_path / name, max_steps=2, tracking_uri=uri, device="cpu", show_progress=False)
    a = load_file(str(tmp_path / "a/model/model.safetensors"))
    b = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_log_has_plain_progress_lines(tmp_path):
    """Run in the background with output to a file, training writes readable progress lines."""
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(SMOKE.read_text().replace("data: {", "data: {mixture: {synthetic: 1}, "))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "medidiff", "train", "--config", str(recipe), "--out", str(tmp_path / "run"),
           "--max-steps", "10", "--device", "cpu"]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert any(ln.startswith("step 5/10 loss ") and ln.endswith("steps/s") for ln in lines), proc.stdout
    assert any("validation psnr gain" in ln for ln in lines)


def test_resume_without_a_checkpoint_starts_from_init_weights(tmp_path):
    """One command for a background run: --resume starts (from --init-from) when nothing was saved yet."""
    recipe = load_recipe(SMOKE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(recipe, tmp_path / "src", max_steps=2, tracking_uri=uri, device="cpu", show_progress=False)
    first = train(recipe, tmp_path / "bg", max_steps=2, tracking_uri=uri, resume=True, device="cpu",
                  show_progress=False, init_from=tmp_path / "src/model")
    assert first.step == 2
    again = train(recipe, tmp_path / "bg", max_steps=3, tracking_uri=uri, resume=True, device="cpu",
                  show_progress=False, init_from=tmp_path / "src/model")
    assert again.step == 3 and again.run_id == first.run_id


def test_learning_rate_schedules_known_values():
    from medidiff.diffusion.train import learning_rate
    from medidiff.recipe import TrainConfig

    const = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert [learning_rate(const, s) for s in (0, 4, 9, 50, 99, 500)] == pytest.approx(
        [1e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    cos = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(cos, 4) == pytest.approx(5e-4)  # the same warm-up
    assert learning_rate(cos, 9) == pytest.approx(1e-3)  # top at the end of warm-up
    assert learning_rate(cos, 59) == pytest.approx(5e-4)  # half way down the cosine
    assert learning_rate(cos, 109) == pytest.approx(0.0, abs=1e-12) and learning_rate(cos, 200) == 0.0
    lrs = [learning_rate(cos, s) for s in range(9, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_a_cosine_schedule_reaches_the_optimiser(tmp_path):
    from medidiff.recipe import with_overrides

    recipe = with_overrides(load_recipe(SMOKE),
                            train={"lr_schedule": "cosine", "warmup_steps": 1, "steps": 3})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = train(recipe, tmp_path / "run", max_steps=3, tracking_uri=uri, device="cpu", show_progress=False)
    lrs = [v for _, v in metric_history(res.run_id, "train/lr", uri)]
    assert lrs and lrs[-1] < recipe.train.lr
    with pytest.raises(ValueError, match="lr_schedule"):
        with_overrides(recipe, train={"lr_schedule": "step"})


@pytest.mark.parametrize("amp", [True, False])
def test_bf16_autocast_follows_the_recipe_and_the_hardware(tmp_path, amp):
    """``train.amp`` turns bf16 autocast on where the device multiplies bf16 natively (CPUs with AVX-512 BF16
    or AMX here), never on emulated bf16; the run records which it used, and the loss stays finite."""
    from medidiff.models.runtime import has_native_bf16
    from medidiff.recipe import with_overrides

    recipe = with_overrides(load_recipe(SMOKE), train={"amp": amp, "steps": 2, "log_every": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = train(recipe, tmp_path / "run", max_steps=2, tracking_uri=uri, device="cpu", show_progress=False)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        params = dict(db.execute("select key, value from params").fetchall())
    assert params["runtime.bf16_autocast"] == str(amp and has_native_bf16("cpu"))
    losses = [v for _, v in metric_history(res.run_id, "train/loss", uri)]
    assert res.step == 2 and all(np.isfinite(losses))
