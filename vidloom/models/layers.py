"""Layers and pure functions shared by model families."""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F

from .. import cpu


def sinusoidal_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosine half first.

    t: (N,) -> (N, dim) float32
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def rope_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies of a 1-D rotary embedding over ``dim`` channels (dim/2 of them), float64."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) by the angles whose unit phasors ``freqs`` holds.

    x: (B, L, H, D); freqs: (L, D/2) complex64. Computed in float32 (one complex multiply),
    returned in x's dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, D/2) complex
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


class Positions(typing.NamedTuple):
    """Where the tokens sit: the rotary ``phasors`` (L, D/2) complex64 of this process's tokens (see
    ``apply_rotary``) and the ``grid`` of the whole token sequence, e.g. (frames, rows, columns)
    after patching, which self-attention receives as its layout."""

    phasors: torch.Tensor
    grid: tuple[int, ...]


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32 (the result stays float32)."""
    return F.layer_norm(
        x.float(),
        x.shape[-1:],
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )


def linear_gelu_tanh(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """gelu_tanh(linear(x)). For bf16 on a CPU whose oneDNN runs bf16 primitives
    (``cpu.features().fused_linear_gelu``), one oneDNN matmul with the GELU fused as a post-op:
    the separate bf16 tanh-GELU pass cost ~9% of a Wan step (measured), the fused one almost
    nothing. Elsewhere the plain two ops. ``linear`` must be a plain ``nn.Linear`` (its weight and
    bias are all it computes): a model calls this through ``GeluLinear``. Under ``torch.compile``
    the plain ops (inductor fuses the GELU itself; it lowers the oneDNN op only for frozen
    weights, and ``cpu.features()`` would break the graph)."""
    if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.bfloat16 == linear.weight.dtype
            and cpu.features().fused_linear_gelu):
        return _fused_linear_gelu(x, linear.weight, linear.bias)
    return F.gelu(linear(x), approximate="tanh")


def _fused_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


class GeluLinear(torch.nn.Module):
    """gelu_tanh(proj(x)): a Linear and its tanh-GELU as one module, which owns the fused fast
    path (``linear_gelu_tanh``). ``proj`` is named as in diffusers' ``GELU.proj``. The fused path
    reads ``proj``'s weight directly, so it is taken only while ``proj`` is a plain ``nn.Linear``:
    a swapped or wrapped ``proj`` (quantized, adapter, tensor-parallel) is always called, with the
    GELU after it."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.proj) is torch.nn.Linear:
            return linear_gelu_tanh(x, self.proj)
        return F.gelu(self.proj(x), approximate="tanh")
