"""The two runtime configs: ``EngineConfig`` (per engine) and ``SamplingParams`` (per request).

Each option has one home. The CLI derives its flags from these dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import cpu
from .errors import InvalidRequestError
from .jsonfile import short_repr

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
OUTPUT_TYPES = ("np", "pt", "latent", "mp4")
# Request bounds that hold for any model: past them a request is a mistake, not a workload.
MAX_TOKENS = 2**20  # default EngineConfig.max_tokens: 13x Wan's 720p x 81 frames (75,600 tokens)
MAX_GUIDANCE = 1000.0
FLOW_SHIFT_RANGE = (1e-3, 1e3)
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
MAX_PROCESSES = 1024
MAX_TILE = 8192
# a prompt or negative prompt, in characters: far above Wan's 512 tokens, and small enough that
# the tokenizer (which reads the whole string before it truncates) never sees a huge one
MAX_PROMPT_CHARS = 20_000


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


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")


@dataclass
class EngineConfig:
    """Options of one engine instance (device, precision, memory)."""

    device: str = "auto"  # auto: CUDA where torch sees a device, else the CPU (resolved in __post_init__)
    dtype: Any = None  # all components; overridden per component below
    dit_dtype: Any = None  # default: bf16 where the device runs it fast, else fp32
    vae_dtype: Any = None  # default: fp32
    text_encoder_dtype: Any = None  # default: as the DiT
    vae_tiling: bool = False  # spatially tiled decode, for memory
    vae_tile_size: int = 256  # tile edge in pixels when tiling
    vae_tile_overlap: int = 64  # overlap in pixels when tiling
    batch_cfg: bool = True  # conditional and unconditional passes in one batched forward
    check_finite: bool = True  # stop with an error naming the step when latents turn NaN/Inf
    sp_size: int = 1  # sequence-parallel degree (processes sharing one forward)
    cfg_parallel: bool = False  # conditional and unconditional passes on different processes
    # ring-attention degree inside sp_size (USP: sp_size / ring_size Ulysses ranks x ring_size ring
    # ranks); 1: Ulysses alone, which needs sp_size to divide the head count; ring works for any
    ring_size: int = 1
    # tensor-parallel degree: each process holds 1/tp_size of the transformer's heads and FFN units
    # (world = tp_size x sp_size x cfg degree)
    tp_size: int = 1
    # weights used as stored are pages of the mapped file (fast load, shared page cache); the file
    # must then not change while the engine lives (see README, "Mapped weights")
    map_weights: bool = True
    max_tokens: int = MAX_TOKENS  # largest request the engine takes, in DiT tokens (frames x h x w)
    # a second model folder whose transformer(s) and scheduler run the refine pass of two-stage
    # generation (it must share the base folder's text encoder and VAE latent space); None: the base's
    refine_model: str | None = None
    # two-expert models: only the expert serving the current step on the device, the other in CPU
    # memory (moved at the switch, once per request); halves the device memory the experts take
    offload_experts: bool = False
    # the embeddings of this many recent prompts kept (0: none), so a repeated prompt (the negative
    # prompt above all) needs no text encoder; at most 256 MiB of them
    prompt_cache_size: int = 32
    # how much of the model is kept in memory (vidloom.memory.levels): 0 every component resident;
    # 1 the VAE decodes one frame per step; 2 one model component in memory at a time, each
    # loaded when used; 3 the DiT's and text encoder's blocks streamed (their mapped pages released
    # after each block). None: the lowest level whose estimate fits the memory available (or
    # max_memory). Out-of-memory recovery runs the failed unit again one level higher.
    low_mem_level: int | None = None
    # a memory budget ("8GiB", "512MiB", "16GB" or bytes): the engine's level, and each request's,
    # is the lowest whose estimated peak fits it; a request that no level fits is refused
    max_memory: str | None = None  # (an int count of bytes is taken too)
    # the attention kernel (vidloom.models.attention): sdpa, flex, flash (CUDA, flash-attn), sage
    # (CUDA, SageAttention: not exact), auto (the fastest exact one present), or sliding_tile
    # (every request's self-attention in sliding tiles of sta_window unless it gives its own)
    attention_backend: str = "sdpa"
    # the default sliding-tile window "F,H,W" in tokens (frames, rows, columns after patching) of
    # requests that give none; None: dense attention unless a request asks for a window
    sta_window: str | None = None
    # LoRA adapters merged into the transformer at load: (file, scale) pairs (vidloom.lora; a bare
    # file means scale 1.0); loras_2 for a two-expert model's second transformer; lora_ignore:
    # keys of those files to skip (any other key that matches no module is an error)
    loras: tuple = ()
    loras_2: tuple = ()
    lora_ignore: tuple = ()
    # merged: folded into the weights at load (no cost per step); unmerged: kept apart and applied
    # in the forward to every request that names no adapters of its own (requests may choose others)
    lora_mode: str = "merged"
    # at most this many unmerged adapters in memory (None: no bound); the others registered
    # (VideoGenerator.register_lora, vidloom serve --lora-dir) are loaded at their next request,
    # dropping the least recently used adapter no unfinished request uses
    max_loras: int | None = None
    # the transformer blocks' Linear weights stored as int8 or fp8 (e4m3) with per-channel scales,
    # computed in the model's dtype (vidloom.quant); None: as loaded. At memory levels 2-3 a
    # component is quantized again each time it is loaded
    quantize: str | None = None
    # the text encoder's blocks likewise (UMT5: every Linear but the FFN's output, which
    # transformers keeps in float32; declared beside its loader spec)
    quantize_text_encoder: str | None = None
    # compile the transformer's repeated block (torch.compile, regional), warmed up at load on a
    # request of the expected size; memory levels 0-1 only (levels 2-3 stream blocks through hooks)
    compile: bool = False

    def __post_init__(self):
        self.device = resolve_device(self.device)
        try:
            self.torch_device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {self.device!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from exc
        _check_device_present(self.torch_device)
        for name in ("dtype", "dit_dtype", "vae_dtype", "text_encoder_dtype"):
            setattr(self, name, parse_dtype(getattr(self, name), name))
        if not (_is_int(self.sp_size) and 1 <= self.sp_size <= MAX_PROCESSES):
            raise ValueError(f"sp_size: expected an integer in 1..{MAX_PROCESSES}, got {self.sp_size!r}")
        if not (_is_int(self.tp_size) and 1 <= self.tp_size <= MAX_PROCESSES):
            raise ValueError(f"tp_size: expected an integer in 1..{MAX_PROCESSES}, got {self.tp_size!r}")
        if not (_is_int(self.ring_size) and 1 <= self.ring_size <= self.sp_size and self.sp_size % self.ring_size == 0):
            raise ValueError(f"ring_size: expected a divisor of sp_size={self.sp_size} "
                             f"(allowed: {', '.join(str(d) for d in range(1, self.sp_size + 1) if self.sp_size % d == 0)}),"
                             f" got {self.ring_size!r}")
        for name in ("vae_tiling", "batch_cfg", "check_finite", "cfg_parallel", "map_weights", "offload_experts",
                     "compile"):
            _require_bool(name, getattr(self, name))
        if not (_is_int(self.vae_tile_size) and 32 <= self.vae_tile_size <= MAX_TILE):
            raise ValueError(f"vae_tile_size: expected an integer in 32..{MAX_TILE} (pixels), got {self.vae_tile_size!r}")
        if not (_is_int(self.vae_tile_overlap) and 0 <= self.vae_tile_overlap < self.vae_tile_size):
            raise ValueError(f"vae_tile_overlap: expected an integer in 0..{self.vae_tile_size - 1} (pixels, less "
                             f"than vae_tile_size), got {self.vae_tile_overlap!r}")
        if self.low_mem_level is not None and not (_is_int(self.low_mem_level) and 0 <= self.low_mem_level <= 3):
            raise ValueError(f"low_mem_level: expected an integer in 0..3 (or none: chosen by memory), "
                             f"got {self.low_mem_level!r}")
        for name in ("loras", "loras_2"):
            setattr(self, name, _lora_list(name, getattr(self, name)))
        if isinstance(self.lora_ignore, str) or not all(isinstance(k, str) for k in self.lora_ignore):
            raise ValueError(f"lora_ignore: expected a list of key names, got {self.lora_ignore!r}")
        self.lora_ignore = tuple(self.lora_ignore)
        for name in ("quantize", "quantize_text_encoder"):
            mode = getattr(self, name)
            if mode is not None and mode not in ("int8", "fp8"):
                raise ValueError(f"{name}: expected int8, fp8 or none, got {mode!r}")
            if mode is not None and _is_int(self.tp_size) and self.tp_size > 1:  # its sharded layers would stay as they are
                raise ValueError(f"{name}: does not combine with tensor parallel yet (tp_size={self.tp_size}); "
                                 "sequence and CFG parallel do")
        if self.max_loras is not None and (type(self.max_loras) is not int or not 1 <= self.max_loras <= 4096):
            raise ValueError(f"max_loras: expected an integer in 1..4096 or None, got {self.max_loras!r}")
        if self.lora_mode not in ("merged", "unmerged"):
            raise ValueError(f"lora_mode: expected merged or unmerged, got {self.lora_mode!r}")
        if self.compile and self.low_mem_level is not None and self.low_mem_level >= 2:
            raise ValueError(f"compile: runs at low_mem_level 0 or 1 (levels 2-3 stream the blocks), "
                             f"got low_mem_level={self.low_mem_level}")
        if self.max_memory is not None:
            from .memory.estimate import parse_bytes

            parse_bytes(self.max_memory)
        from .models.attention import BACKENDS, ENGINE_CHOICES

        if self.attention_backend not in (*BACKENDS, *ENGINE_CHOICES):
            raise ValueError(f"attention_backend: unknown {self.attention_backend!r} "
                             f"(allowed: {', '.join([*BACKENDS, *ENGINE_CHOICES])})")
        from .models.sliding_tile import parse_window

        window = parse_window(self.sta_window)
        if window is not None and self.ring_size > 1:
            raise ValueError("sta_window: sliding-tile attention does not combine with ring attention "
                             "(ring_size > 1); use Ulysses sequence parallelism (ring_size=1)")
        if self.attention_backend == "sliding_tile" and window is None:
            raise ValueError("attention_backend 'sliding_tile' needs sta_window (e.g. '3,6,6': frames, rows, "
                             "columns in tokens)")
        if not (_is_int(self.prompt_cache_size) and 0 <= self.prompt_cache_size <= 4096):
            raise ValueError(f"prompt_cache_size: expected an integer in 0..4096 (prompts), got {self.prompt_cache_size!r}")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if self.refine_model is not None and not isinstance(self.refine_model, (str, os.PathLike)):
            raise ValueError(f"refine_model: expected a model folder path or None, got {self.refine_model!r}")
        if self.refine_model is not None:
            self.refine_model = os.fspath(self.refine_model)

    def resolved_dtypes(self) -> dict[str, torch.dtype]:
        fast = torch.bfloat16 if bf16_is_fast(self.torch_device) else torch.float32
        dit = self.dit_dtype or self.dtype or fast
        return {
            "transformer": dit,
            "text_encoder": self.text_encoder_dtype or self.dtype or dit,
            "vae": self.vae_dtype or self.dtype or torch.float32,
            "image_encoder": self.dtype or torch.float32,
        }

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown} (known: {sorted(names)})")
        return cls(**options)


def _request_loras(value: Any) -> tuple[tuple[str, float], ...]:
    """A request's ``lora``: names or (name, scale) pairs (dicts with name and scale from the
    server) -> ((name, scale), ...); InvalidRequestError naming the field otherwise."""
    allowed = "a list of adapter names or (name, scale) pairs, scales -10..10"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) > 16:
        raise InvalidRequestError("lora", f"got {_short(value)}", allowed + " (at most 16)")
    out = []
    for item in value:
        if isinstance(item, dict) and set(item) <= {"name", "scale"}:
            item = (item.get("name"), item.get("scale", 1.0))
        elif isinstance(item, str):
            item = (item, 1.0)
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or not _is_number(item[1]) or not -10 <= item[1] <= 10):
            raise InvalidRequestError("lora", f"got {_short(item)}", allowed)
        out.append((item[0], float(item[1])))
    return tuple(out)


def _lora_list(name: str, value: Any) -> tuple[tuple[str, float], ...]:
    """(file, scale) pairs from a list of files, (file, scale) pairs or "FILE[:SCALE]" strings."""
    from .lora import parse_lora_option

    if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of LoRA files or (file, scale) pairs, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, (str, os.PathLike)):
            item = parse_lora_option(os.fspath(item))
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], (str, os.PathLike))
                or not _is_number(item[1])):
            raise ValueError(f"{name}: expected a LoRA file or a (file, scale) pair, got {item!r}")
        out.append((os.fspath(item[0]), float(item[1])))
    return tuple(out)


def resolve_device(device: Any) -> Any:
    """``"auto"``: ``"cuda"`` where torch sees a CUDA device, else ``"cpu"``; any other value as given."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _check_device_present(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r} asked for, but torch sees no CUDA device "
                             "(torch.cuda.is_available() is False; a CPU build of torch?): use cpu, or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {str(device)!r} does not exist "
                             f"(allowed: cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type not in ("cpu", "meta") and not hasattr(torch, device.type):
        raise ValueError(f"device: {str(device)!r} is not supported (allowed: auto, cpu, cuda, cuda:N)")


