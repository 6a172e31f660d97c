"""``make demo``: generate a video with the shipped model and say what is in it.

The shipped model (``vidloom.default_model``) is a small Wan2.1-architecture model trained on
the procedural world, so the demo runs on a fresh machine with no download. After writing the
video it scores it with ``vidloom.world.score_clip`` (colour, shape and direction of the moving
object, measured from the pixels) and prints that next to the prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING, DEFAULT_PROMPT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.demo")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--output", default="outputs/demo.mp4")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from . import VideoGenerator
    from .world import score_clip

    start = time.perf_counter()
    generator = VideoGenerator.from_pretrained(args.model, dtype="fp32")
    out = generator.generate(args.prompt, output_path=args.output, seed=args.seed, **DEFAULT_MODEL_SAMPLING)
    seconds = time.perf_counter() - start
    score = score_clip(out.frames)
    seen = f"a {score.color} {score.shape} moving {score.direction}"
    p = out.params
    print(f"prompt: {args.prompt!r}\nseen in the video (measured from its pixels): {seen!r}")
    print(f"wrote {out.path.resolve()} ({p.num_frames} frames, {p.width}x{p.height}, {p.num_inference_steps} steps) "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
