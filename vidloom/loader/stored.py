"""Blocks kept in their stored dtype and computed in another, one block at a time.

A bf16 checkpoint computed in float32 (a CPU without fast bf16) is usually widened whole at load:
twice its size in memory (the 5.7 B-parameter UMT5-XXL: 22.8 GB instead of 11.4). Here the
repeated blocks keep their stored dtype (for vidloom's own models, views of the mapped file),
and each block's parameters are widened to the compute dtype for its forward only and dropped
after it: the extra memory is one block's float32 weights. A layer of a block called on its own
(the DiT's cross-attention keys and values, computed once per request) widens its own parameters
the same way. The values computed are those of the widened model: a bf16 value widened is exact.
The rest of the model (embeddings' projections, norms, heads) is small and widened at load; a
token embedding table stays stored and widens only the rows it returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from .transforms import Fill, ModelTransform

NARROW = (torch.bfloat16, torch.float16)


def _own(module: torch.nn.Module, compute: torch.dtype) -> list[tuple[torch.nn.Module, str]]:
    return [(module, name) for name, p in module._parameters.items()
            if p is not None and p.dtype in NARROW and p.dtype != compute]


def _widen(pairs: list[tuple[torch.nn.Module, str]], compute: torch.dtype,
           stored: list[tuple[torch.nn.Module, str, torch.Tensor]]) -> None:
    """Widen each parameter, noting the stored one in ``stored`` first: if a widening fails (out
    of memory), what was widened is still restored after the forward."""
    for owner, name in pairs:
        p = owner._parameters[name]
        if p.dtype != compute:
            stored.append((owner, name, p))
            owner._parameters[name] = torch.nn.Parameter(p.to(compute), requires_grad=False)


def _restore(stored: list[tuple[torch.nn.Module, str, torch.Tensor]]) -> None:
    for owner, name, p in stored:
        owner._parameters[name] = p


class _Widening:
    """The hooks of one module: widen the parameters of the module (``whole``: of it and all its
    submodules) before its forward, put the stored ones back after (also when the forward raises)."""

    def __init__(self, module: torch.nn.Module, compute: torch.dtype, whole: bool):
        # the modules and their parameters are found at each call: a loader fills the parameters
        # after the hooks are set, and a later transform may swap layers (``quant``: a quantized
        # layer replaces a Linear, whose stored weight must then not be kept nor widened)
        self.whole, self.compute, self.stored = whole, compute, []
        module.register_forward_pre_hook(self.before)
        module.register_forward_hook(self.after, always_call=True)

    def before(self, module, args):
        stored = []
        self.stored.append(stored)
        modules = module.modules() if self.whole else (module,)
        _widen([pair for m in modules for pair in _own(m, self.compute)], self.compute, stored)

    def after(self, module, args, output):
        if self.stored:  # (torch calls it also when ``before`` or the forward raised)
            _restore(self.stored.pop())


def compute_blocks_in(blocks: Iterable[torch.nn.Module], compute: torch.dtype) -> None:
    """Each block's stored-dtype parameters computed in ``compute``: widened for the block's
    forward, and for the forward of any of its layers called on its own."""
    for block in blocks:
        _Widening(block, compute, whole=True)
        for layer in block.modules():
            if layer is not block and layer._parameters:
                _Widening(layer, compute, whole=False)


def compute_embeddings_in(model: torch.nn.Module, compute: torch.dtype) -> None:
    """Every ``nn.Embedding`` with a stored-dtype table returns its rows in ``compute``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.dtype in NARROW:
            module.register_forward_hook(lambda m, args, out: out.to(compute))


class StoredBlocks(ModelTransform):
    """For vidloom's models: the parameters of ``model.blocks`` stored in bf16/fp16 stay so (views
    of the mapped file), except those the model keeps in float32 (``keep``); each block computes
    in the model's compute dtype (``compute_blocks_in``)."""

    def __init__(self, compute: torch.dtype, keep: tuple[str, ...] = (), prefix: str = "blocks."):
        self.compute, self.keep, self.prefix = compute, keep, prefix

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        compute_blocks_in(model.blocks, self.compute)
        return model

    def fill(self, fill: Fill) -> Fill:
        if (fill.name.startswith(self.prefix) and fill.stored in NARROW and fill.dtype == self.compute
                and not any(pattern in f".{fill.name}" for pattern in self.keep)):
            return dataclasses.replace(fill, dtype=fill.stored)
        return fill


def keep_transformers_blocks_stored(model: torch.nn.Module, blocks: torch.nn.ModuleList, compute: torch.dtype):
    """A transformers model loaded in its stored dtype: its ``blocks`` computed in ``compute``
    block by block, its token embeddings returning ``compute`` rows, every other parameter
    widened now."""
    in_blocks = {id(p) for p in blocks.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.dtype in NARROW and id(p) not in in_blocks and id(p) not in embeddings:
                    module._parameters[name] = torch.nn.Parameter(p.to(compute), requires_grad=False)
    compute_blocks_in(blocks, compute)
    compute_embeddings_in(model, compute)
    return model


def block_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """A model's repeated blocks: vidloom's DiT's ``blocks``, a T5 encoder's ``encoder.block``."""
    for path in ("blocks", "encoder.block"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    return None


def stream_blocks(model: torch.nn.Module, active) -> None:
    """After each block's forward, while ``active()`` (the memory level streams blocks), the
    pages of its parameters that are views of the model's file mappings are released
    (``loader.pages``); the next use reads them from the file again."""
    from .pages import mapped, release_pages

    storages = getattr(model, "mapped_storages", set())
    blocks = block_list(model)
    if not storages or blocks is None:
        return

    def release(block, args, output):
        if active():
            for p in block.parameters():
                if mapped(p, storages):
                    release_pages(p)

    for block in blocks:
        block.register_forward_hook(release, always_call=True)
