"""Real PostgreSQL servers on loopback for the store tests (Debian's postgresql package; `make
test` installs it when missing). They run as the postgres user when the tests run as root."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway cluster in a temporary folder that a test can stop (as a crash would:
    ``pg_ctl -m immediate``) and start again on the same port. With ``password``, TCP clients
    must give it (scram-sha-256) as the user ``vidloom``; without, anyone is trusted."""

    def __init__(self, password: str | None = None):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert binaries, "PostgreSQL is needed for the store tests: `make test` installs Debian's postgresql package"
        self.bin_dir = binaries[-1]
        self.password = password
        # directly under /tmp: pytest's own temporary folders are closed to the postgres user
        self.root = Path(tempfile.mkdtemp(prefix="vidloom-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self.as_user = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.root / "pw"
            pwfile.write_text(password + "\n")
            if self.as_user:
                shutil.chown(pwfile, "postgres")
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.data), *auth, "-U", "vidloom", "--no-sync")
        self.start()

    @property
    def dsn(self) -> str:
        """A URL for the ``postgres`` database (with the password, if the server wants one)."""
        auth = "vidloom" if self.password is None else f"vidloom:{self.password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True):
        return subprocess.run([*self.as_user, f"{self.bin_dir}/{tool}", *args], check=check, capture_output=True)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        """Stop at once: every connection drops, as in a crash or a failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn():
    server = PostgresServer()
    try:
        yield server.dsn
    finally:
        server.remove()


@pytest.fixture
def postgres_server():
    """A server of the test's own (on its own port) that the test may stop and start."""
    server = PostgresServer(password="pg-pass-1")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def fresh_postgres(postgres_dsn):
    """The server with an empty jobs table."""
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS jobs")
    return postgres_dsn
