"""A whole volume end to end (SR ×2 in-plane): wall time, slices per second, and peak memory.

    python benchmarks/bench_volume.py [--quick] [--device cuda]                      # 256×256×160
    python benchmarks/bench_volume.py --shape 512,512,300 --no-psnr [--quick]          # memory, streamed

``--shape`` is the output (high-resolution) grid; the input is its k-space-truncated ×2 version. The
volume goes through ``enhance_volume`` in slice batches (``--batch-slices``, default: the pipeline's).
Peak memory is the process's peak resident set size (getrusage) and a 20 Hz psutil sample of RSS during
enhancement; "before" is the RSS with the model and the input loaded. With --no-psnr the reference is
freed before enhancing so that only what a user's process holds is counted.
"""

from __future__ import annotations

import gc
import time

from common import (
    RssSampler,
    base_parser,
    load_model,
    machine,
    mni_slices,
    peak_rss_mb,
    setup,
    sr_input,
    sync,
)


def main() -> None:
    """Print one line of figures for the volume."""
    import argparse

    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256,256,160", help="output grid H,W,S")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--batch-slices", type=int, default=None, help="slices per network batch")
    ap.add_argument("--psnr", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the reference and report PSNR against it (and sinc's)")
    args = ap.parse_args()
    setup(args)
    h, w, s = (int(v) for v in args.shape.split(","))
    if h != w:
        raise SystemExit("--shape needs square slices (H == W)")
    if args.quick:
        s = min(s, 16 if h <= 256 else 12)
    import psutil
    import torch

    from medidiff.metrics import psnr
    from medidiff.pipeline.enhance import enhance_volume

    print(f"machine: {machine(args.device)}")
    model = load_model("sr", args.model, args.device)
    lr, hr = sr_input(mni_slices(h, s))
    if not args.psnr:
        del hr
        hr = None
    gc.collect()
    before = psutil.Process().memory_info().rss / 2**20
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    done = {"n": 0}

    def progress(n_done: int, total: int) -> None:
        done["n"] = n_done

    with RssSampler() as sampler:
        t0 = time.perf_counter()
        res = enhance_volume(lr, task="sr", model=model, steps=args.steps, seed=0,
                             batch_slices=args.batch_slices, progress=progress)
        sync(args.device)
        seconds = time.perf_counter() - t0
    out_shape = res.enhanced.shape
    print(f"volume {lr.shape} -> {out_shape}: {seconds:.1f} s total, {seconds / s:.3f} s / slice, "
          f"{s / seconds:.2f} slices / s, NFE {res.metrics.get('network_evals', float('nan')):.0f}, "
          f"steps {args.steps or 'default'}, batch_slices {args.batch_slices or 'default'}")
    print(f"memory: RSS before {before:.0f} MiB, sampled peak {sampler.peak_mb:.0f} MiB, "
          f"getrusage peak {peak_rss_mb():.0f} MiB (limit target 3072 MiB for 512x512x300)")
    if args.device.startswith("cuda"):
        print(f"GPU: peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if hr is not None:
        from medidiff.baselines.interpolation import upsample_volume

        sinc = upsample_volume(lr, 2, (0, 1), "sinc")
        print(f"PSNR: medidiff {psnr(hr, res.enhanced.array):.2f} dB, sinc {psnr(hr, sinc.array):.2f} dB")


if __name__ == "__main__":
    main()
