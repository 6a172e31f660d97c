"""One denoising step with classifier-free guidance of the Wan2.1-T2V-1.3B transformer:
vidloom vs diffusers, side by side in one run, with analytic FLOPs and the CPU's measured
matmul ceiling (model-FLOP utilisation).

    python benchmarks/dit.py [--sizes 17x128x128,33x256x256] [--dtypes bf16,fp32] [--repeats 3]

Random weights (saved once in Diffusers layout under .cache/bench). A step is: the
conditional and unconditional predictions at one timestep, and the guidance combination.
diffusers runs them as two forwards (as WanPipeline does); vidloom as its denoising stage does.

MFU counts the model's FLOPs (both forwards with the text's keys and values over 512 text
positions) for both libraries. "exec ours" counts what vidloom's step executes (the text K/V
are computed once per request, and a prompt's padding is one key), and the line under each row
gives the ratio vidloom would reach if that work ran at the measured matmul ceiling.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WAN_1_3B_TRANSFORMER, ensure_transformer_folder, interleaved, machine_description,  # noqa: E402
                    matmul_ceiling, write_result)

TEXT_LEN = 512
PROMPT_TOKENS = (24, 60)  # tokens of the conditional and the negative prompt, the rest is padding
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def step_flops(cfg: dict, frames: int, height: int, width: int, text_len: int = TEXT_LEN,
               text_kv: bool = True) -> float:
    """Analytic FLOPs of one CFG step (two forwards), counting matmuls (2 per multiply-add).
    ``text_kv``: include the text's keys/values and embedding (the model's FLOPs; vidloom computes
    them once per request, outside the step)."""
    d, f, n_layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    n = lat_f * (lat_h // 2) * (lat_w // 2)  # tokens
    per_layer = (
        4 * 2 * n * d * d  # self-attention q, k, v, out
        + 2 * 2 * n * n * d  # q k^T and attention x v
        + 2 * 2 * n * d * d  # cross-attention q, out
        + (2 * 2 * text_len * d * d if text_kv else 0)  # cross-attention k, v of the text
        + 2 * 2 * n * text_len * d  # cross-attention scores and values
        + 2 * 2 * n * d * f  # feed-forward
    )
    embed = (2 * text_len * (cfg["text_dim"] * d + d * d) if text_kv else 0) + 2 * n * d * cfg["in_channels"] * 4 * 2
    return 2 * (n_layers * per_layer + embed)


def make_inputs(frames, height, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)
    pos = torch.zeros(1, TEXT_LEN, 4096)
    neg = torch.zeros(1, TEXT_LEN, 4096)
    n_pos, n_neg = PROMPT_TOKENS  # real prompts fill a few dozen positions
    pos[:, :n_pos] = torch.randn(1, n_pos, 4096, generator=g) * 0.2
    neg[:, :n_neg] = torch.randn(1, n_neg, 4096, generator=g) * 0.2
    t = torch.tensor([757])
    return latents.to(dtype), t, pos.to(dtype), neg.to(dtype)


def ours_step_fn(model, latents, t, pos, neg, scale=5.0):
    from vidloom.config import SamplingParams
    from vidloom.pipelines.batch import ForwardBatch
    from vidloom.pipelines.stages.denoising import DenoisingStage

    stage = DenoisingStage(model, scheduler=None)
    batch = ForwardBatch(params=SamplingParams(guidance_scale=scale), prompt_embeds=pos, negative_embeds=neg,
                         latents=latents.float())
    stage.context(batch, stage.expert_index(t[0]), model)  # per-request work (text K/V), done once before the first step

    def run():
        return stage.predict(batch, t[0])

    return run


def ref_step_fn(model, latents, t, pos, neg, scale=5.0):
    @torch.no_grad()
    def run():
        cond = model(hidden_states=latents, timestep=t, encoder_hidden_states=pos, return_dict=False)[0]
        uncond = model(hidden_states=latents, timestep=t, encoder_hidden_states=neg, return_dict=False)[0]
        return uncond + scale * (cond - uncond)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="17x128x128,33x256x256")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel

    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT

    folder = ensure_transformer_folder("wan2.1-t2v-1.3b-transformer", WAN_1_3B_TRANSFORMER)
    print(f"machine: {machine_description()}")
    ceilings = {name: matmul_ceiling(dt) for name, dt in DTYPES.items()}
    print("matmul ceiling (4096^3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceilings.items()))
    rows = []
    header = f"{'dtype':5} {'size':>11} {'tokens':>6} {'vidloom s':>10} {'diffusers s':>11} {'ratio':>6} " \
             f"{'TFLOP':>6} {'ceil GF/s':>8} {'MFU ours':>8} {'MFU ref':>8} {'exec ours':>9} {'rel err':>8}"
    print(header)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        ours = load_model(WanDiT, folder, dtype=dtype)
        ref = WanTransformer3DModel.from_pretrained(str(folder), dtype=dtype).eval()
        for size in args.sizes.split(","):
            frames, height, width = (int(v) for v in size.split("x"))
            inputs = make_inputs(frames, height, width, dtype)
            fo, fr = ours_step_fn(ours, *inputs), ref_step_fn(ref, *inputs)
            err = ((fo().float() - fr().float()).norm() / fr().float().norm()).item()
            times = interleaved({"ours": fo, "ref": fr}, repeats=args.repeats, warmup=0)
            flops = step_flops(WAN_1_3B_TRANSFORMER, frames, height, width)
            # what vidloom's step executes: the text K/V come from the per-request preparation, and
            # the padding collapses to one key (both prompts' batch shares the longer prompt's + 1)
            executed = step_flops(WAN_1_3B_TRANSFORMER, frames, height, width, text_len=max(PROMPT_TOKENS) + 1,
                                  text_kv=False)
            # this CPU's speed drifts during a run: take the ceiling again right after the step timings
            # and use the higher of the two (the conservative choice for utilisation)
            ceiling = max(ceilings[dname], matmul_ceiling(dtype))
            tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
            row = dict(dtype=dname, size=size, tokens=tokens, vidloom_s=times["ours"], diffusers_s=times["ref"],
                       ratio=times["ours"] / times["ref"], tflop=flops / 1e12, ceiling_gflops=ceiling / 1e9,
                       mfu_ours=flops / times["ours"] / ceiling, mfu_ref=flops / times["ref"] / ceiling,
                       executed_tflop=executed / 1e12, exec_util_ours=executed / times["ours"] / ceiling,
                       ratio_at_ceiling=executed / ceiling / times["ref"], rel_err=err)
            rows.append(row)
            print(f"{dname:5} {size:>11} {row['tokens']:>6} {row['vidloom_s']:>10.2f} {row['diffusers_s']:>11.2f} "
                  f"{row['ratio']:>6.2f} {row['tflop']:>6.2f} {row['ceiling_gflops']:>8.0f} {row['mfu_ours']:>8.2f} "
                  f"{row['mfu_ref']:>8.2f} {row['exec_util_ours']:>9.2f} {row['rel_err']:>8.1e}")
            print(f"  vidloom executes {row['executed_tflop']:.2f} TFLOP of the step's {row['tflop']:.2f}; at the "
                  f"ceiling that would take {executed / ceiling:.2f} s, a ratio of {row['ratio_at_ceiling']:.2f}")
            del fo, fr
            gc.collect()
        del ours, ref
        gc.collect()
    ceilings_end = {name: matmul_ceiling(dt) for name, dt in DTYPES.items()}
    print("matmul ceiling at the end: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceilings_end.items()))
    worst = max(r["ratio"] for r in rows)
    print(f"summary: vidloom/diffusers step time ratio worst {worst:.2f}, best {min(r['ratio'] for r in rows):.2f}; "
          f"bf16 MFU ours " + ", ".join(f"{r['size']} {r['mfu_ours']:.2f}" for r in rows if r["dtype"] == "bf16"))
    write_result("dit-" + args.dtypes.replace(",", "-"),
                 dict(machine=machine_description(), ceilings=ceilings, ceilings_end=ceilings_end, rows=rows))


if __name__ == "__main__":
    main()
