"""Schedulers against diffusers (the reference oracle): schedules, whole trajectories, config checks.

Tolerance (fp32 and mixed bf16/fp32): the code mirrors diffusers operation by operation, so
schedules must be identical and every step's sample within 1e-5 relative (on CPU they are
bit-identical; the tolerance leaves room for other BLAS/einsum paths).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from vidloom.errors import InvalidRequestError, ModelLoadError
from vidloom.schedulers import (
    SCHEDULERS,
    FlowMatchEulerConfig,
    Scheduler,
    SchedulerConfigError,
    UniPCConfig,
    scheduler_from_config,
)

torch.set_num_threads(1)

STEP_RTOL = 1e-5

# as shipped in Wan2.1 folders (scheduler/scheduler_config.json)
WAN_UNIPC = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

EULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

SHIFT_KEY = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


REFERENCE_CLASSES = {cls.__name__: cls for cls in (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler)}


def reference(raw: dict, **overrides):
    return REFERENCE_CLASSES[raw["_class_name"]].from_config({**raw, **overrides})


def unipc(**overrides) -> dict:
    return {**WAN_UNIPC, **overrides}


def fake_model(channels: int, seed: int, dtype=torch.float32):
    """A fixed random affine map over channels: v = W x + c (deterministic, depends on the sample)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(channels, channels, generator=g) / channels**0.5
    c = torch.randn(1, channels, 1, 1, 1, generator=g)

    def model(x: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("oc,bcfhw->bofhw", W, x.float()) + c).to(dtype)

    return model


def noise(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 4, 5, generator=g).to(dtype)  # (B, C, F, H, W)


def run_reference(raw, n, x, model, begin_index=0):
    sched = reference(raw)
    sched.set_timesteps(n)
    sched.set_begin_index(begin_index)
    out = []
    for t in sched.timesteps[begin_index:]:
        x = sched.step(model(x), t, x, return_dict=False)[0]
        out.append(x)
    return out


def run_ours(raw, n, x, model, begin_index=0):
    sched = scheduler_from_config(raw)
    schedule = sched.schedule(n)
    state = sched.init_state(begin_index)
    out = []
    for _ in range(begin_index, n):
        x, state = sched.step(schedule, state, model(x), x)
        out.append(x)
    assert state.step_index == n
    return out


