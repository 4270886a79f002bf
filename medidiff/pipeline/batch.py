"""The main job: enhance every scan under a folder — discover → plan → run → manifest, report, MLflow.

Resumable (a manifest rewritten atomically after every scan; done scans are skipped by fingerprint),
atomic (every output is renamed into place; on start, the temporaries a killed run of this manifest left
beside its recorded outputs are removed, nothing else), isolated (a broken
scan is recorded and the batch goes on) and tracked (one MLflow run per batch, no patient data).
The driver alone writes the manifest and talks to MLflow, whichever engine runs the scans.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medidiff.io.discover import discover
from medidiff.pipeline.decoding import IsolatedDecoder
from medidiff.pipeline.manifest import Manifest, clean_stale_temporaries, input_fingerprint
from medidiff.pipeline.model_cache import ModelCache
from medidiff.pipeline.ray_engine import RayEngine
from medidiff.pipeline.settings import EnhanceSettings, ScanJob, output_folder_rel, output_stem
from medidiff.pipeline.worker import geometry_task, needs_decoding, process_scan
from medidiff.tracking import tracking_run

# Services of the review layer, passed in by the caller (the pipeline never imports review):
ReportWriter = Callable[[Path, dict[str, Any]], Path]
"""Writes the batch's report from OUT and the manifest's dict; returns the report's path."""
PreviewMaker = Callable[[Path, dict[str, Any]], Any]
"""Makes one finished scan's preview image (an array MLflow can log) from OUT and its entry, or None."""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
MAX_LOGGED_FIGURES = 4


EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class BatchUsageError(ValueError):
    """The batch cannot start (bad folders, OUT inside IN, unreadable manifest)."""


class BatchStopped(Exception):
    """The batch was stopped by SIGINT or SIGTERM; what was finished is recorded, a rerun continues."""

    def __init__(self, signum: int, done: int = 0, pending: int = 0) -> None:
        super().__init__(f"stopped; {done} done, {pending} pending; rerun to continue")
        self.signum, self.done, self.pending = signum, done, pending

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM (like KeyboardInterrupt for SIGINT): unwinds atomic writes."""


@contextmanager
def _stop_signals() -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` and make SIGINT raise KeyboardInterrupt while the batch runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


@dataclass
class PlanItem:
    """A scan found under IN and what the batch will do with it: 'run' or 'skip' (already done)."""

    job: ScanJob
    action: str


@dataclass
class BatchSummary:
    """Counts and timings of one batch invocation."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    planned: int = 0
    """Scans found so far that this invocation set out to run."""
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    run_id: str | None = None
    report: Path | None = None
    manifest: Path | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

    @property
    def scans_per_minute(self) -> float:
        return 60.0 * (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- checks
def check_roots(input_root: Path, output_root: Path) -> tuple[Path, Path]:
    """Resolve IN and OUT; refuse a missing IN, and an OUT equal to or inside IN (IN is never written)."""
    input_root = Path(input_root).expanduser()
    output_root = Path(output_root).expanduser()
    if not input_root.exists():
        raise BatchUsageError(f"{input_root}: input folder does not exist")
    if not input_root.is_dir():
        raise BatchUsageError(f"{input_root}: input must be a folder")
    in_res, out_res = input_root.resolve(), output_root.resolve()
    if out_res == in_res or in_res in out_res.parents:
        raise BatchUsageError(
            f"{output_root}: output folder must not be inside the input folder {input_root}"
        )
    if out_res in in_res.parents:  # OUT's clean-up and outputs would share folders with the scans
        raise BatchUsageError(
            f"{input_root}: input folder must not be inside the output folder {output_root}"
        )
    for parent in (out_res, *out_res.parents):
        if parent.exists():
            if not parent.is_dir():
                raise BatchUsageError(
                    f"{output_root}: cannot create the output folder, {parent} is not a folder"
                )
            break
    return in_res, out_res


# ----------------------------------------------------------------------------------------------- plan
def plan(
    input_root: Path, manifest: Manifest, settings: EnhanceSettings, force: bool = False
) -> Iterator[PlanItem]:
    """Stream the scans under IN (discovery is lazy) with what to do with each."""
    params = settings.fingerprint_params()
    seen_stems: set[tuple[str, str]] = set()  # one small tuple per scan, not the scan's data
    for source in discover(input_root):
        try:
            job = _job(source, input_root, params, seen_stems)
        except Exception as exc:  # noqa: BLE001 - a scan that cannot even be planned fails alone
            job = _unplannable_job(source, f"{type(exc).__name__}: {exc}", seen_stems)
        action = "skip" if not force and manifest.is_done(job.key, job.fingerprint) else "run"
        yield PlanItem(job, action)


def _job(source: Any, input_root: Path, params: dict[str, Any], seen_stems: set[tuple[str, str]]) -> ScanJob:
    """The job of one discovered scan: its fingerprint, its output folder and a stem unique in it."""
    source_path = Path(source.path)
    files = [Path(f) for f in (source.files or [source_path])]
    fingerprint = input_fingerprint(files, input_root, params)
    out_dir_rel = output_folder_rel(source_path, input_root)
    stem = _unique_stem(source.key, out_dir_rel, seen_stems)
    try:  # the path as found (a symbolic link is not followed: it may loop or lead out of IN)
        input_rel = Path(os.path.abspath(source_path)).relative_to(input_root).as_posix()
    except ValueError:
        input_rel = source_path.name
    return ScanJob(
        key=source.key,
        source=source,
        input_rel=input_rel,
        out_dir_rel=out_dir_rel,
        stem=stem,
        fingerprint=fingerprint,
        kind=source.kind,
    )


def _unique_stem(key: str, out_dir_rel: str, seen_stems: set[tuple[str, str]]) -> str:
    stem = output_stem(key)
    if (out_dir_rel, stem) in seen_stems:  # e.g. scan.nii and scan.nii.gz side by side
        stem = f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:6]}"
    seen_stems.add((out_dir_rel, stem))
    return stem


