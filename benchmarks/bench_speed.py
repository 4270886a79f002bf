"""Speed against sigpy CS in one process: fp32 vs bf16 per slice, graph/layout variants, bf16 quality cost.

    python benchmarks/bench_speed.py [--parts slice,forward,quality,mask] [--threads 2] [--repeats 3]

* slice: per-slice time of ``enhance_volume`` (SR ×2) and ``enhance_kspace`` (recon ×4) at 256² and 512²
  at the models' defaults (steps, gate, foreground), ``--precision fp32`` and ``bf16`` (both with the
  runtime's layout: channels-last, fused attention), bf16 autocast on the network as loaded ("bf16 eager"),
  ONNX Runtime fp32 (``OnnxRuntimeNetwork``, when installed: ``pip install medidiff[onnx]``), and sigpy
  L1-wavelet CS (100 iterations) on the same slice in the same process; the figure to read is enhance / CS.
  A one-slice scan pays the whole per-scan self-check; ``--volume-slices N`` also times a scan of N slices
  at the default precision, per output slice (the self-check amortised over the scan, as in a real study).
* forward: the network's forward alone (batch 8 at 256²): eager fp32, bf16 autocast, channels-last,
  ``torch.compile`` (inductor) and ONNX Runtime (when installed), each as a ratio to eager fp32.
* quality: ΔPSNR bf16 − fp32 per case of the held-out and out-of-domain panels (``medidiff evaluate``'s
  cases), SR and recon.
* mask: share of slices and pixels of the 256×256×160 benchmark volume that ``foreground_mask`` calls air.

Timings are medians of --repeats runs after a warm-up, the variants timed in turn (round robin) so that
load from other processes hits all alike; machines differ 2–3×, so compare ratios. On a shared 2-core
machine use --threads 1: two torch threads on busy cores were up to 10× slower in the same process.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import base_parser, machine, mni_slices, recon_input, setup, sr_input, table


def with_precision(loaded, precision: str):
    """The LoadedModel with its network prepared at ``precision``."""
    from medidiff.models.runtime import prepare_network

    return dataclasses.replace(loaded, net=prepare_network(loaded.net, precision))


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def round_robin(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable.

    Timed in turn, so that load changes on a shared machine hit all alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def part_slice(args) -> None:
    """Per-slice enhance time (fp32, bf16) over CS time on the same slice, SR ×2 and recon ×4."""
    from medidiff.baselines.recon import compressed_sensing
    from medidiff.models import default_model
    from medidiff.models.runtime import (
        OnnxRuntimeNetwork,
        cpu_has_native_bf16,
        prepare_network,
        uses_onnxruntime,
    )
    from medidiff.pipeline.enhance import enhance_kspace

    # fp32 / bf16: what `enhance --precision` runs (channels-last, fused attention); "bf16 eager": the
    # network as loaded, bf16 autocast only (the layout before); ONNX Runtime fp32 when installed.
    # Without native bf16 (emulated, slower than fp32) the bf16 rows are left out and "auto" (ONNX Runtime
    # fp32 there) is timed instead.

    variants = ["fp32", "bf16", "bf16 eager"] if cpu_has_native_bf16() else ["fp32", "auto"]
    if "onnx" in args.variants and _has_onnxruntime():
        variants.append("onnxruntime")
    rows = []
    n_vol = args.volume_slices
    for task in ("sr", "recon"):
        loaded = default_model(task)
        for size in args.sizes:
            hr = mni_slices(size, 3)[..., 1:2]  # the central one of three brain-covering slices
            ksp = recon_input(hr)[0]
            inp = sr_input(hr)[0] if task == "sr" else ksp
            fns = {"cs": lambda k=ksp: compressed_sensing(k, 1e-3, 100)}
            # the network path; reconstruction's default per-scan adaptation is timed apart (below)
            plain = {"adapt": False} if task == "recon" else {}
            for p in variants:
                m, kw = loaded, {"precision": p, **plain}
                if p == "onnxruntime":
                    m, kw = dataclasses.replace(loaded, net=OnnxRuntimeNetwork(loaded.net)), plain
                elif p == "bf16 eager":
                    m, kw = dataclasses.replace(loaded, net=prepare_network(loaded.net, "bf16")), plain
                fns[p] = _enhance_fn(task, m, inp, kw)
            if n_vol > 1:  # the default precision, per slice of a scan of n_vol slices (the gate amortised)
                hr_v = mni_slices(size, n_vol)
                inp_v = sr_input(hr_v)[0] if task == "sr" else recon_input(hr_v)[0]
                fns[f"auto, {n_vol}-slice scan"] = _enhance_fn(task, loaded, inp_v, plain)
                if task == "sr" and loaded.recipe.diffusion.steps > 1:  # the fast option, one step
                    one = _enhance_fn(task, loaded, inp_v, {"steps": 1})
                    fns[f"auto --steps 1, {n_vol}-slice scan"] = one
            sec = round_robin(fns, args.repeats)
            for p in fns:
                if p == "cs":
                    continue
                per_slice = sec[p] / (n_vol if p.endswith("-slice scan") else 1)
                scan = f"{n_vol} slices" if p.endswith("-slice scan") else "1 slice"
                if p.startswith("auto") and uses_onnxruntime("auto", "cpu"):
                    p = p.replace("auto", "auto (ONNX Runtime)", 1)
                label = task + (" (--no-adapt)" if plain else "")
                label += " (--steps 1)" if "--steps 1" in p else ""
                rows.append([label, f"{size}²", scan, p.split(",")[0].replace(" --steps 1", ""),
                             f"{per_slice:.3f}", f"{sec['cs']:.3f}", f"{per_slice / sec['cs']:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
            if task == "recon" and size == min(args.sizes) and n_vol > 1:
                # the default (per-scan adaptation on): one run, it is tens of seconds
                t0 = time.perf_counter()
                enhance_kspace(inp_v, model=loaded, seed=0)
                per_slice = (time.perf_counter() - t0) / n_vol
                rows.append(["recon (default: adaptation)", f"{size}²", f"{n_vol} slices", "auto",
                             f"{per_slice:.3f}", f"{sec['cs']:.3f}", f"{per_slice / sec['cs']:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
    print("\n### enhance (defaults: steps, gate, foreground) per slice vs sigpy CS (100 it) on one slice\n")
    print(table(["task", "slice", "scan", "precision / network", "enhance s / slice", "CS s / slice",
                 "enhance / CS"], rows))


def _enhance_fn(task, model, inp, kw):
    """A callable that enhances ``inp`` with the pipeline at its defaults (plus ``kw``)."""
    from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

    if task == "sr":
        return lambda: enhance_volume(inp, task="sr", model=model, seed=0, **kw)
    return lambda: enhance_kspace(inp, model=model, seed=0, **kw)


def _onnx_session(net, x, t, threads: int):
    """ONNX Runtime session of ``net`` exported at the fixed shapes of (x, t), or the reason it failed."""
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    path = Path(tempfile.mkdtemp()) / "net.onnx"
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x, t), str(path), input_names=["x", "t"], output_names=["y"],
                                  dynamo=dynamo, opset_version=18)
            break
        except Exception as exc:  # noqa: BLE001 - report which exporter failed and go on
            errors.append(f"dynamo={dynamo}: {type(exc).__name__}: {str(exc)[:200]}")
    else:
        return None, "; ".join(errors)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # idle threads must not steal torch's cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess, f"exported with dynamo={dynamo}" + (f" ({errors[0]})" if errors else "")


def part_forward(args) -> None:
    """Network forward alone at 256², batch 8: variants as ratios to eager fp32."""
    import torch

    from medidiff.models import default_model
    from medidiff.models.runtime import prepare_network

    net = default_model("sr").net.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 256, 256, generator=gen)
    t = torch.full((8,), 300, dtype=torch.long)
    with torch.inference_mode():
        ref = net(x, t)
    variants: dict[str, object] = {}
    notes = []

    def eager():
        return net(x, t)

    net_bf16 = prepare_network(net, "bf16")  # what `enhance --precision bf16` runs
    variants["eager fp32"] = eager
    variants["bf16 autocast"] = lambda: net_bf16(x, t)
    import copy

    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants["channels-last fp32"] = lambda: net_cl(x_cl, t)

    net_cl_bf16 = prepare_network(net, "bf16", channels_last=True)  # the default where bf16 is native
    variants["channels-last bf16"] = lambda: net_cl_bf16(x_cl, t)
    if "compile" in args.variants:
        comp = torch.compile(copy.deepcopy(net))

        def compiled():
            return comp(x, t)

        def compiled_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return comp(x, t).float()

        variants["torch.compile fp32"] = compiled
        variants["torch.compile bf16"] = compiled_bf16
    if "onnx" in args.variants:
        sess, note = _onnx_session(copy.deepcopy(net), x, t, torch.get_num_threads())
        notes.append(f"ONNX: {note}")
        if sess is not None:
            feeds = {"x": x.numpy(), "t": t.numpy()}
            variants["ONNX Runtime fp32"] = lambda: torch.from_numpy(sess.run(None, feeds)[0])
    first, outs = {}, {}
    with torch.inference_mode():
        for name, fn in list(variants.items()):
            t0 = time.perf_counter()
            try:
                outs[name] = fn()
                fn()
            except Exception as exc:  # noqa: BLE001 - record the failure, measure the others
                notes.append(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                del variants[name]
                continue
            first[name] = time.perf_counter() - t0
        sec = round_robin(variants, args.repeats, warmup=0)
    rows = []
    for name in variants:
        err = (outs[name].float() - ref).abs()
        rows.append([name, f"{sec[name]:.3f}", f"{sec['eager fp32'] / sec[name]:.2f}x", f"{first[name]:.1f}",
                     f"{err.max():.2e}", f"{err.mean():.2e}"])
    print("\n### network forward, SR x2 U-Net, batch 8 x 256² (CPU)\n")
    print(table(["variant", "s / forward", "speed-up", "first call s", "max |Δ|", "mean |Δ|"], rows))
    for n in notes:
        print(f"- {n}")


def part_quality(args) -> None:
    """ΔPSNR (bf16 − fp32) on every case of the held-out and out-of-domain panels, SR and recon, at the
    models' defaults (what `medidiff evaluate --panel heldout|ood` runs)."""
    from medidiff.evaluation.compare import panel_cases
    from medidiff.metrics import psnr
    from medidiff.models import default_model
    from medidiff.pipeline.enhance import enhance_kspace, enhance_volume

    rows, deltas = [], {}
    for task in ("sr", "recon"):
        loaded = default_model(task)
        for panel in ("heldout", "ood"):
            for case in panel_cases(task, panel):
                out = {}
                for p in ("fp32", "bf16"):
                    t0 = time.perf_counter()
                    if task == "sr":
                        res = enhance_volume(case.lr, task="sr", model=loaded, factor=case.sr_factor, seed=0,
                                             precision=p)
                    else:
                        # the network's arithmetic, not adaptation (which trains in fp32 either way)
                        res = enhance_kspace(case.kspace, model=loaded, seed=0, precision=p, adapt=False)
                    out[p] = (res.enhanced.array, time.perf_counter() - t0)
                ref = case.reference.array
                p32, p16 = psnr(ref, out["fp32"][0]), psnr(ref, out["bf16"][0])
                deltas.setdefault((task, panel), []).append(p16 - p32)
                rows.append([task, panel, case.name, "x".join(map(str, ref.shape)), f"{p32:.3f}",
                             f"{p16:.3f}", f"{p16 - p32:+.3f}", f"{out['fp32'][1] / out['bf16'][1]:.2f}x"])
                print(" | ".join(rows[-1]), flush=True)
    print("\n### bf16 vs fp32 on the held-out and out-of-domain panels (defaults; recon not adapted)\n")
    print(table(["task", "panel", "case", "shape", "PSNR fp32", "PSNR bf16", "ΔPSNR", "speed-up (one run)"],
                rows))
    print()
    for (task, panel), d in deltas.items():
        print(f"- {task} {panel}: {len(d)} cases, mean ΔPSNR {np.mean(d):+.3f} dB, worst {min(d):+.3f} dB, "
              f"largest |Δ| {np.max(np.abs(d)):.3f} dB")


