"""kinesalite (npm), a Kinesis Data Streams implementation on LevelDB, for tests and benchmarks.

Installed from ``tests/kinesalite/package-lock.json`` by ``npm ci`` (``scripts/test.sh`` runs it
when ``node_modules`` is missing, and so does ``start()``); without node the tests skip.
``Kinesalite`` runs one server on a free port with its LevelDB in a temporary directory, stream
state changes (create, split, merge) taking no time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from support import free_port, terminate

PACKAGE_DIR = Path(__file__).resolve().parent / "kinesalite"
CLI = PACKAGE_DIR / "node_modules" / "kinesalite" / "cli.js"
CREDENTIALS = {"aws_access_key_id": "AKIDKINESALITE", "aws_secret_access_key": "kinesalite-secret"}


def available() -> str | None:
    """None when a server can be started here, else why not (only a missing node)."""
    if shutil.which("node") is None:
        return "node is not installed (kinesalite, the Kinesis implementation these tests use, runs on it)"
    return None


def ensure_installed() -> None:
    """``npm ci`` from the lockfile when kinesalite is missing (scripts/test.sh does it first)."""
    if CLI.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"kinesalite is not installed and npm is missing: run `npm ci` in {PACKAGE_DIR}")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PACKAGE_DIR,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not CLI.exists():
        raise RuntimeError(f"`npm ci` in {PACKAGE_DIR} failed:\n{done.stdout}{done.stderr}")


class Kinesalite:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="firehose-kinesalite-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ensure_installed()
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen(
            ["node", str(CLI), "--port", str(self.port), "--path", str(self.dir / "db"),
             "--createStreamMs", "0", "--deleteStreamMs", "0", "--updateStreamMs", "0", "--shardLimit", "200"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_streams()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kinesalite did not start: {(self.dir / 'server.log').read_text()}") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "kinesis", endpoint_url=self.endpoint, region_name="us-east-1",
            config=Config(retries={"max_attempts": 10, "mode": "standard"}, read_timeout=60), **CREDENTIALS,
        )

    def source_config(self, stream: str, **extra: Any) -> dict[str, Any]:
        """A ``sources:`` entry reading ``stream`` from this server."""
        return {"type": "kinesis", "stream_name": stream, "endpoint_url": self.endpoint, "region": "us-east-1",
                "access_key_id": CREDENTIALS["aws_access_key_id"],
                "secret_access_key": CREDENTIALS["aws_secret_access_key"], **extra}

    def create_stream(self, name: str, shards: int) -> None:
        c = self.client()
        c.create_stream(StreamName=name, ShardCount=shards)
        self.wait_active(name)

    def wait_active(self, name: str, timeout: float = 30) -> None:
        c = self.client()
        deadline = time.monotonic() + timeout
        while c.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name} did not become ACTIVE")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
