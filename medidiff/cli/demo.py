"""`medidiff demo`: the README's first command — the real main job end to end on shipped real data.

Simulates degraded scans from held-out shipped images (dipy, nilearn, pydicom) with the same operators the
models use, writes them as a small archive (NIfTI, a thick-slice NIfTI, fastMRI k-space HDF5 and a DICOM
series), runs the batch enhance on it with the shipped default models, writes the HTML report and prints
metrics against the references.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from medidiff.cli.root import app

DEMO_MARK = ".medidiff-demo"
"""File that marks a folder as a demo folder.

Only such a folder's input/, output/, reference/ are ever removed.
"""

DEMO_SEED = 20261126


def _crop_centre(vol: Any, shape: tuple[int, int, int]) -> Any:
    """Central crop of a Volume (affine shifted so world positions are kept)."""
    starts = [max(0, (s - c) // 2) for s, c in zip(vol.shape, shape, strict=False)]
    sl = tuple(slice(st, st + c) for st, c in zip(starts, shape, strict=False))
    affine = vol.affine.copy()
    affine[:3, 3] = vol.affine[:3, :3] @ np.asarray(starts, dtype=float) + vol.affine[:3, 3]
    return vol.with_array(np.ascontiguousarray(vol.array[sl]), affine)


def _named(volumes: list[tuple[str, Any]], fragment: str) -> Any:
    for name, vol in volumes:
        if fragment.lower() in name.lower():
            return vol
    raise LookupError(
        f"shipped evaluation volume matching {fragment!r} not found in {[n for n, _ in volumes]}"
    )


def build_demo_inputs(root: Path, *, seed: int = DEMO_SEED) -> list[dict[str, str]]:
    """Write the degraded demo archive under ``root/input`` and references under ``root/reference``.

    Returns one record per case: its input path (relative to the input folder), its reference NIfTI and
    what was simulated.
    """
    from medidiff.data.shipped import mni_t1, real_evaluation_volumes
    from medidiff.io import Volume, write_dicom_series, write_kspace, write_nifti
    from medidiff.physics.simulate import simulate_recon, simulate_sr

    inp, ref = root / "input", root / "reference"
    cases: list[dict[str, str]] = []
    held_out = real_evaluation_volumes()

    def clean(vol: Volume, description: str) -> Volume:
        return Volume(vol.array, vol.affine, {"description": description, "modality": "MR"})

    # 1. in-plane SR x2 of a real T1 slice (dipy, held out from training)
    t1 = _named(held_out, "t1_coronal")
    lr, hr = simulate_sr(t1, 2, axis="inplane", seed=seed)
    write_nifti(clean(lr, "demo in-plane low-res"), inp / "nifti" / "t1_coronal_lowres.nii.gz")
    write_nifti(clean(hr, "reference"), ref / "t1_coronal.nii.gz")
    cases.append(
        {
            "input": "nifti/t1_coronal_lowres.nii.gz",
            "reference": "t1_coronal.nii.gz",
            "case": "in-plane SR x2 (dipy T1 slice)",
        }
    )

    # 2. thick slices: through-plane x4 of a slab of the MNI152 T1 (1 mm -> 4 mm slices)
    slab = _crop_centre(mni_t1(), (96, 112, 32))
    lr, hr = simulate_sr(slab, 4, axis="through", seed=seed)
    write_nifti(clean(lr, "demo thick slices"), inp / "nifti" / "mni_thick_slices.nii.gz")
    write_nifti(clean(hr, "reference"), ref / "mni_thick_slices.nii.gz")
    cases.append(
        {
            "input": "nifti/mni_thick_slices.nii.gz",
            "reference": "mni_thick_slices.nii.gz",
            "case": "through-plane SR x4 (MNI152 slab)",
        }
    )

    # 3. k-space x4 (equispaced, 8 % centre) of real DWI b0 slices (dipy)
    s0 = _named(held_out, "S0_10slices")
    s0 = s0.with_array(np.ascontiguousarray(s0.array[:, :, 3:7]))
    kspace, hr = simulate_recon(s0, 4, 0.08, "equispaced", 1, seed)
    write_kspace(inp / "kspace" / "s0_accel4.h5", kspace)
    write_nifti(clean(hr, "reference"), ref / "s0_accel4.nii.gz")
    cases.append(
        {
            "input": "kspace/s0_accel4.h5",
            "reference": "s0_accel4.nii.gz",
            "case": "reconstruction, k-space x4 (dipy b0)",
        }
    )

    # 4. a DICOM series: in-plane x2 of pydicom's MR_small, written as a derived series of the source
    mr = _named(held_out, "MR_small")
    lr, hr = simulate_sr(mr, 2, axis="inplane", seed=seed)
    write_dicom_series(
        lr,
        inp / "dicom" / "mr_small_lowres",
        source=mr,
        series_description="demo low-res MR",
        derivation_description="medidiff demo: k-space truncation x2",
    )
    write_nifti(clean(hr, "reference"), ref / "mr_small.nii.gz")
    cases.append(
        {
            "input": "dicom/mr_small_lowres",
            "reference": "mr_small.nii.gz",
            "case": "in-plane SR x2, DICOM (pydicom MR_small)",
        }
    )
    return cases


def demo_metrics(root: Path, cases: list[dict[str, str]], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """PSNR/SSIM of the 'before' (baseline) and the enhanced image against each case's reference."""
    from medidiff.io import read_nifti
    from medidiff.metrics import psnr, ssim

    rows = []
    by_input = {e["input"]: e for e in manifest["scans"].values()}
    for case in cases:
        entry = next(
            (e for rel, e in by_input.items() if rel == case["input"] or rel.startswith(case["input"])), None
        )
        row: dict[str, Any] = {"case": case["case"], "status": entry["status"] if entry else "missing"}
        if entry and entry["status"] == "done":
            reference = read_nifti(root / "reference" / case["reference"]).array
            out = root / "output"
            for label, key in (("before", "baseline"), ("after", "enhanced")):
                arr = read_nifti(out / entry["outputs"][key]).array
                if arr.shape == reference.shape:
                    row[f"psnr_{label}"] = psnr(reference, arr)
                    row[f"ssim_{label}"] = ssim(reference, arr)
            row["task"] = entry["task"]
        elif entry:
            row["error"] = entry.get("error")
        rows.append(row)
    return rows


