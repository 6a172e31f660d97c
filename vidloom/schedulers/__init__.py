"""Flow-matching schedulers as pure functions with explicit solver state.

Each scheduler is four functions over a frozen config (see ``SchedulerFamily``); ``Scheduler``
binds a config to them, and ``scheduler_from_config`` picks the family by ``_class_name``.
A denoising loop, as diffusers' Wan pipeline runs it::

    scheduler = scheduler_from_config(model_dir)            # reads scheduler/scheduler_config.json
    schedule = scheduler.schedule(N, shift=params.shift, device=device)
    state = scheduler.init_state()
    for i in range(N):
        t = schedule.timesteps[i].expand(latents.shape[0])  # int64 (UniPC) or float32 (Euler)
        v = transformer(latents.to(dit_dtype), t, ...)      # velocity, after CFG
        latents, state = scheduler.step(schedule, state, v, latents)

The schedule is never modified and the state is replaced each step, so any number of requests
can share one ``Scheduler`` and be advanced interleaved. The per-request ``shift`` replaces the
config's ``flow_shift`` (UniPC) or ``shift`` (Euler), as ``from_config(config, flow_shift=...)``
/ ``from_config(config, shift=...)`` would in diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vidloom.errors import ModelLoadError
from vidloom.schedulers import flow_match_euler, unipc
from vidloom.schedulers.common import Schedule, SchedulerConfigError
from vidloom.schedulers.flow_match_euler import FlowMatchEulerConfig, FlowMatchEulerState
from vidloom.schedulers.unipc import UniPCConfig, UniPCState

__all__ = [
    "SCHEDULERS",
    "FlowMatchEulerConfig",
    "FlowMatchEulerState",
    "Schedule",
    "Scheduler",
    "SchedulerConfigError",
    "SchedulerFamily",
    "UniPCConfig",
    "UniPCState",
    "scheduler_from_config",
]

SchedulerConfig = UniPCConfig | FlowMatchEulerConfig
SolverState = UniPCState | FlowMatchEulerState


@dataclasses.dataclass(frozen=True)
class SchedulerFamily:
    """The pure functions that make up one scheduler."""

    config_type: type
    config_from_dict: Callable[[Mapping[str, Any]], Any]
    make_schedule: Callable[..., Schedule]
    init_state: Callable[..., Any]
    step: Callable[..., tuple[torch.Tensor, Any]]


# diffusers `_class_name` -> the functions that reproduce it
SCHEDULERS: dict[str, SchedulerFamily] = {
    unipc.CLASS_NAME: SchedulerFamily(
        UniPCConfig, unipc.config_from_dict, unipc.make_schedule, unipc.init_state, unipc.step
    ),
    flow_match_euler.CLASS_NAME: SchedulerFamily(
        FlowMatchEulerConfig,
        flow_match_euler.config_from_dict,
        flow_match_euler.make_schedule,
        flow_match_euler.init_state,
        flow_match_euler.step,
    ),
}


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A config bound to its family's functions. Holds no per-request state: share it freely."""

    config: SchedulerConfig

    def __post_init__(self):
        if not any(isinstance(self.config, f.config_type) for f in SCHEDULERS.values()):
            raise TypeError(f"no scheduler family for config type {type(self.config).__name__}")

    @property
    def class_name(self) -> str:
        return next(name for name, f in SCHEDULERS.items() if isinstance(self.config, f.config_type))

    @property
    def family(self) -> SchedulerFamily:
        return SCHEDULERS[self.class_name]

    def schedule(self, num_inference_steps: int, shift: float | None = None, device=None) -> Schedule:
        return self.family.make_schedule(self.config, num_inference_steps, shift=shift, device=device)

    def init_state(self, begin_index: int = 0) -> SolverState:
        return self.family.init_state(self.config, begin_index)

    def step(
        self, schedule: Schedule, state: SolverState, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, SolverState]:
        return self.family.step(self.config, schedule, state, model_output, sample)


def _config_file(path: Path) -> Path:
    """``path`` itself, or the scheduler_config.json of a scheduler folder or a model folder."""
    if path.is_dir():
        for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return candidate
        raise ModelLoadError("no scheduler_config.json found", file=str(path))
    if not path.is_file():
        raise ModelLoadError("scheduler config not found", file=str(path))
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read scheduler config ({e})", file=str(path)) from e
    if not isinstance(raw, dict):
        raise ModelLoadError("scheduler config is not a JSON object", file=str(path))
    return raw


def scheduler_from_config(source: Mapping[str, Any] | str | os.PathLike) -> Scheduler:
    """A ``Scheduler`` from a diffusers scheduler config: a dict, a ``scheduler_config.json``,
    a scheduler folder or a model folder. Unknown classes, keys or unsupported values raise
    ``SchedulerConfigError`` (a ValueError) naming the key and what is supported."""
    file = None
    if isinstance(source, Mapping):
        raw = source
    else:
        path = _config_file(Path(source))
        file, raw = str(path), _read_json(path)
    try:
        class_name = raw.get("_class_name")
        family = SCHEDULERS.get(class_name) if isinstance(class_name, str) else None
        if family is None:
            raise SchedulerConfigError(
                "_class_name", f"unsupported scheduler class {class_name!r}", ", ".join(SCHEDULERS)
            )
        return Scheduler(family.config_from_dict(raw))
    except SchedulerConfigError as e:
        e.file = file
        raise
