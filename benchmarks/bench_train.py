"""Training step time per recipe: fp32 against bf16 autocast, through the real loss and optimiser.

    python benchmarks/bench_train.py [--recipes sr_x2,sr_thick,recon_4x] [--threads 1] [--steps 8]

Each step is what ``medidiff train`` runs: a batch from the recipe's training sampler (made outside the
timed part, so that only the network's forward, backward and the AdamW update are timed), the diffusion
loss, backward, gradient clipping and the optimiser step, at the recipe's CPU batch size and patch size.
The two precisions are timed in turn (round robin) after one warm-up step each; the table gives medians.
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
    from medidiff.diffusion.process import diffusion_loss, make_scheduler
    from medidiff.models import build_model
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
        data_gen = torch.Generator().manual_seed(0)
        batches = [tuple(x.to(dev) for x in sampler.batch(batch, data_gen)) for _ in range(steps + 1)]
        scheduler = make_scheduler(recipe.diffusion)
        nets, opts, times = {}, {}, {}
        for amp in (False, True):
            torch.manual_seed(0)
            nets[amp] = build_model(recipe).to(dev).train()
            opts[amp] = torch.optim.AdamW(nets[amp].parameters(), lr=recipe.train.lr)
            times[amp] = []
        noise_gen = torch.Generator(device=dev).manual_seed(0)
        for i, (cond, x0) in enumerate(batches):
            for amp in (False, True):
                t0 = time.perf_counter()
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss = diffusion_loss(nets[amp], recipe, scheduler, cond, x0, noise_gen)
                opts[amp].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(nets[amp].parameters(), recipe.train.grad_clip)
                opts[amp].step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step of each is a warm-up
                    times[amp].append(time.perf_counter() - t0)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        params = sum(p.numel() for p in nets[False].parameters())
        size = recipe.data.patch_size
        rows.append([name, f"{params / 1e6:.2f} M", f"{batch} × {size}²", f"{fp32:.3f}", f"{bf16:.3f}",
                     f"{fp32 / bf16:.2f}×"])
        print(" | ".join(rows[-1]), flush=True)
    print("\n### training step time (forward + backward + AdamW), median s / step\n")
    print(table(["recipe", "parameters", "batch", "fp32 s / step", "bf16 autocast s / step",
                 "bf16 speed-up"], rows))


if __name__ == "__main__":
    main()
