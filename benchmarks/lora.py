"""LoRA on the Wan2.1-T2V-1.3B transformer (random weights, bf16 as stored): load time and the time
of one guided denoising step with no adapter, a merged one and an unmerged one, and with four
requests using four different unmerged adapters stepped in one forward vs one after another.

    python benchmarks/lora.py [--size 17x128x128] [--rank 32] [--repeats 2] [--layers 30]

The adapter (random, rank ``--rank``) touches every block's q/k/v/out of both attentions and both
FFN layers, in the LightX2V format (original Wan names, lora_A/lora_B, alpha).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, WAN_1_3B_TRANSFORMER, ensure_transformer_folder, guided_request,  # noqa: E402
                    machine_description, write_result)

TEXT_LEN = 512
LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
          "cross_attn.o", "ffn.0", "ffn.2")


def write_adapter(path: Path, layers: int, rank: int, seed: int) -> Path:
    dim, ffn = WAN_1_3B_TRANSFORMER["num_attention_heads"] * WAN_1_3B_TRANSFORMER["attention_head_dim"], \
        WAN_1_3B_TRANSFORMER["ffn_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(layers):
        for layer in LAYERS:
            d_in, d_out = (dim, ffn) if layer == "ffn.0" else (ffn, dim) if layer == "ffn.2" else (dim, dim)
            key = f"diffusion_model.blocks.{block}.{layer}"
            tensors[f"{key}.lora_A.weight"] = (0.01 * torch.randn(rank, d_in, generator=g)).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (0.01 * torch.randn(d_out, rank, generator=g)).bfloat16()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="17x128x128")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=WAN_1_3B_TRANSFORMER["num_layers"])
    args = parser.parse_args()

    from vidloom.loader.weights import load_model
    from vidloom.lora import adapters_for_rows, attach_adapter, merge_loras, read_lora
    from vidloom.models.wan_dit import WanDiT
    from vidloom.pipelines.stages import DenoisingStage

    config = dict(WAN_1_3B_TRANSFORMER, num_layers=args.layers)
    name = "wan2.1-t2v-1.3b-transformer" + ("" if args.layers == WAN_1_3B_TRANSFORMER["num_layers"]
                                            else f"-{args.layers}-layers")
    folder = ensure_transformer_folder(name, config)
    adapters = [write_adapter(CACHE / f"lora-r{args.rank}-{args.layers}-{k}.safetensors", args.layers, args.rank, k)
                for k in range(4)]
    f, h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    print(f"machine: {machine_description()}\nWan2.1-T2V-1.3B transformer ({args.layers} layers, bf16), one CFG "
          f"step at {args.size}; LoRA rank {args.rank} on q/k/v/out and the FFN of every block; best of "
          f"{args.repeats}")

    def request(model, lora):
        x = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g)
        text = torch.randn(2, TEXT_LEN, config["text_dim"], generator=g).to(dtype)
        return guided_request(DenoisingStage(model, scheduler=None), model, x, text, lora)

    def one_step(model, batches):
        stage = DenoisingStage(model, scheduler=None)
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first: warm-up
            start = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    stage.predict(batch, torch.tensor(500.0))
            best = min(best, time.perf_counter() - start)
        return best

    rows = []
    start = time.perf_counter()
    plain = load_model(WanDiT, folder, dtype=dtype)
    load_plain = time.perf_counter() - start
    base = one_step(plain, [request(plain, None)])
    rows.append(dict(mode="none", load_seconds=load_plain, step_seconds=base))
    del plain

    start = time.perf_counter()
    merged = load_model(WanDiT, folder, dtype=dtype)
    merge_loras(merged, [(adapters[0], 1.0)])
    rows.append(dict(mode="merged", load_seconds=time.perf_counter() - start,
                     step_seconds=one_step(merged, [request(merged, None)])))
    del merged

    start = time.perf_counter()
    unmerged = load_model(WanDiT, folder, dtype=dtype)
    for k, path in enumerate(adapters):
        deltas, _ = read_lora(path, unmerged)
        attach_adapter(unmerged, f"a{k}", deltas, path)
        if k == 0:
            load_one = time.perf_counter() - start
    rows.append(dict(mode="unmerged", load_seconds=load_one,
                     step_seconds=one_step(unmerged, [request(unmerged, (("a0", 1.0),))])))
    print(f"{'mode':10} {'load s':>7} {'step s':>7} {'vs none':>8}")
    for r in rows:
        r["ratio"] = r["step_seconds"] / base
        print(f"{r['mode']:10} {r['load_seconds']:>7.2f} {r['step_seconds']:>7.2f} {r['ratio']:>7.2f}x")

    # four requests, four adapters: one after another vs stepped in one forward (rows with their own update)
    four = [request(unmerged, ((f"a{k}", 1.0),)) for k in range(4)]
    apart = one_step(unmerged, four)
    xs = torch.cat([torch.cat([b.latents, b.latents]) for b in four]).to(dtype)
    kv = [type(parts[0]).stack(list(parts)) for parts in zip(*[b.context_kv for b in four])]
    spans = tuple((2 * k, 2 * k + 2, ((f"a{k}", 1.0),)) for k in range(4))
    best = float("inf")
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        with torch.no_grad(), adapters_for_rows(spans):
            unmerged(xs, torch.full((8,), 500.0), context_kv=kv)
        best = min(best, time.perf_counter() - start)
    print(f"4 requests x 4 adapters: one after another {apart:.2f} s, in one forward {best:.2f} s "
          f"({apart / best:.2f}x); one adapter's step {rows[2]['step_seconds']:.2f} s")
    write_result("lora", dict(machine=machine_description(), size=args.size, rank=args.rank, rows=rows,
                              four_apart_seconds=apart, four_batched_seconds=best))


if __name__ == "__main__":
    main()
