"""The Wan pipelines: Wan2.1 text-to-video, image-to-video and first-last-frame; Wan2.2's
two-expert A14B (T2V and I2V) and TI2V-5B (text-to-video, and image-to-video from the same
folder). Only wiring, plus what the settings and components must agree on: a variant picks its
conditioning stages and its denoising model input, the denoising loop is the same for all."""

from __future__ import annotations

from typing import Any

from ..config import EngineConfig, RequestLimits
from ..errors import InvalidRequestError, ModelLoadError
from ..jsonfile import short_repr
from ..loader.compute import compute_dtype
from ..models.encoders import WanImageEncoder, WanTextEncoder
from . import register_pipeline
from .base import ComposedPipeline, parallel_parts, tile_spreader
from .stages.denoising import low_noise_guidance
from .stages.model_call import PlainCall
from .stages import (
    ConcatCondition, DecodingStage, DenoisingStage, Expert, FirstFrameStage, GivenFrames, ImageEncodingStage,
    InputValidationStage, LatentPreparationStage, ModelInput, RefineStage, TextEncodingStage, TimestepPreparationStage,
)

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def first_transformer(components: dict):
    """The transformer that sets the shapes (the high-noise one; the low-noise one in a folder
    that has only that): a config or a module, from a dict of either."""
    return components["transformer"] if "transformer" in components else components["transformer_2"]
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
        expand = index.get("expand_timesteps")
        if expand not in (None, False, True):
            raise ModelLoadError(f"expand_timesteps: must be true, false or null, got {short_repr(expand)}",
                                 file=index_file)
        # a folder may hold only the low-noise expert (transformer null), as diffusers allows
        high_noise = index.get("transformer") not in (None, [None, None])
        if not high_noise and (boundary is None or index.get("transformer_2") in (None, [None, None])):
            raise ModelLoadError("transformer is null: then the folder needs transformer_2 and a boundary_ratio "
                                 "(the low-noise expert serves the timesteps below the boundary)", file=index_file)
        return {"boundary_ratio": boundary, "expand_timesteps": bool(expand), "high_noise": high_noise}

    @staticmethod
    def describe(settings: dict[str, Any]) -> str:
        """Which variant a folder is and what a request gives it, for ``vidloom info``."""
        if settings["expand_timesteps"]:
            return ("Wan2.2 TI2V (per-token timesteps): text-to-video, or image-to-video with an image as the "
                    "first frame; inputs: prompt, negative_prompt, guidance_scale, image (optional)")
        if settings["boundary_ratio"] is None:
            return "Wan2.1 text-to-video; inputs: prompt, negative_prompt, guidance_scale"
        if not settings["high_noise"]:
            return (f"Wan2.2 low-noise expert alone (transformer null): transformer_2 for timesteps below "
                    f"{settings['boundary_ratio']:g} x num_train_timesteps, other schedules refused; inputs: prompt, "
                    "negative_prompt, guidance_scale_2")
        return (f"Wan2.2 two-expert text-to-video (transformer while timestep >= {settings['boundary_ratio']:g} x "
                "num_train_timesteps, then transformer_2); inputs: prompt, negative_prompt, guidance_scale, "
                "guidance_scale_2 (default: guidance_scale)")

    @classmethod
    def components_needed(cls, settings: dict[str, Any]) -> tuple[str, ...]:
        """With a boundary_ratio, the low-noise expert transformer_2 too (and only it when the
        folder has no high-noise transformer)."""
        extra = ("transformer_2",) if settings["boundary_ratio"] is not None else ()
        base = cls.required_components
        if not settings.get("high_noise", True):
            base = tuple(name for name in base if name != "transformer")
        return base + extra

    @classmethod
    def uses_optional(cls, name: str, settings: dict[str, Any]) -> bool:
        """Whether optional component ``name``, present in the index, takes part."""
        return name in cls.components_needed(settings)

    @staticmethod
    def image_input(configs: dict[str, Any], settings: dict[str, Any]) -> str:
        """What a request gives besides text (``RequestLimits.image``): TI2V may take a first frame."""
        return "optional" if settings["expand_timesteps"] else "none"

    @staticmethod
    def latent_input_channels(vae, settings: dict[str, Any]) -> int:
        """The transformer's input channels for this pipeline: text-to-video (and TI2V, whose image
        replaces latents) feeds the latents alone."""
        return vae.z_dim

    @classmethod
    def request_limits(cls, configs: dict[str, Any], engine: EngineConfig, settings: dict[str, Any]) -> RequestLimits:
        """What a request may ask, from the components' configs (``ComponentPlan.config``)."""
        dit, vae = first_transformer(configs), configs["vae"]
        return RequestLimits(
            vae_spatial_factor=vae.spatial_factor, temporal_factor=vae.temporal_factor, patch=tuple(dit.patch_size),
            max_grid_side=dit.rope_max_seq_len, max_tokens=engine.max_tokens,
            max_steps=configs["scheduler"].num_train_timesteps,
            max_sequence_length=configs["tokenizer"].get("model_max_length") or WAN_TEXT_LENGTH,
            experts=2 if "transformer_2" in configs else 1, image=cls.image_input(configs, settings),
            last_image=not settings["expand_timesteps"],
        )

    @classmethod
    def check_components(cls, configs: dict[str, Any], engine: EngineConfig, index_file: str,
                         settings: dict[str, Any]) -> None:
        """Components that cannot work together are an error before any weight is read."""
        dit, vae, text = first_transformer(configs), configs["vae"], configs["text_encoder"]
        channels = cls.latent_input_channels(vae, settings)
        pairs = [
            ("transformer text_dim", dit.text_dim, "text_encoder d_model", text["d_model"]),
            ("transformer in_channels", dit.in_channels,
             "vae z_dim" if channels == vae.z_dim else cls.latent_input_name, channels),
            ("transformer out_channels", dit.out_channels, "vae z_dim", vae.z_dim),
        ]
        if "transformer_2" in configs:  # the experts take the same latents, text and patches
            other = configs["transformer_2"]
            pairs += [(f"transformer {key}", getattr(dit, key), f"transformer_2 {key}", getattr(other, key))
                      for key in ("in_channels", "out_channels", "text_dim", "patch_size", "rope_max_seq_len")]
        pairs += cls.image_pairs(configs, index_file)
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ModelLoadError(f"components do not fit: {name_a}={a} but {name_b}={b}", file=index_file)
        # the tiled decode (asked for, or spread over processes) tiles in latent pixels
        sf = vae.spatial_factor
        if engine.vae_tile_overlap // sf >= engine.vae_tile_size // sf:
            raise ValueError(f"vae_tile_overlap: {engine.vae_tile_overlap} px covers a whole "
                             f"{engine.vae_tile_size} px tile at this VAE's {sf}x factor "
                             f"(allowed: less than {engine.vae_tile_size // sf * sf} px)")

    @staticmethod
    def check_refine_components(base: dict[str, Any], refine: dict[str, Any], index_file: str) -> None:
        """A second folder's transformers run the refine pass on this folder's text embeddings and
        latents: its text encoder and VAE must be the same kind (widths and latent statistics)."""
        pairs = [("text_encoder d_model", base["text_encoder"]["d_model"], refine["text_encoder"]["d_model"]),
                 ("vae z_dim", base["vae"].z_dim, refine["vae"].z_dim),
                 ("vae latents_mean", base["vae"].latents_mean, refine["vae"].latents_mean),
                 ("vae latents_std", base["vae"].latents_std, refine["vae"].latents_std),
                 ("vae spatial factor", base["vae"].spatial_factor, refine["vae"].spatial_factor),
                 ("transformer patch_size", tuple(first_transformer(base).patch_size),
                  tuple(first_transformer(refine).patch_size))]
        for name, a, b in pairs:
            if a != b:
                raise ModelLoadError(f"refine_model does not fit the base model: {name} is {short_repr(b)} there, "
                                     f"{short_repr(a)} here (the refine pass takes the base's text and latents)",
                                     file=index_file)

    @staticmethod
    def image_pairs(configs: dict[str, Any], index_file: str) -> list:
        """Text-to-video: no transformer may expect an image."""
        for name in ("transformer", "transformer_2"):
            if name in configs and configs[name].image_dim is not None:
                raise ModelLoadError(f"{name} is image-conditioned (image_dim={configs[name].image_dim}); a text-to-"
                                     "video WanPipeline gives it no image", file=index_file)
        return []

    def conditioning_stages(self, components: dict, config: EngineConfig, dit_dtype, settings) -> list:
        """Stages between text encoding and the timesteps that build ``batch.conditioning``:
        TI2V's first frame; none for text-to-video."""
        return [FirstFrameStage(components["vae"], config.torch_device)] if settings["expand_timesteps"] else []

    @staticmethod
    def model_input(components: dict, settings: dict[str, Any]) -> ModelInput:
        """How the denoising loop feeds the transformer: TI2V replaces the given frame's latents
        (and gives its tokens timestep 0); text-to-video feeds the latents as they are."""
        if settings["expand_timesteps"]:
            return GivenFrames(tuple(first_transformer(components).config.patch_size))
        return ModelInput()

    def __init__(self, components: dict, config: EngineConfig, limits: RequestLimits, settings: dict[str, Any],
                 parallel=None, refine: tuple[dict, dict[str, Any]] | None = None):
        """``limits``: ``request_limits`` of the components' configs, computed before loading;
        ``settings``: ``read_settings`` of the model index; ``refine``: (components, settings) of a
        second model folder whose transformers and scheduler run the refine pass (None: these)."""
        dit, vae = first_transformer(components), components["vae"]
        device = config.torch_device
        text_encoder = WanTextEncoder(components["tokenizer"], components["text_encoder"])
        dit_dtype = compute_dtype(dit)
        sequence, cfg = parallel_parts(parallel)
        experts, model_input = self.experts(components, settings), self.model_input(components, settings)
        expert_device = device if config.offload_experts else None
        call = PlainCall(sequence)  # the one model call both denoising passes run every forward through
        self.denoising = DenoisingStage(experts, components["scheduler"], config.batch_cfg, config.check_finite,
                                        cfg=cfg, model_input=model_input, expert_device=expert_device, call=call)
        # two-stage generation: the refine pass, a second denoising stage with its own schedule
        # (neither has work for a request without refine), with this folder's experts or those of
        # a second one
        self.refine_parts = refine or (components, settings)
        refine_components, refine_settings = self.refine_parts
        refine_scheduler = refine_components["scheduler"]
        refine_pass = DenoisingStage(self.experts(refine_components, refine_settings), refine_scheduler,
                                     config.batch_cfg, config.check_finite, cfg=cfg,
                                     model_input=model_input, expert_device=expert_device, call=call,
                                     steps=lambda request: request.refine.run_steps(request) if request.refine else 0)
        # the latents are the VAE's (for text-to-video the DiT takes them as they are)
        self.input_validation = InputValidationStage(limits, vae.config.z_dim)
        self.decoding = DecodingStage(vae, config.vae_tiling, config.vae_tile_size, config.vae_tile_overlap,
                                      map_tiles=tile_spreader(parallel))
        super().__init__(
            [
                TextEncodingStage(text_encoder, dit_dtype, device),
                *self.conditioning_stages(components, config, dit_dtype, settings),
                TimestepPreparationStage(components["scheduler"], device),
                LatentPreparationStage(vae.config.z_dim, vae.config.spatial_factor, limits.temporal_factor, device),
                self.denoising,
                RefineStage(refine_scheduler, vae.config.spatial_factor, device),
                refine_pass,
                self.decoding,
            ],
            limits,
        )
        self.components = components
        self.settings = settings

    @staticmethod
    def experts(components: dict, settings: dict[str, Any]) -> list[Expert]:
        """Wan2.1: the transformer for every step. Wan2.2 A14B: the high-noise transformer while
        the timestep is >= boundary_ratio x num_train_timesteps, then the low-noise transformer_2
        with guidance_scale_2 (as diffusers' WanPipeline)."""
        boundary = settings["boundary_ratio"]
        if boundary is None:
            return [Expert(components["transformer"])]
        boundary_timestep = boundary * components["scheduler"].config.num_train_timesteps
        low = Expert(components["transformer_2"], guidance=low_noise_guidance)
        if not settings["high_noise"]:
            return [low]
        return [Expert(components["transformer"], min_timestep=boundary_timestep), low]

    def validate_request(self, params) -> None:
        self.input_validation.check(params)
        scheduler = self.components["scheduler"]
        if not self.settings["high_noise"]:
            self._check_low_noise_only(scheduler.schedule(params.num_inference_steps, shift=params.flow_shift), 0,
                                       self.settings, scheduler, "num_inference_steps")
        refine_components, refine_settings = self.refine_parts
        if params.refine is not None and not refine_settings["high_noise"]:
            scheduler, refine = refine_components["scheduler"], params.refine
            full = scheduler.schedule(refine.schedule_steps(params), shift=params.flow_shift)
            self._check_low_noise_only(full, len(full.timesteps) - refine.run_steps(params), refine_settings, scheduler,
                                       "refine.strength")

    @staticmethod
    def _check_low_noise_only(schedule, begin: int, settings: dict[str, Any], scheduler, field: str) -> None:
        """A folder with only the low-noise expert serves a schedule only if every timestep it runs
        is below the boundary (diffusers fails there mid-generation; here it is refused)."""
        boundary = settings["boundary_ratio"] * scheduler.config.num_train_timesteps
        first = float(schedule.timesteps[begin])
        if first >= boundary:
            raise InvalidRequestError(
                field,
                f"the schedule starts at timestep {first:g}, at or above the boundary {boundary:g} (boundary_ratio x "
                "num_train_timesteps), and this folder has no high-noise transformer (transformer is null)",
                "a schedule below the boundary, or a folder with both experts")


