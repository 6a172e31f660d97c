"""A procedural video world (coloured shapes moving on a dark background) and its analytic scorer.

It is the training data of the project's small default model and the ground truth of its
quality benchmark.
"""

from .clips import COLORS, DIRECTIONS, SHAPES, Clip, ClipSpec, caption, held_out_specs, make_clip, train_specs
from .score import ClipScore, latent_spans, score_clip

__all__ = [
    "COLORS", "DIRECTIONS", "SHAPES", "Clip", "ClipScore", "ClipSpec", "caption", "held_out_specs", "make_clip",
    "latent_spans", "score_clip", "train_specs",
]
