"""Feature caching on the shipped model: for each policy and threshold, the denoising stage's
speed-up against the uncached run of the same request in the same process, and the quality cost:
PSNR and SSIM of the video against the uncached video of the same seed (frames in [0, 1]).

    python benchmarks/cache.py [--model DIR] [--steps 40,20] [--prompts 3] [--caches SPEC,SPEC,...]
                               [--plot outputs/cache.png] [--size WxH --frames N]
    python benchmarks/cache.py --wan13b --steps 20 --prompts 1 --size 112x64 --frames 9

``--wan13b``: the Wan2.1-T2V-1.3B architecture (30 DiT blocks, a 2-layer UMT5 of the real width)
with random weights, built once outside the repository (as ``benchmarks/gpu.py`` builds it) and
calibrated once on two prompts at the first step count: its speed-ups are the measure (its
videos are noise, so its PSNR says only how far the cached run drifted).

Each cached request runs right after its uncached twin (same prompt, seed and size), so the
speed-up compares neighbours; figures are means over the prompts. The last lines name the
fastest setting at PSNR >= 30 dB and at PSNR >= 35 dB. ``--plot`` draws speed-up against PSNR,
one colour per step count, each point labelled with its setting, the 30 and 35 dB lines dashed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_result  # noqa: E402

from vidloom.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING  # noqa: E402

PROMPTS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
           "a yellow circle moving down", "a purple square moving right"]
CACHES = ["teacache:0.1", "teacache:0.2", "magcache:0.1", "magcache:0.2:K3", "pab:2:4", "block:F1B0:0.05", "block:F1B0:0.1", "block:F1B0:0.2", "block:F1B1:0.1", "block:F1B1:0.2",
          "block:F1B1:0.4", "block:F2B1:0.2", "cfg-gate:0.5", "cfg-gate:0.3", "block:F1B1:0.2+cfg-gate:0.5"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames of the luma, 11x11 Gaussian window (sigma 1.5), constants for range 1."""
    def luma(x):
        t = torch.as_tensor(x, dtype=torch.float64)  # (T, H, W, 3)
        return (t @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))[:, None]  # (T, 1, H, W)

    x, y = luma(a), luma(b)
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    blur = lambda t: F.conv2d(F.pad(t, (5, 5, 5, 5), mode="reflect"), w)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def skipped_share(r: dict) -> float:
    """What share of its work a run skipped: blocks (block cache, TeaCache, MagCache), attention
    evaluations (PAB), else unconditional forwards (CFG gate alone)."""
    blocks = r.get("blocks_computed", 0) + r.get("blocks_skipped", 0)
    if blocks:
        return r.get("blocks_skipped", 0) / blocks
    attention = r.get("attention_computed", 0) + r.get("attention_reused", 0)
    if attention:
        return r.get("attention_reused", 0) / attention
    return r.get("uncond_skipped", 0) / max(r.get("forwards", 0) + r.get("uncond_skipped", 0), 1)


