"""GeluLinear owns the fused Linear + GELU path: a swapped or wrapped ``proj`` is never bypassed,
whichever path this CPU would choose (both forced here, so both are checked on every machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidloom import cpu
from vidloom.loader.transforms import ModelTransform
from vidloom.loader.weights import load_model
from vidloom.models import layers
from vidloom.models.layers import GeluLinear
from vidloom.models.wan_dit import WanDiT

from ..loader.test_transforms import CountingLinear


class CountFfnInputs(ModelTransform):
    """Wraps the Linear inside every FFN's GeluLinear (``ffn.fc_in.proj``) with a counting one."""

    def __init__(self):
        self.swapped: list[CountingLinear] = []

    def apply(self, model):
        for module in list(model.modules()):
            if isinstance(module, GeluLinear):
                p = module.proj
                module.proj = CountingLinear(p.in_features, p.out_features, bias=p.bias is not None)
                module.proj.calls = 0
                self.swapped.append(module.proj)
        return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Every call of the fused oneDNN kernel, answered by the plain ops (runs on any CPU)."""
    calls = []

    def fake(x, weight, bias):
        calls.append(weight.shape)
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    monkeypatch.setattr(layers, "_fused_linear_gelu", fake)
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_a_plain_proj_takes_the_chosen_path(fused_calls, fused):
    layer = GeluLinear(4, 6).to(torch.bfloat16)
    x = torch.randn(3, 4).to(torch.bfloat16)
    with cpu.forced(fused_linear_gelu=fused), torch.no_grad():
        out = layer(x)
    assert fused_calls == ([(6, 4)] if fused else [])
    assert torch.equal(out, F.gelu(F.linear(x, layer.proj.weight, layer.proj.bias), approximate="tanh"))


@pytest.mark.parametrize("fused", [True, False])
def test_a_wrapped_proj_sees_every_call(tiny_wan_dir, fused_calls, fused):
    counting = CountFfnInputs()
    model = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16, transforms=(counting,))
    plain = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16, transforms=())
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 1, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 7, 16, generator=g)
    with cpu.forced(fused_linear_gelu=fused), torch.no_grad():
        out = model(x.bfloat16(), t, ctx.bfloat16())
        fused_calls.clear()
        ref = plain(x.bfloat16(), t, ctx.bfloat16())
    assert len(counting.swapped) == len(model.blocks)
    assert [layer.calls for layer in counting.swapped] == [1] * len(model.blocks)
    assert len(fused_calls) == (len(model.blocks) if fused else 0)  # the unwrapped model fuses
    assert torch.equal(out, ref)  # same values: the stand-in kernel is the plain ops
