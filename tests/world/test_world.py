"""The procedural world: determinism, captions, held-out split, and the scorer on ground truth."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vidloom.world import (
    COLORS, DIRECTIONS, SHAPES, ClipSpec, held_out_specs, latent_spans, make_clip, score_clip, train_specs,
)
from vidloom.world.clips import all_specs


def test_clips_are_deterministic_per_seed():
    spec = ClipSpec("red", "circle", "left")
    a = make_clip(spec, np.random.default_rng(7))
    b = make_clip(spec, np.random.default_rng(7))
    c = make_clip(spec, np.random.default_rng(8))
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (17, 64, 64, 3) and a.frames.dtype == np.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0


def test_captions_and_vocabulary():
    assert ClipSpec("magenta", "triangle", "up").caption == "a magenta triangle moving up"
    assert {"red", "green", "blue", "yellow", "magenta", "white"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES) and set(DIRECTIONS) == {"left", "right", "up", "down"}


def test_held_out_split():
    held, train = held_out_specs(), train_specs()
    assert len(set(held)) == len(held) == 12
    assert not set(held) & set(train) and len(held) + len(train) == len(all_specs())
    # every word of a held-out caption is seen in training, in other combinations
    assert Counter(s.color for s in held) == Counter({c: 2 for c in COLORS})
    assert set(s.shape for s in held) == set(SHAPES) and set(s.direction for s in held) == set(DIRECTIONS)


def test_motion_goes_the_captioned_way():
    for direction, (dx, dy) in DIRECTIONS.items():
        clip = make_clip(ClipSpec("white", "square", direction), np.random.default_rng(1))
        move = clip.centers[-1] - clip.centers[0]
        assert np.sign(move[0]) == dx and np.sign(move[1]) == dy
        assert np.hypot(*move) > 15  # plainly visible: at least a quarter of the frame


def test_scorer_recognises_ground_truth_clips():
    rng = np.random.default_rng(123)
    specs = all_specs() * 3
    hits = Counter()
    color_changes, size_changes = [], []
    for spec in specs:
        s = score_clip(make_clip(spec, rng).frames)
        hits["color"] += s.color == spec.color
        hits["direction"] += s.direction == spec.direction
        hits["shape"] += s.shape == spec.shape
        assert len(s.frame_colors) == 17 and len(s.span_colors) == len(s.span_shapes) == 5
        hits["every frame's colour"] += all(c == spec.color for c in s.frame_colors)
        hits["every span's colour"] += s.worst_span(spec.color) is None
        hits["every span's shape"] += all(shape == spec.shape for shape in s.span_shapes)
        color_changes.append(s.color_change)
        size_changes.append(s.size_change)
    for metric in hits:
        assert hits[metric] / len(specs) >= 0.99, (metric, hits[metric], len(specs))
    # a steady object: colour and size barely change from frame to frame
    assert np.mean(color_changes) < 0.06 and np.mean(size_changes) < 0.08


def plant_color(frames: np.ndarray, first: int, rgb) -> np.ndarray:
    """The object's pixels from frame ``first`` on repainted ``rgb``."""
    frames = frames.copy()
    mask = np.linalg.norm(frames - np.array([0.06, 0.06, 0.08]), axis=-1) > 0.3
    frames[first:][mask[first:]] = rgb
    return frames


def test_scorer_flags_a_colour_change_in_the_last_frames():
    # the shipped first edition's fault: a white object turning magenta over the last frames
    clip = make_clip(ClipSpec("white", "triangle", "right"), np.random.default_rng(3))
    steady = score_clip(clip.frames)
    drifted = score_clip(plant_color(clip.frames, 13, COLORS["magenta"]))
    assert steady.worst_span("white") is None
    assert drifted.color == "white"  # the clip's mean colour does not see it ...
    assert drifted.span_colors == ["white"] * 4 + ["magenta"]  # ... the last span does
    assert drifted.frame_colors[12:] == ["white"] + ["magenta"] * 4 and drifted.worst_span("white") == 4
    assert drifted.color_change > 0.5 > 3 * steady.color_change
    assert drifted.size_change == pytest.approx(steady.size_change, abs=0.05)


def test_scorer_flags_an_object_that_vanishes_or_shrinks():
    clip = make_clip(ClipSpec("red", "square", "down"), np.random.default_rng(4))
    frames = clip.frames.copy()
    frames[10:] = frames[0, 0, 0]  # background only from frame 10
    s = score_clip(frames)
    assert s.frame_colors[10:] == [None] * 7 and s.span_colors[-1] is None and s.size_change == 1.0


def test_latent_spans():
    assert latent_spans(17) == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]
    assert latent_spans(1) == [(0, 1)] and latent_spans(7) == [(0, 1), (1, 5), (5, 7)]


def test_scorer_on_empty_and_static_clips():
    empty = np.full((17, 64, 64, 3), 0.05, dtype=np.float32)
    s = score_clip(empty)
    assert s.color is None and s.direction is None and s.shape is None
    static = make_clip(ClipSpec("red", "square", "left"), np.random.default_rng(0)).frames[:1].repeat(17, axis=0)
    assert score_clip(static).direction is None
    with pytest.raises(ValueError, match="frames"):
        score_clip(np.zeros((17, 64, 64)))
