"""Several tasks' denoising steps in one transformer forward (``VideoGenerator.step_many``): each
task gets the video it gets alone (fp32, relative error <= 1e-4 over the whole video; measured
<= 6.3e-7 with 4 tasks), whatever its prompt, seed, guidance and step count."""

from __future__ import annotations

import pytest
import torch

from vidloom.pipelines.stages import DenoisingStage

from ..numerics import rel_err

SIZE = dict(height=32, width=48, num_frames=9)


def run_together(gen, requests):
    tasks = [gen.submit(prompt, **kwargs) for prompt, kwargs in requests]
    while not all(t.is_finished for t in tasks):
        gen.step_many([t for t in tasks if not t.is_finished])
    return tasks


@pytest.mark.parametrize("count", [2, 4])
def test_batched_steps_equal_each_task_alone(tiny_generator, monkeypatch, count):
    requests = [
        ("a red circle moving left", dict(seed=1, num_inference_steps=4, guidance_scale=4.0, **SIZE)),
        ("a blue square", dict(seed=2, num_inference_steps=6, guidance_scale=6.0, negative_prompt="blurry", **SIZE)),
        ("a green triangle moving up quickly", dict(seed=3, num_inference_steps=5, guidance_scale=1.0, **SIZE)),
        ("a cat", dict(seed=4, num_inference_steps=4, guidance_scale=3.0, **SIZE)),
    ][:count]
    alone = [tiny_generator.generate(prompt, **kwargs).frames for prompt, kwargs in requests]
    sizes = []
    original = DenoisingStage.step_many

    def record(self, batches, indices):
        sizes.append(len(batches))
        return original(self, batches, indices)

    monkeypatch.setattr(DenoisingStage, "step_many", record)
    tasks = run_together(tiny_generator, requests)
    assert all(t.state.value == "done" for t in tasks), [t.error for t in tasks]
    assert max(sizes) >= 2  # steps really were shared
    for task, expected in zip(tasks, alone):
        assert rel_err(task.result.frames, expected) <= 1e-4


def test_a_failing_task_fails_alone(tiny_generator):
    requests = [("a cat", dict(seed=1, num_inference_steps=4, **SIZE)), ("a dog", dict(seed=2, num_inference_steps=4, **SIZE))]
    tasks = [tiny_generator.submit(p, **k) for p, k in requests]
    while not all(t.batch.step_index >= 1 and t.state.value == "denoising" for t in tasks):
        tiny_generator.step_many(tasks)  # past the first step (run alone), into the shared ones
    tasks[1].batch.latents[:] = float("nan")  # this task's latents break
    while not all(t.is_finished for t in tasks):
        tiny_generator.step_many([t for t in tasks if not t.is_finished])
    assert tasks[0].state.value == "done"
    assert tasks[1].state.value == "failed" and "NaN" in str(tasks[1].error)
    expected = tiny_generator.generate("a cat", seed=1, num_inference_steps=4, **SIZE).frames
    assert rel_err(tasks[0].result.frames, expected) <= 1e-4
