"""The task API on CUDA: interleaved tasks give what each gives alone, cancel stops a task.

Equality is bit-exact: the interleaved and the lone runs launch the same kernels on the same
shapes on one device and one stream, and every kernel on this path is deterministic in the
forward direction (cuBLAS guarantees run-to-run identical results for a given GPU model and
toolkit; SDPA's flash / memory-efficient forward kernels and cuDNN's forward convolutions with
benchmark mode off pick the same algorithm for the same shapes and use no atomics). The tasks
share only read-only modules (and the DiT's rotary cache, which is keyed by the token grid), so a
difference would mean state leaking between tasks. The relative error is in the message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .common import DEVICE, rel_err, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
OTHER_SIZE = dict(height=48, width=64, num_frames=9, num_inference_steps=2)  # another token grid


@pytest.fixture(scope="module")
def gen(tiny_wan_dir):
    from vidloom import VideoGenerator

    return VideoGenerator.from_pretrained(tiny_wan_dir, device=DEVICE, dtype="fp32")


def same(a, b) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a, b), f"not bit-exact: rel err {rel_err(a, b):.2e}"


def test_interleaved_tasks_equal_separate_runs(gen):
    seen_devices = set()

    def callback(step, total, timestep, latents):
        seen_devices.add(latents.device.type)

    requests = {
        "a": ("a red ball", dict(seed=4, **SMALL)),
        "b": ("a blue cube", dict(seed=5, guidance_scale=2.0, **SMALL)),
        "c": ("a green star", dict(seed=6, **OTHER_SIZE)),
    }
    tasks = {k: gen.submit(p, callback=callback, **kw) for k, (p, kw) in requests.items()}
    while not all(t.is_finished for t in tasks.values()):
        for t in tasks.values():
            gen.step(t)
    assert seen_devices == {DEVICE}
    for key, (prompt, kwargs) in requests.items():
        task = tasks[key]
        assert task.state.value == "done", (key, task.state, task.error)
        alone = gen.generate(prompt, **kwargs)
        same(task.result.frames, alone.frames)
        assert task.result.latents.device.type == DEVICE
        same(task.result.latents.cpu().numpy(), alone.latents.cpu().numpy())


def test_cancel(gen):
    from vidloom import TaskCancelled, TaskState

    task = gen.submit("a fox", **SMALL)
    gen.step(task)
    gen.step(task)
    task.cancel()
    gen.step(task)
    assert task.state == TaskState.CANCELLED and task.is_finished and task.result is None
    with pytest.raises(TaskCancelled):
        gen.run(task)
    # a task cancelled mid-denoising leaves the generator usable on the device
    mid = gen.submit("a fox", **SMALL)
    while mid.status != "denoising 1/3":
        assert not mid.is_finished, mid.status
        gen.step(mid)
    mid.cancel()
    gen.step(mid)
    assert mid.state == TaskState.CANCELLED
    out = gen.generate("a fox", **SMALL)
    assert out.frames.shape == (5, 32, 48, 3) and np.isfinite(out.frames).all()
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # an asynchronous kernel error would surface here