def _unplannable_job(source: Any, error: str, seen_stems: set[tuple[str, str]]) -> ScanJob:
    """A job that fails with ``error`` (its scan could not be planned); it writes nothing."""
    problems = [*(getattr(source, "problems", None) or []), f"cannot plan this scan ({error})"]
    key = str(source.key)
    stand_in = SimpleNamespace(path=str(source.path), key=key, problems=problems, modality="")
    return ScanJob(
        key=key,
        source=stand_in,
        input_rel=key,
        out_dir_rel=str(Path(key).parent.as_posix()),
        stem=_unique_stem(key, str(Path(key).parent.as_posix()), seen_stems),
        fingerprint="unplannable",
        kind="invalid",
    )


# ------------------------------------------------------------------------------------------- engines
class LocalEngine:
    """Runs scans one after another in this process (decoding in an isolated child process)."""

    name = "local"

    def __init__(
        self,
        input_root: Path,
        output_root: Path,
        settings: EnhanceSettings,
        threads: int | None = None,
        device: str = "auto",
    ) -> None:
        import torch

        self.input_root, self.output_root, self.settings = input_root, output_root, settings
        # one core is left to the driver, the decoding child and whatever else runs: on a shared 2-core
        # machine torch with 2 threads ran 4-9x slower than with 1 (docs/scaling.md)
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
        self.models = ModelCache(settings.models, device=device)
        self.description = (
            f"local: 1 process, {torch.get_num_threads()} torch thread(s), "
            f"device {self.models.resolved_device()}"
        )
        self.decoder = IsolatedDecoder(settings.decode_timeout_s)

    def run(
        self,
        jobs: Iterator[ScanJob],
        on_start: Callable[[ScanJob], None],
        on_step: Callable[[ScanJob, int, int], None],
    ) -> Iterator[tuple[ScanJob, dict[str, Any]]]:
        """Yield (job, manifest entry) as each scan finishes.

        One job ahead is taken from ``jobs`` before the current one is processed, and its decoding is
        prefetched: the decoding child decodes the next scan while this process enhances the current one.
        """
        end = object()
        jobs = iter(jobs)
        job = next(jobs, end)
        while job is not end:
            if needs_decoding(job):
                self.decoder.prefetch(job.source)  # nothing to do when it was prefetched as the next one
            upcoming = next(jobs, end)
            if upcoming is not end and needs_decoding(upcoming):
                self.decoder.prefetch(upcoming.source)
            on_start(job)
            entry = process_scan(
                job,
                self.input_root,
                self.output_root,
                self.settings,
                self.models,
                self.decoder,
                progress=lambda done, total, job=job: on_step(job, done, total),
            )
            yield job, entry
            job = upcoming

    def model_identity(self) -> dict[str, dict[str, str]]:
        return self.models.identities()

    def close(self) -> None:
        self.decoder.close()


