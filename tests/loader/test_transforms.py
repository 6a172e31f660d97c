"""Model transforms: applied between the meta build and the fill, they swap modules and decide
how each checkpoint tensor fills its parameter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from vidloom import cpu
from vidloom.loader.transforms import Fill, InputMajorBf16, ModelTransform, default_transforms
from vidloom.loader.weights import load_model
from vidloom.models.wan_dit import WanDiT


class CountingLinear(torch.nn.Linear):
    """A Linear that counts its calls (the parameter names stay those of the Linear it replaces)."""

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class CountFfnLinears(ModelTransform):
    """Swaps every Linear under a block's FFN for a ``CountingLinear``."""

    def __init__(self):
        self.swapped: list[CountingLinear] = []

    def apply(self, model):
        for name, module in list(model.named_modules()):
            if ".ffn." in f".{name}." and type(module) is torch.nn.Linear:
                parent, _, leaf = name.rpartition(".")
                layer = CountingLinear(module.in_features, module.out_features, bias=module.bias is not None)
                layer.calls = 0
                setattr(model.get_submodule(parent), leaf, layer)
                self.swapped.append(layer)
        return model


class RecordAndNegate(ModelTransform):
    """Sees every checkpoint tensor and fills each parameter with the stored values negated."""

    def __init__(self):
        self.keys: list[str] = []

    def fill(self, fill: Fill) -> Fill:
        self.keys.append(fill.key)
        return dataclasses.replace(fill, convert=torch.neg)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([999, 417]), torch.randn(2, 7, 16, generator=g)


def test_a_swapping_transform_is_applied_at_load_and_called(tiny_wan_dir):
    folder = tiny_wan_dir / "transformer"
    counting = CountFfnLinears()
    swapped = load_model(WanDiT, folder, transforms=(counting,))
    plain = load_model(WanDiT, folder, transforms=())
    layers = len(swapped.blocks)
    assert len(counting.swapped) == 2 * layers  # the FFN's two Linears of every block
    assert all(not p.is_meta for p in swapped.parameters())
    with torch.no_grad():
        a, b = swapped(*_inputs()), plain(*_inputs())
    assert [layer.calls for layer in counting.swapped] == [1] * (2 * layers)
    assert torch.equal(a, b)


@pytest.mark.parametrize("map_weights", [True, False])
def test_a_converting_transform_sees_every_checkpoint_key(tiny_wan_dir, map_weights):
    folder = tiny_wan_dir / "transformer"
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    record = RecordAndNegate()
    model = load_model(WanDiT, folder, transforms=(record,), map_weights=map_weights)
    assert sorted(record.keys) == sorted(stored)
    plain = dict(load_model(WanDiT, folder, transforms=()).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, -plain[name]), name


@pytest.mark.parametrize("amx", [True, False])
def test_the_input_major_layout_is_chosen_by_capability(amx):
    with cpu.forced(input_major_bf16=amx):
        assert [type(t) for t in default_transforms()] == ([InputMajorBf16] if amx else [])


def test_input_major_applies_to_bf16_cpu_linear_weights_only():
    linear, norm = torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)
    cpu_device, bf16 = torch.device("cpu"), torch.bfloat16

    def chosen(module, name="a.weight", dtype=bf16, device=cpu_device):
        return InputMajorBf16().fill(Fill("k", name, module, bf16, dtype, device)).input_major

    assert chosen(linear)
    assert not chosen(linear, name="a.bias")
    assert not chosen(linear, dtype=torch.float32)
    assert not chosen(linear, device=torch.device("meta"))
    assert not chosen(norm)
