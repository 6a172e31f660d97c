"""The Wan text-to-video pipeline: only wiring."""

from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig
from ..models.wan_dit import WanDiTConfig
from ..models.wan_vae import WanVAEConfig
from ..models.encoders import WanTextEncoder
from . import register_pipeline
from .base import ComposedPipeline, parallel_parts, tile_spreader
from .stages import (
    DecodingStage, DenoisingStage, InputValidationStage, LatentPreparationStage, TextEncodingStage,
    TimestepPreparationStage,
)

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


@register_pipeline("WanPipeline")
class WanT2VPipeline(ComposedPipeline):
    required_components = REQUIRED_COMPONENTS

    @staticmethod
    def size_factors(folder: Path) -> tuple[int, int]:
        """(pixels per token edge, frames per latent frame) from the configs alone."""
        dit = WanDiTConfig.from_json(folder / "transformer" / "config.json")
        vae = WanVAEConfig.from_json(folder / "vae" / "config.json")
        return vae.spatial_factor * max(dit.patch_size[1:]), vae.temporal_factor

    def __init__(self, components: dict, config: EngineConfig, parallel=None):
        dit, vae = components["transformer"], components["vae"]
        spatial = vae.config.spatial_factor * max(dit.config.patch_size[1:])
        temporal = vae.config.temporal_factor
        device = config.torch_device
        text_encoder = WanTextEncoder(components["tokenizer"], components["text_encoder"])
        dit_dtype = dit.proj_out.weight.dtype
        sequence, cfg = parallel_parts(parallel)
        self.denoising = DenoisingStage(dit, components["scheduler"], config.batch_cfg, config.check_finite,
                                        sequence=sequence, cfg=cfg)
        self.input_validation = InputValidationStage(spatial, temporal, dit.config.in_channels,
                                                     vae.config.spatial_factor)
        super().__init__(
            [
                self.input_validation,
                TextEncodingStage(text_encoder, dit_dtype, device),
                TimestepPreparationStage(components["scheduler"], device),
                LatentPreparationStage(dit.config.in_channels, vae.config.spatial_factor, temporal, device),
                self.denoising,
                DecodingStage(vae, config.vae_tiling, config.vae_tile_size, config.vae_tile_overlap,
                              map_tiles=tile_spreader(parallel)),
            ],
            spatial_factor=spatial,
            temporal_factor=temporal,
        )
        self.components = components

    def validate_request(self, params) -> None:
        self.input_validation.check(params)
