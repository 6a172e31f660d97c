"""UniPC multistep solver (Zhao et al. 2023) for flow-matching models, as pure functions.

Flow matching writes the noisy sample as ``x = alpha * x0 + sigma * noise`` with
``alpha = 1 - sigma``, and the model predicts the velocity ``v = noise - x0``, so
``x0 = x - sigma * v``. UniPC works in ``lambda = log(alpha / sigma)`` and, at every step,

  UniC  corrects the sample the previous predictor produced, using the x0 prediction the model
        just made at that sample (no extra model call), then
  UniP  predicts the next sample with a multistep extrapolation of the last p x0 predictions.

The arithmetic mirrors diffusers' ``UniPCMultistepScheduler`` operation by operation (same
dtypes, same association order, scalars on the same device), so trajectories match it exactly.
Supported: ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``, ``predict_x0=True``,
solver orders 1..3, bh1/bh2, ``lower_order_final``, ``disable_corrector``, final sigma
"zero" or "sigma_min". Everything else is rejected with a ``SchedulerConfigError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

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

CLASS_NAME = "UniPCMultistepScheduler"

# The scheduler_config.json of Wan2.1's flow-matching UniPC, with diffusers' keys and values; the
# folders vidloom writes add "_diffusers_version" and may replace "flow_shift"
UNIPC_FLOW_CONFIG = {
    "_class_name": CLASS_NAME, "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# diffusers keeps solver_type values of other solvers working by mapping them to bh2
_SOLVER_TYPE_ALIASES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


@dataclasses.dataclass(frozen=True)
class UniPCConfig:
    """The settings that shape a flow-matching UniPC run; names are diffusers' config keys.

    ``flow_shift`` s maps the uniform sigma u to ``s*u / (1 + (s-1)*u)`` (s > 1 spends more
    steps at high noise; Wan uses 3.0 for 480p and 5.0 for 720p).
    """

    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        def bad(key, message, allowed=None):
            return SchedulerConfigError(key, f"{CLASS_NAME}: {message}", allowed)

        if isinstance(self.disable_corrector, list):  # as json gives it; stored as a tuple (frozen)
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))

        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise bad("num_train_timesteps", f"got {self.num_train_timesteps!r}", "integers >= 2")
        shift = self.flow_shift
        if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and 0 < shift < float("inf")):
            raise bad("flow_shift", f"got {self.flow_shift!r}", "a finite number > 0")
        if self.solver_order not in (1, 2, 3) or isinstance(self.solver_order, bool):
            raise bad("solver_order", f"got {self.solver_order!r}", "1, 2, 3")
        if self.solver_type not in ("bh1", "bh2"):
            raise bad("solver_type", f"got {self.solver_type!r}", "'bh1', 'bh2'")
        if not isinstance(self.lower_order_final, bool):
            raise bad("lower_order_final", f"got {self.lower_order_final!r}", "True, False")
        if not isinstance(self.disable_corrector, tuple) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.disable_corrector
        ):
            raise bad("disable_corrector", f"got {self.disable_corrector!r}", "a list of step indices >= 0")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise bad("final_sigmas_type", f"got {self.final_sigmas_type!r}", "'zero', 'sigma_min'")
        _check_final_step_is_finite(self, bad)


def _check_final_step_is_finite(config: UniPCConfig, bad) -> None:
    """Reject the combinations for which the reference's last step is not finite.

    With final sigma 0, lambda = +inf at the end: bh1 (B(h) = h) gives inf * 0 = NaN, and a
    predictor of order >= 2 divides by an infinite ratio r = (lambda_s1 - lambda_s0) / h.
    With final sigma "sigma_min" the last step has h = 0: order 3 solves a singular system.
    (With lower_order_final the last step has order 1, which is fine in both cases.)
    """
    last_order = 1 if config.lower_order_final else config.solver_order
    if config.final_sigmas_type == "zero" and config.solver_type == "bh1":
        raise bad(
            "solver_type",
            "'bh1' with final_sigmas_type='zero' gives NaN in the last step (diffusers does too); "
            "use 'bh2' or final_sigmas_type='sigma_min'",
            "'bh2' with final_sigmas_type='zero'",
        )
    if config.final_sigmas_type == "zero" and last_order >= 2:
        raise bad(
            "lower_order_final",
            f"False with solver_order={config.solver_order} and final_sigmas_type='zero' gives a "
            "non-finite last step (diffusers does too)",
            "True, or solver_order=1",
        )
    if config.final_sigmas_type == "sigma_min" and last_order >= 3:
        raise bad(
            "lower_order_final",
            "False with solver_order=3 and final_sigmas_type='sigma_min' gives a singular last step "
            "(diffusers does too)",
            "True, or solver_order <= 2",
        )


def config_from_dict(raw: Mapping[str, Any]) -> UniPCConfig:
    """Build the config from a diffusers ``scheduler_config.json`` dict (diffusers' defaults for
    missing keys); reject any key or value whose effect this module does not reproduce."""
    r = ConfigReader(raw, CLASS_NAME)
    r.require("use_flow_sigmas", False, (True,))
    r.require("prediction_type", "epsilon", ("flow_prediction",))
    r.require("predict_x0", True, (True,))
    r.require("thresholding", False, (False,))
    r.require("use_karras_sigmas", False, (False,))
    r.require("use_exponential_sigmas", False, (False,))
    r.require("use_beta_sigmas", False, (False,))
    r.require("use_dynamic_shifting", False, (False,))
    r.require("solver_p", None, (None,))
    r.require("shift_terminal", None, (None,))
    # validated as diffusers validates them, but the flow-sigma path never reads them
    r.require("beta_schedule", "linear", ("linear", "scaled_linear", "squaredcos_cap_v2"))
    r.require("timestep_spacing", "linspace", ("linspace", "leading", "trailing"))
    r.require("time_shift_type", "exponential", ("exponential", "linear"))
    # betas only feed the variance-preserving schedule; thresholding values and sigma_min/max
    # only matter for options rejected above
    r.ignore("beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr", "steps_offset")
    r.ignore("dynamic_thresholding_ratio", "sample_max_value", "sigma_min", "sigma_max")

    solver_type = r.require("solver_type", "bh2", tuple(_SOLVER_TYPE_ALIASES))
    disable_corrector = r.get("disable_corrector", [])
    if not isinstance(disable_corrector, (list, tuple)):
        raise r.error("disable_corrector", f"got {disable_corrector!r}", "a list of step indices >= 0")
    # every other key is a field of UniPCConfig; its __post_init__ checks the combinations
    config = UniPCConfig(
        num_train_timesteps=r.integer("num_train_timesteps", 1000, minimum=2, maximum=MAX_TRAIN_TIMESTEPS),
        flow_shift=r.positive_number("flow_shift", 1.0),
        solver_order=r.integer("solver_order", 2, minimum=1, maximum=3),
        solver_type=_SOLVER_TYPE_ALIASES[solver_type],
        lower_order_final=r.flag("lower_order_final", True),
        disable_corrector=tuple(disable_corrector),
        final_sigmas_type=r.require("final_sigmas_type", "zero", ("zero", "sigma_min")),
    )
    r.finish()
    return config


def make_schedule(
    config: UniPCConfig,
    num_inference_steps: int,
    shift: float | None = None,
    device: torch.device | str | None = None,
) -> Schedule:
    """Sigmas and timesteps of an N-step run, as ``set_timesteps(N)`` makes them.

    ``shift`` overrides ``config.flow_shift`` for this request: the result equals diffusers'
    ``UniPCMultistepScheduler.from_config(config, flow_shift=shift)``. Timesteps are int64 on
    ``device``; sigmas stay on the CPU, where diffusers keeps them too.
    """
    n = check_num_inference_steps(num_inference_steps)
    s = resolve_shift(shift, config.flow_shift)
    n_train = config.num_train_timesteps

    u = np.linspace(1, 1 / n_train, n + 1)[:-1]  # (n,) float64, uniform noise levels 1 -> 1/n_train
    sigmas = s * u / (1 + (s - 1) * u)
    eps = 1e-6
    if np.fabs(sigmas[0] - 1) < eps:
        sigmas[0] -= eps  # alpha = 1 - sigma must stay > 0: log(alpha) enters lambda
    timesteps = sigmas * n_train  # float64; truncated to int64 below, as diffusers does
    sigma_last = 0 if config.final_sigmas_type == "zero" else sigmas[-1]
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return Schedule(
        sigmas=torch.from_numpy(sigmas),
        timesteps=torch.from_numpy(timesteps).to(device=device, dtype=torch.int64),
        shift=s,
    )


@dataclasses.dataclass(frozen=True)
class UniPCState:
    """Everything the solver carries from one step to the next; ``step`` returns a new one.

    ``x0_history``       the x0 predictions of the last ``solver_order`` steps, oldest first
    ``last_sample``      the sample the last predictor started from (the corrector redoes that step)
    ``lower_order_nums`` steps taken so far, capped at solver_order (warm-up of the multistep)
    ``last_order``       the order the last predictor used (the corrector uses the same)

    The tensors are references to the caller's tensors; do not modify those in place.
    """

    step_index: int = 0
    x0_history: tuple[torch.Tensor, ...] = ()
    last_sample: torch.Tensor | None = None
    lower_order_nums: int = 0
    last_order: int = 0


def init_state(config: UniPCConfig, begin_index: int = 0) -> UniPCState:
    """A fresh state; ``begin_index`` starts part-way into the schedule (diffusers' set_begin_index)."""
    return UniPCState(step_index=check_begin_index(begin_index))


def step(
    config: UniPCConfig,
    schedule: Schedule,
    state: UniPCState,
    model_output: torch.Tensor,
    sample: torch.Tensor,
) -> tuple[torch.Tensor, UniPCState]:
    """One UniPC step from ``schedule.sigmas[k]`` to ``schedule.sigmas[k + 1]``, k = state.step_index.

    ``model_output`` is the model's velocity prediction at ``sample``, shape (B, C, ...).
    Returns the next sample (dtype of ``sample``) and the new state.
    """
    k = state.step_index
    check_step_inputs(schedule, k, model_output, sample)
    if sample.ndim < 2:
        raise ValueError(f"sample must be (B, C, ...), got shape {tuple(sample.shape)}")
    sigmas = schedule.sigmas
    x0_now = sample - sigmas[k] * model_output

    use_corrector = k > 0 and (k - 1) not in config.disable_corrector and state.last_sample is not None
    if use_corrector:
        sample = _unic_update(config, sigmas, k, state.x0_history, x0_now, state.last_sample, state.last_order)

    x0_history = (state.x0_history + (x0_now,))[-config.solver_order :]
    order = config.solver_order
    if config.lower_order_final:
        order = min(order, schedule.num_inference_steps - k)
    order = min(order, state.lower_order_nums + 1)  # warm-up: only as many x0s as we have

    prev_sample = _unip_update(config, sigmas, k, x0_history, sample, order)
    new_state = UniPCState(
        step_index=k + 1,
        x0_history=x0_history,
        last_sample=sample,
        lower_order_nums=min(state.lower_order_nums + 1, config.solver_order),
        last_order=order,
    )
    return prev_sample, new_state


class _BhTerms(NamedTuple):
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    sigma_s0: torch.Tensor
    h_phi_1: torch.Tensor  # e^{-h} - 1
    B_h: torch.Tensor  # -h (bh1) or e^{-h} - 1 (bh2)
    rks: list[torch.Tensor]  # r_i = (lambda_{s_i} - lambda_{s0}) / h for the earlier steps s_i
    R: torch.Tensor  # (p, p) powers of the r_i
    b: torch.Tensor  # (p,) phi-function targets of the order conditions


def _alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha = 1 - sigma
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _bh_terms(solver_type: str, sigmas: torch.Tensor, t: int, s0: int, order: int, device) -> _BhTerms:
    """The lambda-space coefficients of one B(h) update from sigmas[s0] to sigmas[t] of order p,
    using the earlier steps s0 - 1, ..., s0 - (p - 1)."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[t].to(device))
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[s0].to(device))
    h = lambda_t - lambda_s0

    rks = []
    for i in range(1, order):
        _, _, lambda_si = _alpha_sigma_lambda(sigmas[s0 - i].to(device))
        rks.append((lambda_si - lambda_s0) / h)
    r = torch.stack(rks + [torch.ones((), device=device)])  # (p,)

    hh = -h  # the x0 (data) prediction form integrates in -lambda
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    R, b = [], []
    factorial_i = 1
    for i in range(1, order + 1):
        R.append(torch.pow(r, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return _BhTerms(alpha_t, sigma_t, sigma_s0, h_phi_1, B_h, rks, torch.stack(R), torch.stack(b))


def _differences(x0_history: tuple[torch.Tensor, ...], rks: list[torch.Tensor]) -> torch.Tensor | None:
    """D1_i = (m_i - m0) / r_i for the earlier x0 predictions m_i, stacked as (B, p-1, C, ...)."""
    m0 = x0_history[-1]
    D1s = [(x0_history[-(i + 1)] - m0) / r_i for i, r_i in enumerate(rks, start=1)]
    return torch.stack(D1s, dim=1) if D1s else None


def _unip_update(
    config: UniPCConfig, sigmas: torch.Tensor, k: int, x0_history: tuple, sample: torch.Tensor, order: int
) -> torch.Tensor:
    """UniP-p: the sample at sigmas[k + 1] from ``sample`` at sigmas[k] and the last p x0 predictions."""
    x, m0, device = sample, x0_history[-1], sample.device
    c = _bh_terms(config.solver_type, sigmas, k + 1, k, order, device)
    D1s = _differences(x0_history, c.rks)

    x_t_ = c.sigma_t / c.sigma_s0 * x - c.alpha_t * c.h_phi_1 * m0  # the first-order (DDIM-like) step
    pred_res = 0
    if D1s is not None:
        if order == 2:
            rhos_p = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos_p = torch.linalg.solve(c.R[:-1, :-1], c.b[:-1]).to(device).to(x.dtype)
        pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)
    x_t = x_t_ - c.alpha_t * c.B_h * pred_res
    return x_t.to(x.dtype)


def _unic_update(
    config: UniPCConfig,
    sigmas: torch.Tensor,
    k: int,
    x0_history: tuple,
    x0_now: torch.Tensor,
    last_sample: torch.Tensor,
    order: int,
) -> torch.Tensor:
    """UniC-p: redo the last step (sigmas[k-1] -> sigmas[k], from ``last_sample``) with the x0
    prediction ``x0_now`` made at its result; the corrected sample at sigmas[k]."""
    x, m0, device = last_sample, x0_history[-1], last_sample.device
    c = _bh_terms(config.solver_type, sigmas, k, k - 1, order, device)
    D1s = _differences(x0_history, c.rks)

    if order == 1:
        rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        rhos_c = torch.linalg.solve(c.R, c.b).to(device).to(x.dtype)
    x_t_ = c.sigma_t / c.sigma_s0 * x - c.alpha_t * c.h_phi_1 * m0
    corr_res = 0 if D1s is None else torch.einsum("k,bkc...->bc...", rhos_c[:-1], D1s)
    D1_t = x0_now - m0
    x_t = x_t_ - c.alpha_t * c.B_h * (corr_res + rhos_c[-1] * D1_t)
    return x_t.to(x.dtype)
