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
import errno
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

# what the OpenAI Videos API calls the states (a cancelled job is "failed" with code "cancelled")
QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)


MAX_ATTEMPTS = 3  # a job started this many times without finishing (each start ended by a crash) fails


class StoreUnavailable(Exception):
    """The job store cannot be reached or written now (database down, disk full, locked): the
    server answers 503 with ``Retry-After`` and keeps what it has not recorded yet. ``full``: the
    disk is full (507)."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


class StoreInUse(ValueError):
    """Another live process holds the store (a second server on the same data folder)."""

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
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    report TEXT"""
# columns later versions added, for a store an earlier version made: (name, SQL type)
ADDED_COLUMNS = (("report", "TEXT"),)


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
    report: dict[str, float] | None = None  # what the request's feature cache did (``VideoOutput.cache``)
    seq: int | None = None

    def sampling(self) -> dict[str, Any]:
        """The options its request runs with (``VideoGenerator.check`` / ``submit``, after the
        prompt): the request's fields, the uploads by their path, frames as arrays (the loop
        exports them)."""
        fields = {k: v for k, v in self.request.items() if k != "prompt"}
        fields.update(self.inputs)
        return dict(fields, output_type="np")


_COLUMNS = [f.name for f in dataclasses.fields(Job)]


class JobStore:
    """The queue's operations in SQL both databases take (``?`` placeholders); a subclass runs
    them (``_execute``, ``_transaction``) and claims (``claim``)."""

    lease_s: float = 0.0  # > 0: a claim holds a job this long unless renewed (several replicas)
    max_attempts: int = MAX_ATTEMPTS

    def _execute(self, sql: str, args: tuple | list = (), fetch: str | None = None):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- writes ----------------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        row = dataclasses.asdict(job)
        row.pop("seq")
        row["request"], row["inputs"] = json.dumps(job.request), json.dumps(job.inputs)
        row["report"] = None if job.report is None else json.dumps(job.report)
        row["cancel_requested"] = int(job.cancel_requested)
        names = ", ".join(row)
        self._execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        return job

    def recover(self) -> int:
        """Jobs left in progress by a process that died go back to the queue; returns how many.
        A job already started ``max_attempts`` times fails instead (it may be what crashed the
        server: run again it would crash it again). (With leases, a store shared by replicas
        leaves this to the lease expiry instead: ``claim``.)"""
        if self.lease_s:
            return 0
        self._fail_exhausted("status = ?", (IN_PROGRESS,))
        return self._execute("UPDATE jobs SET status = ?, owner = NULL, progress = 0 WHERE status = ?",
                             (QUEUED, IN_PROGRESS), fetch="rowcount")

    def _fail_exhausted(self, where: str, args: tuple) -> int:
        """Fail the jobs matching ``where`` that have been started ``max_attempts`` times."""
        message = (f"the job was started {self.max_attempts} times and the server stopped while running it "
                   "each time (it may be what crashed it); it is not run again")
        return self._execute(f"UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ?, "
                             f"owner = NULL WHERE {where} AND attempts >= ?",
                             (FAILED, "too_many_attempts", message, time.time(), *args, self.max_attempts),
                             fetch="rowcount")

    def release(self, owner: str) -> int:
        """``owner`` stops (SIGTERM): its jobs go back to the queue at once, this start not
        counted as an attempt; returns how many."""
        return self._execute("UPDATE jobs SET status = ?, owner = NULL, progress = 0, lease_until = NULL, "
                             "attempts = attempts - 1 WHERE owner = ? AND status = ?", (QUEUED, owner, IN_PROGRESS),
                             fetch="rowcount")

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

    def complete(self, job_id: str, owner: str, output: str, report: dict | None = None) -> bool:
        """Mark the job completed with its output file (and its cache report); False if it was no
        longer ours to complete."""
        return self._execute("UPDATE jobs SET status = ?, output = ?, progress = 100, completed_at = ?, report = ? "
                             "WHERE id = ? AND owner = ? AND status = ?",
                             (COMPLETED, output, time.time(), _report_json(report), job_id, owner, IN_PROGRESS),
                             fetch="rowcount") == 1

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
    server process at a time, held by an exclusive lock on ``path.lock`` (``exclusive``); a second
    one gets ``StoreInUse`` naming the holder. Any SQLite failure while serving (locked past the
    busy timeout, disk full, I/O error) is ``StoreUnavailable``."""

    def __init__(self, path: str | Path, exclusive: bool = True, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        # writes on one connection, reads on another: a write waiting for SQLite's lock (another
        # process, a busy disk) does not hold up reads (/health, polls), which WAL lets run
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._holder = _lock_file(self.path.with_name(self.path.name + ".lock")) if exclusive else None
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=busy_timeout_s)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut too
            self._db.executescript(SCHEMA)
            present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS:  # a store an earlier version made
                if name not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a corrupt file fails here, not later
            self._reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                           timeout=busy_timeout_s)
        except BaseException:
            if self._holder is not None:
                self._holder.close()
            raise

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()
            if self._holder is not None:
                self._holder.close()  # the lock goes with the descriptor

    def _execute(self, sql, args=(), fetch=None):
        reading = sql.startswith("SELECT")
        with (self._read_lock if reading else self._lock), _unavailable():
            cursor = (self._reader if reading else self._db).execute(sql, args)
            return _fetch(cursor, fetch)

    def claim(self, owner: str) -> Job | None:
        """The oldest queued job, now in progress and held by ``owner``; None when the queue is empty."""
        with self._lock, _unavailable():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status = ? AND "
                                       "cancel_requested = 0 ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = ?, owner = ?, started_at = ?, attempts = attempts + 1, "
                                     "progress = 0 WHERE id = ?", (IN_PROGRESS, owner, time.time(), row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row[0])


def _lock_file(path: Path):
    """An exclusive, non-blocking lock on ``path`` (created), held while the returned file is open;
    the file names the holder. The kernel releases it when the process dies (kill -9 included)."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read(200).strip() or "another process"
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreInUse(f"the job store {path.with_suffix('').name} is in use by {holder}: one server per "
                             "data folder (stop it, or give this one another --data-dir)") from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"vidloom serve pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class _unavailable:
    """SQLite failures while serving -> StoreUnavailable (``full`` for a full disk)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.ProgrammingError):
            text = str(exc)
            full = isinstance(exc, sqlite3.OperationalError) and "full" in text
            raise StoreUnavailable(f"the job store cannot be used now: {text}", full=full) from exc
        return False


def _fetch(cursor, fetch):
    if fetch == "one":
        return cursor.fetchone()
    if fetch == "all":
        return cursor.fetchall()
    if fetch == "rowcount":
        return cursor.rowcount
    return None


def _report_json(report: dict | None) -> str | None:
    return json.dumps({str(k): float(v) for k, v in report.items()}) if report else None


def _report(text) -> dict[str, float] | None:
    """A stored report; one that does not parse is left out (the job itself is fine)."""
    try:
        report = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(report, dict) or not all(isinstance(v, (int, float)) for v in report.values()):
        return None
    return report


def _job(row) -> Job:
    """A row as a Job. A row that does not parse (edited or damaged by hand) is that job alone
    failed with code ``corrupt_record``, never an error for whoever reads it."""
    values = dict(zip(_COLUMNS, row))
    try:
        request, inputs = json.loads(values["request"]), json.loads(values["inputs"])
        if not (isinstance(request, dict) and isinstance(request.get("prompt"), str) and isinstance(inputs, dict)
                and all(isinstance(v, str) for v in inputs.values())):
            raise ValueError("request or inputs of the wrong shape")
        values["request"], values["inputs"] = request, inputs
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["report"] = _report(values.get("report"))
        return Job(**values)
    except (ValueError, TypeError) as exc:
        return Job(id=str(values["id"]), status=FAILED, model=str(values.get("model")), prompt="", seconds="",
                   size="", request={}, inputs={}, created_at=_number(values.get("created_at")),
                   error_code="corrupt_record", error_message=f"the job's stored record is damaged ({exc})"[:200],
                   attempts=_number(values.get("attempts"), int), owner=values.get("owner"), seq=values.get("seq"))


def _number(value, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        return kind(0)
