"""GPU throughput: seconds per 256×256×160 volume for sr, sr_thick and recon, and the Ray batch path.

    python benchmarks/bench_gpu.py --device cuda --ray --out gpu.md    # the one prepared GPU-session command
    python benchmarks/bench_gpu.py --device cpu --quick --ray          # every path, small, on a CPU

Part 1, one volume at a time through ``medidiff.pipeline.enhance`` at the defaults (do-no-harm gate on,
the model's steps), for each slice batch (``--batch-slices``) and precision (``--precisions``):

* sr: in-plane SR ×2, a 128×128×160 input (k-space truncation) to 256×256×160;
* sr_thick: through-plane SR ×4, a 256×256×40 thick-slice input (``simulate_sr(axis="through")``, rect
  profile) to 256×256×160;
* recon: 160 slices of 256×256 single-coil k-space, ×4 equispaced (8 % centre), reconstructed.

The volume is the MNI152 T1 template (nilearn) resampled to the grid. One warm-up run per configuration is
not timed (CUDA kernels and autocast caches are set up there); the time is the median of ``--repeats``
runs between ``torch.cuda.synchronize()`` calls, model loading excluded. Peak GPU memory is
``torch.cuda.max_memory_allocated`` of the timed runs (reset before each). PSNR is against the reference
volume (and the classical image's beside it), so a wrong result shows. The gate column is the weight of
the model's residual: 0 means the gate returned the classical image and the network ran only on the
self-check slices, so that time is not the model's.

Part 2 (``--ray``): ``--ray-scans`` copies of the sr input written as NIfTI into a temporary folder and
enhanced by ``medidiff.pipeline.batch.run_batch`` with the Ray engine, as ``medidiff enhance --engine ray
--task sr --format nifti --device DEVICE`` does (one actor per GPU on CUDA, one per CPU otherwise; model
loading, decoding, writing and MLflow tracking into the temporary folder included): scans per minute and
seconds per scan from the wall clock.

A configuration that fails (e.g. CUDA out of memory at a large batch) is a row with its error; the run goes
on. Configurations not started before ``--budget-s`` are listed as skipped. ``--out FILE`` writes the
printed Markdown to FILE as well, rewritten after every row, so a run cut short still leaves its rows.
Exit status 0 unless no configuration ran at all. Nothing is downloaded.
"""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import base_parser, load_model, machine, mni_slices, recon_input, setup, sr_input, sync, table

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sr", "sr_thick", "recon")
TARGET_S = 3.0  # the target: seconds per 256x256x160 SR volume on one H100/H200-class GPU
TARGET_GPUS = ("H100", "H200", "H800")
RAY_RESERVE_S = 150.0  # of --budget-s kept for the Ray part when it is asked for


