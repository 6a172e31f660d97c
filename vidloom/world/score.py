"""Analytic scoring of a generated clip: the moving object's colour, direction and shape.

The object is the set of pixels far from the background colour (estimated from the frame
border). Colour: the nearest palette colour to the object's mean colour. Direction: the
dominant axis and sign of the object's centroid displacement over the clip. Shape: how much
of its bounding box the silhouette fills (square ~1, circle ~pi/4, triangle ~1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clips import COLORS

SQUARE_MIN_FILL = 0.90
CIRCLE_MIN_FILL = 0.66
MIN_TRAVEL = 4.0  # pixels; less is "none"


@dataclass
class ClipScore:
    color: str | None
    direction: str | None
    shape: str | None
    travel: float  # pixels the centroid moved
    fill: float  # silhouette area / bounding box area (middle frames)


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
    if fill >= SQUARE_MIN_FILL:
        return "square", fill
    if fill >= CIRCLE_MIN_FILL:
        return "circle", fill
    return "triangle", fill


def _color(frames: np.ndarray, masks: np.ndarray) -> str | None:
    if masks.sum() < 10:
        return None
    mean = frames[masks].mean(axis=0)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names])
    return names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))]


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
    return ClipScore(color=_color(frames, masks), direction=direction, shape=shape, travel=travel, fill=fill)
