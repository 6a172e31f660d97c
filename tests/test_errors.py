"""Errors by type: what torch and the allocators raise when memory runs out becomes the engine's
ResourceExhausted, so callers (the server) map errors by type, never by message text."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from vidloom.errors import InvalidRequestError, ResourceExhausted, engine_error


def test_out_of_memory_errors_become_resource_exhausted():
    try:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator refuses: a plain RuntimeError
    except RuntimeError as exc:
        cpu = exc
    for raised in (cpu, MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")):
        error = engine_error(raised)
        assert isinstance(error, ResourceExhausted) and isinstance(error, MemoryError)
        assert error.__cause__ is raised and "out of memory" in str(error)
    for other in (RuntimeError("shape mismatch"), ValueError("x"), InvalidRequestError("seed", "got -1")):
        assert engine_error(other) is other
    # a message that only mentions memory is not an allocator's error
    assert engine_error(RuntimeError("out of memory, said the model")).__class__ is RuntimeError


class FailingGenerator:
    """Tasks whose first unit fails with ``error``."""

    def __init__(self, error):
        self.error = error

    def submit(self, prompt, **sampling):
        return SimpleNamespace(state=SimpleNamespace(value="denoising"), is_finished=False, progress=0.0,
                               error=None, cancel=lambda: None, result=None)

    def step_many(self, tasks):
        for task in tasks:
            task.state.value, task.error, task.is_finished = "failed", self.error, True
        return []


@pytest.mark.parametrize("error, code", [(MemoryError(), "out_of_memory"),
                                         (torch.OutOfMemoryError("CUDA out of memory"), "out_of_memory"),
                                         (RuntimeError("out of memory, said the model"), "generation_failed")])
def test_the_server_names_a_failure_by_its_type(tmp_path, error, code):
    from vidloom.serve.scheduler import EngineLoop
    from vidloom.serve.store import FAILED, QUEUED, Job, SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.add(Job(id="video_x", status=QUEUED, model="m", prompt="p", seconds="1", size="48x32",
                  request={"prompt": "p"}, inputs={}, created_at=time.time()))
    loop = EngineLoop(FailingGenerator(error), store, tmp_path, idle_wait_s=0.01)
    loop._fill()
    loop._advance_all()
    job = store.get("video_x")
    store.close()
    assert job.status == FAILED and job.error_code == code, job


def test_a_task_that_runs_out_of_memory_fails_with_resource_exhausted(tiny_generator, monkeypatch):
    """Raised at the source: a unit whose model call runs out of memory leaves ResourceExhausted on
    the task (the torch error as its cause), through step and through step_many alike."""
    from vidloom.generator import TaskState

    stage = tiny_generator.pipeline.denoising
    inner = stage.call

    def out_of_memory(expert, x, t, context_kv, rows):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (injected)")

    monkeypatch.setattr(stage, "call", type("OOM", (), {"__call__": staticmethod(out_of_memory),
                                                        "batch_key": staticmethod(inner.batch_key)})())
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
    with pytest.raises(ResourceExhausted) as info:
        tiny_generator.generate("a cat", **kwargs)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    tasks = [tiny_generator.submit(f"a cat {i}", seed=i, **kwargs) for i in range(2)]
    while not all(t.is_finished for t in tasks):
        tiny_generator.step_many(tasks)
    assert all(t.state == TaskState.FAILED and isinstance(t.error, ResourceExhausted) for t in tasks)
    monkeypatch.undo()
    assert tiny_generator.generate("a cat", **kwargs).frames.shape == (5, 32, 48, 3)  # the engine is still usable