@dataclass(frozen=True)
class RequestLimits:
    """What a model can take, from its configs alone (so the CLI checks a request before loading).

    ``vae_spatial_factor`` / ``temporal_factor``: pixels and frames per latent pixel and frame;
    ``patch``: the DiT's (frames, height, width) patch; ``max_grid_side``: the largest token-grid
    side the DiT's rotary table covers (``rope_max_seq_len``; None: unbounded); ``max_tokens``:
    the engine's bound on a request's tokens; ``max_steps``: the scheduler's training timesteps;
    ``max_sequence_length``: the tokenizer's ``model_max_length``; ``experts``: how many
    transformers share the timesteps (a second guidance scale needs two).
    """

    vae_spatial_factor: int = 8
    temporal_factor: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    max_grid_side: int | None = None
    max_tokens: int = MAX_TOKENS
    max_steps: int = 1000
    transformer_blocks: int | None = None  # the DiT's block count (None: unknown); a block cache must leave some
    max_sequence_length: int = 512
    experts: int = 1  # transformers taking turns over the timesteps (Wan2.2 A14B: 2)
    # "none" (text-to-video), "optional" (Wan2.2 TI2V: text-to-video, or image-to-video with one),
    # "required" (image-to-video), "first-last" (both frames required)
    image: str = "none"
    last_image: bool = True  # whether a last frame may be given with the image (not to TI2V)

    @property
    def spatial_factor(self) -> int:
        """Height and width must be multiples of this (VAE factor x patch)."""
        return self.vae_spatial_factor * max(self.patch[1:])

    def max_size(self, axis: int) -> int | None:
        """The largest height (axis 1), width (2) or frame count (0) the rotary table covers."""
        if self.max_grid_side is None:
            return None
        if axis == 0:
            return (self.max_grid_side * self.patch[0] - 1) * self.temporal_factor + 1
        largest = self.max_grid_side * self.patch[axis] * self.vae_spatial_factor
        return largest - largest % self.spatial_factor

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        latent_frames = (num_frames - 1) // self.temporal_factor + 1
        pt, ph, pw = self.patch
        sf = self.vae_spatial_factor
        return -(-latent_frames // pt) * (height // (sf * ph)) * (width // (sf * pw))


MAX_REFINE_SCALE = 4


@dataclass(frozen=True)
class RefineParams:
    """Two-stage generation (a base pass, then a refine pass): the video is generated first at
    1/``scale`` of the request's height and width; its latents are upsampled to the full size,
    noised back to the level ``strength`` of a fresh schedule (0: none, 1: pure noise) and denoised
    there in ``steps`` steps, with ``guidance_scale`` (None: the request's).

    The refine schedule is the last ``steps`` steps of a ``round(steps / strength)``-step schedule
    (as image-to-image starts part-way in); ``steps`` None: ``round(num_inference_steps x strength)``,
    so the whole refine schedule has about ``num_inference_steps`` steps. Its noise is drawn from
    ``seed + 1``."""

    scale: int = 2
    strength: float = 0.6
    steps: int | None = None
    guidance_scale: float | None = None

    @classmethod
    def coerce(cls, value) -> "RefineParams":
        """A RefineParams, or one from a dict of its fields (InvalidRequestError naming a bad key)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError("refine", f"got {_short(value)}", "RefineParams(...), a dict of its fields, or None")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise InvalidRequestError(f"refine.{unknown[0]}", "unknown refine option", ", ".join(sorted(names)))
        return cls(**value)

    def run_steps(self, params: "SamplingParams") -> int:
        """The refine pass's step count for ``params``."""
        return self.steps if self.steps is not None else max(1, round(params.num_inference_steps * self.strength))

    def schedule_steps(self, params: "SamplingParams") -> int:
        """The steps of the whole refine schedule, of which the last ``run_steps`` run."""
        return max(self.run_steps(params), round(self.run_steps(params) / self.strength))

    def validate(self, params: "SamplingParams", limits: RequestLimits) -> None:
        if not _is_int(self.scale) or not 1 <= self.scale <= MAX_REFINE_SCALE:
            raise InvalidRequestError("refine.scale", f"got {_short(self.scale)}", f"integers 1..{MAX_REFINE_SCALE}")
        if not _is_number(self.strength) or not 0 < self.strength <= 1:
            raise InvalidRequestError("refine.strength", f"got {_short(self.strength)}", "numbers in (0, 1]")
        if self.steps is not None and (not _is_int(self.steps) or not 1 <= self.steps <= limits.max_steps):
            raise InvalidRequestError("refine.steps", f"got {_short(self.steps)}", f"integers 1..{limits.max_steps}, or None")
        if self.guidance_scale is not None and (not _is_number(self.guidance_scale)
                                                or not 0 <= self.guidance_scale <= MAX_GUIDANCE):
            raise InvalidRequestError("refine.guidance_scale", f"got {_short(self.guidance_scale)}",
                                      f"numbers 0..{MAX_GUIDANCE:g}, or None")
        if self.schedule_steps(params) > limits.max_steps:
            raise InvalidRequestError("refine.strength", f"{self.run_steps(params)} steps at strength {self.strength:g} "
                                      f"need a {self.schedule_steps(params)}-step schedule",
                                      f"at most {limits.max_steps} (fewer steps or a higher strength)")
        step = limits.spatial_factor * self.scale
        for name in ("height", "width"):
            if getattr(params, name) % step:
                raise InvalidRequestError(name, f"got {getattr(params, name)}: the base pass at 1/{self.scale} "
                                          "of it is no valid size", f"multiples of {step} with refine.scale={self.scale}")
        for name in ("image", "last_image"):
            if getattr(params, name) is not None:
                raise InvalidRequestError("refine", "two-stage generation is text-to-video only", f"None with {name}")
        if self.guidance_scale is not None and self.guidance_scale > 1 and not params.do_cfg:
            raise InvalidRequestError("refine.guidance_scale", f"{self.guidance_scale:g} needs the negative prompt, "
                                      "which is encoded only with guidance_scale > 1", "at most 1 here, or None")


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
    guidance_scale_2: float | None = None  # the low-noise expert's (two-expert models); None: guidance_scale
    flow_shift: float | None = None  # None: the scheduler config's shift
    seed: int = 0
    max_sequence_length: int = 512
    latents: torch.Tensor | None = field(default=None, repr=False)  # initial noise (B, C, F, H, W)
    image: Any = field(default=None, repr=False)  # image-to-video: the first frame (PIL image, path or array)
    last_image: Any = field(default=None, repr=False)  # first-last-frame: the last frame
    output_type: str = "np"
    output_path: str | None = None
    fps: int = 16
    return_trajectory: bool = False
    decode_trajectory: bool = False
    refine: RefineParams | None = None  # two-stage generation (see RefineParams); a dict of its fields works too
    cache: str | None = None  # feature caching, e.g. "block:F1B0:0.08+cfg-gate:0.5" (vidloom.cache.spec); None: exact
    # sliding-tile attention window "F,H,W" in tokens (or a 3-tuple); None: the engine's default
    # (dense unless it sets one); "dense": dense attention whatever the engine's default
    sta_window: str | tuple | None = None  # (the CLI's --sta-window is the engine's default)
    # LoRA adapters loaded unmerged (VideoGenerator.load_lora) this request uses: (name, scale)
    # pairs or names (scale 1.0); requests with different adapters still share a forward
    lora: list | tuple | None = None

    @property
    def do_cfg(self) -> bool:
        # the reference runs the unconditional pass only when guidance_scale > 1
        return self.guidance_scale > 1.0

    def validate(self, limits: RequestLimits | None = None) -> "SamplingParams":
        """Raise InvalidRequestError naming the first bad field; cheap: field checks only (no model
        work, and no image is opened: ``VideoGenerator.check`` decodes them)."""
        limits = limits or RequestLimits()
        check_text("prompt", self.prompt)
        if self.negative_prompt is not None:
            check_text("negative_prompt", self.negative_prompt, "a string or None")
        self._validate_size(limits)
        if not _is_int(self.num_inference_steps) or not 1 <= self.num_inference_steps <= limits.max_steps:
            raise InvalidRequestError("num_inference_steps", f"got {_short(self.num_inference_steps)}",
                                      f"integers 1..{limits.max_steps} (the scheduler's training timesteps)")
        if not _is_number(self.guidance_scale) or not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise InvalidRequestError("guidance_scale", f"got {_short(self.guidance_scale)}",
                                      f"numbers 0..{MAX_GUIDANCE:g}")
        if self.guidance_scale_2 is not None:
            if limits.experts < 2:
                raise InvalidRequestError("guidance_scale_2", "this model has one transformer (no boundary_ratio)",
                                          "None")
            if not _is_number(self.guidance_scale_2) or not 0 <= self.guidance_scale_2 <= MAX_GUIDANCE:
                raise InvalidRequestError("guidance_scale_2", f"got {_short(self.guidance_scale_2)}",
                                          f"numbers 0..{MAX_GUIDANCE:g}, or None")
        if self.flow_shift is not None and (not _is_number(self.flow_shift)
                                            or not FLOW_SHIFT_RANGE[0] <= self.flow_shift <= FLOW_SHIFT_RANGE[1]):
            raise InvalidRequestError("flow_shift", f"got {_short(self.flow_shift)}",
                                      f"numbers {FLOW_SHIFT_RANGE[0]:g}..{FLOW_SHIFT_RANGE[1]:g}, or None")
        if not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise InvalidRequestError("seed", f"got {_short(self.seed)}", "integers -2**63 .. 2**64-1")
        if not _is_int(self.max_sequence_length) or not 1 <= self.max_sequence_length <= limits.max_sequence_length:
            raise InvalidRequestError("max_sequence_length", f"got {_short(self.max_sequence_length)}",
                                      f"integers 1..{limits.max_sequence_length} (the tokenizer's length)")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidRequestError("output_type", f"got {_short(self.output_type)}", ", ".join(OUTPUT_TYPES))
        if not _is_int(self.fps) or not 1 <= self.fps <= 240:
            raise InvalidRequestError("fps", f"got {_short(self.fps)}", "integers 1..240")
        for name in ("return_trajectory", "decode_trajectory"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"got {_short(getattr(self, name))}", "True or False")
        if self.decode_trajectory and not self.return_trajectory:
            raise InvalidRequestError("decode_trajectory", "needs return_trajectory=True (it decodes that trajectory)")
        self._validate_images(limits)
        if self.cache is not None:
            from .cache.spec import parse_cache

            spec = parse_cache(self.cache)
            if spec is not None:
                spec.check_fits(limits.transformer_blocks)
        if self.sta_window is not None and self.sta_window != "dense":
            from .models.sliding_tile import parse_window

            try:
                self.sta_window = parse_window(self.sta_window)
            except ValueError as exc:
                raise InvalidRequestError("sta_window", f"got {_short(self.sta_window)}",
                                          "'F,H,W' token counts (e.g. '3,6,6'), 'dense' or None") from exc
        if self.lora is not None:
            self.lora = _request_loras(self.lora)
        if self.refine is not None:
            self.refine = RefineParams.coerce(self.refine)
            self.refine.validate(self, limits)
        if self.latents is not None:
            self._validate_latents()
        if self.output_path is not None:
            self._validate_output_path()
        return self

    def _validate_size(self, limits: RequestLimits) -> None:
        sf, tf = limits.spatial_factor, limits.temporal_factor
        for axis, name in ((1, "height"), (2, "width")):
            value, largest = getattr(self, name), limits.max_size(axis)
            if not _is_int(value) or value < sf or value % sf or (largest is not None and value > largest):
                allowed = f"multiples of {sf}" + (f" up to {largest}" if largest is not None else "")
                raise InvalidRequestError(name, f"got {_short(value)}", allowed)
        largest = limits.max_size(0)
        if (not _is_int(self.num_frames) or self.num_frames < 1 or (self.num_frames - 1) % tf
                or (largest is not None and self.num_frames > largest)):
            upto = f" up to {largest}" if largest is not None else ""
            raise InvalidRequestError(
                "num_frames", f"got {_short(self.num_frames)}", f"{tf}k+1 frames{upto}, e.g. 1, 5, 17, 33, 81"
            )
        tokens = limits.tokens(self.num_frames, self.height, self.width)
        if tokens > limits.max_tokens:
            raise InvalidRequestError(
                "height/width/num_frames", f"{self.width}x{self.height}, {self.num_frames} frames is {tokens} tokens",
                f"at most {limits.max_tokens} tokens (the engine's max_tokens)")

    def _validate_images(self, limits: RequestLimits) -> None:
        """Which images the model takes, and that each given is of a kind it reads. No file is
        opened here: ``VideoGenerator.check`` decodes them (bounded) once the fields pass."""
        from .io.images import check_kind

        if limits.image == "none":
            for name in ("image", "last_image"):
                if getattr(self, name) is not None:
                    raise InvalidRequestError(name, "this model is text-to-video: it takes no image", "None")
            return
        if self.image is None:
            if self.last_image is not None:
                raise InvalidRequestError("last_image", "given without image (the first frame)", "image and last_image")
            if limits.image == "optional":
                return
            raise InvalidRequestError("image", "this image-to-video model needs the first frame",
                                      "a PIL image, a path or an (H, W, 3) array")
        check_kind(self.image, "image")
        if limits.image == "first-last" and self.last_image is None:
            raise InvalidRequestError("last_image", "this first-last-frame model needs the last frame too",
                                      "a PIL image, a path or an (H, W, 3) array")
        if self.last_image is not None:
            if not limits.last_image:
                raise InvalidRequestError("last_image", "this model takes only the first frame (Wan2.2 TI2V)", "None")
            if self.num_frames < 2:
                raise InvalidRequestError("last_image", "needs at least 2 frames", "num_frames >= 5")
            check_kind(self.last_image, "last_image")

    def _validate_latents(self) -> None:
        latents = self.latents
        if not isinstance(latents, torch.Tensor):
            raise InvalidRequestError("latents", f"must be a torch.Tensor, got {type(latents).__name__}")
        if not latents.is_floating_point():
            raise InvalidRequestError("latents", f"dtype {latents.dtype} is not a real floating-point type",
                                      "float32, float64, bfloat16 or float16")
        if latents.is_meta:
            raise InvalidRequestError("latents", "is on the meta device (it holds no values)", "a CPU or CUDA tensor")
        if not torch.isfinite(latents).all():
            raise InvalidRequestError("latents", "contains NaN or Inf", "finite values")

    def _validate_output_path(self) -> None:
        from .io.video import check_output_path  # the export module owns the formats and the checks

        if not isinstance(self.output_path, (str, os.PathLike)):
            raise InvalidRequestError("output_path", f"must be a path, got {type(self.output_path).__name__}")
        kind = check_output_path(Path(self.output_path))
        if self.output_type == "mp4" and kind != "mp4":
            raise InvalidRequestError("output_path", "output_type 'mp4' needs a .mp4 path", "*.mp4 or None")

    def base_pass(self) -> "SamplingParams":
        """The request the base pass of a two-stage generation runs: 1/scale of the size, no
        refine (the request itself without ``refine``)."""
        if self.refine is None:
            return self
        s = self.refine.scale
        return dataclasses.replace(self, height=self.height // s, width=self.width // s, refine=None)

    def refine_pass(self) -> "SamplingParams":
        """The request the refine pass runs: the full size, its guidance scale."""
        if self.refine.guidance_scale is None:
            return self
        return dataclasses.replace(self, guidance_scale=self.refine.guidance_scale)

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


def check_text(name: str, value: Any, allowed: str = "a string") -> str:
    """A prompt-like field: a string of at most MAX_PROMPT_CHARS characters that UTF-8 can encode
    (no lone surrogates) and without NUL characters (which no store or tokenizer takes as text)."""
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"got {type(value).__name__}", allowed)
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(name, f"{len(value)} characters", f"at most {MAX_PROMPT_CHARS} characters")
    if "\0" in value:
        raise InvalidRequestError(name, "contains a NUL character", "text without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(name, f"character {exc.start} is a lone surrogate ({value[exc.start]!a})",
                                  "text UTF-8 can encode") from None
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    return short_repr(value, 40)
