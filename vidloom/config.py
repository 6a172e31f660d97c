"""The two runtime configs: ``EngineConfig`` (per engine) and ``SamplingParams`` (per request).

Each option has one home. The CLI derives its flags from these dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import cpu
from .errors import InvalidRequestError

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
OUTPUT_TYPES = ("np", "pt", "latent", "mp4")


def parse_dtype(value: Any, field_name: str) -> torch.dtype | None:
    """A torch dtype from a dtype or one of the names in DTYPE_NAMES (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in DTYPE_NAMES.values():
            raise ValueError(f"{field_name}: unsupported dtype {value} (allowed: fp32, bf16, fp16)")
        return value
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower()]
    raise ValueError(f"{field_name}: unknown dtype {value!r} (allowed: fp32, bf16, fp16 or a torch dtype)")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls are native on ``device`` (CUDA with bf16, or a CPU with AMX / AVX-512 BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu.features().bf16_native
    return False


@dataclass
class EngineConfig:
    """Options of one engine instance (device, precision, memory)."""

    device: str = "cpu"
    dtype: Any = None  # all components; overridden per component below
    dit_dtype: Any = None  # default: bf16 where the device runs it fast, else fp32
    vae_dtype: Any = None  # default: fp32
    text_encoder_dtype: Any = None  # default: as the DiT
    vae_tiling: bool = False  # spatially tiled decode, for memory
    vae_tile_size: int = 256  # tile edge in pixels when tiling
    vae_tile_overlap: int = 64  # overlap in pixels when tiling
    batch_cfg: bool = True  # conditional and unconditional passes in one batched forward
    check_finite: bool = True  # stop with an error naming the step when latents turn NaN/Inf
    sp_size: int = 1  # Ulysses sequence-parallel degree (processes sharing one forward)
    cfg_parallel: bool = False  # conditional and unconditional passes on different processes

    def __post_init__(self):
        try:
            self.torch_device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
        for name in ("dtype", "dit_dtype", "vae_dtype", "text_encoder_dtype"):
            setattr(self, name, parse_dtype(getattr(self, name), name))
        if not (isinstance(self.sp_size, int) and not isinstance(self.sp_size, bool) and self.sp_size >= 1):
            raise ValueError(f"sp_size: expected an integer >= 1, got {self.sp_size!r}")
        if not isinstance(self.cfg_parallel, bool):
            raise ValueError(f"cfg_parallel: expected true or false, got {self.cfg_parallel!r}")
        if self.vae_tile_size < 32 or self.vae_tile_overlap < 0 or self.vae_tile_overlap >= self.vae_tile_size:
            raise ValueError("vae_tile_size/vae_tile_overlap: need tile >= 32 and 0 <= overlap < tile")

    def resolved_dtypes(self) -> dict[str, torch.dtype]:
        fast = torch.bfloat16 if bf16_is_fast(self.torch_device) else torch.float32
        dit = self.dit_dtype or self.dtype or fast
        return {
            "transformer": dit,
            "text_encoder": self.text_encoder_dtype or self.dtype or dit,
            "vae": self.vae_dtype or self.dtype or torch.float32,
        }

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown} (known: {sorted(names)})")
        return cls(**options)


@dataclass
class SamplingParams:
    """One generation request. ``validate`` checks it against the model before any work."""

    prompt: str = ""
    negative_prompt: str | None = None
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float | None = None  # None: the scheduler config's shift
    seed: int = 0
    max_sequence_length: int = 512
    latents: torch.Tensor | None = field(default=None, repr=False)  # initial noise (B, C, F, H, W)
    output_type: str = "np"
    output_path: str | None = None
    fps: int = 16
    return_trajectory: bool = False
    decode_trajectory: bool = False

    @property
    def do_cfg(self) -> bool:
        # the reference runs the unconditional pass only when guidance_scale > 1
        return self.guidance_scale > 1.0

    def validate(self, spatial_factor: int = 16, temporal_factor: int = 4) -> "SamplingParams":
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidRequestError("negative_prompt", f"must be a string or None, got {type(self.negative_prompt).__name__}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value < spatial_factor or value % spatial_factor:
                raise InvalidRequestError(name, f"got {value!r}", f"positive multiples of {spatial_factor}")
        if not _is_int(self.num_frames) or self.num_frames < 1 or (self.num_frames - 1) % temporal_factor:
            raise InvalidRequestError(
                "num_frames", f"got {self.num_frames!r}", f"{temporal_factor}k+1 frames, e.g. 1, 5, 17, 33, 81"
            )
        if not _is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            raise InvalidRequestError("num_inference_steps", f"got {self.num_inference_steps!r}", "integers >= 1")
        if not _is_number(self.guidance_scale) or not self.guidance_scale >= 0:
            raise InvalidRequestError("guidance_scale", f"got {self.guidance_scale!r}", "numbers >= 0")
        if self.flow_shift is not None and (not _is_number(self.flow_shift) or not self.flow_shift > 0):
            raise InvalidRequestError("flow_shift", f"got {self.flow_shift!r}", "numbers > 0 or None")
        if not _is_int(self.seed):
            raise InvalidRequestError("seed", f"got {self.seed!r}", "integers")
        if not _is_int(self.max_sequence_length) or self.max_sequence_length < 1:
            raise InvalidRequestError("max_sequence_length", f"got {self.max_sequence_length!r}", "integers >= 1")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidRequestError("output_type", f"got {self.output_type!r}", ", ".join(OUTPUT_TYPES))
        if not _is_int(self.fps) or not 1 <= self.fps <= 240:
            raise InvalidRequestError("fps", f"got {self.fps!r}", "integers 1..240")
        if self.latents is not None and not isinstance(self.latents, torch.Tensor):
            raise InvalidRequestError("latents", f"must be a torch.Tensor, got {type(self.latents).__name__}")
        if self.output_path is not None:
            self._validate_output_path()
        return self

    def _validate_output_path(self) -> None:
        from .io.video import output_kind  # the export module owns the list of formats

        if not isinstance(self.output_path, (str, os.PathLike)):
            raise InvalidRequestError("output_path", f"must be a path, got {type(self.output_path).__name__}")
        kind = output_kind(Path(self.output_path))
        if self.output_type == "mp4" and kind != "mp4":
            raise InvalidRequestError("output_path", "output_type 'mp4' needs a .mp4 path", "*.mp4 or None")

    def latent_shape(self, channels: int, spatial_factor: int, temporal_factor: int) -> tuple[int, ...]:
        frames = (self.num_frames - 1) // temporal_factor + 1
        return (1, channels, frames, self.height // spatial_factor, self.width // spatial_factor)

    @classmethod
    def from_kwargs(cls, prompt, **kwargs) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidRequestError(unknown[0], "unknown sampling option", ", ".join(sorted(names)))
        return cls(prompt=prompt, **kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
