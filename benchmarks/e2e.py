"""The whole generation on the project's default model: vidloom vs diffusers' WanPipeline on the
same folder with the same settings and the same initial noise, side by side in one run.

    python benchmarks/e2e.py [--model DIR] [--repeats 3]

The default model is the one that ships with vidloom (``vidloom.default_model``: a small
Wan2.1-architecture model, 64x64, 17 frames, 20 steps), run at its default settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_description, write_result  # noqa: E402

from vidloom.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING, DEFAULT_PROMPT  # noqa: E402

SETTINGS = dict(prompt=DEFAULT_PROMPT, **DEFAULT_MODEL_SAMPLING)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16", help="DiT and text encoder dtype (the VAE stays fp32)")
    args = parser.parse_args()

    from diffusers import WanPipeline

    from vidloom import VideoGenerator

    folder = args.model or DEFAULT_MODEL_DIR
    print(f"machine: {machine_description()}")
    print(f"model: {folder}; settings: {SETTINGS}")
    s = dict(SETTINGS)
    prompt = s.pop("prompt")
    rows = []
    print(f"{'dtype':5} {'vidloom s':>10} {'diffusers s':>11} {'ratio':>6} {'rel err':>8}")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        gen = VideoGenerator.from_pretrained(folder, dit_dtype=dtype, text_encoder_dtype=dtype, vae_dtype="fp32")
        pipe = WanPipeline.from_pretrained(str(folder), dtype=dtype)
        pipe.vae.to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        channels = gen.pipeline.components["transformer"].config.in_channels
        vae_config = gen.pipeline.components["vae"].config
        spatial, temporal = vae_config.spatial_factor, vae_config.temporal_factor
        latents = torch.randn(1, channels, (s["num_frames"] - 1) // temporal + 1, s["height"] // spatial,
                              s["width"] // spatial,
                              generator=torch.Generator().manual_seed(0))
        results = {}

        def ours():
            results["ours"] = gen.generate(prompt, latents=latents, **s).frames

        def ref():
            results["ref"] = pipe(prompt=prompt, latents=latents.clone(), output_type="np", **s).frames[0]

        times = interleaved({"ours": ours, "ref": ref}, repeats=args.repeats, warmup=1)
        a, b = results["ours"].astype(np.float64), results["ref"].astype(np.float64)
        err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        row = dict(dtype=dname, vidloom_s=times["ours"], diffusers_s=times["ref"],
                   ratio=times["ours"] / times["ref"], rel_err=err)
        rows.append(row)
        print(f"{dname:5} {row['vidloom_s']:>10.2f} {row['diffusers_s']:>11.2f} {row['ratio']:>6.2f} {err:>8.1e}")
    print("summary: end-to-end vidloom/diffusers ratio " + ", ".join(f"{r['dtype']} {r['ratio']:.2f}" for r in rows))
    write_result("e2e", dict(machine=machine_description(), model=str(folder), settings=SETTINGS, rows=rows))


if __name__ == "__main__":
    main()
