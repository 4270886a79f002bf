"""`medidiff simulate`: degraded inputs (+ references) from high-quality scans, with the model's operators."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from medidiff.cli.root import app


def _stem(key: str) -> str:
    """A file-name stem from a scan key (relative path, no patient data): extensions dropped, safe chars."""
    name = re.sub(r"\.(nii\.gz|nii|dcm|h5|hdf5)$", "", key, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name or "scan"


@app.command("simulate")
def simulate(
    path: Annotated[Path, typer.Argument(help="A scan file (DICOM, NIfTI) or a folder of scans.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    task: Annotated[
        str, typer.Option("--task", help="'sr' (resolution loss) or 'recon' (undersampled k-space).")
    ],
    factor: Annotated[int, typer.Option("--factor", help="SR: integer resolution factor F.")] = 2,
    axis: Annotated[
        str,
        typer.Option(
            "--axis",
            help="SR: 'inplane' (k-space truncation of the two in-plane axes) or "
            "'through' (thick slices averaging F thin ones along the slice axis).",
        ),
    ] = "inplane",
    acceleration: Annotated[
        float, typer.Option("--acceleration", help="Recon: nominal acceleration R.")
    ] = 4.0,
    center_fraction: Annotated[
        float, typer.Option("--center-fraction", help="Recon: fully sampled central fraction of k-space.")
    ] = 0.08,
    mask: Annotated[
        str, typer.Option("--mask", help="Recon: 'equispaced', 'random' or 'poisson'.")
    ] = "equispaced",
    coils: Annotated[int, typer.Option("--coils", help="Recon: number of (synthetic) receive coils.")] = 1,
    noise: Annotated[
        float, typer.Option("--noise", help="Noise std in image units (default 0: none).")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for masks, coil maps and noise.")] = 0,
) -> None:
    """Make degraded inputs from high-quality scans with the same operators the model uses.

    --task sr writes <stem>_lr.nii.gz (the degraded scan with its coarser affine: in-plane LR voxel i sits at
    HR voxel F*i; through-plane LR slice i is centred on HR slices F*i..F*i+F-1) and <stem>_ref.nii.gz (the
    reference, cropped to a multiple of F). The slice axis is the axis with the largest spacing.

    --task recon writes <stem>_kspace.h5 (fastMRI layout: complex64 kspace (S, [C,] H, W) = centred
    orthonormal FFT of each slice along the slice axis, masked; mask; reference image) and
    <stem>_ref.nii.gz.
    """
    import numpy as np  # noqa: F401
    from rich.progress import Progress

    from medidiff.io import KSpaceData, ScanError, discover, write_kspace, write_nifti
    from medidiff.physics.masks import MASK_KINDS
    from medidiff.physics.simulate import simulate_recon, simulate_sr

    if task not in ("sr", "recon"):
        raise typer.BadParameter(f"--task must be 'sr' or 'recon', got {task!r}")
    if task == "sr" and axis not in ("inplane", "through"):
        raise typer.BadParameter(f"--axis must be 'inplane' or 'through', got {axis!r}")
    if task == "recon" and mask not in MASK_KINDS:
        raise typer.BadParameter(f"--mask must be one of {', '.join(MASK_KINDS)}, got {mask!r}")
    if not path.exists():
        typer.echo(f"error: {path}: path does not exist", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    try:
        sources = list(discover(path))
    except ScanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    failures = 0
    written = 0
    with Progress(transient=True) as progress:
        bar = progress.add_task("simulating", total=len(sources))
        for source in sources:
            progress.advance(bar)
            stem = _stem(source.key or source.path.name)
            if source.kind == "invalid":
                typer.echo(f"skipped {source.path}: {'; '.join(source.problems)}", err=True)
                failures += 1
                continue
            try:
                vol = source.load()
                if isinstance(vol, KSpaceData):
                    typer.echo(
                        f"skipped {source.path}: already k-space; simulate needs an image scan", err=True
                    )
                    continue
                if task == "sr":
                    lr, ref = simulate_sr(vol, factor, axis, seed=seed, noise_sigma=noise)
                    write_nifti(lr, out / f"{stem}_lr.nii.gz")
                    write_nifti(ref, out / f"{stem}_ref.nii.gz")
                    typer.echo(f"{source.path}: {stem}_lr.nii.gz {lr.shape} + {stem}_ref.nii.gz {ref.shape}")
                else:
                    data, ref = simulate_recon(vol, acceleration, center_fraction, mask, coils, seed, noise)
                    write_kspace(out / f"{stem}_kspace.h5", data)
                    write_nifti(ref, out / f"{stem}_ref.nii.gz")
                    typer.echo(
                        f"{source.path}: {stem}_kspace.h5 {data.kspace.shape} "
                        f"(R={data.meta['simulation']['acceleration']:.2f}) + {stem}_ref.nii.gz"
                    )
                written += 1
            except (ScanError, ValueError) as exc:
                typer.echo(f"error: {source.path}: {exc}", err=True)
                failures += 1
    typer.echo(f"{written} scan(s) simulated into {out}" + (f", {failures} failed" if failures else ""))
    if written == 0:
        raise typer.Exit(1)
