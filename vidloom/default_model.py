"""The model that ships with vidloom: a small Wan2.1-architecture text-to-video model trained on
the procedural world (``vidloom.world``), in Diffusers layout inside the package.

It knows captions of the form ``a {color} {shape} moving {direction}`` (colors red, green, blue,
yellow, magenta, white; shapes circle, square, triangle; directions left, right, up, down) at
64x64 pixels and 17 frames. ``vidloom generate`` and ``make demo`` use it when no ``--model`` is
given; diffusers' ``WanPipeline.from_pretrained`` loads the same folder.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "wan-shapes-64"
# the size and settings it was trained and measured at (benchmarks/quality.py)
DEFAULT_MODEL_SAMPLING = dict(height=64, width=64, num_frames=17, num_inference_steps=20, guidance_scale=5.0)
DEFAULT_PROMPT = "a red circle moving right"
