"""A real PostgreSQL 15 server for tests and benchmarks, in a temporary directory.

``initdb`` and ``pg_ctl`` refuse to run as root, so under root they run as the ``postgres`` user
(``runuser``) and the directory is handed to that user. The server listens on 127.0.0.1 on a
free port (password authentication, scram-sha-256) and on a unix socket in its own directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from support import free_port

PG_BIN = Path(os.environ.get("FIREHOSE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
PASSWORD = "pw-Xq7-test-secret"


def available() -> str | None:
    """None when a server can be started here, else why not."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL binaries not found: {PG_BIN / tool} (set FIREHOSE_PG_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    return None


class PostgresServer:
    """``start()`` runs initdb (first time) and starts the server; ``stop()`` stops it (the data
    stays, so ``start()`` brings the same database back); ``cleanup()`` stops and deletes it."""

    def __init__(self, *, fsync: bool = False, port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="firehose-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log = self.dir / "server.log"
        self.port = port or free_port()
        self.fsync = fsync
        self._as_postgres = os.geteuid() == 0
        self._initialised = False

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", SUPERUSER, "--", *args] if self._as_postgres else args
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)

    def _init(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            import pwd

            pw = pwd.getpwnam(SUPERUSER)
            for path in (self.dir, self.socket_dir, pwfile):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile),
                   "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8", "-N"])
        pwfile.unlink()
        self._initialised = True

    def start(self, timeout: float = 60) -> PostgresServer:
        if not self._initialised:
            self._init()
        opts = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=50 -c shared_buffers=64MB")
        if not self.fsync:
            opts += " -c synchronous_commit=off -c full_page_writes=off"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                   "-t", str(int(timeout)), "start"], timeout=timeout + 10)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(**self.params(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if self._initialised and (self.data / "postmaster.pid").exists():
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def params(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": SUPERUSER, "password": PASSWORD, "dbname": dbname}

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(**self.params(dbname), autocommit=True)

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
