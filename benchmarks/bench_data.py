"""Time the training-image sources: milliseconds per reference image, per source and for the mixture.

Prints a Markdown table (median over repeats of the mean time per image, after a warm-up; loading the
shipped images and volumes is timed once, separately). Usage:
``.venv/bin/python benchmarks/bench_data.py [--size 128] [--count 200] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks.common import machine
from medidiff.data.mixture import DEFAULT_WEIGHTS, TrainingImageSource


def per_image_ms(source: TrainingImageSource, count: int, repeats: int, seed: int) -> tuple[float, float]:
    """Median over ``repeats`` of the mean wall and CPU milliseconds per image over ``count`` draws (CPU time
    is the figure to compare on a machine shared with other processes)."""
    rng = np.random.default_rng(seed)
    for _ in range(5):
        source.sample(rng)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(count):
            source.sample(rng)
        wall.append((time.perf_counter() - t) / count * 1e3)
        cpu.append((time.process_time() - c) / count * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="patch side in pixels")
    ap.add_argument("--count", type=int, default=200, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; size {args.size}²\n")
    print("| source | wall ms per image | CPU ms per image | setup s |")
    print("|---|---|---|---|")
    for name, weights in [
        ("synthetic", {"synthetic": 1.0}),
        ("natural", {"natural": 1.0}),
        ("mri", {"mri": 1.0}),
        ("mixture " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHTS.items()), DEFAULT_WEIGHTS),
    ]:
        t = time.perf_counter()
        source = TrainingImageSource(args.size, weights)
        setup_s = time.perf_counter() - t
        wall, cpu = per_image_ms(source, args.count, args.repeats, seed=0)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {setup_s:.2f} |")


if __name__ == "__main__":
    main()
