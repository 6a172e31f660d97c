"""The Wan causal 3D VAEs (Wan2.1's, and Wan2.2's residual, patchified one): encode, decode,
streaming and tiling.

Shapes: a video ``x`` is (B, C, T, H, W) in [-1, 1]; its latents ``z`` are (B, z_dim, t, h, w) with
``t = 1 + (T - 1) / temporal_factor`` and ``h, w = H / spatial_factor, W / spatial_factor``.

Time is processed in causal chunks (see ``causal3d``): diffusers encodes the first frame alone and
then ``temporal_factor`` frames at a time, and decodes one latent frame at a time; here chunks are
sized by ``WanVAE.step_elements``, and any chunking gives the same frames. Wan2.1's encoder and
decoder are here; Wan2.2's residual stages and pixel patches are in ``wan22_vae``; the layers, the
cache and the CPU fast path both use are in ``causal3d``, the tiling in ``vae_tiling``.

Parameter names equal those of diffusers' ``AutoencoderKLWan``, so its checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from vidloom import cpu
from vidloom.models.base import ArchConfig, LoadableModel
from vidloom.models.causal3d import (
    AttentionBlock, CausalCache, CausalConv3d, CausalDecoder, CausalEncoder, MidBlock, Resample, ResidualBlock, RMSNorm,
    step_budget_for,
)
from vidloom.models.vae_tiling import tile_pair, tile_plan, tiled_map
from vidloom.models.wan22_vae import ResidualDecoder3d, ResidualEncoder3d, patch_view, patchify, unpatchify
from vidloom.models.winograd import Workspace

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

# ----------------------------------------------------------------------------------------- config

# Sane maxima (Wan2.1: base_dim 96, 4 stages, 2 res blocks; Wan2.2: base_dim 160, patch 2): a backstop, so a
# corrupt config fails at once instead of building modules for minutes.
VAE_LIMITS = {"base_dim": 4096, "z_dim": 1024, "num_res_blocks": 16, "in_channels": 64, "out_channels": 64}
MAX_STAGES = 8
MAX_DIM_MULT = 64
MAX_PATCH = 8


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
    def patch(self) -> int:
        """Pixels per side of the patches the network sees (Wan2.2: 2; Wan2.1: 1, plain pixels)."""
        return 1 if self.patch_size is None else self.patch_size

    @property
    def network_spatial_factor(self) -> int:
        """Patches per latent pixel along H and W: every downsampling stage halves both."""
        return 2 ** len(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W."""
        return self.network_spatial_factor * self.patch

    @property
    def video_channels(self) -> int:
        """Channels of the video the VAE encodes (in_channels counts patch channels)."""
        return self.in_channels // (self.patch * self.patch)

    @property
    def output_channels(self) -> int:
        """Channels of the video the VAE decodes."""
        return self.out_channels // (self.patch * self.patch)

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

        require(isinstance(self.is_residual, bool), "is_residual", f"must be true or false, got {self.is_residual!r}")
        require(self.patch_size is None or (positive_int(self.patch_size) and self.patch_size <= MAX_PATCH),
                "patch_size", f"must be null or an integer in 1..{MAX_PATCH}, got {self.patch_size!r}")
        for name, high in VAE_LIMITS.items():
            value = getattr(self, name)
            require(positive_int(value) and value <= high, name, f"must be an integer in 1..{high}, got {value!r}")
        for name in ("in_channels", "out_channels"):
            require(getattr(self, name) % (self.patch * self.patch) == 0, name,
                    f"{getattr(self, name)} channels are not whole {self.patch}x{self.patch} patches of pixels")
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
        if self.is_residual:  # the stages' shortcuts regroup channels: whole groups only
            dims = [self.base_dim * m for m in (1, *self.dim_mult)]
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
                down = i < len(self.temperal_downsample)
                factor = (2 if down and self.temperal_downsample[i] else 1) * (4 if down else 1)
                require(a * factor % b == 0, "dim_mult", f"encoder stage {i}: {a} channels x {factor} "
                        f"do not average into {b} (the residual VAE's shortcut)")
            dec = [self.decoder_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]
            flags = tuple(reversed(self.temperal_downsample))
            for i, (a, b) in enumerate(zip(dec[:-1], dec[1:])):
                if i < len(flags):
                    factor = (2 if flags[i] else 1) * 4
                    require(b * factor % a == 0, "dim_mult", f"decoder stage {i}: {a} channels do not "
                            f"repeat into {b} x {factor} (the residual VAE's shortcut)")
        for name in ("latents_mean", "latents_std"):
            require(len(getattr(self, name)) == self.z_dim, name,
                    f"needs z_dim={self.z_dim} values, got {len(getattr(self, name))}")
        require(all(s > 0 for s in self.latents_std), "latents_std", "values must be > 0")
        for name in ("scale_factor_temporal", "scale_factor_spatial"):
            value = getattr(self, name)
            require(value is None or positive_int(value), name, f"must be null or a positive int, got {value!r}")


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None
        self.growth = 1 if mode is None else self.upsamplers[0].growth
        self.out_channels = out_dim if mode is None else out_dim // 2  # the upsampler halves them

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Encoder3d(CausalEncoder):
    """Wan2.1: video chunk -> 2 * z_dim moments (mean and log-variance) of the latent chunk."""

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


class Decoder3d(CausalDecoder):
    """Wan2.1: latent chunk -> video chunk (unclamped)."""

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


# ------------------------------------------------------------------------------------------ model


