"""The Wan pipelines: Wan2.1 text-to-video, image-to-video and first-last-frame; Wan2.2's
two-expert A14B (T2V and I2V) and TI2V-5B (text-to-video, and image-to-video from the same
folder). Only wiring: the folder's ``WanVariant`` (``wan_variant.py``) picks the conditioning
stages, the experts and the denoising model input; the denoising loop is the same for all."""

from __future__ import annotations

from typing import Any

from ..cache.call import CachingCall
from ..cache.policies import policy_for
from ..cache.spec import MagCache, TeaCache, parse_cache
from ..config import EngineConfig, RequestLimits
from ..errors import InvalidRequestError
from ..memory.residency import Residency
from ..models.encoders import WanImageEncoder, WanTextEncoder
from . import register_pipeline
from .base import ComposedPipeline, parallel_parts, tile_spreader
from .stages.model_call import PlainCall
from .stages import (
    DecodingStage, DenoisingStage, FirstFrameStage, ImageEncodingStage, InputValidationStage, LatentPreparationStage,
    PromptCache, RefineStage, TextEncodingStage, TimestepPreparationStage,
)
from .wan_variant import WanVariant, check_refine_fits, first_transformer


@register_pipeline("WanPipeline")
class WanT2VPipeline(ComposedPipeline):
    image_pipeline = False  # the variant's image_pipeline: what model_index.json's _class_name says

    @classmethod
    def read_variant(cls, index: dict[str, Any], index_file: str) -> WanVariant:
        """The variant model_index.json states, its settings checked (``loader.plan`` completes it)."""
        return WanVariant.from_index(index, index_file, cls.image_pipeline)

    check_refine = staticmethod(check_refine_fits)

    def __init__(self, residency: Residency, config: EngineConfig, limits: RequestLimits, variant: WanVariant,
                 parallel=None, refine: WanVariant | None = None, calibration=None):
        """``residency``: the policy holding the loaded components (a refine folder's under
        "refine."), the stages get handles to them; ``limits``: what a request may ask
        (``loader.plan``, before loading); ``variant``: the folder's, completed by the plan;
        ``refine``: the variant of a second model folder whose transformers and scheduler run the
        refine pass (None: this folder's run it); ``calibration``: the folder's feature-cache
        calibration (``cache.calibrate``; None: TeaCache and MagCache are refused)."""
        components = residency.parts()
        dit, vae = first_transformer(components), components["vae"]
        device = config.torch_device
        text_encoder = WanTextEncoder(components["tokenizer"], components["text_encoder"])
        sequence, cfg = parallel_parts(parallel)
        model_input = variant.model_input(dit.config.patch_size)
        # the one model call both denoising passes run every forward through: each request's feature
        # cache (``SamplingParams.cache``) around the plain forward
        call = CachingCall(PlainCall(sequence), sequence, calibration, cfg)
        self.sequence, self.calibration = sequence, calibration
        self.denoising = DenoisingStage(variant.experts(components), components["scheduler"], config.batch_cfg,
                                        config.check_finite, cfg=cfg, model_input=model_input, call=call)
        # two-stage generation: the refine pass, a second denoising stage with its own schedule
        # (neither has work for a request without refine), with this folder's experts or those of
        # a second one
        self.refine_parts = (residency.parts("refine."), refine) if refine is not None else (components, variant)
        refine_components, refine_variant = self.refine_parts
        refine_scheduler = refine_components["scheduler"]
        self.refine_pass = refine_pass = DenoisingStage(refine_variant.experts(refine_components), refine_scheduler,
                                     config.batch_cfg, config.check_finite, cfg=cfg, model_input=model_input, call=call,
                                     steps=lambda request: request.refine.run_steps(request) if request.refine else 0)
        # the latents are the VAE's (for text-to-video the DiT takes them as they are)
        self.input_validation = InputValidationStage(limits, vae.config.z_dim)
        self.decoding = DecodingStage(vae, config.vae_tiling, config.vae_tile_size, config.vae_tile_overlap,
                                      map_tiles=tile_spreader(parallel), level=config.low_mem_level or 0)
        super().__init__(
            [
                TextEncodingStage(text_encoder, dit.dtype, device, PromptCache(config.prompt_cache_size)),
                *self.conditioning_stages(components, config, dit.dtype, variant),
                TimestepPreparationStage(components["scheduler"], device),
                LatentPreparationStage(vae.config.z_dim, vae.config.spatial_factor, limits.temporal_factor, device),
                self.denoising,
                RefineStage(refine_scheduler, vae.config.spatial_factor, device),
                refine_pass,
                self.decoding,
            ],
            limits,
        )
        self.residency = residency
        self.variant = variant

    @property
    def components(self) -> dict:
        """Every component, by name (a refine folder's under "refine."), as the residency holds it now."""
        return self.residency.components()

    def _check_block_skipping(self, policy, experts: list[str]) -> None:
        """TeaCache / MagCache run only with a calibration that covers every expert the request
        uses (a refine folder's transformers are "refine.transformer", ...)."""
        policy_for(policy, self.calibration)  # uncalibrated TeaCache / MagCache: the error says how to calibrate
        if self.calibration is not None and isinstance(policy, (TeaCache, MagCache)):
            missing = self.calibration.covers(experts)
            if missing is not None:
                raise InvalidRequestError("cache", f"the folder's calibration lacks {missing}",
                                          "run `vidloom calibrate-cache --model DIR` again")

    @staticmethod
    def conditioning_stages(components: dict, config: EngineConfig, dit_dtype, variant: WanVariant) -> list:
        """Stages between text encoding and the timesteps that build ``batch.conditioning``:
        TI2V's first frame (given or not); Wan2.1 image-to-video's encoded frames and image
        tokens; none for text-to-video."""
        if variant.expand_timesteps:
            return [FirstFrameStage(components["vae"], config.torch_device)]
        if not variant.image_pipeline:
            return []
        encoder = None
        if components.get("image_encoder") is not None:
            encoder = WanImageEncoder(components["image_processor"], components["image_encoder"])
        return [ImageEncodingStage(components["vae"], encoder, config.torch_device, dit_dtype)]

    def validate_request(self, params) -> None:
        self.input_validation.check(params)
        spec = parse_cache(params.cache)
        if spec is not None and spec.blocks is not None:
            stages = [self.denoising] + ([self.refine_pass] if params.refine is not None else [])
            self._check_block_skipping(spec.blocks, [e.transformer.name for s in stages for e in s.experts])
        scheduler = self.components["scheduler"]
        if not self.variant.high_noise:
            self.variant.check_schedule(scheduler.schedule(params.num_inference_steps, shift=params.flow_shift), 0,
                                        scheduler, "num_inference_steps")
        refine_components, refine_variant = self.refine_parts
        if params.refine is not None and not refine_variant.high_noise:
            scheduler, refine = refine_components["scheduler"], params.refine
            full = scheduler.schedule(refine.schedule_steps(params), shift=params.flow_shift)
            refine_variant.check_schedule(full, len(full.timesteps) - refine.run_steps(params), scheduler,
                                          "refine.strength")


@register_pipeline("WanImageToVideoPipeline")
class WanI2VPipeline(WanT2VPipeline):
    """Wan2.1 image-to-video (and first-last-frame with ``last_image``): the CLIP image tokens into
    the transformer's image cross-attention, the VAE-encoded frames and their mask concatenated to
    the latents (2 x z_dim + temporal factor input channels), as diffusers' WanImageToVideoPipeline;
    Wan2.2's image-to-video folders (two experts; TI2V with the image as the first frame)."""

    image_pipeline = True
