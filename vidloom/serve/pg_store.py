"""The job store on PostgreSQL, for several ``vidloom serve`` replicas sharing one queue
(``--store postgresql://...``; needs ``psycopg``).

A replica claims the oldest queued job, or one whose holder's lease ran out, with ``SELECT ...
FOR UPDATE SKIP LOCKED`` (two replicas never claim the same job; neither waits for the other),
and holds it for ``lease_s`` seconds, renewed while it works on it. When a replica dies its
jobs' leases expire and another replica takes them over, running them again from their
beginning. Completing stays one conditional update (still in progress, still held by the
caller), so a job completes once even when a replica that lost it finishes late.
"""

from __future__ import annotations

import threading
import time

from .store import _COLUMNS, IN_PROGRESS, QUEUED, Job, JobStore, _fetch, _job, schema

SCHEMA = schema("BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")

LEASE_S = 15.0  # a replica that has not renewed for this long is taken to be dead


class PostgresJobStore(JobStore):
    def __init__(self, dsn: str, lease_s: float = LEASE_S):
        import psycopg

        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._db = psycopg.connect(dsn, autocommit=True)
        with self._lock:
            # replicas starting together create the table once
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(7345001)")
                self._db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql, args=(), fetch=None):
        with self._lock:
            return _fetch(self._db.execute(sql.replace("?", "%s"), list(args)), fetch)

    def claim(self, owner: str) -> Job | None:
        now = time.time()
        sql = (f"UPDATE jobs SET status = %s, owner = %s, started_at = %s, attempts = attempts + 1, progress = 0, "
               f"lease_until = %s WHERE id = (SELECT id FROM jobs WHERE cancel_requested = 0 AND (status = %s OR "
               f"(status = %s AND lease_until < %s)) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
               f"RETURNING {', '.join(_COLUMNS)}")
        with self._lock:
            row = self._db.execute(sql, [IN_PROGRESS, owner, now, now + self.lease_s, QUEUED, IN_PROGRESS, now]
                                   ).fetchone()
        return None if row is None else _job(row)