def assert_trajectories_match(ours, ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype, f"step {i}: dtype {a.dtype} vs {b.dtype}"
        assert torch.isfinite(b).all(), f"step {i}: reference not finite"
        rel = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        assert rel <= STEP_RTOL, f"step {i}: relative error {rel:.3g}"


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("n", [1, 2, 3, 10, 25, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
@pytest.mark.parametrize(
    "raw", [WAN_UNIPC, unipc(final_sigmas_type="sigma_min"), EULER], ids=["unipc-zero", "unipc-sigma_min", "euler"]
)
def test_schedule_matches_diffusers(raw, shift, n):
    ref = reference(raw, **{SHIFT_KEY[raw["_class_name"]]: shift})
    ref.set_timesteps(n)
    # the request's shift overrides the config's (3.0)
    schedule = scheduler_from_config(raw).schedule(n, shift=shift)
    assert schedule.timesteps.dtype == ref.timesteps.dtype
    assert schedule.sigmas.dtype == ref.sigmas.dtype == torch.float32
    assert schedule.timesteps.shape == (n,) and schedule.sigmas.shape == (n + 1,)
    assert torch.equal(schedule.timesteps, ref.timesteps)
    assert torch.equal(schedule.sigmas, ref.sigmas)
    assert schedule.shift == shift and schedule.num_inference_steps == n


@pytest.mark.parametrize("raw", [WAN_UNIPC, EULER], ids=["unipc", "euler"])
def test_schedule_uses_config_shift_by_default(raw):
    ref = reference(raw)
    ref.set_timesteps(20)
    schedule = scheduler_from_config(raw).schedule(20)
    assert schedule.shift == 3.0
    assert torch.equal(schedule.sigmas, ref.sigmas) and torch.equal(schedule.timesteps, ref.timesteps)


def test_timestep_dtypes_follow_diffusers():
    assert scheduler_from_config(WAN_UNIPC).schedule(4).timesteps.dtype == torch.int64
    assert scheduler_from_config(EULER).schedule(4).timesteps.dtype == torch.float32


# ---------------------------------------------------------------- trajectories

FINALS, TYPES, LOFS, ORDERS = ("zero", "sigma_min"), ("bh1", "bh2"), (True, False), (1, 2, 3)


def _valid(final, solver_type, lof, order):
    last_order = 1 if lof else order
    if final == "zero":
        return solver_type == "bh2" and last_order == 1
    return last_order <= 2


VALID_UNIPC = [c for c in itertools.product(FINALS, TYPES, LOFS, ORDERS) if _valid(*c)]
REJECTED_UNIPC = [c for c in itertools.product(FINALS, TYPES, LOFS, ORDERS) if not _valid(*c)]


@pytest.mark.parametrize("n", [1, 3, 15])
@pytest.mark.parametrize("final,solver_type,lof,order", VALID_UNIPC)
def test_unipc_trajectory_matches_diffusers(final, solver_type, lof, order, n):
    raw = unipc(final_sigmas_type=final, solver_type=solver_type, lower_order_final=lof, solver_order=order)
    model = fake_model(4, seed=1)
    assert_trajectories_match(run_ours(raw, n, noise(0), model), run_reference(raw, n, noise(0), model))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("disable", [[0], [0, 1, 5], [3, 4]])
def test_unipc_disable_corrector_matches_diffusers(disable, order):
    raw = unipc(solver_order=order, disable_corrector=disable)
    model = fake_model(4, seed=2)
    assert_trajectories_match(run_ours(raw, 12, noise(3), model), run_reference(raw, 12, noise(3), model))


@pytest.mark.parametrize("raw", [unipc(solver_order=3), EULER], ids=["unipc", "euler"])
def test_begin_index_matches_diffusers(raw):
    model = fake_model(4, seed=4)
    ours = run_ours(raw, 14, noise(5), model, begin_index=4)
    assert_trajectories_match(ours, run_reference(raw, 14, noise(5), model, begin_index=4))


@pytest.mark.parametrize("n", [1, 2, 20])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_trajectory_matches_diffusers(shift, n):
    raw = {**EULER, "shift": shift}
    model = fake_model(4, seed=6)
    assert_trajectories_match(run_ours(raw, n, noise(7), model), run_reference(raw, n, noise(7), model))


@pytest.mark.parametrize(
    "raw", [unipc(solver_order=1), unipc(), unipc(solver_order=3), EULER], ids=["unipc1", "unipc2", "unipc3", "euler"]
)
@pytest.mark.parametrize(
    "sample_dtype,model_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32-latents-bf16-model", "bf16"],
)
def test_mixed_precision_matches_diffusers(raw, sample_dtype, model_dtype):
    """The Wan pipeline keeps fp32 latents and gets bf16 velocities; dtype handling must match too
    (UniPC returns the sample's dtype, Euler the model output's)."""
    model = fake_model(4, seed=8, dtype=model_dtype)
    ours = run_ours(raw, 10, noise(9, sample_dtype), model)
    ref = run_reference(raw, 10, noise(9, sample_dtype), model)
    assert_trajectories_match(ours, ref)


@pytest.mark.parametrize("final,solver_type,lof,order", REJECTED_UNIPC)
def test_rejected_unipc_combinations_are_exactly_the_non_finite_ones(final, solver_type, lof, order):
    raw = unipc(final_sigmas_type=final, solver_type=solver_type, lower_order_final=lof, solver_order=order)
    with pytest.raises(SchedulerConfigError) as info:
        scheduler_from_config(raw)
    assert info.value.key in ("solver_type", "lower_order_final")
    try:
        ref = run_reference(raw, 10, noise(0), fake_model(4, seed=1))
        assert not torch.isfinite(ref[-1]).all()
    except torch.linalg.LinAlgError:
        pass  # diffusers fails outright


# ---------------------------------------------------------------- explicit state


@pytest.mark.parametrize("raw", [unipc(solver_order=3), WAN_UNIPC, EULER], ids=["unipc3", "unipc2", "euler"])
def test_interleaved_states_equal_separate_runs(raw):
    sched = scheduler_from_config(raw)
    model = fake_model(4, seed=10)
    separate = [run_ours(raw, 12, noise(s), model) for s in (11, 12)]

    schedule = sched.schedule(12)
    sigmas_before, timesteps_before = schedule.sigmas.clone(), schedule.timesteps.clone()
    xs, states = [noise(11), noise(12)], [sched.init_state(), sched.init_state()]
    interleaved = [[], []]
    for _ in range(12):
        for j in (1, 0):  # alternate, the second request first
            xs[j], states[j] = sched.step(schedule, states[j], model(xs[j]), xs[j])
            interleaved[j].append(xs[j])
    for j in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(interleaved[j], separate[j]))
    assert torch.equal(schedule.sigmas, sigmas_before) and torch.equal(schedule.timesteps, timesteps_before)


def test_step_returns_a_new_state_and_keeps_the_old_one():
    sched = scheduler_from_config(WAN_UNIPC)
    schedule, state0 = sched.schedule(5), sched.init_state()
    x = noise(0)
    model = fake_model(4, seed=0)
    x1, state1 = sched.step(schedule, state0, model(x), x)
    assert state0.step_index == 0 and state0.x0_history == () and state1.step_index == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        state1.step_index = 3
    # replaying from the old state gives the same result: nothing hidden was advanced
    x1_again, _ = sched.step(schedule, state0, model(x), x)
    assert torch.equal(x1, x1_again)


@pytest.mark.parametrize("raw", [WAN_UNIPC, EULER], ids=["unipc", "euler"])
def test_step_past_the_end_and_shape_mismatch_raise(raw):
    sched = scheduler_from_config(raw)
    schedule = sched.schedule(2)
    x = noise(0)
    with pytest.raises(ValueError, match="outside the 2-step schedule"):
        sched.step(schedule, sched.init_state(begin_index=2), x, x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(schedule, sched.init_state(), x[:1], x)


# ---------------------------------------------------------------- config and request checks


def test_registry_and_wrapper():
    assert set(SCHEDULERS) == {"UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"}
    unipc_sched = scheduler_from_config(WAN_UNIPC)
    assert unipc_sched.class_name == "UniPCMultistepScheduler"
    assert unipc_sched.config == UniPCConfig(flow_shift=3.0)
    euler = scheduler_from_config(EULER)
    assert euler.config == FlowMatchEulerConfig(shift=3.0) and euler.class_name == "FlowMatchEulerDiscreteScheduler"
    assert Scheduler(UniPCConfig()).family is SCHEDULERS["UniPCMultistepScheduler"]


@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler])
def test_configs_saved_by_diffusers_are_read(cls, tmp_path):
    """Every key diffusers writes for the supported setup is known (none trips the unknown-key check)."""
    kwargs = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 5.0}
    ref = cls(**kwargs) if cls is UniPCMultistepScheduler else cls(shift=5.0)
    ref.save_config(str(tmp_path / "scheduler"))
    sched = scheduler_from_config(tmp_path)  # a model folder: finds scheduler/scheduler_config.json
    assert sched.class_name == cls.__name__
    assert sched.schedule(7).shift == 5.0
    assert scheduler_from_config(tmp_path / "scheduler" / "scheduler_config.json").config == sched.config


