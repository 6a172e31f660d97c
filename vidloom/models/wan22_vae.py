"""The Wan2.2 VAE's own layers: ``AutoencoderKLWan`` with ``is_residual=true`` and ``patch_size=2``,
the VAE of Wan2.2 TI2V-5B (z_dim 48, 16x spatial, 4x temporal).

What differs from Wan2.1 (``wan_vae``), as diffusers builds it:
- the video enters as 2x2 pixel patches: (B, 3, T, H, W) -> (B, 12, T, H/2, W/2) (``patchify``),
  and leaves the same way (``unpatchify``); the convolutional network works on the patches, so its
  own spatial factor is 8 and the whole VAE's 16;
- every encoder stage is a residual block around its resnets and downsampler: the stage input,
  averaged over the pixels and frames it halves (``AvgDown3D``), is added to its output; every
  decoder stage likewise adds its input repeated over the pixels and frames it doubles
  (``DupUp3D``); the decoder's upsamplers keep the channel count instead of halving it;
- the encoder has no attention blocks outside the middle block (``attn_scales`` is not read).

Causal convolutions, caches, streaming and the CPU fast path are the shared ones (``causal3d``).
Parameter names equal diffusers', so TI2V-5B's ``vae`` folder loads unchanged.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn

from vidloom.models.causal3d import (
    CausalCache, CausalConv3d, CausalDecoder, CausalEncoder, MidBlock, Resample, ResidualBlock, RMSNorm,
)


class ResidualVAEConfig(typing.Protocol):
    """What the residual stages read of a VAE's architecture (``wan_vae.WanVAEConfig`` has it;
    named here so this file does not import the one that imports it)."""

    base_dim: int
    decoder_dim: int
    dim_mult: typing.Sequence[int]
    num_res_blocks: int
    dropout: float
    temperal_downsample: typing.Sequence[bool]
    in_channels: int
    out_channels: int
    z_dim: int


def patch_view(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> the 7-D view (B, C, p_w, p_h, T, H/p, W/p) of its p x p pixel patches: its
    first three dims flattened are the patch channels c * p * p + p_w * p + p_h (diffusers' order)."""
    b, c, t, h, w = x.shape
    return x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C * p * p, T, H / p, W / p), as diffusers' ``patchify``."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    return patch_view(x, p).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    out = x.new_empty(b, cp // (p * p), t, h * p, w * p)
    patch_view(out, p).copy_(x.view(b, cp // (p * p), p, p, t, h, w))
    return out


class AvgDown3D(nn.Module):
    """The encoder stages' shortcut: (B, C, T, H, W) -> (B, out, T/ft, H/fs, W/fs), each output channel
    the mean of ``C * ft * fs * fs / out`` consecutive values of the space-to-channel rearrangement.
    A chunk of odd length gets one zero frame in front (diffusers' rule): the first chunk of a
    causal encode is odd and every later one even, so any such chunking gives the same result."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if in_dim * factor % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {factor} do not divide into {out_dim}")
        self.group = in_dim * factor // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[2] % ft) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """The decoder stages' shortcut: (B, C, T, H, W) -> (B, out, T*ft, H*fs, W*fs), each input channel
    repeated and laid out over the frames and pixels it becomes (channel-to-space). The first
    chunk of a decode drops its first ``ft - 1`` frames, as the first latent frame decodes to one."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if out_dim * factor % in_dim:
            raise ValueError(f"DupUp3D: {out_dim} channels x {factor} are not a multiple of {in_dim}")
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """An encoder stage: resnets, then the downsampler (none in the last stage), plus the
    averaged input (:class:`AvgDown3D`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, temporal: bool,
                 down: bool) -> None:
        super().__init__()
        # registration order as diffusers', so the state_dict orders match
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        dims = [in_dim] + [out_dim] * (num_res_blocks - 1)
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # the shortcut first: on the CPU fast path a resnet may write its sum into its input
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class ResidualUpBlock(nn.Module):
    """A decoder stage: resnets, then the upsampler (none in the last stage, which then has no
    shortcut either), plus the repeated input (:class:`DupUp3D`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, temporal: bool,
                 up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsampler = Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim) if up else None
        self.growth = 1 if self.upsampler is None else self.upsampler.growth
        self.out_channels = out_dim

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # the input is kept aside (a clone: on the CPU fast path a resnet may write its sum into
        # its input); it is the low-resolution side, so the copy is small
        kept = x.clone() if self.avg_shortcut is not None else None
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, cache)
        return x + self.avg_shortcut(kept, first_chunk=cache.first_call(self))


class ResidualEncoder3d(CausalEncoder):
    """Wan2.2: patch channels -> 2 * z_dim moments."""

    def __init__(self, config: ResidualVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResidualDownBlock(in_dim, out_dim, config.num_res_blocks, config.dropout,
                              temporal=i != last and config.temperal_downsample[i], down=i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.mid_block = MidBlock(dims[-1], config.dropout)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)


class ResidualDecoder3d(CausalDecoder):
    """Wan2.2: latents -> patch channels (unclamped)."""

    def __init__(self, config: ResidualVAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        dims = [config.decoder_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_up = tuple(reversed(config.temperal_downsample))
        last = len(mults) - 1
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        self.up_blocks = nn.ModuleList(
            ResidualUpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout,
                            temporal=i != last and temporal_up[i], up=i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)