class Report:
    """Markdown printed to stdout and, with ``--out``, mirrored into a file after every change."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.blocks: list[str] = []

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.blocks.append(text)
        self.save()

    def save(self, pending: str = "") -> None:
        """Rewrite the file: what was printed, plus ``pending`` (a table still being filled)."""
        if self.path is None:
            return
        text = "\n\n".join(self.blocks + ([pending] if pending else [])) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)


def log(text: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(text, file=sys.stderr, flush=True)


def error_cell(exc: BaseException) -> str:
    """An exception as one short Markdown-safe table cell."""
    text = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return "error: " + (text[:157] + "..." if len(text) > 160 else text)


def mni_volume(size: int, count: int) -> np.ndarray:
    """MNI152 T1 on a ``size`` x ``size`` x ``count`` grid: every axial slice of the brain-covering range
    resampled in-plane (``common.mni_slices``), then linearly interpolated to ``count`` slices, so that
    neighbouring slices are continuous (through-plane SR needs a real third axis). float32."""
    n_src = 133  # slices 28..160 of the template's 189: the range common.mni_slices draws from
    src = mni_slices(size, n_src)
    pos = np.linspace(0, n_src - 1, count)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_src - 1)
    frac = (pos - lo).astype(np.float32)
    return np.ascontiguousarray(src[..., lo] * (1 - frac) + src[..., hi] * frac, dtype=np.float32)


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


class Case:
    """One task's input, reference and enhancement call (model loaded once)."""

    def __init__(self, task: str, hr: np.ndarray, model_dir: str | None, device: str,
                 steps: int | None) -> None:
        self.task = task
        self.model = load_model(task, model_dir, device)
        self.steps = steps
        if task == "sr":
            self.data, self.ref = sr_input(hr)
            self.input_shape = self.data.shape
        elif task == "sr_thick":
            from medidiff.io import Volume
            from medidiff.physics.simulate import simulate_sr

            iso = Volume(hr, np.eye(4), {"description": "benchmark"})
            self.data, ref_vol = simulate_sr(iso, self.model.recipe.task.factor, axis="through")
            self.ref = ref_vol.array
            self.input_shape = self.data.shape
        else:
            self.data, self.ref = recon_input(hr)
            self.input_shape = tuple(self.data.kspace.shape)  # (S, H, W) k-space
        self.output_shape = tuple(self.ref.shape)

    def describe(self) -> str:
        what = "k-space" if self.task == "recon" else "input"
        return f"{self.task}: {what} {fmt_shape(self.input_shape)} -> {fmt_shape(self.output_shape)}"

    def run(self, batch: int, precision: str):
        from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

        if self.task == "recon":
            return enhance_kspace(self.data, model=self.model, batch_slices=batch, precision=precision,
                                  steps=self.steps, seed=0)
        return enhance_volume(self.data, task=self.task, model=self.model, batch_slices=batch,
                              precision=precision, steps=self.steps, seed=0)


def measure(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any, float | None]:
    """(median seconds of ``repeats`` timed runs after one untimed warm-up, last result, peak GPU MiB)."""
    import torch

    cuda = device.startswith("cuda")
    result = fn()  # warm-up
    sync(device)
    times, peak = [], None
    for _ in range(max(1, repeats)):
        del result
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if cuda:
            peak = max(peak or 0.0, torch.cuda.max_memory_allocated() / 2**20)
    return statistics.median(times), result, peak


def free_device(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def part_volumes(args, cases: dict[str, Case | BaseException], batches: list[int], precisions: list[str],
                 report: Report, deadline: float) -> list[dict[str, Any]]:
    """Part 1: one row per task, precision and batch; returns the rows as records."""
    from medidiff.metrics import psnr
    from medidiff.models.runtime import has_native_bf16

    header = ["task", "input -> output", "precision", "batch", "s / volume", "volumes / s", "peak GPU MiB",
              "PSNR dB", "classical PSNR dB", "gate w", "note"]
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    title = (f"Part 1: one volume at a time (enhance_volume / enhance_kspace, gate on, default steps), "
             f"device {args.device}, warm-up excluded, median of {args.repeats}")
    native_bf16 = has_native_bf16(args.device)
    for task, case in cases.items():
        if not isinstance(case, Case):
            rows.append([task, "-", "-", "-", "-", "-", "-", "-", "-", "-", error_cell(case)])
            report.save(title + "\n\n" + table(header, rows))
            continue
        shapes = f"{fmt_shape(case.input_shape)} -> {fmt_shape(case.output_shape)}"
        for precision in precisions:
            note = "bf16 emulated (no native bf16 here)" if precision == "bf16" and not native_bf16 else ""
            for batch in batches:
                rec: dict[str, Any] = {"task": task, "precision": precision, "batch": batch, "ok": False}
                if time.perf_counter() > deadline:
                    rows.append([task, shapes, precision, batch, "-", "-", "-", "-", "-", "-",
                                 f"skipped: --budget-s {args.budget_s:g} s reached"])
                    records.append(rec)
                    report.save(title + "\n\n" + table(header, rows))
                    continue
                log(f"[part 1] {task} {precision} batch {batch} ...")
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message="bf16 asked for", category=RuntimeWarning)
                        seconds, res, peak = measure(lambda c=case, b=batch, p=precision: c.run(b, p),
                                                     args.device, args.repeats)
                    out = res.enhanced.array
                    gain = psnr(case.ref, out)
                    base = psnr(case.ref, res.baseline.array)
                    weight = float(res.metrics.get("residual_weight", float("nan")))
                    rec.update(ok=True, seconds=seconds, peak=peak, psnr=gain, weight=weight)
                    rows.append([task, shapes, precision, batch, f"{seconds:.3f}", f"{1 / seconds:.3f}",
                                 f"{peak:.0f}" if peak is not None else "-", f"{gain:.2f}", f"{base:.2f}",
                                 f"{weight:.2f}", note])
                    log(f"[part 1] {task} {precision} batch {batch}: {seconds:.3f} s, PSNR {gain:.2f} dB")
                    del res, out
                except Exception as exc:  # noqa: BLE001 - one failed configuration is a row, the run goes on
                    log(f"[part 1] {task} {precision} batch {batch} failed:\n{traceback.format_exc()}")
                    rows.append([task, shapes, precision, batch, "-", "-", "-", "-", "-", "-",
                                 error_cell(exc)])
                free_device(args.device)
                records.append(rec)
                report.save(title + "\n\n" + table(header, rows))
    report.add(title + "\n\n" + table(header, rows))
    return records


