"""How a network runs at inference: precision (fp32 / bf16 autocast) chosen for the hardware, and layout.

bf16 pays only where the hardware multiplies bf16 natively (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
``bf16``, CUDA compute capability ≥ 8); elsewhere it is emulated and slower than fp32. Only the network
runs in bf16: :class:`PreparedNetwork` returns float32, so data consistency and the FFT-based
operators stay in fp32.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 BF16, x86 AMX, Arm BF16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``); empty where it is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):  # x86 / Arm
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware, so bf16 autocast is faster than fp32."""
    if cpu_flags() & _BF16_CPU_FLAGS:
        return True
    try:  # oneDNN's own check, where /proc/cpuinfo is missing (macOS, Windows)
        return not cpu_flags() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` (``cpu`` or ``cuda[:n]``) runs bf16 natively."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` → ``bf16`` where ``device`` has native bf16, else ``fp32``; ``fp32``/``bf16`` are kept.

    Asking for ``bf16`` on hardware without native support still works (emulated) but is slower than
    fp32, so it warns instead of failing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    native = has_native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(
            f"bf16 asked for on {torch.device(device)}, which has no native bf16: it is emulated and "
            "slower than fp32 (use --precision fp32 or auto)",
            RuntimeWarning,
            stacklevel=2,
        )
    return precision


class PreparedNetwork(torch.nn.Module):
    """``net`` with its forward under bf16 autocast (when asked) and a float32 output.

    ``inner`` is the original module (a channels-last copy of it with ``channels_last``); its parameters
    stay fp32, so ``next(parameters()).device`` and ``state_dict`` (keys under ``inner.``) behave as before.
    """

    def __init__(self, net: torch.nn.Module, precision: str = "fp32", channels_last: bool = False,
                 flash_attention: bool = False) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (resolve 'auto' first), got {precision!r}")
        if isinstance(net, PreparedNetwork):  # prepare the original, not a wrapper (no nested autocast)
            net = net.inner
        if channels_last or flash_attention:  # a copy: Module.to changes the module in place, and callers
            net = copy.deepcopy(net)  # may share it
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.inner = net
        self.precision = precision
        self.channels_last = channels_last
        self.flash_attention = flash_attention and enable_fused_attention(net) > 0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self.inner(x, *args, **kwargs)
        else:
            out = self.inner(x, *args, **kwargs)
        return out.float()


def enable_fused_attention(net: torch.nn.Module) -> int:
    """Switch MONAI's self-attention blocks in ``net`` to ``scaled_dot_product_attention`` (in place).

    Same weights and the same function (fp32 outputs within 3e-7 of the einsum path on the shipped
    networks), but the attention matrix is never materialised: 1.3x faster for the whole network at 512² on
    the 2-core CPU, and less memory. Blocks that save attention maps or use relative positions keep the
    einsum path. Returns how many blocks were switched.
    """
    from monai.networks.blocks.selfattention import SABlock

    n = 0
    for m in net.modules():
        if isinstance(m, SABlock) and not getattr(m, "save_attn", False) \
                and getattr(m, "rel_positional_embedding", None) is None:
            m.use_flash_attention = True
            n += 1
    return n