def make_engine(
    kind: str,
    input_root: Path,
    output_root: Path,
    settings: EnhanceSettings,
    address: str | None = None,
    num_workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
) -> Any:
    """The local engine, or a Ray actor pool (joining ``address`` or starting a local Ray)."""
    if device not in ("auto", "cpu", "cuda"):
        raise BatchUsageError(f"device must be auto, cpu or cuda, got {device!r}")
    if kind == "local":
        return LocalEngine(input_root, output_root, settings, threads=threads, device=device)
    if kind == "ray":
        try:
            return RayEngine(
                input_root,
                output_root,
                settings,
                address=address,
                num_workers=num_workers,
                threads=threads,
                device=device,
            )
        except ValueError as exc:  # the cluster cannot run what was asked (e.g. CUDA without GPUs)
            raise BatchUsageError(str(exc)) from None
    raise BatchUsageError(f"engine must be 'local' or 'ray', got {kind!r}")


# ----------------------------------------------------------------------------------------------- run
def run_batch(
    input_root: Path,
    output_root: Path,
    settings: EnhanceSettings,
    *,
    engine: str = "local",
    address: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    num_workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    console: Any = None,
    report: ReportWriter | None = None,
    preview: PreviewMaker | None = None,
    log_paths: bool = False,
) -> BatchSummary:
    """Enhance every scan under ``input_root`` into ``output_root``; see the module docstring.

    Scan keys are paths under IN, and folder names may be patients' names: MLflow (often a shared server)
    gets only hashes of them (:func:`scan_hash`) unless ``log_paths``; then it also gets the manifest and
    the report. ``report`` writes the batch's report at the end (none without it); ``preview`` makes the
    figures logged to MLflow for the first finished scans (none without it).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    input_root, output_root = check_roots(input_root, output_root)
    t0 = time.perf_counter()
    params = {**settings.fingerprint_params(), "engine": engine, "force": force}
    if dry_run:
        manifest = _load_manifest(input_root, output_root, params)
        summary = BatchSummary(manifest=manifest.path)
        _print_plan(console, plan(input_root, manifest, settings, force=force), settings)
        summary.seconds = time.perf_counter() - t0
        return summary
    output_root.mkdir(parents=True, exist_ok=True)
    lock = _lock_output(output_root)
    manifest: Manifest | None = None
    summary = BatchSummary()
    try:
        with _stop_signals():
            try:
                manifest = _load_manifest(input_root, output_root, params)
                stale = clean_stale_temporaries(manifest)
                if stale:
                    console.print(f"removed {len(stale)} temporary file(s) left by an interrupted run")
                summary.manifest = manifest.path
                # lazy: discovery streams with the run
                items = plan(input_root, manifest, settings, force=force)
                _run_tracked(
                    items,
                    manifest,
                    summary,
                    settings,
                    params,
                    engine,
                    address,
                    num_workers,
                    threads,
                    device,
                    tracking_uri,
                    report,
                    preview,
                    console,
                    t0,
                    log_paths,
                )
            except (KeyboardInterrupt, _Terminated) as exc:
                signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
                raise _stopped(signum, manifest, summary) from None
    finally:
        os.close(lock)
    _print_summary(console, summary)
    return summary


def _stopped(signum: int, manifest: Manifest | None, summary: BatchSummary) -> BatchStopped:
    """Record what a stopped batch finished (the manifest is saved after every scan) and count the rest."""
    with _stop_signals():  # a second Ctrl-C while saving must not leave a half-written manifest
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if manifest is not None:
            with suppress(Exception):
                manifest.save()
    done = manifest.counts().get("done", 0) if manifest is not None else 0
    pending = max(0, summary.planned - summary.done - summary.failed)
    return BatchStopped(int(signum), done, pending)


def _load_manifest(input_root: Path, output_root: Path, params: dict[str, Any]) -> Manifest:
    try:
        manifest = Manifest.load_or_new(input_root, output_root, params)
    except ValueError as exc:
        raise BatchUsageError(str(exc)) from exc
    manifest.params.setdefault("model_identity", {})
    return manifest


def _run_tracked(
    items: Iterator[PlanItem],
    manifest: Manifest,
    summary: BatchSummary,
    settings: EnhanceSettings,
    params: dict[str, Any],
    engine: str,
    address: str | None,
    num_workers: int | None,
    threads: int | None,
    device: str,
    tracking_uri: str | None,
    report: ReportWriter | None,
    preview: PreviewMaker | None,
    console: Any,
    t0: float,
    log_paths: bool = False,
) -> None:
    """One MLflow run around the engine's work, then the manifest, the report and the batch's records."""
    input_root, output_root = Path(manifest.input_root), Path(manifest.output_root)
    with tracking_run(
        "enhance",
        run_name=f"enhance-{time.strftime('%Y%m%d-%H%M%S')}",
        tracking_uri=tracking_uri,
        params=dict(params),
        tags={"engine": engine},
    ) as tracker:
        summary.run_id = getattr(tracker, "run_id", None)
        engines: list[Any] = []

        def start_engine() -> Any:  # started at the first scan to run: a finished batch never loads a model
            eng = make_engine(
                engine,
                input_root,
                output_root,
                settings,
                address=address,
                num_workers=num_workers,
                threads=threads,
                device=device,
            )
            tracker.log_params({"engine_detail": getattr(eng, "description", engine)})
            engines.append(eng)
            return eng

        try:
            _run_jobs(
                start_engine, items, manifest, summary, console, tracker, output_root, preview, log_paths
            )
            identity = engines[0].model_identity() if engines else {}
        finally:
            for eng in engines:
                eng.close()
        summary.seconds = time.perf_counter() - t0
        identity = {
            **(manifest.params.get("model_identity") or {}),
            **identity,
        }  # models of earlier runs of this batch
        manifest.params = {**params, "model_identity": identity}
        manifest.save()
        if report is not None:
            summary.report = report(output_root, manifest.to_dict())
        _log_batch(tracker, manifest, summary, identity, log_paths)


def _lock_output(output_root: Path) -> int:
    """Hold an exclusive lock on OUT for this batch (released by the kernel even on kill -9)."""
    import fcntl

    fd = os.open(output_root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BatchUsageError(f"{output_root}: another medidiff enhance is writing to this folder") from None
    return fd


def _run_jobs(
    start_engine: Callable[[], Any],
    items: Iterator[PlanItem],
    manifest: Manifest,
    summary: BatchSummary,
    console: Any,
    tracker: Any,
    output_root: Path,
    preview: PreviewMaker | None,
    log_paths: bool = False,
) -> None:
    """Drive the engine with an overall and a per-scan progress bar; record each result as it arrives.

    Discovery streams into the engine: the overall bar's total grows as scans are found. The engine is
    started when the first scan to run is found.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("all scans", total=0)
        bars: dict[str, Any] = {}

        def jobs() -> Iterator[ScanJob]:
            for item in items:
                if item.action == "skip":
                    summary.skipped += 1
                    continue
                progress.update(overall, total=(progress.tasks[overall].total or 0) + 1)
                summary.planned += 1
                manifest.writing[item.job.key] = f"{item.job.out_dir_rel}/{item.job.stem}"
                manifest.save()  # before any output of it exists: its temporaries are known to be ours
                yield item.job

        def on_start(job: ScanJob) -> None:
            bars[job.key] = progress.add_task(f"  {job.key[-48:]}", total=None)

        def on_step(job: ScanJob, done: int, total: int) -> None:
            if job.key in bars:
                progress.update(bars[job.key], completed=done, total=total)

        pending = jobs()
        first = next(pending, None)
        results = (
            start_engine().run(chain([first], pending), on_start, on_step) if first is not None else iter(())
        )
        for index, (job, entry) in enumerate(results):
            manifest.record(entry)
            manifest.save()
            if job.key in bars:
                progress.remove_task(bars.pop(job.key))
            progress.advance(overall)
            if entry["status"] == "done":
                summary.done += 1
                if preview is not None and summary.done <= MAX_LOGGED_FIGURES:
                    _log_figure(tracker, output_root, entry, preview, log_paths)
            else:
                summary.failed += 1
                summary.failures.append((entry["key"], entry.get("error") or "unknown error"))
                progress.console.print(f"[red]failed[/red] {entry['key']}: {entry.get('error')}")
            tracker.log_metrics(
                {
                    "scans_done": summary.done,
                    "scans_failed": summary.failed,
                    "scan_seconds": entry["seconds"],
                },
                step=index,
            )
        progress.update(overall, description=f"all scans ({summary.skipped} already done)")


