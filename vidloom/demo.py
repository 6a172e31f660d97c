"""``make demo``: generate videos with the shipped models and say what is in them.

The shipped models (``vidloom.default_model``) are small Wan-architecture models trained on the
procedural world, so the demo runs on a fresh machine with no download. It writes a
text-to-video result from the default model, the same prompt again with the model's 4-step
distilled adapter (``--lora distill-4step``: 4 steps without guidance instead of 20 with it, and
how much less denoising time it took), then an image-to-video result from its sibling,
starting from a first frame the world draws (written next to it as a PNG). Each video is scored
from its pixels with ``vidloom.world.score_clip`` (colour, shape and direction of the moving
object) and that is printed next to the prompt; for image-to-video also how closely the video's
first frame keeps the given one (PSNR).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .default_model import (
    DEFAULT_I2V_MODEL_DIR, DEFAULT_I2V_PROMPT, DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING, DEFAULT_PROMPT,
    DISTILLED_ADAPTER,
)


def seen(frames: np.ndarray) -> str:
    from .world import score_clip

    score = score_clip(frames)
    return f"a {score.color} {score.shape} moving {score.direction}"


def world_first_frame(prompt: str, seed: int) -> np.ndarray:
    """(64, 64, 3) float: frame 0 of the world's clip for ``prompt`` (``a {color} {shape} moving {direction}``)."""
    from .world import ClipSpec, make_clip

    words = prompt.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise SystemExit(f"--i2v-prompt: expected 'a COLOR SHAPE moving DIRECTION', got {prompt!r}")
    try:
        clip = make_clip(ClipSpec(words[1], words[2], words[4]), np.random.default_rng(seed),
                         frames=DEFAULT_MODEL_SAMPLING["num_frames"], size=DEFAULT_MODEL_SAMPLING["height"])
    except ValueError as exc:
        raise SystemExit(f"--i2v-prompt: {exc}") from exc
    return clip.frames[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.demo")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--output", default="outputs/demo.mp4")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--i2v-model", type=Path, default=DEFAULT_I2V_MODEL_DIR)
    parser.add_argument("--i2v-output", default="outputs/demo_i2v.mp4")
    parser.add_argument("--i2v-prompt", default=DEFAULT_I2V_PROMPT)
    parser.add_argument("--no-i2v", action="store_true", help="text-to-video only")
    parser.add_argument("--fast-output", default="outputs/demo_4step.mp4",
                        help=f"the same prompt with the {DISTILLED_ADAPTER} adapter ('' to skip)")
    args = parser.parse_args(argv)

    from PIL import Image

    from . import VideoGenerator

    start = time.perf_counter()
    generator = VideoGenerator.from_pretrained(args.model, dtype="fp32")
    out = generator.generate(args.prompt, output_path=args.output, seed=args.seed, **DEFAULT_MODEL_SAMPLING)
    seconds = time.perf_counter() - start
    p = out.params
    print(f"prompt: {args.prompt!r}\nseen in the video (measured from its pixels): {seen(out.frames)!r}")
    print(f"wrote {out.path.resolve()} ({p.num_frames} frames, {p.width}x{p.height}, {p.num_inference_steps} steps) "
          f"in {seconds:.1f} s")
    if args.fast_output:  # the same prompt with the model's 4-step distilled adapter (no guidance)
        fast = VideoGenerator.from_pretrained(args.model, dtype="fp32", loras=[DISTILLED_ADAPTER])
        size = {k: DEFAULT_MODEL_SAMPLING[k] for k in ("height", "width", "num_frames")}
        quick = fast.generate(args.prompt, output_path=args.fast_output, seed=args.seed, **size)
        q = quick.params
        print(f"with --lora {DISTILLED_ADAPTER} ({q.num_inference_steps} steps, guidance {q.guidance_scale:g}): "
              f"seen {seen(quick.frames)!r}; denoising {quick.timings['denoising']:.2f} s instead of "
              f"{out.timings['denoising']:.2f} s ({out.timings['denoising'] / quick.timings['denoising']:.1f}x)")
        print(f"wrote {quick.path.resolve()}")
    if args.no_i2v:
        return 0

    start = time.perf_counter()
    image = world_first_frame(args.i2v_prompt, args.seed)
    image_path = Path(args.i2v_output).with_name(Path(args.i2v_output).stem + "_first_frame.png")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(image_path)
    generator = VideoGenerator.from_pretrained(args.i2v_model, dtype="fp32")
    out = generator.generate(args.i2v_prompt, image=image_path, output_path=args.i2v_output, seed=args.seed,
                             **DEFAULT_MODEL_SAMPLING)
    seconds = time.perf_counter() - start
    given = np.asarray(Image.open(image_path), dtype=np.float32) / 255
    keep = 10 * np.log10(1 / max(float(np.mean((out.frames[0] - given) ** 2)), 1e-10))
    print(f"image-to-video: first frame {image_path.resolve()} (drawn by the world), prompt {args.i2v_prompt!r}")
    print(f"seen in the video (measured from its pixels): {seen(out.frames)!r}; its first frame keeps the given one "
          f"at {keep:.1f} dB PSNR")
    print(f"wrote {out.path.resolve()} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
