"""The one model call: every transformer evaluation of the denoising loop goes through the stage's
``ModelCall``, told whose rows it computes, on every path (batched or split CFG, no guidance,
several requests in one forward, two experts); a call may refuse to share forwards; the
per-request policy state is made when a request's denoising begins, one per request."""

from __future__ import annotations

import pytest
import torch

from vidloom import VideoGenerator
from vidloom.pipelines.stages.model_call import COND, UNCOND, Rows

from ..numerics import rel_err

SIZE = dict(height=32, width=48, num_frames=5)


class CountingCall:
    """A plain forward that records the rows of every call (owners by identity)."""

    def __init__(self, inner, refuse: bool = False):
        self.inner, self.refuse = inner, refuse
        self.calls: list[tuple[Rows, int, torch.nn.Module]] = []

    def __call__(self, model, x, t, context_kv, rows):
        assert x.shape[0] == sum(rows.sizes)  # the rows are the forward's rows
        self.calls.append((rows, x.shape[0], model))
        return self.inner(model, x, t, context_kv, rows)

    def batch_key(self, batch, expert):
        return None if self.refuse else self.inner.batch_key(batch, expert)

    def exchanged(self, prediction, rows):
        return self.inner.exchanged(prediction, rows)

    @property
    def sizes(self) -> list[int]:
        """The batch size (rows) of every forward so far."""
        return [n for _, n, _ in self.calls]


@pytest.fixture
def counting(tiny_generator, monkeypatch):
    """The tiny generator's denoising stage with a counting call (restored after the test)."""
    stage = tiny_generator.pipeline.denoising
    call = CountingCall(stage.call)
    monkeypatch.setattr(stage, "call", call)
    return call


def run(gen, prompt="a cat", **kwargs):
    """A generation as a task, with the policy state its denoising phase had."""
    task = gen.submit(prompt, **{"seed": 3, "num_inference_steps": 3, **SIZE, **kwargs})
    gen.run(task)
    return task.result.frames, task.batch.policy_state


@pytest.mark.parametrize("batch_cfg,guidance,per_step", [
    (True, 5.0, [((COND, UNCOND), 2)]),
    (False, 5.0, [((COND,), 1), ((UNCOND,), 1)]),
    (True, 1.0, [((COND,), 1)]),  # guidance 1: no unconditional rows
])
def test_every_forward_of_one_request_goes_through_the_call(tiny_generator, counting, monkeypatch,
                                                            batch_cfg, guidance, per_step):
    stage = tiny_generator.pipeline.denoising
    monkeypatch.setattr(stage, "batch_cfg", batch_cfg)
    with monkeypatch.context() as m:
        m.setattr(stage, "call", counting.inner)
        plain, _ = run(tiny_generator, guidance_scale=guidance)
    frames, state = run(tiny_generator, guidance_scale=guidance)
    assert len(counting.calls) == 3 * len(per_step)
    for (rows, n, _), (branches, expected_rows) in zip(counting.calls, per_step * 3):
        assert rows.branches == branches and n == expected_rows
        assert all(owner is state for owner in rows.owners)
    assert torch.equal(torch.as_tensor(frames), torch.as_tensor(plain))


def run_together(gen, requests):
    tasks = [gen.submit(prompt, **{**SIZE, **kwargs}) for prompt, kwargs in requests]
    shared = []
    while not all(t.is_finished for t in tasks):
        shared += gen.step_many([t for t in tasks if not t.is_finished])
    assert all(t.state.value == "done" for t in tasks), [t.error for t in tasks]
    return tasks, shared


REQUESTS = [  # the first two share forwards; the third's latent shape differs
    ("a red circle", dict(seed=1, num_inference_steps=3, guidance_scale=4.0)),
    ("a blue square", dict(seed=2, num_inference_steps=3, guidance_scale=6.0, negative_prompt="blurry")),
    ("a cat", dict(seed=3, num_inference_steps=3, guidance_scale=3.0, height=48)),
]


def alone(gen, requests):
    return [gen.generate(prompt, **{**SIZE, **kwargs}).frames for prompt, kwargs in requests]


