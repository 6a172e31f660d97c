"""Loading the Wan2.1-T2V-1.3B transformer from safetensors: vidloom vs diffusers, wall time of
the load call and peak resident memory, each load in a fresh subprocess.

    python benchmarks/load.py [--cases bf16:bf16,bf16:fp32,fp32:fp32] [--repeats 3] [--cold]
                              [--preimport-dynamo]

A case ``stored:loaded`` reads the checkpoint saved in ``stored`` dtype into a model of
``loaded`` dtype. Random weights (saved once in Diffusers layout under .cache/bench; the fp32
checkpoint is the bf16 one widened, 5.7 GB). Each repeat runs vidloom then diffusers
(alternating, so drift hits both), each in its own process that imports its library, measures
its RSS, then times ``load_model(WanDiT, ...)`` / ``WanTransformer3DModel.from_pretrained(...)``.

Two times per load: the load call, and the load call plus a first touch of every 4 KiB page of
every parameter (what the first forward does at the least). diffusers keeps a parameter that
needs no dtype change as a view of its mmap'd file, so its load call reads nothing: the pages
are read, and become resident, when first touched. vidloom does the same for a tensor it uses as
stored; it reads the others (converted dtypes, the input-major layout on AMX CPUs) during the
call.

Peak memory is the process's peak RSS (VmHWM, reset to the current RSS just before the load)
minus its RSS just before the load, after the touch. (``ru_maxrss`` would do in a fresh process,
but it keeps the forking parent's peak across exec, which once made a small child look 150 MB
fatter in a test.) The budget is the issue's 1.15 x the weights' bytes + 0.5 GiB.

Page cache: by default the files are read once before the runs, so every load reads warm files
(a second start of a server). ``--cold`` evicts the folder's files from the page cache
(posix_fadvise DONTNEED) before every load instead.

``import diffusers`` imports torch._dynamo before diffusers' timer starts; vidloom's load does not
need it (the field ``imported_dynamo`` of each raw result records whether a load imported it on
the way). ``--preimport-dynamo`` imports it before vidloom's timer too.
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


def touch_every_page(model) -> float:
    """Read one element of every 4 KiB page of every parameter; a checksum, so nothing is skipped."""
    total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1) if p.is_contiguous() else p.detach().t().reshape(-1)
            total += flat[:: max(1, 4096 // p.element_size())].float().sum().item()
    return total


def child(library: str, folder: str, dtype_name: str, preimport: bool) -> None:
    """Runs in a fresh process: one timed load and touch, a JSON line on stdout."""
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
    if preimport:
        import torch._dynamo  # noqa: F401
    dynamo_before = "torch._dynamo" in sys.modules
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS, so the peaks below are the load's own
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak_load = proc_status_bytes("VmHWM")
    touch_start = time.perf_counter()
    touch_every_page(model)
    touch = time.perf_counter() - touch_start
    peak = proc_status_bytes("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(seconds=seconds, touch_seconds=touch, rss_before=before, peak_delta=peak - before,
                          peak_delta_load=peak_load - before, ru_maxrss_delta=maxrss - before,
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


def summarise(stored: str, loaded: str, runs: dict) -> dict:
    def med(lib, key):
        return statistics.median(r[key] for r in runs[lib])

    row = dict(stored=stored, loaded=loaded, weights_bytes=runs["vidloom"][0]["weights_bytes"],
               diffusers_weights_bytes=runs["diffusers"][0]["weights_bytes"], runs=runs)
    for lib in runs:
        row[f"{lib}_s"] = med(lib, "seconds")
        row[f"{lib}_touched_s"] = statistics.median(r["seconds"] + r["touch_seconds"] for r in runs[lib])
        row[f"{lib}_peak"] = med(lib, "peak_delta")
    row["time_ratio"] = row["vidloom_s"] / row["diffusers_s"]
    row["touched_ratio"] = row["vidloom_touched_s"] / row["diffusers_touched_s"]
    row["peak_budget"] = 1.15 * row["weights_bytes"] + 0.5 * GIB
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="bf16:bf16,bf16:fp32,fp32:fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each load")
    parser.add_argument("--preimport-dynamo", action="store_true",
                        help="import torch._dynamo before vidloom's timer too (diffusers' import does it)")
    parser.add_argument("--child", choices=("vidloom", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.dtype, args.preimport_dynamo)
        return

    base = ensure_transformer_folder("wan2.1-t2v-1.3b-transformer", WAN_1_3B_TRANSFORMER, dtype=torch.bfloat16)
    folders = {"bf16": base}
    cache = "cold (evicted before each load)" if args.cold else "warm (files read before the runs)"
    print(f"machine: {machine_description()}")
    print(f"page cache: {cache}; torch._dynamo imported before vidloom's timer: {args.preimport_dynamo}")
    print(f"{'stored:loaded':13} {'weights':>7} | {'load s: vidloom':>15} {'diffusers':>9} {'ratio':>5} | "
          f"{'+touch s: vidloom':>17} {'diffusers':>9} {'ratio':>5} | {'peak GiB: vidloom':>17} {'diffusers':>9} "
          f"{'budget':>6} {'x weights':>9}")
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
        row = summarise(stored, loaded, runs)
        rows.append(row)
        print(f"{case:13} {row['weights_bytes'] / GIB:>7.2f} | {row['vidloom_s']:>15.2f} {row['diffusers_s']:>9.2f} "
              f"{row['time_ratio']:>5.2f} | {row['vidloom_touched_s']:>17.2f} {row['diffusers_touched_s']:>9.2f} "
              f"{row['touched_ratio']:>5.2f} | {row['vidloom_peak'] / GIB:>17.2f} {row['diffusers_peak'] / GIB:>9.2f} "
              f"{row['peak_budget'] / GIB:>6.2f} {row['vidloom_peak'] / row['weights_bytes']:>9.2f}")
        print("  load s per run: vidloom " + " ".join(f"{r['seconds']:.2f}" for r in runs["vidloom"])
              + " | diffusers " + " ".join(f"{r['seconds']:.2f}" for r in runs["diffusers"]))
    ok_time = all(r["time_ratio"] <= 0.5 for r in rows)
    ok_mem = all(r["vidloom_peak"] <= r["peak_budget"] for r in rows)
    print(f"summary: vidloom load time {min(r['time_ratio'] for r in rows):.2f}-"
          f"{max(r['time_ratio'] for r in rows):.2f}x diffusers' (with first touch "
          f"{min(r['touched_ratio'] for r in rows):.2f}-{max(r['touched_ratio'] for r in rows):.2f}x; "
          f"target <= 0.5: {'met' if ok_time else 'NOT met'}); peak RSS "
          f"{min(r['vidloom_peak'] / r['weights_bytes'] for r in rows):.2f}-"
          f"{max(r['vidloom_peak'] / r['weights_bytes'] for r in rows):.2f}x the weights "
          f"(target 1.15x + 0.5 GiB: {'met' if ok_mem else 'NOT met'}); page cache {'cold' if args.cold else 'warm'}")
    write_result("load", dict(machine=machine_description(), page_cache="cold" if args.cold else "warm",
                              preimport_dynamo=args.preimport_dynamo, rows=rows))


if __name__ == "__main__":
    main()