@app.command(
    "demo",
    help="Run the main job end to end on shipped real data: simulate degraded scans (in-plane SR x2, thick "
    "slices, k-space x4, a DICOM series) into OUT/input, enhance them with the shipped models into "
    "OUT/output, write OUT/output/report.html and print metrics against the references in OUT/reference. "
    "Rerunning resumes (finished scans are skipped); --fresh rebuilds everything.",
)
def demo(
    out: Path = typer.Option(
        Path("demo_out"), "--out", "-o", help="Demo folder (input/, output/, reference/)."
    ),
    samples: int = typer.Option(
        2, "--samples", "-k", min=1, help="Diffusion samples per scan (uncertainty when > 1)."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampling steps (default: the model's)."),
    engine: str = typer.Option("local", "--engine", help="local | ray"),
    fresh: bool = typer.Option(False, "--fresh", help="Rebuild the inputs and redo every scan."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow URI (default: sqlite in OUT)."
    ),
) -> None:
    """Simulate, enhance, report."""
    from medidiff.io import atomic
    from medidiff.pipeline.batch import BatchStopped, BatchUsageError, run_batch
    from medidiff.pipeline.settings import EnhanceSettings
    from medidiff.review.report import preview_strip, write_report

    console = Console(stderr=True)
    out = out.resolve()
    cases_file = out / "reference" / "cases.json"
    if out.exists() and (
        not out.is_dir()
        or (any(out.iterdir()) and not (out / DEMO_MARK).exists() and not cases_file.exists())
    ):
        console.print(
            f"[red]error:[/red] {out}: not a demo folder (it holds other files); choose a new folder"
        )
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).touch()
    if fresh:
        for sub in ("input", "output", "reference"):
            shutil.rmtree(out / sub, ignore_errors=True)
    if not cases_file.exists():
        shutil.rmtree(out / "input", ignore_errors=True)
        with console.status("simulating degraded scans from shipped real data ..."):
            cases = build_demo_inputs(out)
        atomic.write_text(cases_file, json.dumps(cases, indent=1))
    cases = json.loads(cases_file.read_text())
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    settings = EnhanceSettings(samples=samples, steps=steps, seed=0)
    try:
        summary = run_batch(
            out / "input",
            out / "output",
            settings,
            engine=engine,
            tracking_uri=uri,
            console=console,
            report=write_report,
            preview=preview_strip,
        )
    except BatchUsageError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except BatchStopped as stop:
        console.print(str(stop), markup=False)
        raise typer.Exit(stop.exit_code) from None
    manifest = json.loads((out / "output" / "manifest.json").read_text())
    rows = demo_metrics(out, cases, manifest)

    table = Table(title="demo: metrics against the references (before = operator back-projection)")
    for col in ("case", "task", "PSNR before", "PSNR after", "SSIM before", "SSIM after", "status"):
        table.add_column(col)

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "-"

    def fmt4(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for r in rows:
        table.add_row(
            r["case"],
            str(r.get("task", "-")),
            fmt(r.get("psnr_before")),
            fmt(r.get("psnr_after")),
            fmt4(r.get("ssim_before")),
            fmt4(r.get("ssim_after")),
            r["status"] + (f": {r['error']}" if r.get("error") else ""),
        )
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=120)
    stdout.print(table)
    console.print(
        f"inputs:    {out / 'input'}\noutputs:   {out / 'output'}\nreport:    {summary.report}\n"
        f"manifest:  {summary.manifest}\nMLflow:    mlflow ui --backend-store-uri {uri}"
    )
    raise typer.Exit(summary.exit_code)
