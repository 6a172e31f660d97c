"""Prompt-following quality of a model trained on the procedural world, scored analytically.

    python benchmarks/quality.py --model DIR [--steps 4,8,20] [--seeds 2] [--sheet quality.png] [--device cpu]
                                 [--refine SCALE:STRENGTH[:STEPS]]

For a fixed list of prompts (the held-out combinations and as many trained ones), it generates
videos and scores each: the colour of the moving object, the direction of its centroid track and
its shape from the silhouette (``vidloom.world.score_clip``). Prints per-metric accuracy for
held-out and trained prompts at each step count, and writes a contact sheet PNG (first, middle
and last frame per prompt) so a person can look.

``--refine 2:0.6`` also runs two-stage generation (``RefineParams(scale=2, strength=0.6)``: the base
pass at half the size, the refine pass at full size) in the same run, so the two rows of each step
count compare accuracy and time with one stage at full resolution.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_result  # noqa: E402

METRICS = ("color", "direction", "shape")


def prompt_list() -> list[tuple[str, object, bool]]:
    """(caption, spec, held_out) for the 12 held-out combinations and 12 trained ones."""
    from vidloom.world import held_out_specs, train_specs

    trained = train_specs()[::5][:12]
    return [(s.caption, s, True) for s in held_out_specs()] + [(s.caption, s, False) for s in trained]


def contact_sheet(rows: list[np.ndarray], path: Path) -> None:
    """rows: (3, H, W, 3) float frames per prompt -> one PNG, a row per prompt."""
    from PIL import Image

    sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(np.round(np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", default="4,8,20")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--sheet", type=Path, default=Path("outputs/quality.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--refine", default=None, metavar="SCALE:STRENGTH[:STEPS]",
                        help="also measure two-stage generation with these RefineParams")
    args = parser.parse_args()

    from vidloom import RefineParams, VideoGenerator
    from vidloom.world import score_clip

    modes = [("one-stage", None)]
    if args.refine:
        scale, strength, *steps = args.refine.split(":")
        modes.append(("two-stage", RefineParams(scale=int(scale), strength=float(strength),
                                                steps=int(steps[0]) if steps else None)))

    gen = VideoGenerator.from_pretrained(args.model, device=args.device)
    prompts = prompt_list()
    print(f"machine: {machine_description()}\nmodel: {args.model}; {len(prompts)} prompts x {args.seeds} seeds")
    print(f"{'steps':>5} {'mode':>9} {'split':>8} " + " ".join(f"{m:>9}" for m in METRICS) + f" {'s/video':>8}")
    results, sheet_rows = [], []
    for steps in (int(s) for s in args.steps.split(",")):
        for mode, refine in modes:
            hits = {split: dict.fromkeys(METRICS, 0) for split in ("held-out", "trained")}
            counts = dict.fromkeys(hits, 0)
            start = time.perf_counter()
            for caption, spec, held in prompts:
                split = "held-out" if held else "trained"
                for seed in range(args.seeds):
                    frames = gen.generate(caption, height=args.size, width=args.size, num_frames=args.frames,
                                          num_inference_steps=steps, guidance_scale=args.guidance_scale, seed=seed,
                                          refine=refine).frames
                    score = score_clip(frames)
                    counts[split] += 1
                    for m in METRICS:
                        hits[split][m] += getattr(score, m) == getattr(spec, m)
                    if steps == max(int(s) for s in args.steps.split(",")) and seed == 0 and refine is None:
                        sheet_rows.append(frames[[0, len(frames) // 2, -1]])
            per_video = (time.perf_counter() - start) / sum(counts.values())
            for split in hits:
                acc = {m: hits[split][m] / counts[split] for m in METRICS}
                results.append(dict(steps=steps, mode=mode, refine=None if refine is None else str(refine),
                                    split=split, **acc, seconds_per_video=per_video))
                print(f"{steps:>5} {mode:>9} {split:>8} " + " ".join(f"{acc[m]:>9.2f}" for m in METRICS)
                      + f" {per_video:>8.2f}")
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet_rows, args.sheet)
    held = [r for r in results if r["split"] == "held-out" and r["mode"] == "one-stage"]
    best = max(held, key=lambda r: r["steps"])
    print(f"summary: held-out at {best['steps']} steps: color {best['color']:.2f}, direction {best['direction']:.2f}, "
          f"shape {best['shape']:.2f}; contact sheet {args.sheet}")
    write_result("quality", dict(machine=machine_description(), model=str(args.model), results=results))


if __name__ == "__main__":
    main()
