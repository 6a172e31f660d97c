"""The memory budget: which level an engine starts at, and which level each request runs at.

``EngineConfig.max_memory`` ("8GiB") is the budget; without it, and without an explicit
``low_mem_level``, the budget is the memory available when the engine is loaded (90 % of it),
so a folder bigger than the machine still loads, at the level that fits. The engine's level is
the lowest whose estimated peak (``memory.estimate``) for a nominal request (the folder's default
size) fits; a request of another size runs at the lowest level from there that fits it, and one
that no level fits is refused before any work, with the estimates in the message.
"""

from __future__ import annotations

import dataclasses
import logging

from ..config import EngineConfig, SamplingParams
from ..errors import InvalidRequestError
from ..loader.plan import COMPONENT_DTYPE, stored_blocks
from .estimate import GIB, Sizes, component_sizes, estimate, machine_memory, parse_bytes
from .levels import LEVELS, STREAMING_BLOCKS

log = logging.getLogger(__name__)

AVAILABLE_SHARE = 0.9  # of the memory available at load, when no max_memory is given


def model_dtypes(plans: dict, config: EngineConfig) -> dict:
    """Each planned model component's compute dtype."""
    return {name: config.resolved_dtypes()[COMPONENT_DTYPE[name]] for name in plans if name in COMPONENT_DTYPE}


def level_peaks(plans: dict, config: EngineConfig, num_frames: int, height: int, width: int,
                loaded_level: int | None = None, sizes: dict[str, Sizes] | None = None) -> dict[int, int]:
    """The estimated peak of a request of this shape at each level. Components are loaded as
    ``loaded_level`` loads them (blocks kept stored from level 2; None: each level as it would);
    ``sizes``: theirs (None: read from the weight headers now)."""
    dtypes = model_dtypes(plans, config)
    sizes = component_sizes(plans, dtypes) if sizes is None else sizes
    peaks = {}
    for level in LEVELS:
        at = level if loaded_level is None else loaded_level
        stored = {name: stored_blocks(at, dtype) for name, dtype in dtypes.items()}
        streamed = level >= STREAMING_BLOCKS and config.torch_device.type == "cpu"
        peaks[level] = estimate(plans, sizes, stored, num_frames, height, width, streamed=streamed).peak(level)
    return peaks


@dataclasses.dataclass(frozen=True)
class Budget:
    """``limit``: the bytes requests must fit; ``given``: whether the user gave it (max_memory);
    ``plans``: the folder's component plans and ``sizes`` their sizes (read from the headers once,
    so a request's estimate reads no file)."""

    limit: int
    given: bool
    plans: dict
    sizes: dict
    def describe(self) -> str:
        return f"max_memory {self.limit / GIB:.1f} GiB" if self.given else \
            f"{self.limit / GIB:.1f} GiB available"


def engine_level(plan, config: EngineConfig, nominal: dict, processes: int = 1,
                 strict: bool = False) -> tuple[EngineConfig, Budget | None]:
    """``config`` with its level decided (an explicit ``low_mem_level`` is kept, unless a given
    budget needs a higher one), and the budget requests are held to (None: none). With several
    processes and no budget given, level 0 unless one is given: the processes must agree, and
    the memory each sees available need not. ``strict``: ``nominal`` is the size of the requests
    to come (not a default), so a given budget it fits at no level is an error now."""
    given = config.max_memory is not None
    if not given and (config.low_mem_level is not None or processes > 1):
        return dataclasses.replace(config, low_mem_level=config.low_mem_level or 0), None
    limit = parse_bytes(config.max_memory) if given else int(machine_memory(config.torch_device) * AVAILABLE_SHARE)
    budget = Budget(limit, given, plan.plans, component_sizes(plan.plans, model_dtypes(plan.plans, config)))
    params = SamplingParams(**{k: v for k, v in nominal.items() if k in ("num_frames", "height", "width")})
    peaks = level_peaks(plan.plans, config, params.num_frames, params.height, params.width, sizes=budget.sizes)
    start = config.low_mem_level or 0
    level = next((lv for lv in LEVELS if lv >= start and peaks[lv] <= limit), None)
    if level is None:
        table = ", ".join(f"level {lv}: {peaks[lv] / GIB:.1f} GiB" for lv in LEVELS)
        level = LEVELS[-1]
        smallest = level_peaks(plan.plans, config, 1, plan.limits.spatial_factor, plan.limits.spatial_factor,
                               sizes=budget.sizes)[level]
        if given and strict:
            raise ValueError(f"max_memory: {config.max_memory} fits no memory level for a {params.num_frames}x"
                             f"{params.height}x{params.width} request (estimated peaks {table})")
        if given and smallest > limit:  # the components alone do not fit: no request would
            raise ValueError(f"max_memory: {config.max_memory} fits no memory level: even the smallest request "
                             f"needs an estimated {smallest / GIB:.1f} GiB at level {level} (a {params.num_frames}x"
                             f"{params.height}x{params.width} request: {table})")
        log.warning("a %dx%dx%d request fits no level of the %s (estimated peaks %s): running at low_mem_level %d, "
                    "requests held to the budget", params.num_frames, params.height, params.width,
                    budget.describe(), table, level)
    elif config.low_mem_level is None or level != config.low_mem_level:
        # a level above 0 is news to the user (the folder is bigger than the memory): a warning
        log.log(logging.WARNING if level > 0 else logging.INFO,
                "low_mem_level %d chosen: estimated peak %.1f GiB for a %dx%dx%d request, %s", level,
                peaks[level] / GIB, params.num_frames, params.height, params.width, budget.describe())
    return dataclasses.replace(config, low_mem_level=level), budget


def request_level(config: EngineConfig, budget: Budget | None, params: SamplingParams) -> int:
    """The level a request starts at: the engine's, or the lowest above it that fits the budget;
    InvalidRequestError (naming the size) when none does."""
    if budget is None:
        return config.low_mem_level or 0  # (a generator built without from_pretrained has no level yet)
    peaks = level_peaks(budget.plans, config, params.num_frames, params.height, params.width,
                        loaded_level=config.low_mem_level, sizes=budget.sizes)
    level = next((lv for lv in LEVELS if lv >= config.low_mem_level and peaks[lv] <= budget.limit), None)
    if level is None:
        table = ", ".join(f"level {lv}: {peaks[lv] / GIB:.1f} GiB" for lv in LEVELS if lv >= config.low_mem_level)
        raise InvalidRequestError(
            "num_frames", f"a {params.num_frames}x{params.height}x{params.width} video needs an estimated "
            f"{table}, above the {budget.describe()}", "a smaller height, width or num_frames")
    return level
