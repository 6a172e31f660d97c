"""Wan2.1 VAE decode and encode: vidloom vs diffusers, side by side in one run.

    python benchmarks/vae.py [--sizes 17x128x128,33x256x256] [--ops decode,encode] [--dtypes fp32,bf16]
                             [--repeats 1] [--warmup 1] [--parts time,memory]

The real Wan2.1 VAE architecture (base_dim 96, z_dim 16) with random seeded weights, the same state
dict in both libraries. For each size, op and dtype, one row per configuration:
  diffusers        AutoencoderKLWan.decode / .encode (untiled): the baseline of every row but "tiled"
  whole            WanVAE.decode / encode_mean with the defaults (fp32: Winograd convolutions; steps
                   of at most step_elements outputs per decoder stage)
  steps xN         the same with step_elements N times the default (more memory, fewer, larger calls)
  direct           WanVAE with winograd=False: direct convolutions, as diffusers
  diffusers tiled  AutoencoderKLWan.tiled_decode, tiles of h/2 + 4 latent pixels overlapping by 4
  tiled            WanVAE.decode_tiled with the same tiles; baseline "diffusers tiled"
  streaming        stream_decoder().push of one latent frame at a time
Time: median of --repeats interleaved runs (every configuration in turn, so drift hits all alike);
ratio = time / the baseline's time. Peak memory: each configuration in a fresh subprocess, peak
resident memory (VmHWM, reset after the model is built) minus the resident memory once the model is
built; mem ratio = peak / the baseline's peak. Relative error: ||out - ref|| / ||ref|| against the
baseline's output in fp32 (bf16 rows: against the fp32 output too, which is computed if needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, WAN_VAE, machine_description, write_result  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OVERLAP = 4  # latent pixels of overlap between tiles


def latent_shape(size: str) -> tuple[int, int, int, int, int]:
    frames, height, width = (int(v) for v in size.split("x"))
    return 1, WAN_VAE.get("z_dim", 16), 1 + (frames - 1) // 4, height // 8, width // 8


def make_inputs(size: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, video in [-1, 1]) of one size, seeded."""
    frames, height, width = (int(v) for v in size.split("x"))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(*latent_shape(size), generator=g)
    video = torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1
    return z, video


def tile_of(size: str) -> int:
    return latent_shape(size)[3] // 2 + OVERLAP


