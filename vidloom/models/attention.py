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
import math

import torch
import torch.nn.functional as F

_SEQUENCE_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("sequence_parallel", default=None)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Full (non-causal) attention on this process. q: (B, Lq, H, D), k/v: (B, Lk, H, D);
    ``bias``: None, (Lk,) float32 added to every query's scores, or (B, Lk) per row (rows of
    several requests batched together, their keys padded with -inf)."""
    mask = None
    if bias is not None:
        # float32 even for bf16 q on the CPU: the log-weights stay exact. CUDA's fused kernels take a
        # mask only in q's dtype; there log m (< 7 for 512 keys) rounds by at most 1/64 in bf16, a
        # weight within 1.6 % of m, the size of bf16's own rounding of the scores.
        mask = bias.view(1, 1, 1, -1) if bias.ndim == 1 else bias[:, None, None, :]
        if q.device.type != "cpu":
            mask = mask.to(q.dtype)
    # SDPA wants heads before tokens: (B, H, L, D)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, self_attention: bool = False,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D). ``self_attention``: the keys are the
    (possibly sharded) token sequence itself, as opposed to a whole context such as text.
    ``bias``: (Lk,) float32 added to the scores (a context's, see ``collapse_repeated_tail``)."""
    sp = _SEQUENCE_PARALLEL.get()
    if sp is not None and self_attention:
        if bias is not None:
            raise ValueError("a score bias is for a context's keys, not for sequence-parallel self-attention")
        return sp.attention(q, k, v, local_attention)
    return local_attention(q, k, v, bias)


def collapse_repeated_tail(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context tokens (B, L, C) whose last m positions repeat one vector in every row -> the first
    L - m + 1 positions and a score bias (L - m + 1,) float32: 0, and log m on the last position.

    A prompt padded to a fixed length (Wan: 512 text tokens, zeros past the prompt) has this
    form. Attention over the shortened context with the bias equals attention over the whole:
    m equal keys get m equal scores, i.e. one key weighed m times; the values are equal too.
    Keys and values are computed from equal vectors per position, so they stay equal. Returns
    ``(context, None)`` when there is nothing to collapse (m < 2).
    """
    length = context.shape[1]
    same = (context == context[:, -1:]).all(dim=-1)  # (B, L): equal to the row's last vector
    m = int(same.flip(1).long().cumprod(dim=1).sum(dim=1).min()) if length else 0
    if m < 2:
        return context, None
    bias = torch.zeros(length - m + 1, dtype=torch.float32, device=context.device)
    bias[-1] = math.log(m)
    return context[:, : length - m + 1], bias


def shard_sequence(x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L, C) and their rotary phasors (L, D/2) -> this process's share."""
    sp = _SEQUENCE_PARALLEL.get()
    return (x, rope) if sp is None else sp.shard(x, rope)


def shard_tokens(t: torch.Tensor) -> torch.Tensor:
    """Any per-token tensor (B, L, ...) -> this process's share, cut as ``shard_sequence`` cuts the tokens."""
    sp = _SEQUENCE_PARALLEL.get()
    return t if sp is None else sp.shard_tokens(t)


def sequence_span(length: int) -> tuple[int, int]:
    """[start, stop) of this process's share of a ``length``-token sequence (stop may pass ``length``
    by the padding of the last share)."""
    sp = _SEQUENCE_PARALLEL.get()
    return (0, length) if sp is None else sp.span(length)


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
