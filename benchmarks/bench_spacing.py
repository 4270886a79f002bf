"""Where the sampling steps sit on the chain: leading vs trailing timestep spacing, model alone.

    python benchmarks/bench_spacing.py [--quick] [--tasks sr,sr_thick,recon] [--steps 1,2,4] [--samples 1]

For each task's shipped model, every case of the held-out and out-of-domain evaluation panels
(``medidiff.evaluation.compare.panel_cases``) is enhanced with the do-no-harm gate and per-scan adaptation
off, so the network's own output is measured, at each step count under both spacings (the recipe field
``diffusion.timestep_spacing``). Figures are PSNR gains in dB over the better classical method of the
task (sinc/bicubic, linear/cubic) and, for reconstruction, over the zero-filled image: mean and worst case.
``--quick`` takes the first four cases of each panel.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from common import base_parser, load_model, machine, setup, table


def _classical_psnr(task: str, cases) -> list[float]:
    """Per case, the PSNR of the better of the task's classical methods as ``medidiff evaluate`` runs them
    (reconstruction: zero-filled only)."""
    from medidiff.evaluation.compare import CLASSICAL, _psnr, build_methods

    names = ["zero-filled"] if task == "recon" else list(CLASSICAL[task])
    methods = build_methods(task, cases, names)
    return [max(_psnr(c.reference.array, m.run(c)[0].array) for m in methods) for c in cases]


def main() -> None:
    """Print one table per task."""
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sr,sr_thick,recon")
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--samples", type=int, default=1, help="K samples averaged per case")
    args = ap.parse_args()
    setup(args)

    from medidiff.evaluation.compare import _psnr, panel_cases
    from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

    steps = [int(s) for s in args.steps.split(",")]
    print(machine(args.device))
    print(f"model alone: gate off, adaptation off, K = {args.samples}; dB over "
          "the better classical method (reconstruction: over zero-filled)\n")
    for task in args.tasks.split(","):
        loaded = load_model(task, args.model, args.device)
        shipped = loaded.recipe.diffusion
        rows = []
        for panel in ("heldout", "ood"):
            cases = panel_cases(task, panel)[: 4 if args.quick else None]
            base = _classical_psnr(task, cases)
            for spacing in ("leading", "trailing"):
                recipe = dataclasses.replace(
                    loaded.recipe, diffusion=dataclasses.replace(shipped, timestep_spacing=spacing))
                model = dataclasses.replace(loaded, recipe=recipe)
                for n in steps:
                    gains, t0 = [], time.perf_counter()
                    for c, b in zip(cases, base, strict=True):
                        kw = dict(model=model, steps=n, samples=args.samples, self_check=False, adapt=False)
                        if task == "recon":
                            out = enhance_kspace(c.kspace, **kw)
                        else:
                            out = enhance_volume(c.lr, task=task, **kw)
                        gains.append(_psnr(c.reference.array, out.enhanced.array) - b)
                    mark = " (shipped)" if (spacing, n) == (shipped.timestep_spacing, shipped.steps) else ""
                    rows.append([panel, f"{spacing}{mark}", n, len(cases), f"{np.mean(gains):+.2f}",
                                 f"{np.min(gains):+.2f}", f"{(time.perf_counter() - t0) / len(cases):.2f}"])
        print(f"### {task} ({loaded.name})\n")
        print(table(["panel", "spacing", "steps", "cases", "mean gain (dB)", "worst (dB)", "s / case"], rows))
        print()


if __name__ == "__main__":
    main()
