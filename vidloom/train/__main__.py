"""``python -m vidloom.train --run-dir DIR --out MODEL_DIR [--preset default] [--minutes N]``

Runs what is left of the two phases in ``--run-dir`` (resuming from its checkpoints), then
exports the model folder. Keep the run directory outside the repository.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models.encoders import WanTextEncoder
from .data import load_or_build_clips
from .dit import caption_table, encode_latents, latent_stats, train_dit
from .export import export_model, make_text_stack, with_latent_stats
from .recipe import PRESETS
from .vae import reconstruction_psnr, train_vae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.train")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints and logs (outside the repository)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the Diffusers model folder")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = PRESETS[args.preset]()
    began = time.time()

    def left() -> float | None:
        return None if args.minutes is None else max(0.0, args.minutes - (time.time() - began) / 60)

    clips, captions = load_or_build_clips(args.run_dir / "data", recipe.frames, recipe.size, recipe.clips_per_spec,
                                          recipe.seed)
    vae = train_vae(recipe, clips, args.run_dir, minutes=left())
    psnr = reconstruction_psnr(vae, clips)
    print(f"vae reconstruction: {psnr:.2f} dB")
    if torch.load(args.run_dir / "vae.pt", weights_only=False)["step"] < recipe.vae_steps:
        return 0  # out of time: resume later
    tokenizer, encoder = make_text_stack(recipe, args.run_dir / "text")
    table, index = caption_table(WanTextEncoder(tokenizer, encoder), captions)
    latents = encode_latents(vae, clips)
    mean, std = latent_stats(latents)
    latents = (latents - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    ids = torch.tensor([index[c] for c in captions])
    dit, ema = train_dit(recipe, latents, ids, table, index[""], args.run_dir, minutes=left())
    out = export_model(args.out, dit, ema, with_latent_stats(vae, mean, std), args.run_dir / "text",
                       recipe.dit_timestep_shift)
    (args.run_dir / "summary.json").write_text(json.dumps({"vae_psnr_db": psnr, "minutes": (time.time() - began) / 60}))
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
