"""Loading the Wan2.1-T2V-1.3B transformer from safetensors: vidloom vs diffusers, wall time of
the load call and peak resident memory, each load in a fresh subprocess.

    python benchmarks/load.py [--cases bf16:bf16,bf16:fp32,fp32:fp32] [--repeats 3] [--cold]

A case ``stored:loaded`` reads the checkpoint saved in ``stored`` dtype into a model of
``loaded`` dtype. Random weights (saved once in Diffusers layout under .cache/bench; the fp32
checkpoint is the bf16 one widened). Each repeat runs vidloom then diffusers (alternating, so
drift hits both), each in its own process that imports its library first, measures its RSS,
then times ``load_model(WanDiT, ...)`` / ``WanTransformer3DModel.from_pretrained(...)``.
Peak memory is the process's peak RSS after the load minus its RSS just before it: VmHWM, reset to
the current RSS just before the load (``ru_maxrss`` gives the same here, but it keeps the forking
parent's peak across exec, which once made a small child look 150 MB fatter in a test).

Page cache: by default the files are read once before the runs, so every load reads warm
files (what a second start of a server sees). ``--cold`` evicts the folder's files from the
page cache (posix_fadvise DONTNEED) before every load instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WAN_1_3B_TRANSFORMER, ensure_converted_folder, ensure_transformer_folder,  # noqa: E402
                    machine_description, write_result)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2**30


def proc_status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def child(library: str, folder: str, dtype_name: str, preimport: bool) -> None:
    """Runs in a fresh process: one timed load, a JSON line on stdout."""
    import gc
    import resource

    dtype = DTYPES[dtype_name]
    if library == "vidloom":
        from vidloom.loader.weights import load_model
        from vidloom.models.wan_dit import WanDiT

        def load():
            return load_model(WanDiT, folder, dtype=dtype)
    else:
        from diffusers import WanTransformer3DModel

        def load():
            return WanTransformer3DModel.from_pretrained(folder, dtype=dtype)
    if preimport:  # what `import diffusers` already did; vidloom's model build triggers it lazily
        import torch._dynamo  # noqa: F401
    dynamo_before = "torch._dynamo" in sys.modules
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS, so the peak below is the load's own
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(seconds=seconds, rss_before=before, peak_rss=peak, peak_delta=peak - before,
                          ru_maxrss_delta=maxrss - before,
                          weights_bytes=weights,
                          imported_dynamo=not dynamo_before and "torch._dynamo" in sys.modules)))


def evict(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_child(library: str, folder: Path, dtype_name: str, preimport: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", library, "--folder", str(folder), "--dtype", dtype_name]
    cmd += ["--preimport-dynamo"] if preimport else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="bf16:bf16,bf16:fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each load")
    parser.add_argument("--preimport-dynamo", action="store_true",
                        help="import torch._dynamo before timing (diffusers' import does; building vidloom's "
                             "model on the meta device triggers it, ~1 s, on a process's first load)")
    parser.add_argument("--child", choices=("vidloom", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.dtype, args.preimport_dynamo)
        return

    base = ensure_transformer_folder("wan2.1-t2v-1.3b-transformer", WAN_1_3B_TRANSFORMER, dtype=torch.bfloat16)
    folders = {"bf16": base}
    print(f"machine: {machine_description()}")
    print(f"page cache: {'cold (evicted before each load)' if args.cold else 'warm (files read before the runs)'}")
    header = (f"{'stored:loaded':13} {'weights GiB':>11} {'vidloom s':>9} {'diffusers s':>11} {'ratio':>6} "
              f"{'vidloom peak GiB':>16} {'diffusers peak GiB':>18} {'ratio':>6} {'ours/weights':>12}")
    print(header)
    rows = []
    for case in args.cases.split(","):
        stored, loaded = case.split(":")
        if stored not in folders:
            folders[stored] = ensure_converted_folder(base, f"wan2.1-t2v-1.3b-transformer-{stored}", DTYPES[stored])
        folder = folders[stored]
        if not args.cold:
            warm(folder)
        runs = {"vidloom": [], "diffusers": []}
        for _ in range(args.repeats):
            for library in runs:
                if args.cold:
                    evict(folder)
                runs[library].append(run_child(library, folder, loaded, args.preimport_dynamo))
        med = {lib: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_delta")}
               for lib, rs in runs.items()}
        weights = runs["vidloom"][0]["weights_bytes"]
        budget = 1.15 * weights + 0.5 * GIB
        row = dict(stored=stored, loaded=loaded, weights_bytes=weights,
                   diffusers_weights_bytes=runs["diffusers"][0]["weights_bytes"],
                   vidloom_s=med["vidloom"]["seconds"], diffusers_s=med["diffusers"]["seconds"],
                   time_ratio=med["vidloom"]["seconds"] / med["diffusers"]["seconds"],
                   vidloom_peak=med["vidloom"]["peak_delta"], diffusers_peak=med["diffusers"]["peak_delta"],
                   peak_ratio=med["vidloom"]["peak_delta"] / med["diffusers"]["peak_delta"],
                   peak_budget=budget, runs=runs)
        rows.append(row)
        print(f"{case:13} {weights / GIB:>11.2f} {row['vidloom_s']:>9.2f} {row['diffusers_s']:>11.2f} "
              f"{row['time_ratio']:>6.2f} {row['vidloom_peak'] / GIB:>16.2f} {row['diffusers_peak'] / GIB:>18.2f} "
              f"{row['peak_ratio']:>6.2f} {row['vidloom_peak'] / weights:>12.2f}")
        print("  per run s: vidloom " + " ".join(f"{r['seconds']:.2f}" for r in runs["vidloom"])
              + " | diffusers " + " ".join(f"{r['seconds']:.2f}" for r in runs["diffusers"]))
    ok_time = all(r["time_ratio"] <= 0.5 for r in rows)
    ok_mem = all(r["vidloom_peak"] <= r["peak_budget"] for r in rows)
    print(f"summary: vidloom load time {min(r['time_ratio'] for r in rows):.2f}-{max(r['time_ratio'] for r in rows):.2f}"
          f" of diffusers (target <= 0.5: {'met' if ok_time else 'NOT met'}); peak RSS "
          + ", ".join(f"{r['stored']}:{r['loaded']} {r['vidloom_peak'] / GIB:.2f} GiB"
                      f" (budget {r['peak_budget'] / GIB:.2f})" for r in rows)
          + f" (target 1.15 x weights + 0.5 GiB: {'met' if ok_mem else 'NOT met'}); page cache "
          + ("cold" if args.cold else "warm"))
    write_result("load", dict(machine=machine_description(), page_cache="cold" if args.cold else "warm", rows=rows))


if __name__ == "__main__":
    main()
