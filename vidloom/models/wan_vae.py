"""The Wan2.1 causal 3D VAE: encode, decode, an explicit causal cache, streaming and tiling.

Shapes: a video ``x`` is (B, C, T, H, W) in [-1, 1]; its latents ``z`` are (B, z_dim, t, h, w) with
``t = 1 + (T - 1) / temporal_factor`` and ``h, w = H / spatial_factor, W / spatial_factor``.

Causality. Every temporal convolution sees only the current and earlier frames, so a video can be
processed in chunks over time, and any chunking gives the same frames. diffusers encodes the first
frame alone and then ``temporal_factor`` frames at a time, and decodes one latent frame at a time;
here chunks are sized by ``WanVAE.step_elements``. What a layer needs from earlier chunks (the last
two input frames of a 3-tap convolution, the last frame of a temporal downsampler) is carried in
a :class:`CausalCache`, one object per encode or decode, so decodes can interleave over the same
read-only module. The first frame is special: the temporal down- and upsamplers pass it
through unchanged, which is why 1 + 4k frames map to 1 + k latents and back.

Parameter names equal those of diffusers' ``AutoencoderKLWan``, so its checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vidloom import cpu
from vidloom.models import winograd
from vidloom.models.base import ArchConfig, LoadableModel
from vidloom.models.winograd import Workspace  # by name: CausalCache's `winograd` flag shadows the module

# Per-channel statistics of the Wan2.1 latent space (the defaults of the released checkpoints).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Bounds diffusers' DiagonalGaussianDistribution puts on the log-variance, so exp() stays finite.
LOGVAR_RANGE = (-30.0, 20.0)

# Frames x pixels below which a 3x3x3 convolution runs direct rather than Winograd: the per-call
# weight transform (4x the weights' size) does not pay for a few small frames.
WINOGRAD_MIN_PIXELS = 2048

# Default WanVAE.step_elements in fp32: half a latent frame of a 256x256 video at the decoder's
# last stage (2 frames x 256 x 256 pixels x 96 channels, 48 MiB), half of diffusers' steps there.
# Larger steps make larger Winograd matmuls. In half precision the convolutions run direct and a
# quarter of that was both faster and leaner (measured, bf16 decode 17x128x128: 7.1-7.8 vs 7.8-9.0 s,
# peak RSS 320-330 vs 650-730 MiB; 33x256x256: time within noise, 792 vs 1036 MiB).
STEP_ELEMENTS = 2 * 256 * 256 * 96
HALF_PRECISION_STEP_ELEMENTS = STEP_ELEMENTS // 4


def _step_budget(step_elements: int | None, dtype: torch.dtype) -> int:
    """``step_elements`` as set, or (None) the default for activations of ``dtype``."""
    if step_elements is not None:
        return step_elements
    return STEP_ELEMENTS if dtype in (torch.float32, torch.float64) else HALF_PRECISION_STEP_ELEMENTS


# ----------------------------------------------------------------------------------------- config

# Sane maxima (Wan2.1: base_dim 96, 4 stages, 2 res blocks; Wan2.2: base_dim 160): a backstop, so a
# corrupt config fails at once instead of building modules for minutes.
VAE_LIMITS = {"base_dim": 4096, "z_dim": 1024, "num_res_blocks": 16, "in_channels": 64, "out_channels": 64}
MAX_STAGES = 8
MAX_DIM_MULT = 64


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(ArchConfig):
    """Architecture of ``AutoencoderKLWan``; field names and defaults are its ``config.json`` keys.

    ``scale_factor_temporal`` / ``scale_factor_spatial`` are kept as written (diffusers' pipelines read
    them); the model itself uses :attr:`temporal_factor` and :attr:`spatial_factor`, derived from the
    layer layout, which cannot disagree with the weights.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: the checkpoint's spelling
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        # direct construction may pass lists; keep the frozen config hashable and comparable
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first): one factor 2 per temporal downsampler."""
        return 2 ** sum(bool(flag) for flag in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W: every downsampling stage halves both."""
        return 2 ** len(self.temperal_downsample)

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latents of a (num_frames, height, width) video; ValueError if it has none."""
        tf, sf = self.temporal_factor, self.spatial_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"num_frames={num_frames}: must be 1 + a multiple of {tf} for this VAE")
        for name, size in (("height", height), ("width", width)):
            if size < sf or size % sf:
                raise ValueError(f"{name}={size}: must be a positive multiple of {sf} for this VAE")
        return 1 + (num_frames - 1) // tf, height // sf, width // sf

    def validate(self) -> None:
        def require(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"WanVAEConfig.{field}: {message}")

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        require(not self.is_residual, "is_residual",
                "the residual (Wan2.2) VAE is not supported yet; only Wan2.1 (is_residual=false)")
        require(self.patch_size is None, "patch_size",
                f"patchified VAEs (patch_size={self.patch_size}) are not supported yet; use null")
        for name, high in VAE_LIMITS.items():
            value = getattr(self, name)
            require(positive_int(value) and value <= high, name, f"must be an integer in 1..{high}, got {value!r}")
        require(self.decoder_base_dim is None or (positive_int(self.decoder_base_dim)
                                                  and self.decoder_base_dim <= VAE_LIMITS["base_dim"]),
                "decoder_base_dim", f"must be null or an integer in 1..{VAE_LIMITS['base_dim']}, "
                f"got {self.decoder_base_dim!r}")
        require(0 < len(self.dim_mult) <= MAX_STAGES and all(positive_int(m) and m <= MAX_DIM_MULT
                                                              for m in self.dim_mult),
                "dim_mult", f"must be 1..{MAX_STAGES} integers in 1..{MAX_DIM_MULT}, got {list(self.dim_mult)}")
        require(len(self.temperal_downsample) == len(self.dim_mult) - 1, "temperal_downsample",
                f"needs one flag per downsampling stage, len(dim_mult) - 1 = {len(self.dim_mult) - 1}, "
                f"got {len(self.temperal_downsample)}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("latents_mean", "latents_std"):
            require(len(getattr(self, name)) == self.z_dim, name,
                    f"needs z_dim={self.z_dim} values, got {len(getattr(self, name))}")
        require(all(s > 0 for s in self.latents_std), "latents_std", "values must be > 0")
        for name in ("scale_factor_temporal", "scale_factor_spatial"):
            value = getattr(self, name)
            require(value is None or positive_int(value), name, f"must be null or a positive int, got {value!r}")


# ----------------------------------------------------------------------------------- causal cache


class CausalCache:
    """The temporal context one encode or decode carries from chunk to chunk.

    Entries are keyed by the layer object, so one cache serves a whole encoder or decoder and
    several caches can run over the same module at once. A fresh cache means "no frames seen".

    ``inference`` selects the fast path: channels-last frames, inputs written once into reused
    zero-bordered buffers of ``workspace``, norms fused into those writes; it writes into buffers in
    place, so it is only set where autograd is off and the model is in eval mode. There, a layer's
    history frames are overwritten in place from step to step, and the residual blocks' hidden
    activation lives in the workspace: the fixed set of large buffers is what keeps a long decode's
    resident memory near what it uses (a churn of fresh full-size tensors leaves freed heap memory
    resident). ``workspace`` may be shared by caches that run one after another (the tiles of one
    tiled decode). ``winograd`` (with ``inference``) lets fp32 3x3 convolutions run by Winograd.
    In bf16 the channels-last convolutions round differently from diffusers' contiguous ones, with
    the same error against fp32 (see tests/models/test_wan_vae.py).
    """

    def __init__(self, inference: bool = False, winograd: bool = False, workspace: Workspace | None = None) -> None:
        self._history: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()
        self.inference = inference
        self.winograd = inference and winograd
        self.workspace = Workspace() if workspace is None else workspace

    def history(self, layer: nn.Module) -> torch.Tensor | None:
        return self._history.get(layer)

    def set_history(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._history[layer] = frames

    def first_call(self, layer: nn.Module) -> bool:
        """True the first time ``layer`` asks, False afterwards."""
        if layer in self._started:
            return False
        self._started.add(layer)
        return True


# ----------------------------------------------------------------------------------------- layers


def _fold_time(x: torch.Tensor) -> torch.Tensor:
    # (B, C, T, H, W) -> (B*T, C, H, W): 2D layers act on every frame independently
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    # (B*T, C, H, W) -> (B, C, T, H, W)
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only (2 * padding_t frames), so output frame i sees
    input frames <= i. With a cache, the past frames come from the previous chunk instead of zeros.

    ``prologue(x, out=None)`` is applied to the input first (the norm and activation before the
    conv) and ``residual`` is added to the output. On the inference path the prologue writes
    straight into the padded input buffer; on the Winograd path the residual is added as the output
    tiles are scattered, into ``residual``'s own storage when it is channels-last (the caller hands
    it over), so neither makes a full-size intermediate.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.context = 2 * pad_t  # past frames the kernel reaches back to
        self.spatial_pad = (pad_w, pad_w, pad_h, pad_h)

    def forward(
        self, x: torch.Tensor, cache: CausalCache | None = None,
        prologue: Callable[..., torch.Tensor] | None = None, residual: torch.Tensor | None = None,
        scratch: str | None = None,
    ) -> torch.Tensor:
        if cache is not None and cache.inference and self._pads_like_3x3(x):
            return self._forward_padded(x, cache, prologue, residual, scratch)
        if prologue is not None:
            x = prologue(x)
        missing = self.context
        if self.context and cache is not None:
            past = cache.history(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                missing -= past.shape[2]
            # clone: a view would keep this whole chunk's input alive until the next chunk
            cache.set_history(self, x[:, :, -self.context :].clone())
        if missing or any(self.spatial_pad):
            x = F.pad(x, (*self.spatial_pad, missing, 0))
        out = super().forward(x)
        return out if residual is None else out + residual

    def _pads_like_3x3(self, x: torch.Tensor) -> bool:
        # two frames of context and one pixel of border, stride 1: the residual blocks' convolutions
        return (self.context == 2 and self.spatial_pad == (1, 1, 1, 1) and self.stride == (1, 1, 1)
                and x.device.type == "cpu")

    def _winograd_fits(self, x: torch.Tensor, cache: CausalCache) -> bool:
        # 3x3x3 in fp32; frames a multiple of 4 pixels; enough input channels for the batched
        # matmuls and enough pixels for the per-call weight transform to pay (small frames run
        # direct). Few output channels (the decoder's RGB head) also go by Winograd: oneDNN is
        # slow there (~2 GFLOP/s) and the slow_conv3d fallback unfolds the whole input (27x).
        _, c, t, h, w = x.shape
        return (cache.winograd and self.kernel_size == (3, 3, 3) and x.dtype == torch.float32
                and h % 4 == 0 and w % 4 == 0 and c >= 16 and t * h * w >= WINOGRAD_MIN_PIXELS)

    def _forward_padded(self, x, cache, prologue, residual, scratch) -> torch.Tensor:
        """Inference: the input (after the prologue) is written once into a reused, zero-bordered
        buffer behind the cached context frames, then convolved by Winograd or directly."""
        b, c, t, h, w = x.shape
        ws = cache.workspace
        # (B, 2 + T, H + 2, W + 2, C): zero border, two context frames, then this chunk's frames
        padded = ws.take("conv_in", (b, t + 2, h + 2, w + 2, c), x.dtype, x.device)
        for edge in (padded[:, :, 0], padded[:, :, -1], padded[:, :, :, 0], padded[:, :, :, -1]):
            edge.zero_()
        past = cache.history(self)
        seen = 0 if past is None else min(past.shape[2], 2)
        padded[:, : 2 - seen].zero_()
        if seen:
            padded[:, 2 - seen : 2, 1 : h + 1, 1 : w + 1] = _channels_last(past[:, :, -seen:])
        frames = padded[:, 2:, 1 : h + 1, 1 : w + 1]  # (B, T, H, W, C) view
        if prologue is not None:
            prologue(x, out=frames.permute(0, 4, 1, 2, 3))
        else:
            frames.copy_(_channels_last(x))
        # the past frames are in `padded` now: their tensor takes the new ones in place, so the
        # cache keeps one allocation per layer instead of a fresh one every step
        history = past
        reusable = past is not None and past.shape == (b, c, 2, h, w)
        if not (reusable and past.is_contiguous(memory_format=torch.channels_last_3d)):
            history = _empty_channels_last(x, (b, c, 2, h, w))
        _channels_last(history).copy_(padded[:, -2:, 1 : h + 1, 1 : w + 1])
        cache.set_history(self, history)
        if not self._winograd_fits(x, cache):
            out = F.conv3d(padded.permute(0, 4, 1, 2, 3), self.weight, self.bias)
            return out if residual is None else out.add_(residual)
        weight = winograd.transform_weight(self.weight, ws)
        if residual is not None:
            # out = residual + conv(x), in place: one full-size activation fewer at the peak
            out = residual = residual.contiguous(memory_format=torch.channels_last_3d)
        elif scratch is not None:
            # (B, T, H, W, Co) buffer seen as channels-last (B, Co, T, H, W)
            out = ws.take(scratch, (b, t, h, w, self.out_channels), x.dtype, x.device).permute(0, 4, 1, 2, 3)
        else:
            out = _empty_channels_last(x, (b, self.out_channels, t, h, w))
        for i in range(b):
            winograd.conv3x3(padded[i], weight, self.bias, _channels_last(out)[i], ws,
                             residual=None if residual is None else _channels_last(residual)[i])
        return out


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # (B, C, T, H, W) -> (B, T, H, W, C): a view, contiguous when x is channels_last_3d
    return x.permute(0, 2, 3, 4, 1)


def _empty_channels_last(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d)


class RMSNorm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * gamma (the Wan VAE's norm; no mean, no eps)."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        # broadcast over the axes after the channel: (T, H, W) for video, (H, W) for frames
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the sum of squares over hundreds of channels is too coarse in bf16/fp16: reduce in fp32
        x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return F.normalize(x32, dim=1).to(x.dtype) * self.scale * self.gamma

    def silu(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """silu(norm(x)), written into ``out`` (any strides; inference only) when given."""
        if out is None:
            return F.silu(self(x))
        # F.normalize is x / max(||x||, eps); here the per-pixel norm is divided out into `out`
        if x.dtype in (torch.float32, torch.float64):
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
            torch.div(x, norm, out=out)
            out.mul_(self.gamma * self.scale)
        else:
            # half precision: the norm reduced in fp32 (one value per pixel), x * (scale / norm)
            # computed in fp32 per element and rounded once into `out`, with no fp32 copy of x
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
            torch.mul(x, torch.reciprocal(norm).mul_(self.scale), out=out)
            out.mul_(self.gamma)
        return F.silu(out, inplace=True)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, 3)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, 3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = self.conv_shortcut(x)
        # the hidden activation is dead once conv2 has read it: on the Winograd path it lives in
        # one reused workspace buffer, not in a fresh allocation per block and step (a churn of
        # full-size buffers that leaves freed memory resident)
        x = self.conv1(x, cache, prologue=self.norm1.silu, scratch="hidden")
        # on the inference path the sum lands in the shortcut's storage: for an identity shortcut
        # that is this block's input, which nothing reads afterwards
        return self.conv2(x, cache, prologue=self._norm2_silu_dropout, residual=shortcut)

    def _norm2_silu_dropout(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # `out` is only passed on the inference path, where dropout is the identity
        return self.dropout(self.norm2.silu(x, out))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame. Frames never attend to each
    other, so the block is causal without a cache (``cache`` is accepted for a uniform call)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(_fold_time(x)))
        # (B*T, 3C, H, W) -> (B*T, 1, H*W, 3C): one head, pixels as tokens
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        # (B*T, 1, H*W, C) -> (B*T, C, H, W)
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + _unfold_time(self.proj(out), b)


class MidBlock(nn.Module):
    """Residual, attention, residual at the coarsest resolution."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        # registration order (attentions first) mirrors diffusers, so state_dict orders match too
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Resample(nn.Module):
    """2x spatial down- or upsampling of every frame; the ``*3d`` modes also halve or double time.

    ``mode`` is one of downsample2d, downsample3d, upsample2d, upsample3d.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # the decoder halves the channels at every upsampling stage
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
            if mode == "upsample3d":
                # one causal conv predicts both output frames of each input frame (2 * dim channels)
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            # pad right and bottom only, so the stride-2 3x3 conv maps H, W to H/2, W/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode '{mode}' is not one of downsample2d/3d, upsample2d/3d")

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        if self.mode.startswith("upsample") and self._winograd_fits(x, cache):
            return self._upsample_winograd(x, cache)
        x = _unfold_time(self.resample(_fold_time(x)), x.shape[0])
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _winograd_fits(self, x: torch.Tensor, cache: CausalCache) -> bool:
        _, _, t, h, w = x.shape
        return (cache.winograd and x.dtype == torch.float32 and x.device.type == "cpu" and h % 4 == 0
                and w % 4 == 0 and t * h * w >= WINOGRAD_MIN_PIXELS)

    def _upsample_winograd(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # nearest 2x upsample + 3x3 conv == a 3x3 conv of the low-res frames with one output channel
        # group per output phase (see winograd.upsample_phase_kernels): with Winograd, 4x fewer
        # products than the direct conv, and the 4x larger upsampled frames never exist
        b, c, t, h, w = x.shape
        conv, ws = self.resample[1], cache.workspace
        weight = winograd.transform_weight(winograd.upsample_phase_kernels(conv.weight), ws)
        out = _empty_channels_last(x, (b, conv.out_channels, t, 2 * h, 2 * w))
        padded = ws.take("conv_in", (b, t, h + 2, w + 2, c), x.dtype, x.device)
        for edge in (padded[:, :, 0], padded[:, :, -1], padded[:, :, :, 0], padded[:, :, :, -1]):
            edge.zero_()
        padded[:, :, 1 : h + 1, 1 : w + 1] = _channels_last(x)
        for i in range(b):
            winograd.conv3x3(padded[i], weight, conv.bias, _channels_last(out)[i], ws, phases=2)
        return out

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        head = None
        if cache.first_call(self):
            # the first latent frame decodes to one frame, not two; the time conv starts after it
            # (with zeros as its past), so a longer first chunk passes its first frame through
            if x.shape[2] == 1:
                return x
            head, x = x[:, :, :1], x[:, :, 1:]
        b, c, t, h, w = x.shape
        x = self.time_conv(x, cache)
        # (B, 2C, T, H, W) -> (B, 2, C, T, H, W) -> (B, C, T, 2, H, W) -> (B, C, 2T, H, W):
        # the two channel halves become two consecutive frames
        x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
        x = x.reshape(b, c, 2 * t, h, w)
        return x if head is None else torch.cat([head, x], dim=2)

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.history(self)
        # the next chunk's first stride-2 window starts on this chunk's last frame
        cache.set_history(self, x[:, :, -1:].clone())
        if past is None:
            # the first frame passes through unchanged; a longer first chunk continues with the
            # windows [f0 f1 f2], [f2 f3 f4], ...
            return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        # windows [f0 f1 f2], [f2 f3 f4], ...: frame pairs after the first frame become one frame
        return self.time_conv(torch.cat([past, x], dim=2))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Encoder3d(nn.Module):
    """Video chunk -> 2 * z_dim moments (mean and log-variance) of the latent chunk."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0  # resolution relative to the input, for attn_scales
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < len(config.temperal_downsample):
                blocks.append(Resample(out_dim, "downsample3d" if config.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], config.dropout)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(x, cache, prologue=self.norm_out.silu)


