"""``vidloom serve`` under concurrent clients, in one process run:

    python benchmarks/serve.py [--model DIR] [--clients 1,4,8] [--videos-per-client 2] [--steps 20] [--loras 4]

For each number of concurrent clients, a fresh server (uvicorn on loopback, a fresh data folder)
takes every client's requests through the official ``openai`` client (``create`` then ``poll``;
the clients are threads of a separate process),
once per engine mode (HTTP in a thread, the engine loop in the main thread, as ``vidloom serve``
runs them):
  batched     up to 8 jobs in flight, their compatible denoising steps as one transformer forward
  interleaved up to 8 jobs in flight, one forward per job and step (no batching)
  one-by-one  one job at a time (max_active=1)
It prints throughput (videos/min) and the ratio to one-by-one, p50/p95 job latency (create to
completed), and the server's overhead per denoising step: (one client's job time - the same
generation run directly with ``generate``) / steps. Default model: the shipped one at its size.
``--loras N``: N random adapters loaded unmerged, client i naming adapter i mod N; with N = clients
every job has its own adapter, so ``interleaved`` is what a server batching only requests with the
same adapter would do, and ``batched`` is vidloom's shared forward across adapters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine_description, write_result  # noqa: E402

warnings.filterwarnings("ignore", message="The Sora API")

POLL_MS = 20
MODES = {"batched": dict(max_active=8, batch_steps=True), "interleaved": dict(max_active=8, batch_steps=False),
         "one-by-one": dict(max_active=1, batch_steps=True)}


def run_clients(url: str, clients: int, per_client: int, body: dict) -> tuple[float, list[float]]:
    from openai import OpenAI

    latencies, lock, errors = [], threading.Lock(), []

    def client(index: int):
        api = OpenAI(api_key="local", base_url=f"{url}/v1", max_retries=0)
        for j in range(per_client):
            start = time.perf_counter()
            adapter = {"lora": [{"name": f"a{index % body['loras']}"}]} if body.get("loras") else {}
            video = api.videos.create(prompt=f"a red circle moving right {index}-{j}", size=body["size"],
                                      extra_body={**body["extra"], "seed": 100 * index + j, **adapter})
            video = api.videos.poll(video.id, poll_interval_ms=POLL_MS)
            if video.status != "completed":
                errors.append(video.error)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"jobs failed: {errors[:3]}")
    return time.perf_counter() - start, latencies


def client_process(url: str, clients: int, per_client: int, body: dict) -> tuple[float, list[float]]:
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--client-of", url, "--clients", str(clients),
                          "--videos-per-client", str(per_client), "--body", json.dumps(body)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["wall"], result["latencies"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--body", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--videos-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loras", type=int, default=0,
                        help="load N random rank-8 adapters unmerged; client i uses adapter i mod N")
    args = parser.parse_args()
    if args.client_of:  # the client side, in its own process
        import json

        body = json.loads(args.body)
        run_clients(args.client_of, 1, 1, body)  # warm-up through the server
        wall, latencies = run_clients(args.client_of, int(args.clients), args.videos_per_client, body)
        print(json.dumps({"wall": wall, "latencies": latencies}))
        return

    from tests.serve.test_api import Server
    from vidloom import VideoGenerator
    from vidloom.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING
    from vidloom.serve.app import ServeSettings, create_app

    model = args.model or DEFAULT_MODEL_DIR
    gen = VideoGenerator.from_pretrained(model)
    sampling = dict(DEFAULT_MODEL_SAMPLING, num_inference_steps=args.steps)
    size = f"{sampling['width']}x{sampling['height']}"
    extra = {k: v for k, v in sampling.items() if k not in ("height", "width")}
    body = {"size": size, "extra": extra, "loras": args.loras}
    adapters_dir = tempfile.TemporaryDirectory()
    for k in range(args.loras):  # every client its own adapter: with as many adapters as clients, the
        # interleaved mode is what a server that batches only same-adapter requests does
        gen.load_lora(random_adapter(model, Path(adapters_dir.name) / f"a{k}.safetensors", k), name=f"a{k}")
    # the same generation without the server, for the overhead per step
    gen.generate("warm-up", **sampling)
    direct = statistics.median(_timed(lambda: gen.generate("a red circle moving right", **sampling)) for _ in range(3))
    print(f"machine: {machine_description()}\nmodel: {model}; {size}, {extra['num_frames']} frames, "
          f"{args.steps} steps; direct generate {direct:.2f} s/video"
          + (f"; {args.loras} rank-8 adapters, client i using adapter i mod {args.loras}" if args.loras else ""))
    print(f"{'clients':>7} {'mode':>12} {'videos/min':>10} {'vs 1-by-1':>9} {'p50 s':>7} {'p95 s':>7} "
          f"{'overhead ms/step':>16}")
    results = []
    for clients in (int(c) for c in args.clients.split(",")):
        row = {}
        for mode, options in MODES.items():
            with tempfile.TemporaryDirectory() as data:
                settings = ServeSettings(model_name=Path(model).name, data_dir=Path(data), poll_after_ms=20,
                                         max_queue=1000, **options)
                # as `vidloom serve` runs: HTTP in a thread, the engine loop in the main thread
                app = create_app(gen, settings, start_loop=False)
                server, measured = Server(app), {}

                def workload():
                    # the clients in a process of their own, so their Python does not compete
                    # with the engine's for this process's interpreter
                    try:
                        measured["run"] = client_process(server.url, clients, args.videos_per_client, body)
                    finally:
                        app.state.loop.stop()

                thread = threading.Thread(target=workload)
                thread.start()
                app.state.loop.run()
                thread.join()
                server.stop()
                wall, latencies = measured["run"]
            videos = clients * args.videos_per_client
            latencies.sort()
            row[mode] = dict(clients=clients, mode=mode, videos_per_min=60 * videos / wall,
                             p50_s=latencies[len(latencies) // 2],
                             p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                             overhead_ms_per_step=1000 * (statistics.median(latencies) - direct) / args.steps
                             if clients == 1 else None)
        base = row["one-by-one"]["videos_per_min"]
        for mode, r in row.items():
            r["throughput_vs_one_by_one"] = r["videos_per_min"] / base
            overhead = f"{r['overhead_ms_per_step']:16.1f}" if r["overhead_ms_per_step"] is not None else f"{'':>16}"
            print(f"{clients:>7} {mode:>12} {r['videos_per_min']:>10.1f} {r['throughput_vs_one_by_one']:>9.2f} "
                  f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {overhead}")
            results.append(r)
    write_result("serve_loras" if args.loras else "serve", dict(
        machine=machine_description(), model=str(model), steps=args.steps, loras=args.loras,
        direct_s_per_video=direct, results=results))


def random_adapter(model: Path, path: Path, seed: int) -> Path:
    """A random rank-8 adapter on every linear layer of the blocks, in the diffusers layout."""
    import torch
    from safetensors.torch import save_file

    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT
    from vidloom.train.distill import DistillRecipe, add_lora, lora_state

    adapted = add_lora(load_model(WanDiT, model / "transformer"), DistillRecipe(rank=8, alpha=8.0, targets=("blocks.",)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted.values():
            layer.up.copy_(0.05 * torch.randn(layer.up.shape, generator=g))
    save_file(lora_state(adapted), str(path))
    return path


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
