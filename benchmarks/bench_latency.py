"""Per-slice latency against the number of sampling steps, at 256² and 512², and sigpy CS on the same slice.

    python benchmarks/bench_latency.py [--quick] [--device cuda] [--sizes 256,512] [--steps default,1,2,4,10]

SR: one low-resolution slice (size/2)² → size² through ``enhance_volume``. Recon: one ×4 equispaced
(8 % centre) single-coil slice through ``enhance_kspace``; compressed sensing (sigpy L1-wavelet,
100 iterations) on the same k-space for comparison. Times are medians of --repeats runs after a warm-up,
model loading excluded.
"""

from __future__ import annotations

from common import (
    base_parser,
    load_model,
    machine,
    mni_slices,
    recon_input,
    setup,
    sr_input,
    table,
    time_call,
)


def main() -> None:
    """Print the latency tables."""
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512", help="output slice sizes (square)")
    ap.add_argument("--steps", default="default,1,2,4,10",
                    help="step counts; 'default' = the model's setting")
    ap.add_argument("--tasks", default="sr,recon", help="sr, recon or both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cs-iters", type=int, default=100)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = "default,4", 1
    setup(args)
    from medidiff.baselines.recon import compressed_sensing
    from medidiff.metrics import psnr
    from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

    sizes = [int(s) for s in args.sizes.split(",")]
    steps = [None if s == "default" else int(s) for s in args.steps.split(",")]
    print(f"machine: {machine(args.device)}")
    for task in args.tasks.split(","):
        model = load_model(task, args.model, args.device)
        rows = []
        for size in sizes:
            hr = mni_slices(size, 1)
            if task == "sr":
                inp, ref = sr_input(hr)
            else:
                inp, ref = recon_input(hr)
            for s in steps:
                if task == "sr":
                    def fn(s=s, inp=inp, m=model):
                        return enhance_volume(inp, task="sr", model=m, steps=s, seed=0)
                else:
                    def fn(s=s, inp=inp, m=model):
                        return enhance_kspace(inp, model=m, steps=s, seed=0)
                sec, res = time_call(fn, args.device, repeats=args.repeats)
                nfe = res.metrics.get("network_evals", float("nan"))
                rows.append([f"{size}²", "default" if s is None else s, f"{nfe:.0f}", f"{sec:.3f}",
                             f"{psnr(ref, res.enhanced.array):.2f}"])
            if task == "recon":
                sec, cs = time_call(lambda inp=inp: compressed_sensing(inp, 1e-3, args.cs_iters), "cpu",
                                    repeats=args.repeats)
                rows.append([f"{size}²", f"CS ({args.cs_iters} it, CPU)", "–", f"{sec:.3f}",
                             f"{psnr(ref, cs.array):.2f}"])
        print(f"\n### {task}: seconds per slice ({args.device})\n")
        print(table(["slice", "steps", "NFE", "s / slice", "PSNR (dB)"], rows))


if __name__ == "__main__":
    main()
