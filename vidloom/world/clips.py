"""Seeded clips of one coloured shape moving in a straight line on a dark, plain background.

Captions read ``a {color} {shape} moving {direction}``. A fixed set of colour x shape x
direction combinations is held out of training, so a model can be tested on captions it has
never seen whole (each word of them it has seen in other combinations).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.80, 0.16),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "magenta": (0.90, 0.15, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
# unit step per frame (dx, dy) in image coordinates: x to the right, y downwards
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (0.06, 0.06, 0.08)


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.direction)


@dataclass
class Clip:
    spec: ClipSpec
    frames: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    centers: np.ndarray  # (T, 2) object centre (x, y) per frame, pixels


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def all_specs() -> list[ClipSpec]:
    return [ClipSpec(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def held_out_specs() -> list[ClipSpec]:
    """12 of the 72 combinations, never trained on: every colour twice, every shape four times,
    every direction three times. Fixed, not random: i -> (i // 2, i mod 3, i mod 4) is one-to-one
    for i < 12, so the twelve are distinct."""
    colors, shapes, dirs = list(COLORS), list(SHAPES), list(DIRECTIONS)
    return [ClipSpec(colors[i // 2], shapes[i % 3], dirs[i % 4]) for i in range(12)]


def train_specs() -> list[ClipSpec]:
    held = set(held_out_specs())
    return [s for s in all_specs() if s not in held]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a shape of 'radius' r centred at (cx, cy)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sub-pixel centres, in pixels
    x, y = np.meshgrid(coords, coords)  # (n, n) each; x along width
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        half = r * 0.886  # same area as the circle of radius r
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        # upward equilateral triangle with circumradius ~1.3 r (similar area to the circle)
        R = 1.3 * r
        h = 1.5 * R
        top, base = -R, R / 2
        within_y = (dy >= top) & (dy <= base)
        half_width = (dy - top) / h * (np.sqrt(3) * R / 2 * 2) / 2
        inside = within_y & (np.abs(dx) <= half_width)
    else:
        raise ValueError(f"shape: unknown {shape!r} (allowed: {', '.join(SHAPES)})")
    # (n, n) -> (size, s, size, s) -> mean over the sub-pixels
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def make_clip(spec: ClipSpec, rng: np.random.Generator, frames: int = 17, size: int = 64) -> Clip:
    """One clip of ``spec``: radius, speed, start position and colour jitter drawn from ``rng``."""
    if spec.color not in COLORS or spec.shape not in SHAPES or spec.direction not in DIRECTIONS:
        raise ValueError(f"unknown clip spec {spec}")
    r = rng.uniform(0.10, 0.14) * size
    speed = rng.uniform(0.30, 0.45) * size / (frames - 1)  # pixels per frame: 30-45 % of the frame per clip
    dx, dy = DIRECTIONS[spec.direction]
    travel = speed * (frames - 1)
    margin = 1.3 * r + 1
    # start so that the whole path stays inside the frame
    lo_x = margin + (travel if dx < 0 else 0)
    hi_x = size - margin - (travel if dx > 0 else 0)
    lo_y = margin + (travel if dy < 0 else 0)
    hi_y = size - margin - (travel if dy > 0 else 0)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    color = np.clip(np.array(COLORS[spec.color]) + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32)
    background = np.array(BACKGROUND, dtype=np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.float32)
    centers = np.empty((frames, 2), dtype=np.float32)
    for t in range(frames):
        cx, cy = x0 + dx * speed * t, y0 + dy * speed * t
        cover = _shape_mask(spec.shape, cx, cy, r, size)[..., None]  # (H, W, 1)
        out[t] = background * (1 - cover) + color * cover
        centers[t] = (cx, cy)
    return Clip(spec, out, centers)
