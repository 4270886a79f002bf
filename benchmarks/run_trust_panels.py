"""Trust panels for the shipped (or given) models: calibration vs K, lesions, hallucination flags.

One command per task redoes everything, including the model's ``calibration.json`` (needed whenever the
weights change)::

    python benchmarks/run_trust_panels.py --task sr --samples 2 4 8 --save-k 4
    python benchmarks/run_trust_panels.py --task recon --samples 4 --save-k 4

writes ``reports/trust_<task>/report.md`` (tables, reliability diagrams) and, with ``--save-k K``, the
calibration made with K samples into the model folder (``--model DIR``, default the shipped model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medidiff.evaluation.calibration import CALIBRATION_FILE
from medidiff.evaluation.compare import Case
from medidiff.evaluation.trust_panels import (
    calibration_panel,
    flags_markdown,
    lesion_cases,
    lesion_panel,
    ood_flags_panel,
    trust_cases,
)
from medidiff.io import KSpaceData, Volume, atomic
from medidiff.models import default_model, load_model
from medidiff.physics.fft import ifft2c_np
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume
from medidiff.tasks import task_operator


def _sampled(model, kind: str, seed: int):
    """(case, K) -> (enhanced, std, baseline) with the pipeline's enhance, on the reference grid."""

    def run(case: Case, k: int):
        if kind == "sr":
            res = enhance_volume(case.lr, task="sr", model=model, samples=k, seed=seed)
        else:
            res = enhance_kspace(case.kspace, model=model, samples=k, seed=seed)
        std = None if res.uncertainty is None else res.uncertainty.array
        return res.enhanced.array, std, res.baseline.array

    return run


def _image_fns(model, kind: str, spacing_mm=(1.0, 1.0), seed: int = 0):
    """(enhance, classical) on 2D measurements, as the lesion and OOD panels call them (K = 1)."""
    if kind == "sr":
        f = model.recipe.task.factor
        op = task_operator(model.recipe.task)

        def enhance(lr: np.ndarray) -> np.ndarray:
            affine = np.diag([spacing_mm[0] * f, spacing_mm[1] * f, 1.0, 1.0])
            vol = Volume(np.asarray(lr, np.float32)[..., None], affine, {})
            return enhance_volume(vol, task="sr", model=model, seed=seed).enhanced.array[..., 0]

        def classical(lr: np.ndarray) -> np.ndarray:
            return op.pinv(torch.from_numpy(np.asarray(lr, np.float32))[None])[0].numpy()

        return enhance, classical

    def enhance_r(kspace: np.ndarray) -> np.ndarray:
        data = KSpaceData(np.asarray(kspace)[None], None, np.eye(4))
        return enhance_kspace(data, model=model, seed=seed).enhanced.array[..., 0]

    def classical_r(kspace: np.ndarray) -> np.ndarray:
        return np.abs(ifft2c_np(np.asarray(kspace))).astype(np.float32)

    return enhance_r, classical_r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("sr", "recon"), required=True)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model for the task)")
    ap.add_argument("--samples", type=int, nargs="+", default=[4], help="K values (each costs K x the time)")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--save-k", type=int, default=None, help=f"write {CALIBRATION_FILE} made with this K")
    ap.add_argument("--out", default=None, help="report folder (default reports/trust_<task>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model) if args.model else default_model(args.task)
    if args.model is None and args.save_k is not None and model.path is None:
        raise SystemExit("the model has no folder to save the calibration into")
    out = Path(args.out or f"reports/trust_{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    task = model.recipe.task
    cal, test = trust_cases(task, seed=args.seed)
    sections, numbers = [], {"task": args.task, "model": model.name, "calibration": []}
    for k in args.samples:
        t0 = time.perf_counter()
        target = model.path if args.save_k == k else None
        s = calibration_panel(task, _sampled(model, args.task, args.seed), cal, test, k, args.coverage, out,
                              model_dir=target)
        s["wall_seconds"] = time.perf_counter() - t0
        print(f"{args.task} K={k}: coverage {s['coverage']:.3f}, spearman {s['spearman']:.3f}, "
              f"{s['seconds_per_scan']:.2f} s/scan", file=sys.stderr)
        sections.append(s["markdown"])
        numbers["calibration"].append({key: v for key, v in s.items()
                                       if key not in ("markdown", "calibration", "per_case")})
    cost = ["### Calibration quality vs K (time per scan)", "", "| K | coverage | Spearman | s / scan |",
            "|---|---|---|---|"]
    cost += [f"| {c['samples_k']} | {c['coverage']:.3f} | {c['spearman']:.3f} | {c['seconds_per_scan']:.2f} |"
             for c in numbers["calibration"]]
    lcases = lesion_cases(task)
    sp = lcases[0][2]
    enhance, classical = _image_fns(model, args.task, sp, args.seed)
    lesion = lesion_panel(task, enhance, classical, lcases, out, args.seed)
    enhance_o, classical_o = _image_fns(model, args.task, (1.0, 1.0), args.seed)
    ood = ood_flags_panel(task, enhance_o, classical_o, seed=args.seed)
    numbers["lesions"] = lesion["summary"]
    numbers["flags"] = {"lesion": lesion["flags"], "ood": {k: v for k, v in ood.items() if k != "rows"}}
    header = [
        f"# medidiff trust panels: {args.task} ({model.name})",
        "",
        "```",
        f"python benchmarks/run_trust_panels.py --task {args.task} "
        f"--samples {' '.join(map(str, args.samples))}"
        + (f" --save-k {args.save_k}" if args.save_k else ""),
        "```",
        "",
        ("Held-out real volumes (medidiff.data.shipped): each multi-slice volume split into a calibration "
        "block and a test block of contiguous slices; dipy_t1_coronal_slice tests, pydicom_MR_small "
        "calibrates. Lesion panel on the dipy T1 slice and the middle dipy b0 slice (all sizes x contrasts "
        "x edges, 8 lesions per copy)."),
        "",
    ]
    text = "\n".join(header + sections + cost + [""] + [lesion["markdown"],
                                                          flags_markdown(args.task, lesion["flags"], ood)])
    atomic.write_text(out / "report.md", text)
    atomic.write_text(out / "numbers.json", json.dumps(numbers, indent=2, default=float))
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
