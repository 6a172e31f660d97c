"""Prompt-following quality of a model trained on the procedural world, scored analytically.

    python benchmarks/quality.py --model DIR [--steps 4,8,20] [--guidance-scale 3,5] [--seeds 2]
                                 [--sheet quality.png] [--device cpu] [--dtype fp32]
                                 [--refine SCALE:STRENGTH[:STEPS]] [--i2v] [--ground-truth]
                                 [--cache SPEC[,SPEC...]] [--sta F,H,W[/F,H,W...]] [--lora NAME]
                                 [--quantize int8|fp8] [--quantize-text-encoder int8|fp8]

For a fixed list of prompts (the held-out combinations and as many trained ones), it generates
videos and scores each from its pixels (``vidloom.world.score_clip``): the colour of the moving
object over the clip and in every latent-frame span (frame 0, then runs of 4 frames: a drift
confined to the last frames shows there), the direction of its centroid track, its shape from the
silhouette (over the middle frames and per span), and two temporal-consistency figures, the
largest colour change and the largest relative size change between consecutive frames (means over
the clips; ground-truth clips give about 0.03 and 0.05).

``--guidance-scale`` takes one scale or several (default: the shipped models' setting,
``DEFAULT_MODEL_SAMPLING``); each (steps, guidance) pair is a row.

Columns: ``cfg`` (the guidance scale), ``color`` (clip mean colour right), ``col/span`` (share of
clips whose every span has the right colour), ``worst`` (accuracy of the worst span, and which
span it is, ``@k``), ``dir``, ``shape``, ``shp/span`` (every span's shape right), ``dcolor``,
``dsize``. A per-span row for each split follows. ``--ground-truth`` scores world clips first, the scorer's ceiling.

``--i2v`` (a model that takes a first frame: a TI2V-style folder): each prompt's first frame is
drawn by the world for that prompt (colour, shape and a start from which the named motion stays in
the frame), and the columns add ``keep dB``, the PSNR of the generated first frame against it.

``--cache block:F1B1:0.1,cfg-gate:0.5`` also runs each feature-cache setting (``SamplingParams.cache``)
as its own mode, named by the spec (the mode column shows its first 9 characters).

``--sta 3,4,4/1,2,2`` also runs sliding-tile attention with each window (``SamplingParams.sta_window``,
tokens per axis) as its own mode, named ``sta F,H,W``.

``--lora distill-4step`` also runs the model with that adapter merged, at the steps and guidance
it was trained for (its file's ``vidloom_sampling``), as its own mode. ``denoise`` is the mean
denoising time per video (the ``denoising`` stage's timing), ``s/video`` the whole call's.

``--refine 2:0.6`` also runs two-stage generation (``RefineParams(scale=2, strength=0.6)``: the base
pass at half the size, the refine pass at full size) in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_result  # noqa: E402

SPLITS = ("held-out", "trained")


def prompt_list() -> list[tuple[str, object, bool]]:
    """(caption, spec, held_out) for the 12 held-out combinations and 12 trained ones."""
    from vidloom.world import held_out_specs, train_specs

    trained = train_specs()[::5][:12]
    return [(s.caption, s, True) for s in held_out_specs()] + [(s.caption, s, False) for s in trained]


def first_frame(spec, seed: int, frames: int, size: int) -> np.ndarray:
    """(H, W, 3) float: frame 0 of the world's clip of ``spec`` for this seed."""
    from vidloom.world import make_clip

    return make_clip(spec, np.random.default_rng([seed, 1000]), frames=frames, size=size).frames[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-10)))


