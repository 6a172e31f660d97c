"""The PostgreSQL job store (several replicas, one queue) on a real server: claims never collide
(SKIP LOCKED), a dead holder's lease is taken over, a job completes once; two ``vidloom serve``
replicas where the one holding a job is killed; and the database itself restarting under a
store and under a running server, or refusing a server at start-up."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import psycopg
import pytest

from vidloom.cli import main
from vidloom.serve.pg_store import PostgresJobStore
from vidloom.serve.store import Job, StoreUnavailable

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
        with contextlib.closing(PostgresJobStore(fresh_postgres)) as store:  # (its pool's threads stop)
            holder = store.get(long["id"]).owner
        victim = next(i for i, r in enumerate(replicas) if f"-{r.pid}-" in holder)
        os.kill(replicas[victim].pid, signal.SIGKILL)
        replicas[victim].wait(30)
        survivor = urls[1 - victim]
        others = [httpx.post(f"{survivor}/v1/videos", json={"prompt": f"after {i}", **small}).json() for i in range(2)]
        for j in (long, *others):
            assert wait(survivor, j["id"], lambda v: v["status"] in ("completed", "failed"), timeout=180)["status"] \
                == "completed"
        assert httpx.get(f"{survivor}/v1/videos/{long['id']}/content").status_code == 200
        with contextlib.closing(PostgresJobStore(fresh_postgres)) as store:
            record = store.get(long["id"])
        assert record.attempts == 2 and f"-{replicas[1 - victim].pid}-" in record.owner
    finally:
        for r in replicas:
            if r.poll() is None:
                r.terminate()
                r.wait(30)


def until(check, timeout: float):
    """``check()``'s first result that is not an exception, retrying for ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_a_database_restart_gives_store_unavailable_then_the_same_store_works_again(postgres_server):
    store = PostgresJobStore(postgres_server.dsn, lease_s=60)
    store.timeout_s = 1.0  # how long a call waits for the database: short, so the outage is quick to see
    store.add(job(1))
    assert store.claim("a").id == "video_0001"
    postgres_server.stop()
    calls = {"get": lambda: store.get("video_0001"), "add": lambda: store.add(job(2)),
             "claim": lambda: store.claim("b"), "renew": lambda: store.renew("a", ["video_0001"]),
             "complete": lambda: store.complete("video_0001", "a", "done.mp4"), "counts": store.counts}
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable) as raised:  # not psycopg's own error: the server maps it to 503
            call()
        message = str(raised.value)
        assert "\n" not in message and "pg-pass-1" not in message, (name, message)
    postgres_server.start()
    started = time.time()
    assert until(lambda: store.get("video_0001"), timeout=10).owner == "a"  # no new store: the same one
    assert time.time() - started < 10
    store.renew("a", ["video_0001"])
    assert store.complete("video_0001", "a", "done.mp4")
    assert not store.complete("video_0001", "a", "again.mp4")
    store.add(job(3))
    assert store.claim("b").id == "video_0003"
    done = store.get("video_0001")
    assert (done.status, done.output, done.attempts) == ("completed", "done.mp4", 1)
    store.close()


def test_dropped_connections_are_replaced_without_an_error(fresh_postgres):
    store = PostgresJobStore(fresh_postgres)
    store.add(job(1))
    for _ in range(3):  # the server ends every connection of the store (an admin, a proxy, a failover)
        with psycopg.connect(fresh_postgres, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                          "AND datname = current_database()")
        assert store.get("video_0001").status == "queued"
    assert store.claim("a").id == "video_0001"
    store.close()


def test_one_store_serves_the_engine_and_a_lease_heartbeat_at_once(fresh_postgres):
    """The engine thread and a heartbeat thread renewing its leases share one store; neither
    waits behind the other's statements (each runs on a connection of its own)."""
    store = PostgresJobStore(fresh_postgres, lease_s=30)
    for i in range(20):
        store.add(job(i))
    held, errors, stop = [], [], threading.Event()

    def heartbeat():
        while not stop.is_set():
            try:
                store.renew("a", list(held))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            time.sleep(0.01)

    beat = threading.Thread(target=heartbeat)
    slow = threading.Thread(target=store._execute, args=("SELECT pg_sleep(5)",))  # e.g. a long page of jobs
    beat.start()
    slow.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        while (claimed := store.claim("a")) is not None:
            held.append(claimed.id)
            store.set_progress(claimed.id, "a", 50)
            assert store.complete(claimed.id, "a", f"{claimed.id}.mp4")
            held.remove(claimed.id)
        assert time.monotonic() - started < 3.5  # not queued behind the slow statement
    finally:
        stop.set()
        beat.join()
        slow.join()
    assert not errors
    assert store.counts()["completed"] == 20
    store.close()


