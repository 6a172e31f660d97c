"""The durable job store of ``vidloom serve``: SQLite in the data folder (embedded, nothing to start).

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


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
    cancel_requested: bool = False
    seq: int | None = None


_COLUMNS = [f.name for f in dataclasses.fields(Job)]


class SQLiteJobStore:
    """Jobs in ``path`` (a SQLite file, WAL journal, every write committed before it returns)."""

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

    # -- writes ----------------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        row = dataclasses.asdict(job)
        row.pop("seq")
        row["request"], row["inputs"] = json.dumps(job.request), json.dumps(job.inputs)
        names = ", ".join(row)
        with self._lock:
            cursor = self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(row))})",
                                      list(row.values()))
        job.seq = cursor.lastrowid
        return job

    def recover(self) -> int:
        """Jobs left in progress by a process that died go back to the queue; returns how many."""
        with self._lock:
            cursor = self._db.execute("UPDATE jobs SET status = ?, owner = NULL, progress = 0 WHERE status = ?",
                                      (QUEUED, IN_PROGRESS))
        return cursor.rowcount

    def claim(self, owner: str) -> Job | None:
        """The oldest queued job, now in progress and held by ``owner``; None when the queue is empty."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status = ? AND "
                                       "cancel_requested = 0 ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                now = time.time()
                self._db.execute("UPDATE jobs SET status = ?, owner = ?, started_at = ?, attempts = attempts + 1, "
                                 "progress = 0 WHERE id = ?", (IN_PROGRESS, owner, now, row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        job = _job(row)
        job.status, job.owner, job.started_at, job.attempts = IN_PROGRESS, owner, now, job.attempts + 1
        return job

    def set_progress(self, job_id: str, owner: str, progress: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND owner = ? AND status = ?",
                             (progress, job_id, owner, IN_PROGRESS))

    def complete(self, job_id: str, owner: str, output: str) -> bool:
        """Mark the job completed with its output file; False if it was no longer ours to complete."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, output = ?, progress = 100, completed_at = ? "
                "WHERE id = ? AND owner = ? AND status = ?", (COMPLETED, output, time.time(), job_id, owner, IN_PROGRESS))
        return cursor.rowcount == 1

    def fail(self, job_id: str, code: str, message: str, owner: str | None = None) -> bool:
        """Mark a queued job (owner None) or one held by ``owner`` failed with its reason."""
        with self._lock:
            if owner is None:
                cursor = self._db.execute(
                    "UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ? "
                    "WHERE id = ? AND status = ?", (FAILED, code, message, time.time(), job_id, QUEUED))
            else:
                cursor = self._db.execute(
                    "UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ? "
                    "WHERE id = ? AND owner = ? AND status = ?",
                    (FAILED, code, message, time.time(), job_id, owner, IN_PROGRESS))
        return cursor.rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one fails at once, a running one when its engine loop next looks."""
        with self._lock:
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
                             (job_id, QUEUED, IN_PROGRESS))
        self.fail(job_id, "cancelled", "the job was cancelled")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])

    def delete(self, job_id: str) -> Job | None:
        """Remove a job's record (the caller removes its files); None if there was none."""
        job = self.get(job_id)
        if job is not None:
            with self._lock:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs after the job ``after`` in creation order ("asc") or newest first
        ("desc"), and whether more follow. An unknown ``after`` gives KeyError."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._lock:
            where, args = "", []
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where, args = f"WHERE seq {op} ?", [row[0]]
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY seq {direction} "
                                    "LIMIT ?", [*args, limit + 1]).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs by state."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {state: 0 for state in STATES} | dict(rows)


def _job(row) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["request"], values["inputs"] = json.loads(values["request"]), json.loads(values["inputs"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)