def part_ray(args, sr_case: Case, report: Report, deadline: float) -> bool:
    """Part 2: the batch path with the Ray engine on ``--ray-scans`` sr volumes; True when scans were done."""
    import tempfile

    header = ["engine", "device", "precision", "Ray GPUs", "actors", "scans", "done", "failed", "wall s",
              "scans / min", "s / scan (wall)", "median s / scan (actor)", "note"]
    n = args.ray_scans if args.ray_scans is not None else (2 if args.quick else 8)
    title = (f"Part 2: batch path, `medidiff enhance --engine ray --task sr --format nifti --device "
             f"{'cuda' if args.device.startswith('cuda') else 'cpu'}` on {n} sr scans of "
             f"{fmt_shape(sr_case.input_shape)} -> {fmt_shape(sr_case.output_shape)} "
             "(wall clock: Ray start, model loading, decoding, writing, tracking included)")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if time.perf_counter() > deadline:
        report.add(title + "\n\n" + table(header, [["ray", device] + ["-"] * 10
                                                    + [f"skipped: --budget-s {args.budget_s:g} s reached"]]))
        return False
    import torch
    from rich.console import Console

    from medidiff.io import write_nifti
    from medidiff.models.runtime import resolve_precision
    from medidiff.pipeline.batch import run_batch
    from medidiff.pipeline.settings import EnhanceSettings

    row: list[Any]
    done = False
    # Ray's workers import medidiff from this checkout, as the driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        console_text = io.StringIO()
        ray = None
        try:
            for i in range(n):
                write_nifti(sr_case.data, inp / f"scan_{i:02d}.nii.gz")
            import ray

            log(f"[part 2] starting Ray and enhancing {n} scans ...")
            t0 = time.perf_counter()
            # as the Ray engine starts a local Ray (it reuses this one and leaves it to us to shut down)
            # (object store capped: only small job records travel through it, and a container's small
            # /dev/shm then does not matter)
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=2**30)
            resources = ray.cluster_resources()
            ray_gpus = int(resources.get("GPU", 0))
            workers = torch.cuda.device_count() if device == "cuda" else None  # one actor per GPU
            actors = workers or (ray_gpus if device == "cuda" and ray_gpus else int(resources.get("CPU", 1)))
            settings = EnhanceSettings(task="sr", fmt="nifti")
            summary = run_batch(inp, out, settings, engine="ray", device=device, num_workers=workers,
                                tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                console=Console(file=console_text, width=120))
            wall = time.perf_counter() - t0
            scans = json.loads((out / "manifest.json").read_text()).get("scans", {})
            done_entries = [e for e in scans.values() if e.get("status") == "done"]
            gates = sorted({str(e.get("gate_decision", "?")) for e in done_entries})
            per_scan = [float(e["seconds"]) for e in done_entries]
            note = f"gate: {', '.join(gates)}" if gates else ""
            if summary.failures:
                note += ("; " if note else "") + "failed: " + "; ".join(
                    f"{k}: {e}" for k, e in summary.failures[:2]).replace("|", "/").replace("\n", " ")[:200]
            if device == "cuda" and not ray_gpus:
                note += ("; " if note else "") + "Ray saw no GPU: the actors ran without a GPU reservation"
            total = summary.done + summary.failed
            precision = f"auto ({resolve_precision('auto', device)})"
            row = ["ray", device, precision, ray_gpus, actors, n, summary.done, summary.failed, f"{wall:.1f}",
                   f"{60 * total / wall:.2f}" if wall > 0 else "-",
                   f"{wall / total:.2f}" if total else "-",
                   f"{statistics.median(per_scan):.2f}" if per_scan else "-", note]
            done = summary.done > 0
            log(f"[part 2] {summary.done} done, {summary.failed} failed in {wall:.1f} s")
        except Exception as exc:  # noqa: BLE001 - the Ray part failing is a row, not a crash
            log(f"[part 2] failed:\n{traceback.format_exc()}\n{console_text.getvalue()[-2000:]}")
            row = ["ray", device] + ["-"] * 10 + [error_cell(exc)]
        finally:
            if ray is not None and ray.is_initialized():
                ray.shutdown()
    report.add(title + "\n\n" + table(header, [row]))
    return done


