"""Memory levels on Wan2.1-T2V-1.3B-sized folders: peak resident memory, time and output per
level, each level in a fresh process, and diffusers on the same folder.

    python benchmarks/memory.py [--folders dit,real] [--runs level:0,level:1,level:2,level:3,auto,budget:8GiB]
                                [--steps 2] [--size 128x128 --frames 17] [--no-diffusers]

Two folders, built once outside the repository (``VIDLOOM_MEMORY_BENCH_CACHE``, default
/tmp/vidloom-memory-bench), random weights:

- ``dit``: the 1.3B DiT (bf16) and the real VAE (fp32) with a 2-layer UMT5 of the real width
  (``benchmarks/gpu.py``'s folder): every level fits, so levels are compared with level 0.
- ``real``: the real Wan2.1-T2V-1.3B sizes: UMT5-XXL (d_model 4096, d_ff 10240, 24 layers, 64
  heads, vocab 256384; 5.7 B parameters, bf16, 11.4 GB), the 1.3B DiT (bf16), the real VAE.

Runs: ``level:N`` (``low_mem_level=N``), ``auto`` (no memory option: the engine picks), and
``budget:8GiB`` (``max_memory``). Each prints the peak resident set of its process
(``ru_maxrss``: file pages of mapped weights count once touched), the engine's estimate for the
level it ran at, its wall time (load and generation) and whether its video equals the first run's
(levels move bytes, not numbers: level 1 decodes in one-frame steps, equal up to float rounding).
A level whose estimate does not fit this machine's available memory is not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WAN_1_3B_TRANSFORMER, WAN_VAE, building, is_built, machine_description  # noqa: E402

CACHE = Path(os.environ.get("VIDLOOM_MEMORY_BENCH_CACHE", "/tmp/vidloom-memory-bench"))
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                vocab_size=256384)
PROMPT, NEGATIVE = "a red circle moving right", "blurry, static"
GIB = 2**30
SHARD_BYTES = 2 * GIB


def ensure_real_folder() -> Path:
    """The real-size folder: UMT5-XXL written shard by shard (never the whole model in memory),
    the DiT and VAE with diffusers."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from vidloom import tiny

    folder = CACHE / "wan2.1-t2v-1.3b-realsize-v1"
    if is_built(folder):
        return folder
    with building(folder, "real Wan2.1-T2V-1.3B sizes, random weights") as partial:
        tiny.build_tokenizer(partial / "tokenizer")
        write_umt5_xxl(partial / "text_encoder")
        torch.manual_seed(0)
        dit = WanTransformer3DModel(**WAN_1_3B_TRANSFORMER).to(torch.bfloat16)
        dit.save_pretrained(str(partial / "transformer"))
        del dit
        gc.collect()
        AutoencoderKLWan(**WAN_VAE).save_pretrained(str(partial / "vae"))
        tiny.write_json(partial / "scheduler" / "scheduler_config.json",
                        {**tiny.UNIPC_FLOW_CONFIG, "_diffusers_version": "0.42.1"})
        tiny.write_json(partial / "model_index.json", tiny.WAN_T2V_INDEX)
    return folder


def write_umt5_xxl(folder: Path) -> None:
    """UMT5-XXL with random bf16 weights in transformers' layout (config.json, sharded
    model-*.safetensors and their index), one shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**UMT5_XXL)
    config.architectures = ["UMT5EncoderModel"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in UMT5EncoderModel(config).state_dict().items()
                  if name != "encoder.embed_tokens.weight"}  # tied to "shared", stored once
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, files = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update({key: name for key in shard})
        files.append(name)
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if "layer_norm" in name:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}))


def ensure_dit_folder() -> Path:
    os.environ.setdefault("VIDLOOM_GPU_BENCH_CACHE", str(CACHE))
    from gpu import ensure_model_folder

    return ensure_model_folder(30, torch.device("cpu"))


def sampling(args) -> dict:
    width, height = (int(v) for v in args.size.lower().split("x"))
    return dict(height=height, width=width, num_frames=args.frames, num_inference_steps=args.steps,
                guidance_scale=5.0, seed=0)


# ------------------------------------------------------------------------------------- one run


def child(kind: str, folder: str, out: str, request: dict) -> None:
    """One run in this (fresh) process: ``kind`` "level:N", "auto", "budget:SIZE" or
    "diffusers:fp32" / "diffusers:bf16"."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    level, estimate = None, None
    if kind.startswith("diffusers"):
        frames = run_diffusers(folder, request, torch.bfloat16 if kind.endswith("bf16") else torch.float32)
    else:
        from vidloom import VideoGenerator
        from vidloom.loader.plan import plan_folder
        from vidloom.memory.budget import level_peaks

        what, _, value = kind.partition(":")
        options = {"low_mem_level": int(value)} if what == "level" else {"max_memory": value} if what == "budget" else {}
        gen = VideoGenerator.from_pretrained(folder, **options)
        task = gen.submit(PROMPT, negative_prompt=NEGATIVE, **request)
        level = task.memory_level
        plans = plan_folder(folder, gen.config).plans  # (a budget holds them; an explicit level has none)
        estimate = level_peaks(plans, gen.config, request["num_frames"], request["height"], request["width"],
                               loaded_level=gen.config.low_mem_level)[level]
        frames = gen.run(task).frames
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(frames, dtype=np.float32))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"kind": kind, "seconds": seconds, "peak": peak, "level": level, "estimate": estimate}))