def test_step_many_goes_through_the_call_with_each_requests_rows(tiny_generator, counting, monkeypatch):
    expected = alone(tiny_generator, REQUESTS)
    with monkeypatch.context() as m:
        m.setattr(tiny_generator.pipeline.denoising, "call", counting.inner)
        plain, _ = run_together(tiny_generator, REQUESTS)
    counting.calls.clear()
    tasks, shared = run_together(tiny_generator, REQUESTS)
    states = [t.batch.policy_state for t in tasks]
    assert len({id(s) for s in states}) == 3  # one state per request
    assert shared == [2, 2]  # steps 2 and 3 of the first two requests: one forward each
    joint = [rows for rows, _, _ in counting.calls if len(set(map(id, rows.owners))) > 1]
    assert len(joint) == 2
    for rows in joint:
        assert [id(o) for o in rows.owners] == [id(states[0])] * 2 + [id(states[1])] * 2
        assert rows.branches == (COND, UNCOND, COND, UNCOND)
    # every forward: 3 steps of each request, the shared ones once for two requests
    assert len(counting.calls) == 3 * 3 - 2
    for task, plain_task, frames in zip(tasks, plain, expected):
        assert torch.equal(torch.as_tensor(task.result.frames), torch.as_tensor(plain_task.result.frames))
        assert rel_err(task.result.frames, frames) <= 1e-4  # alone: test_step_many's tolerance (summation order)


def test_a_call_that_refuses_to_share_runs_each_request_alone(tiny_generator, counting, monkeypatch):
    requests = REQUESTS[:2]
    expected = alone(tiny_generator, requests)
    monkeypatch.setattr(counting, "refuse", True)
    counting.calls.clear()
    tasks, shared = run_together(tiny_generator, requests)
    assert shared == []
    assert len(counting.calls) == 6
    assert all(len(set(map(id, rows.owners))) == 1 for rows, _, _ in counting.calls)
    for task, frames in zip(tasks, expected):
        assert torch.equal(torch.as_tensor(task.result.frames), torch.as_tensor(frames))


def test_policy_state_is_made_when_denoising_begins(tiny_generator):
    tasks = [tiny_generator.submit(p, seed=1, num_inference_steps=2, **SIZE) for p in ("a cat", "a dog")]
    assert all(t.batch.policy_state is None for t in tasks)
    while all(t.batch.policy_state is None for t in tasks):
        for t in tasks:
            tiny_generator.step(t)
    first, second = (t.batch.policy_state for t in tasks)
    assert first is not None and second is not None and first is not second
    assert first.values == {} and second.values == {}
    for t in tasks:
        tiny_generator.run(t)
    assert tasks[0].batch.policy_state is first  # the same one for the whole phase


