"""The 4-step distilled adapter of the shipped model against its teacher, in one run.

    python benchmarks/distill.py [--model DIR] [--lora distill-4step] [--seeds 4] [--dtype fp32]

Rows, each over the quality benchmark's 24 prompts (12 held-out, 12 trained) x ``--seeds``:
the teacher (the folder's default: 20 steps, guidance 3), the adapter at the settings it was
trained for (4 steps, no guidance), and the base model at those same settings without the
adapter (4 steps, guidance 1 and guidance 3): what the distillation adds over just taking fewer
steps. Columns: the quality benchmark's accuracies (``benchmarks/quality.py``), ``PSNR`` of each
video against the teacher's video for the same prompt and seed (the distillation's target), the
mean denoising time per video (the ``denoising`` stage's timing) and its ratio to the teacher's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_result  # noqa: E402
from quality import SPLITS, Tally, prompt_list, psnr  # noqa: E402


def main() -> None:
    from vidloom import VideoGenerator
    from vidloom.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING
    from vidloom.world import score_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--lora", default="distill-4step")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the engine's choice)")
    parser.add_argument("--repeats", type=int, default=1, help="time each mode this many times (the best kept)")
    args = parser.parse_args()

    base = VideoGenerator.from_pretrained(args.model, dtype=args.dtype)
    student = VideoGenerator.from_pretrained(args.model, dtype=args.dtype, loras=[args.lora])
    trained_for = dict(student.request_defaults)
    size = {k: DEFAULT_MODEL_SAMPLING[k] for k in ("height", "width", "num_frames")}
    teacher_settings = {k: DEFAULT_MODEL_SAMPLING[k] for k in ("num_inference_steps", "guidance_scale")}
    few = trained_for["num_inference_steps"]
    modes = [("teacher", base, teacher_settings), (f"{args.lora}", student, trained_for),
             ("base, same steps", base, dict(trained_for, guidance_scale=1.0)),
             ("base, guided", base, dict(trained_for, guidance_scale=teacher_settings["guidance_scale"]))]
    prompts = prompt_list()
    dtype = str(base.config.resolved_dtypes()["transformer"]).removeprefix("torch.")
    print(f"machine: {machine_description()}\nmodel: {args.model}; adapter {args.lora} (trained for {trained_for}); "
          f"transformer in {dtype}; {len(prompts)} prompts x {args.seeds} seeds")
    print(f"{'mode':>17} {'steps':>5} {'cfg':>4} {'split':>8} {'color':>6} {'col/span':>8} {'dir':>5} {'shape':>6} "
          f"{'shp/span':>8} {'dcolor':>6} {'PSNR':>6} {'denoise s':>9} {'ratio':>6}")
    teacher_frames, results = {}, []
    for name, gen, settings in modes:
        tallies = {split: Tally() for split in SPLITS}
        psnrs = {split: [] for split in SPLITS}
        times = []
        for caption, spec, held in prompts:
            for seed in range(args.seeds):
                best = None
                for _ in range(args.repeats):
                    out = gen.generate(caption, seed=seed, **size, **settings)
                    best = min(best or np.inf, out.timings["denoising"])
                times.append(best)
                split = "held-out" if held else "trained"
                tallies[split].add(score_clip(out.frames), spec)
                if name == "teacher":
                    teacher_frames[caption, seed] = out.frames
                else:
                    psnrs[split].append(psnr(out.frames, teacher_frames[caption, seed]))
        denoise = float(np.mean(times))
        if name == "teacher":
            teacher_time = denoise
        for split in SPLITS:
            s = tallies[split].summary()
            p = float(np.mean(psnrs[split])) if psnrs[split] else float("nan")
            results.append(dict(mode=name, split=split, psnr_vs_teacher=p, denoising_seconds_per_video=denoise,
                                speedup=teacher_time / denoise, **settings, **s))
            print(f"{name:>17} {settings['num_inference_steps']:>5} {settings['guidance_scale']:>4g} {split:>8} "
                  f"{s['color']:>6.2f} {s['color_every_span']:>8.2f} {s['direction']:>5.2f} {s['shape']:>6.2f} "
                  f"{s['shape_every_span']:>8.2f} {s['color_change']:>6.3f} {p:>6.1f} {denoise:>9.3f} "
                  f"{teacher_time / denoise:>5.1f}x")
    held = {r["mode"]: r for r in results if r["split"] == "held-out"}
    t, d = held["teacher"], held[args.lora]
    gaps = {k: (t[k] - d[k]) * 100 for k in ("color_every_span", "direction", "shape")}
    print(f"summary: {args.lora} at {few} steps without guidance, held-out: colour on every span "
          f"{d['color_every_span']:.2f} (teacher {t['color_every_span']:.2f}), direction {d['direction']:.2f} "
          f"({t['direction']:.2f}), shape {d['shape']:.2f} ({t['shape']:.2f}); largest gap "
          f"{max(gaps.values()):+.0f} points; denoising {d['speedup']:.1f}x faster than the teacher")
    write_result("distill", dict(machine=machine_description(), model=str(args.model), lora=args.lora, dtype=dtype,
                                 seeds=args.seeds, time=time.strftime("%Y-%m-%d %H:%M"), results=results))


if __name__ == "__main__":
    main()
