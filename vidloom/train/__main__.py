"""``python -m vidloom.train --run-dir DIR --out MODEL_DIR [--preset default] [--device cuda]``

Runs what is left of the two phases in ``--run-dir`` (resuming from its checkpoints), then
exports the model folder. Keep the run directory outside the repository.

Phases: the VAE, the decoder alone on whole clips (``decoder_steps``), the text-to-video DiT, its
fine-tune with the first latent frame weighted up (``tune_steps``), and the image-to-video DiT
(``i2v_steps``, from the text-to-video DiT's weights, exported to ``--out-i2v``); the decoder,
fine-tune and image-to-video phases are skipped at 0 steps. ``--init MODEL_DIR`` starts from an
exported folder instead (its VAE, text stack and DiT, with its latent statistics) and runs only the
later phases.

``--fit-vae-minutes`` / ``--fit-dit-minutes`` shorten a fresh phase to fit a time budget (its
step count is chosen from the pace of its first steps, inside the learning-rate warm-up, and
written to ``summary.json``); ``--set vae_steps=N --set dit_steps=M`` reruns with those counts.

Every option and the recipe are checked before the first clip is built; what the user can fix (a
bad value, a path, a checkpoint the trainer did not write) is one line, ``error: ...``, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..cli import printable
from ..errors import VidloomError
from ..jsonfile import read_json_object
from ..models.encoders import WanTextEncoder
from ..models.wan_dit import WanDiT, WanDiTConfig
from ..models.wan_vae import WanVAE
from .data import load_or_build_clips
from .dit import caption_table, encode_latents, latent_stats, train_dit
from .export import export_model, make_text_stack, with_latent_stats
from .loop import Checkpointer, CheckpointError, read_safetensors, write_safetensors
from .recipe import PRESETS, Recipe, with_overrides
from .vae import reconstruction_psnr, train_decoder, train_vae

PHASES = ("vae", "decoder", "dit", "tune", "i2v")
INIT_PARTS = ("vae", "transformer", "tokenizer", "text_encoder")


class UsageError(VidloomError):
    """A command-line option names something training cannot use."""


def apply_overrides(recipe: Recipe, pairs: list[str]) -> Recipe:
    """``key=value`` pairs over the recipe's scalar fields, parsed as the field's type and
    validated (a RecipeError names the key)."""
    return with_overrides(recipe, pairs)


def phase_done(run_dir: Path, phase: str) -> bool:
    progress = Checkpointer(run_dir, phase).progress()
    return progress is not None and progress[0] >= progress[1]


def cached_latents(path: Path, vae: WanVAE, clips, batch: int) -> torch.Tensor:
    """The clips' posterior means, encoded once per run directory (the encoder is frozen after
    the VAE phase; every later phase and every resumed run reads the same latents)."""
    device = next(vae.parameters()).device
    config = vae.config
    n, frames, size = len(clips), clips.shape[1], clips.shape[2]
    shape = (n, config.z_dim, (frames - 1) // config.scale_factor_temporal + 1, size // config.scale_factor_spatial,
             size // config.scale_factor_spatial)
    if path.exists():
        tensors, _ = read_safetensors(path, "latent cache", device)
        latents = tensors.get("latents")
        if set(tensors) != {"latents"} or latents.dtype != torch.float32 or tuple(latents.shape) != shape:
            found = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
            raise CheckpointError(f"latent cache holds {found}, not this run's latents (float32 {shape}): delete it "
                                  "to encode them again", file=str(path))
        if not torch.isfinite(latents).all():
            raise CheckpointError("latent cache holds NaN or Inf: delete it to encode them again", file=str(path))
        return latents
    latents = encode_latents(vae, clips, batch=batch)
    write_safetensors(path, {"latents": latents}, {"format": "pt"})
    return latents


def load_init(folder: Path, text_dir: Path, recipe: Recipe):
    """An exported folder's VAE (its latent statistics set back to identity, as training sees it),
    its DiT as both the model and the EMA weights, the statistics; its text stack copied to
    ``text_dir`` (where ``make_text_stack`` reads it)."""
    from ..loader.weights import load_model

    vae = load_model(WanVAE, folder / "vae")
    mean, std = list(vae.config.latents_mean), list(vae.config.latents_std)
    vae = with_latent_stats(vae, [0.0] * len(mean), [1.0] * len(std))
    dit = load_model(WanDiT, folder / "transformer").eval()
    if dit.config != WanDiTConfig.from_dict(recipe.dit_arch):  # the later phases build the recipe's DiT
        raise UsageError(f"--init: {folder / 'transformer'} is not the DiT of this preset (another --preset?)")
    if not (text_dir / "text_encoder" / "config.json").is_file():
        for name in ("tokenizer", "text_encoder"):
            shutil.copytree(folder / name, text_dir / name, dirs_exist_ok=True)
    return vae, dit, {n: p.detach().clone() for n, p in dit.named_parameters()}, (mean, std)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.train")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints and logs (outside the repository)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the Diffusers model folder")
    parser.add_argument("--out-i2v", type=Path, default=None,
                        help="where to write the image-to-video folder (with --set i2v_steps=N)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this exported folder instead of training the VAE and DiT phases")
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
    try:
        return train(args)
    except VidloomError as exc:  # what the user can fix: one line, no traceback
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2


def checked_options(args: argparse.Namespace) -> tuple[Recipe, torch.device]:
    """The recipe and the device, every option checked before the first clip is built; the run
    directory created. A UsageError or RecipeError names the option."""
    recipe = apply_overrides(PRESETS[args.preset](), args.overrides)
    if args.minutes is not None and not args.minutes >= 0:  # inf: no limit, as without the option
        raise UsageError(f"--minutes: expected a number >= 0, got {args.minutes!r}")
    for option, value in (("--fit-vae-minutes", args.fit_vae_minutes), ("--fit-dit-minutes", args.fit_dit_minutes)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option}: expected a finite number > 0, got {value!r}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected at least 1, got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda, got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    if recipe.i2v_steps and args.out_i2v is None:
        raise UsageError("--set i2v_steps needs --out-i2v (where to write the image-to-video folder)")
    run_dir = args.run_dir.resolve()
    outs = [("--out", args.out)] + ([("--out-i2v", args.out_i2v)] if args.out_i2v is not None else [])
    for option, out in outs:  # the export replaces the folder: never the run directory or an unrelated one
        out = out.resolve()
        if out == run_dir or out in run_dir.parents or run_dir in out.parents:
            raise UsageError(f"{option} {out}: must lie outside --run-dir {run_dir}, and not contain it")
        if out.exists() and not (out.is_dir() and ((out / "model_index.json").is_file() or not any(out.iterdir()))):
            raise UsageError(f"{option} {out}: exists and is not an exported model folder (it would be replaced)")
    if args.out_i2v is not None and args.out.resolve() == args.out_i2v.resolve():
        raise UsageError("--out and --out-i2v name the same folder")
    if args.init is not None:
        if not args.init.is_dir():
            raise UsageError(f"--init {args.init}: no such folder")
        if missing := [name for name in INIT_PARTS if not (args.init / name).is_dir()]:
            raise UsageError(f"--init {args.init}: not an exported model folder (no {', '.join(missing)} folder)")
    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise UsageError(f"--run-dir {args.run_dir}: exists and is not a directory")
    writable_folder("--run-dir", args.run_dir)
    for option, out in outs:  # found out now, not after hours of training
        writable_folder(option, out.parent)
    return recipe, device


def writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` if needed and check that a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{option}: cannot write in {folder} ({exc.strerror or exc})") from None


def set_up_device(device: torch.device, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights and optimizer, TF32 products
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def normalised(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """Latents (N, C, F, H, W) per channel to zero mean and unit std, as the DiT is trained on them."""
    shape = (1, -1, 1, 1, 1)
    return (latents - torch.tensor(mean, device=latents.device).view(shape)) / torch.tensor(
        std, device=latents.device).view(shape)


def train(args: argparse.Namespace) -> int:
    recipe, device = checked_options(args)
    set_up_device(device, args.threads)
    began = time.time()

    def left() -> float | None:
        return None if args.minutes is None else max(0.0, args.minutes - (time.time() - began) / 60)

    clips, captions = load_or_build_clips(args.run_dir / "data", recipe.frames, recipe.size, recipe.clips_per_spec,
                                          recipe.seed)
    print(f"{len(clips)} clips ready after {time.time() - began:.0f} s", flush=True)
    summary: dict = {}
    if args.init is not None:
        vae, dit, ema, (mean, std) = load_init(args.init, args.run_dir / "text", recipe)
        summary["init"] = str(args.init)
        if (args.init / "training.json").is_file():  # the run that made it
            summary["init_training"] = read_json_object(args.init / "training.json", "training.json")
    else:
        vae = train_vae(recipe, clips, args.run_dir, minutes=left(), fit_minutes=args.fit_vae_minutes, device=device,
                        autocast=args.autocast == "bf16")
        if not phase_done(args.run_dir, "vae"):
            return 0  # out of time: resume later
    if recipe.decoder_steps:
        summary["frame_psnr_db_before_decoder"] = reconstruction_psnr(vae, clips)[1]
        vae = train_decoder(recipe, vae, clips, args.run_dir, minutes=left(), device=device)
        if not phase_done(args.run_dir, "decoder"):
            return 0
    psnr, summary["frame_psnr_db"] = reconstruction_psnr(vae, clips)
    print(f"vae reconstruction: {psnr:.2f} dB; per frame: {' '.join(f'{v:.1f}' for v in summary['frame_psnr_db'])}",
          flush=True)
    vae_minutes = (time.time() - began) / 60
    tokenizer, encoder = make_text_stack(recipe, args.run_dir / "text")
    table, index = caption_table(WanTextEncoder(tokenizer, encoder), captions)
    latents = cached_latents(args.run_dir / "latents.safetensors", vae, clips, batch=64 if device.type == "cuda" else 8)
    if args.init is None:
        mean, std = latent_stats(latents)
    latents = normalised(latents, mean, std)
    ids = torch.tensor([index[c] for c in captions])

    def train(**more) -> dict:
        return dict(minutes=left(), device=device, autocast=args.autocast == "bf16", **more)

    if args.init is None:
        dit, ema = train_dit(recipe, latents, ids, table, index[""], args.run_dir,
                             **train(fit_minutes=args.fit_dit_minutes))
        if not phase_done(args.run_dir, "dit"):
            return 0
    base = {k: v.cpu() for k, v in ema.items()}  # the text-to-video phase's weights: both fine-tunes start here
    if recipe.tune_steps:
        dit, ema = train_dit(recipe, latents, ids, table, index[""], args.run_dir,
                             **train(phase=recipe.tune_phase(base)))
        if not phase_done(args.run_dir, "tune"):
            return 0
    vae = with_latent_stats(vae.cpu(), mean, std)
    out = export_model(args.out, dit.cpu(), {k: v.cpu() for k, v in ema.items()}, vae, args.run_dir / "text",
                       recipe.dit_timestep_shift)
    print(f"exported {out}", flush=True)
    if recipe.i2v_steps:
        i2v, i2v_ema = train_dit(recipe, latents, ids, table, index[""], args.run_dir,
                                 **train(phase=recipe.i2v_phase(base)))
        if not phase_done(args.run_dir, "i2v"):
            return 0
        out_i2v = export_model(args.out_i2v, i2v.cpu(), {k: v.cpu() for k, v in i2v_ema.items()}, vae,
                               args.run_dir / "text", recipe.dit_timestep_shift, expand_timesteps=True)
        print(f"exported {out_i2v}", flush=True)
    steps = {name: progress for name in PHASES if (progress := Checkpointer(args.run_dir, name).progress())}
    summary.update({
        "vae_psnr_db": psnr, **{f"{name}_steps": step for name, (step, _) in steps.items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "minutes_this_run": (time.time() - began) / 60, "vae_minutes_this_run": vae_minutes,
        "recipe": dataclasses.asdict(recipe),
    })
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
