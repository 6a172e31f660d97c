"""Leases on a shared PostgreSQL queue are renewed by a heartbeat, not between units of work: a
live replica keeps its job through a unit longer than the lease."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from vidloom.serve.pg_store import PostgresJobStore
from vidloom.serve.scheduler import EngineLoop
from vidloom.serve.store import COMPLETED, QUEUED, Job


class SlowTask:
    """A task whose every unit takes ``unit_s`` seconds (a long VAE decode, say)."""

    def __init__(self, units: int):
        self.units, self.done, self.error = units, 0, None
        self.state = SimpleNamespace(value="denoising")
        self.result = None

    @property
    def is_finished(self) -> bool:
        return self.state.value in ("done", "failed", "cancelled")

    @property
    def progress(self) -> float:
        return self.done / self.units

    def cancel(self) -> None:
        self.state.value = "cancelled"


class SlowGenerator:
    def __init__(self, unit_s: float, units: int):
        self.unit_s, self.units = unit_s, units

    def submit(self, prompt, **sampling):
        return SlowTask(self.units)

    def step_quietly(self, task) -> None:
        time.sleep(self.unit_s)
        task.done += 1
        if task.done == task.units:
            task.state.value = "done"
            task.result = SimpleNamespace(frames=np.zeros((5, 32, 48, 3), np.float32), cache={})

    def step_many(self, tasks) -> list[int]:
        for task in tasks:
            self.step_quietly(task)
        return []


def test_a_unit_longer_than_the_lease_keeps_the_job(fresh_postgres, tmp_path):
    lease_s, unit_s = 1.0, 2.5
    mine, other = PostgresJobStore(fresh_postgres, lease_s=lease_s), PostgresJobStore(fresh_postgres, lease_s=lease_s)
    loop = EngineLoop(SlowGenerator(unit_s, units=2), mine, tmp_path, idle_wait_s=0.05)
    mine.add(Job(id="video_slow", status=QUEUED, model="m", prompt="p", seconds="1", size="48x32",
                 request={"prompt": "p", "fps": 16}, inputs={}, created_at=time.time()))
    loop.start()
    try:
        deadline = time.time() + 30
        while mine.get("video_slow").owner != loop.owner:  # taken by this replica first
            assert time.time() < deadline
            time.sleep(0.02)
        while (job := mine.get("video_slow")).status != COMPLETED:
            assert time.time() < deadline, job
            # the other replica looks for work all along: it must never find this job free
            assert other.claim("other-replica") is None
            time.sleep(0.1)
    finally:
        loop.stop()
        mine.close()
        other.close()
    assert job.attempts == 1 and job.owner == loop.owner


def test_a_job_whose_holders_keep_dying_fails_after_max_attempts(fresh_postgres):
    from vidloom.serve.store import FAILED, MAX_ATTEMPTS

    store = PostgresJobStore(fresh_postgres, lease_s=0.05)
    try:
        store.add(Job(id="video_crasher", status=QUEUED, model="m", prompt="p", seconds="1", size="48x32",
                      request={"prompt": "p"}, inputs={}, created_at=time.time()))
        for attempt in range(1, MAX_ATTEMPTS + 1):  # each replica that takes it dies holding it
            time.sleep(0.1)
            assert store.claim(f"replica-{attempt}").attempts == attempt
        time.sleep(0.1)
        assert store.claim("replica-next") is None
        job = store.get("video_crasher")
        assert job.status == FAILED and job.error_code == "too_many_attempts"
    finally:
        store.close()