def build(lib: str, dtype: torch.dtype):
    """The seeded diffusers model, or vidloom's with its state dict."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**WAN_VAE).eval()
    if lib == "diffusers":
        return ref.to(dtype)
    from vidloom.models.wan_vae import WanVAE, WanVAEConfig

    vae = WanVAE(WanVAEConfig.from_dict(dict(ref.config))).eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    del ref
    gc.collect()
    return vae.to(dtype)


def configs(op: str, dtype_name: str) -> list[str]:
    if op == "encode":
        return ["diffusers", "whole", "direct"] if dtype_name == "fp32" else ["diffusers", "whole"]
    if dtype_name == "fp32":
        return ["diffusers", "whole", "steps x4", "direct", "diffusers tiled", "tiled", "streaming"]
    return ["diffusers", "whole", "streaming"]


def baseline(config: str, names: list[str]) -> str:
    """The diffusers configuration a row is compared with."""
    return "diffusers tiled" if config == "tiled" and "diffusers tiled" in names else "diffusers"


def library(config: str) -> str:
    return "diffusers" if config.startswith("diffusers") else "vidloom"


def runner(model, config: str, op: str, size: str, dtype: torch.dtype):
    """A zero-argument function running ``config`` of ``op`` on ``size``."""
    z, video = make_inputs(size)
    z, video = z.to(dtype), video.to(dtype)
    if config == "diffusers":
        return (lambda: model.decode(z).sample) if op == "decode" else (lambda: model.encode(video).latent_dist.mean)
    if config == "diffusers tiled":
        sf, tile = 8, tile_of(size)

        def diffusers_tiled():
            model.enable_tiling(tile * sf, tile * sf, (tile - OVERLAP) * sf, (tile - OVERLAP) * sf)
            try:
                return model.tiled_decode(z).sample
            finally:
                model.disable_tiling()  # the untiled row shares this model
        return diffusers_tiled

    defaults = dict(winograd=model.winograd, step_elements=model.step_elements)

    def with_options(fn, winograd=defaults["winograd"], step_scale=1):
        def run():
            steps = defaults["step_elements"] if step_scale == 1 else model.step_budget(dtype) * step_scale
            model.winograd, model.step_elements = winograd, steps
            try:
                return fn()
            finally:
                model.winograd, model.step_elements = defaults["winograd"], defaults["step_elements"]
        return run

    if op == "encode":
        return with_options(lambda: model.encode_mean(video), **({"winograd": False} if config == "direct" else {}))
    if config == "whole":
        return with_options(lambda: model.decode(z))
    if config.startswith("steps x"):
        return with_options(lambda: model.decode(z), step_scale=int(config.split("x")[1]))
    if config == "direct":
        return with_options(lambda: model.decode(z), winograd=False)
    if config == "tiled":
        return with_options(lambda: model.decode_tiled(z, tile_latent=tile_of(size), overlap_latent=OVERLAP))
    if config == "streaming":
        def stream():
            decoder = model.stream_decoder()
            return torch.cat([decoder.push(z[:, :, i : i + 1]) for i in range(z.shape[2])], dim=2)
        return stream
    raise ValueError(config)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------ time


def time_rows(size: str, op: str, dtype_name: str, names: list[str], repeats: int, warmup: int,
              fp32_ref: dict) -> list[dict]:
    dtype = DTYPES[dtype_name]
    models = {lib: build(lib, dtype) for lib in {library(c) for c in names}}
    fns = {c: runner(models[library(c)], c, op, size, dtype) for c in names}
    times: dict[str, list[float]] = {c: [] for c in names}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(max(1, repeats)):
            for c, fn in fns.items():
                start = time.perf_counter()
                out = fn()
                times[c].append(time.perf_counter() - start)
                outputs.setdefault(c, out)
                del out
    for base in {baseline(c, names) for c in names}:
        key = (size, op, base)
        if dtype_name == "fp32":
            fp32_ref[key] = outputs[base]
        elif key not in fp32_ref:  # bf16 alone: the fp32 reference once, untimed
            with torch.inference_mode():
                fp32_ref[key] = runner(build("diffusers", torch.float32), base, op, size, torch.float32)()
    rows = []
    for c in names:
        t, base = statistics.median(times[c]), baseline(c, names)
        base_s = statistics.median(times[base])
        rows.append(dict(size=size, op=op, dtype=dtype_name, config=c, baseline=base, seconds=t,
                         baseline_s=base_s, ratio=t / base_s, rel_err=rel_err(outputs[c], fp32_ref[(size, op, base)]),
                         tile=tile_of(size) if "tiled" in c else None))
    del models, fns, outputs
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------- memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM")


def memory_child(spec: str) -> None:
    """Run one configuration in this (fresh) process and print its peak memory as JSON."""
    size, op, dtype_name, config = spec.split(":")
    dtype = DTYPES[dtype_name]
    model = build(library(config), dtype)
    fn = runner(model, config, op, size, dtype)
    gc.collect()
    loaded = _rss_mib()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0), so building the model does not count
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method = "VmHWM reset after load"
    except OSError:
        method = "ru_maxrss"
    with torch.inference_mode():
        out = fn()
    peak = _hwm_mib() if method.startswith("VmHWM") else __import__("resource").getrusage(0).ru_maxrss / 1024
    print(json.dumps(dict(loaded_mib=loaded, peak_mib=peak, delta_mib=peak - loaded, method=method,
                          out_mib=out.numel() * out.element_size() / 2**20)))


def measure_memory(size: str, op: str, dtype_name: str, config: str) -> dict:
    spec = ":".join((size, op, dtype_name, config))
    proc = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def print_table(rows: list[dict]) -> None:
    print(f"{'size':>11} {'op':6} {'dtype':5} {'config':18} {'time s':>8} {'ratio':>6} {'rel err':>8} "
          f"{'peak MiB':>9} {'mem ratio':>9}  baseline")
    for r in rows:
        t = f"{r['seconds']:8.2f}" if "seconds" in r else f"{'-':>8}"
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else f"{'-':>6}"
        err = f"{r['rel_err']:8.1e}" if "rel_err" in r else f"{'-':>8}"
        mem = f"{r['peak_mib']:9.0f}" if "peak_mib" in r else f"{'-':>9}"
        mem_ratio = f"{r['mem_ratio']:9.2f}" if "mem_ratio" in r else f"{'-':>9}"
        name = r["config"] + (f" {r['tile']}" if r.get("tile") else "")
        print(f"{r['size']:>11} {r['op']:6} {r['dtype']:5} {name:18} {t} {ratio} {err} {mem} {mem_ratio}  "
              f"{r['baseline']}")


def summary(rows: list[dict]) -> str:
    """One line: time and peak-memory ratios of the whole / tiled / streaming rows against their
    diffusers baselines (< 1: vidloom is faster / smaller), and the largest fp32 error."""
    parts = []
    for r in rows:
        if r["config"] not in ("whole", "tiled", "streaming"):
            continue
        figures = [f"time {r['ratio']:.2f}x" if "ratio" in r else None,
                   f"peak {r['mem_ratio']:.2f}x" if "mem_ratio" in r else None]
        figures = ", ".join(f for f in figures if f)
        parts.append(f"{r['dtype']} {r['op']} {r['size']} {r['config']} {figures}")
    errors = [r["rel_err"] for r in rows if r["dtype"] == "fp32" and library(r["config"]) == "vidloom" and "rel_err" in r]
    worst = f"; fp32 rel err <= {max(errors):.1e}" if errors else ""
    return "summary (vidloom / diffusers): " + "; ".join(parts) + worst


def merge_results(rows: list[dict]) -> Path:
    """Add this run's rows to results/vae.json (rows of other sizes/ops from earlier runs are kept)."""
    path = CACHE / "results" / "vae.json"
    old = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    key = lambda r: (r["size"], r["op"], r["dtype"], r["config"])  # noqa: E731
    merged = {key(r): r for r in old}
    for r in rows:
        merged[key(r)] = {**merged.get(key(r), {}), **r}
    return write_result("vae", dict(machine=machine_description(), rows=list(merged.values())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="17x128x128,33x256x256")
    parser.add_argument("--ops", default="decode,encode")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--parts", default="time,memory")
    parser.add_argument("--configs", default=None, help="comma list to keep (default: all of each op/dtype)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return

    print(f"machine: {machine_description()}")
    keep = set(args.configs.split(",")) | {"diffusers"} if args.configs else None
    parts = set(args.parts.split(","))
    rows: list[dict] = []
    fp32_ref: dict = {}
    for size in args.sizes.split(","):
        for op in args.ops.split(","):
            for dtype_name in args.dtypes.split(","):
                names = [c for c in configs(op, dtype_name) if keep is None or c in keep]
                if "time" in parts:
                    new = time_rows(size, op, dtype_name, names, args.repeats, args.warmup, fp32_ref)
                else:
                    new = [dict(size=size, op=op, dtype=dtype_name, config=c, baseline=baseline(c, names),
                                tile=tile_of(size) if "tiled" in c else None) for c in names]
                if "memory" in parts:
                    for r in new:
                        m = measure_memory(size, op, dtype_name, r["config"])
                        r.update(peak_mib=m["delta_mib"], loaded_mib=m["loaded_mib"], memory_method=m["method"])
                    peaks = {r["config"]: r["peak_mib"] for r in new}
                    for r in new:
                        r["mem_ratio"] = r["peak_mib"] / max(peaks[r["baseline"]], 1e-9)
                print_table(new)
                sys.stdout.flush()
                rows += new
    print()
    print_table(rows)
    print(summary(rows))
    print(f"results: {merge_results(rows)}")


if __name__ == "__main__":
    main()
