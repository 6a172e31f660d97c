"""The architecture and training settings of the default model, as plain presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import InvalidRequestError

# Wan2.1 architecture, small: 4x spatial / 4x temporal VAE, 2x2 DiT patches
VAE_ARCH = dict(
    base_dim=24, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True, True],
    dropout=0.0, latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_temporal=4, scale_factor_spatial=4,
)
DIT_ARCH = dict(
    patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=48, in_channels=16, out_channels=16,
    text_dim=128, freq_dim=128, ffn_dim=768, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64, pos_embed_seq_len=None,
)
TEXT_ENCODER_ARCH = dict(
    d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
    relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
)
MICRO_VAE_ARCH = dict(VAE_ARCH, base_dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
MICRO_DIT_ARCH = dict(DIT_ARCH, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                      text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)
MICRO_TEXT_ENCODER_ARCH = dict(TEXT_ENCODER_ARCH, d_model=16, d_kv=8, d_ff=32, num_heads=2)


class RecipeError(InvalidRequestError):
    """A recipe field holds a value training cannot use; the message names the field and what it accepts."""


@dataclass
class DitPhase:
    """One DiT training phase: text-to-video from scratch, or image-to-video from given weights."""

    name: str
    steps: int
    batch: int
    lr: float
    warmup: int
    ema: float
    first_frame_prob: float = 0.0  # share of rows whose first latent frame is given (TI2V conditioning)
    first_latent_weight: float = 1.0  # loss weight of the first latent frame (where it is not given)
    init: dict | None = None  # starting weights (state dict); None: fresh initialisation


@dataclass
class Recipe:
    vae_arch: dict = field(default_factory=lambda: dict(VAE_ARCH))
    dit_arch: dict = field(default_factory=lambda: dict(DIT_ARCH))
    text_encoder_arch: dict = field(default_factory=lambda: dict(TEXT_ENCODER_ARCH))
    frames: int = 17
    size: int = 64
    clips_per_spec: int = 64  # training clips per colour x shape x direction combination
    seed: int = 0
    # VAE phase
    vae_steps: int = 8000
    vae_batch: int = 24
    vae_frames: int = 9  # clips are cut to this many frames for VAE training (the VAE is causal)
    vae_crop: int = 64  # and to square crops of this size (it is convolutional; smaller crops are faster)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 5.0  # loss weight on object pixels (they are a few % of the frame)
    # decoder phase: the decoder alone on whole clips (the encoder, hence the latents, frozen).
    # A decoder trained on vae_frames-long clips only decodes that many latent frames well.
    decoder_steps: int = 0
    decoder_batch: int = 4
    decoder_lr: float = 3e-4
    # DiT phase
    dit_steps: int = 30000
    dit_batch: int = 64
    dit_lr: float = 1e-3
    dit_warmup: int = 500
    dit_caption_dropout: float = 0.1
    dit_ema: float = 0.999
    dit_timestep_shift: float = 3.0
    # text-to-video fine-tune: the DiT phase's weights further trained with the first latent frame
    # (frame 0 alone, a different kind of latent from the rest) weighted up in the loss
    tune_steps: int = 0
    tune_batch: int = 16
    tune_lr: float = 1e-4
    tune_warmup: int = 20
    tune_ema: float = 0.99
    tune_first_latent_weight: float = 4.0
    # image-to-video phase: the text-to-video DiT fine-tuned with the first latent frame given
    # (Wan2.2 TI2V's conditioning), exported as a second folder with expand_timesteps
    i2v_steps: int = 0
    i2v_batch: int = 16
    i2v_lr: float = 2e-4
    i2v_warmup: int = 20
    i2v_ema: float = 0.99
    i2v_first_frame_prob: float = 0.8  # the rest stay text-to-video, which the same folder also serves
    checkpoint_minutes: float = 5.0
    log_every: int = 10  # steps between log lines (figures are read back from the device only then)

    def __post_init__(self) -> None:
        """Every scalar checked here, once, so that a bad value is refused before the first clip is
        built, not in the middle of a later phase."""
        for name in ("frames", "size", "clips_per_spec", "vae_steps", "vae_batch", "vae_frames", "vae_crop",
                     "decoder_batch", "dit_steps", "dit_batch", "tune_batch", "i2v_batch", "log_every"):
            _integer(self, name, minimum=1)  # the VAE and DiT phases are never skipped (--init replaces them)
        for name in ("seed", "decoder_steps", "dit_warmup", "tune_steps", "tune_warmup", "i2v_steps", "i2v_warmup"):
            _integer(self, name, minimum=0)  # a fine-tune with 0 steps is skipped
        for name in ("vae_lr", "decoder_lr", "dit_lr", "tune_lr", "i2v_lr", "dit_timestep_shift",
                     "tune_first_latent_weight"):
            _real(self, name, "a finite number > 0", lambda v: v > 0)
        for name in ("vae_kl_weight", "vae_object_weight"):
            _real(self, name, "a finite number >= 0", lambda v: v >= 0)
        _real(self, "checkpoint_minutes", "a number >= 0 (inf: only at the end and when time runs out)",
              lambda v: v >= 0, infinite_ok=True)
        for name in ("dit_caption_dropout", "dit_ema", "tune_ema", "i2v_ema", "i2v_first_frame_prob"):
            _real(self, name, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        if self.seed >= 2**63 - 8:  # seeds up to seed + 6 go to torch.manual_seed (a 64-bit integer)
            raise RecipeError("seed", f"must be below 2**63 - 8, got {self.seed}")
        temporal, spatial = self.vae_arch["scale_factor_temporal"], self.vae_arch["scale_factor_spatial"]
        _, patch_h, patch_w = self.dit_arch["patch_size"]
        for name in ("frames", "vae_frames"):  # the causal VAE: one latent frame, then one per `temporal` frames
            if (getattr(self, name) - 1) % temporal:
                raise RecipeError(name, f"must be 1 + {temporal} * k (the VAE's temporal compression), "
                                        f"got {getattr(self, name)}")
        if self.frames < 1 + temporal:
            raise RecipeError("frames", f"must be at least {1 + temporal} (two latent frames), got {self.frames}")
        if self.vae_frames > self.frames:
            raise RecipeError("vae_frames", f"must be at most frames ({self.frames}), got {self.vae_frames}")
        multiple = spatial * max(patch_h, patch_w)
        if self.size % multiple or self.size < 2 * multiple:
            raise RecipeError("size", f"must be a multiple of {multiple} (the VAE's spatial factor {spatial} times "
                                      f"the DiT's patch), at least {2 * multiple}, got {self.size}")
        grid = max((self.frames - 1) // temporal + 1, self.size // multiple)
        if grid > self.dit_arch["rope_max_seq_len"]:
            raise RecipeError("size", f"{self.size} x {self.frames} frames is a token grid of {grid}, beyond the "
                                      f"DiT's rope_max_seq_len={self.dit_arch['rope_max_seq_len']}")
        if self.vae_crop % spatial:
            raise RecipeError("vae_crop", f"must be a multiple of {spatial} (the VAE's spatial compression), "
                                          f"got {self.vae_crop}")

    def t2v_phase(self) -> DitPhase:
        return DitPhase("dit", self.dit_steps, self.dit_batch, self.dit_lr, self.dit_warmup, self.dit_ema)

    def tune_phase(self, init: dict) -> DitPhase:
        return DitPhase("tune", self.tune_steps, self.tune_batch, self.tune_lr, self.tune_warmup, self.tune_ema,
                        first_latent_weight=self.tune_first_latent_weight, init=init)

    def i2v_phase(self, init: dict) -> DitPhase:
        return DitPhase("i2v", self.i2v_steps, self.i2v_batch, self.i2v_lr, self.i2v_warmup, self.i2v_ema,
                        first_frame_prob=self.i2v_first_frame_prob, init=init)


def _integer(recipe: Recipe, name: str, minimum: int) -> None:
    value = getattr(recipe, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecipeError(name, f"expected an integer, got {value!r}")
    if value < minimum:
        raise RecipeError(name, f"must be at least {minimum}, got {value}")


def _real(recipe: Recipe, name: str, allowed: str, accepts, infinite_ok: bool = False) -> None:
    value = getattr(recipe, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RecipeError(name, f"expected a number, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not infinite_ok) or not accepts(value):
        raise RecipeError(name, f"must be {allowed}, got {value!r}")


def settable_fields(cls=None) -> dict[str, type]:
    """A recipe class's scalar fields (what ``--set KEY=VALUE`` may override) and their types
    (default: ``Recipe``; ``train.distill.DistillRecipe`` too)."""
    types = {"int": int, "float": float, "float | None": float}
    return {f.name: types[f.type] for f in dataclasses.fields(cls or Recipe) if f.type in types}


def with_overrides(recipe, pairs: list[str]):
    """``recipe`` with ``KEY=VALUE`` pairs over its scalar fields, each parsed as the field's type
    and the result validated; a RecipeError names the key and what it accepts."""
    settable = settable_fields(type(recipe))
    changes: dict[str, int | float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in settable:
            raise RecipeError("--set", f"expected KEY=VALUE with a recipe field as KEY, got {pair!r}",
                              allowed=", ".join(sorted(settable)))
        kind = settable[key]
        try:
            changes[key] = kind(value)
        except ValueError:
            raise RecipeError(key, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    return dataclasses.replace(recipe, **changes)


PRESETS = {
    "default": Recipe,
    "micro": lambda: Recipe(vae_arch=dict(MICRO_VAE_ARCH), dit_arch=dict(MICRO_DIT_ARCH),
                            text_encoder_arch=dict(MICRO_TEXT_ENCODER_ARCH), frames=5, size=32, clips_per_spec=1,
                            vae_steps=20, vae_batch=2, vae_frames=5, vae_crop=16,
                            dit_steps=30, dit_batch=8, dit_warmup=5, decoder_steps=4, decoder_batch=2,
                            i2v_steps=6, i2v_batch=8, i2v_warmup=2, tune_steps=5, tune_batch=8, tune_warmup=2,
                            checkpoint_minutes=0.0, log_every=1),
}
