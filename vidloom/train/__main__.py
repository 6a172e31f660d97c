"""``python -m vidloom.train --run-dir DIR --out MODEL_DIR [--preset default] [--device cuda]``

Runs what is left of the two phases in ``--run-dir`` (resuming from its checkpoints), then
exports the model folder. Keep the run directory outside the repository.

``--fit-vae-minutes`` / ``--fit-dit-minutes`` shorten a fresh phase to fit a time budget (its
step count is chosen from the pace of its first steps, inside the learning-rate warm-up, and
written to ``summary.json``); ``--set vae_steps=N --set dit_steps=M`` reruns with those counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..models.encoders import WanTextEncoder
from .data import load_or_build_clips
from .dit import caption_table, encode_latents, latent_stats, train_dit
from .export import export_model, make_text_stack, with_latent_stats
from .recipe import PRESETS, Recipe
from .vae import reconstruction_psnr, train_vae


def apply_overrides(recipe: Recipe, pairs: list[str]) -> Recipe:
    """``key=value`` pairs over the recipe's scalar fields, parsed as the field's type."""
    scalars = {f.name: type(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)
               if isinstance(getattr(recipe, f.name), (int, float, str))}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in scalars:
            raise SystemExit(f"--set: expected KEY=VALUE with KEY one of {', '.join(sorted(scalars))}; got {pair!r}")
        changes[key] = scalars[key](value)
    return dataclasses.replace(recipe, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.train")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints and logs (outside the repository)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the Diffusers model folder")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set dit_steps=12000")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--fit-vae-minutes", type=float, default=None, help="fit a fresh VAE phase to this budget")
    parser.add_argument("--fit-dit-minutes", type=float, default=None, help="fit a fresh DiT phase to this budget")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="bf16 autocast of the forward passes (the weights and the optimizer stay fp32)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights and optimizer, TF32 products
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    recipe = apply_overrides(PRESETS[args.preset](), args.overrides)
    began = time.time()

    def left() -> float | None:
        return None if args.minutes is None else max(0.0, args.minutes - (time.time() - began) / 60)

    clips, captions = load_or_build_clips(args.run_dir / "data", recipe.frames, recipe.size, recipe.clips_per_spec,
                                          recipe.seed)
    print(f"{len(clips)} clips ready after {time.time() - began:.0f} s", flush=True)
    vae = train_vae(recipe, clips, args.run_dir, minutes=left(), fit_minutes=args.fit_vae_minutes, device=device,
                    autocast=args.autocast == "bf16")
    psnr = reconstruction_psnr(vae, clips)
    print(f"vae reconstruction: {psnr:.2f} dB", flush=True)
    vae_state = torch.load(args.run_dir / "vae.pt", weights_only=False, map_location="cpu")
    if vae_state["step"] < vae_state.get("total", recipe.vae_steps):
        return 0  # out of time: resume later
    vae_minutes = (time.time() - began) / 60
    tokenizer, encoder = make_text_stack(recipe, args.run_dir / "text")
    table, index = caption_table(WanTextEncoder(tokenizer, encoder), captions)
    latents = encode_latents(vae, clips, batch=64 if device.type == "cuda" else 8)
    mean, std = latent_stats(latents)
    shape = (1, -1, 1, 1, 1)
    latents = (latents - torch.tensor(mean, device=latents.device).view(shape)) / torch.tensor(
        std, device=latents.device).view(shape)
    ids = torch.tensor([index[c] for c in captions])
    dit, ema = train_dit(recipe, latents, ids, table, index[""], args.run_dir, minutes=left(),
                         fit_minutes=args.fit_dit_minutes, device=device, autocast=args.autocast == "bf16")
    dit_state = torch.load(args.run_dir / "dit.pt", weights_only=False, map_location="cpu")
    out = export_model(args.out, dit.cpu(), {k: v.cpu() for k, v in ema.items()},
                       with_latent_stats(vae.cpu(), mean, std), args.run_dir / "text", recipe.dit_timestep_shift)
    summary = {
        "vae_psnr_db": psnr, "vae_steps": vae_state["total"] if "total" in vae_state else recipe.vae_steps,
        "dit_steps": dit_state["step"], "dit_total": dit_state.get("total", recipe.dit_steps),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "minutes_this_run": (time.time() - began) / 60, "vae_minutes_this_run": vae_minutes,
        "recipe": dataclasses.asdict(recipe),
    }
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
