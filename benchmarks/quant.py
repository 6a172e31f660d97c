"""Quantized weights: on the Wan2.1-T2V-1.3B transformer (random weights, stored bf16), the weight
bytes, peak resident memory and one guided step's time per mode, each mode in a fresh process; on
the shipped model, the PSNR of the video against the unquantized one.

    python benchmarks/quant.py [--size 17x128x128] [--repeats 2] [--videos 4] [--skip-1.3b] [--skip-video]
                               [--skip-kernels]

Modes on the 1.3B: bf16 (as stored), fp32 (widened), int8 and fp8 blocks computed in fp32, int8
and fp8 blocks computed in bf16. Peak RSS: the process's high-water mark (ru_maxrss) after the
steps, which includes the interpreter and torch (~0.4 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WAN_1_3B_TRANSFORMER, ensure_transformer_folder, guided_request, machine_description,  # noqa: E402
                    timed, write_result)

MODES = [("bf16", "bf16", None), ("fp32", "fp32", None), ("int8 / fp32", "fp32", "int8"),
         ("fp8 / fp32", "fp32", "fp8"), ("int8 / bf16", "bf16", "int8"), ("fp8 / bf16", "bf16", "fp8")]
TEXT_LEN = 512
GIB = 2**30


def worker(args) -> None:
    """One mode in this process: load, quantize, time the steps, print a JSON line."""
    from vidloom.loader.components import _plan_dit
    from vidloom.loader.plan import stored_blocks
    from vidloom.pipelines.stages import DenoisingStage
    from vidloom.quant import quantize_blocks, weight_bytes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # as the engine loads it (loader.plan): quantized blocks are read as stored, then quantized
    _, load = _plan_dit(Path(args.model))
    model = load(torch.device("cpu"), dtype, True, stored=stored_blocks(0, dtype, args.quantize))
    if args.quantize:
        quantize_blocks(model, args.quantize)
    f, h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g).to(dtype)
    text = torch.randn(2, TEXT_LEN, WAN_1_3B_TRANSFORMER["text_dim"], generator=g).to(dtype)
    stage = DenoisingStage(model, scheduler=None)
    batch = guided_request(stage, model, x, text)
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            stage.predict(batch, torch.tensor(500.0))
        times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"weight_bytes": weight_bytes(model), "step_seconds": min(times[1:]),
                                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def kernel_rows(repeats: int) -> list[dict]:
    """One 1536 -> 8960 layer (the 1.3B's FFN input) on 640 tokens: the bf16/fp32 matmul, vidloom's
    int8 layer (widened when it runs), and torch's int8 weight-only kernel ``_weight_int8pack_mm``
    (what torchao's int8 weight-only layout calls on a CPU)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8960, 1536, generator=g)
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(640, 1536, generator=g).to(dtype)
        dense = (q.float() * scale[:, None]).to(dtype)
        ways = {"dense": lambda: F.linear(x, dense),
                "vidloom int8": lambda: F.linear(x, (q.float() * scale[:, None]).to(dtype)),
                "int8pack_mm": lambda: torch._weight_int8pack_mm(x, q, scale.to(dtype))}
        for name, run in ways.items():
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), kernel=name,
                             ms=1000 * timed(run, repeats, reduce=min)))
            print(f"{rows[-1]['dtype']:9} {name:13} {rows[-1]['ms']:8.1f} ms")
    return rows


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def video_rows(videos: int) -> list[dict]:
    from vidloom import VideoGenerator
    from vidloom.default_model import DEFAULT_MODEL_DIR, sampling_defaults
    from vidloom.world import held_out_specs

    request = sampling_defaults(DEFAULT_MODEL_DIR)
    prompts = [s.caption for s in held_out_specs()][:videos]
    plain = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR)
    ref = [plain.generate(p, seed=k, **request).frames for k, p in enumerate(prompts)]
    rows = []
    for mode, options in (("int8", dict(quantize="int8")), ("fp8", dict(quantize="fp8")),
                          ("int8 text encoder", dict(quantize_text_encoder="int8")),
                          ("fp8 text encoder", dict(quantize_text_encoder="fp8")),
                          ("int8 both", dict(quantize="int8", quantize_text_encoder="int8"))):
        gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, **options)
        values = [psnr(gen.generate(p, seed=k, **request).frames, ref[k]) for k, p in enumerate(prompts)]
        rows.append(dict(mode=mode, psnr_mean=float(np.mean(values)), psnr_min=float(np.min(values))))
        print(f"{mode:18} PSNR vs unquantized: mean {np.mean(values):.1f} dB, min {np.min(values):.1f} dB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="17x128x128")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--skip-1.3b", dest="skip_big", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"machine: {machine_description()}")
    result = dict(machine=machine_description(), size=args.size)
    if not args.skip_big:
        folder = ensure_transformer_folder("wan2.1-t2v-1.3b-transformer", WAN_1_3B_TRANSFORMER)
        print(f"Wan2.1-T2V-1.3B transformer, one CFG step at {args.size}, a fresh process per mode")
        print(f"{'mode':12} {'weights GiB':>11} {'peak RSS GiB':>12} {'s/step':>7}")
        rows = []
        for name, dtype, quantize in MODES:
            cmd = [sys.executable, __file__, "--worker", "--model", str(folder), "--dtype", dtype, "--size", args.size,
                   "--repeats", str(args.repeats)] + (["--quantize", quantize] if quantize else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(lines[0][len("RESULT "):]) | dict(mode=name)
            rows.append(r)
            print(f"{name:12} {r['weight_bytes'] / GIB:>11.2f} {r['peak_rss'] / GIB:>12.2f} {r['step_seconds']:>7.2f}")
        result["rows"] = rows
    if not args.skip_kernels:
        print("one 1536 -> 8960 layer on 640 tokens (the best of --repeats + 2 runs):")
        result["kernels"] = kernel_rows(args.repeats + 2)
    if not args.skip_video:
        print(f"the shipped model, {args.videos} held-out prompts")
        result["video"] = video_rows(args.videos)
    write_result("quant", result)


if __name__ == "__main__":
    main()
