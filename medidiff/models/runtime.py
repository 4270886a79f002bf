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

    def __init__(self, net: torch.nn.Module, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (resolve 'auto' first), got {precision!r}")
        if channels_last:  # a copy: Module.to changes the module in place, and callers may share it
            net = copy.deepcopy(net).to(memory_format=torch.channels_last)
        self.inner = net
        self.precision = precision
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self.inner(x, *args, **kwargs)
        else:
            out = self.inner(x, *args, **kwargs)
        return out.float()


def prepare_network(net: torch.nn.Module, precision: str = "auto", device: str | torch.device | None = None,
                    channels_last: bool = False) -> PreparedNetwork:
    """The network ready for inference at ``precision`` (``auto``/``fp32``/``bf16``), in eval mode.

    ``channels_last`` runs a channels-last copy of the network: with bf16 on the shipped U-Nets it was a
    further 1.1–1.3× on an AVX-512-BF16 CPU (benchmarks/bench_speed.py). ``torch.compile`` (inductor) is
    not offered: it took 140 s to compile and was no faster than eager in the same measurements. For an
    fp32-only CPU, :class:`OnnxRuntimeNetwork` is the faster path.
    """
    if device is None:
        device = next(net.parameters()).device
    return PreparedNetwork(net, resolve_precision(precision, device), channels_last).eval()


class OnnxRuntimeNetwork(torch.nn.Module):
    """``net`` exported to ONNX (batch, height and width free) and run by ONNX Runtime on the CPU, fp32.

    ``inner`` keeps the torch module so that device queries and ``state_dict`` behave as for the network.
    Needs the optional ``onnxruntime`` and ``onnx`` packages.
    """

    def __init__(self, net: torch.nn.Module, threads: int | None = None) -> None:
        super().__init__()
        import io

        import onnxruntime as ort

        self.inner = net.eval()
        in_channels = int(getattr(net, "in_channels", 1))
        x, t = torch.zeros(1, in_channels, 64, 64), torch.zeros(1, dtype=torch.long)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(net, (x, t), buf, input_names=["x", "t"], output_names=["y"], dynamo=False,
                              opset_version=18, dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                                              "t": {0: "batch"},
                                                              "y": {0: "batch", 2: "height", 3: "width"}})
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
