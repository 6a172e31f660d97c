"""Sliding-tile attention (STA): 3-D self-attention restricted to a window of the token grid.

The token sequence of a video is a (frames, rows, columns) grid after patching. Queries are
grouped in 3-D tiles of that grid (``QUERY_TILE`` tokens per axis, at most the window, fewer at
the grid's ends); each query tile attends to the box of keys centred on it that spans ``window``
tokens per axis, shifted inside the grid at its borders so that every tile sees as many keys as
the window holds. A window at least the grid's size gives every tile every key: dense attention
(in another summation order). Each tile's attention is one call of a dense kernel over the
gathered box, so the work is (tiles x tile tokens x box tokens) instead of L^2: the speed-up is
real on a CPU as on a GPU, with no kernel of its own.

The window is a request's (``SamplingParams.sta_window``) or the engine's default
(``EngineConfig.sta_window``); it reaches attention through ``attention.sliding_window``.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .attention import Layout, Window

# tokens of one query tile per axis (frames, rows, columns); clipped to the window and the grid
QUERY_TILE = (4, 8, 8)
MAX_WINDOW = 1 << 16  # tokens per axis a window may name


def parse_window(value, field: str = "sta_window") -> Window | None:
    """``"F,H,W"``, a 3-sequence of positive integers, or None -> a window (tokens per axis) or None.
    A ValueError names ``field`` and what it takes."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
    try:
        window = tuple(parts)
        ok = len(window) == 3 and all(
            (isinstance(w, str) and w.isdigit()) or (isinstance(w, int) and not isinstance(w, bool)) for w in window)
    except TypeError:
        ok = False
    if ok:
        window = tuple(int(w) for w in window)
        ok = all(1 <= w <= MAX_WINDOW for w in window)
    if not ok:
        shown = repr(value)[:40]
        raise ValueError(f"{field}: expected three token counts 'F,H,W' (frames, rows, columns after patching), "
                         f"each 1..{MAX_WINDOW}, e.g. '3,6,6'; got {shown}")
    return window  # type: ignore[return-value]


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _key_span(a: int, b: int, n: int, window: int) -> tuple[int, int]:
    """Keys [start, stop) along one axis of length ``n`` for the query tile [a, b): ``window``
    tokens (at least the tile, at most the axis) centred on the tile, shifted inside the axis."""
    width = min(n, max(window, b - a))
    start = min(max(0, (a + b - width) // 2), n - width)
    return start, start + width


@functools.lru_cache(maxsize=64)
def tile_plan(layout: Layout, window: Window, tile: tuple[int, int, int] = QUERY_TILE):
    """[(query box, key box)], each box ((f0, f1), (h0, h1), (w0, w1)) in tokens of ``layout``
    (the same for every layer and step of a request: computed once per grid and window)."""
    axes = [[(r, _key_span(*r, n, w)) for r in _ranges(n, min(t, n, w))] for n, w, t in zip(layout, window, tile)]
    return tuple(tuple(zip(*combo)) for combo in itertools.product(*axes))


def key_fraction(layout: Layout, window: Window, tile: tuple[int, int, int] = QUERY_TILE) -> float:
    """The share of the dense score matrix the window computes (1.0: dense)."""
    total = 0
    for query, keys in tile_plan(layout, window, tile):
        total += math.prod(b - a for a, b in query) * math.prod(b - a for a, b in keys)
    return total / math.prod(layout) ** 2


def sliding_tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Layout, window: Window,
                           dense, bias: torch.Tensor | None = None, return_lse: bool = False,
                           tile: tuple[int, int, int] = QUERY_TILE) -> torch.Tensor:
    """Self-attention of q/k/v (B, L, H, D) over the token grid ``layout`` (L = its product; q may
    carry padding rows past it, answered with zeros) restricted to ``window``, each tile by
    ``dense(q, k, v)`` (a backend's kernel)."""
    if bias is not None:
        raise ValueError("sliding-tile attention takes no score bias (it is for self-attention)")
    if return_lse:
        raise ValueError("sliding-tile attention does not combine with ring attention (no log-sum-exp across tiles): "
                         "use Ulysses sequence parallelism (ring_size=1) with sta_window")
    length = math.prod(layout)
    if k.shape[1] != length:
        raise ValueError(f"sliding-tile attention: {k.shape[1]} keys for a token grid of {length}")
    b, lq, heads, d = q.shape
    grid = (b, *layout, heads, d)
    qg, kg, vg = q[:, :length].reshape(grid), k.reshape(grid), v.reshape(grid)
    out = q.new_empty(b, length, heads, d)
    og = out.view(grid)
    for (qf, qh, qw), (kf, kh, kw) in tile_plan(layout, window, tile):
        def box(t, f, h, w):
            return t[:, f[0]:f[1], h[0]:h[1], w[0]:w[1]].reshape(b, -1, heads, d)
        result = dense(box(qg, qf, qh, qw), box(kg, kf, kh, kw), box(vg, kf, kh, kw))
        og[:, qf[0]:qf[1], qh[0]:qh[1], qw[0]:qw[1]] = result.view(
            b, qf[1] - qf[0], qh[1] - qh[0], qw[1] - qw[0], heads, d)
    return out if lq == length else torch.cat([out, out.new_zeros(b, lq - length, heads, d)], dim=1)
