"""bf16 autocast and int8 dynamic quantisation against fp32: speed and PSNR change (SR ×2 at 256²).

    python benchmarks/bench_precision.py [--quick] [--device cuda] [--size 256] [--slices 4]

The self-check (do-no-harm blend) is switched off here so that the whole network output reaches the
image and its numerical change is visible; timings are per slice of the enhanced volume.

* bf16: the network's forward runs under ``torch.autocast(dtype=torch.bfloat16)``; its output is cast
  back to float32, so data consistency and the FFT-based operators stay in fp32.
* int8: ``torch.ao.quantization.quantize_dynamic`` on the network (CPU only). Dynamic quantisation has
  kernels for ``nn.Linear`` (and RNNs) only: **convolutions are left in fp32**. In a DiffusionModelUNet
  the Linear layers are the time-embedding MLP, the per-block time projections and the attention
  projections, a small share of the compute; the script prints how many layers and parameters were
  actually quantised so the speed figure can be read for what it is.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

from common import base_parser, load_model, machine, mni_slices, setup, sr_input, table, time_call


def autocast_net(net, device_type: str):
    """``net`` wrapped so that its forward runs under bf16 autocast and returns float32."""
    import torch

    class AutocastNet(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                out = self.inner(*args, **kwargs)
            return out.float()

    return AutocastNet(net).eval()


def quantise_int8(net):
    """Dynamic int8 copy of ``net`` (Linear layers); returns (model, quantised layers, convs, param share)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from torch.ao.quantization import quantize_dynamic

    linear_params = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        q = quantize_dynamic(copy.deepcopy(net).cpu(), {torch.nn.Linear, torch.nn.Conv2d}, dtype=torch.qint8)
    n_q = sum(1 for m in q.modules() if isinstance(m, QLinear))
    n_conv = sum(1 for m in q.modules() if isinstance(m, torch.nn.Conv2d))
    return q.eval(), n_q, n_conv, linear_params / max(total, 1)


def main() -> None:
    """Print the precision table."""
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.slices, args.repeats = 2, 1
    setup(args)
    from medidiff.metrics import psnr
    from medidiff.pipeline.enhance import enhance_volume

    print(f"machine: {machine(args.device)}")
    model = load_model("sr", args.model, args.device)
    lr, hr = sr_input(mni_slices(args.size, args.slices))
    dev_type = "cuda" if args.device.startswith("cuda") else "cpu"
    variants = {
        "fp32": model,
        "bf16 autocast": dataclasses.replace(model, net=autocast_net(model.net, dev_type)),
    }
    notes = []
    if dev_type == "cpu":
        q, n_q, n_conv, share = quantise_int8(model.net)
        variants["int8 dynamic"] = dataclasses.replace(model, net=q)
        notes.append(f"int8 dynamic: {n_q} Linear layers quantised ({share:.1%} of parameters); "
                     f"{n_conv} Conv2d layers left in fp32 (no dynamic-quantisation kernel for convolutions)")
    else:
        notes.append("int8 dynamic quantisation runs on CPU only (torch.ao); skipped on the GPU")
    rows, ref_out, ref_sec = [], None, None
    for name, m in variants.items():
        sec, res = time_call(lambda m=m: enhance_volume(lr, task="sr", model=m, steps=args.steps, seed=0,
                                                        self_check=False),
                             args.device, repeats=args.repeats)
        out = res.enhanced.array
        if ref_out is None:
            ref_out, ref_sec = out, sec
        p = psnr(hr, out)
        rows.append([name, f"{sec / args.slices:.3f}", f"{ref_sec / sec:.2f}x", f"{p:.2f}",
                     f"{p - psnr(hr, ref_out):+.3f}", f"{abs(out - ref_out).max() / hr.max():.2e}"])
    print(f"\n### SR x2, {args.slices} slices of {args.size}², "
          f"steps {args.steps or 'default'} ({args.device})\n")
    print(table(["variant", "s / slice", "speed-up", "PSNR (dB)", "ΔPSNR vs fp32", "max |Δ| / max"], rows))
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