class WanVAE(LoadableModel):
    """The Wan VAEs: Wan2.1's, and with ``is_residual`` and ``patch_size`` Wan2.2's (its layers in
    ``wan22_vae``). State-dict keys equal diffusers' ``AutoencoderKLWan``; no buffers.

    Videos go in and come out as pixels; a patchified VAE's network works on p x p patches, and
    tiles are cut and blended in patches, as diffusers does.

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
        if config.is_residual:
            encoder, decoder = ResidualEncoder3d, ResidualDecoder3d
        else:
            encoder, decoder = Encoder3d, Decoder3d
        self.encoder = encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = decoder(config)
        # runtime options (not architecture): see the class docstring
        self.winograd = True
        self.step_elements: int | None = None

    def step_budget(self, dtype: torch.dtype) -> int:
        """``step_elements``, or its default for activations of ``dtype``."""
        return step_budget_for(self.step_elements, dtype)

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
        x = self._check_video(x)  # in patches
        sf = self.config.network_spatial_factor
        plans = self._tile_plans(x.shape[-2] // sf, x.shape[-1] // sf, tile_latent, overlap_latent)
        moments = tiled_map(
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
        ``map_tiles``: decode the tiles elsewhere (see ``tiled_map``), e.g. spread over processes.

        Each tile is decoded on its own (causal over time). The defaults equal diffusers'
        (``tile_sample_min`` 256, stride 192 for an 8x VAE); with ``tile_sample_min = tile_latent * sf``
        and ``tile_sample_stride = (tile_latent - overlap_latent) * sf`` the tiles and blending are
        diffusers' ``tiled_decode``, except that an axis no longer than one tile is not split.
        """
        z = self._check_latents(z)
        sf = self.config.network_spatial_factor  # the tiles are decoded and blended in patches
        plans = self._tile_plans(z.shape[-2], z.shape[-1], tile_latent, overlap_latent)
        workspace = Workspace()  # the tiles run one after another: they share the scratch buffers
        video = tiled_map(
            z, lambda tile: self._decode_tile(tile, z.shape[-2] * z.shape[-1], workspace),
            tile=tuple(p[0] for p in plans), stride=tuple(p[1] for p in plans),
            out_stride=tuple(p[1] * sf for p in plans), out_blend=tuple(p[2] * sf for p in plans),
            map_tiles=map_tiles,
        )
        video = unpatchify(video[..., : z.shape[-2] * sf, : z.shape[-1] * sf], self.config.patch)
        return video.clamp_(-1.0, 1.0) if clamp else video

    def _decode_tile(self, tile: torch.Tensor, frame_area: int, workspace: Workspace) -> torch.Tensor:
        # a tile's steps get its share of step_elements, so tiling bounds activations (not only
        # the causal cache) by the tile's size
        stream = WanStreamDecoder(self, clamp=False, workspace=workspace)
        share = self.step_budget(tile.dtype) * tile.shape[-2] * tile.shape[-1] // frame_area
        stream.step_elements = max(1, share)
        return stream.push_patches(tile)

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
        """A video of pixels -> the network's input (its patches)."""
        channels = self.config.video_channels
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"video: expected (B, {channels}, T, H, W), got {tuple(x.shape)}")
        self.config.latent_size(*x.shape[2:])
        return patchify(x.to(self.device, self.dtype), self.config.patch)

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents: expected (B, {self.config.z_dim}, t, h, w), got {tuple(z.shape)}")
        return z.to(self.device, self.dtype)

    def _tile_plans(self, h: int, w: int, tile_latent, overlap_latent) -> list[tuple[int, int, int]]:
        tile, overlap = tile_pair(tile_latent, "tile_latent"), tile_pair(overlap_latent, "overlap_latent")
        if min(tile) < 1 or any(o >= t for o, t in zip(overlap, tile)):
            raise ValueError(f"overlap_latent={overlap} must be smaller than tile_latent={tile} (and tiles >= 1)")
        return [tile_plan(size, t, o) for size, t, o in zip((h, w), tile, overlap)]


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
        return self._push(z, patches=False)

    def push_patches(self, z: torch.Tensor) -> torch.Tensor:
        """As :meth:`push`, the frames left in the network's patch channels (what tiles blend in)."""
        return self._push(z, patches=True)

    def _push(self, z: torch.Tensor, patches: bool) -> torch.Tensor:
        config = self.vae.config
        z = self.vae._check_latents(z)
        b, _, n, h, w = z.shape
        tf, sf, p = config.temporal_factor, config.network_spatial_factor, config.patch
        frames = 0 if n == 0 else tf * n - (tf - 1 if self.latent_frames_seen == 0 else 0)
        # the output is allocated before any activation: made later, amid the steps' buffers, it
        # would pin the heap there and keep their freed memory resident. Pixels are written
        # straight from the patch channels into it, through a view (no second full-size copy).
        if patches or p == 1:
            video = z.new_empty(b, config.out_channels, frames, h * sf, w * sf)
            target = video
        else:
            video = z.new_empty(b, config.output_channels, frames, h * sf * p, w * sf * p)
            target = patch_view(video, p)
        if n == 0:
            return video
        channels = config.out_channels // (p * p)

        def write(y: torch.Tensor, start: int) -> None:
            part = y if target is video else y.view(b, channels, p, p, *y.shape[2:])
            target[:, :, ..., start : start + y.shape[2], :, :] = part

        # stage by stage in slices of at most step_elements outputs: memory grows with the step,
        # not with the video
        z = self.vae.post_quant_conv(z)
        written = self.vae.decoder.stream(z, self._cache, step_budget_for(self.step_elements, z.dtype), write)
        assert written == frames, f"decoded {written} frames into {frames}"
        self.latent_frames_seen += n
        return video.clamp_(-1.0, 1.0) if self.clamp else video
