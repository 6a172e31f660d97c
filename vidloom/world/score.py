"""Analytic scoring of a generated clip: the moving object's colour, direction and shape.

The object is the set of pixels far from the background colour (estimated from the frame
border). Colour: the nearest palette colour to the object's mean colour. Direction: the
dominant axis and sign of the object's centroid displacement over the clip. Shape: how much
of its bounding box the silhouette fills (square ~1, circle ~pi/4, triangle ~1/2).

Per frame and per latent-frame span (the pixel frames one latent frame of a causal 4x VAE
decodes to: frame 0 alone, then runs of 4) the same colour and shape reading, so a defect
confined to a few frames is visible; and two temporal-consistency figures: the largest change of
the object's mean colour (RGB distance, colours in [0, 1]) and of its area (relative) between
consecutive frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .clips import COLORS

SQUARE_MIN_FILL = 0.90
CIRCLE_MIN_FILL = 0.66
MIN_TRAVEL = 4.0  # pixels; less is "none"


TEMPORAL_FACTOR = 4  # pixel frames per latent frame after the first (Wan's causal VAEs)
MIN_FRAME_PIXELS = 10  # an object smaller than this in a frame counts as absent there


@dataclass
class ClipScore:
    color: str | None
    direction: str | None
    shape: str | None
    travel: float  # pixels the centroid moved
    fill: float  # silhouette area / bounding box area (middle frames)
    frame_colors: list[str | None] = field(default_factory=list)  # per pixel frame
    span_colors: list[str | None] = field(default_factory=list)  # per latent-frame span
    span_shapes: list[str | None] = field(default_factory=list)
    color_change: float = 0.0  # largest mean-colour distance between consecutive frames
    size_change: float = 0.0  # largest relative area change between consecutive frames

    def worst_span(self, color: str) -> int | None:
        """The first span whose colour is not ``color`` (None: every span has it)."""
        return next((i for i, c in enumerate(self.span_colors) if c != color), None)


def latent_spans(frames: int, factor: int = TEMPORAL_FACTOR) -> list[tuple[int, int]]:
    """[start, end) pixel-frame ranges, one per latent frame: (0, 1), (1, 1 + factor), ..."""
    return [(0, 1)] + [(a, min(a + factor, frames)) for a in range(1, frames, factor)]


def _object_masks(frames: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """(T, H, W, 3) -> (T, H, W) bool: pixels whose colour is far from the border's median."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)  # (T, 4W, 3)
    background = np.median(border.reshape(-1, 3), axis=0)
    return np.linalg.norm(frames - background, axis=-1) > threshold


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return None
    return float(xs.mean()), float(ys.mean())


def _direction(masks: np.ndarray) -> tuple[str | None, float]:
    track = [c for c in (_centroid(m) for m in masks) if c is not None]
    if len(track) < 2:
        return None, 0.0
    k = max(1, len(track) // 4)
    # average the first and last quarters of the track: robust to a noisy frame
    start, end = np.mean(track[:k], axis=0), np.mean(track[-k:], axis=0)
    dx, dy = end - start
    travel = float(np.hypot(dx, dy))
    if travel < MIN_TRAVEL:
        return None, travel
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), travel
    return ("down" if dy > 0 else "up"), travel


def _fill(mask: np.ndarray) -> float | None:
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return float(len(xs) / box)


def _shape(masks: np.ndarray) -> tuple[str | None, float]:
    t = len(masks)
    fills = [f for f in (_fill(m) for m in masks[t // 4: t - t // 4 or t]) if f is not None]
    if not fills:
        return None, 0.0
    fill = float(np.median(fills))
    return _shape_of(fill), fill


def _shape_of(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def _span_shape(masks: np.ndarray) -> str | None:
    fills = [f for f in (_fill(m) for m in masks) if f is not None]
    return _shape_of(float(np.median(fills))) if fills else None


def _mean_color(frames: np.ndarray, masks: np.ndarray) -> np.ndarray | None:
    return frames[masks].mean(axis=0) if masks.sum() >= MIN_FRAME_PIXELS else None


def _nearest(mean: np.ndarray | None) -> str | None:
    if mean is None:
        return None
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names])
    return names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))]


def _color(frames: np.ndarray, masks: np.ndarray) -> str | None:
    return _nearest(_mean_color(frames, masks))


def _largest_change(values: list, distance) -> float:
    """Largest ``distance(a, b)`` over consecutive frames; a frame without an object next to one
    with it counts as a whole change (inf is avoided: 1.0 for sizes, the RGB diagonal for colours)."""
    worst = 0.0
    for a, b in zip(values, values[1:]):
        if a is None and b is None:
            continue
        worst = max(worst, distance(a, b))
    return worst


def _color_distance(a, b) -> float:
    return float(np.sqrt(3.0)) if a is None or b is None else float(np.linalg.norm(a - b))


def _size_distance(a, b) -> float:
    return 1.0 if a is None or b is None else abs(a - b) / max(a, b)


def score_clip(frames: np.ndarray) -> ClipScore:
    """Score frames (T, H, W, 3) float in [0, 1] (or uint8)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / 255.0
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (T, H, W, 3), got {frames.shape}")
    masks = _object_masks(frames)
    direction, travel = _direction(masks)
    shape, fill = _shape(masks)
    means = [_mean_color(f, m) for f, m in zip(frames, masks)]
    areas = [float(m.sum()) if m.sum() >= MIN_FRAME_PIXELS else None for m in masks]
    spans = latent_spans(len(frames))
    return ClipScore(
        color=_color(frames, masks), direction=direction, shape=shape, travel=travel, fill=fill,
        frame_colors=[_nearest(m) for m in means],
        span_colors=[_color(frames[a:b], masks[a:b]) for a, b in spans],
        span_shapes=[_span_shape(masks[a:b]) for a, b in spans],
        color_change=_largest_change(means, _color_distance), size_change=_largest_change(areas, _size_distance))
