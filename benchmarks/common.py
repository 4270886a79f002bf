"""Shared pieces of the benchmark scripts: test images, the model, timing, memory, machine description.

Not a test module: the scripts print figures for the README. Test content is the MNI152 T1 template
shipped with nilearn, resampled to the requested grid, degraded with the physics operators.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --device, --quick, --model, --threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="a smaller run that finishes in a couple of minutes")
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model for the task)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap


def setup(args: argparse.Namespace) -> None:
    """Apply --threads and check that --device exists."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")


def machine(device: str = "cpu") -> str:
    """One line naming the hardware and software the numbers came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), python {platform.python_version()}")
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def mni_slices(size: int, count: int, order: int = 1) -> np.ndarray:
    """``count`` axial MNI152 slices resampled to ``size`` x ``size``: float32 ``(size, size, count)``."""
    import nibabel as nib
    import nilearn
    from scipy import ndimage

    path = next((Path(nilearn.__file__).parent / "datasets" / "data").glob(
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    arr = np.asarray(nib.load(path).dataobj, dtype=np.float32)  # (197, 233, 189), 1 mm
    side = max(arr.shape[:2])
    sq = np.zeros((side, side, arr.shape[2]), np.float32)
    o0, o1 = (side - arr.shape[0]) // 2, (side - arr.shape[1]) // 2
    sq[o0:o0 + arr.shape[0], o1:o1 + arr.shape[1]] = arr
    lo, hi = int(arr.shape[2] * 0.15), int(arr.shape[2] * 0.85)  # brain-covering slices
    zs = np.linspace(lo, hi, count)
    zoom = size / side
    out = np.empty((size, size, count), np.float32)
    for i, z in enumerate(zs):
        out[..., i] = np.clip(ndimage.zoom(sq[..., round(z)], zoom, order=order), 0, None)
    return out


def sr_input(hr: np.ndarray, factor: int = 2, slice_mm: float = 3.0):
    """(low-resolution Volume, HR reference array) for in-plane SR: k-space truncation of each slice."""
    import torch

    from medidiff.io.volume import Volume
    from medidiff.physics.operators import KSpaceTruncation

    op = KSpaceTruncation(factor)
    lr = np.empty((hr.shape[0] // factor, hr.shape[1] // factor, hr.shape[2]), np.float32)
    for k0 in range(0, hr.shape[2], 32):  # chunks keep the temporary small
        chunk = torch.from_numpy(np.ascontiguousarray(np.moveaxis(hr[..., k0:k0 + 32], 2, 0)))
        lr[..., k0:k0 + 32] = np.moveaxis(op.A(chunk).numpy(), 0, 2)
    affine = np.diag([float(factor), float(factor), slice_mm, 1.0])
    return Volume(lr, affine, {"description": "benchmark"}), hr


def recon_input(hr: np.ndarray, acceleration: float = 4.0, center_fraction: float = 0.08, seed: int = 0):
    """(single-coil KSpaceData, reference) with an equispaced column mask."""
    from medidiff.io.kspace import KSpaceData
    from medidiff.physics.fft import fft2c_np
    from medidiff.physics.masks import make_mask

    mask = make_mask("equispaced", hr.shape[:2], acceleration, center_fraction, seed)
    ksp = fft2c_np(np.moveaxis(hr, 2, 0)) * mask.full()
    return KSpaceData(ksp.astype(np.complex64), mask.mask, np.diag([1.0, 1.0, 3.0, 1.0])), hr


def load_model(task: str, model: str | None, device: str):
    """The shipped default model for ``task`` or the given folder, on ``device``."""
    from medidiff.models import default_model
    from medidiff.models import load_model as load

    return load(model, device=device) if model else default_model(task, device=device)


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    Returns ``(seconds, last result)``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB), from getrusage."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``.peak_mb`` after ``stop()``."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval, self.peak_mb, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of already-formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
