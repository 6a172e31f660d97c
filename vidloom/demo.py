"""``make demo``: build a small random-weight Wan model folder and generate a video from it.

No trained default model ships yet and model hubs may be out of reach, so the demo model's
weights are random: the video is noise. It shows the whole engine working end to end
(loading, text encoding, denoising, decoding, export) on a fresh machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import main as cli_main
from .tiny import build_random_wan

DEFAULT_MODEL_DIR = Path(".cache/vidloom-demo-model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.demo")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--output", default="outputs/demo.mp4")
    parser.add_argument("--prompt", default="a red circle moving left")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model_index.json").is_file():
        print(f"building a random-weight Wan model in {args.model_dir} (weights are random: expect noise)")
        build_random_wan(args.model_dir, preset="demo")
    print("generating with RANDOM weights: the video shows the engine running, not a trained model")
    return cli_main([
        "generate", "--model", str(args.model_dir), "--prompt", args.prompt, "--output", args.output,
        "--height", "64", "--width", "64", "--num-frames", "17", "--steps", "20", "--guidance-scale", "5.0",
        "--dtype", "fp32",
    ])


if __name__ == "__main__":
    sys.exit(main())
