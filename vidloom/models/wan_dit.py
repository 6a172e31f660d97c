"""The Wan diffusion transformer (Wan2.1 / Wan2.2, text- and image-conditioned).

Latent video (B, C, F, H, W) is cut into 3-D patches, each patch a token. Every block does
self-attention with 3-D rotary positions, cross-attention to the text tokens (and, in the
image-to-video models, a second cross-attention to the image encoder's tokens, summed with the
first) and a GELU feed-forward; the timestep modulates each block through six shift/scale/gate vectors
(adaLN). Norms and modulation run in float32 whatever the weight dtype, as the reference
model does, so bf16 weights only change the matmuls.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, collapse_repeated_tail, gather_sequence, sequence_span, shard_sequence, shard_tokens
from .base import ArchConfig, LoadableModel, require_range
from .layers import (GeluLinear, Positions, apply_rotary, layer_norm_fp32, rope_frequencies,
                     sinusoidal_timestep_embedding)


# Sane maxima of the architecture (the largest Wan models use 40 layers, 40 x 128 heads, ffn 13824):
# a backstop, so a corrupt config fails at once instead of building modules for minutes.
MAX_PATCH = 16
MAX_WIDTH = 32768
LIMITS = {
    "num_attention_heads": 1024, "attention_head_dim": 2048, "in_channels": 4096, "out_channels": 4096,
    "text_dim": 32768, "freq_dim": 32768, "ffn_dim": 262144, "num_layers": 512, "rope_max_seq_len": 65536,
}


@dataclasses.dataclass(frozen=True)
class WanDiTConfig(ArchConfig):
    """Keys of the Diffusers ``transformer/config.json`` of ``WanTransformer3DModel``."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1 or max(self.patch_size) > MAX_PATCH:
            raise ValueError(f"patch_size: expected three ints in 1..{MAX_PATCH}, got {list(self.patch_size)}")
        for name, high in LIMITS.items():
            require_range(self, name, 1, high)
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim: rotary embedding needs an even head dim, got {self.attention_head_dim}")
        if self.dim > MAX_WIDTH:
            raise ValueError(f"num_attention_heads x attention_head_dim: the width must be at most {MAX_WIDTH}, "
                             f"got {self.dim}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps: must be in (0, 1), got {self.eps}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm: only 'rms_norm_across_heads' is supported, got {self.qk_norm!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim/added_kv_proj_dim: an image-conditioned transformer needs both, "
                             f"got {self.image_dim} and {self.added_kv_proj_dim}")
        if self.image_dim is not None:
            require_range(self, "image_dim", 1, LIMITS["text_dim"])
            if self.added_kv_proj_dim != self.dim:
                # the image tokens reach the blocks already projected to the model width
                raise ValueError(f"added_kv_proj_dim: must equal the width {self.dim}, got {self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None:
            if self.image_dim is None:
                raise ValueError("pos_embed_seq_len: needs image_dim (it positions two images' tokens)")
            require_range(self, "pos_embed_seq_len", 2, 65536)
            if self.pos_embed_seq_len % 2:
                raise ValueError(f"pos_embed_seq_len: two images' tokens, so even, got {self.pos_embed_seq_len}")


def rope_phasors(config: WanDiTConfig, grid: tuple[int, int, int], device) -> torch.Tensor:
    """Unit phasors of the 3-D rotary embedding for a (frames, height, width) token grid.

    The head dim is split into a temporal part and two equal spatial parts; each token's
    angle vector is [f * freq_t, h * freq_h, w * freq_w]. Returns (F*H*W, head_dim/2) complex64,
    angles computed in float64 as the reference does.
    """
    d = config.attention_head_dim
    d_h = d_w = 2 * (d // 6)
    d_t = d - d_h - d_w
    f, h, w = grid
    if max(grid) > config.rope_max_seq_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    parts = []
    for size, dim_part, axis in ((f, d_t, 0), (h, d_h, 1), (w, d_w, 2)):
        angles = torch.arange(size, dtype=torch.float64)[:, None] * rope_frequencies(dim_part)[None, :]
        shape = [1, 1, 1, angles.shape[1]]
        shape[axis] = size
        parts.append(angles.view(shape).expand(f, h, w, -1))
    angles = torch.cat(parts, dim=-1).reshape(f * h * w, d // 2)  # (tokens, d/2)
    return torch.complex(angles.cos().float(), angles.sin().float()).to(device)


class _TwoLayerMLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.act = act
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, six modulation vectors); the text projection to the model width."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim = config.dim
        self.freq_dim = config.freq_dim
        self.time_embedder = _TwoLayerMLP(config.freq_dim, dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _TwoLayerMLP(config.text_dim, dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(config) if config.image_dim is not None else None

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype):
        """timestep (B, U) -> temb (B, U, dim) and modulation (B, U, 6, dim), both in ``dtype``."""
        t_freq = sinusoidal_timestep_embedding(timestep.flatten(), self.freq_dim)  # (B*U, freq_dim) fp32
        # the time MLP is kept in fp32; its output follows the activations' dtype
        temb = self.time_embedder(t_freq.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        temb = temb.unflatten(0, timestep.shape)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


class ImageEmbedder(nn.Module):
    """Image-encoder tokens (B, N, image_dim) -> (B, N, dim): LayerNorm, GELU MLP, LayerNorm (the
    norms in float32). With ``pos_embed_seq_len`` (first-last-frame models) the two images'
    tokens are laid end to end and given learned positions first."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        d_in, dim = config.image_dim, config.dim
        self.norm1 = nn.LayerNorm(d_in)
        self.ff = _TwoLayerMLP(d_in, d_in, dim, nn.GELU())
        self.norm2 = nn.LayerNorm(dim)
        self.pos_embed = (nn.Parameter(torch.zeros(1, config.pos_embed_seq_len, d_in))
                          if config.pos_embed_seq_len is not None else None)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            b, n, d = image_embeds.shape
            image_embeds = image_embeds.view(-1, 2 * n, d) + self.pos_embed  # (B/2, 2N, d): two images per row
        dtype = image_embeds.dtype
        h = layer_norm_fp32(image_embeds, self.norm1.eps, self.norm1.weight, self.norm1.bias).to(dtype)
        h = self.ff(h)
        return layer_norm_fp32(h, self.norm2.eps, self.norm2.weight, self.norm2.bias).to(dtype)


def _modulation_table(rows: int, dim: int) -> nn.Parameter:
    """A (1, rows, dim) learned modulation offset, N(0, 1/dim) like the reference's init. Drawn
    through ``torch.nn.init`` like every other parameter, so the loader's meta build skips it (a
    random op on the meta device runs a Python decomposition that imports sympy, ~0.5 s)."""
    return nn.Parameter(nn.init.normal_(torch.empty(1, rows, dim), std=dim**-0.5))


class _Projections(nn.Module):
    """The q, k, v and output projections of a Wan attention, and the RMS norms of q and k over
    all heads together ("rms_norm_across_heads"). q, k and v are three matmuls, as stored: fused
    into one (3 * dim, dim) weight they ran 0-2 % faster (measured, bf16, 640-4608 tokens), but a
    fused weight cannot be a view of the file and its copy was most of a bf16 load's time (see
    ``loader.weights``)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)


class WanSelfAttention(_Projections):
    """Self-attention over the video tokens with 3-D rotary positions."""

    def forward(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, L, dim) each
        q = apply_rotary(self.norm_q(q).unflatten(2, (self.heads, -1)), positions.phasors)  # (B, L, H, D)
        k = apply_rotary(self.norm_k(k).unflatten(2, (self.heads, -1)), positions.phasors)
        v = v.unflatten(2, (self.heads, -1))
        out = attention(q, k, v, kind="self", layout=positions.grid)
        return self.to_out(out.flatten(2).to(x.dtype))


class TextKV(typing.NamedTuple):
    """One block's cross-attention keys and values (B, Lk, H, D) and their score ``bias``
    ((Lk,) float32, or None; see ``attention.collapse_repeated_tail``); in an image-conditioned
    model also the image tokens' keys and values (B, N, H, D)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None
    k_img: torch.Tensor | None = None
    v_img: torch.Tensor | None = None

    def rows(self, rows: slice) -> TextKV:
        bias = self.bias[rows] if self.bias is not None and self.bias.ndim == 2 else self.bias
        if self.k_img is None:
            return TextKV(self.k[rows], self.v[rows], bias)
        return TextKV(self.k[rows], self.v[rows], bias, self.k_img[rows], self.v_img[rows])

    @staticmethod
    def stack(parts: list[TextKV]) -> TextKV:
        """The rows of several requests' keys/values as one batch: keys and values padded to the
        longest, the padding given score bias -inf (weight 0) and each row its own bias (B, Lk).
        Attention over the stack equals attention over each part (up to summation order)."""
        if len(parts) == 1:
            return parts[0]
        if len({p.k_img is None for p in parts}) > 1:
            raise ValueError("TextKV.stack: image keys in some parts only")
        longest = max(p.k.shape[1] for p in parts)
        ks, vs, biases = [], [], []
        for p in parts:
            rows, length = p.k.shape[0], p.k.shape[1]
            bias = torch.zeros(rows, longest, dtype=torch.float32, device=p.k.device)
            if p.bias is not None:
                bias[:, :length] = p.bias if p.bias.ndim == 2 else p.bias[None]
            bias[:, length:] = -math.inf
            pad = (0, 0, 0, 0, 0, longest - length)
            ks.append(F.pad(p.k, pad))
            vs.append(F.pad(p.v, pad))
            biases.append(bias)
        k_img = v_img = None
        if parts[0].k_img is not None:
            k_img, v_img = torch.cat([p.k_img for p in parts]), torch.cat([p.v_img for p in parts])
        return TextKV(torch.cat(ks), torch.cat(vs), torch.cat(biases), k_img, v_img)


class WanCrossAttention(_Projections):
    """Attention from the video tokens to the text tokens (and, with ``image``, to the image
    tokens through projections of their own, the two results summed). The keys and values depend
    only on the request, so they are computed once per request (``context_kv``)."""

    def __init__(self, dim: int, heads: int, eps: float, image: bool = False):
        super().__init__(dim, heads, eps)
        if image:
            self.add_k_proj = nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def context_kv(self, context: torch.Tensor, bias: torch.Tensor | None = None,
                   image: torch.Tensor | None = None) -> TextKV:
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))  # (B, Lk, H, D)
        v = self.to_v(context).unflatten(2, (self.heads, -1))
        if image is None:
            return TextKV(k, v, bias)
        k_img = self.norm_added_k(self.add_k_proj(image)).unflatten(2, (self.heads, -1))  # (B, N, H, D)
        return TextKV(k, v, bias, k_img, self.add_v_proj(image).unflatten(2, (self.heads, -1)))

    def forward(self, x: torch.Tensor, kv: TextKV) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        out = attention(q, kv.k, kv.v, kind="cross", bias=kv.bias).flatten(2).to(x.dtype)
        if kv.k_img is not None:
            out = out + attention(q, kv.k_img, kv.v_img, kind="cross").flatten(2).to(x.dtype)
        return self.to_out(out)


class FeedForward(nn.Module):
    """fc_out(gelu_tanh(fc_in.proj(x))); ``fc_in`` owns the fused Linear + GELU path."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = GeluLinear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.fc_in(x))


class TimestepRuns(typing.NamedTuple):
    """Which tokens each timestep embedding of ``Tokens`` serves: ``spans[u] = (start, stop)``, the
    token range (of this process's share) of embedding u. ``spans`` None: the embeddings broadcast
    as they are (one for every token, or one per token).

    Wan2.2 TI2V gives the image-conditioned first latent frame timestep 0 and the rest t: two
    values over two token ranges. They are embedded once each and applied per range, where
    diffusers embeds and keeps six modulation vectors per token (at 720p with guidance, 4 GB
    in fp32)."""

    spans: tuple[tuple[int, int], ...] | None = None

    def modulate(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """h * (1 + scale) + shift, with (B, U, dim) vectors."""
        return self._apply(lambda part, sh, sc: torch.addcmul(sh, part, 1 + sc), h, shift, scale)

    def gate(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + y * gate, with (B, U, dim) gates."""
        return self._apply(lambda part, other, g: torch.addcmul(part, other, g), x, y, gate, split_second=True)

    def _apply(self, fn, x, a, b, split_second: bool = False):
        if self.spans is None:
            return fn(x, a, b)
        parts = []
        for u, (start, stop) in enumerate(self.spans):
            second = a[:, start:stop] if split_second else a[:, u : u + 1]
            parts.append(fn(x[:, start:stop], second, b[:, u : u + 1]))
        return torch.cat(parts, dim=1)


# per-token timesteps with at most this many distinct runs are embedded per run; more, per token
MAX_TIMESTEP_RUNS = 16


def timestep_runs(timestep: torch.Tensor) -> tuple[torch.Tensor, tuple[tuple[int, int], ...] | None]:
    """Per-token timesteps (B, L) -> (values (B, U), spans over the whole sequence): the ranges of
    tokens whose timestep is the same in every row. Many ranges: (timestep, None), one value per
    token."""
    length = timestep.shape[1]
    changes = (timestep[:, 1:] != timestep[:, :-1]).any(dim=0).nonzero().flatten().tolist()
    if len(changes) + 1 > MAX_TIMESTEP_RUNS:
        return timestep, None
    starts = [0] + [i + 1 for i in changes]
    return timestep[:, starts], tuple(zip(starts, starts[1:] + [length]))


class WanBlock(nn.Module):
    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.attn1 = WanSelfAttention(dim, config.num_attention_heads, config.eps)
        self.attn2 = WanCrossAttention(dim, config.num_attention_heads, config.eps, image=config.image_dim is not None)
        self.norm2 = nn.LayerNorm(dim, eps=config.eps) if config.cross_attn_norm else None
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.scale_shift_table = _modulation_table(6, dim)

    def modulation(self, modulation: torch.Tensor) -> list[torch.Tensor]:
        """Six (B, U, dim) fp32 vectors: shift/scale/gate for attention, then for the feed-forward
        (U = 1: one timestep for all tokens; see TimestepRuns)."""
        return list((self.scale_shift_table.unsqueeze(0) + modulation.float()).unbind(2))  # of (B, U, 6, dim)

    def attention_input(self, x: torch.Tensor, modulation: torch.Tensor, runs: TimestepRuns = TimestepRuns()):
        """The timestep-modulated input of the self-attention: norm(x) * (1 + scale) + shift, in
        float32, cast to ``x``'s dtype."""
        shift_a, scale_a = self.modulation(modulation)[:2]
        return runs.modulate(layer_norm_fp32(x, self.eps), shift_a, scale_a).to(x.dtype)

    def forward(self, x: torch.Tensor, context_kv, modulation: torch.Tensor, positions: Positions,
                runs: TimestepRuns = TimestepRuns()) -> torch.Tensor:
        _, _, gate_a, shift_f, scale_f, gate_f = self.modulation(modulation)
        dtype = x.dtype

        # residuals are added in float32
        h = self.attention_input(x, modulation, runs)
        x = runs.gate(x.float(), self.attn1(h, positions), gate_a).to(dtype)

        if self.norm2 is None:
            h = x
        else:
            h = layer_norm_fp32(x, self.eps, self.norm2.weight, self.norm2.bias).to(dtype)
        x = x + self.attn2(h, context_kv)

        h = runs.modulate(layer_norm_fp32(x, self.eps), shift_f, scale_f).to(dtype)
        return runs.gate(x.float(), self.ffn(h), gate_f).to(dtype)


class Tokens(typing.NamedTuple):
    """The embedded input of the blocks: tokens ``x`` (B, L, dim) (this process's share under
    sequence parallelism), the timestep embeddings ``temb`` (B, U, dim) and their six modulation
    vectors (B, U, 6, dim) with the tokens each serves (``runs``; U = 1 for one timestep), the
    tokens' positions (their rotary phasors and the grid), and the (f, h, w) token grid."""

    x: torch.Tensor
    temb: torch.Tensor
    modulation: torch.Tensor
    positions: Positions
    grid: tuple[int, int, int]
    runs: TimestepRuns = TimestepRuns()


class WanDiT(LoadableModel):
    """Wan diffusion transformer; loads ``WanTransformer3DModel`` checkpoints."""

    config_class = WanDiTConfig
    diffusers_class = "WanTransformer3DModel"
    # (checkpoint fragment, parameter fragment), matched between dots
    checkpoint_key_map = (
        (".to_out.0.", ".to_out."),
        (".ffn.net.0.proj.", ".ffn.fc_in.proj."),
        (".ffn.net.2.", ".ffn.fc_out."),
        (".image_embedder.ff.net.0.proj.", ".image_embedder.ff.linear_1."),
        (".image_embedder.ff.net.2.", ".image_embedder.ff.linear_2."),
    )
    keep_fp32 = ("condition_embedder.time_embedder.", "scale_shift_table", ".norm1.", ".norm2.")
    # the original Wan checkpoints' module names (LightX2V, ComfyUI and musubi/kohya LoRA files use
    # them): (diffusers fragment, original fragment), matched between dots (``lora.formats``)
    original_key_map = (
        (".attn1.to_q.", ".self_attn.q."), (".attn1.to_k.", ".self_attn.k."), (".attn1.to_v.", ".self_attn.v."),
        (".attn1.to_out.0.", ".self_attn.o."), (".attn1.norm_q.", ".self_attn.norm_q."),
        (".attn1.norm_k.", ".self_attn.norm_k."),
        (".attn2.to_q.", ".cross_attn.q."), (".attn2.to_k.", ".cross_attn.k."), (".attn2.to_v.", ".cross_attn.v."),
        (".attn2.to_out.0.", ".cross_attn.o."), (".attn2.norm_q.", ".cross_attn.norm_q."),
        (".attn2.norm_k.", ".cross_attn.norm_k."), (".attn2.add_k_proj.", ".cross_attn.k_img."),
        (".attn2.add_v_proj.", ".cross_attn.v_img."), (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
        (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."), (".norm2.", ".norm3."),
        (".condition_embedder.time_proj.", ".time_projection.1."), (".proj_out.", ".head.head."),
        (".condition_embedder.text_embedder.linear_1.", ".text_embedding.0."),
        (".condition_embedder.text_embedder.linear_2.", ".text_embedding.2."),
        (".condition_embedder.time_embedder.linear_1.", ".time_embedding.0."),
        (".condition_embedder.time_embedder.linear_2.", ".time_embedding.2."),
        (".condition_embedder.image_embedder.norm1.", ".img_emb.proj.0."),
        (".condition_embedder.image_embedder.ff.net.0.proj.", ".img_emb.proj.1."),
        (".condition_embedder.image_embedder.ff.net.2.", ".img_emb.proj.3."),
        (".condition_embedder.image_embedder.norm2.", ".img_emb.proj.4."),
    )
    # the image-conditioning modules (a LoRA's keys for them on a text-to-video model are reported, not errors)
    image_modules = (".attn2.add_k_proj", ".attn2.add_v_proj", ".attn2.norm_added_k", "condition_embedder.image_embedder")
    # tensor parallelism (parallel.tensor): heads and FFN units split over the ranks; q/k norms span
    # all heads, so they are sharded norms (their squared sums all-reduced)
    tensor_parallel_plan = (
        ("blocks.*.attn[12].to_[qkv]", "column"),
        ("blocks.*.attn2.add_[kv]_proj", "column"),
        ("blocks.*.attn[12].to_out", "row"),
        ("blocks.*.attn[12].norm_[qk]", "norm"),
        ("blocks.*.attn2.norm_added_k", "norm"),
        ("blocks.*.attn[12]", "heads:heads"),
        ("blocks.*.ffn.fc_in.proj", "column"),
        ("blocks.*.ffn.fc_out", "row"),
    )
    layer_counts = ((r"blocks\.(\d+)\.", lambda config: config.num_layers),)

    def __init__(self, config: WanDiTConfig):
        super().__init__(config)
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = _modulation_table(2, dim)
        self._rope_cache: dict = {}

    def _rope(self, grid, device):
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_phasors(self.config, grid, device)}  # keep only the latest shape
        return self._rope_cache[key]

    def encode_context(self, context: torch.Tensor, image_embeds: torch.Tensor | None = None) -> list[TextKV]:
        """Text embeddings (B, L, text_dim) (and, for an image-conditioned model, the image
        encoder's tokens (B, N, image_dim)) -> every block's cross-attention keys and values.

        They depend on the prompt only: compute them once per request and pass them to
        ``forward`` as ``context_kv`` at every step. The padding of a prompt (equal vectors up
        to the fixed length) becomes one key weighed by its count, which gives the same
        attention: a 10-token prompt padded to 512 attends over 11 keys instead of 512.
        """
        context, bias = collapse_repeated_tail(context)
        context = self.condition_embedder.text_embedder(context)
        image = None
        if image_embeds is not None:
            if self.condition_embedder.image_embedder is None:
                raise ValueError("image_embeds: this transformer takes no image (its config has no image_dim)")
            image = self.condition_embedder.image_embedder(image_embeds)
        return [block.attn2.context_kv(context, bias, image) for block in self.blocks]

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None = None,
                context_kv: list | None = None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, C, F, H, W), timestep (B,) or per token (B, tokens) (Wan2.2 TI2V; tokens in
        (f, h, w) order), and either context (B, L, text_dim) (with
        image_embeds for an image-conditioned model) or their ``encode_context`` result ->
        prediction (B, C_out, F, H, W)."""
        if context_kv is None:
            context_kv = self.encode_context(context, image_embeds)
        tokens = self.embed(latents, timestep)
        x = self.run_blocks(tokens, context_kv)
        return self.head(x, tokens)

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor) -> Tokens:
        """Patchify the latents and embed the timestep: what every block takes besides the text."""
        b, _, f, h, w = latents.shape
        pt, ph, pw = self.config.patch_size
        grid = (f // pt, h // ph, w // pw)
        rope = self._rope(grid, latents.device)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # (B, tokens, dim)
        length = x.shape[1]
        spans = None
        if timestep.ndim == 1:
            timestep = timestep[:, None]
        elif timestep.shape != (b, length):
            raise ValueError(f"timestep: expected ({b},) or ({b}, {length}) per token, got {tuple(timestep.shape)}")
        else:
            timestep, spans = timestep_runs(timestep)
        temb, modulation = self.condition_embedder(timestep, dtype=x.dtype)
        x, phasors = shard_sequence(x, rope)  # identity unless sequence parallelism is active
        if spans is not None:  # this process's part of every run
            start, stop = sequence_span(length)
            spans = tuple((min(max(lo, start), stop) - start, min(max(hi, start), stop) - start) for lo, hi in spans)
            spans = (*spans[:-1], (spans[-1][0], stop - start))  # the padding joins the last run
        elif temb.shape[1] > 1:  # one embedding per token: cut like the tokens
            temb, modulation = shard_tokens(temb), shard_tokens(modulation)
        return Tokens(x, temb, modulation, Positions(phasors, grid), grid, TimestepRuns(spans))

    def run_blocks(self, tokens: Tokens, context_kv: list) -> torch.Tensor:
        """The transformer blocks over the embedded tokens -> (B, tokens, dim)."""
        x = tokens.x
        for block, kv in zip(self.blocks, context_kv):
            x = block(x, kv, tokens.modulation, tokens.positions, tokens.runs)
        return x

    def head(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The modulated output norm and projection, unpatchified -> (B, C_out, F, H, W)."""
        pt, ph, pw = self.config.patch_size
        grid, b = tokens.grid, x.shape[0]
        # (B, U, dim) each; U = 1 for one timestep
        shift, scale = (self.scale_shift_table.unsqueeze(0) + tokens.temb.unsqueeze(2)).unbind(2)
        x = tokens.runs.modulate(layer_norm_fp32(x, self.config.eps), shift, scale).to(x.dtype)
        x = gather_sequence(self.proj_out(x), math.prod(grid))  # (B, tokens, pt*ph*pw*C); the head is per token
        x = x.reshape(b, *grid, pt, ph, pw, -1)  # (B, f, h, w, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(b, -1, grid[0] * pt, grid[1] * ph, grid[2] * pw)
