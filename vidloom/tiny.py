"""Small random-weight Wan model folders in Diffusers layout.

Used by the tests and the benchmarks; not by the engine or the export of the shipped models.
Nothing is downloaded: the tokenizer is built on the spot from a small word list
(``vidloom.small_tokenizer``), the weights are random. A video generated from such a folder is
noise; it exercises the engine.
"""

from __future__ import annotations

from pathlib import Path

from .jsonfile import write_json
from .schedulers.unipc import UNIPC_FLOW_CONFIG
from .small_tokenizer import build_tokenizer

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
