"""Tensor parallelism: each of ``tp`` ranks holds 1/tp of every attention's heads and of every
feed-forward's hidden units, swapped in by a model transform (``TensorParallel``) from the plan
the model declares (``LoadableModel.tensor_parallel_plan``; the UMT5 text encoder's beside its
loader spec), so the model file keeps calling its plain layers.

- ``ColumnParallelLinear``: output features sharded (q, k, v, the FFN's first layer); no
  communication. Heads are contiguous rows of q/k/v, so rank r holds heads [r H/tp, (r+1) H/tp).
- ``RowParallelLinear``: input features sharded (the attention's output projection, the FFN's
  second layer); the partial products are summed over the group (one all-reduce) and the bias
  added once.
- ``ShardedRMSNorm``: an RMS norm over features that are sharded. Wan normalises q and k over all
  heads together ("rms_norm_across_heads"), so a rank's mean of squares is only part of the sum:
  the squared sums are all-reduced first. A plain RMSNorm over the local shard would run and be
  silently wrong.

Each parameter of a swapped module carries its ``shards`` entry (dim, index, count); the loader
copies only that slice of the stored tensor (``loader.transforms.Fill.shard``): a slice of rows
is one read of its bytes, a slice of columns is read row by row.

Communication per block: two all-reduces of (B, L, dim) (attention output, FFN output), one of
the cross-attention output, and four small ones of (B, L, 1) for the q/k norms.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..loader.transforms import Fill, ModelTransform


@dataclasses.dataclass(frozen=True)
class Shard:
    """Slice ``index`` of ``count`` equal slices of a stored tensor along ``dim``."""

    dim: int
    index: int
    count: int

    def span(self, size: int) -> tuple[int, int]:
        n = size // self.count
        return self.index * n, (self.index + 1) * n


class ColumnParallelLinear(nn.Linear):
    """y[..., shard] = x W[shard]^T + b[shard]: this rank's output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, size: int, rank: int):
        super().__init__(in_features, out_features // size, bias=bias)
        self.shards = {"weight": Shard(0, rank, size), "bias": Shard(0, rank, size)}


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] W[:, shard]^T, then + b: input features sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, size: int, rank: int):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.shards = {"weight": Shard(1, rank, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class ShardedRMSNorm(nn.Module):
    """RMS norm over ``dim`` features of which this rank holds ``dim / size``: the sum of squares
    is all-reduced over the group before the normalisation (in float32)."""

    def __init__(self, dim: int, eps: float | None, group, size: int, rank: int):
        super().__init__()
        self.dim, self.group = dim, group
        self.eps = torch.finfo(torch.float32).eps if eps is None else eps
        self.weight = nn.Parameter(torch.empty(dim // size))
        self.shards = {"weight": Shard(0, rank, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        squares = xf.pow(2).sum(dim=-1, keepdim=True)
        dist.all_reduce(squares, group=self.group)
        normed = (xf * torch.rsqrt(squares / self.dim + self.eps)).to(x.dtype)
        return normed * self.weight


class ShardedEmbedding(nn.Module):
    """An embedding table whose columns (e.g. one per attention head, as T5's relative position
    bias) are sharded: this rank's columns of every row."""

    def __init__(self, num: int, dim: int, group, size: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim // size))
        self.shards = {"weight": Shard(1, rank, size)}

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.weight)


class TensorParallel(ModelTransform):
    """Swap the modules a model's tensor-parallel plan names for their sharded versions.

    The plan (``plan``, or the model class's ``tensor_parallel_plan``): (module-name pattern,
    kind) pairs, fnmatch patterns over ``named_modules`` names; kind "column" / "row" (an
    ``nn.Linear``), "norm" (an ``nn.RMSNorm`` over sharded features), "embedding_columns" (an
    ``nn.Embedding`` with one column per head), or "heads:ATTR[,ATTR]" (a module whose attributes
    ATTR count its heads or head features: each divided by the degree)."""

    def __init__(self, group, size: int, rank: int, plan: tuple[tuple[str, str], ...] | None = None):
        self.group, self.size, self.rank, self.plan = group, size, rank, plan

    def apply(self, model: nn.Module) -> nn.Module:
        plan = self.plan or getattr(type(model), "tensor_parallel_plan", ())
        if not plan:
            raise ValueError(f"{type(model).__name__} declares no tensor_parallel_plan: it cannot run with tp_size > 1")
        for name, module in list(model.named_modules()):
            kind = next((k for pattern, k in plan if fnmatch.fnmatchcase(name, pattern)), None)
            if kind is None:
                continue
            if kind.startswith("heads:"):
                for attr in kind.removeprefix("heads:").split(","):
                    if getattr(module, attr) % self.size:
                        raise ValueError(f"tp_size={self.size} must divide {name}'s {attr}={getattr(module, attr)}")
                    setattr(module, attr, getattr(module, attr) // self.size)
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, self._sharded(kind, module, name))
        return model

    def _sharded(self, kind: str, module: nn.Module, name: str) -> nn.Module:
        args = (self.group, self.size, self.rank)
        if kind in ("column", "row"):
            features = module.out_features if kind == "column" else module.in_features
            if features % self.size:
                raise ValueError(f"tp_size={self.size} must divide {name}'s {features} features")
            cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
            return cls(module.in_features, module.out_features, module.bias is not None, *args)
        if kind == "norm":
            dim = module.normalized_shape[0]
            return ShardedRMSNorm(dim, module.eps, *args)
        if kind == "embedding_columns":
            return ShardedEmbedding(module.num_embeddings, module.embedding_dim, *args)
        raise ValueError(f"tensor_parallel_plan: unknown kind {kind!r} for {name} "
                         "(allowed: column, row, norm, embedding_columns, heads:ATTR)")

    def fill(self, fill: Fill) -> Fill:
        shard = getattr(fill.module, "shards", {}).get(fill.name.rpartition(".")[2])
        return fill if shard is None else dataclasses.replace(fill, shard=shard)

