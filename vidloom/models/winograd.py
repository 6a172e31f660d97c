"""Winograd F(4x4, 3x3) convolution of video frames, for fp32 inference on CPUs.

A 3x3 convolution over (H, W) computed on 6x6 input tiles in the Winograd domain needs 36
multiplications per 4x4 output tile instead of 144 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). A 3x3x3 causal video convolution is three such 2D
convolutions (one per temporal tap) summed, and the sum is taken inside the Winograd domain,
so the whole layer is: gather 6x6 tiles, transform (one small matmul), 36 batched matmuls per
temporal tap, transform back (one small matmul), scatter 4x4 tiles.

Numerics: in fp32 the result differs from direct convolution by ~2e-6 relative (the transforms
have coefficients up to 8), ten times fp32 rounding but far below the 1e-4 parity bound of a
whole VAE decode. It is meant for fp32 only: in bf16 the transformed values lose too much.

Layout: frames are channels-last, (frames, H, W, C), the layout whose 4x4 tiles are plain strided
views. Large buffers come from a :class:`Workspace`, so a decode does not ask the OS for fresh
(page-faulting) memory on every layer; they are processed in bands of tile rows so that the
buffers stay a few tens of MB whatever the frame size.
"""

from __future__ import annotations

import torch

# F(4, 3) with interpolation points 0, +-1, +-2 (and infinity): output = A^T [(G g) * (B^T d)].
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # fmt: skip
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # fmt: skip
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
# A^T e_1 = (1, 1, 1, 1): a constant added at Winograd position (1, 1) adds it to all 16 outputs
_BIAS_POSITION = 1 * 6 + 1

TILE, TILE_IN = 4, 6  # output and input tile edge


def _kron(m) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t)


