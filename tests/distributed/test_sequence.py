"""Ulysses sequence parallelism keeps no per-forward state: what ``shard`` cuts depends on its
arguments only, and the unpadded length is handed to ``gather`` and ``attention`` by the caller."""

from __future__ import annotations

import torch

from vidloom.parallel.sequence import UlyssesSequenceParallel


def test_shard_is_a_pure_cut_of_its_arguments():
    ranks = [UlyssesSequenceParallel(group=None, size=2, rank=r) for r in range(2)]
    before = [dict(vars(sp)) for sp in ranks]
    for length in (27, 36, 5):  # interleaved shapes: odd (padded) and even
        x = torch.randn(1, length, 4)
        phasors = torch.polar(torch.ones(length, 3), torch.randn(length, 3))
        shards = [sp.shard(x, phasors) for sp in ranks]
        joined = torch.cat([s[0] for s in shards], dim=1)
        assert torch.equal(joined[:, :length], x) and not joined[:, length:].any()  # zero padding at the end
        joined = torch.cat([s[1] for s in shards])
        assert torch.equal(joined[:length], phasors) and torch.equal(joined[length:], torch.ones_like(joined[length:]))
        assert [sp.span(length) for sp in ranks] == [(0, -(-length // 2)), (-(-length // 2), 2 * -(-length // 2))]
    assert [dict(vars(sp)) for sp in ranks] == before  # nothing recorded between calls

