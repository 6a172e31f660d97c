"""``vidloom serve`` as real processes under real faults: a second server on the same data
folder, SIGTERM in the middle of a job, a data folder on a small filesystem that fills up, a
store that cannot be opened, and a job that keeps ending its server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from vidloom import cli
from vidloom.serve.store import FAILED, IN_PROGRESS, MAX_ATTEMPTS, QUEUED, Job, SQLiteJobStore

from ..filesystems import fill, tmpfs
from .test_api import free_port
from .test_crash import start, wait

SMALL = {"size": "48x32", "num_frames": 9, "num_inference_steps": 2}


def _job(job_id: str) -> Job:
    return Job(id=job_id, status=QUEUED, model="m", prompt="p", seconds="1", size="48x32", request={"prompt": "p"},
               inputs={}, created_at=time.time())


def test_a_second_server_on_the_same_data_folder_is_refused(tiny_wan_dir, tmp_path):
    data, port = tmp_path / "data", free_port()
    first = start(tiny_wan_dir, data, port)
    try:
        second = subprocess.run([sys.executable, "-m", "vidloom", "serve", "--model", str(tiny_wan_dir), "--port",
                                 str(free_port()), "--data-dir", str(data)], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {first.pid}" in lines[0], second.stderr
        assert first.poll() is None and httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        first.terminate()
        first.wait(60)


def test_sigterm_finishes_the_unit_and_hands_the_job_back(tiny_wan_dir, tmp_path):
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tiny_wan_dir, data, port)
    try:
        job = httpx.post(f"{url}/v1/videos", json={"prompt": "long", **SMALL, "num_inference_steps": 400}).json()
        wait(url, job["id"], lambda v: v["status"] == "in_progress" and v["progress"] >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0  # drained, not killed
    finally:
        if proc.poll() is None:
            proc.kill()
    store = SQLiteJobStore(data / "jobs.sqlite3")
    row = store.get(job["id"])
    assert (row.status, row.owner, row.attempts) == (QUEUED, None, 0)  # back in the queue, no attempt spent
    store.close()
    proc = start(tiny_wan_dir, data, port)
    try:
        # cancel the long one; a short job after it shows the restarted server took the queue up again
        httpx.post(f"{url}/v1/videos/{job['id']}/cancel")
        short = httpx.post(f"{url}/v1/videos", json={"prompt": "short", **SMALL}).json()
        assert wait(url, short["id"], lambda v: v["status"] in ("completed", "failed"))["status"] == "completed"
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_job_that_keeps_ending_its_server_fails_after_max_attempts(tmp_path):
    """Each claim is one start; each reopen of the store after a crash puts the job back in the queue,
    until it has been started MAX_ATTEMPTS times: then it fails with its reason."""
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    store.add(_job("video_crasher"))
    store.close()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        store = SQLiteJobStore(path)
        store.recover()
        assert store.get("video_crasher").status == QUEUED
        claimed = store.claim("server")
        assert claimed.attempts == attempt
        store.close()  # the server dies holding it
    store = SQLiteJobStore(path)
    store.recover()
    job = store.get("video_crasher")
    assert job.status == FAILED and job.error_code == "too_many_attempts" and str(MAX_ATTEMPTS) in job.error_message
    assert store.claim("server") is None
    store.close()


def test_start_up_failures_are_one_line_errors(tiny_wan_dir, tmp_path, capsys):
    def serve(data_dir) -> str:
        code = cli.main(["serve", "--model", str(tiny_wan_dir), "--port", str(free_port()), "--data-dir",
                         str(data_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --data-dir "), err
        return err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    assert "jobs.sqlite3" in serve(corrupt)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    serve(a_file)
    with tmpfs(tmp_path / "readonly", 1, read_only=True) as readonly:
        serve(readonly)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 24 MB tmpfs: room for the store and a few tiny videos, and easy to fill."""
    with tmpfs(tmp_path / "small", 24) as root:
        yield root


@pytest.mark.slow
def test_a_full_disk_loses_no_job(tiny_wan_dir, small_filesystem):
    """The data folder fills up while a job runs: the job is not failed or lost but waits (still in
    progress), creates are refused with 507/503 or accepted (never a 500), and once space is freed
    the job completes, once."""
    data, port = small_filesystem / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tiny_wan_dir, data, port)
    try:
        job = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", **SMALL, "num_inference_steps": 20}).json()
        wait(url, job["id"], lambda v: v["status"] == "in_progress")
        filler = fill(small_filesystem)
        statuses = set()
        deadline = time.time() + 15  # the job finishes denoising (a fraction of this) while the disk is full
        while time.time() < deadline:
            r = httpx.post(f"{url}/v1/videos", json={"prompt": "during", **SMALL}, timeout=30)
            statuses.add(r.status_code)
            if r.status_code != 200:
                assert r.headers["retry-after"] and r.json()["error"]["code"] in ("insufficient_storage",
                                                                                  "store_unavailable")
            video = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=30).json()
            assert video["status"] == IN_PROGRESS, video  # neither failed nor completed without its file
            time.sleep(0.5)
        assert statuses <= {200, 503, 507}, statuses
        filler.unlink()
        done = wait(url, job["id"], lambda v: v["status"] in ("completed", "failed"))
        assert done["status"] == "completed", done
        assert httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    store = SQLiteJobStore(data / "jobs.sqlite3")
    assert store.get(job["id"]).attempts == 1
    store.close()
    assert [p.name for p in (data / "videos").iterdir() if p.name.startswith(job["id"])] == [f"{job['id']}.1.mp4"]