@pytest.fixture(scope="module")
def two_experts(tiny_wan_pipe, tmp_path_factory):
    """A Wan2.2-style folder: the tiny transformer for high noise, a second one below 0.6."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path_factory.mktemp("two_expert_call")
    torch.manual_seed(1)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    WanPipeline(**parts, transformer_2=WanTransformer3DModel(**tiny.TINY_TRANSFORMER),
                boundary_ratio=0.6).save_pretrained(str(folder))
    return VideoGenerator.from_pretrained(folder, dtype="fp32")


def test_two_experts_each_go_through_the_call(two_experts, monkeypatch):
    gen = two_experts
    stage = gen.pipeline.denoising
    plain, _ = run(gen, num_inference_steps=4)
    call = CountingCall(stage.call)
    monkeypatch.setattr(stage, "call", call)
    frames, state = run(gen, num_inference_steps=4)
    experts = [m for _, _, m in call.calls]
    assert len(experts) == 4
    components = gen.pipeline.components
    assert experts[0] is components["transformer"] and experts[-1] is components["transformer_2"]
    names = {id(components["transformer"]): "transformer", id(components["transformer_2"]): "transformer_2"}
    assert [rows.expert for rows, _, _ in call.calls] == [names[id(m)] for m in experts]  # rows name their expert
    assert all(owner is state for rows, _, _ in call.calls for owner in rows.owners)
    assert torch.equal(torch.as_tensor(frames), torch.as_tensor(plain))


def test_two_experts_step_many_shares_forwards_per_expert(two_experts, monkeypatch):
    gen = two_experts
    stage = gen.pipeline.denoising
    requests = [("a cat", dict(seed=1, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0)),
                ("a dog", dict(seed=2, num_inference_steps=4, guidance_scale=5.0))]
    call = CountingCall(stage.call)
    monkeypatch.setattr(stage, "call", call)
    expected = alone(gen, requests)
    per_step = [m for _, _, m in call.calls[:4]]  # the expert of each of the four steps
    assert per_step[0] is not per_step[-1]
    call.calls.clear()
    tasks, shared = run_together(gen, requests)
    assert shared == [2, 2, 2]  # steps 2 to 4 of both requests, each on that step's expert
    joint = [(rows, m) for rows, _, m in call.calls if len(set(map(id, rows.owners))) > 1]
    assert [m for _, m in joint] == per_step[1:]
    assert all(rows.owners == (tasks[0].batch.policy_state,) * 2 + (tasks[1].batch.policy_state,) * 2
               for rows, _ in joint)
    for task, frames in zip(tasks, expected):
        assert rel_err(task.result.frames, frames) <= 1e-4


class FailsOnce:
    """A call that fails once, on its ``at``-th forward, as an out-of-memory error would."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.count = inner, at, 0

    def __call__(self, model, x, t, context_kv, rows):
        self.count += 1
        if self.count == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.inner(model, x, t, context_kv, rows)

    def batch_key(self, batch, expert):
        return self.inner.batch_key(batch, expert)

    def exchanged(self, prediction, rows):
        return self.inner.exchanged(prediction, rows)


def test_a_denoising_step_that_fails_can_be_run_again(tiny_generator, monkeypatch):
    """The unit runner assigns a batch's fields only when its unit succeeds: after a failed step the
    batch is as before, and running the step again gives the video of an uninterrupted run."""
    from vidloom.pipelines.base import run_units

    kwargs = dict(seed=5, num_inference_steps=3, **SIZE)
    expected = tiny_generator.generate("a cat", **kwargs).frames
    stage, pipe = tiny_generator.pipeline.denoising, tiny_generator.pipeline
    monkeypatch.setattr(stage, "call", FailsOnce(stage.call, at=2))
    batch, cursor, failures = tiny_generator.submit("a cat", **kwargs).batch, (0, 0), 0
    while (unit := pipe.unit_at(batch, cursor)) is not None:
        before = {name: getattr(batch, name) for name in ("latents", "scheduler_state", "step_index", "context_kv")}
        [result] = run_units([unit], [batch])
        if isinstance(result, Exception):
            assert isinstance(result, torch.OutOfMemoryError) and unit.stage is stage and unit.index == 1
            assert all(getattr(batch, name) is value for name, value in before.items())
            failures += 1
            continue  # the same unit again
        batch, cursor = result, unit.next_cursor
    assert failures == 1
    frames = batch.video[0].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3), as VideoOutput.frames
    assert torch.equal(torch.as_tensor(frames), torch.as_tensor(expected))


@pytest.mark.parametrize("rank,branch", [(0, COND), (1, UNCOND)])
def test_cfg_parallel_rank_calls_with_its_own_branch(tiny_generator, counting, monkeypatch, rank, branch):
    """Under CFG parallelism a rank's one forward is its branch's rows (the exchange with the
    partner is stood in for here; tests/distributed compares the videos across processes)."""
    from vidloom.parallel.cfg import CFGParallel

    class Alone(CFGParallel):
        def exchange(self, mine):
            return mine, mine

    stage = tiny_generator.pipeline.denoising
    task = tiny_generator.submit("a cat", seed=1, num_inference_steps=2, **SIZE)
    while task.batch.policy_state is None:
        tiny_generator.step(task)
    monkeypatch.setattr(stage, "cfg", Alone(None, rank))
    counting.calls.clear()
    stage.predict(task.batch, task.batch.timestep(task.batch.step_index))
    [(rows, n, _)] = counting.calls
    assert rows.branches == (branch,) and n == 1 and rows.owners == (task.batch.policy_state,)
