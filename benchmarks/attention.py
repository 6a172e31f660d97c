"""Attention backends on one self-attention layer of the Wan2.1-1.3B shape (12 heads x 128) at the
token counts of real videos, and sliding-tile attention's quality cost on the shipped model.

    python benchmarks/attention.py [--frames 17,81] [--dtype bf16] [--windows 12,24,24/6,16,16]
                                   [--reps 2] [--device cpu] [--videos 4] [--skip-layer] [--skip-video]
                                   [--flex-max-tokens 10000]

Layer: q/k/v (1, L, 12, 128) random, L the token grid of F x 480 x 832 (Wan's VAE: 4x temporal,
8x spatial; patches 1x2x2: 17 frames -> 5 x 30 x 52 = 7,800 tokens, 81 -> 21 x 30 x 52 = 32,760).
Each backend's time (the best of ``--reps`` after one warm-up, which includes flex's
compilation) as a ratio to ``sdpa``, and its output's relative error against ``sdpa``'s in
float64-accumulated norm. ``sliding_tile`` at each window (tokens per axis) also reports the share
of the dense score matrix it computes.

Video: the shipped model's default request (17 x 64 x 64: a 5 x 8 x 8 token grid) for
``--videos`` prompts, dense and with each ``--video-windows`` window: PSNR of the STA video
against the dense one, and the denoising time ratio. The prompt-following accuracies with STA
come from ``benchmarks/quality.py --sta 3,6,6/3,4,4`` (the same windows, its own run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, write_result  # noqa: E402

HEADS, HEAD_DIM = 12, 128


def token_grid(frames: int, height: int = 480, width: int = 832) -> tuple[int, int, int]:
    return ((frames - 1) // 4 + 1, height // 16, width // 16)


def best_time(fn, reps: int):
    """(the best of ``reps`` timed calls after a warm-up call (flex: its compilation), the output)."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer_rows(frames_list, windows, dtype, device, reps, flex_max_tokens) -> list[dict]:
    from vidloom.models.attention import BACKENDS, SDPA, available_backends
    from vidloom.models.sliding_tile import key_fraction, sliding_tile_attention

    rows = []
    for frames in frames_list:
        layout = token_grid(frames)
        length = math.prod(layout)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
        with torch.no_grad():
            base, ref = best_time(lambda: SDPA.fn(q, k, v), reps)
            cases = [("sdpa", None, lambda: SDPA.fn(q, k, v))]
            present = available_backends(torch.device(device), dtype)
            for name in ("flex", "flash", "sage"):  # the others this process can run
                if name in present and (name != "flex" or length <= flex_max_tokens or device != "cpu"):
                    cases.append((name, None, lambda fn=BACKENDS[name].fn: fn(q, k, v)))
            for w in windows:
                cases.append(("sliding_tile", w, lambda w=w: sliding_tile_attention(
                    q, k, v, layout=layout, window=w, dense=SDPA.fn)))
            for name, window, fn in cases:
                seconds, out = (base, ref) if name == "sdpa" else best_time(fn, reps)
                row = dict(frames=frames, tokens=length, grid=layout, backend=name, window=window, seconds=seconds,
                           speedup=base / seconds, rel_err=rel_err(out.float(), ref.float()),
                           scores=key_fraction(layout, window) if window else 1.0)
                rows.append(row)
                label = name if window is None else f"{name} {','.join(map(str, window))}"
                print(f"{frames:>6} {length:>7} {label:>24} {seconds:>9.3f} {row['speedup']:>8.2f}x "
                      f"{row['scores']:>8.3f} {row['rel_err']:>10.2e}", flush=True)
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def video_rows(windows, videos: int, dtype_name) -> list[dict]:
    from vidloom import VideoGenerator
    from vidloom.default_model import DEFAULT_MODEL_DIR, sampling_defaults
    from vidloom.world import held_out_specs

    gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype_name)
    request = sampling_defaults(DEFAULT_MODEL_DIR)
    prompts = [s.caption for s in held_out_specs()][:videos]
    dense, dense_s = [], 0.0
    for k, prompt in enumerate(prompts):
        out = gen.generate(prompt, seed=k, **request)
        dense.append(out.frames)
        dense_s += out.timings["denoising"]
    rows = []
    print(f"{'window':>10} {'PSNR dB (mean, min)':>22} {'denoising':>10}")
    for w in windows:
        values, seconds = [], 0.0
        for k, prompt in enumerate(prompts):
            out = gen.generate(prompt, seed=k, sta_window=w, **request)
            values.append(psnr(out.frames, dense[k]))
            seconds += out.timings["denoising"]
        rows.append(dict(window=w, psnr_mean=float(np.mean(values)), psnr_min=float(np.min(values)),
                         denoising_ratio=seconds / dense_s))
        print(f"{','.join(map(str, w)):>10} {np.mean(values):>13.1f} {np.min(values):>8.1f} {seconds / dense_s:>9.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="17,81")
    parser.add_argument("--windows", default="12,24,24/6,16,16", help="sliding-tile windows for the layer (tokens)")
    parser.add_argument("--video-windows", default="3,6,6/3,4,4", help="windows for the shipped model's videos")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the engine's choice for the device)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--flex-max-tokens", type=int, default=10_000,
                        help="measure flex only up to this many tokens (on a CPU its compiled kernel at 32,760 "
                             "tokens ran over 10 minutes and grew past 13 GiB)")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    args = parser.parse_args()

    from vidloom.config import EngineConfig, parse_dtype
    from vidloom.models.sliding_tile import parse_window

    dtype = parse_dtype(args.dtype, "dtype") or EngineConfig(device=args.device).resolved_dtypes()["transformer"]
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"machine: {machine_description()}; {torch.get_num_threads()} threads; {dtype_name}")
    result = dict(machine=machine_description(), dtype=dtype_name, threads=torch.get_num_threads())
    if not args.skip_layer:
        print(f"one self-attention layer, {HEADS} heads x {HEAD_DIM}, frames x 480 x 832")
        print(f"{'frames':>6} {'tokens':>7} {'backend':>24} {'seconds':>9} {'speed-up':>9} {'scores':>8} {'rel err':>10}")
        windows = [parse_window(w) for w in args.windows.split("/")]
        result["layer"] = layer_rows([int(f) for f in args.frames.split(",")], windows, dtype, args.device, args.reps,
                                     args.flex_max_tokens)
    if not args.skip_video:
        print(f"the shipped model, {args.videos} held-out prompts, STA vs dense")
        windows = [parse_window(w) for w in args.video_windows.split("/")]
        result["video"] = video_rows(windows, args.videos, dtype_name if args.dtype else None)
    write_result("attention", result)


if __name__ == "__main__":
    main()
