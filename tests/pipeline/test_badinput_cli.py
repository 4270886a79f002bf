"""The bad-input corpus (tests/io/test_io_badinput.py) through the real command line, beside good scans.

One folder holds every generated bad input (DICOM, NIfTI, HDF5 k-space, file-system traps), each in its own
sub-folder, and three good scans. `medidiff info`, `convert` and `enhance` (one run each, tiny models, one
sampling step) must name every bad file with its problem, print no traceback, end with the documented exit
status, still process the good scans, write no garbage (every written image has voxels, all finite), and
leave the input tree byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medidiff.io import discover, read_nifti
from tests.io.test_io_badinput import CASES
from tests.pipeline.batch_messy_folder import _kspace, _nifti
from tests.pipeline.test_batch_enhance_cli import _smoke_checkpoint

REPO = Path(__file__).resolve().parents[2]
GOOD = ("good/brain.nii.gz", "good/thick.nii.gz", "good/knee.h5")


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` without following links or opening special files: content digests of
    regular files, link targets, modes of the rest."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                seen[key] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                seen[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[key] = f"mode:{stat.S_IFMT(st.st_mode)}"
    return seen


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "medidiff", *args], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("corpus")
    src = work / "IN"
    for name, make in CASES.items():
        folder = src / "bad" / name
        folder.mkdir(parents=True)
        try:
            make(folder)
        except pytest.skip.Exception:  # e.g. permission cases when run as root
            continue
    (src / "good").mkdir()
    _nifti(src / "good" / "brain.nii.gz", (24, 24, 2), (1.0, 1.0, 1.0), seed=1)
    _nifti(src / "good" / "thick.nii.gz", (16, 16, 3), (1.0, 1.0, 4.0), seed=2)
    _kspace(src / "good" / "knee.h5", seed=3)
    models = [_smoke_checkpoint(work / "models", task) for task in ("sr", "sr_thick", "recon")]
    before = _tree(src)
    sources = list(discover(src))
    out = work / "OUT"
    args = ["--out", str(out), "--steps", "1", "--threads", "1", "--format", "nifti", "--no-report"]
    args += ["--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    for m in models:
        args += ["--model", str(m)]
    runs = {
        "info": _cli("info", str(src), "--json", cwd=work),
        "convert": _cli("convert", str(src), "--out", str(work / "CONVERTED"), cwd=work),
        "enhance": _cli("enhance", str(src), *args, cwd=work),
    }
    for p in src.rglob("*"):  # let pytest clean up what the corpus made unreadable
        if not p.is_symlink():
            p.chmod(0o755)
    after = _tree(src)
    return SimpleNamespace(
        work=work, src=src, out=out, runs=runs, sources=sources, before=before, after=after
    )


def _rel(source, src: Path) -> str:
    return str(Path(source.path).relative_to(src))


def test_corpus_is_large_and_spans_every_format():
    prefixes = {name.split("_")[0] for name in CASES}
    assert len(CASES) >= 40 and {"dicom", "nifti", "kspace"} <= prefixes and len(prefixes) > 3, prefixes


def test_no_traceback_and_documented_exit_status(corpus):
    for command, proc in corpus.runs.items():
        log = proc.stdout + proc.stderr
        assert "Traceback" not in log, (command, log[-3000:])
    assert corpus.runs["info"].returncode == 0, corpus.runs["info"].stderr
    assert corpus.runs["convert"].returncode == 3, corpus.runs["convert"].stdout[-2000:]
    assert corpus.runs["enhance"].returncode == 3, corpus.runs["enhance"].stderr[-2000:]


def test_inputs_are_byte_identical(corpus):
    assert corpus.after == corpus.before


def test_info_names_every_bad_file_with_its_problem(corpus):
    rows = {row["path"]: row for row in json.loads(corpus.runs["info"].stdout)}
    invalid = [s for s in corpus.sources if s.kind == "invalid"]
    assert len(invalid) >= 30
    for source in invalid:
        row = rows[str(source.path)]
        assert row["kind"] == "invalid" and row["problems"] and all(row["problems"]), row


def test_convert_names_every_scan_it_did_not_convert(corpus):
    out = corpus.runs["convert"].stdout
    lines = out.splitlines()
    for source in corpus.sources:
        if source.kind == "invalid":
            named = [ln for ln in lines if str(source.path) in ln and ln.startswith(("skipped", "failed"))]
            assert named and ": " in named[0], source.path
    assert not any(ln.startswith("failed") and ln.rstrip().endswith(":") for ln in lines), (
        "failure without a problem"
    )
    for good in GOOD:
        assert any(ln.startswith("wrote") for ln in lines if good.split("/")[1].split(".")[0] in ln), good
    for nii in (corpus.work / "CONVERTED").glob("*.nii.gz"):
        _assert_not_garbage(nii)


def test_enhance_records_every_scan_and_processes_the_good_ones(corpus):
    manifest = json.loads((corpus.out / "manifest.json").read_text())
    scans = manifest["scans"]
    assert set(scans) == {s.key for s in corpus.sources}, corpus.runs["enhance"].stderr[-3000:]
    for source in corpus.sources:
        entry = scans[source.key]
        if source.kind == "invalid":
            assert entry["status"] == "failed", entry
        if entry["status"] == "failed":
            assert entry["error"] and len(entry["error"]) > 10, entry
    for good in GOOD:
        assert scans[good]["status"] == "done", scans[good]
    stderr = " ".join(corpus.runs["enhance"].stderr.split())
    failed = [e for e in scans.values() if e["status"] == "failed"]
    assert f"{len(failed)}" in stderr and all(e["key"][-40:] in stderr for e in failed)
    for entry in scans.values():
        if entry["status"] == "done":
            for rel in entry["outputs"].values():
                if rel:
                    _assert_not_garbage(corpus.out / rel)


def _assert_not_garbage(path: Path) -> None:
    arr = read_nifti(path).array
    assert arr.size > 0 and np.all(np.isfinite(arr)), path


def test_info_reports_a_single_file_under_its_own_name(corpus):
    target = corpus.src / "good" / "brain.nii.gz"
    proc = _cli("info", str(target), "--json", cwd=corpus.work)
    (row,) = json.loads(proc.stdout)
    assert row["path"] == str(target) and row["kind"] == "nifti"


def test_max_voxels_option_refuses_larger_scans(corpus):
    target = corpus.src / "good" / "brain.nii.gz"  # 24 × 24 × 2 = 1152 voxels
    proc = _cli("info", str(target), "--json", "--max-voxels", "1000", cwd=corpus.work)
    (row,) = json.loads(proc.stdout)
    assert row["kind"] == "invalid" and "declares 1,152 voxels" in row["problems"][0]
    proc = _cli(
        "convert", str(target), "--out", str(corpus.work / "small"), "--max-voxels", "1000", cwd=corpus.work
    )
    assert proc.returncode == 3 and "more than the limit of 1,000 voxels" in proc.stdout, proc.stdout