def plot(rows: list[dict], path: Path) -> None:
    """Speed-up (x) against PSNR (y) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 600, 60
    xs = [r["speedup"] for r in rows] + [1.0]
    ys = [min(r["psnr"], 60.0) for r in rows] + [25.0]
    x0, x1, y0, y1 = min(xs) - 0.1, max(xs) + 0.2, min(ys) - 2, max(ys) + 2

    def at(x, y):
        return (margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
                height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for level in (30.0, 35.0):
        if y0 < level < y1:
            (a, b), (c, _) = at(x0, level), at(x1, level)
            for start in range(int(a), int(c), 12):
                draw.line([start, b, min(start + 6, c), b], fill="gray")
            draw.text((margin + 4, b - 12), f"{level:g} dB", fill="gray")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for k, steps in enumerate(sorted({r["steps"] for r in rows}, reverse=True)):
        colour = colours[k % len(colours)]
        draw.text((width - margin - 120, margin + 8 + 14 * k), f"{steps} steps", fill=colour)
        for r in rows:
            if r["steps"] == steps:
                x, y = at(r["speedup"], min(r["psnr"], 60.0))
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
                draw.text((x + 6, y - 6), r["cache"], fill=colour)
    draw.text((width // 2 - 80, height - margin + 20), "denoising speed-up vs uncached (x)", fill="black")
    draw.text((8, margin - 30), "PSNR vs the uncached video (dB, capped at 60)", fill="black")
    for tick in np.arange(np.ceil(x0 * 2) / 2, x1, 0.5):
        x, _ = at(tick, y0)
        draw.text((x - 8, height - margin + 4), f"{tick:g}", fill="black")
    for tick in range(int(np.ceil(y0 / 5) * 5), int(y1) + 1, 5):
        _, y = at(x0, tick)
        draw.text((margin - 24, y - 6), str(tick), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def wan13b_folder(sampling: dict, steps: int) -> Path:
    """The random-weight Wan2.1-T2V-1.3B folder, calibrated (once) at this size and step count."""
    from gpu import ensure_model_folder

    from vidloom import VideoGenerator
    from vidloom.cache.calibrate import CALIBRATION_FILE, calibrate, write_calibration

    folder = ensure_model_folder(30, torch.device("cpu"))
    if not (folder / CALIBRATION_FILE).exists():
        start = time.perf_counter()
        gen = VideoGenerator.from_pretrained(folder, dtype="fp32")
        calibration, _ = calibrate(gen, PROMPTS[3:5], steps, **{k: v for k, v in sampling.items()
                                                                 if k != "num_inference_steps"})
        write_calibration(folder, calibration)
        print(f"calibrated {folder} on 2 prompts x {steps} steps in {time.perf_counter() - start:.0f} s")
        del gen
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", default="40,20")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--caches", default=",".join(CACHES))
    parser.add_argument("--plot", type=Path, default=Path("outputs/cache.png"))
    parser.add_argument("--size", default=None, help="WxH (default: the shipped model's)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--wan13b", action="store_true", help="the Wan2.1-1.3B architecture, random weights")
    args = parser.parse_args()

    from vidloom import VideoGenerator

    base = dict(DEFAULT_MODEL_SAMPLING)
    if args.size:
        width, height = (int(v) for v in args.size.lower().split("x"))
        base.update(width=width, height=height)
    if args.frames:
        base.update(num_frames=args.frames)
    folder = args.model or (wan13b_folder(base, int(args.steps.split(",")[0])) if args.wan13b else DEFAULT_MODEL_DIR)
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32")
    print(f"machine: {machine_description()}")
    print(f"model: {folder}; {base['width']}x{base['height']}, {base['num_frames']} frames, fp32, "
          f"{args.prompts} prompts")
    print(f"{'steps':>5} {'cache':32} {'speed-up':>8} {'PSNR dB':>8} {'SSIM':>6} {'skipped':>8} {'est.':>7}")
    rows = []
    gen.generate(PROMPTS[0], **dict(base, num_inference_steps=2))  # warm-up
    for steps in (int(s) for s in args.steps.split(",")):
        sampling = dict(base, num_inference_steps=steps)
        for cache in args.caches.split(","):
            speed, psnrs, ssims, skipped, est = [], [], [], [], []
            for i, prompt in enumerate(PROMPTS[:args.prompts]):
                plain = gen.generate(prompt, seed=i, **sampling)
                cached = gen.generate(prompt, seed=i, cache=cache, **sampling)
                speed.append(plain.timings["denoising"] / cached.timings["denoising"])
                psnrs.append(min(psnr(cached.frames, plain.frames), 99.0))
                ssims.append(ssim(cached.frames, plain.frames))
                r = cached.cache
                skipped.append(skipped_share(r))
                est.append(r.get("estimated_change", 0.0))
            row = dict(steps=steps, cache=cache, speedup=float(np.mean(speed)), psnr=float(np.mean(psnrs)),
                       ssim=float(np.mean(ssims)), skipped=float(np.mean(skipped)), estimate=float(np.mean(est)))
            rows.append(row)
            print(f"{steps:>5} {cache:32} {row['speedup']:>7.2f}x {row['psnr']:>8.1f} {row['ssim']:>6.3f} "
                  f"{row['skipped']:>7.0%} {row['estimate']:>7.2f}", flush=True)
    for floor in (30.0, 35.0):
        for steps in sorted({r["steps"] for r in rows}, reverse=True):
            ok = [r for r in rows if r["steps"] == steps and r["psnr"] >= floor]
            best = max(ok, key=lambda r: r["speedup"], default=None)
            text = "none" if best is None else f"{best['cache']}: {best['speedup']:.2f}x at {best['psnr']:.1f} dB"
            print(f"fastest at PSNR >= {floor:g} dB, {steps} steps: {text}")
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    write_result("cache", dict(machine=machine_description(), model=str(folder), rows=rows))


if __name__ == "__main__":
    main()
