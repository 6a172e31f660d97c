"""Parallel VAE decode: the overlapping spatial tiles of the single-process tiled decode are
dealt round-robin to the ranks; each rank decodes its own, every tile is then broadcast from
its owner, and every rank blends them exactly as ``WanVAE.decode_tiled`` does in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TileSpreader:
    """A ``map_tiles`` for ``WanVAE.decode_tiled`` over the ranks of ``group`` (None: the world)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, fn, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        mine = {i: fn(tile) for i, tile in enumerate(tiles) if i % self.size == self.rank}
        out = []
        for i, tile in enumerate(tiles):
            owner = i % self.size
            src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            # output shapes differ at the edges: the owner sends the shape first
            # on the tile's device: an NCCL group has no CPU tensors
            shape = torch.tensor(mine[i].shape if owner == self.rank else [0] * tile.dim(), dtype=torch.int64,
                                 device=tile.device)
            dist.broadcast(shape, src=src, group=self.group)
            decoded = mine[i].contiguous() if owner == self.rank else tile.new_empty(shape.tolist())
            dist.broadcast(decoded, src=src, group=self.group)
            out.append(decoded)
        return out
