"""Ulysses sequence parallelism: the token sequence is split over the ranks of a group before
the transformer blocks and gathered after; inside self-attention one all-to-all trades the
token shards for head shards (every rank then attends over the whole sequence with H/N heads)
and a second one trades back. Cross-attention needs no communication: the text keys are whole
on every rank.

A sequence that does not divide by the group size is padded at its end; the padding tokens
are never used as keys, and are dropped when the sequence is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class UlyssesSequenceParallel:
    """One forward's sharding over ``group`` (``size`` ranks, this one ``rank``)."""

    def __init__(self, group, size: int, rank: int):
        # no per-forward state: the sequence's length before padding is an argument where it matters
        self.group, self.size, self.rank = group, size, rank

    # -- token sharding -------------------------------------------------------------------------

    def shard(self, x: torch.Tensor, phasors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, C) and rotary phasors (L, D/2) -> this rank's (B, L_pad/N, C) and (L_pad/N, D/2)."""
        length = x.shape[1]
        padded = -(-length // self.size) * self.size
        if padded != length:
            x = F.pad(x, (0, 0, 0, padded - length))  # zero tokens at the end
            phasors = torch.cat([phasors, phasors.new_ones(padded - length, phasors.shape[1])])  # no rotation
        n = padded // self.size
        return x[:, self.rank * n:(self.rank + 1) * n].contiguous(), phasors[self.rank * n:(self.rank + 1) * n]

    def span(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of a ``length``-token sequence, padding included."""
        n = -(-length // self.size)
        return self.rank * n, (self.rank + 1) * n

    def shard_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A per-token tensor (B, L, ...) -> this rank's (B, L_pad/N, ...), cut as :meth:`shard` cuts x
        (its padding repeats the last token's values: the padding tokens' outputs are dropped)."""
        start, stop = self.span(t.shape[1])
        if stop > t.shape[1]:
            t = torch.cat([t, t[:, -1:].expand(-1, stop - t.shape[1], *t.shape[2:])], dim=1)
        return t[:, start:stop]

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L_pad/N, C) shards of every rank of a ``length``-token sequence -> (B, length, C),
        padding dropped."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :length]

    # -- attention ------------------------------------------------------------------------------

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, local) -> torch.Tensor:
        """Self-attention over a whole ``length``-token sequence from token shards q/k/v (B, n, H, D)
        -> (B, n, H, D). ``local(q, k, v)`` attends on this rank, over every token and H/N heads."""
        q, k, v = (self._tokens_to_heads(t) for t in (q, k, v))  # (B, L_pad, H/N, D)
        out = local(q, k[:, :length], v[:, :length])  # padding is never a key
        return self._heads_to_tokens(out)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def _tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, h, d = t.shape
        # (B, n, H, D) -> (N, B, n, H/N, D): chunk j (heads of group j) goes to rank j
        send = t.reshape(b, n, self.size, h // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = self._all_to_all(send)  # chunk j: rank j's tokens, my heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, self.size * n, h // self.size, d)  # (B, L_pad, H/N, D)

    def _heads_to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        b, length, h, d = t.shape
        n = length // self.size
        # (B, L_pad, H/N, D) -> (N, B, n, H/N, D): chunk j (tokens of rank j) goes to rank j
        send = t.reshape(b, self.size, n, h, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = self._all_to_all(send)  # chunk j: my tokens, heads of group j
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n, self.size * h, d)  # (B, n, H, D)
