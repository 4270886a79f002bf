"""Material for the notebooks when a store or folder is empty: short example runs, example scans, inputs.

Each function makes what is missing with the ``medidiff`` command itself (or from shipped data), so a
notebook runs top to bottom on a fresh checkout; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import nilearn
import numpy as np

from medidiff.io import atomic
from medidiff.models import default_model
from medidiff.review.charts import latest_run_id
from medidiff.review.command import run_medidiff
from medidiff.review.project import workspace
from medidiff.review.recipes import recipe_path
from medidiff.tracking import resolve_uri


def find_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The model folder that ``medidiff train --out folder`` wrote, or None.

    ``model/``; else the newest checkpoint.
    """
    found = [cfg.parent for cfg in Path(folder).rglob("config.json") if any(cfg.parent.glob("*.safetensors"))]
    if not found:
        return None
    return max(
        found, key=lambda p: (p.name == "model", max(f.stat().st_mtime for f in p.glob("*.safetensors")))
    )


def shipped_model_available(task: str = "sr") -> bool:
    """True when the package ships a default diffusion model for ``task``."""
    try:
        default_model(task)
    except Exception:  # noqa: BLE001 - missing weights or module: not available
        return False
    return True


def ensure_example_runs(
    tracking_uri: str | None = None, *, workdir: str | os.PathLike[str] | None = None,
    recipe: str = "pipelines/smoke.yaml", train_steps: int | None = None, eval_steps: str = "2,4",
    eval_scans: int = 1, eval_methods: str = "sinc,bicubic,medidiff", model: str | None = None,
) -> dict[str, Any]:
    """Make sure the store holds a finished training run and evaluate run, making short ones if it does not.

    Training runs ``medidiff train --config RECIPE``; evaluation runs
    ``medidiff evaluate --data shipped --task sr`` on ``eval_scans`` held-out scans with the shipped model
    (or the model just trained when none is shipped).
    Returns what was found or made: ``{"uri", "train_run", "evaluate_run", "made": [...]}``.
    """
    uri = resolve_uri(tracking_uri)
    workdir = Path(workdir).resolve() if workdir is not None else workspace("compare_runs")
    made: list[str] = []
    train_run = latest_run_id("train", uri)
    if train_run is None:
        args = ["train", "--config", str(recipe_path(recipe)), "--out", str(workdir / "train"),
                "--tracking-uri", uri]
        if train_steps is not None:
            args += ["--max-steps", str(train_steps)]
        run_medidiff(args)
        train_run = latest_run_id("train", uri)
        made.append("train")
    evaluate_run = latest_run_id("evaluate", uri)
    if evaluate_run is None:
        if model is None and not shipped_model_available("sr"):
            trained = find_checkpoint(workdir / "train")
            model = str(trained) if trained else None
        args = ["evaluate", "--data", "shipped", "--task", "sr", "--methods", eval_methods,
                "--steps", eval_steps, "--max-scans", str(eval_scans), "--out", str(workdir / "evaluate"),
                "--tracking-uri", uri]
        if model:
            args += ["--model", model]
        run_medidiff(args)
        evaluate_run = latest_run_id("evaluate", uri)
        made.append("evaluate")
    return {"uri": uri, "train_run": train_run, "evaluate_run": evaluate_run, "made": made}


def example_scan_folder(folder: str | os.PathLike[str], n_scans: int = 3, slices: int = 12) -> Path:
    """A small folder of high-quality NIfTI scans made from shipped data (slabs of nilearn's MNI152 T1).

    Stands in for "your data" in the training notebook; nothing is downloaded. Existing files are kept.
    """
    source = (Path(nilearn.__file__).parent / "datasets" / "data"
              / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.load(str(source))
    depth = image.shape[2]
    starts = np.linspace(depth * 0.3, depth * 0.65, n_scans).astype(int)
    for number, start in enumerate(starts, 1):
        path = folder / f"mni_slab_{number:02d}.nii.gz"
        if path.exists():
            continue
        slab = image.slicer[18:178, 20:212, int(start):int(start) + slices]  # 160 x 192 in-plane, affine kept
        data = np.asarray(slab.get_fdata(dtype=np.float32), dtype=np.float32)
        out = nib.Nifti1Image(data, slab.affine)
        out.set_qform(slab.affine, code=1)
        out.set_sform(slab.affine, code=1)
        out.header.set_xyzt_units("mm", "sec")
        with atomic.atomic_file(path) as tmp:
            nib.save(out, str(tmp))
    return folder


def stage_inputs(
    simulated: str | os.PathLike[str], dst: str | os.PathLike[str], *, limit: int | None = 1,
    suffixes: Sequence[str] = ("_lr.nii.gz", "_kspace.h5"),
) -> Path:
    """Copy degraded inputs from a `medidiff simulate` folder into ``dst`` for enhancing.

    Their references are not copied.
    """
    simulated, dst = Path(simulated), Path(dst)
    inputs = sorted(p for p in simulated.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not inputs:
        raise FileNotFoundError(f"{simulated}: no degraded inputs ({', '.join(suffixes)}) found")
    dst.mkdir(parents=True, exist_ok=True)
    for path in inputs[:limit]:
        target = dst / path.name
        if not target.exists():
            shutil.copy2(path, target)
    return dst
