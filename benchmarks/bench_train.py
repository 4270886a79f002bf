"""Training step time per recipe: fp32 against bf16 autocast, through the real loss and optimiser.

    python benchmarks/bench_train.py [--recipes sr_x2,sr_thick,recon_4x] [--threads 1] [--steps 8]

Each timed step is ``medidiff train``'s own (``medidiff.diffusion.train._train_step``): a batch from the
recipe's training sampler (made on the fly, as in training), the diffusion loss, backward, gradient
clipping, the AdamW update and the EMA update, at the recipe's CPU batch size and patch size. The two
precisions are timed in turn (round robin) after one warm-up step each; the table gives medians.
bf16 pays only where the CPU multiplies bf16 natively (AVX-512 BF16 / AMX); ``medidiff train`` uses it
there when ``train.amp`` is true, and fp32 elsewhere.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import base_parser, machine, setup, table

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="sr_x2,sr_thick,recon_4x", help="recipes in pipelines/ (names)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per precision")
    args = ap.parse_args()
    setup(args)

    import torch

    from medidiff.data.pairs import training_sampler
    from medidiff.diffusion.process import make_scheduler
    from medidiff.diffusion.train import _set_up, _train_step
    from medidiff.models.runtime import has_native_bf16
    from medidiff.recipe import load_recipe

    steps = 3 if args.quick else args.steps
    print(machine(args.device))
    print(f"native bf16 on {args.device}: {has_native_bf16(args.device)}\n")
    rows = []
    for name in args.recipes.split(","):
        recipe = load_recipe(PIPELINES / f"{name}.yaml")
        dev = torch.device(args.device)
        batch = recipe.train.batch_size_gpu if dev.type == "cuda" else recipe.train.batch_size
        sampler, _, _ = training_sampler(recipe)
        scheduler = make_scheduler(recipe.diffusion)
        states = {amp: _set_up(recipe, dev, 0, None, False) for amp in (False, True)}  # same seeds
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(steps + 1):
            for amp, state in states.items():
                t0 = time.perf_counter()
                _train_step(state, state.net, recipe, scheduler, sampler, batch, dev, amp)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step of each is a warm-up
                    times[amp].append(time.perf_counter() - t0)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        params = sum(p.numel() for p in states[False].net.parameters())
        size = recipe.data.patch_size
        rows.append([name, f"{params / 1e6:.2f} M", f"{batch} × {size}²", f"{fp32:.3f}", f"{bf16:.3f}",
                     f"{fp32 / bf16:.2f}×"])
        print(" | ".join(rows[-1]), flush=True)
    print("\n### training step time (batch, forward, backward, AdamW, EMA), median s / step\n")
    print(table(["recipe", "parameters", "batch", "fp32 s / step", "bf16 autocast s / step",
                 "bf16 speed-up"], rows))


if __name__ == "__main__":
    main()
