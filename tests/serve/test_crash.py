"""Durability: ``kill -9`` of ``vidloom serve`` in the middle of a job, then a restart on the same
data folder: every accepted job completes, exactly once, and finished ones are not run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from vidloom.serve.store import SQLiteJobStore

from .test_api import free_port

STARTUP_S = 120


def start(model_dir, data_dir, port, extra=()):
    proc = subprocess.Popen([sys.executable, "-m", "vidloom", "serve", "--model", str(model_dir), "--port", str(port),
                             "--data-dir", str(data_dir), "--dtype", "fp32", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + STARTUP_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)


def wait(url, video_id, done, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        video = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()
        if done(video):
            return video
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting on {video_id}: {video}")


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_completes_every_job_once(tiny_wan_dir, tmp_path):
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tiny_wan_dir, data, port)
    try:
        small = {"size": "48x32", "num_frames": 9, "num_inference_steps": 2}
        first = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", **small}).json()
        first = wait(url, first["id"], lambda v: v["status"] == "completed")
        long = httpx.post(f"{url}/v1/videos", json={"prompt": "a long one", **small, "num_inference_steps": 400}).json()
        queued = [httpx.post(f"{url}/v1/videos", json={"prompt": f"after {i}", **small}).json() for i in range(2)]
        wait(url, long["id"], lambda v: v["status"] == "in_progress" and v["progress"] >= 5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    store = SQLiteJobStore(data / "jobs.sqlite3")
    assert store.get(long["id"]).status == "in_progress"  # left behind by the killed process
    store.close()

    proc = start(tiny_wan_dir, data, port)
    try:
        for job in (long, *queued):
            assert wait(url, job["id"], lambda v: v["status"] in ("completed", "failed"))["status"] == "completed"
        assert httpx.get(f"{url}/v1/videos/{first['id']}").json()["completed_at"] == first["completed_at"]
        listed = httpx.get(f"{url}/v1/videos", params={"limit": 100}).json()["data"]
        assert sorted(v["id"] for v in listed) == sorted(j["id"] for j in (first, long, *queued))
        for job in (first, long, *queued):
            assert httpx.get(f"{url}/v1/videos/{job['id']}/content").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    store = SQLiteJobStore(data / "jobs.sqlite3")
    assert store.get(first["id"]).attempts == 1  # finished before the kill: not run again
    assert store.get(long["id"]).attempts == 2  # run again from its beginning after the restart
    assert all(store.get(j["id"]).status == "completed" for j in (first, long, *queued))
    store.close()
    videos = sorted(p.name.split(".")[0] for p in (data / "videos").iterdir())
    assert videos == sorted(j["id"] for j in (first, long, *queued))  # one file each, no leftovers


@pytest.mark.slow
def test_serving_from_two_processes_with_sp2(tiny_wan_dir, tmp_path, tiny_generator):
    """``vidloom serve --nproc 2 --sp-size 2``: rank 0 serves HTTP and the queue, both ranks share
    every forward; two concurrent jobs come out as one process makes them."""
    import numpy as np

    from vidloom.io import export_video

    from .test_api import decode_mp4

    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tiny_wan_dir, data, port, ["--nproc", "2", "--sp-size", "2"])
    try:
        body = {"size": "48x48", "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 4.0}
        jobs = [httpx.post(f"{url}/v1/videos", json={"prompt": f"a shape {i}", "seed": i, **body}).json()
                for i in range(2)]
        for job in jobs:
            assert wait(url, job["id"], lambda v: v["status"] in ("completed", "failed"))["status"] == "completed"
            served = np.stack(decode_mp4(httpx.get(f"{url}/v1/videos/{job['id']}/content").content)).astype(np.float32)
            alone = tiny_generator.generate(job["prompt"], seed=int(job["prompt"][-1]), height=48, width=48,
                                            num_frames=9, num_inference_steps=3, guidance_scale=4.0).frames
            path = tmp_path / f"{job['id']}.mp4"
            export_video(alone, path, fps=16)
            reference = np.stack(decode_mp4(path.read_bytes())).astype(np.float32)
            assert np.abs(served - reference).mean() <= 0.5  # the same frames (to fp32 rounding), same encoder
    finally:
        proc.terminate()
        proc.wait(60)
