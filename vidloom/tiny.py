"""Small random-weight Wan model folders in Diffusers layout.

Used by the tests and the benchmarks; ``build_tokenizer`` also makes the shipped model's
tokenizer. Nothing is downloaded: the tokenizer is built on the spot from a small word list,
the weights are random. A video generated from such a folder is noise; it exercises the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow", "magenta", "white", "cyan", "orange", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star", "ball", "cube", "cat", "dog", "car", "tree")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "rotating", "jumping", "standing still")


def tokenizer_corpus() -> list[str]:
    lines = [f"a {c} {s} {m}" for c in COLORS for s in SHAPES for m in MOTIONS]
    lines += ["the quick brown fox jumps over the lazy dog", "a video of the sea at sunset, cinematic"]
    return lines


def build_tokenizer(folder: str | Path, vocab_size: int = 256):
    """Train a small Unigram tokenizer with T5's conventions (pad 0, eos 1, unk 2, ``</s>`` appended)
    and save it as a ``T5TokenizerFast`` folder that ``AutoTokenizer`` reloads offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789 ,.!?'-"),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    fast.model_max_length = 512
    fast.save_pretrained(str(folder))
    return fast


TINY_TRANSFORMER = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64, pos_embed_seq_len=None,
)
TINY_VAE = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
)
TINY_TEXT_ENCODER = dict(
    d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu",
)
UNIPC_FLOW_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


# the model_index.json of a Wan2.1 text-to-video folder, as diffusers 0.42 writes it
WAN_T2V_INDEX = {
    "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
    "boundary_ratio": None, "expand_timesteps": False,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": [None, None],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


PRESETS = {
    "tiny": (TINY_TRANSFORMER, TINY_VAE, TINY_TEXT_ENCODER),
}


def build_random_wan(folder: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Wan2.1 T2V folder with the project's own classes (no diffusers needed)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from .loader.weights import save_model
    from .models.wan_dit import WanDiT, WanDiTConfig
    from .models.wan_vae import WanVAE, WanVAEConfig

    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r} (allowed: {', '.join(PRESETS)})")
    dit_cfg, vae_cfg, te_cfg = PRESETS[preset]
    folder = Path(folder)
    tokenizer = build_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    save_model(WanDiT(WanDiTConfig.from_dict(dit_cfg)), folder / "transformer")
    save_model(WanVAE(WanVAEConfig.from_dict(vae_cfg)), folder / "vae")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **te_cfg))
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    write_json(folder / "scheduler" / "scheduler_config.json", {**UNIPC_FLOW_CONFIG, "_diffusers_version": "0.42.1"})
    write_json(folder / "model_index.json", WAN_T2V_INDEX)
    return folder
