"""The durable job store of ``vidloom serve``: SQLite in the data folder (embedded, nothing to
start), or PostgreSQL shared by several server replicas (``pg_store``).

A job is committed before the server answers 2xx, so an accepted job is never lost. A job is
claimed by one engine loop at a time (``owner``); after a crash the jobs left ``in_progress`` go
back to the queue when the store is opened again (``recover``) and run again from their
beginning. Completing a job is one conditional update (it must still be in progress and held by
the caller), so a job is completed at most once.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

# what the OpenAI Videos API calls the states (a cancelled job is "failed" with code "cancelled")
QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)


class StoreUnavailable(Exception):
    """The job store cannot be reached or written now (database down, disk full, locked): the
    server answers 503 with ``Retry-After`` and keeps what it has not recorded yet."""

# the jobs table; REAL is each database's double (SQLite REAL, PostgreSQL DOUBLE PRECISION)
COLUMNS_SQL = """
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    request TEXT NOT NULL,
    inputs TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    progress INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    output TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0"""


def schema(seq: str, real: str = "REAL") -> str:
    """The jobs table and its index, with the database's auto-increment key and double type."""
    return (f"CREATE TABLE IF NOT EXISTS jobs (\n    seq {seq},{COLUMNS_SQL.replace(' REAL', ' ' + real)}\n);\n"
            "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);\n")


SCHEMA = schema("INTEGER PRIMARY KEY AUTOINCREMENT")


@dataclasses.dataclass
class Job:
    """One video job, as stored. ``request``: the SamplingParams fields (JSON-safe); ``inputs``:
    uploaded files by request field (``image``, ``last_image``) -> their path in the data folder."""

    id: str
    status: str
    model: str
    prompt: str
    seconds: str
    size: str
    request: dict[str, Any]
    inputs: dict[str, str]
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    progress: int = 0
    error_code: str | None = None
    error_message: str | None = None
    output: str | None = None
    attempts: int = 0
    owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    seq: int | None = None


_COLUMNS = [f.name for f in dataclasses.fields(Job)]


class JobStore:
    """The queue's operations in SQL both databases take (``?`` placeholders); a subclass runs
    them (``_execute``, ``_transaction``) and claims (``claim``)."""

    lease_s: float = 0.0  # > 0: a claim holds a job this long unless renewed (several replicas)

    def _execute(self, sql: str, args: tuple | list = (), fetch: str | None = None):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- writes ----------------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        row = dataclasses.asdict(job)
        row.pop("seq")
        row["request"], row["inputs"] = json.dumps(job.request), json.dumps(job.inputs)
        row["cancel_requested"] = int(job.cancel_requested)
        names = ", ".join(row)
        self._execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        return job

    def recover(self) -> int:
        """Jobs left in progress by a process that died go back to the queue; returns how many.
        (With leases, a store shared by replicas leaves this to the lease expiry instead.)"""
        if self.lease_s:
            return 0
        return self._execute("UPDATE jobs SET status = ?, owner = NULL, progress = 0 WHERE status = ?",
                             (QUEUED, IN_PROGRESS), fetch="rowcount")

    def claim(self, owner: str) -> Job | None:
        raise NotImplementedError

    def renew(self, owner: str, job_ids: list[str]) -> None:
        """Extend ``owner``'s leases on ``job_ids`` (no-op without leases)."""
        if self.lease_s and job_ids:
            self._execute(f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND status = ? AND id IN "
                          f"({', '.join('?' * len(job_ids))})", [time.time() + self.lease_s, owner, IN_PROGRESS,
                                                                 *job_ids])

    def set_progress(self, job_id: str, owner: str, progress: int) -> None:
        self._execute("UPDATE jobs SET progress = ? WHERE id = ? AND owner = ? AND status = ?",
                      (progress, job_id, owner, IN_PROGRESS))

    def complete(self, job_id: str, owner: str, output: str) -> bool:
        """Mark the job completed with its output file; False if it was no longer ours to complete."""
        return self._execute("UPDATE jobs SET status = ?, output = ?, progress = 100, completed_at = ? "
                             "WHERE id = ? AND owner = ? AND status = ?",
                             (COMPLETED, output, time.time(), job_id, owner, IN_PROGRESS), fetch="rowcount") == 1

    def fail(self, job_id: str, code: str, message: str, owner: str | None = None) -> bool:
        """Mark a queued job (owner None) or one held by ``owner`` failed with its reason."""
        if owner is None:
            return self._execute("UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ? "
                                 "WHERE id = ? AND status = ?", (FAILED, code, message, time.time(), job_id, QUEUED),
                                 fetch="rowcount") == 1
        return self._execute("UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ? "
                             "WHERE id = ? AND owner = ? AND status = ?",
                             (FAILED, code, message, time.time(), job_id, owner, IN_PROGRESS), fetch="rowcount") == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one fails at once, a running one when its engine loop next looks."""
        self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
                      (job_id, QUEUED, IN_PROGRESS))
        self.fail(job_id, "cancelled", "the job was cancelled")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,), fetch="one")
        return row is None or bool(row[0])

    def delete(self, job_id: str) -> Job | None:
        """Remove a job's record (the caller removes its files); None if there was none."""
        job = self.get(job_id)
        if job is not None:
            self._execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,), fetch="one")
        return None if row is None else _job(row)

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs after the job ``after`` in creation order ("asc") or newest first
        ("desc"), and whether more follow. An unknown ``after`` gives KeyError."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "", []
        if after is not None:
            row = self._execute("SELECT seq FROM jobs WHERE id = ?", (after,), fetch="one")
            if row is None:
                raise KeyError(after)
            where, args = f"WHERE seq {op} ?", [row[0]]
        rows = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY seq {direction} LIMIT ?",
                             [*args, limit + 1], fetch="all")
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs by state."""
        rows = self._execute("SELECT status, COUNT(*) FROM jobs GROUP BY status", fetch="all")
        return {state: 0 for state in STATES} | {status: int(n) for status, n in rows}


class SQLiteJobStore(JobStore):
    """Jobs in ``path`` (a SQLite file, WAL journal, every write committed before it returns): one
    server process at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut too
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql, args=(), fetch=None):
        with self._lock:
            cursor = self._db.execute(sql, args)
            return _fetch(cursor, fetch)

    def claim(self, owner: str) -> Job | None:
        """The oldest queued job, now in progress and held by ``owner``; None when the queue is empty."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status = ? AND "
                                       "cancel_requested = 0 ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = ?, owner = ?, started_at = ?, attempts = attempts + 1, "
                                     "progress = 0 WHERE id = ?", (IN_PROGRESS, owner, time.time(), row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row[0])


def _fetch(cursor, fetch):
    if fetch == "one":
        return cursor.fetchone()
    if fetch == "all":
        return cursor.fetchall()
    if fetch == "rowcount":
        return cursor.rowcount
    return None


def _job(row) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["request"], values["inputs"] = json.loads(values["request"]), json.loads(values["inputs"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)
