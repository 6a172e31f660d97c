"""The trained model as a Diffusers-layout folder that vidloom and diffusers both load."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..jsonfile import write_json
from ..loader.weights import save_model
from ..models.wan_dit import WanDiT
from ..models.wan_vae import WanVAE, WanVAEConfig
from ..schedulers.unipc import UNIPC_FLOW_CONFIG
from ..small_tokenizer import build_tokenizer
from .recipe import Recipe


def make_text_stack(recipe: Recipe, folder: Path):
    """The tokenizer and the frozen, randomly initialised UMT5 encoder; written to ``folder``
    once and reloaded afterwards, so every phase and the export use the same weights."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    if (folder / "text_encoder" / "config.json").is_file():
        try:  # use_safetensors: never the pickled pytorch_model.bin fallback; no code from the folder runs
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True,
                                                      trust_remote_code=False)
            encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                                       use_safetensors=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many kinds; any of them means the folder is unusable
            raise ModelLoadError(f"the run's text stack failed to load ({type(exc).__name__}: {exc})",
                                 file=str(folder)) from exc
        return tokenizer, encoder.eval().requires_grad_(False)
    tokenizer = build_tokenizer(folder / "tokenizer")
    torch.manual_seed(recipe.seed + 5)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **recipe.text_encoder_arch))
    encoder.save_pretrained(str(folder / "text_encoder"))
    return tokenizer, encoder.eval().requires_grad_(False)


def with_latent_stats(vae: WanVAE, mean: list[float], std: list[float]) -> WanVAE:
    config = dataclasses.replace(vae.config, latents_mean=tuple(mean), latents_std=tuple(std))
    out = WanVAE(WanVAEConfig.from_dict(config.to_dict()))
    out.load_state_dict(vae.state_dict())
    return out.eval()


def export_model(out: Path, dit: WanDiT, ema: dict, vae: WanVAE, text_dir: Path, flow_shift: float,
                 expand_timesteps: bool = False) -> Path:
    """Write ``out`` (replacing it): EMA DiT weights, the VAE with its latent statistics, text stack.
    ``expand_timesteps``: a Wan2.2 TI2V-style folder (text-to-video, and image-to-video with the
    image as the first latent frame)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final = WanDiT(dit.config)
    final.load_state_dict(ema)
    save_model(final.eval(), tmp / "transformer")
    save_model(vae, tmp / "vae")
    shutil.copytree(text_dir / "tokenizer", tmp / "tokenizer")
    shutil.copytree(text_dir / "text_encoder", tmp / "text_encoder")
    write_json(tmp / "scheduler" / "scheduler_config.json",
               {**UNIPC_FLOW_CONFIG, "flow_shift": flow_shift, "_diffusers_version": "0.42.1"})
    write_json(tmp / "model_index.json", {
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": None,
        "expand_timesteps": expand_timesteps, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
