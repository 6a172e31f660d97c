"""Out-of-memory recovery: a unit of work that ran out of memory is run again one memory level
higher (``memory.levels``), up to the highest; there, a ``ResourceExhausted`` error names the
stage, the level and what the allocation asked for. A unit works on a copy of its batch
(``pipelines.base.run_units``), so running it again starts from the batch as it was."""

from __future__ import annotations

import logging
import re

import torch

from ..errors import ResourceExhausted, is_out_of_memory
from ..pipelines.base import WorkUnit, run_units
from ..pipelines.batch import ForwardBatch
from .levels import HIGHEST, return_memory, unit_level

log = logging.getLogger(__name__)

_ASKED = re.compile(r"(?:Tried to allocate|tried to allocate) ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)")


def what_it_asked(exc: BaseException) -> str:
    """The allocation an out-of-memory error reports ("2.00 GiB", "1073741824 bytes"), or ""."""
    match = _ASKED.search(str(exc))
    return match.group(1) if match else ""


def run_again_higher(unit: WorkUnit, batch: ForwardBatch, level: int, error: BaseException,
                     device: torch.device) -> tuple[ForwardBatch | BaseException, int]:
    """``unit`` failed with ``error`` (out of memory) at ``level``: run it again at each higher
    level until it succeeds or fails otherwise. Returns (its result or error, the level it
    reached)."""
    result = error
    while is_out_of_memory(result) and level < HIGHEST:
        log.warning("out of memory in %s at low_mem_level %d (%s); running it again at level %d",
                    unit.stage.name, level, what_it_asked(result) or "allocation failed", level + 1)
        level += 1
        return_memory(device)
        with unit_level(level):
            [result] = run_units([unit], [batch])
    if is_out_of_memory(result):
        return_memory(device)
        asked = what_it_asked(result)
        exhausted = ResourceExhausted(
            f"out of memory in {unit.stage.name} at low_mem_level {level}, the highest"
            f"{f' (it tried to allocate {asked})' if asked else ''}: use a smaller size or fewer frames")
        exhausted.__cause__ = result
        result = exhausted
    return result, level
