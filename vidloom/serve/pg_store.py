"""The job store on PostgreSQL, for several ``vidloom serve`` replicas sharing one queue
(``--store postgresql://...``; needs ``psycopg`` and ``psycopg-pool``).

A replica claims the oldest queued job, or one whose holder's lease ran out, with ``SELECT ...
FOR UPDATE SKIP LOCKED`` (two replicas never claim the same job; neither waits for the other),
and holds it for ``lease_s`` seconds, renewed while it works on it. When a replica dies its
jobs' leases expire and another replica takes them over, running them again from their
beginning. Completing stays one conditional update (still in progress, still held by the
caller), so a job completes once even when a replica that lost it finishes late.

The database may restart or fail over under a running server. Statements run on a small pool
of connections, each checked before use; a statement whose connection drops is run once more
on a fresh one, and while the database stays out of reach for ``timeout_s`` a call raises
:class:`~vidloom.serve.store.StoreUnavailable` (one line, never the password). The pool keeps
reconnecting in the background, so the same store works again within seconds of the database
coming back. A statement whose connection dropped after the server may have committed it is
run again in a form that recognises its own earlier effect (a claim finds the job it took, a
completion that went through still reports True, an added job is not added twice).

Parts the URL leaves out (``postgresql://`` alone is a URL) come from libpq's environment:
``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``, ``PGPASSFILE``, ``PGSERVICE``.
"""

from __future__ import annotations

import os
import re
import time
from urllib.parse import unquote

from .store import (
    _COLUMNS, ADDED_COLUMNS, COMPLETED, IN_PROGRESS, QUEUED, Job, JobStore, StoreUnavailable, _fetch, _job, _report_json,
    schema,
)

SCHEMA = schema("BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")

LEASE_S = 15.0  # a replica that has not renewed for this long is taken to be dead
TIMEOUT_S = 5.0  # the longest one store call waits for an unreachable database
POOL_MAX = 4  # the engine loop, the lease heartbeat, HTTP requests, metrics
# the pool gives up one reconnection attempt after this long and starts a new one on demand, so
# its backoff between tries stays a few seconds however long the database was down
RECONNECT_S = 5.0


class PostgresJobStore(JobStore):
    def __init__(self, dsn: str, lease_s: float = LEASE_S, timeout_s: float = TIMEOUT_S):
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ValueError(f"PostgreSQL needs psycopg and psycopg-pool (pip install 'vidloom[postgres]'): "
                             f"{exc}") from None
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self._secrets = _secrets(dsn)
        options = {"autocommit": True}
        try:
            if "connect_timeout" not in conninfo_to_dict(dsn) and "PGCONNECT_TIMEOUT" not in os.environ:
                options["connect_timeout"] = max(2, round(timeout_s))  # a host that does not answer
            # the first connection is made here, not by the pool, to give its real error (a pool
            # only says that it timed out); replicas starting together create the table once
            with psycopg.connect(dsn, **options) as db, db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(7345001)")
                db.execute(SCHEMA)
                for name, kind in ADDED_COLUMNS:  # a store an earlier version made
                    db.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {kind}")
        except psycopg.ProgrammingError as exc:  # the URL itself
            raise ValueError(f"not a valid PostgreSQL URL: {self._say(exc)}") from None
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot use PostgreSQL: {self._say(exc)}") from None
        self._pool = ConnectionPool(dsn, kwargs=options, min_size=1, max_size=POOL_MAX, open=False,
                                    check=ConnectionPool.check_connection, timeout=timeout_s,
                                    reconnect_timeout=RECONNECT_S, name="vidloom-store")
        self._pool.open()

    def close(self) -> None:
        self._pool.close()

    def _say(self, exc: BaseException) -> str:
        """The error on one line, with any password in it masked (libpq quotes bad URL parts)."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self, work, again=None):
        """``work(connection)`` on a pooled connection. If the connection drops, once more on a
        fresh one: ``again(connection)`` when given, for a statement the server may have
        committed before the connection dropped. StoreUnavailable when the database stays out of
        reach for ``timeout_s``."""
        import psycopg
        from psycopg_pool import PoolTimeout

        deadline = time.monotonic() + self.timeout_s
        sent = False
        for attempt in range(2):
            wait = deadline - time.monotonic()
            if attempt and wait <= 0:
                break
            try:
                with self._pool.connection(timeout=max(wait, 0.01)) as conn:
                    fn = again if sent and again is not None else work
                    sent = True
                    return fn(conn)
            except PoolTimeout as exc:  # the pool tried to connect all this time
                error = exc
            except psycopg.OperationalError as exc:  # dropped, shut down, starting up, out of resources
                error = exc
        raise StoreUnavailable(f"PostgreSQL unavailable: {self._say(error)}") from error

    def _execute(self, sql, args=(), fetch=None):
        import psycopg

        sql, args = sql.replace("?", "%s"), list(args)

        def work(conn):
            return _fetch(conn.execute(sql, args), fetch)

        def again(conn):
            try:
                return work(conn)
            except psycopg.errors.UniqueViolation:  # the INSERT of the first try went through
                if sql.startswith("INSERT"):
                    return None
                raise

        return self._run(work, again)

    def claim(self, owner: str) -> Job | None:
        now = time.time()
        # a job whose holder died while running it max_attempts times fails instead of being taken
        # over again (it may be what ends the replicas that take it)
        self._fail_exhausted("status = ? AND lease_until < ?", (IN_PROGRESS, now))
        sql = (f"UPDATE jobs SET status = %s, owner = %s, started_at = %s, attempts = attempts + 1, progress = 0, "
               f"lease_until = %s WHERE id = (SELECT id FROM jobs WHERE cancel_requested = 0 AND (status = %s OR "
               f"(status = %s AND lease_until < %s)) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
               f"RETURNING {', '.join(_COLUMNS)}")

        def work(conn):
            return conn.execute(sql, [IN_PROGRESS, owner, now, now + self.lease_s, QUEUED, IN_PROGRESS, now]
                                ).fetchone()

        def again(conn):  # the job the first try took, if it took one (its start time is this claim's)
            taken = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE owner = %s AND started_at = %s "
                                 f"AND status = %s", [owner, now, IN_PROGRESS]).fetchone()
            return taken if taken is not None else work(conn)

        row = self._run(work, again)
        return None if row is None else _job(row)

    def complete(self, job_id: str, owner: str, output: str, report: dict | None = None) -> bool:
        sql = ("UPDATE jobs SET status = %s, output = %s, progress = 100, completed_at = %s, report = %s "
               "WHERE id = %s AND owner = %s AND status = %s")

        def work(conn):
            return conn.execute(sql, [COMPLETED, output, time.time(), _report_json(report), job_id, owner,
                                      IN_PROGRESS]).rowcount == 1

        def again(conn):  # True too if the first try's update went through
            return work(conn) or conn.execute("SELECT 1 FROM jobs WHERE id = %s AND owner = %s AND status = %s AND "
                                              "output = %s", [job_id, owner, COMPLETED, output]).fetchone() is not None

        return self._run(work, again)


def _secrets(dsn: str) -> list[str]:
    """The passwords a connection error could quote: the URL's (as written and decoded, from
    its user part or its query) and $PGPASSWORD. Longest first, so none is masked in parts."""
    found = [os.environ.get("PGPASSWORD", "")]
    userinfo = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", dsn)
    if userinfo and ":" in userinfo.group(1):
        found.append(userinfo.group(1).split(":", 1)[1])
    found += re.findall(r"[?&]password=([^&#]*)", dsn)
    found += [m.strip("'") for m in re.findall(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)
