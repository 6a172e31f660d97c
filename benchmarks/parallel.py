"""One denoising step with classifier-free guidance of the Wan2.1-T2V-1.3B transformer (random
weights): one process vs each parallel layout (Ulysses SP=2, ring SP=2, USP 2x2, CFG parallel,
TP=2, TP=2 x SP=2) and vs compiled blocks, each launched with torch's launcher in the same run.

    python benchmarks/parallel.py [--size 17x128x128] [--dtype bf16] [--repeats 2] [--threads 2] [--layers 30]
                                  [--layouts NAME,NAME...]

The single process uses all ``--threads``; each of N processes gets threads/N (the same cores;
at least 1, so 4 processes on 2 cores oversubscribe them). On a GPU machine (``--device cuda``)
each process takes its own GPU. Communication share: the seconds spent inside collectives
(all-to-all, all-gather, all-reduce, waiting for the ring's sends) over the step's seconds (rank
0). ``weights/rank``: the transformer's parameter bytes in rank 0. The compiled row's first step
(the compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WAN_1_3B_TRANSFORMER, ensure_transformer_folder, guided_request, machine_description,  # noqa: E402
                    write_result)

LAYOUTS = [("1 process", 1, {}), ("SP=2", 2, {"sp_size": 2}), ("ring SP=2", 2, {"sp_size": 2, "ring_size": 2}),
           ("USP 2x2", 4, {"sp_size": 4, "ring_size": 2}), ("CFG parallel", 2, {"cfg_parallel": True}),
           ("TP=2", 2, {"tp_size": 2}), ("TP=2 x SP=2", 4, {"tp_size": 2, "sp_size": 2}),
           ("compiled", 1, {"compile": True})]
TEXT_LEN = 512


def worker(args) -> None:
    """One rank: load the transformer, time CFG steps under this layout, print a JSON line (rank 0)."""
    import torch.distributed as dist

    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT
    from vidloom.pipelines.base import parallel_parts
    from vidloom.pipelines.stages import DenoisingStage
    from vidloom.pipelines.stages.model_call import PlainCall
    from vidloom.parallel.cfg import CFGParallel
    from vidloom.parallel.sequence import UlyssesSequenceParallel
    from vidloom.parallel.state import ParallelState, close_process_groups, local_device

    layout = json.loads(args.layout)
    device = local_device(torch.device(args.device))
    parallel = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parallel = ParallelState.initialize(layout.get("sp_size", 1), layout.get("cfg_parallel", False), device,
                                            ring_size=layout.get("ring_size", 1), tp_size=layout.get("tp_size", 1))
    sequence, cfg = parallel_parts(parallel)

    comm = [0.0]  # seconds inside collectives on this rank

    def timed(fn):
        def run(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            comm[0] += time.perf_counter() - start
            return out
        return run

    class TimedRequest:  # a ring send/receive, its wait timed
        def __init__(self, request):
            self.request = request

        def wait(self):
            return timed(self.request.wait)()

    for cls, name in ((UlyssesSequenceParallel, "_all_to_all"), (UlyssesSequenceParallel, "gather"),
                      (CFGParallel, "exchange")):
        setattr(cls, name, timed(getattr(cls, name)))
    dist.all_reduce = timed(dist.all_reduce)  # tensor parallel's (looked up at call time)
    batch_isend_irecv = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: [TimedRequest(r) for r in batch_isend_irecv(ops)]

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    transforms = None
    if parallel is not None and parallel.tp_size > 1:
        from vidloom.loader.transforms import default_transforms
        from vidloom.parallel.tensor import TensorParallel

        transforms = (TensorParallel(parallel.tp_group, parallel.tp_size, parallel.tp_rank),) + default_transforms()
    model = load_model(WanDiT, Path(args.model), device=device, dtype=dtype, transforms=transforms)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if layout.get("compile"):
        from vidloom.models.compiled import compile_blocks

        compile_blocks(model)
    f, h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g).to(device, dtype)
    text = torch.randn(2, TEXT_LEN, WAN_1_3B_TRANSFORMER["text_dim"], generator=g).to(device, dtype)
    # the engine's own guided prediction (batched CFG, or one branch per rank), as a generation runs it
    stage = DenoisingStage(model, scheduler=None, cfg=cfg, call=PlainCall(sequence))
    batch = guided_request(stage, model, x, text)
    t = torch.tensor(500.0, device=device)

    def step():
        out = stage.predict(batch, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    start = time.perf_counter()
    step()  # warm-up (compiled: the compilation)
    first = time.perf_counter() - start
    times, comms = [], []
    for _ in range(args.repeats):
        if parallel is not None:
            dist.barrier()
        comm[0] = 0.0
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        comms.append(comm[0])
    if parallel is None or parallel.is_main:
        best = min(range(len(times)), key=times.__getitem__)
        print("RESULT " + json.dumps({"seconds": times[best], "comm_seconds": comms[best], "first_seconds": first,
                                      "weight_bytes": weight_bytes, "threads": torch.get_num_threads()}), flush=True)
    close_process_groups()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="17x128x128")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=WAN_1_3B_TRANSFORMER["num_layers"])
    parser.add_argument("--layouts", default=None, help="comma-separated layout names (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.layers == WAN_1_3B_TRANSFORMER["num_layers"]:
        folder = ensure_transformer_folder("wan2.1-t2v-1.3b-transformer", WAN_1_3B_TRANSFORMER)
    else:  # the same architecture, fewer blocks: a quicker look
        folder = ensure_transformer_folder(f"wan2.1-t2v-1.3b-transformer-{args.layers}-layers",
                                           dict(WAN_1_3B_TRANSFORMER, num_layers=args.layers))
    print(f"machine: {machine_description()}")
    print(f"Wan2.1-T2V-1.3B transformer ({args.layers} layers), one CFG step at {args.size}, {args.dtype}, {args.device}; "
          f"best of {args.repeats} after a warm-up")
    print(f"{'layout':14} {'procs x threads':>15} {'s/step':>8} {'speed-up':>8} {'comm share':>10} "
          f"{'weights/rank':>12} {'first step':>10}")
    rows = []
    chosen = None if args.layouts is None else set(args.layouts.split(","))
    for name, nproc, layout in LAYOUTS:
        if chosen is not None and name not in chosen and name != "1 process":
            continue
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--layout", json.dumps(layout), "--model", str(folder), "--size", args.size,
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(lines[0][len("RESULT "):])
        r.update(layout=name, processes=nproc)
        r["speed_up"] = rows[0]["seconds"] / r["seconds"] if rows else 1.0
        rows.append(r)
        procs = f"{nproc} x {r['threads']}"
        print(f"{name:14} {procs:>15} {r['seconds']:>8.2f} {r['speed_up']:>8.2f} "
              f"{r['comm_seconds'] / r['seconds']:>10.1%} {r['weight_bytes'] / 2**30:>8.2f} GiB "
              f"{r['first_seconds']:>9.1f}s")
    summary = ", ".join(f"{r['layout']} {r['speed_up']:.2f}x" for r in rows[1:])
    print(f"summary: speed-up over one process ({args.size}, {args.dtype}, {args.device}): {summary}")
    write_result("parallel", dict(machine=machine_description(), size=args.size, dtype=args.dtype,
                                  device=args.device, rows=rows))


if __name__ == "__main__":
    main()