def scan_hash(key: str) -> str:
    """The name a scan goes to MLflow under: a hash of its key (a path that may hold a patient's name)."""
    return "scan-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _logged_key(entry: dict[str, Any], log_paths: bool) -> str:
    return entry["key"] if log_paths else scan_hash(entry["key"])


def _logged_error(entry: dict[str, Any], log_paths: bool) -> str | None:
    """The scan's error message for MLflow: without ``log_paths``, every part of its path is hidden."""
    error = entry.get("error")
    if error is None or log_paths:
        return error
    names = (entry["key"], str(entry.get("input") or ""))
    parts = set(names)
    for text in names:
        parts.update(p for p in Path(text).parts if len(p) > 2)
    for part in sorted((p for p in parts if p), key=len, reverse=True):
        error = error.replace(part, "<scan>")
    return error


def _log_figure(
    tracker: Any, output_root: Path, entry: dict[str, Any], preview: PreviewMaker, log_paths: bool = False
) -> None:
    """Log one preview (e.g. a before/after/difference/uncertainty strip) of a finished scan."""
    name = _logged_key(entry, log_paths)
    try:
        strip = preview(output_root, entry)
        if strip is not None:
            safe = name.replace("/", "__")[-80:]
            tracker.log_image(strip, f"figures/{safe}.png")
    except Exception as exc:  # noqa: BLE001 - a figure must never fail the batch
        tracker.log_text(f"figure for {name} failed: {type(exc).__name__}", "figures/errors.txt")


