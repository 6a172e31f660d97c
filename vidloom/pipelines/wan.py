"""The Wan text-to-video pipeline: only wiring, plus what its components must agree on."""

from __future__ import annotations

from typing import Any

from ..config import EngineConfig, RequestLimits
from ..errors import ModelLoadError
from ..models.encoders import WanTextEncoder
from . import register_pipeline
from .base import ComposedPipeline, parallel_parts, tile_spreader
from .stages import (
    DecodingStage, DenoisingStage, InputValidationStage, LatentPreparationStage, TextEncodingStage,
    TimestepPreparationStage,
)

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# the length Wan's text encoder was trained at, for a tokenizer that states none
WAN_TEXT_LENGTH = 512


@register_pipeline("WanPipeline")
class WanT2VPipeline(ComposedPipeline):
    required_components = REQUIRED_COMPONENTS

    @staticmethod
    def request_limits(configs: dict[str, Any], engine: EngineConfig) -> RequestLimits:
        """What a request may ask, from the components' configs (``ComponentPlan.config``)."""
        dit, vae = configs["transformer"], configs["vae"]
        return RequestLimits(
            vae_spatial_factor=vae.spatial_factor, temporal_factor=vae.temporal_factor, patch=tuple(dit.patch_size),
            max_grid_side=dit.rope_max_seq_len, max_tokens=engine.max_tokens,
            max_steps=configs["scheduler"].num_train_timesteps,
            max_sequence_length=configs["tokenizer"].get("model_max_length") or WAN_TEXT_LENGTH,
        )

    @staticmethod
    def check_components(configs: dict[str, Any], engine: EngineConfig, index_file: str) -> None:
        """Components that cannot work together are an error before any weight is read."""
        dit, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
        pairs = [
            ("transformer text_dim", dit.text_dim, "text_encoder d_model", text["d_model"]),
            ("transformer in_channels", dit.in_channels, "vae z_dim", vae.z_dim),
            ("transformer out_channels", dit.out_channels, "vae z_dim", vae.z_dim),
        ]
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ModelLoadError(f"components do not fit: {name_a}={a} but {name_b}={b}", file=index_file)
        # the tiled decode (asked for, or spread over processes) tiles in latent pixels
        sf = vae.spatial_factor
        if engine.vae_tile_overlap // sf >= engine.vae_tile_size // sf:
            raise ValueError(f"vae_tile_overlap: {engine.vae_tile_overlap} px covers a whole "
                             f"{engine.vae_tile_size} px tile at this VAE's {sf}x factor "
                             f"(allowed: less than {engine.vae_tile_size // sf * sf} px)")

    def __init__(self, components: dict, config: EngineConfig, limits: RequestLimits, parallel=None):
        """``limits``: ``request_limits`` of the components' configs, computed before loading."""
        dit, vae = components["transformer"], components["vae"]
        device = config.torch_device
        text_encoder = WanTextEncoder(components["tokenizer"], components["text_encoder"])
        dit_dtype = dit.proj_out.weight.dtype
        sequence, cfg = parallel_parts(parallel)
        self.denoising = DenoisingStage(dit, components["scheduler"], config.batch_cfg, config.check_finite,
                                        sequence=sequence, cfg=cfg)
        # the latents are the VAE's (for text-to-video the DiT takes them as they are)
        self.input_validation = InputValidationStage(limits, vae.config.z_dim)
        self.decoding = DecodingStage(vae, config.vae_tiling, config.vae_tile_size, config.vae_tile_overlap,
                                      map_tiles=tile_spreader(parallel))
        super().__init__(
            [
                self.input_validation,
                TextEncodingStage(text_encoder, dit_dtype, device),
                TimestepPreparationStage(components["scheduler"], device),
                LatentPreparationStage(vae.config.z_dim, vae.config.spatial_factor, limits.temporal_factor, device),
                self.denoising,
                self.decoding,
            ],
            limits,
        )
        self.components = components

    def validate_request(self, params) -> None:
        self.input_validation.check(params)
