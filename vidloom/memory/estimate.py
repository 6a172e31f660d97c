"""Memory estimates, from a folder's weight headers and a request's shape, before any loading:
what each model component takes in memory, what each stage needs on top while it runs, and so
each memory level's peak (``memory.budget`` picks the lowest level that fits).

The stage costs are formulas over the architecture's sizes (activations of one forward, the
DiT's text keys and values, the VAE's causal cache and output) with round constants, checked
against measured peaks by ``benchmarks/memory.py`` (which prints the estimate beside the peak;
on the 1.3B folders at 17x128x128 the estimates were within 10 % or above the measured peaks).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..loader.weights import SafetensorsFile, find_weight_files
from .levels import ONE_COMPONENT, STREAMING_DECODE

GIB = 2**30
RUNTIME_BYTES = 600 * 2**20  # the interpreter, torch and the libraries, before any model (measured: ~0.5 GiB)
BLOCKS = {"transformer": "blocks.", "transformer_2": "blocks.", "text_encoder": "encoder.block."}
# token tables kept as stored when the blocks are (``loader.stored``: a lookup widens its rows)
EMBEDDINGS = {"text_encoder": ("shared.weight", "encoder.embed_tokens.weight")}
VAE_CACHE_PLANES = 24  # the decoder's causal cache, in full-resolution planes of its top width
VAE_LIVE_PLANES = 6  # activations live in one step of the decoder's top stage, in such planes
DECODE_STEP_ELEMENTS = 2 * 256 * 256 * 96  # the VAE's default step (models.causal3d.STEP_ELEMENTS)
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name: str = "max_memory") -> int:
    """"8GiB", "512MiB", "16GB", "1.5GiB" or an integer count of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{name}: expected a size such as 8GiB, 512MiB or 16GB (or bytes), got {value!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def machine_memory(device: torch.device | str = "cpu") -> int:
    """The memory available to the engine now: CUDA's free device memory, or the host's
    available memory (``MemAvailable``; the total where it is not reported)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one model component takes in memory: ``widened`` (every floating tensor in the
    compute dtype), ``stored`` (its blocks' bf16/fp16 tensors as stored, ``loader.stored``), of
    which ``stored_blocks`` are its ``blocks`` blocks' (what level 3 streams)."""

    widened: int
    stored: int
    stored_blocks: int = 0
    blocks: int = 0

    @property
    def streamed(self) -> int:
        """In memory with its blocks streamed: the rest, and one block."""
        return self.stored - self.stored_blocks + self.stored_blocks // max(self.blocks, 1)


def component_sizes(plans: dict, dtypes: dict[str, torch.dtype]) -> dict[str, Sizes]:
    """The sizes of the components in ``dtypes`` (name -> compute dtype), from their weight
    files' headers: read once, when the engine is planned."""
    return {name: component_bytes(plan.folder, name, dtypes[name]) for name, plan in plans.items() if name in dtypes}


def component_bytes(folder: Path, name: str, dtype: torch.dtype) -> Sizes:
    """What component ``name`` (its weight files in ``folder``) takes loaded in ``dtype``: its
    floating tensors widened or narrowed to ``dtype``, or its blocks' bf16/fp16 tensors as stored
    (``loader.stored``)."""
    widened = stored = in_blocks = 0
    item = torch.tensor([], dtype=dtype).element_size()
    prefix = BLOCKS.get(name)
    indices = set()
    for path in find_weight_files(folder):
        with SafetensorsFile(path) as file:
            for entry in file.entries:
                numel = math.prod(entry.shape)
                block = prefix is not None and entry.key.startswith(prefix)
                if block:
                    indices.add(entry.key[len(prefix):].split(".", 1)[0])
                if not entry.dtype.is_floating_point:
                    size = as_stored = entry.nbytes
                else:
                    size = numel * item
                    kept = block or entry.key in EMBEDDINGS.get(name, ())
                    as_stored = entry.nbytes if kept and entry.dtype in (torch.bfloat16, torch.float16) else size
                widened += size
                stored += as_stored
                in_blocks += as_stored if block else 0
    return Sizes(widened, stored, in_blocks, len(indices))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """``components``: bytes of each model component in memory; ``stages``: stage -> (the
    components it uses, the bytes it needs on top while it runs), per level where they differ."""

    components: dict[str, int]
    stages: dict[str, tuple[tuple[str, ...], dict[int, int]]]

    def stage_bytes(self, stage: str, level: int) -> int:
        costs = self.stages[stage][1]
        return costs[max(k for k in costs if k <= level)]

    def peak(self, level: int) -> int:
        """The estimated peak of a request at ``level``: below level 2 every component plus the
        costliest stage; from level 2 the costliest stage with only its own components."""
        if level < ONE_COMPONENT:
            return RUNTIME_BYTES + sum(self.components.values()) + max(
                self.stage_bytes(s, level) for s in self.stages)
        return RUNTIME_BYTES + max(sum(self.components[c] for c in uses) + self.stage_bytes(stage, level)
                                   for stage, (uses, _) in self.stages.items())


def estimate(plans: dict, sizes: dict[str, Sizes], stored: dict[str, bool], num_frames: int, height: int,
             width: int, cfg: bool = True, streamed: bool = False) -> Estimate:
    """The estimate of a request of this shape on the components planned in ``plans``
    (``loader.components.ComponentPlan``) of ``sizes`` (``component_sizes``), blocks kept as
    stored where ``stored`` says, and with ``streamed`` (level 3) one block of them in memory."""
    components = {name: (size.streamed if streamed and name in BLOCKS else size.stored) if stored.get(name)
                  else size.widened for name, size in sizes.items()}
    rows = 2 if cfg else 1
    stages = {}
    te = plans.get("text_encoder")
    if te is not None:
        c = te.config
        d, ff, heads, length = c["d_model"], c["d_ff"], c["num_heads"], 512
        work = rows * length * (6 * d + 3 * ff) * 4 + rows * heads * length * length * 4
        block = _block_bytes(components["text_encoder"], c["num_layers"]) if stored.get("text_encoder") else 0
        stages["text_encoding"] = (("text_encoder",), {0: work + block})
    dit_names = [n for n in ("transformer", "transformer_2") if n in plans]
    vae = plans["vae"].config
    if dit_names:
        c = plans[dit_names[0]].config
        t, h, w = vae.latent_size(num_frames, height, width)
        pt, ph, pw = c.patch_size
        tokens = -(-t // pt) * (h // ph) * (w // pw)
        kv = c.num_layers * 2 * rows * 512 * c.dim * 4
        work = kv + rows * tokens * (8 * c.dim + 2 * c.ffn_dim) * 4
        block = _block_bytes(components[dit_names[0]], c.num_layers) * 2 if stored.get(dit_names[0]) else 0
        biggest = max(dit_names, key=lambda n: components[n])
        stages["denoising"] = ((biggest,), {0: work + block})
    plane = height * width * vae.decoder_dim * 4
    video = 3 * num_frames * height * width * 4 * 2  # the decoded video, and its float copy
    cache = VAE_CACHE_PLANES * plane
    whole = max(DECODE_STEP_ELEMENTS * 4, plane) * VAE_LIVE_PLANES
    stages["decoding"] = (("vae",), {0: video + cache + whole, STREAMING_DECODE: video + cache + plane * VAE_LIVE_PLANES})
    return Estimate(components, stages)


def _block_bytes(total: int, blocks: int) -> int:
    """One block's weights widened to float32 (from a bf16 total: twice its share)."""
    return 2 * total // max(blocks, 1)
