"""CPU fast paths: decided once in ``vidloom.cpu``; each fast path's fallback is forced and checked
on every machine, and the fast path itself where the CPU has it."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from vidloom import cpu
from vidloom.config import EngineConfig
from vidloom.models.layers import linear_gelu_tanh


def test_detection_agrees_with_torch_and_the_flags():
    found = cpu.detect()
    assert found.isa == torch.backends.cpu.get_cpu_capability()
    assert found.bf16_native == bool({"avx512_bf16", "amx_bf16"} & found.flags)
    assert found.input_major_bf16 == ("amx_bf16" in found.flags)
    # oneDNN's bf16 primitives are what the fused GELU needs; the two answers must agree
    assert found.fused_linear_gelu <= bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert found.model and found.describe().startswith(found.isa)


def test_forced_overrides_only_inside_the_block_and_this_thread():
    before = cpu.features()
    seen_elsewhere = []
    with cpu.forced(winograd_fp32=not before.winograd_fp32, bf16_native=False) as inside:
        assert inside == cpu.features()
        assert cpu.features().winograd_fp32 != before.winograd_fp32 and not cpu.features().bf16_native
        thread = threading.Thread(target=lambda: seen_elsewhere.append(cpu.features()))
        thread.start()
        thread.join()
    assert seen_elsewhere == [before]
    assert cpu.features() == before


def test_forced_rejects_unknown_features():
    with pytest.raises(ValueError, match="unknown CPU feature"):
        with cpu.forced(avx9000=True):
            pass


def _linear_case(dtype):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 40).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 24, generator=g) * 0.2)
        linear.bias.copy_(torch.randn(40, generator=g) * 0.1)
    return linear, torch.randn(3, 5, 24, generator=g).to(dtype)


def test_linear_gelu_fallback_is_the_plain_ops_on_every_cpu():
    linear, x = _linear_case(torch.bfloat16)
    with cpu.forced(fused_linear_gelu=False), torch.no_grad():
        out = linear_gelu_tanh(x, linear)
        plain = F.gelu(linear(x), approximate="tanh")
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)


@pytest.mark.skipif(not cpu.detect().fused_linear_gelu,
                    reason="this CPU's oneDNN has no bf16 primitives (no AVX-512): fused GELU not taken")
def test_linear_gelu_fused_matches_the_plain_ops():
    linear, x = _linear_case(torch.bfloat16)
    with torch.no_grad():
        fused = linear_gelu_tanh(x, linear)
        with cpu.forced(fused_linear_gelu=False):
            plain = linear_gelu_tanh(x, linear)
        exact = F.gelu(F.linear(x.float(), linear.weight.float(), linear.bias.float()), approximate="tanh")
    # both round to bf16 once or twice: each within bf16 rounding of the fp32 result
    for out in (fused, plain):
        assert ((out.float() - exact).norm() / exact.norm()).item() <= 1e-2


@pytest.mark.parametrize("native", [True, False])
def test_default_dit_dtype_follows_bf16_support(native):
    with cpu.forced(bf16_native=native):
        dtypes = EngineConfig().resolved_dtypes()
    assert dtypes["transformer"] == (torch.bfloat16 if native else torch.float32)
    assert dtypes["vae"] == torch.float32
