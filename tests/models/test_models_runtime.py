"""Inference runtime: precision chosen for the hardware, and bf16 output close to eager fp32."""

from __future__ import annotations

import pytest
import torch

from medidiff.models import default_model, runtime
from medidiff.models.runtime import PreparedNetwork, prepare_network, resolve_precision

# bf16 keeps 8 bits of mantissa (relative rounding ~0.4 %). Measured on the shipped sr_x2 network with the
# input below (AMD EPYC, avx512_bf16): max |bf16 - fp32| = 0.65 % of max |fp32|, mean 0.44 % of mean |fp32|.
# Tolerances are relative to the output's own scale (retrained weights do not move them): ~3x and ~2x those.
BF16_MAX_REL = 0.02
BF16_MEAN_REL = 0.01


def _assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    err = (out - ref).abs()
    assert float(err.max()) < BF16_MAX_REL * float(ref.abs().max())
    assert float(err.mean()) < BF16_MEAN_REL * float(ref.abs().mean())
    return err


@pytest.fixture(scope="module")
def sr_net() -> torch.nn.Module:
    return default_model("sr").net


def _fixed_input() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 2, 64, 64, generator=g), torch.tensor([100, 500])


def test_fp32_prepared_equals_eager(sr_net):
    x, t = _fixed_input()
    with torch.no_grad():
        assert torch.equal(prepare_network(sr_net, "fp32")(x, t), sr_net(x, t))


def test_bf16_close_to_fp32_and_really_bf16(sr_net):
    x, t = _fixed_input()
    prepared = prepare_network(sr_net, "bf16")
    with torch.no_grad():
        ref, out = sr_net(x, t), prepared(x, t)
    assert out.dtype == torch.float32  # data consistency downstream stays fp32
    assert all(p.dtype == torch.float32 for p in sr_net.parameters())  # weights untouched
    err = _assert_bf16_close(out, ref)
    if runtime.cpu_has_native_bf16():
        assert float(err.max()) > 0  # autocast did run the convolutions in bf16


def test_prepared_network_looks_like_the_network(sr_net):
    prepared = prepare_network(sr_net, "fp32")
    assert isinstance(prepared, PreparedNetwork) and not prepared.training
    assert next(prepared.parameters()).device == next(sr_net.parameters()).device
    assert prepared.inner is sr_net
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        PreparedNetwork(sr_net, "auto")


def test_resolve_precision_follows_the_hardware(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if runtime.cpu_has_native_bf16() else "fp32")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp16", "cpu")


def test_cpu_flags_agree_with_native_bf16():
    flags = runtime.cpu_flags()
    if flags:
        assert runtime.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_channels_last_bf16_close_and_network_untouched(sr_net):
    x, t = _fixed_input()
    prepared = prepare_network(sr_net, "bf16", channels_last=True)
    assert prepared.inner is not sr_net  # a copy: the shared network keeps its layout
    assert all(p.is_contiguous() for p in sr_net.parameters())
    with torch.no_grad():
        _assert_bf16_close(prepared(x, t), sr_net(x, t))


def test_onnxruntime_network_matches_eager_at_other_shapes(sr_net):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ort_net = runtime.OnnxRuntimeNetwork(sr_net, threads=1)
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 2, 64, 64), (3, 2, 96, 128)]:  # exported once, any batch / size (multiples of 8)
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = sr_net(x, torch.full((shape[0],), 300))
        out = ort_net(x, torch.tensor(300))  # a scalar timestep is broadcast over the batch
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert float((out - ref).abs().max()) < 1e-5  # fp32 on both sides: rounding only (measured 9e-8)


# Fused attention (scaled_dot_product_attention) computes the same function as MONAI's einsum path; on the
# shipped networks in fp32 the largest difference measured was 2.6e-7 for outputs of magnitude ~0.7.
FUSED_MAX_ABS = 1e-5