_TRANSFORMS: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _transforms(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2D transforms as matrices on flattened tiles: B (36, 36), A (16, 36), G (36, 9)."""
    if dtype not in _TRANSFORMS:
        _TRANSFORMS[dtype] = tuple(_kron(m).to(dtype) for m in (_BT, _AT, _G))
    return _TRANSFORMS[dtype]


class Workspace:
    """Reusable scratch buffers, one per role. ``take(role, shape)`` returns a view of the role's
    buffer (grown when too small); its contents are whatever the last user left. A buffer must not
    be taken again under the same role while its previous view is still in use."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        key = (role, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def transform_weight(weight: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """(Co, C, taps, 3, 3) kernels -> (taps, 36, C, Co) Winograd-domain kernels (G g G^T), a view."""
    co, c, taps = weight.shape[:3]
    _, _, kg = _transforms(weight.dtype)
    if c * co <= 256 * 256:
        # (Co, C, taps, 3, 3) -> (9, taps, C, Co): the 3x3 taps first, as the transform's K dimension
        g = ws.take("weight_in", (9, taps, c, co), weight.dtype, weight.device)
        g.copy_(weight.permute(3, 4, 2, 1, 0).reshape(9, taps, c, co))
        u = ws.take("weight", (36, taps, c, co), weight.dtype, weight.device)
        torch.mm(kg, g.view(9, -1), out=u.view(36, -1))
        return u.transpose(0, 1)  # each tap's (36, C, Co) is what bmm takes
    # large kernels: that permuting copy strides through all of the weights 27 times; instead
    # one matmul per tap reads the weights in their own layout (a transposed operand, no copy)
    # and writes (36, Co*C) rows. Fresh memory, not the workspace: these are the largest
    # buffers (4x the weights), and the workspace would keep them through the full-resolution
    # stages
    u = torch.empty((taps, 36, co, c), dtype=weight.dtype, device=weight.device)
    for k in range(taps):
        # (Co, C, 3, 3) -> (Co*C, 9), a view -> its transpose (9, Co*C)
        torch.mm(kg, weight[:, :, k].reshape(-1, 9).t(), out=u[k].view(36, co * c))
    return u.transpose(2, 3)  # (C, Co) matrices stored transposed: bmm takes them


def conv3x3(
    padded: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    ws: Workspace,
    residual: torch.Tensor | None = None,
    phases: int = 1,
    band_bytes: int | None = None,
) -> torch.Tensor:
    """Winograd convolution of channels-last frames, written into ``out``.

    padded  (T + taps - 1, 4*nH + 2, 4*nW + 2, C): the input with one zero pixel on every side
            (more at the bottom/right only if H, W are not multiples of 4) and the temporal context
    weight  (taps, 36, C, Co * phases**2) from :func:`transform_weight`; frame t of the output sums
            tap k over input frame t + k
    out     (T, H * phases, W * phases, Co); ``residual``, if given, is added (same shape)
    phases  2 for a sub-pixel convolution: output channel (p, q, co) of low-res pixel (i, j) is
            output pixel (2i + p, 2j + q), channel co (a nearest 2x upsample then 3x3 conv)
    band_bytes  bound on each scratch buffer: rows of tiles are processed in bands that fit;
            default half the input's size, within 8..32 MiB (larger bands: larger matmuls)
    """
    taps, _, c, co_all = weight.shape
    tp, hp, wp, _ = padded.shape
    t = tp - taps + 1
    n_h, n_w = (hp - 2) // TILE, (wp - 2) // TILE
    co = co_all // (phases * phases)
    h_out, w_out = out.shape[1] // phases, out.shape[2] // phases
    kb, ka, _ = _transforms(padded.dtype)
    s_t, s_h, s_w, s_c = padded.stride()
    assert s_c == 1 and h_out == n_h * TILE and w_out == n_w * TILE, "frames must be multiples of 4, channels-last"
    # bytes per row of tiles in the largest buffers: the transformed input tiles and the products
    row_bytes = 36 * n_w * max(tp * c, t * co_all) * padded.element_size()
    if band_bytes is None:
        band_bytes = min(32 << 20, max(8 << 20, padded.numel() * padded.element_size() // 2))
    band = max(1, min(n_h, band_bytes // row_bytes))
    for i0 in range(0, n_h, band):
        b = min(band, n_h - i0)
        rows = t * b * n_w  # output tiles of this band, over all frames
        # gather the 6x6 input tiles: (6, 6, Tp, b, nW, C), tiles every 4 pixels
        tiles = padded.as_strided(
            (TILE_IN, TILE_IN, tp, b, n_w, c), (s_h, s_w, s_t, TILE * s_h, TILE * s_w, 1),
            padded.storage_offset() + i0 * TILE * s_h,
        )
        d = ws.take("tiles", (36, tp * b * n_w * c), padded.dtype, padded.device)
        d.view(TILE_IN, TILE_IN, tp, b, n_w, c).copy_(tiles)
        v = ws.take("tiles_w", d.shape, padded.dtype, padded.device)
        torch.mm(kb, d, out=v)  # B^T d B for every tile and channel
        v = v.view(36, tp, b * n_w, c)
        m = ws.take("product", (36, rows, co_all), padded.dtype, padded.device)
        for k in range(taps):  # (36, rows, C) @ (36, C, Co*phases^2), summed over the temporal taps
            frames = v[:, k : k + t].reshape(36, rows, c)
            if k == 0:
                torch.bmm(frames, weight[k], out=m)
            else:
                m.baddbmm_(frames, weight[k])
        if bias is not None:
            m[_BIAS_POSITION] += bias.repeat(phases * phases) if phases > 1 else bias
        # the input tiles are dead: their buffer takes the output tiles
        y = ws.take("tiles", (16, rows * co_all), padded.dtype, padded.device)
        torch.mm(ka, m.view(36, -1), out=y)  # A^T m A
        _scatter(y, out, residual, t, i0, b, n_w, co, phases)
    return out


def _scatter(y, out, residual, t, i0, b, n_w, co, phases) -> None:
    # y (4, 4, T, b, nW, [p, q,] Co) -> out rows of this band (T, b, 4, [p,] nW, 4, [q,] Co)
    rows = slice(i0 * TILE * phases, (i0 + b) * TILE * phases)
    if phases == 1:
        src = y.view(TILE, TILE, t, b, n_w, co).permute(2, 3, 0, 4, 1, 5)
        shape = (t, b, TILE, n_w, TILE, co)
    else:
        src = y.view(TILE, TILE, t, b, n_w, phases, phases, co).permute(2, 3, 0, 5, 4, 1, 6, 7)
        shape = (t, b, TILE, phases, n_w, TILE, phases, co)
    dst = out[:, rows].view(shape)
    if residual is None:
        dst.copy_(src)
    else:
        torch.add(residual[:, rows].view(shape), src, out=dst)


def upsample_phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(Co, C, 3, 3) kernel applied after a nearest 2x upsample -> (4 * Co, C, 1, 3, 3) kernels on
    the low-res input, output channel (p, q, co) for the output pixel of phase (p, q).

    Output row 2i + p sees upsampled rows 2i + p - 1 .. 2i + p + 1, i.e. low-res rows
    i - 1, i, i (p = 0) or i, i, i + 1 (p = 1): taps that land on the same low-res row add up.
    """
    # (phase, low-res offset -1/0/+1, original tap): which original taps each low-res offset sums
    fold = weight.new_tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 1]]])
    k = torch.einsum("pia,ocab,qjb->pqocij", fold, weight, fold)
    co, c = weight.shape[:2]
    return k.reshape(4 * co, c, 1, 3, 3)
