"""Batch machinery without the models.

Manifest, temp cleanup, fingerprints, naming, task choice, isolation.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medidiff.io import Volume
from medidiff.io.atomic import atomic_dir, atomic_file
from medidiff.pipeline.batch import BatchUsageError, check_roots
from medidiff.pipeline.decoding import DecodeError, IsolatedDecoder
from medidiff.pipeline.manifest import Manifest, clean_stale_temporaries, input_fingerprint
from medidiff.pipeline.settings import EnhanceSettings, output_paths, output_stem
from medidiff.pipeline.worker import choose_task
from tests.pipeline.batch_messy_folder import CrashingSource, HangingSource, SmallSource, build_messy_folder

REPO = Path(__file__).resolve().parents[2]


def _entry(key: str, status: str = "done", outputs: dict | None = None) -> dict:
    return {
        "key": key,
        "input": key,
        "kind": "nifti",
        "task": "sr",
        "status": status,
        "fingerprint": "f",
        "outputs": outputs or {},
        "metrics": {},
        "seconds": 1.0,
        "error": None,
    }


def test_manifest_round_trip_and_done_needs_outputs(tmp_path):
    out = tmp_path / "out"
    m = Manifest.load_or_new(tmp_path / "in", out, {"samples": 2})
    (out / "a").mkdir(parents=True)
    (out / "a" / "x_enhanced.nii.gz").write_bytes(b"x")
    m.record(_entry("a/x.nii.gz", outputs={"enhanced": "a/x_enhanced.nii.gz", "dicom": None}))
    m.record(_entry("a/y.nii.gz", status="failed"))
    m.save()
    data = json.loads((out / "manifest.json").read_text())
    assert data["version"] == 1 and set(data["scans"]) == {"a/x.nii.gz", "a/y.nii.gz"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary left after an atomic save"
    again = Manifest.load_or_new(tmp_path / "in", out, {})
    assert again.is_done("a/x.nii.gz", "f") and not again.is_done("a/x.nii.gz", "other-fingerprint")
    assert not again.is_done("a/y.nii.gz", "f")
    (out / "a" / "x_enhanced.nii.gz").unlink()
    assert not again.is_done("a/x.nii.gz", "f"), "a done scan whose output vanished is redone"


def _copy_name(name: str) -> str:
    """Another temporary name of the same target (as a second, killed attempt would have made)."""
    return re.sub(r"(medidiff-tmp-)[a-z0-9_]{8}", r"\1copy0000", name)


def test_stale_temporaries_of_recorded_scans_are_removed_and_nothing_else(tmp_path):
    """What a killed batch leaves beside the outputs its manifest records goes; everything else stays,
    even a file carrying the temporary marker in a folder or under a name the manifest does not own."""
    (tmp_path / "s").mkdir()
    (tmp_path / "user").mkdir()
    manifest = Manifest(str(tmp_path / "in"), str(tmp_path), {})
    manifest.writing["s/scan.nii.gz"] = "s/scan"
    keep = [
        tmp_path / "s" / "scan_enhanced.nii.gz",
        tmp_path / "manifest.json",
        tmp_path / "s" / "IM1.dcm",
        tmp_path / "s" / ".hidden.tmp",  # not ours: a user's file is never removed
        tmp_path / "s" / ".other_enhanced.nii.gz.medidiff-tmp-abc",  # marker, but no recorded scan 'other'
        tmp_path / "user" / ".scan_enhanced.nii.gz.medidiff-tmp-abc",  # marker, but not a folder we write
        tmp_path / ".notes.medidiff-tmp-abc",
        tmp_path / "s" / ".scan_enhanced.nii.gz.medidiff-tmp-mine",  # not a name io.atomic makes
    ]
    for p in keep:
        p.write_bytes(b"1")
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "s" / "scan_enhanced.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        stale_file = tmp.with_name(_copy_name(tmp.name))
        shutil.copy(tmp, stale_file)  # as if the process had been killed before its clean-up ran
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "s" / "scan_enhanced_dicom") as tmp:
        (tmp / "IM00001.dcm").write_bytes(b"1")
        stale_dir = tmp.with_name(_copy_name(tmp.name))
        shutil.copytree(tmp, stale_dir)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "manifest.json") as tmp:
        stale_manifest = tmp.with_name(_copy_name(tmp.name))
        shutil.copy(tmp, stale_manifest)
        raise KeyboardInterrupt
    removed = clean_stale_temporaries(manifest)
    assert set(removed) == {stale_file, stale_dir, stale_manifest}
    assert all(p.exists() for p in keep) and not stale_file.exists() and not stale_dir.exists()
    # a finished scan is owned through its recorded outputs once it leaves 'writing'
    manifest.record(
        {"key": "s/scan.nii.gz", "status": "done", "outputs": {"enhanced": "s/scan_enhanced.nii.gz"}}
    )
    assert manifest.writing == {}
    stale_file.write_bytes(b"1")
    assert clean_stale_temporaries(manifest) == [stale_file]


def test_fingerprint_tracks_content_stat_and_settings(tmp_path):
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"abc")
    params = EnhanceSettings(samples=2).fingerprint_params()
    first = input_fingerprint([f], tmp_path, params)
    assert first == input_fingerprint([f], tmp_path, params)
    assert first != input_fingerprint([f], tmp_path, EnhanceSettings(samples=3).fingerprint_params())
    f.write_bytes(b"abcd")
    assert first != input_fingerprint([f], tmp_path, params)


def test_output_stems_come_from_the_key():
    assert output_stem("site/exam/series0003-b4004067") == "series0003-b4004067"
    assert output_stem("nifti/brain.nii.gz") == "brain"
    assert output_stem("nifti/dwi.nii.gz-vol2") == "dwi-vol2"
    assert output_stem("k/knee file (1).h5") == "knee_file_1"


def test_task_choice_follows_geometry_and_kind():
    from medidiff.io import KSpaceData

    iso = Volume(np.zeros((8, 8, 4)), np.diag([1.0, 1.0, 1.0, 1.0]))
    thick = Volume(np.zeros((8, 8, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    almost = Volume(np.zeros((8, 8, 4)), np.diag([1.0, 1.0, 1.9, 1.0]))
    k = KSpaceData(kspace=np.zeros((2, 8, 8), np.complex64), mask=None, affine=np.eye(4))
    assert choose_task(iso, "auto") == "sr"
    assert choose_task(thick, "auto") == "sr_thick"
    assert choose_task(almost, "auto") == "sr"
    low_res_slice = Volume(np.zeros((8, 8, 1)), np.diag([2.0, 2.0, 1.0, 1.0]))  # in-plane LR, one slice
    assert choose_task(low_res_slice, "auto") == "sr"
    assert choose_task(Volume(np.zeros((8, 8, 3)), np.diag([1.0, 0.5, 2.0, 1.0])), "auto") == "sr_thick"
    assert choose_task(Volume(np.zeros((8, 8, 3)), np.diag([1.0, 1.5, 2.0, 1.0])), "auto") == "sr"
    assert choose_task(k, "auto") == "recon"
    assert choose_task(thick, "sr") == "sr"
    with pytest.raises(ValueError, match="k-space"):
        choose_task(iso, "recon")


def test_isolated_decoder_survives_a_crash_and_a_hang(monkeypatch):
    monkeypatch.chdir(REPO)  # the child imports the test sources from the repository root
    decoder = IsolatedDecoder(timeout_s=20)
    try:
        assert decoder.load(SmallSource()).shape == (2, 3, 4)
        with pytest.raises(DecodeError, match="crashed"):
            decoder.load(CrashingSource())
        assert decoder.load(SmallSource()).array.sum() == pytest.approx(276.0), "a new child after the crash"
        decoder.timeout_s = 3
        t0 = time.monotonic()
        with pytest.raises(DecodeError, match="did not finish"):
            decoder.load(HangingSource())
        assert time.monotonic() - t0 < 15
        assert decoder.load(SmallSource()).shape == (2, 3, 4)
    finally:
        decoder.close()


def numbered_source(number: int, **extra) -> SimpleNamespace:
    """A scan that decodes to ``{"number": number, **options}``, so answers tell scans apart.

    Built from picklable builtins: the decoding child loads it without importing this (slow) module."""
    return SimpleNamespace(load=functools.partial(dict, number=number), **extra)


def test_isolated_decoder_prefetch_then_load_in_order():
    decoder = IsolatedDecoder(timeout_s=60)
    try:
        sources = [numbered_source(n) for n in range(4)]
        for source in sources:
            decoder.prefetch(source)
        decoder.prefetch(sources[0])  # already pending: not sent twice
        assert [decoder.load(s) for s in sources] == [{"number": n} for n in range(4)]
        assert decoder.load(sources[2]) == {"number": 2}, "loaded again: sent again"
        # options are part of the request: a prefetch with other options is not this load's answer
        decoder.prefetch(sources[1], scale=2)
        assert decoder.load(sources[1]) == {"number": 1}
        decoder.prefetch(sources[3], scale=2)
        assert decoder.load(sources[3], scale=2) == {"number": 3, "scale": 2}
        # the engine's pattern: the next scan is prefetched before the current one is loaded
        decoder.prefetch(sources[0])
        for current, upcoming in zip(sources, [*sources[1:], None], strict=True):
            if upcoming is not None:
                decoder.prefetch(upcoming)
            assert decoder.load(current) == {"number": sources.index(current)}
    finally:
        decoder.close()


def test_isolated_decoder_prefetched_scans_nobody_loads_do_not_get_in_the_way(monkeypatch):
    monkeypatch.chdir(REPO)
    decoder = IsolatedDecoder(timeout_s=60)
    try:
        a, b, c = numbered_source(1), numbered_source(2), numbered_source(3)
        decoder.prefetch(a)
        assert decoder.load(c) == {"number": 3}, "a scan that was not prefetched, with another pending"
        assert decoder.load(a) == {"number": 1}, "the dropped prefetch is sent again"
        decoder.prefetch(a)
        decoder.prefetch(b)
        assert decoder.load(b) == {"number": 2}, "the older answer is read and discarded"
        assert decoder.load(a) == {"number": 1}
        decoder.prefetch(HangingSource())
        assert decoder.load(c) == {"number": 3}, "a hanging prefetch nobody loads is dropped"
        decoder.prefetch(a)
        decoder.prefetch(HangingSource())
        decoder.close()  # pending requests (one of them hanging) are dropped
        assert decoder.load(b) == {"number": 2}, "a new child after close"
    finally:
        decoder.close()


def test_isolated_decoder_prefetched_crash_and_hang_fail_only_their_scan(monkeypatch):
    monkeypatch.chdir(REPO)
    decoder = IsolatedDecoder(timeout_s=20)
    try:
        crashing, after = CrashingSource(), numbered_source(1)
        decoder.prefetch(crashing)
        decoder.prefetch(after)
        with pytest.raises(DecodeError, match="crashed"):
            decoder.load(crashing)
        assert decoder.load(after) == {"number": 1}, "dropped with the crashed child, sent again"
        decoder.timeout_s = 3
        hanging, after = HangingSource(), numbered_source(2)
        decoder.prefetch(hanging)
        decoder.prefetch(after)
        with pytest.raises(DecodeError, match="did not finish"):
            decoder.load(hanging)
        assert decoder.load(after) == {"number": 2}
        # an older prefetch that crashes while its answer is discarded does not fail the scan asked for
        decoder.prefetch(CrashingSource())
        decoder.prefetch(after)
        assert decoder.load(after) == {"number": 2}
        assert decoder.load(SmallSource()).shape == (2, 3, 4)
    finally:
        decoder.close()


def test_isolated_decoder_prefetched_scan_gets_its_full_timeout_after_the_one_before():
    """Each of two queued decodes fits in the timeout, both together do not: the second one's time counts
    from when the child could start it, not from when it was sent."""
    decoder = IsolatedDecoder(timeout_s=8)
    try:
        # the child is started first, so that its start-up (imports) does not count against the first decode
        assert decoder.load(SimpleNamespace(load=functools.partial(dict, warm=1))) == {"warm": 1}
        slow = [SimpleNamespace(load=functools.partial(time.sleep, 5)) for _ in range(2)]
        for source in slow:
            decoder.prefetch(source)
        assert [decoder.load(source) for source in slow] == [None, None]
    finally:
        decoder.close()


def test_isolated_decoder_prefetch_of_a_large_request_does_not_block(monkeypatch):
    """A request larger than the pipe is queued while the child is busy (here: hanging), not written with
    a blocking write that would wait for the child."""
    monkeypatch.chdir(REPO)
    decoder = IsolatedDecoder(timeout_s=3)
    try:
        big = numbered_source(7, padding=b"x" * (4 << 20))
        decoder.prefetch(HangingSource())
        decoder.prefetch(big)  # returns: what the pipe does not take waits in a queue
        assert decoder.load(numbered_source(8)) == {"number": 8}
        decoder.prefetch(numbered_source(9))
        decoder.prefetch(big)
        assert decoder.load(big) == {"number": 7}
    finally:
        decoder.close()


def test_needs_decoding_says_when_process_scan_loads(tmp_path):
    """The engine prefetches exactly the scans process_scan will load, with its error messages kept."""
    from medidiff.pipeline.settings import ScanJob
    from medidiff.pipeline.worker import needs_decoding, process_scan

    class RecordingDecoder:
        def __init__(self):
            self.loaded = []

        def load(self, source, **options):
            self.loaded.append(source)
            raise DecodeError("decoded (stopped here)")

    cases = {
        "invalid": ("invalid", SimpleNamespace(problems=["truncated file"], modality=""), "truncated file"),
        "invalid-silent": ("invalid", SimpleNamespace(problems=[], modality=""), "not a readable scan"),
        "ct": ("dicom", SimpleNamespace(problems=[], modality="CT"), "modality CT is not MR"),
        "mr": ("dicom", SimpleNamespace(problems=[], modality="mr"), "decoded"),
        "unknown": ("nifti", SimpleNamespace(problems=[]), "decoded"),
    }
    decoder = RecordingDecoder()
    for key, (kind, source, error) in cases.items():
        job = ScanJob(key, source, key, "x", key, "f", kind)
        entry = process_scan(job, tmp_path / "in", tmp_path / "out", EnhanceSettings(), None, decoder)
        assert entry["status"] == "failed" and error in entry["error"], entry
        assert needs_decoding(job) == any(s is source for s in decoder.loaded) == (error == "decoded"), key


def test_out_inside_in_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(BatchUsageError, match="inside"):
        check_roots(tmp_path / "in", tmp_path / "in" / "out")
    with pytest.raises(BatchUsageError, match="inside"):
        check_roots(tmp_path / "in", tmp_path / "in")
    with pytest.raises(BatchUsageError, match="does not exist"):
        check_roots(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "out" / "in").mkdir(parents=True)
    with pytest.raises(BatchUsageError, match="input folder must not be inside the output folder"):
        check_roots(tmp_path / "out" / "in", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BatchUsageError, match="is not a folder"):
        check_roots(tmp_path / "in", tmp_path / "file" / "out")


def _medidiff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        check=False,
        args=[sys.executable, "-m", "medidiff", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_usage_errors_exit_2_and_write_nothing(tmp_path):
    src = build_messy_folder(tmp_path / "IN", broken=False)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    proc = _medidiff("enhance", str(src), "--out", str(src / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "inside" in proc.stderr
    proc = _medidiff("enhance", str(src), "--out", str(tmp_path / "o"), "--task", "nonsense", cwd=tmp_path)
    assert proc.returncode == 2 and "task" in proc.stderr
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert not (tmp_path / "o").exists()


def test_cli_dry_run_lists_the_plan_and_writes_nothing(tmp_path):
    src = build_messy_folder(tmp_path / "IN")
    proc = _medidiff("enhance", str(src), "--out", str(tmp_path / "OUT"), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for key in (
        "nifti/brain.nii.gz",
        "nifti/thick.nii.gz",
        "kspace/knee.h5",
        "broken/truncated.dcm",
        "site-a/exam-1/series0003-",
    ):
        assert key in text
    assert "8 to run" in text.replace("\n", " ")
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "mlflow.db").exists()


def test_plan_skips_done_scans_unless_forced(tmp_path):
    from medidiff.pipeline.batch import plan

    src = build_messy_folder(tmp_path / "IN")
    out = tmp_path / "OUT"
    settings = EnhanceSettings(samples=2)
    manifest = Manifest.load_or_new(src, out, {})
    items = list(plan(src.resolve(), manifest, settings))
    assert [i.action for i in items] == ["run"] * 8
    assert len({(i.job.out_dir_rel, i.job.stem) for i in items}) == 8, "every scan gets its own output names"
    brain = next(i.job for i in items if i.job.key == "nifti/brain.nii.gz")
    outputs = output_paths(brain, settings)
    assert (
        outputs["uncertainty"] == "nifti/brain_uncertainty.nii.gz"
        and outputs["dicom"] == "nifti/brain_enhanced_dicom"
    )
    for rel in filter(None, outputs.values()):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    manifest.record({**_entry(brain.key, outputs=outputs), "fingerprint": brain.fingerprint})
    actions = {i.job.key: i.action for i in plan(src.resolve(), manifest, settings)}
    assert actions["nifti/brain.nii.gz"] == "skip" and list(actions.values()).count("run") == 7
    assert all(i.action == "run" for i in plan(src.resolve(), manifest, settings, force=True))
    other = EnhanceSettings(samples=3)
    assert {i.job.key: i.action for i in plan(src.resolve(), manifest, other)}["nifti/brain.nii.gz"] == "run"


def test_a_changed_model_makes_a_resumed_batch_redo_its_scans(tmp_path):
    """The fingerprint holds a digest of each task's model (weights, recipe, calibrations): a model folder
    with another recipe redoes a done scan; the same files elsewhere do not."""
    from medidiff.models import model_digest, weights_dir
    from medidiff.pipeline.batch import plan

    copy = tmp_path / "my_sr"
    shutil.copytree(weights_dir() / "sr_x2", copy)
    shipped = EnhanceSettings(task="sr").fingerprint_params()["model_digests"]
    assert set(shipped) == {"sr"} and shipped["sr"] == model_digest("sr_x2") == model_digest(copy)
    assert set(EnhanceSettings().fingerprint_params()["model_digests"]) == {"sr", "sr_thick", "recon"}
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"abc")
    settings = EnhanceSettings(task="sr", models=(str(copy),))
    first = input_fingerprint([f], tmp_path, settings.fingerprint_params())
    assert first == input_fingerprint([f], tmp_path, settings.fingerprint_params())
    config = json.loads((copy / "config.json").read_text())
    config["recipe"]["diffusion"]["steps"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert model_digest(copy) != shipped["sr"]
    assert first != input_fingerprint([f], tmp_path, settings.fingerprint_params())
    # through the planner: a scan recorded as done with the old model is run again
    src = build_messy_folder(tmp_path / "IN")
    manifest = Manifest.load_or_new(src, tmp_path / "OUT", {})
    brain = next(i.job for i in plan(src.resolve(), manifest, settings) if i.job.key == "nifti/brain.nii.gz")
    manifest.record({**_entry(brain.key, outputs={}), "fingerprint": brain.fingerprint})
    assert {i.job.key: i.action for i in plan(src.resolve(), manifest, settings)}[brain.key] == "skip"
    (copy / "calibration.json").write_text(json.dumps({"changed": True}))
    assert {i.job.key: i.action for i in plan(src.resolve(), manifest, settings)}[brain.key] == "run"


def test_one_batch_at_a_time_per_output_folder(tmp_path):
    from medidiff.pipeline.batch import _lock_output

    first = _lock_output(tmp_path)
    try:
        with pytest.raises(BatchUsageError, match="another medidiff enhance"):
            _lock_output(tmp_path)
    finally:
        os.close(first)
    os.close(_lock_output(tmp_path))  # released: the next batch may start


def test_factor_option_is_checked_against_the_model(tmp_path):
    """--factor names what the user expects; a model for another factor is refused before anything runs."""
    from typer.testing import CliRunner

    from medidiff.cli import app

    (tmp_path / "in").mkdir()
    ok = CliRunner().invoke(app, ["enhance", str(tmp_path / "in"), "--out", str(tmp_path / "o1"),
                                  "--task", "sr", "--factor", "2", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["enhance", str(tmp_path / "in"), "--out", str(tmp_path / "o2"),
                                   "--task", "sr", "--factor", "3", "--dry-run"])
    assert bad.exit_code == 2 and "does factor 2" in bad.output
    auto = CliRunner().invoke(app, ["enhance", str(tmp_path / "in"), "--out", str(tmp_path / "o3"),
                                    "--factor", "2", "--dry-run"])
    assert auto.exit_code == 2 and "--factor needs --task sr" in auto.output


def test_model_option_accepts_the_folder_train_out_wrote(tmp_path):
    """`enhance --model DIR` works with what `train --out DIR` wrote (the checkpoint is DIR/model)."""
    from medidiff.models.checkpoint import load_model, read_config
    from tests.pipeline.test_batch_enhance_cli import _smoke_checkpoint

    saved = _smoke_checkpoint(tmp_path / "run", "sr")
    train_out = tmp_path / "train_out"
    saved.rename(train_out.mkdir() or train_out / "model")
    assert read_config(train_out)["recipe"]["task"]["kind"] == "sr"
    loaded = load_model(train_out)
    assert loaded.task == "sr" and loaded.path == train_out / "model"
    with pytest.raises(FileNotFoundError, match="train --out"):
        read_config(tmp_path)


def test_isolated_decoder_passes_reader_options(tmp_path):
    """Reader options (allow_nonfinite) reach the decoding child."""
    import nibabel as nib

    from medidiff.io import discover

    arr = np.ones((4, 5, 6), np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    (source,) = list(discover(tmp_path / "nan.nii.gz"))
    decoder = IsolatedDecoder(timeout_s=60)
    try:
        with pytest.raises(DecodeError, match="NaN"):
            decoder.load(source)
        vol = decoder.load(source, allow_nonfinite=True)
        assert vol.shape == (4, 5, 6) and np.isnan(vol.array).sum() == 1
    finally:
        decoder.close()


def test_ray_engine_refuses_cuda_on_a_cluster_without_gpus(tmp_path):
    """`--engine ray --device cuda` on a cluster with no GPU is a usage error, not CPU actors that ask for
    CUDA; the Ray it started is shut down again."""
    import ray
    import torch

    from medidiff.pipeline.batch import make_engine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Ray would see it")
    (tmp_path / "IN").mkdir()
    with pytest.raises(BatchUsageError, match="no GPU"):
        make_engine("ray", tmp_path / "IN", tmp_path / "OUT", EnhanceSettings(task="sr"), device="cuda")
    assert not ray.is_initialized()