@pytest.mark.parametrize("task", ["sr", "recon"])
def test_fused_attention_equals_the_einsum_path_in_fp32(task):
    net = default_model(task).net
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, net.conv_in.conv.in_channels, 64, 64, generator=g)
    t = torch.tensor([100, 500])
    fused = prepare_network(net, "fp32", flash_attention=True, channels_last=True)
    assert fused.flash_attention, "the shipped networks have attention blocks to switch"
    with torch.no_grad():
        ref, out = net(x, t), fused(x, t)
    assert float((out - ref).abs().max()) < FUSED_MAX_ABS
    # the caller's network is left on the einsum path (the switch is made on a copy)
    from monai.networks.blocks.selfattention import SABlock

    assert not any(m.use_flash_attention for m in net.modules() if isinstance(m, SABlock))


def test_prepared_network_is_cached_until_the_weights_change():
    net = default_model("sr").net
    import copy

    mine = copy.deepcopy(net)
    first = runtime.cached_prepared_network(mine, "fp32")
    assert runtime.cached_prepared_network(mine, "fp32") is first
    assert runtime.cached_prepared_network(first, "fp32") is first, "a prepared network is used as given"
    x, t = _fixed_input()
    with torch.no_grad():
        before = first(x, t)
        next(mine.parameters()).mul_(0.5)  # weights changed in place: the cached copy is stale
    again = runtime.cached_prepared_network(mine, "fp32")
    assert again is not first
    with torch.no_grad():
        assert not torch.allclose(again(x, t), before)
        assert float((again(x, t) - mine(x, t)).abs().max()) < FUSED_MAX_ABS


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_takes_onnxruntime_only_on_a_cpu_without_native_bf16(monkeypatch, native_bf16):
    """``auto``: bf16 in torch where the CPU has it natively, else ONNX Runtime fp32 (where installed).
    ``fp32`` by name stays in torch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    net = default_model("sr_thick").net
    auto = runtime.cached_prepared_network(net, "auto", "cpu")
    if native_bf16:
        assert isinstance(auto, PreparedNetwork) and auto.precision == "bf16"
    else:
        assert isinstance(auto, runtime.OnnxRuntimeNetwork) and auto.precision == "fp32"
        assert runtime.cached_prepared_network(net, "auto", "cpu") is auto  # exported once per network
    named = runtime.cached_prepared_network(net, "fp32", "cpu")
    assert isinstance(named, PreparedNetwork) and named.precision == "fp32"


def test_enhance_through_onnxruntime_matches_torch_fp32(monkeypatch):
    """The same scan enhanced with the network in ONNX Runtime and in torch fp32: the same image up to
    fp32 rounding (and the gate takes the same decision)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import numpy as np

    from medidiff.io import Volume
    from medidiff.pipeline.enhance import enhance_volume

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    img = (((yy - 24) ** 2 + (xx - 20) ** 2) < 200).astype(np.float32) * 100 + 20
    vol = Volume(np.stack([img + rng.normal(0, 2, img.shape).astype(np.float32) for _ in range(3)], -1),
                 np.eye(4))
    ort = enhance_volume(vol, task="sr", precision="auto", self_check=False)
    ref = enhance_volume(vol, task="sr", precision="fp32", self_check=False)
    err = np.abs(ort.enhanced.array - ref.enhanced.array)
    assert float(err.max()) < 1e-4 * float(np.abs(ref.enhanced.array).max())


def test_a_network_onnx_cannot_take_falls_back_to_torch(monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)

    def refuse(self, net, threads=None):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(runtime.OnnxRuntimeNetwork, "__init__", refuse)
    net = default_model("sr_thick").net
    runtime._PREPARED.pop(net, None)
    with pytest.warns(RuntimeWarning, match="unsupported operator"):
        prepared = runtime.cached_prepared_network(net, "auto", "cpu")
    assert isinstance(prepared, PreparedNetwork) and prepared.precision == "fp32"
