"""CFG parallelism: the two ranks of a CFG group compute one branch each (rank 0 the
conditional, rank 1 the unconditional) and exchange their predictions, so that every rank
combines the same two tensors and takes the same scheduler step."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CFGParallel:
    def __init__(self, group, rank: int):
        self.group, self.rank = group, rank

    @property
    def branch(self) -> str:
        """The CFG branch this rank computes ("cond" / "uncond", as ``rows`` takes them)."""
        return "cond" if self.rank == 0 else "uncond"

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of the [conditional; unconditional] text batch."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def exchange(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's prediction -> (conditional, unconditional), the same on both ranks."""
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=self.group)
        return parts[0], parts[1]

    def summed(self, counts: dict[str, float]) -> dict[str, float]:
        """Per-process counts -> their sums over the group, the same on both ranks."""
        parts = [None, None]
        dist.all_gather_object(parts, counts, group=self.group)
        names = sorted(set(parts[0]) | set(parts[1]))
        return {name: parts[0].get(name, 0) + parts[1].get(name, 0) for name in names}