def summaries(args, cases: dict[str, Any], records: list[dict[str, Any]], report: Report) -> None:
    """One line per task with its best setting, and whether the issue's target is met."""
    import torch

    lines = []
    for task, case in cases.items():
        ok = [r for r in records if r["task"] == task and r["ok"]]
        if not isinstance(case, Case) or not ok:
            lines.append(f"- {task}: no successful run")
            continue
        pool = [r for r in ok if r["precision"] == "bf16"] or ok
        best = min(pool, key=lambda r: r["seconds"])
        gate = " (gate declined: the network ran on the self-check only)" if best["weight"] == 0 else ""
        lines.append(f"- {task}: {best['seconds']:.2f} s per {fmt_shape(case.output_shape)} volume "
                     f"({best['precision']}, batch {best['batch']}){gate}")
    target = f"target (<= {TARGET_S:g} s per 256x256x160 SR volume on one H100/H200-class GPU): "
    sr = cases.get("sr")
    ok_sr = [r for r in records if r["task"] == "sr" and r["ok"]]
    if not isinstance(sr, Case) or not ok_sr:
        target += "not measured (no successful sr run)"
    else:
        best = min(ok_sr, key=lambda r: r["seconds"])
        measured = (f"best {best['seconds']:.2f} s ({best['precision']}, batch {best['batch']}) "
                    f"at {fmt_shape(sr.output_shape)} on {args.device}")
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else ""
        if not args.device.startswith("cuda"):
            target += f"not evaluated: no GPU in this run; {measured}"
        elif sr.output_shape != (256, 256, 160):
            target += f"not evaluated: the volume is not 256x256x160 (--quick?); {measured}"
        elif not any(name in gpu for name in TARGET_GPUS):
            target += f"not evaluated: {gpu} is not an H100/H200-class GPU; {measured}"
        else:
            verdict = "MET" if best["seconds"] <= TARGET_S else "NOT MET"
            target += f"{verdict}: {measured} ({gpu})"
        if best["weight"] == 0:
            target += "; the gate declined on this volume, so the network did not run on every slice"
    report.add("Summary\n\n" + "\n".join(lines) + "\n\n" + target)


