"""Memory levels (``EngineConfig.low_mem_level``): how much of the model is kept in memory. A
level moves bytes, never changes numbers: every level gives the same video.

- 0: every component loaded with the engine and kept.
- 1: as 0, and the VAE decodes one frame per step of each of its stages (the streaming decode's
  smallest working set; ``WanStreamDecoder``), whatever the video's length.
- 2: as 1, and only one model component in memory at a time: each is loaded at its first use and
  released when another one is used (the text encoder after encoding, the inactive expert of a
  two-expert model, the image encoder, the VAE until decoding). Releasing drops the module; it is
  loaded again from its (mapped) files when next used. With the prompt cache
  (``EngineConfig.prompt_cache_size``) a repeated prompt needs no text encoder at all. A bf16
  checkpoint computed in float32 keeps its blocks stored (``loader.stored``), mapped from the file.
- 3: as 2, and the DiT's and the text encoder's blocks streamed: on the CPU, once a block has run,
  the pages of its mapped weights are released (``loader.pages``), so the weights in memory are
  about one block's, not the model's. (On CUDA the blocks are on the device: level 3 is level 2.)

The engine's level is where every request starts; out-of-memory recovery runs a unit of work
again one level higher (``unit_level``), for that request only.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from .residency import Residency

LEVELS = (0, 1, 2, 3)
HIGHEST = LEVELS[-1]
STREAMING_DECODE, ONE_COMPONENT, STREAMING_BLOCKS = 1, 2, 3  # the levels from which each measure applies

_unit_level: ContextVar[int | None] = ContextVar("vidloom_memory_level", default=None)


@contextlib.contextmanager
def unit_level(level: int) -> Iterator[None]:
    """The level the work inside runs at (one unit of one or several requests)."""
    token = _unit_level.set(level)
    try:
        yield
    finally:
        _unit_level.reset(token)


def level_now(engine_level: int) -> int:
    """The level of the work running now: the unit's, or outside a unit the engine's."""
    level = _unit_level.get()
    return engine_level if level is None else level


def return_memory(device: torch.device) -> None:
    """Give freed memory back: collect what only cycles hold, hand the C heap's free memory back
    to the system (glibc keeps freed blocks below its mmap threshold, which grows as large
    blocks are freed), empty CUDA's cache."""
    gc.collect()
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_malloc_trim = None


def _trim_heap() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc; absent elsewhere (musl)
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)


class LevelResidency(Residency):
    """The residency of a memory level (``level``, the engine's; a unit may run higher): below
    level 2 every component is loaded with the engine and stays; from level 2 none is loaded
    until used, and using one releases the others not in use."""

    def __init__(self, device: torch.device | str, level: int = 0):
        super().__init__(device)
        self.level = level

    def loads_at_start(self, name: str) -> bool:
        return self.level < ONE_COMPONENT

    def acquire(self, name: str) -> torch.nn.Module:
        if level_now(self.level) >= ONE_COMPONENT:
            released = [other for other in self.in_memory() if other != name and self.drop(other)]
            if released:
                return_memory(self.device)
        return self.loaded(name)
