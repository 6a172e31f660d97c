"""Which Wan model a folder holds, decided once: a frozen ``WanVariant`` read from
``model_index.json`` (``from_index``) and completed by the components' configs (``fit``), with
everything that follows from it (the components it loads, what a request may give, how the
denoising loop feeds the transformer, the experts). ``pipelines/wan.py`` only wires stages from it.

The kinds: Wan2.1 text-to-video (``t2v``), image-to-video (``i2v``) and first-last-frame
(``flf2v``); Wan2.2 A14B with two experts (``two_expert``, text or image), a folder with only
the low-noise expert (``low_noise_only``), and TI2V-5B (``ti2v``: per-token timesteps, text or
an image as the first frame)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ..config import EngineConfig, RequestLimits
from ..errors import InvalidRequestError, ModelLoadError
from ..jsonfile import short_repr
from .stages.denoising import ConcatCondition, Expert, GivenFrames, ModelInput, low_noise_guidance

BASE_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "image_processor")
# the length Wan's text encoder was trained at, for a tokenizer that states none
WAN_TEXT_LENGTH = 512


class ImageInput(str, enum.Enum):
    """What a request gives besides text (``RequestLimits.image``; compares equal to its value)."""

    NONE = "none"  # text-to-video
    OPTIONAL = "optional"  # TI2V: text-to-video, or image-to-video with one
    REQUIRED = "required"  # image-to-video: the first frame
    FIRST_LAST = "first-last"  # first-last-frame: both frames


def first_transformer(components: dict):
    """The transformer that sets the shapes (the high-noise one; the low-noise one in a folder
    that has only that): a config or a module, from a dict of either."""
    return components["transformer"] if "transformer" in components else components["transformer_2"]


@dataclasses.dataclass(frozen=True)
class WanVariant:
    """A Wan folder's variant. ``image_pipeline``: a ``WanImageToVideoPipeline`` folder;
    ``expand_timesteps``: Wan2.2 TI2V; ``boundary_ratio``: two experts, ``transformer`` while the
    timestep is >= boundary x num_train_timesteps, then ``transformer_2``; ``high_noise`` False:
    the folder has only the low-noise expert; ``first_last`` (from the transformer's config): an
    image-to-video transformer with positions for two images' tokens."""

    image_pipeline: bool = False
    expand_timesteps: bool = False
    boundary_ratio: float | None = None
    high_noise: bool = True
    first_last: bool = False

    @classmethod
    def from_index(cls, index: dict[str, Any], index_file: str, image_pipeline: bool) -> "WanVariant":
        """The variant ``model_index.json`` states, its settings checked (the config-dependent
        part, ``first_last``, is settled by ``fit``)."""
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
        return cls(image_pipeline, bool(expand), boundary, high_noise)

    @property
    def kind(self) -> str:
        """One of t2v, i2v, flf2v, two_expert, low_noise_only, ti2v."""
        if self.expand_timesteps:
            return "ti2v"
        if self.boundary_ratio is not None:
            return "two_expert" if self.high_noise else "low_noise_only"
        if self.image_pipeline:
            return "flf2v" if self.first_last else "i2v"
        return "t2v"

    # --- the folder ----------------------------------------------------------------------------
    def components(self) -> tuple[str, ...]:
        """The components the variant always loads."""
        base = BASE_COMPONENTS if self.high_noise else tuple(n for n in BASE_COMPONENTS if n != "transformer")
        return base + (("transformer_2",) if self.boundary_ratio is not None else ())

    def optional_components(self) -> tuple[str, ...]:
        """Components loaded when the folder has them (the image encoder of image-to-video)."""
        return IMAGE_COMPONENTS if self.image_pipeline else ()

    def unused_reason(self, name: str) -> str | None:
        """Why a component the folder gives is never used (None: it is not one the variant knows)."""
        if name == "transformer_2":
            return "transformer_2 runs only below boundary_ratio, which is not set"
        return None

    def fit(self, configs: dict[str, Any], engine: EngineConfig, index_file: str) -> "WanVariant":
        """Components that cannot work together are an error before any weight is read. Returns the
        variant completed by the configs (first-last-frame)."""
        dit, vae, text = first_transformer(configs), configs["vae"], configs["text_encoder"]
        variant = dataclasses.replace(self, first_last=self.image_pipeline and dit.pos_embed_seq_len is not None)
        channels = variant.latent_input_channels(vae)
        pairs = [
            ("transformer text_dim", dit.text_dim, "text_encoder d_model", text["d_model"]),
            ("transformer in_channels", dit.in_channels,
             "vae z_dim" if channels == vae.z_dim else "2 x vae z_dim + mask channels", channels),
            ("transformer out_channels", dit.out_channels, "vae z_dim", vae.z_dim),
        ]
        if "transformer_2" in configs:  # the experts take the same latents, text and patches
            other = configs["transformer_2"]
            pairs += [(f"transformer {key}", getattr(dit, key), f"transformer_2 {key}", getattr(other, key))
                      for key in ("in_channels", "out_channels", "text_dim", "patch_size", "rope_max_seq_len")]
        pairs += variant._image_pairs(configs, index_file)
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ModelLoadError(f"components do not fit: {name_a}={a} but {name_b}={b}", file=index_file)
        # the tiled decode (asked for, or spread over processes) tiles in latent pixels
        sf = vae.spatial_factor
        if engine.vae_tile_overlap // sf >= engine.vae_tile_size // sf:
            raise ValueError(f"vae_tile_overlap: {engine.vae_tile_overlap} px covers a whole "
                             f"{engine.vae_tile_size} px tile at this VAE's {sf}x factor "
                             f"(allowed: less than {engine.vae_tile_size // sf * sf} px)")
        return variant

    def _image_pairs(self, configs: dict[str, Any], index_file: str) -> list:
        """Text-to-video: no transformer may expect an image. Image-to-video: the image encoder
        fits the transformer's image tokens, and the processor gives the encoder its size."""
        if not self.image_pipeline:
            for name in ("transformer", "transformer_2"):
                if name in configs and configs[name].image_dim is not None:
                    raise ModelLoadError(f"{name} is image-conditioned (image_dim={configs[name].image_dim}); a text-"
                                         "to-video WanPipeline gives it no image", file=index_file)
            return []
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

    def request_limits(self, configs: dict[str, Any], engine: EngineConfig) -> RequestLimits:
        """What a request may ask, from the components' configs (``ComponentPlan.config``)."""
        dit, vae = first_transformer(configs), configs["vae"]
        return RequestLimits(
            vae_spatial_factor=vae.spatial_factor, temporal_factor=vae.temporal_factor, patch=tuple(dit.patch_size),
            max_grid_side=dit.rope_max_seq_len, max_tokens=engine.max_tokens,
            max_steps=configs["scheduler"].num_train_timesteps,
            max_sequence_length=configs["tokenizer"].get("model_max_length") or WAN_TEXT_LENGTH,
            experts=2 if "transformer_2" in configs else 1, image=self.image_input, transformer_blocks=dit.num_layers,
            last_image=not self.expand_timesteps,
        )

    # --- what the variant gives the stages ------------------------------------------------------
    @property
    def image_input(self) -> ImageInput:
        if self.image_pipeline:
            return ImageInput.FIRST_LAST if self.first_last else ImageInput.REQUIRED
        return ImageInput.OPTIONAL if self.expand_timesteps else ImageInput.NONE

    def latent_input_channels(self, vae) -> int:
        """The transformer's input channels: the latents (text-to-video; TI2V, whose image replaces
        latents), or Wan2.1 image-to-video's latents, mask (one per frame of a latent frame) and frames."""
        if self.image_pipeline and not self.expand_timesteps:
            return 2 * vae.z_dim + vae.temporal_factor
        return vae.z_dim

    def model_input(self, patch: tuple[int, int, int]) -> ModelInput:
        """How the denoising loop feeds the transformer: TI2V replaces the given frame's latents
        (and gives its tokens timestep 0); Wan2.1 image-to-video concatenates the condition;
        text-to-video feeds the latents as they are."""
        if self.expand_timesteps:
            return GivenFrames(tuple(patch))
        return ConcatCondition() if self.image_pipeline else ModelInput()

    def experts(self, components: dict) -> list[Expert]:
        """Wan2.1: the transformer for every step. Wan2.2 A14B: the high-noise transformer while
        the timestep is >= boundary_ratio x num_train_timesteps, then the low-noise transformer_2
        with guidance_scale_2 (as diffusers' WanPipeline)."""
        if self.boundary_ratio is None:
            return [Expert(components["transformer"])]
        low = Expert(components["transformer_2"], guidance=low_noise_guidance)
        if not self.high_noise:
            return [low]
        return [Expert(components["transformer"], min_timestep=self.boundary_timestep(components["scheduler"])), low]

    def boundary_timestep(self, scheduler) -> float:
        return self.boundary_ratio * scheduler.config.num_train_timesteps

    def check_schedule(self, schedule, begin: int, scheduler, field: str) -> None:
        """A folder with only the low-noise expert serves a schedule only if every timestep it runs
        is below the boundary (diffusers fails there mid-generation; here it is refused)."""
        if self.high_noise:
            return
        boundary = self.boundary_timestep(scheduler)
        first = float(schedule.timesteps[begin])
        if first >= boundary:
            raise InvalidRequestError(
                field,
                f"the schedule starts at timestep {first:g}, at or above the boundary {boundary:g} (boundary_ratio x "
                "num_train_timesteps), and this folder has no high-noise transformer (transformer is null)",
                "a schedule below the boundary, or a folder with both experts")

    def describe(self) -> str:
        """Which variant a folder is and what a request gives it, for ``vidloom info``."""
        if self.expand_timesteps:
            if self.image_pipeline:
                return ("Wan2.2 TI2V image-to-video (per-token timesteps; the image is the first frame); inputs: "
                        "prompt, negative_prompt, image, guidance_scale")
            return ("Wan2.2 TI2V (per-token timesteps): text-to-video, or image-to-video with an image as the "
                    "first frame; inputs: prompt, negative_prompt, guidance_scale, image (optional)")
        if self.image_pipeline:
            return ("Wan2.1 image-to-video; inputs: prompt, negative_prompt, image (the first frame), last_image "
                    "(the last frame; required by first-last-frame transformers), guidance_scale")
        if self.boundary_ratio is None:
            return "Wan2.1 text-to-video; inputs: prompt, negative_prompt, guidance_scale"
        if not self.high_noise:
            return (f"Wan2.2 low-noise expert alone (transformer null): transformer_2 for timesteps below "
                    f"{self.boundary_ratio:g} x num_train_timesteps, other schedules refused; inputs: prompt, "
                    "negative_prompt, guidance_scale_2")
        return (f"Wan2.2 two-expert text-to-video (transformer while timestep >= {self.boundary_ratio:g} x "
                "num_train_timesteps, then transformer_2); inputs: prompt, negative_prompt, guidance_scale, "
                "guidance_scale_2 (default: guidance_scale)")


def check_refine_fits(base: dict[str, Any], refine: dict[str, Any], index_file: str) -> None:
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
