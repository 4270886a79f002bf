"""The trust panels behind `medidiff evaluate --panel trust|lesions`: calibration of the K-sample spread
against K, the lesion panel and the hallucination flags' precision/recall, for the shipped (or a given) model.

They assemble the pipeline's enhancement with the evaluation panels, which is why they live in the CLI layer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

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
from medidiff.models import LoadedModel
from medidiff.physics.fft import ifft2c_np
from medidiff.pipeline.enhance import enhance_kspace, enhance_volume
from medidiff.tasks import task_operator

__all__ = ["CALIBRATION_FILE", "run_trust_panels"]


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


def run_trust_panels(model: LoadedModel, kind: str, out: Path, *, samples: list[int], coverage: float = 0.9,
                     save_k: int | list[int] | None = None, lesions_only: bool = False, seed: int = 0,
                     command: str = "") -> Path:
    """Write ``out/report.md`` and ``out/numbers.json``; with ``save_k`` also the model's calibrations made
    with those K (the first as the default ``calibration.json``, the others as ``calibration_k<K>.json``)."""
    save_ks = [] if save_k is None else [int(save_k)] if isinstance(save_k, int) else [int(k) for k in save_k]
    out.mkdir(parents=True, exist_ok=True)
    task = model.recipe.task
    sections: list[str] = []
    numbers: dict[str, Any] = {"task": kind, "model": model.name, "calibration": []}
    cost: list[str] = []
    if not lesions_only:
        cal, test = trust_cases(task, seed=seed)
        for k in samples:
            t0 = time.perf_counter()
            target = model.path if k in save_ks else None
            s = calibration_panel(task, _sampled(model, kind, seed), cal, test, k, coverage, out,
                                  model_dir=target, default=bool(save_ks) and k == save_ks[0])
            s["wall_seconds"] = time.perf_counter() - t0
            print(f"{kind} K={k}: coverage {s['coverage']:.3f}, spearman {s['spearman']:.3f}, "
                  f"{s['seconds_per_scan']:.2f} s/scan", file=sys.stderr)
            sections.append(s["markdown"])
            numbers["calibration"].append({key: v for key, v in s.items()
                                           if key not in ("markdown", "calibration", "per_case")})
        cost = ["### Calibration quality vs K (time per scan)", "", "| K | coverage | Spearman | s / scan |",
                "|---|---|---|---|"]
        cost += [f"| {c['samples_k']} | {c['coverage']:.3f} | {c['spearman']:.3f} | "
                 f"{c['seconds_per_scan']:.2f} |" for c in numbers["calibration"]]
    lcases = lesion_cases(task)
    enhance, classical = _image_fns(model, kind, lcases[0][2], seed)
    lesion = lesion_panel(task, enhance, classical, lcases, out, seed)
    enhance_o, classical_o = _image_fns(model, kind, (1.0, 1.0), seed)
    ood = ood_flags_panel(task, enhance_o, classical_o, seed=seed)
    numbers["lesions"] = lesion["summary"]
    numbers["flags"] = {"lesion": lesion["flags"], "ood": {k: v for k, v in ood.items() if k != "rows"}}
    header = [
        f"# medidiff trust panels: {kind} ({model.name})", "", "```", command, "```", "",
        ("Held-out real volumes (medidiff.data.shipped): each multi-slice volume split into a calibration "
         "block and a test block of contiguous slices; dipy_t1_coronal_slice tests, pydicom_MR_small "
         "calibrates. Lesion panel on the dipy T1 slice and the middle dipy b0 slice (all sizes x contrasts "
         "x edges, 8 lesions per copy)."),
        "",
    ]
    text = "\n".join(header + sections + cost + [""] + [lesion["markdown"],
                                                          flags_markdown(kind, lesion["flags"], ood)])
    atomic.write_text(out / "report.md", text)
    atomic.write_text(out / "numbers.json", json.dumps(numbers, indent=2, default=float))
    return out / "report.md"