@register_pipeline("WanImageToVideoPipeline")
class WanI2VPipeline(WanT2VPipeline):
    """Wan2.1 image-to-video (and first-last-frame with ``last_image``): the CLIP image tokens into
    the transformer's image cross-attention, the VAE-encoded frames and their mask concatenated to
    the latents (2 x z_dim + temporal factor input channels), as diffusers' WanImageToVideoPipeline."""

    optional_components = ("transformer_2", "image_encoder", "image_processor")
    optional_components_need = "transformer_2 needs boundary_ratio; image_encoder/image_processor come as a pair"
    latent_input_name = "2 x vae z_dim + mask channels"

    @classmethod
    def uses_optional(cls, name: str, settings: dict[str, Any]) -> bool:
        return name in ("image_encoder", "image_processor") or super().uses_optional(name, settings)

    @staticmethod
    def image_input(configs: dict[str, Any], settings: dict[str, Any]) -> str:
        if first_transformer(configs).pos_embed_seq_len is not None:  # positions for two images' tokens
            return "first-last"
        return "required"

    @staticmethod
    def describe(settings: dict[str, Any]) -> str:
        if settings["expand_timesteps"]:
            return ("Wan2.2 TI2V image-to-video (per-token timesteps; the image is the first frame); inputs: "
                    "prompt, negative_prompt, image, guidance_scale")
        return ("Wan2.1 image-to-video; inputs: prompt, negative_prompt, image (the first frame), last_image "
                "(the last frame; required by first-last-frame transformers), guidance_scale")

    @staticmethod
    def latent_input_channels(vae, settings: dict[str, Any]) -> int:
        if settings["expand_timesteps"]:
            return vae.z_dim
        return 2 * vae.z_dim + vae.temporal_factor  # latents, then the mask (one per frame of a latent frame), then the frames

    @staticmethod
    def image_pairs(configs: dict[str, Any], index_file: str) -> list:
        dit, encoder = first_transformer(configs), configs.get("image_encoder")
        if (encoder is None) != ("image_processor" not in configs):
            raise ModelLoadError("image_encoder and image_processor come together", file=index_file)
        if dit.image_dim is None:
            if encoder is not None:
                raise ModelLoadError("an image_encoder is given but the transformer has no image_dim to take it",
                                     file=index_file)
            return []
        if encoder is None:
            raise ModelLoadError(f"the transformer takes image tokens (image_dim={dit.image_dim}) but the folder "
                                 "has no image_encoder", file=index_file)
        # every image must reach the encoder at its image_size (not late, as a shape error per request)
        configs["image_processor"].check_fits(encoder["image_size"])
        return [("transformer image_dim", dit.image_dim, "image_encoder hidden_size", encoder["hidden_size"])]

    def conditioning_stages(self, components: dict, config: EngineConfig, dit_dtype, settings) -> list:
        if settings["expand_timesteps"]:
            return super().conditioning_stages(components, config, dit_dtype, settings)
        encoder = None
        if components.get("image_encoder") is not None:
            encoder = WanImageEncoder(components["image_processor"], components["image_encoder"])
        return [ImageEncodingStage(components["vae"], encoder, config.torch_device, dit_dtype)]

    @staticmethod
    def model_input(components: dict, settings: dict[str, Any]) -> ModelInput:
        if settings["expand_timesteps"]:
            return GivenFrames(tuple(first_transformer(components).config.patch_size))
        return ConcatCondition()