def main() -> int:
    """Run both parts, print the tables; exit status 1 only when nothing ran."""
    t_start = time.perf_counter()
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: sr, sr_thick, recon")
    ap.add_argument("--batch-slices", default=None,
                    help="comma-separated slices per batch (default 8,32,64 on CUDA, 8 on CPU)")
    ap.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16, fp32, auto")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration after a warm-up")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--size", type=int, default=None,
                    help="in-plane output size (default 256; --quick: 64 on CPU, 256 on CUDA)")
    ap.add_argument("--slices", type=int, default=None, help="output slices (default 160; --quick: 16)")
    ap.add_argument("--ray", action="store_true", help="also measure the batch path with the Ray engine")
    ap.add_argument("--ray-scans", type=int, default=None, help="scans for --ray (default 8; --quick: 2)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no configuration after this many seconds (default 540)")
    ap.add_argument("--out", default=None, help="also write the printed Markdown to this file")
    args = ap.parse_args()
    setup(args)
    if str(REPO) not in sys.path:  # medidiff from this checkout
        sys.path.insert(0, str(REPO))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if unknown or not tasks:
        raise SystemExit(f"--tasks: choose from {', '.join(TASKS)} (got {args.tasks!r})")
    if any(p not in ("bf16", "fp32", "auto") for p in precisions) or not precisions:
        raise SystemExit(f"--precisions: choose from bf16, fp32, auto (got {args.precisions!r})")
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batch_slices or ("8,32,64" if cuda else "8")).split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batch-slices: positive integers, comma-separated (got {args.batch_slices!r})")
    size = args.size or (256 if cuda or not args.quick else 64)
    slices = args.slices or (16 if args.quick else 160)
    if size % 2 or slices % 4:
        raise SystemExit("--size must be even and --slices a multiple of 4 (SR x2 in-plane, x4 through)")

    report = Report(args.out)
    report.add(f"# bench_gpu\n\nmachine: {machine(args.device)}\n\ncommand: `python benchmarks/bench_gpu.py "
               f"{' '.join(sys.argv[1:])}`")
    log(f"[setup] building the {size}x{size}x{slices} reference volume and the task inputs ...")
    hr = mni_volume(size, slices)
    cases: dict[str, Case | BaseException] = {}
    for task in tasks:
        try:
            cases[task] = Case(task, hr, args.model, args.device, args.steps)
        except Exception as exc:  # noqa: BLE001 - a task that cannot be set up is a row with its error
            log(f"[setup] {task} failed:\n{traceback.format_exc()}")
            cases[task] = exc
    report.add("inputs (MNI152 T1 resampled; degraded with medidiff.physics):\n\n" + "\n".join(
        f"- {c.describe()}" if isinstance(c, Case) else f"- {t}: {error_cell(c)}" for t, c in cases.items()))

    deadline = t_start + args.budget_s - (RAY_RESERVE_S if args.ray else 0.0)
    records = part_volumes(args, cases, batches, precisions, report, deadline)
    ray_done = False
    free_device(args.device)
    if args.ray:
        sr = cases.get("sr")
        if not isinstance(sr, Case):  # the Ray part needs the sr input even when part 1 did not ask for it
            try:
                sr = Case("sr", hr, args.model, args.device, args.steps)
            except Exception as exc:  # noqa: BLE001
                sr = exc
        if isinstance(sr, Case):
            ray_done = part_ray(args, sr, report, t_start + args.budget_s)
        else:
            report.add(f"Part 2: batch path with Ray: {error_cell(sr)}")
    summaries(args, cases, records, report)
    log(f"[done] {time.perf_counter() - t_start:.0f} s" + (f"; Markdown in {args.out}" if args.out else ""))
    return 0 if any(r["ok"] for r in records) or ray_done else 1


if __name__ == "__main__":
    sys.exit(main())
