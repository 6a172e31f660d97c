"""Quantized weight storage for the transformer blocks: int8 or fp8 (e4m3) with one float32 scale
per output channel, computed in the model's dtype.

``quantize_blocks(model, mode)`` replaces every ``nn.Linear`` inside the model's repeated blocks
(``model.blocks``) with a ``QuantizedLinear`` holding its weight as int8 (symmetric, scale =
max |w| / 127 per row) or float8_e4m3fn (scale = max |w| / 448 per row); the rest of the model
(embeddings, modulation, norms, the output head) stays as it was: what is quantized is the
model's repeated blocks, declared by their place, not by size. Each layer's weight is widened to
the input's dtype when it runs (one layer at a time), so memory holds 1 byte per weight plus the
scales. A weight that was a view of the mapped checkpoint has its pages released once quantized
(``loader.pages``), so the peak of quantizing is the quantized model plus one layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("int8", "fp8")
_RANGE = {"int8": 127.0, "fp8": torch.finfo(torch.float8_e4m3fn).max}
_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class QuantizedLinear(torch.nn.Module):
    """y = x @ (q * scale[:, None])^T + b, q int8 or fp8 (out, in), scale (out,) float32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mode: str):
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.qweight = torch.nn.Parameter(qweight, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def of(cls, linear: torch.nn.Linear, mode: str) -> "QuantizedLinear":
        if mode not in MODES:
            raise ValueError(f"quantize: unknown mode {mode!r} (allowed: {', '.join(MODES)})")
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / _RANGE[mode]
            q = w / scale[:, None]
            q = q.round().clamp(-127, 127).to(torch.int8) if mode == "int8" else q.to(torch.float8_e4m3fn)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.contiguous(), scale, bias, mode)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


def quantize_blocks(model: torch.nn.Module, mode: str) -> int:
    """Quantize every Linear of the model's repeated blocks (the DiT's ``blocks``, a T5 encoder's
    ``encoder.block``) in place, but those whose names end as one of ``model.quantize_keep``;
    returns how many. Mapped weights' pages are handed back as each layer is done."""
    from .loader.pages import mapped, release_pages
    from .loader.stored import block_list
    from .memory.levels import return_memory

    if mode not in MODES:
        raise ValueError(f"quantize: unknown mode {mode!r} (allowed: {', '.join(MODES)})")
    blocks = block_list(model)
    if blocks is None:
        raise ValueError(f"quantize: {type(model).__name__} has no repeated blocks")
    keep = tuple(getattr(model, "quantize_keep", ()))
    storages = getattr(model, "mapped_storages", set())
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear or any(name == k or name.endswith("." + k) for k in keep):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            quantized = QuantizedLinear.of(module, mode)
            # the dtype its activations are in (an unmerged adapter's factors take it, ``lora``)
            quantized.compute_dtype = getattr(model, "compute_dtype", None) or module.weight.dtype
            setattr(parent, child, quantized)
            if storages and mapped(module.weight, storages):
                release_pages(module.weight)
            count += 1
        return_memory(torch.device("cpu"))  # the block's float32 temporaries handed back: they do not pile up
    model.quantized = mode
    return count


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
