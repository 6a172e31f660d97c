"""What the Wan VAEs share: causal 3-D convolutions with an explicit cache, their layers, the CPU
fast path, and the time-sliced streaming of a decoder's stages.

Causality. Every temporal convolution sees only the current and earlier frames, so a video can be
processed in chunks over time, and any chunking gives the same frames. What a layer needs from
earlier chunks (the last two input frames of a 3-tap convolution, the last frame of a temporal
downsampler) is carried in a :class:`CausalCache`, one object per encode or decode, so decodes can
interleave over the same read-only module. The first frame is special: the temporal down- and
upsamplers pass it through unchanged, which is why 1 + 4k frames map to 1 + k latents and back.

Shapes: video and activations are (B, C, T, H, W). Parameter names equal those of diffusers'
``AutoencoderKLWan`` layers, so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vidloom.models import winograd
from vidloom.models.attention import attention
from vidloom.models.winograd import Workspace  # by name: CausalCache's `winograd` flag shadows the module

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


def step_budget_for(step_elements: int | None, dtype: torch.dtype) -> int:
    """``step_elements`` as set, or (None) the default for activations of ``dtype``."""
    if step_elements is not None:
        return step_elements
    return STEP_ELEMENTS if dtype in (torch.float32, torch.float64) else HALF_PRECISION_STEP_ELEMENTS


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


def fold_time(x: torch.Tensor) -> torch.Tensor:
    # (B, C, T, H, W) -> (B*T, C, H, W): 2D layers act on every frame independently
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
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
            padded[:, 2 - seen : 2, 1 : h + 1, 1 : w + 1] = channels_last(past[:, :, -seen:])
        frames = padded[:, 2:, 1 : h + 1, 1 : w + 1]  # (B, T, H, W, C) view
        if prologue is not None:
            prologue(x, out=frames.permute(0, 4, 1, 2, 3))
        else:
            frames.copy_(channels_last(x))
        # the past frames are in `padded` now: their tensor takes the new ones in place, so the
        # cache keeps one allocation per layer instead of a fresh one every step
        history = past
        reusable = past is not None and past.shape == (b, c, 2, h, w)
        if not (reusable and past.is_contiguous(memory_format=torch.channels_last_3d)):
            history = empty_channels_last(x, (b, c, 2, h, w))
        channels_last(history).copy_(padded[:, -2:, 1 : h + 1, 1 : w + 1])
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
            out = empty_channels_last(x, (b, self.out_channels, t, h, w))
        for i in range(b):
            winograd.conv3x3(padded[i], weight, self.bias, channels_last(out)[i], ws,
                             residual=None if residual is None else channels_last(residual)[i])
        return out


def channels_last(x: torch.Tensor) -> torch.Tensor:
    # (B, C, T, H, W) -> (B, T, H, W, C): a view, contiguous when x is channels_last_3d
    return x.permute(0, 2, 3, 4, 1)


def empty_channels_last(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
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
        qkv = self.to_qkv(self.norm(fold_time(x)))
        # (B*T, 3C, H, W) -> (B*T, 1, H*W, 3C): one head, pixels as tokens
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = (part.transpose(1, 2) for part in qkv.chunk(3, dim=-1))  # views (B*T, H*W, 1, C)
        # Through the one entry point, so a selected backend serves the VAE too. With SDPA it makes
        # the same call on the same strides as a direct one (bitwise equal outputs); its checks
        # cost ~13 us a call (CPU, measured), against 1.5 ms for one 16x16 frame at 384 channels
        # and far more at real sizes. The frame is whole on this process: sequence parallelism is
        # set around the transformer's call only, never around a VAE.
        out = attention(q, k, v, kind="self", layout=(h, w))
        # (B*T, H*W, 1, C) -> (B*T, C, H, W)
        out = out.squeeze(2).transpose(1, 2).reshape(b * t, c, h, w)
        return x + unfold_time(self.proj(out), b)


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

    ``mode`` is one of downsample2d, downsample3d, upsample2d, upsample3d; ``out_dim`` the
    upsampling convolution's output channels (default ``dim // 2``).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # the Wan2.1 decoder halves the channels at every upsampling stage (out_dim None)
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1),
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
        x = unfold_time(self.resample(fold_time(x)), x.shape[0])
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
        out = empty_channels_last(x, (b, conv.out_channels, t, 2 * h, 2 * w))
        padded = ws.take("conv_in", (b, t, h + 2, w + 2, c), x.dtype, x.device)
        for edge in (padded[:, :, 0], padded[:, :, -1], padded[:, :, :, 0], padded[:, :, :, -1]):
            edge.zero_()
        padded[:, :, 1 : h + 1, 1 : w + 1] = channels_last(x)
        for i in range(b):
            winograd.conv3x3(padded[i], weight, conv.bias, channels_last(out)[i], ws, phases=2)
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

    @property
    def growth(self) -> int:
        """An upsampler's output per input elements along frames x pixels (what sizes a decoder's
        streaming steps)."""
        return {"upsample3d": 8, "upsample2d": 4}.get(self.mode, 1)


# ------------------------------------------------------------------------------ encoder / decoder


class CausalEncoder(nn.Module):
    """Video chunk -> moments chunk: ``conv_in``, ``down_blocks``, ``mid_block``, then ``norm_out``
    and ``conv_out``. Subclasses build the layers (Wan2.1's plain blocks, Wan2.2's residual ones)."""

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(x, cache, prologue=self.norm_out.silu)


class CausalDecoder(nn.Module):
    """Latent chunk -> output chunk (unclamped): ``conv_in`` and ``mid_block`` (the stem), the
    ``up_blocks``, then ``norm_out`` and ``conv_out`` (the head). Subclasses build the layers; every
    up block tells its ``growth`` (output per input elements along frames x pixels) and its
    ``out_channels``, which size the streaming steps."""

    def forward(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self._stem(z, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self._head(x, cache)

    def stream(self, z: torch.Tensor, cache: CausalCache, step_elements: int,
               write: Callable[[torch.Tensor, int], None]) -> int:
        """:meth:`forward` stage by stage, depth first: each stage runs on time slices of its input
        whose output has at most ``step_elements`` elements (at least one frame per slice), and
        passes its output on in slices sized for the next stage. The causal cache makes any slicing
        give the same frames; small stages get long slices (few, large calls) and the full-resolution
        stages short ones (bounded memory). The output frames are handed to ``write(frames, start)``
        in order, as they are made; returns how many there were."""
        stages = [(self._stem, 1, self.conv_in.out_channels)]
        stages += [(block, block.growth, block.out_channels) for block in self.up_blocks]
        stages.append((self._head, 1, self.conv_out.out_channels))
        return self._run_stages(stages, 0, z, cache, step_elements, write, 0)

    @classmethod
    def _run_stages(cls, stages, level: int, x: torch.Tensor, cache: CausalCache, step_elements: int,
                    write: Callable[[torch.Tensor, int], None], written: int) -> int:
        # (a method, not a recursive closure: that would be a reference cycle holding the cache,
        # and with it every buffer of this decode, until the garbage collector runs)
        stage, growth, channels = stages[level]
        frames = max(1, step_elements // (growth * x.shape[-2] * x.shape[-1] * channels))
        for part in x.split(frames, dim=2):
            y = stage(part, cache)
            if level + 1 == len(stages):
                write(y, written)
                written += y.shape[2]
            else:
                written = cls._run_stages(stages, level + 1, y, cache, step_elements, write, written)
            del y  # this stage's output is freed before its next slice runs
        return written

    def _stem(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.mid_block(self.conv_in(z, cache), cache)

    def _head(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.conv_out(x, cache, prologue=self.norm_out.silu)
