"""The one attention entry point every model calls.

Models hand over queries, keys and values in (batch, tokens, heads, head_dim) layout;
this layer chooses the kernel. Parallel schemes (sequence-parallel all-to-all) attach
here from outside, so model files stay free of distributed code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal, unmasked) attention.

    q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)
    """
    # SDPA wants heads before tokens: (B, H, L, D)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