class Decoder3d(nn.Module):
    """Latent chunk -> video chunk (unclamped)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        dims = [config.decoder_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_up = tuple(reversed(config.temperal_downsample))
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            # every Resample before this block halved the channels it produced
            in_dim = in_dim // 2 if i > 0 else in_dim
            mode = None
            if i < len(temporal_up):
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self._stem(z, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self._head(x, cache)

    def stream(self, z: torch.Tensor, cache: CausalCache, step_elements: int, out: torch.Tensor) -> None:
        """:meth:`forward` stage by stage, depth first: each stage runs on time slices of its input
        whose output has at most ``step_elements`` elements (at least one frame per slice), and
        passes its output on in slices sized for the next stage. The causal cache makes any slicing
        give the same frames; small stages get long slices (few, large calls) and the full-resolution
        stages short ones (bounded memory). The video frames are written into ``out`` in order."""
        stages = [(self._stem, 1, self.conv_in.out_channels)]
        for block in self.up_blocks:
            up = block.upsamplers[0] if block.upsamplers is not None else None
            growth = 1 if up is None else (8 if up.mode == "upsample3d" else 4)  # frames x pixels
            stages.append((block, growth, block.resnets[-1].conv2.out_channels // (1 if up is None else 2)))
        stages.append((self._head, 1, self.conv_out.out_channels))
        written = self._run_stages(stages, 0, z, cache, step_elements, out, 0)
        assert written == out.shape[2], f"decoded {written} frames into {out.shape[2]}"

    @classmethod
    def _run_stages(cls, stages, level: int, x: torch.Tensor, cache: CausalCache, step_elements: int,
                    out: torch.Tensor, written: int) -> int:
        # (a method, not a recursive closure: that would be a reference cycle holding the cache,
        # and with it every buffer of this decode, until the garbage collector runs)
        stage, growth, channels = stages[level]
        frames = max(1, step_elements // (growth * x.shape[-2] * x.shape[-1] * channels))
        for part in x.split(frames, dim=2):
            y = stage(part, cache)
            if level + 1 == len(stages):
                out[:, :, written : written + y.shape[2]] = y
                written += y.shape[2]
            else:
                written = cls._run_stages(stages, level + 1, y, cache, step_elements, out, written)
            del y  # this stage's output is freed before its next slice runs
        return written

    def _stem(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.mid_block(self.conv_in(z, cache), cache)

    def _head(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.conv_out(x, cache, prologue=self.norm_out.silu)


# ----------------------------------------------------------------------------------------- tiling


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first ``extent`` rows (dim=-2) or columns (dim=-1) of ``tile`` in from the
    last ones of ``prev``, weights y/n on ``tile`` and 1 - y/n on ``prev``: diffusers' blend_v/blend_h."""
    n = min(prev.shape[dim], tile.shape[dim], extent)
    if n <= 0:
        return tile
    # weights computed in float64 and rounded once, as diffusers' Python-float factors are
    ramp = torch.arange(n, dtype=torch.float64) / n
    shape = (n, 1) if dim == -2 else (n,)
    w_tile = ramp.view(shape).to(tile.dtype).to(tile.device)
    w_prev = (1.0 - ramp).view(shape).to(tile.dtype).to(tile.device)
    head = prev.narrow(dim, prev.shape[dim] - n, n) * w_prev + tile.narrow(dim, 0, n) * w_tile
    return torch.cat([head, tile.narrow(dim, n, tile.shape[dim] - n)], dim=dim)