def test_solver_type_aliases_follow_diffusers():
    assert scheduler_from_config(unipc(solver_type="midpoint")).config.solver_type == "bh2"
    assert reference(unipc(solver_type="midpoint")).config.solver_type == "bh2"


@pytest.mark.parametrize("class_name", ["DDIMScheduler", None, 3])
def test_unknown_class_name_lists_supported(class_name):
    raw = {**WAN_UNIPC, "_class_name": class_name}
    with pytest.raises(ValueError) as info:
        scheduler_from_config(raw)
    assert info.value.key == "_class_name"
    assert "UniPCMultistepScheduler" in str(info.value) and "FlowMatchEulerDiscreteScheduler" in str(info.value)


UNSUPPORTED = [
    (WAN_UNIPC, "use_flow_sigmas", False),
    (WAN_UNIPC, "prediction_type", "epsilon"),
    (WAN_UNIPC, "predict_x0", False),
    (WAN_UNIPC, "thresholding", True),
    (WAN_UNIPC, "use_karras_sigmas", True),
    (WAN_UNIPC, "use_exponential_sigmas", True),
    (WAN_UNIPC, "use_beta_sigmas", True),
    (WAN_UNIPC, "use_dynamic_shifting", True),
    (WAN_UNIPC, "shift_terminal", 0.1),
    (WAN_UNIPC, "solver_p", "DPMSolverMultistepScheduler"),
    (WAN_UNIPC, "solver_order", 4),
    (WAN_UNIPC, "solver_order", 0),
    (WAN_UNIPC, "solver_type", "bh3"),
    (WAN_UNIPC, "final_sigmas_type", "sigma_max"),
    (WAN_UNIPC, "lower_order_final", 1),
    (WAN_UNIPC, "disable_corrector", 0),
    (WAN_UNIPC, "disable_corrector", [-1]),
    (WAN_UNIPC, "flow_shift", 0.0),
    (WAN_UNIPC, "flow_shift", "5"),
    (WAN_UNIPC, "num_train_timesteps", 1),
    (WAN_UNIPC, "timestep_spacing", "middle"),
    (WAN_UNIPC, "some_future_option", True),
    (EULER, "use_dynamic_shifting", True),
    (EULER, "stochastic_sampling", True),
    (EULER, "invert_sigmas", True),
    (EULER, "shift_terminal", 0.1),
    (EULER, "use_karras_sigmas", True),
    (EULER, "use_exponential_sigmas", True),
    (EULER, "use_beta_sigmas", True),
    (EULER, "shift", -1.0),
    (EULER, "num_train_timesteps", 0),
    (EULER, "some_future_option", 1),
]


