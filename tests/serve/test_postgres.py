"""The PostgreSQL job store (several replicas, one queue) on a real server: claims never collide
(SKIP LOCKED), a dead holder's lease is taken over, a job completes once; and two ``vidloom
serve`` replicas where the one holding a job is killed."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from vidloom.serve.pg_store import PostgresJobStore
from vidloom.serve.store import Job

from .test_api import free_port
from .test_crash import start, wait


def job(i: int) -> Job:
    return Job(id=f"video_{i:04d}", status="queued", model="m", prompt=f"p{i}", seconds="1", size="8x8",
               request={"prompt": f"p{i}"}, inputs={}, created_at=time.time())


def test_two_replicas_never_claim_the_same_job(fresh_postgres):
    stores = [PostgresJobStore(fresh_postgres) for _ in range(2)]
    for i in range(40):
        stores[0].add(job(i))
    claimed = {0: [], 1: []}

    def drain(k):
        while (j := stores[k].claim(f"replica-{k}")) is not None:
            claimed[k].append(j.id)

    threads = [threading.Thread(target=drain, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == [f"video_{i:04d}" for i in range(40)]
    assert stores[1].counts()["in_progress"] == 40
    for s in stores:
        s.close()


def test_an_expired_lease_is_taken_over_and_the_job_completes_once(fresh_postgres):
    a, b = PostgresJobStore(fresh_postgres, lease_s=0.5), PostgresJobStore(fresh_postgres, lease_s=0.5)
    a.add(job(1))
    assert a.claim("a").id == "video_0001"
    assert b.claim("b") is None  # held
    a.renew("a", ["video_0001"])
    time.sleep(0.3)
    assert b.claim("b") is None  # renewed: still held
    time.sleep(0.7)
    taken = b.claim("b")  # a stopped renewing: dead
    assert taken.id == "video_0001" and taken.attempts == 2 and taken.owner == "b"
    assert not a.complete("video_0001", "a", "late.mp4")  # the old holder finishing late changes nothing
    assert b.complete("video_0001", "b", "done.mp4")
    assert not b.complete("video_0001", "b", "again.mp4")
    done = a.get("video_0001")
    assert (done.status, done.output, done.attempts) == ("completed", "done.mp4", 2)
    a.close()
    b.close()


@pytest.mark.slow
def test_killing_the_replica_that_holds_a_job(tiny_wan_dir, tmp_path, fresh_postgres):
    data = tmp_path / "shared"
    ports = [free_port(), free_port()]
    # the lease outlasts any stall of a live replica's loop on a loaded 2-core machine (its first
    # forward, a neighbour test's burst): only the kill may hand the job over (attempts == 2)
    extra = ["--store", fresh_postgres, "--lease-seconds", "6"]
    replicas = [start(tiny_wan_dir, data, port, extra) for port in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        small = {"size": "48x32", "num_frames": 9, "num_inference_steps": 2}
        long = httpx.post(f"{urls[0]}/v1/videos", json={"prompt": "long", **small, "num_inference_steps": 400}).json()
        wait(urls[1], long["id"], lambda v: v["status"] == "in_progress" and v["progress"] >= 3)
        holder = PostgresJobStore(fresh_postgres).get(long["id"]).owner
        victim = next(i for i, r in enumerate(replicas) if f"-{r.pid}-" in holder)
        os.kill(replicas[victim].pid, signal.SIGKILL)
        replicas[victim].wait(30)
        survivor = urls[1 - victim]
        others = [httpx.post(f"{survivor}/v1/videos", json={"prompt": f"after {i}", **small}).json() for i in range(2)]
        for j in (long, *others):
            assert wait(survivor, j["id"], lambda v: v["status"] in ("completed", "failed"), timeout=180)["status"] \
                == "completed"
        assert httpx.get(f"{survivor}/v1/videos/{long['id']}/content").status_code == 200
        record = PostgresJobStore(fresh_postgres).get(long["id"])
        assert record.attempts == 2 and f"-{replicas[1 - victim].pid}-" in record.owner
    finally:
        for r in replicas:
            if r.poll() is None:
                r.terminate()
                r.wait(30)
