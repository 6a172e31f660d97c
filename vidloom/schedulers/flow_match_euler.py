"""Flow-matching Euler sampler, as pure functions.

The model predicts the velocity ``v = dx/dsigma`` of ``x = (1 - sigma) * x0 + sigma * noise``,
and one step is the Euler update ``x_next = x + (sigma_next - sigma) * v``.

The schedule and the update mirror diffusers' ``FlowMatchEulerDiscreteScheduler``
(``set_timesteps(N)`` then ``step``) in the default, statically shifted configuration, with the
same float64/float32 rounding points. Dynamic (resolution-dependent) shifting, terminal
stretching, Karras/exponential/beta sigmas, inverted sigmas and stochastic sampling are
rejected with a ``SchedulerConfigError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vidloom.schedulers.common import (
    MAX_TRAIN_TIMESTEPS,
    ConfigReader,
    Schedule,
    SchedulerConfigError,
    check_begin_index,
    check_num_inference_steps,
    check_step_inputs,
    resolve_shift,
)

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerConfig:
    """The settings that shape a flow-match Euler run; names are diffusers' config keys.

    ``shift`` s maps the uniform sigma u to ``s*u / (1 + (s-1)*u)``.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self):
        n_train = self.num_train_timesteps
        if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 1:
            raise SchedulerConfigError("num_train_timesteps", f"{CLASS_NAME}: got {n_train!r}", "integers >= 1")
        s = self.shift
        if isinstance(s, bool) or not (isinstance(s, (int, float)) and 0 < s < float("inf")):
            raise SchedulerConfigError("shift", f"{CLASS_NAME}: got {s!r}", "a finite number > 0")


def config_from_dict(raw: Mapping[str, Any]) -> FlowMatchEulerConfig:
    """Build the config from a diffusers ``scheduler_config.json`` dict (diffusers' defaults for
    missing keys); reject any key or value whose effect this module does not reproduce."""
    r = ConfigReader(raw, CLASS_NAME)
    r.require("use_dynamic_shifting", False, (False,))
    r.require("invert_sigmas", False, (False,))
    r.require("shift_terminal", None, (None,))
    r.require("use_karras_sigmas", False, (False,))
    r.require("use_exponential_sigmas", False, (False,))
    r.require("use_beta_sigmas", False, (False,))
    r.require("stochastic_sampling", False, (False,))
    r.require("time_shift_type", "exponential", ("exponential", "linear"))  # validated as diffusers does
    # only read by dynamic shifting, which is rejected above
    r.ignore("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    config = FlowMatchEulerConfig(
        num_train_timesteps=r.integer("num_train_timesteps", 1000, minimum=1, maximum=MAX_TRAIN_TIMESTEPS),
        shift=r.positive_number("shift", 1.0),
    )
    r.finish()
    return config


def _shift_sigmas(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _training_sigma_range(n_train: int, shift: float) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the shifted training table, rounded through float32 exactly as
    diffusers' constructor computes them."""
    t = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy())  # (n_train,)
    sigmas = _shift_sigmas(t / n_train, shift)
    return sigmas[0].item(), sigmas[-1].item()


def make_schedule(
    config: FlowMatchEulerConfig,
    num_inference_steps: int,
    shift: float | None = None,
    device: torch.device | str | None = None,
) -> Schedule:
    """Sigmas and timesteps of an N-step run, as ``set_timesteps(N)`` makes them.

    ``shift`` overrides ``config.shift`` for this request: the result equals diffusers'
    ``FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)``. (diffusers'
    ``set_shift`` differs slightly: it keeps the endpoint sigma_min made with the config's shift.)
    Timesteps are float32 (``sigma * num_train_timesteps``); sigmas and timesteps are on ``device``.
    """
    n = check_num_inference_steps(num_inference_steps)
    s = resolve_shift(shift, config.shift)
    n_train = config.num_train_timesteps

    # diffusers spans the already shifted training range and then shifts again; kept for parity
    sigma_max, sigma_min = _training_sigma_range(n_train, s)
    sigmas = np.linspace(sigma_max * n_train, sigma_min * n_train, n) / n_train  # (n,) float64
    sigmas = _shift_sigmas(sigmas, s)
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
    timesteps = sigmas * n_train  # float32
    sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])  # (n + 1,) ends at 0: clean sample
    return Schedule(sigmas=sigmas, timesteps=timesteps, shift=s)


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerState:
    """Euler is one-step: the state is just where in the schedule the next step starts."""

    step_index: int = 0


def init_state(config: FlowMatchEulerConfig, begin_index: int = 0) -> FlowMatchEulerState:
    """A fresh state; ``begin_index`` starts part-way into the schedule (diffusers' set_begin_index)."""
    return FlowMatchEulerState(step_index=check_begin_index(begin_index))


def step(
    config: FlowMatchEulerConfig,
    schedule: Schedule,
    state: FlowMatchEulerState,
    model_output: torch.Tensor,
    sample: torch.Tensor,
) -> tuple[torch.Tensor, FlowMatchEulerState]:
    """One Euler step from ``schedule.sigmas[k]`` to ``schedule.sigmas[k + 1]``, k = state.step_index.

    As in diffusers the sample is upcast to float32 for the update and the result is cast to
    ``model_output.dtype`` (so bf16 model outputs give bf16 samples).
    """
    k = state.step_index
    check_step_inputs(schedule, k, model_output, sample)
    x = sample.to(torch.float32)
    dt = schedule.sigmas[k + 1] - schedule.sigmas[k]  # negative: towards less noise
    prev_sample = x + dt * model_output
    return prev_sample.to(model_output.dtype), FlowMatchEulerState(step_index=k + 1)