def run_diffusers(folder: str, request: dict, dtype: torch.dtype) -> np.ndarray:
    """diffusers on the CPU (its offload needs an accelerator): the text encoder and DiT in
    ``dtype`` (fp32 where it fits; bf16 where fp32 would not, as for UMT5-XXL's 22.8 GB), the VAE
    in fp32."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype)
    generator = torch.Generator().manual_seed(request["seed"])
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=request["height"], width=request["width"],
               num_frames=request["num_frames"], num_inference_steps=request["num_inference_steps"],
               guidance_scale=request["guidance_scale"], generator=generator, output_type="np")
    return out.frames[0]


def launch(kind: str, folder: Path, request: dict, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(folder), str(out), json.dumps(request)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"kind": kind, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200],
                "rc": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- main


def folder_peaks(folder: Path, request: dict) -> dict[int, int]:
    """The engine's estimated peak of ``request`` at each level (each level loading as it does)."""
    from vidloom import EngineConfig
    from vidloom.loader.plan import plan_folder
    from vidloom.memory.budget import level_peaks

    config = EngineConfig(low_mem_level=0)
    return level_peaks(plan_folder(folder, config).plans, config, request["num_frames"], request["height"],
                       request["width"])



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folders", default="dit,real")
    parser.add_argument("--runs", default="level:0,level:1,level:2,level:3,auto,budget:8GiB")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, out, request = args.child
        child(kind, folder, out, json.loads(request))
        return
    from vidloom.memory.estimate import machine_memory

    request = sampling(args)
    print(f"machine: {machine_description()}; memory {machine_memory() / GIB:.1f} GiB")
    print(f"request: {args.size}, {args.frames} frames, {args.steps} steps, CFG; fp32 compute")
    for name in args.folders.split(","):
        folder = ensure_dit_folder() if name == "dit" else ensure_real_folder()
        print(f"\nfolder {name}: {folder}")
        print(f"{'run':14} {'level':>5} {'peak GiB':>9} {'est. GiB':>9} {'time s':>8}  video")
        first = None
        peaks = folder_peaks(folder, request)
        fits = peaks[0] <= machine_memory()  # diffusers widens as level 0 does
        kinds = args.runs.split(",") + ([] if args.no_diffusers else [f"diffusers:{'fp32' if fits else 'bf16'}"])
        for kind in kinds:
            if kind.startswith("level:") and peaks[int(kind[6:])] > machine_memory():
                print(f"{kind:14} {kind[6:]:>5} {'-':>9} {peaks[int(kind[6:])] / GIB:>9.2f} {'-':>8}  not run: the "
                      f"estimate exceeds the {machine_memory() / GIB:.1f} GiB available", flush=True)
                continue
            out = CACHE / f"{name}-{kind.replace(':', '')}.npy"
            result = launch(kind, folder, request, out)
            if "error" in result:
                print(f"{kind:14} {'-':>5} {'-':>9} {'-':>9} {'-':>8}  failed (rc {result['rc']}): {result['error']}",
                      flush=True)
                continue
            frames = np.load(out)
            if first is None and not kind.startswith("diffusers"):
                first, same = frames, "reference"
            elif kind == "diffusers:bf16" or first is None:
                same = "(bf16 compute: not compared)"
            else:
                err = float(np.abs(frames - first).max())
                same = "identical" if err == 0 else f"max abs diff {err:.2e}"
            level = "-" if result["level"] is None else str(result["level"])
            est = "-" if result["estimate"] is None else f"{result['estimate'] / GIB:.2f}"
            print(f"{kind:14} {level:>5} {result['peak'] / GIB:>9.2f} {est:>9} {result['seconds']:>8.1f}  {same}",
                  flush=True)


if __name__ == "__main__":
    main()
