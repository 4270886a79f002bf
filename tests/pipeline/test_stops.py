"""Stopping `medidiff enhance` as users do: Ctrl-C (SIGINT to the process group), SIGTERM, kill -9.

Each stop must leave the batch resumable, print one line and no traceback (the decoding child included),
and never delete a file of the user's: files with every temporary-looking name are planted under IN and
OUT and must be byte-identical after every stop and the final rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.batch_messy_folder import _nifti, tree_digest
from tests.pipeline.test_batch_enhance_cli import _smoke_checkpoint

REPO = Path(__file__).resolve().parents[2]
N_SCANS = 8
TEMPORARY_LOOKING = (
    "x.tmp",
    "x.partial",
    ".x.tmp",
    ".x.partial",
    "x.nii.gz.tmp",
    ".x.medidiff-tmp-abc",
    ".scan0_enhanced.nii.gz.medidiff-tmp-abc123",  # our marker and a name we write, in a folder we do not
    ".manifest.json.medidiff-tmp-xyz",
)


@pytest.fixture(scope="module")
def smoke_sr(tmp_path_factory) -> Path:
    return _smoke_checkpoint(tmp_path_factory.mktemp("models"), "sr")


def _plant(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(TEMPORARY_LOOKING):
        (folder / name).write_bytes(f"user data {i}\n".encode())
    (folder / ".x.medidiff-tmp-dir").mkdir(exist_ok=True)
    (folder / ".x.medidiff-tmp-dir" / "keep.txt").write_text("user folder\n")


def _command(src: Path, out: Path, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "medidiff", "enhance", str(src), "--out", str(out), "--model", str(model),
        "--task", "sr", "--format", "nifti", "--steps", "1", "--threads", "1", "--no-report",
        "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}",
    ]  # fmt: skip


def _done(out: Path) -> int:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return sum(e["status"] == "done" for e in manifest["scans"].values())


def _stop_after_next_scan(cmd: list[str], out: Path, sig: int, cwd: Path) -> tuple[int, str, int]:
    """Run ``cmd`` in its own process group; when one more scan is done, send ``sig`` to the group
    (SIGINT: as a terminal's Ctrl-C does) or to the driver alone (SIGTERM: as a scheduler does)."""
    before = _done(out)
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and _done(out) <= before:
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be stopped:\n" + proc.stderr.read()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout + stderr, _done(out)


def test_sigint_sigterm_kill9_then_rerun_keeps_every_user_file(tmp_path, smoke_sr):
    src = tmp_path / "IN"
    (src / "nifti").mkdir(parents=True)
    for i in range(N_SCANS):
        _nifti(src / "nifti" / f"scan{i}.nii.gz", (24, 24, 2), (1.0, 1.0, 1.0), seed=i)
    _plant(src / "nifti")
    out = tmp_path / "OUT"
    _plant(out)
    _plant(out / "user")
    planted_in, planted_out = tree_digest(src), tree_digest(out)
    cmd = _command(src, out, smoke_sr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        code, log, done = _stop_after_next_scan(cmd, out, sig, tmp_path)
        assert code == 128 + sig, log
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
        lines = [ln for ln in log.splitlines() if ln.startswith("stopped;")]
        assert len(lines) == 1, log
        n_done, n_pending = (int(w) for w in lines[0].replace(",", "").split()[1:4:2])
        assert n_done == done >= 1 and n_done + n_pending <= N_SCANS + len(TEMPORARY_LOOKING), lines
        assert lines[0].endswith("rerun to continue")
        assert tree_digest(src) == planted_in

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    before = _done(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and _done(out) <= before:
        time.sleep(0.02)
    proc.kill()
    proc.wait()

    final = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400, check=False
    )
    log = final.stdout + final.stderr
    assert "Traceback" not in log, log
    manifest = json.loads((out / "manifest.json").read_text())
    good = {k: e for k, e in manifest["scans"].items() if k.endswith(".nii.gz")}
    assert len(good) == N_SCANS and all(e["status"] == "done" for e in good.values()), manifest
    # the non-hidden planted files under IN look like scans: they fail, by name, and the batch says so
    assert final.returncode == 3, log
    assert manifest["writing"] == {}
    assert tree_digest(src) == planted_in, "IN changed"
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k in planted_out} == planted_out, (
        "a user file under OUT changed"
    )
    leftovers = [k for k in after if ".medidiff-tmp-" in k and k not in planted_out]
    assert leftovers == [], leftovers


def test_in_inside_out_is_refused_and_nothing_is_touched(tmp_path):
    out = tmp_path / "o"
    src = out / "in"
    _nifti(_mk(src) / "a.nii.gz", (16, 16, 2), (1.0, 1.0, 1.0), seed=0)
    _plant(src)
    before = tree_digest(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "medidiff", "enhance", str(src), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "input folder must not be inside the output folder" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stdout + proc.stderr
    assert tree_digest(out) == before


def test_out_under_a_regular_file_is_a_usage_error(tmp_path):
    _nifti(_mk(tmp_path / "in") / "a.nii.gz", (16, 16, 2), (1.0, 1.0, 1.0), seed=0)
    (tmp_path / "file").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "medidiff", "enhance", str(tmp_path / "in"),
         "--out", str(tmp_path / "file" / "o")],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "is not a folder" in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def _mk(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
