"""Sequence parallelism: the token sequence is split over the N ranks of a group before the
transformer blocks and gathered after. Cross-attention needs no communication: the text keys
are whole on every rank. Self-attention needs every token's keys, in one of two ways or both:

- Ulysses (``UlyssesSequenceParallel``): one all-to-all trades the token shards for head shards
  (every rank then attends over the whole sequence with H/N heads) and a second one trades back.
  Two all-to-alls of q/k/v/out per layer; N must divide the head count.
- Ring (``RingSequenceParallel``): each rank keeps its queries and passes its keys/values around
  the ring of R ranks; each block's partial attention is merged by its log-sum-exp (online
  softmax), exact up to rounding. R - 1 sends of k/v per layer, overlapped with the attention of
  the block in hand; any R works whatever the head count.
- Hybrid (USP): N = U x R, Ulysses over groups of U neighbouring ranks, then the ring over the R
  ranks that hold the same heads. U must divide the head count.

A sequence that does not divide by the group size is padded at its end; the padding tokens
are never used as keys, and are dropped when the sequence is gathered.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


class UlyssesSequenceParallel:
    """One forward's sharding over ``group`` (``size`` ranks, this one ``rank``); self-attention by
    all-to-all over the same group."""

    def __init__(self, group, size: int, rank: int):
        # no per-forward state: the sequence's length before padding is an argument where it matters
        self.group, self.size, self.rank = group, size, rank
        self.ulysses_group, self.ulysses_size = group, size  # the all-to-all's ranks

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
        dist.all_to_all_single(recv, send, group=self.ulysses_group)
        return recv

    def _tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, h, d = t.shape
        u = self.ulysses_size
        # (B, n, H, D) -> (U, B, n, H/U, D): chunk j (heads of group j) goes to rank j
        send = t.reshape(b, n, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = self._all_to_all(send)  # chunk j: rank j's tokens, my heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d)  # (B, U n, H/U, D)

    def _heads_to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        b, length, h, d = t.shape
        u = self.ulysses_size
        n = length // u
        # (B, U n, H/U, D) -> (U, B, n, H/U, D): chunk j (tokens of rank j) goes to rank j
        send = t.reshape(b, u, n, h, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = self._all_to_all(send)  # chunk j: my tokens, heads of group j
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n, u * h, d)  # (B, n, H, D)


class RingSequenceParallel(UlyssesSequenceParallel):
    """Ring attention over ``ring_ranks`` (the global ranks of this rank's ring, in ring order),
    after a Ulysses all-to-all over ``ulysses_group`` (``ulysses_size`` neighbouring ranks; 1:
    none). The token shards of the whole group (``group``, ``size`` = U x R ranks, this one
    ``rank``) are cut as Ulysses cuts them; rank = ring index x U + Ulysses index."""

    def __init__(self, group, size: int, rank: int, ulysses_group, ulysses_size: int, ring_ranks: list[int]):
        super().__init__(group, size, rank)
        self.ulysses_group, self.ulysses_size = ulysses_group, ulysses_size
        self.ring_ranks, self.ring_size = list(ring_ranks), len(ring_ranks)
        self.ring_index = rank // ulysses_size

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, local) -> torch.Tensor:
        """Self-attention over a whole ``length``-token sequence from token shards q/k/v (B, n, H, D)
        -> (B, n, H, D). ``local(q, k, v, return_lse=True)`` attends one block of keys on this rank."""
        if self.ulysses_size > 1:  # this ring member's U shards (contiguous tokens), H/U heads
            q, k, v = (self._tokens_to_heads(t) for t in (q, k, v))
        out = self._ring(q, torch.stack([k, v]), length, local)
        return self._heads_to_tokens(out) if self.ulysses_size > 1 else out

    def _ring(self, q: torch.Tensor, kv: torch.Tensor, length: int, local) -> torch.Tensor:
        """Online softmax over the ring's key/value blocks: block j covers tokens [j m, (j+1) m) of
        the padded sequence; its keys past ``length`` (padding) are cut off before attending."""
        m, r, ring = q.shape[1], self.ring_index, self.ring_size
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)  # (B, m, H)
        for step in range(ring):
            pending = None
            if step < ring - 1:  # the next block travels while this one is attended
                incoming = torch.empty_like(kv)
                pending = dist.batch_isend_irecv([
                    dist.P2POp(dist.isend, kv.contiguous(), self.ring_ranks[(r + 1) % ring]),
                    dist.P2POp(dist.irecv, incoming, self.ring_ranks[(r - 1) % ring]),
                ])
            block = (r - step) % ring  # whose keys are in hand
            valid = min(max(length - block * m, 0), m)
            if valid:
                part, part_lse = local(q, kv[0][:, :valid], kv[1][:, :valid], return_lse=True)
                merged = torch.logaddexp(lse, part_lse)
                out = (out * torch.exp(lse - merged)[..., None]
                       + part.float() * torch.exp(part_lse - merged)[..., None])
                lse = merged
            if pending is not None:
                for request in pending:
                    request.wait()
                kv = incoming
        return out.to(q.dtype)