def prepare_network(net: torch.nn.Module, precision: str = "auto", device: str | torch.device | None = None,
                    channels_last: bool = False, flash_attention: bool = False) -> PreparedNetwork:
    """The network ready for inference at ``precision`` (``auto``/``fp32``/``bf16``), in eval mode.

    ``channels_last`` runs a channels-last copy of the network: with bf16 on the shipped U-Nets it was a
    further 1.1–1.3× on an AVX-512-BF16 CPU (benchmarks/bench_speed.py). ``flash_attention`` runs the
    attention blocks through ``scaled_dot_product_attention`` (:func:`enable_fused_attention`).
    ``torch.compile`` (inductor) is not offered: it took 140 s to compile and was no faster than eager in the
    same measurements. On a CPU without native bf16, :class:`OnnxRuntimeNetwork` is the faster path
    (:func:`cached_prepared_network` takes it for ``auto``).
    """
    if device is None:
        device = next(net.parameters()).device
    return PreparedNetwork(net, resolve_precision(precision, device), channels_last, flash_attention).eval()


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_signature(net: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (storage and version counter)."""
    return tuple((p.data_ptr(), p._version) for p in net.parameters())


@functools.lru_cache(maxsize=1)
def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's packages import (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def uses_onnxruntime(precision: str, device: str | torch.device) -> bool:
    """``auto`` on a CPU without native bf16 runs the network in ONNX Runtime (fp32) where it is installed:
    on the 2-core AVX2 machine of the README's speed section, 1.3x torch fp32 per 256² SR slice end to end
    and no gain at 512² (benchmarks/bench_speed.py), outputs within 1e-5 of torch fp32. ``fp32`` asked for
    by name stays in torch, the reference."""
    return (precision == "auto" and torch.device(device).type == "cpu" and not cpu_has_native_bf16()
            and onnxruntime_available())


def cached_prepared_network(net: torch.nn.Module, precision: str = "auto",
                            device: str | torch.device | None = None) -> PreparedNetwork | OnnxRuntimeNetwork:
    """The network ready for inference, made once per network and reused while its weights are unchanged:
    a batch enhancing many scans with one model pays the copy, layout conversion or export once, not per
    scan. bf16 or fp32 in torch (:func:`prepare_network` with channels-last and fused attention), or ONNX
    Runtime where :func:`uses_onnxruntime`. A network that is already prepared (:class:`PreparedNetwork`,
    :class:`OnnxRuntimeNetwork`) is used as given."""
    if isinstance(net, (PreparedNetwork, OnnxRuntimeNetwork)):
        return net
    if device is None:
        device = next(net.parameters()).device
    resolved = resolve_precision(precision, device)
    ort = uses_onnxruntime(precision, device)
    key = ("onnxruntime" if ort else resolved, str(torch.device(device)))
    sig = _weights_signature(net)
    per_net = _PREPARED.setdefault(net, {})
    hit = per_net.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    prepared = None
    if ort:
        try:
            prepared = OnnxRuntimeNetwork(net)
        except Exception as exc:  # an exporter or runtime that cannot take this network: torch runs it
            warnings.warn(f"ONNX Runtime could not run the network ({type(exc).__name__}: {exc}); "
                          "running it in torch fp32", RuntimeWarning, stacklevel=2)
    if prepared is None:
        prepared = prepare_network(net, resolved, device=device, channels_last=True, flash_attention=True)
    per_net[key] = (sig, prepared)
    return prepared


class OnnxRuntimeNetwork(torch.nn.Module):
    """``net`` exported to ONNX (batch, height and width free) and run by ONNX Runtime on the CPU, fp32.

    ``inner`` keeps the torch module so that device queries and ``state_dict`` behave as for the network.
    Needs the ``onnxruntime`` and ``onnx`` packages. ``threads`` (default: torch's thread count when the
    network is prepared) are ONNX Runtime's own intra-op threads.
    """

    precision = "fp32"

    def __init__(self, net: torch.nn.Module, threads: int | None = None) -> None:
        super().__init__()
        import io

        import onnxruntime as ort

        self.inner = net  # the exported graph is the eval-mode network; the module itself is left as given
        was_training = net.training
        net.eval()
        in_channels = int(getattr(net, "in_channels", 1))
        x, t = torch.zeros(1, in_channels, 64, 64), torch.zeros(1, dtype=torch.long)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(net, (x, t), buf, input_names=["x", "t"], output_names=["y"], dynamo=False,
                              opset_version=18, dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                                              "t": {0: "batch"},
                                                              "y": {0: "batch", 2: "height", 3: "width"}})
        net.train(was_training)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # idle threads yield the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).to(torch.long)
        feeds = {"x": x.detach().float().cpu().contiguous().numpy(), "t": t.cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0]).to(x.device)