class Tally:
    """Per-clip scores of one split, reduced to the figures the table prints."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, score, spec, keep_db: float | None = None) -> None:
        self.rows.append(dict(
            color=score.color == spec.color, direction=score.direction == spec.direction,
            shape=score.shape == spec.shape, spans=[c == spec.color for c in score.span_colors],
            span_shapes=[s == spec.shape for s in score.span_shapes], color_change=score.color_change,
            size_change=score.size_change, keep_db=keep_db))

    def summary(self) -> dict:
        rows = self.rows
        per_span = np.mean([r["spans"] for r in rows], axis=0)
        out = {m: float(np.mean([r[m] for r in rows])) for m in ("color", "direction", "shape")}
        out.update(
            color_every_span=float(np.mean([all(r["spans"]) for r in rows])),
            color_per_span=[float(v) for v in per_span], color_worst_span=float(per_span.min()),
            worst_span=int(per_span.argmin()),
            shape_every_span=float(np.mean([all(r["span_shapes"]) for r in rows])),
            color_change=float(np.mean([r["color_change"] for r in rows])),
            size_change=float(np.mean([r["size_change"] for r in rows])), clips=len(rows))
        if rows[0]["keep_db"] is not None:
            out["first_frame_psnr_db"] = float(np.mean([r["keep_db"] for r in rows]))
        return out


HEADER = (f"{'steps':>5} {'cfg':>4} {'mode':>9} {'split':>8} {'color':>6} {'col/span':>8} {'worst':>9} {'dir':>5} "
          f"{'shape':>6} {'shp/span':>8} {'dcolor':>6} {'dsize':>6}")


def row(steps, cfg, mode, split, s: dict, per_video: float | None, denoise: float | None = None) -> str:
    worst = f"{s['color_worst_span']:.2f}@{s['worst_span']}"
    line = (f"{steps:>5} {cfg:>4g} {mode:>9} {split:>8} {s['color']:>6.2f} {s['color_every_span']:>8.2f} {worst:>9} "
            f"{s['direction']:>5.2f} {s['shape']:>6.2f} {s['shape_every_span']:>8.2f} {s['color_change']:>6.3f} "
            f"{s['size_change']:>6.3f}")
    if "first_frame_psnr_db" in s:
        line += f" {s['first_frame_psnr_db']:>7.1f}"
    return line + ("" if per_video is None else f" {per_video:>8.2f}") + ("" if denoise is None else f" {denoise:>8.3f}")


def contact_sheet(rows: list[np.ndarray], path: Path) -> None:
    """rows: (k, H, W, 3) float frames per prompt -> one PNG, a row per prompt."""
    from PIL import Image

    sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(np.round(np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", default="4,8,20")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--guidance-scale", default=None,
                        help="one scale or a comma list (default: the shipped models' setting)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--sheet", type=Path, default=Path("outputs/quality.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the engine's choice for the device)")
    parser.add_argument("--refine", default=None, metavar="SCALE:STRENGTH[:STEPS]",
                        help="also measure two-stage generation with these RefineParams")
    parser.add_argument("--i2v", action="store_true", help="give each prompt a first frame drawn by the world")
    parser.add_argument("--ground-truth", action="store_true", help="score the world's own clips first")
    parser.add_argument("--cache", default=None, metavar="SPEC[,SPEC...]",
                        help="also run with each feature-cache setting, each as its own mode")
    parser.add_argument("--quantize", default=None, choices=("int8", "fp8"),
                        help="the transformer's blocks quantized (EngineConfig.quantize)")
    parser.add_argument("--quantize-text-encoder", default=None, choices=("int8", "fp8"))
    parser.add_argument("--lora", default=None, metavar="NAME[,NAME...]",
                        help="also run with each adapter merged (a file, or one of the folder's, e.g. distill-4step) "
                             "at the steps and guidance it was trained for")
    parser.add_argument("--sta", default=None, metavar="F,H,W[/F,H,W...]",
                        help="also run sliding-tile attention with each window (tokens), each as its own mode")
    args = parser.parse_args()

    from vidloom import RefineParams, VideoGenerator
    from vidloom.default_model import DEFAULT_MODEL_SAMPLING
    from vidloom.world import make_clip, score_clip

    guidances = ([float(g) for g in args.guidance_scale.split(",")] if args.guidance_scale
                 else [DEFAULT_MODEL_SAMPLING["guidance_scale"]])
    modes = [("one-stage", None, None, None)]  # (name, refine, cache, sliding-tile window)
    if args.refine:
        scale, strength, *steps = args.refine.split(":")
        modes.append(("two-stage", RefineParams(scale=int(scale), strength=float(strength),
                                                steps=int(steps[0]) if steps else None), None, None))
    modes += [(spec, None, spec, None) for spec in (args.cache.split(",") if args.cache else [])]
    modes += [(f"sta {w}", None, None, w) for w in (args.sta.split("/") if args.sta else [])]

    gen = VideoGenerator.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                         quantize_text_encoder=args.quantize_text_encoder)
    prompts = prompt_list()
    kind = "image-to-video (first frame from the world)" if args.i2v else "text-to-video"
    dit_dtype = str(gen.config.resolved_dtypes()["transformer"]).removeprefix("torch.")
    quantized = "".join(f"; {what} {mode}" for what, mode in (("quantized", args.quantize),
                                                              ("text encoder", args.quantize_text_encoder)) if mode)
    print(f"machine: {machine_description()}\nmodel: {args.model}{quantized}; {kind}; transformer in {dit_dtype}; "
          f"{len(prompts)} prompts x {args.seeds} seeds; spans of {args.frames} frames: frame 0, then 4 at a time")
    print(HEADER + (f" {'keep dB':>7}" if args.i2v else "") + f" {'s/video':>8} {'denoise':>8}")
    results, sheet_rows = [], []
    if args.ground_truth:
        tallies = {split: Tally() for split in SPLITS}
        for caption, spec, held in prompts:
            for seed in range(args.seeds):
                clip = make_clip(spec, np.random.default_rng([seed, 1000]), frames=args.frames, size=args.size)
                tallies["held-out" if held else "trained"].add(score_clip(clip.frames), spec)
        for split, tally in tallies.items():
            s = tally.summary()
            results.append(dict(steps=0, mode="world", split=split, **s))
            print(row(0, 0, "world", split, s, None))
    all_steps = [int(s) for s in args.steps.split(",")]

    def run(generator, steps, cfg, mode, refine=None, cache=None, window=None, sheet=False, **extra):
        tallies = {split: Tally() for split in SPLITS}
        start, denoising = time.perf_counter(), 0.0
        for caption, spec, held in prompts:
            for seed in range(args.seeds):
                image = first_frame(spec, seed, args.frames, args.size) if args.i2v else None
                out = generator.generate(caption, height=args.size, width=args.size, num_frames=args.frames,
                                         num_inference_steps=steps, guidance_scale=cfg, seed=seed,
                                         refine=refine, image=image, cache=cache, sta_window=window, **extra)
                frames, denoising = out.frames, denoising + out.timings.get("denoising", 0.0)
                keep = psnr(frames[0], image) if image is not None else None
                tallies["held-out" if held else "trained"].add(score_clip(frames), spec, keep)
                if sheet and seed == 0:
                    picks = [0, 4, 8, 12, len(frames) - 1]
                    sheet_rows.append(frames[[p for p in picks if p < len(frames)]])
        videos = sum(len(t.rows) for t in tallies.values())
        per_video, denoise = (time.perf_counter() - start) / videos, denoising / videos
        for split, tally in tallies.items():
            s = tally.summary()
            results.append(dict(steps=steps, guidance_scale=cfg, mode=mode,
                                refine=None if refine is None else str(refine), split=split, **s,
                                seconds_per_video=per_video, denoising_seconds_per_video=denoise))
            print(row(steps, cfg, mode, split, s, per_video, denoise))
        for split in SPLITS:
            spans = next(r["color_per_span"] for r in results[::-1] if r["split"] == split)
            print(f"{'':>5} {'':>4} {'':>9} {split:>8} colour per span: " + " ".join(f"{v:.2f}" for v in spans))

    for cfg, steps in itertools.product(guidances, all_steps):
        for mode, refine, cache, window in modes:
            run(gen, steps, cfg, mode, refine, cache, window,
                sheet=(steps == max(all_steps) and cfg == guidances[0] and refine is None and cache is None
                       and window is None))
    for lora in (args.lora.split(",") if args.lora else []):
        # the adapter merged, at the settings it was trained for (its file's vidloom_sampling)
        adapted = VideoGenerator.from_pretrained(args.model, device=args.device, dtype=args.dtype, loras=[lora])
        settings = dict(adapted.request_defaults)
        steps = settings.pop("num_inference_steps", max(all_steps))
        cfg = settings.pop("guidance_scale", guidances[0])
        run(adapted, steps, cfg, f"lora {Path(lora).stem}"[:9], **settings)
        del adapted
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet_rows, args.sheet)
    held = [r for r in results if r["split"] == "held-out" and r["mode"] == "one-stage"
            and r["guidance_scale"] == guidances[0]]
    best = max(held, key=lambda r: r["steps"])
    print(f"summary: held-out at {best['steps']} steps, guidance {guidances[0]:g}: color {best['color']:.2f} "
          f"(every span {best['color_every_span']:.2f}, worst span {best['color_worst_span']:.2f}), direction "
          f"{best['direction']:.2f}, shape {best['shape']:.2f}; contact sheet {args.sheet} (frames 0, 4, 8, 12, last)")
    write_result("quality_i2v" if args.i2v else "quality", dict(machine=machine_description(), model=str(args.model),
                                                                 i2v=args.i2v, dtype=dit_dtype, quantize=args.quantize,
                                                                 quantize_text_encoder=args.quantize_text_encoder,
                                                                 results=results))


if __name__ == "__main__":
    main()