class _ReplyLost:
    """A connection whose next statement runs (and commits) but whose answer never arrives."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, *args, **kwargs):
        self._conn.execute(*args, **kwargs)
        raise psycopg.OperationalError("server closed the connection unexpectedly")


def test_a_statement_whose_answer_is_lost_takes_effect_once(fresh_postgres):
    store = PostgresJobStore(fresh_postgres)
    pooled = store._pool.connection
    losses = []

    @contextlib.contextmanager
    def connection(timeout=None):
        with pooled(timeout=timeout) as conn:
            yield _ReplyLost(conn) if losses and losses.pop() else conn

    store._pool.connection = connection
    losses.append(True)
    store.add(job(1))  # committed, then retried: not a duplicate-key error
    assert store.counts()["queued"] == 1
    losses.append(True)
    claimed = store.claim("a")  # the retry finds the job the first try took, rather than a second one
    assert claimed.id == "video_0001" and claimed.attempts == 1
    losses.append(True)
    assert store.complete("video_0001", "a", "done.mp4")  # went through: the caller keeps its file
    done = store.get("video_0001")
    assert (done.status, done.output, done.attempts) == ("completed", "done.mp4", 1)
    store.close()


def test_the_url_may_leave_everything_to_the_pg_variables(postgres_server, monkeypatch):
    """The password need not be on the command line (where ``ps`` shows it): libpq's PG*
    variables fill in whatever the URL leaves out."""
    for name, value in {"PGHOST": "127.0.0.1", "PGPORT": str(postgres_server.port), "PGUSER": "vidloom",
                        "PGPASSWORD": "pg-pass-1", "PGDATABASE": "postgres"}.items():
        monkeypatch.setenv(name, value)
    urls = ("postgresql://", "postgresql:///postgres", f"postgresql://127.0.0.1:{postgres_server.port}")
    for i, dsn in enumerate(urls):
        store = PostgresJobStore(dsn)
        store.add(job(i))
        assert store.get(f"video_{i:04d}") is not None
        store.close()
    monkeypatch.delenv("PGPASSWORD")
    passfile = postgres_server.root / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:*:vidloom:pg-pass-1\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    store = PostgresJobStore("postgresql://")
    assert store.counts()["queued"] == 3
    store.close()


def test_start_up_failures_are_one_line_errors_without_the_password(postgres_server, tiny_wan_dir, tmp_path,
                                                                     capsys):
    port = postgres_server.port
    url = f"vidloom:s3cret@127.0.0.1:{port}/postgres"  # the server's password is pg-pass-1: s3cret is wrong
    cases = [(f"postgresql://{url}", "password authentication failed"),
             (f"postgresql://nobody:s3cret@127.0.0.1:{port}/postgres", "password authentication failed"),
             (f"postgresql://{url}?sslmode=bogus", "sslmode"),
             (f"postgresql://{url}?nonsense=1", "nonsense"),
             (f"postgresql://{url.replace('s3cret', 's3cret%zz')}", "percent-encoded"),  # libpq quotes the part
             (f"mysql://{url}", "expected a postgresql:// URL"),
             (f"postgresql://{url}", "Connection refused")]  # the database is down for this one
    for i, (dsn, reason) in enumerate(cases):
        if i == len(cases) - 1:
            postgres_server.stop()
        code = main(["serve", "--model", str(tiny_wan_dir), "--dtype", "fp32", "--data-dir", str(tmp_path / "d"),
                     "--store", dsn])
        err = capsys.readouterr().err
        assert code == 2, (dsn, err)
        assert "s3cret" not in err, err
        error = err[err.find("error: "):]  # after the model's loading bar
        assert error.startswith("error: --store: ") and error.count("\n") == 1 and reason in error, err


@pytest.mark.slow
def test_a_database_restart_under_a_running_server(tiny_wan_dir, tmp_path, postgres_server, monkeypatch):
    """The database stops at once while the server runs a job, then starts again: the same server
    process goes on (no restart of its own), the job completes once, and new jobs are served."""
    monkeypatch.setenv("PGPASSWORD", "pg-pass-1")  # from the environment, not the command line
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a lease that outlasts the outage: the job stays this server's, so it runs once (attempts 1)
    extra = ["--store", f"postgresql://vidloom@127.0.0.1:{postgres_server.port}/postgres", "--lease-seconds", "120"]
    proc = start(tiny_wan_dir, tmp_path / "data", port, extra)
    try:
        small = {"size": "48x32", "num_frames": 9, "num_inference_steps": 2}
        running = httpx.post(f"{url}/v1/videos", json={"prompt": "through", **small, "num_inference_steps": 60}).json()
        wait(url, running["id"], lambda v: v["status"] == "in_progress" and v["progress"] >= 2)
        postgres_server.stop()
        time.sleep(4)  # the engine loop meets the outage: its store calls fail while the job is held
        assert proc.poll() is None
        postgres_server.start()
        observer = until(lambda: PostgresJobStore(postgres_server.dsn), timeout=10)
        deadline = time.time() + 120
        while (record := observer.get(running["id"])).status == "in_progress" and time.time() < deadline:
            time.sleep(0.2)
        assert (record.status, record.attempts, record.progress) == ("completed", 1, 100), record
        assert os.path.exists(record.output)
        assert proc.poll() is None
        after = until(lambda: httpx.post(f"{url}/v1/videos", json={"prompt": "after", **small}).raise_for_status(),
                      timeout=10).json()
        assert wait(url, after["id"], lambda v: v["status"] in ("completed", "failed"))["status"] == "completed"
        assert httpx.get(f"{url}/v1/videos/{running['id']}/content").status_code == 200
        observer.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "pg-pass-1" not in out + err