@pytest.mark.parametrize(
    "raw,key,value", UNSUPPORTED, ids=[f"{r['_class_name'][:5]}-{k}={v!r}" for r, k, v in UNSUPPORTED]
)
def test_unsupported_config_values_name_the_key(raw, key, value):
    with pytest.raises(ValueError) as info:
        scheduler_from_config({**raw, key: value})
    assert isinstance(info.value, SchedulerConfigError) and isinstance(info.value, ModelLoadError)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and "supported" in str(info.value)


def test_config_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**WAN_UNIPC, "thresholding": True}))
    with pytest.raises(SchedulerConfigError) as info:
        scheduler_from_config(path)
    assert info.value.file == str(path) and str(path) in str(info.value)
    with pytest.raises(ModelLoadError):
        scheduler_from_config(tmp_path / "missing")


@pytest.mark.parametrize("raw", [WAN_UNIPC, EULER], ids=["unipc", "euler"])
@pytest.mark.parametrize("n", [0, -3, 2.5, True, None])
def test_bad_num_inference_steps(raw, n):
    with pytest.raises(InvalidRequestError) as info:
        scheduler_from_config(raw).schedule(n)
    assert info.value.field == "num_inference_steps"


@pytest.mark.parametrize("raw", [WAN_UNIPC, EULER], ids=["unipc", "euler"])
@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf, "5", True])
def test_bad_shift_override(raw, shift):
    with pytest.raises(InvalidRequestError) as info:
        scheduler_from_config(raw).schedule(10, shift=shift)
    assert info.value.field == "shift"


def test_bad_begin_index():
    with pytest.raises(InvalidRequestError) as info:
        scheduler_from_config(WAN_UNIPC).init_state(-1)
    assert info.value.field == "begin_index"
