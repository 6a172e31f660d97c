"""What the flow-matching schedulers share: the schedule record, the config error, a strict
reader for ``scheduler_config.json`` dicts, and the checks on per-request arguments."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch

from vidloom.errors import InvalidRequestError, ModelLoadError

# A bound on a config's training timesteps (Wan: 1000): a request may not ask for more steps than
# this, so a hostile config cannot make a request allocate a giant schedule.
MAX_TRAIN_TIMESTEPS = 100_000


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The noise levels of one request, made once and only read afterwards.

    ``sigmas``    (N + 1,) float32; ``sigmas[i]`` is the noise level at step i, the last entry is
                  the terminal level the final step lands on.
    ``timesteps`` (N,) what the transformer receives at step i, with the reference's dtype
                  (int64 for UniPC, float32 for flow-match Euler).
    ``shift``     the flow shift the sigmas were made with (config value or the request's override).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    shift: float

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])


class SchedulerConfigError(ModelLoadError, ValueError):
    """A scheduler config key holds a value vidloom does not support (or does not know the key).

    ``key`` names the config key, ``allowed`` the supported values, ``file`` the json it came
    from when it was read from disk. It is a ``ValueError`` (a bad value) and a
    ``ModelLoadError`` (it comes from the model folder's ``scheduler_config.json``).
    """

    def __init__(self, key: str, message: str, allowed: str | None = None, file: str | None = None):
        super().__init__(message, file=file, key=key)
        self.detail = message
        self.allowed = allowed

    def __str__(self) -> str:
        text = f"scheduler config key '{self.key}': {self.detail}"
        if self.allowed:
            text += f" (supported: {self.allowed})"
        if self.file:
            text += f" [in {self.file}]"
        return text


def _same_value(value: Any, candidate: Any) -> bool:
    # True == 1 in Python; a json `1` for a boolean flag is still a wrong value
    return type(value) is type(candidate) and value == candidate


class ConfigReader:
    """Reads a raw diffusers scheduler config key by key, with diffusers' defaults for missing keys.

    Keys starting with "_" are bookkeeping and skipped. Every other key must be consumed by one
    of the readers below; ``finish`` rejects the rest, so a key this code does not know can
    never change the result silently.
    """

    def __init__(self, raw: Mapping[str, Any], class_name: str):
        if not isinstance(raw, Mapping):
            raise SchedulerConfigError("_class_name", f"expected a dict, got {type(raw).__name__}")
        self.class_name = class_name
        self._raw = {k: v for k, v in raw.items() if not str(k).startswith("_")}
        self._read: set[str] = set()

    def get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        return self._raw.get(key, default)

    def error(self, key: str, message: str, allowed: str | None = None) -> SchedulerConfigError:
        return SchedulerConfigError(key, f"{self.class_name}: {message}", allowed)

    def ignore(self, *keys: str) -> None:
        """Keys that cannot influence the result in the supported configuration."""
        self._read.update(keys)

    def require(self, key: str, default: Any, supported: tuple[Any, ...]) -> Any:
        """A key whose only supported values are ``supported`` (anything else is rejected)."""
        value = self.get(key, default)
        if not any(_same_value(value, s) for s in supported):
            allowed = ", ".join(repr(s) for s in supported)
            raise self.error(key, f"unsupported value {value!r}", allowed)
        return value

    def flag(self, key: str, default: bool) -> bool:
        return self.require(key, default, (True, False))

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.get(key, default)
        in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if in_range and maximum is not None:
            in_range = value <= maximum
        if not in_range:
            allowed = f"integers {minimum}..{maximum}" if maximum is not None else f"integers >= {minimum}"
            raise self.error(key, f"unsupported value {value!r}", allowed)
        return value

    def positive_number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise self.error(key, f"unsupported value {value!r}", "a finite number > 0")
        return float(value)

    def finish(self) -> None:
        """Reject keys no reader consumed (the error lists the known keys)."""
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.error(unknown[0], "unknown key; it may change the result, so it is not ignored", known)


def check_num_inference_steps(num_inference_steps: Any) -> int:
    try:
        n = operator.index(num_inference_steps)
    except TypeError:
        n = None
    if n is None or isinstance(num_inference_steps, bool) or n < 1:
        raise InvalidRequestError("num_inference_steps", f"got {num_inference_steps!r}", "integers >= 1")
    return n


def resolve_shift(shift: Any, config_shift: float) -> float:
    """The request's flow shift, or the config's when the request does not set one."""
    if shift is None:
        return config_shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (0 < shift < math.inf):
        raise InvalidRequestError("shift", f"got {shift!r}", "a finite number > 0")
    return float(shift)


def check_step_inputs(schedule: Schedule, step_index: int, model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if not 0 <= step_index < schedule.num_inference_steps:
        raise ValueError(
            f"solver state is at step {step_index}, outside the {schedule.num_inference_steps}-step schedule"
        )
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} differs from sample shape {tuple(sample.shape)}"
        )


def check_begin_index(begin_index: Any) -> int:
    try:
        k = operator.index(begin_index)
    except TypeError:
        k = None
    if k is None or isinstance(begin_index, bool) or k < 0:
        raise InvalidRequestError("begin_index", f"got {begin_index!r}", "integers >= 0")
    return k