def part_mask(args) -> None:
    """Share of slices / pixels of the benchmark volume outside ``foreground_mask``."""
    from medidiff.physics.foreground import foreground_mask

    hr = mni_slices(256, 160)
    lr, _ = sr_input(hr)
    for name, arr in (("HR 256x256x160", hr), ("SR input 128x128x160", lr.array)):
        stack = np.moveaxis(arr, 2, 0)
        t0 = time.perf_counter()
        mask = foreground_mask(stack)
        sec = time.perf_counter() - t0
        empty = ~mask.any(axis=(1, 2))
        rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1) / mask[0].size if len(rows) else 0.0
        per_slice = []  # bounding box of each slice's mask, as a share of the slice
        for m in mask[~empty]:
            r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            per_slice.append((np.ptp(r) + 1) * (np.ptp(c) + 1) / m.size)
        print(f"- {name}: {empty.sum()}/{len(stack)} slices all air ({empty.mean():.1%}), "
              f"{1 - mask.mean():.1%} of pixels air; volume bounding box {box:.1%} of a slice, per-slice "
              f"boxes {np.sum(per_slice) / len(stack):.1%} of the volume's pixels; mask took {sec:.2f} s")


def main() -> None:
    """Run the requested parts."""
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--parts", default="slice,forward,quality,mask")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--variants", default="compile,onnx", help="optional forward variants")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--volume-slices", type=int, default=16,
                    help="slice part: also time a scan of this many slices (per output slice; 1: skip)")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    setup(args)
    print(f"machine: {machine(args.device)}")
    from medidiff.models.runtime import cpu_has_native_bf16

    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    for part in args.parts.split(","):
        {"slice": part_slice, "forward": part_forward, "quality": part_quality, "mask": part_mask}[part](args)


if __name__ == "__main__":
    main()
