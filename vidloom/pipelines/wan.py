"""The Wan text-to-video pipeline (Wan2.1, and Wan2.2's two-expert A14B): only wiring, plus what
its settings and components must agree on."""

from __future__ import annotations

from typing import Any

from ..config import EngineConfig, RequestLimits
from ..errors import ModelLoadError
from ..jsonfile import short_repr
from ..models.encoders import WanTextEncoder
from . import register_pipeline
from .base import ComposedPipeline, parallel_parts, tile_spreader
from .stages import (
    DecodingStage, DenoisingStage, Expert, InputValidationStage, LatentPreparationStage, TextEncodingStage,
    TimestepPreparationStage,
)

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# the length Wan's text encoder was trained at, for a tokenizer that states none
WAN_TEXT_LENGTH = 512


@register_pipeline("WanPipeline")
class WanT2VPipeline(ComposedPipeline):
    required_components = REQUIRED_COMPONENTS
    optional_components = ("transformer_2",)
    optional_components_need = "transformer_2 runs only below boundary_ratio, which is not set"

    @staticmethod
    def read_settings(index: dict[str, Any], index_file: str) -> dict[str, Any]:
        """The model_index.json settings this pipeline reads, checked."""
        boundary = index.get("boundary_ratio")
        if boundary is not None and not (isinstance(boundary, (int, float)) and not isinstance(boundary, bool)
                                         and 0 < boundary <= 1):
            raise ModelLoadError(f"boundary_ratio: must be a number in (0, 1] or null, got {short_repr(boundary)}",
                                 file=index_file)
        if index.get("expand_timesteps") not in (None, False):
            raise ModelLoadError("setting expand_timesteps=true (Wan2.2 TI2V) is not supported yet", file=index_file)
        return {"boundary_ratio": boundary}

    @staticmethod
    def describe(settings: dict[str, Any]) -> str:
        """Which variant a folder is and what a request gives it, for ``vidloom info``."""
        if settings["boundary_ratio"] is None:
            return "Wan2.1 text-to-video; inputs: prompt, negative_prompt, guidance_scale"
        return (f"Wan2.2 two-expert text-to-video (transformer while timestep >= {settings['boundary_ratio']:g} x "
                "num_train_timesteps, then transformer_2); inputs: prompt, negative_prompt, guidance_scale, "
                "guidance_scale_2 (default: guidance_scale)")

    @classmethod
    def components_needed(cls, settings: dict[str, Any]) -> tuple[str, ...]:
        """With a boundary_ratio, the low-noise expert transformer_2 too."""
        extra = ("transformer_2",) if settings["boundary_ratio"] is not None else ()
        return cls.required_components + extra

    @staticmethod
    def request_limits(configs: dict[str, Any], engine: EngineConfig) -> RequestLimits:
        """What a request may ask, from the components' configs (``ComponentPlan.config``)."""
        dit, vae = configs["transformer"], configs["vae"]
        return RequestLimits(
            vae_spatial_factor=vae.spatial_factor, temporal_factor=vae.temporal_factor, patch=tuple(dit.patch_size),
            max_grid_side=dit.rope_max_seq_len, max_tokens=engine.max_tokens,
            max_steps=configs["scheduler"].num_train_timesteps,
            max_sequence_length=configs["tokenizer"].get("model_max_length") or WAN_TEXT_LENGTH,
            experts=2 if "transformer_2" in configs else 1,
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
        if "transformer_2" in configs:  # the experts take the same latents, text and patches
            other = configs["transformer_2"]
            pairs += [(f"transformer {key}", getattr(dit, key), f"transformer_2 {key}", getattr(other, key))
                      for key in ("in_channels", "out_channels", "text_dim", "patch_size", "rope_max_seq_len")]
        for name in ("transformer", "transformer_2"):
            if name in configs and configs[name].image_dim is not None:
                raise ModelLoadError(f"{name} is image-conditioned (image_dim={configs[name].image_dim}); a text-to-"
                                     "video WanPipeline gives it no image", file=index_file)
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ModelLoadError(f"components do not fit: {name_a}={a} but {name_b}={b}", file=index_file)
        # the tiled decode (asked for, or spread over processes) tiles in latent pixels
        sf = vae.spatial_factor
        if engine.vae_tile_overlap // sf >= engine.vae_tile_size // sf:
            raise ValueError(f"vae_tile_overlap: {engine.vae_tile_overlap} px covers a whole "
                             f"{engine.vae_tile_size} px tile at this VAE's {sf}x factor "
                             f"(allowed: less than {engine.vae_tile_size // sf * sf} px)")

    def __init__(self, components: dict, config: EngineConfig, limits: RequestLimits, settings: dict[str, Any],
                 parallel=None):
        """``limits``: ``request_limits`` of the components' configs, computed before loading;
        ``settings``: ``read_settings`` of the model index."""
        dit, vae = components["transformer"], components["vae"]
        device = config.torch_device
        text_encoder = WanTextEncoder(components["tokenizer"], components["text_encoder"])
        dit_dtype = dit.proj_out.weight.dtype
        sequence, cfg = parallel_parts(parallel)
        self.denoising = DenoisingStage(self.experts(components, settings), components["scheduler"],
                                        config.batch_cfg, config.check_finite, sequence=sequence, cfg=cfg)
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

    @staticmethod
    def experts(components: dict, settings: dict[str, Any]) -> list[Expert]:
        """Wan2.1: the transformer for every step. Wan2.2 A14B: the high-noise transformer while
        the timestep is >= boundary_ratio x num_train_timesteps, then the low-noise transformer_2
        with guidance_scale_2 (as diffusers' WanPipeline)."""
        boundary = settings["boundary_ratio"]
        if boundary is None:
            return [Expert(components["transformer"])]
        boundary_timestep = boundary * components["scheduler"].config.num_train_timesteps
        return [Expert(components["transformer"], min_timestep=boundary_timestep),
                Expert(components["transformer_2"], guidance_field="guidance_scale_2")]

    def validate_request(self, params) -> None:
        self.input_validation.check(params)