def _tiled_map(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: tuple[int, int],
    stride: tuple[int, int],
    out_stride: tuple[int, int],
    out_blend: tuple[int, int],
    map_tiles: Callable | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping (H, W) tiles of ``x`` and stitch the outputs.

    Tiles start every ``stride`` input pixels and span ``tile``; each output tile is blended into the
    already-blended tile above and to its left over ``out_blend`` pixels, then contributes its first
    ``out_stride`` rows and columns. Rows are stitched as they finish, so at most two rows of tiles
    are alive. The result may extend past the wanted size; the caller crops.

    ``map_tiles(fn, tiles) -> outputs``, if given, computes every tile's output up front (e.g.
    spread over processes, ``parallel.vae``); the blending is the same.
    """
    starts = [(top, left) for top in range(0, x.shape[-2], stride[0]) for left in range(0, x.shape[-1], stride[1])]
    done = None
    if map_tiles is not None:
        done = iter(map_tiles(fn, [x[..., top : top + tile[0], left : left + tile[1]] for top, left in starts]))
    rows, above = [], None
    for top in range(0, x.shape[-2], stride[0]):
        row: list[torch.Tensor] = []
        for left in range(0, x.shape[-1], stride[1]):
            out = next(done) if done is not None else fn(x[..., top : top + tile[0], left : left + tile[1]])
            if above is not None:
                out = _blend(above[len(row)], out, out_blend[0], dim=-2)
            if row:
                out = _blend(row[-1], out, out_blend[1], dim=-1)
            row.append(out)
        rows.append(torch.cat([t[..., : out_stride[0], : out_stride[1]] for t in row], dim=-1))
        above = row
    return torch.cat(rows, dim=-2)


def _tile_plan(size: int, tile: int, overlap: int) -> tuple[int, int, int]:
    """(tile, stride, overlap) along one axis, in latent pixels. An axis that fits in one tile is
    not split: diffusers still splits it once the other axis needs tiles, which only adds work and
    seams."""
    if size <= tile:
        return size, size, 0
    return tile, tile - overlap, overlap


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"{name}: expected an int or (height, width) of non-negative ints, got {value!r}")
    return pair


# ------------------------------------------------------------------------------------------ model


class WanVAE(LoadableModel):
    """The Wan2.1 VAE. State-dict keys equal diffusers' ``AutoencoderKLWan``; no buffers.

    Methods take inputs of any dtype/device and run in the module's (fp32 and bf16 are tested).
    They do not switch autograd off: wrap inference in ``torch.inference_mode()``.

    Runtime options (attributes, not architecture):
      winograd      default True: fp32 CPU inference runs the 3x3x3 and upsampling convolutions
                    of frames with >= WINOGRAD_MIN_PIXELS frames x pixels by Winograd F(4x4, 3x3)
                    (see vidloom.models.winograd), with 2.25-4x fewer products. Cost: fp32 rounding
                    only, inside the 1e-4 parity bound; measured against diffusers on the real
                    Wan2.1 architecture (random weights, 33x128x128) 6.6e-6 decode and 5.0e-6
                    encode (direct convolution here: ~2.5e-6). False: direct convolutions, as
                    diffusers. Ignored in bf16, with autograd on, in training mode and off the CPU.
      step_elements bound on the elements (frames x pixels x channels) one stage of the decoder
                    produces per call, and on the first encoder layer's output per encoder step;
                    default None: in fp32 half a latent frame of a 256x256 video at full
                    resolution (48 MiB), so a large video goes in smaller steps than diffusers' one
                    latent frame, and a small one in fewer, larger steps; in bf16/fp16 a quarter of
                    that (see HALF_PRECISION_STEP_ELEMENTS). The frames are the same for any value up
                    to fp32 rounding (it decides which convolutions are large enough for Winograd;
                    measured 4e-6 between one latent frame per step and the default).
    """

    config_class: ClassVar[type[ArchConfig]] = WanVAEConfig
    diffusers_class: ClassVar[str] = "AutoencoderKLWan"
    # every up block holds num_res_blocks + 1 residual blocks (see Decoder3d)
    layer_counts = (
        (r"decoder\.up_blocks\.(\d+)\.", lambda config: len(config.dim_mult)),
        (r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", lambda config: config.num_res_blocks + 1),
    )
    config: WanVAEConfig

    def __init__(self, config: WanVAEConfig) -> None:
        config.validate()
        super().__init__(config)
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        # runtime options (not architecture): see the class docstring
        self.winograd = True
        self.step_elements: int | None = None

    def step_budget(self, dtype: torch.dtype) -> int:
        """``step_elements``, or its default for activations of ``dtype``."""
        return _step_budget(self.step_elements, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    # -- encode

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, 1 + tf*k, H, W) video in [-1, 1] -> (mean, logvar), each (B, z_dim, 1 + k, H/sf, W/sf)."""
        return self._split_moments(self._encode_moments(self._check_video(x)))

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean: the latents diffusers' pipelines use (``sample_mode="argmax"``)."""
        return self.encode(x)[0]

    def encode_tiled(
        self, x: torch.Tensor, tile_latent: int | tuple[int, int] = (32, 32),
        overlap_latent: int | tuple[int, int] = (8, 8),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` over overlapping spatial tiles (sizes in latent pixels), blended linearly.

        Same tiles and blending as diffusers' ``tiled_encode`` with ``tile_sample_min = tile_latent * sf``
        and ``tile_sample_stride = (tile_latent - overlap_latent) * sf``, except that an axis no longer
        than one tile is not split.
        """
        x = self._check_video(x)
        sf = self.config.spatial_factor
        plans = self._tile_plans(x.shape[-2] // sf, x.shape[-1] // sf, tile_latent, overlap_latent)
        moments = _tiled_map(
            x, self._encode_moments,
            tile=tuple(p[0] * sf for p in plans), stride=tuple(p[1] * sf for p in plans),
            out_stride=tuple(p[1] for p in plans), out_blend=tuple(p[2] for p in plans),
        )
        return self._split_moments(moments[..., : x.shape[-2] // sf, : x.shape[-1] // sf])

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, T, H, W) -> (B, 2*z_dim, t, h, w): chunks of n latent frames, i.e. the first
        # 1 + tf*(n-1) frames, then tf*n frames at a time (n = 1: diffusers' chunks); n as large as
        # step_elements allows for the first layer's output
        tf, num_frames = self.config.temporal_factor, x.shape[2]
        per_frame = x.shape[-2] * x.shape[-1] * self.encoder.conv_in.out_channels
        n = max(1, self.step_budget(x.dtype) // (per_frame * tf))
        first = min(num_frames, 1 + tf * (n - 1))
        bounds = [(0, first)] + [(s, min(s + tf * n, num_frames)) for s in range(first, num_frames, tf * n)]
        cache = self._new_cache()
        chunks = [self.encoder(x[:, :, start:stop], cache) for start, stop in bounds]
        return self.quant_conv(torch.cat(chunks, dim=2)).contiguous()

    def _split_moments(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    # -- decode

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, z_dim, t, h, w) latents -> (B, C, 1 + tf*(t-1), h*sf, w*sf) video, clamped to [-1, 1]
        unless ``clamp=False`` (the raw decoder output, for training). Runs in steps of at most
        ``step_elements`` outputs per decoder stage, so activation memory does not grow with t."""
        return self.stream_decoder(clamp=clamp).push(z)

    def stream_decoder(self, clamp: bool = True) -> WanStreamDecoder:
        """A decoder that takes latent chunks one after another; see :class:`WanStreamDecoder`."""
        return WanStreamDecoder(self, clamp=clamp)

    def decode_tiled(
        self, z: torch.Tensor, tile_latent: int | tuple[int, int] = (32, 32),
        overlap_latent: int | tuple[int, int] = (8, 8), clamp: bool = True, map_tiles: Callable | None = None,
    ) -> torch.Tensor:
        """:meth:`decode` over overlapping spatial tiles of the latents, blended linearly in the overlaps.
        ``map_tiles``: decode the tiles elsewhere (see ``_tiled_map``), e.g. spread over processes.

        Each tile is decoded on its own (causal over time). The defaults equal diffusers'
        (``tile_sample_min`` 256, stride 192 for an 8x VAE); with ``tile_sample_min = tile_latent * sf``
        and ``tile_sample_stride = (tile_latent - overlap_latent) * sf`` the tiles and blending are
        diffusers' ``tiled_decode``, except that an axis no longer than one tile is not split.
        """
        z = self._check_latents(z)
        sf = self.config.spatial_factor
        plans = self._tile_plans(z.shape[-2], z.shape[-1], tile_latent, overlap_latent)
        workspace = Workspace()  # the tiles run one after another: they share the scratch buffers
        video = _tiled_map(
            z, lambda tile: self._decode_tile(tile, z.shape[-2] * z.shape[-1], workspace),
            tile=tuple(p[0] for p in plans), stride=tuple(p[1] for p in plans),
            out_stride=tuple(p[1] * sf for p in plans), out_blend=tuple(p[2] * sf for p in plans),
            map_tiles=map_tiles,
        )
        video = video[..., : z.shape[-2] * sf, : z.shape[-1] * sf]
        return video.clamp(-1.0, 1.0) if clamp else video

    def _decode_tile(self, tile: torch.Tensor, frame_area: int, workspace: Workspace) -> torch.Tensor:
        # a tile's steps get its share of step_elements, so tiling bounds activations (not only
        # the causal cache) by the tile's size
        stream = WanStreamDecoder(self, clamp=False, workspace=workspace)
        share = self.step_budget(tile.dtype) * tile.shape[-2] * tile.shape[-1] // frame_area
        stream.step_elements = max(1, share)
        return stream.push(tile)

    def _new_cache(self, workspace: Workspace | None = None) -> CausalCache:
        # the fast path writes into buffers in place: inference only, and (on the CPU) where this
        # CPU runs it fast; Winograd likewise (see vidloom.cpu)
        features = cpu.features()
        inference = not self.training and not torch.is_grad_enabled() and features.channels_last_vae
        winograd = self.winograd and features.winograd_fp32
        return CausalCache(inference=inference, winograd=winograd, workspace=workspace)

    # -- latent statistics

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's latent space: ``(z - mean) * (1 / std)`` as in diffusers' Wan I2V."""
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> VAE latents before decode: ``z / (1 / std) + mean`` as WanPipeline does."""
        mean, inv_std = self._latent_stats(z)
        return z / inv_std + mean

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # built like the pipelines (fp32, 1/std taken before the cast) so results match bit for bit
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std)).view(shape).to(z.device, z.dtype)
        return mean, inv_std

    # -- input checks

    def _check_video(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"video: expected (B, {self.config.in_channels}, T, H, W), got {tuple(x.shape)}")
        self.config.latent_size(*x.shape[2:])
        return x.to(self.device, self.dtype)

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents: expected (B, {self.config.z_dim}, t, h, w), got {tuple(z.shape)}")
        return z.to(self.device, self.dtype)

    def _tile_plans(self, h: int, w: int, tile_latent, overlap_latent) -> list[tuple[int, int, int]]:
        tile, overlap = _pair(tile_latent, "tile_latent"), _pair(overlap_latent, "overlap_latent")
        if min(tile) < 1 or any(o >= t for o, t in zip(overlap, tile)):
            raise ValueError(f"overlap_latent={overlap} must be smaller than tile_latent={tile} (and tiles >= 1)")
        return [_tile_plan(size, t, o) for size, t, o in zip((h, w), tile, overlap)]


class WanStreamDecoder:
    """Decodes latents pushed chunk by chunk, carrying the causal cache between pushes.

    The concatenated outputs equal one :meth:`WanVAE.decode` of the concatenated latents, whatever
    the chunk sizes: the first latent frame gives 1 video frame, every later one ``temporal_factor``.
    Each stream owns its cache, so streams over one VAE may interleave. Memory is bounded by the
    causal cache (two frames per convolution) and ``step_elements`` (the VAE's, per stream), not by
    the video's length.
    """

    def __init__(self, vae: WanVAE, clamp: bool = True, workspace: Workspace | None = None) -> None:
        self.vae = vae
        self.clamp = clamp
        self.latent_frames_seen = 0
        self.step_elements = vae.step_elements  # None: the VAE's default for the latents' dtype
        self._cache = vae._new_cache(workspace)

    def push(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, n, h, w) latents -> their (B, C, frames, h*sf, w*sf) video frames (n may be 0)."""
        z = self.vae._check_latents(z)
        if z.shape[2] == 0:
            b, _, _, h, w = z.shape
            sf = self.vae.config.spatial_factor
            return z.new_empty(b, self.vae.config.out_channels, 0, h * sf, w * sf)
        # the output is allocated before any activation: made later, amid the steps' buffers, it
        # would pin the heap there and keep their freed memory resident
        b, _, n, h, w = z.shape
        tf, sf = self.vae.config.temporal_factor, self.vae.config.spatial_factor
        frames = tf * n - (tf - 1 if self.latent_frames_seen == 0 else 0)
        video = z.new_empty(b, self.vae.config.out_channels, frames, h * sf, w * sf)
        # stage by stage in slices of at most step_elements outputs: memory grows with the step,
        # not with the video
        z = self.vae.post_quant_conv(z)
        self.vae.decoder.stream(z, self._cache, _step_budget(self.step_elements, z.dtype), video)
        self.latent_frames_seen += n
        return video.clamp_(-1.0, 1.0) if self.clamp else video
