"""Writing one scan's outputs under OUT: NIfTI maps and a derived DICOM series, each atomically."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io import atomic
from medidiff.io.dicom_write import write_dicom_series
from medidiff.io.nifti import write_nifti
from medidiff.io.volume import Volume
from medidiff.pipeline.settings import EnhanceSettings, ScanJob, output_paths

MAPS = ("enhanced", "uncertainty", "residual", "baseline")


def clean_volume(vol: Volume, description: str) -> Volume:
    """A copy of ``vol`` with no source metadata (no DICOM header): what goes into NIfTI files."""
    return Volume(np.asarray(vol.array, dtype=np.float32), vol.affine, {"description": description})


def write_outputs(
    job: ScanJob,
    result: Any,
    output_root: Path,
    settings: EnhanceSettings,
    source_volume: Volume | None,
    task: str,
) -> dict[str, str | None]:
    """Write the scan's NIfTI maps and (optionally) its derived DICOM series; returns the paths written.

    ``result`` is an ``EnhanceResult``; ``source_volume`` is the scan as read when it was DICOM (its header
    makes the written series a derived series of the source), else None.
    """
    rel = output_paths(job, settings)
    (output_root / job.out_dir_rel).mkdir(parents=True, exist_ok=True)
    written: dict[str, str | None] = {k: None for k in rel}
    for name in MAPS:
        vol = getattr(result, name)
        if rel[name] is None or vol is None:
            continue
        write_nifti(clean_volume(vol, f"medidiff {task} {name}"), output_root / rel[name])
        written[name] = rel[name]
    if rel["dicom"] is not None:
        target = output_root / rel["dicom"]
        atomic.remove(target)  # a series left by an earlier, unrecorded attempt
        enhanced = result.enhanced if source_volume is not None else clean_volume(result.enhanced, "")
        write_dicom_series(
            enhanced,
            target,
            source=source_volume,
            series_description=f"medidiff {task}",
            derivation_description=f"medidiff {task}: conditional diffusion with data consistency, "
            f"{settings.samples} sample(s), steps={settings.steps or 'default'}",
        )
        written["dicom"] = rel["dicom"]
    return written


def remove_outputs(job: ScanJob, output_root: Path, settings: EnhanceSettings) -> None:
    """Remove whatever a failed attempt wrote for ``job``: a failed scan leaves no partial outputs."""
    for rel in output_paths(job, settings).values():
        if rel:
            with contextlib.suppress(OSError):
                atomic.remove(output_root / rel)
