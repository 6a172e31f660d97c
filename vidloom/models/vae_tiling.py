"""Spatial tiling for the VAEs: overlapping tiles, each computed on its own, blended linearly in the
overlaps as diffusers' ``blend_v`` / ``blend_h`` do."""

from __future__ import annotations

from collections.abc import Callable

import torch


def blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
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


def tiled_map(
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
                out = blend(above[len(row)], out, out_blend[0], dim=-2)
            if row:
                out = blend(row[-1], out, out_blend[1], dim=-1)
            row.append(out)
        rows.append(torch.cat([t[..., : out_stride[0], : out_stride[1]] for t in row], dim=-1))
        above = row
    return torch.cat(rows, dim=-2)


def tile_plan(size: int, tile: int, overlap: int) -> tuple[int, int, int]:
    """(tile, stride, overlap) along one axis, in latent pixels. An axis that fits in one tile is
    not split: diffusers still splits it once the other axis needs tiles, which only adds work and
    seams."""
    if size <= tile:
        return size, size, 0
    return tile, tile - overlap, overlap


def tile_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"{name}: expected an int or (height, width) of non-negative ints, got {value!r}")
    return pair
