"""The one attention entry point every model calls.

Models hand over queries, keys and values in (batch, tokens, heads, head_dim) layout;
this layer chooses the kernel. Parallel schemes attach here from outside, so model files
stay free of distributed code: while a sequence-parallel context is active (set by the
pipeline around a forward, ``sequence_parallel``), ``shard_sequence`` / ``gather_sequence``
split and join the token sequence and self-attention runs through its all-to-all; with none
active they are identities.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

_SEQUENCE_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("sequence_parallel", default=None)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal, unmasked) attention on this process. q: (B, Lq, H, D), k/v: (B, Lk, H, D)."""
    # SDPA wants heads before tokens: (B, H, L, D)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, self_attention: bool = False) -> torch.Tensor:
    """q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D). ``self_attention``: the keys are the
    (possibly sharded) token sequence itself, as opposed to a whole context such as text."""
    sp = _SEQUENCE_PARALLEL.get()
    if sp is not None and self_attention:
        return sp.attention(q, k, v, local_attention)
    return local_attention(q, k, v)


def shard_sequence(x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L, C) and their rotary phasors (L, D/2) -> this process's share."""
    sp = _SEQUENCE_PARALLEL.get()
    return (x, rope) if sp is None else sp.shard(x, rope)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """This process's share of the tokens -> the whole sequence (B, L, C)."""
    sp = _SEQUENCE_PARALLEL.get()
    return x if sp is None else sp.gather(x)


@contextlib.contextmanager
def sequence_parallel(sp):
    """Make ``sp`` (e.g. ``parallel.sequence.UlyssesSequenceParallel``, or None) active inside the block."""
    token = _SEQUENCE_PARALLEL.set(sp)
    try:
        yield sp
    finally:
        _SEQUENCE_PARALLEL.reset(token)