def _log_batch(
    tracker: Any, manifest: Manifest, summary: BatchSummary, identity: dict[str, str], log_paths: bool = False
) -> None:
    """Per-scan metrics table, counts, timings and model identity; with ``log_paths`` also the manifest
    and the report (they name scans by path). Without it scans appear only as :func:`scan_hash`."""
    rows = []
    for entry in manifest.scans.values():
        row = {
            "key": _logged_key(entry, log_paths),
            "kind": entry.get("kind"),
            "task": entry.get("task"),
            "status": entry.get("status"),
            "seconds": entry.get("seconds"),
            "error": _logged_error(entry, log_paths),
        }
        row.update(dict((entry.get("metrics") or {}).items()))
        rows.append(row)
    if rows:
        tracker.log_table(rows, "scan_metrics.json")
    tracker.log_params(
        {f"model_{task}": json.dumps(ident, sort_keys=True) for task, ident in identity.items()}
    )
    tracker.log_metrics(
        {
            "scans_done": summary.done,
            "scans_skipped": summary.skipped,
            "scans_failed": summary.failed,
            "batch_seconds": summary.seconds,
            "scans_per_minute": summary.scans_per_minute,
        }
    )
    if log_paths:
        tracker.log_artifact(manifest.path)
        if summary.report is not None:
            tracker.log_artifact(summary.report)


# ------------------------------------------------------------------------------------------- printing
def _print_plan(console: Any, items: Iterator[PlanItem], settings: EnhanceSettings) -> None:
    """Stream the plan to stdout, one line per scan, then the counts."""
    from rich.console import Console

    out = Console(soft_wrap=True, highlight=False)
    counts = {"run": 0, "skip": 0}
    for it in items:
        counts[it.action] += 1
        source = it.job.source
        task = settings.task
        if task == "auto":
            affine, shape = getattr(source, "affine", None), getattr(source, "shape", None)
            if it.job.kind == "kspace":
                task = "recon"
            elif affine is not None and shape:
                task = geometry_task(affine, tuple(shape))
            else:
                task = "?"
        note = ""
        modality = str(getattr(source, "modality", "") or "")
        if it.job.kind == "invalid":
            note = "  (will fail: " + "; ".join(getattr(source, "problems", []) or ["invalid"]) + ")"
        elif modality and modality.upper() != "MR":
            note = f"  (will fail: modality {modality} is not MR)"
        target = "/".join(p for p in (it.job.out_dir_rel, f"{it.job.stem}_*") if p and p != ".")
        out.print(
            f"{it.action:4}  {it.job.kind:7}  {task:8}  {it.job.key}  -> OUT/{target}{note}", markup=False
        )
    console.print(f"plan: {counts['run']} to run, {counts['skip']} already done (dry run: nothing written)")


def _print_summary(console: Any, summary: BatchSummary) -> None:
    from rich.table import Table

    table = Table(title=f"medidiff enhance: {summary.done + summary.skipped + summary.failed} scan(s) found")
    for col in ("done", "skipped", "failed", "time (s)", "scans/min"):
        table.add_column(col, justify="right")
    table.add_row(
        str(summary.done),
        str(summary.skipped),
        str(summary.failed),
        f"{summary.seconds:.1f}",
        f"{summary.scans_per_minute:.1f}",
    )
    console.print(table)
    if summary.failures:
        failed = Table(title="failed scans")
        failed.add_column("scan key")
        failed.add_column("error")
        for key, error in summary.failures:
            failed.add_row(key, error)
        console.print(failed)
