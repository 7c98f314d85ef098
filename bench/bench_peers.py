#!/usr/bin/env python3
"""Benchmark: the same PutRecordBatch load against this daemon and against its peers, in one run.

Usage::

    python bench/bench_peers.py                          # 100,000 records, 200 MiB per endpoint
    python bench/bench_peers.py --target-mib 100 --skip localstack

One loader (bench.py's: pre-encoded PutRecordBatch bodies of 500 ~1 KiB clickstream records, 8
keep-alive connections, in a process of its own) sends the same bodies to each endpoint in
turn, until ``--target-mib`` of record bytes are acknowledged:

1. this daemon, local destination, snappy, spool fsync always;
2. moto server's Firehose (``moto[server]``: in memory, no fsync), the stream created through
   its API with an S3 destination in the same moto server;
3. LocalStack's Firehose, run on the host without Docker (``OVERRIDE_IN_DOCKER=0``) from a venv
   of its own on pyenv's newest Python, 3.13 or later (LocalStack 2026.x imports 3.13's
   ``warnings.deprecated``), made once under
   ``--cache-dir`` with ``localstack-core[runtime]`` pinned with ``cbor2<6``, ``pyopenssl<24.3``,
   ``cryptography<44`` and ``service_identity``; its files under the run's scratch directory
   (``FILESYSTEM_ROOT``), ``DNS_ADDRESS=0``, ``SERVICES=s3,firehose,sts,iam`` (its Firehose assumes
   the stream's role through STS).

A peer that cannot start is skipped with the reason. Prints records/s and MiB/s acknowledged per
endpoint and this daemon's ratio to each peer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench import (  # noqa: E402
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MIB,
    STREAM,
    DaemonRun,
    Moto,
    Processes,
    Settings,
    add_dataset_args,
    dataset_from_args,
    encode_bodies,
    free_port,
    run_loader,
    wait_http_ok,
    write_bodies,
)

LOCALSTACK_PINS = ["localstack-core[runtime]", "cbor2<6", "pyopenssl<24.3", "cryptography<44", "service_identity"]


class Endpoint:
    """What run_loader needs of a target: a port, whether it is alive, its log."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes] | None, log_path: Path | None) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log_path

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def create_stream(endpoint: str, bucket: str) -> None:
    """A DirectPut stream named STREAM with an S3 destination, through the peer's Firehose API."""
    import boto3

    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "test",
                          "aws_secret_access_key": "test"}
    boto3.client("s3", **kw).create_bucket(Bucket=bucket)
    fh = boto3.client("firehose", **kw)
    fh.create_delivery_stream(DeliveryStreamName=STREAM, DeliveryStreamType="DirectPut",
                              ExtendedS3DestinationConfiguration={
                                  "RoleARN": "arn:aws:iam::000000000000:role/firehose",
                                  "BucketARN": f"arn:aws:s3:::{bucket}",
                                  "BufferingHints": {"SizeInMBs": 64, "IntervalInSeconds": 60}})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = fh.describe_delivery_stream(DeliveryStreamName=STREAM)["DeliveryStreamDescription"]
        if status["DeliveryStreamStatus"] == "ACTIVE":
            return
        time.sleep(0.2)
    raise RuntimeError("the stream did not become ACTIVE")


def localstack_python(cache: Path) -> tuple[str | None, str]:
    """A Python with LocalStack installed (made once under ``cache``), or None and why not."""
    venv = cache / "localstack-venv"
    python = venv / "bin" / "python"
    if python.exists():
        return str(python), ""
    # The newest first: LocalStack 2026.x imports warnings.deprecated, new in 3.13.
    found = sorted((Path.home() / ".pyenv/versions").glob("3.1[3-9].*/bin/python3"), reverse=True)
    base = found[0] if found else None
    if base is None:
        return None, "no Python 3.13 or later under ~/.pyenv (LocalStack 2026.x needs 3.13)"
    try:
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LOCALSTACK_PINS], check=True,
                       capture_output=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"installing localstack-core failed: {detail.decode(errors='replace')[-300:]}"
    return str(python), ""


def start_localstack(procs: Processes, python: str, scratch: Path) -> Endpoint:
    port = free_port()
    root = scratch / "localstack"
    root.mkdir(parents=True, exist_ok=True)
    env = {"OVERRIDE_IN_DOCKER": "0", "FILESYSTEM_ROOT": str(root), "DNS_ADDRESS": "0",
           "GATEWAY_LISTEN": f"127.0.0.1:{port}", "SERVICES": "s3,firehose,sts,iam", "SKIP_SSL_CERT_DOWNLOAD": "1",
           "LOCALSTACK_TELEMETRY_DISABLED": "1", "DISABLE_EVENTS": "1"}
    log = scratch / "localstack.log"
    proc = procs.start("localstack", [python, "-m", "localstack.runtime.main"], log_path=log, env=env, grace=10.0)
    wait_http_ok(port, "/_localstack/health", proc, 120.0, "LocalStack")
    return Endpoint(port, proc, log)


# moto and LocalStack route a request to a service by its Authorization header's credential scope
# (neither checks the signature); this daemon, with auth off, ignores it.
PEER_AUTHORIZATION = ("AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/firehose/aws4_request, "
                      "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=" + "0" * 64)


def measure(procs: Processes, settings: Settings, bodies: Path, target: Endpoint, scratch: Path,
            target_bytes: int) -> dict[str, Any]:
    result = run_loader(procs, settings, bodies, target, scratch / f"loader-{target.port}.json",  # type: ignore[arg-type]
                        target_bytes=target_bytes, authorization=PEER_AUTHORIZATION)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--target-mib", type=float, default=200.0, help="record MiB acknowledged per endpoint")
    ap.add_argument("--skip", default="", help="comma-separated peers to leave out: moto, localstack")
    add_dataset_args(ap)
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    data = dataset_from_args(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    bodies_path = scratch / "bodies.bin"
    write_bodies(encode_bodies(data.records, STREAM, MAX_BATCH_RECORDS, MAX_BATCH_BYTES), bodies_path)
    settings = Settings(connections=8, buffer_mib=64, interval_secs=1, max_in_flight=2, shutdown_timeout_secs=30,
                        delivery_timeout=600, load_timeout=900)
    target = int(args.target_mib * MIB)
    procs = Processes()
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    try:
        daemon = DaemonRun(procs, scratch / "daemon", settings,
                           {"type": "local", "path": str(scratch / "out"), "compression": "snappy"}, spool_max_mib=8192)
        daemon.start()
        rows.append(("this daemon (local, snappy, fsync always)",
                     measure(procs, settings, bodies_path, daemon, scratch, target), ""))  # type: ignore[arg-type]
        daemon.stop()
        shutil.rmtree(scratch / "out", ignore_errors=True)
        if "moto" in skip:
            rows.append(("moto server's Firehose", None, "skipped (--skip)"))
        else:
            moto = Moto(procs, scratch, sys.executable)
            moto.start()
            create_stream(moto.endpoint, "peer-bucket")
            rows.append(("moto server's Firehose (in memory)",
                         measure(procs, settings, bodies_path, Endpoint(moto.port, moto.proc, moto.log_path), scratch,
                                 target), ""))
            moto.stop()
        if "localstack" in skip:
            rows.append(("LocalStack's Firehose", None, "skipped (--skip)"))
        else:
            python, why = localstack_python(args.cache_dir)
            if python is None:
                rows.append(("LocalStack's Firehose", None, f"skipped: {why}"))
            else:
                try:
                    ls = start_localstack(procs, python, scratch)
                    create_stream(f"http://127.0.0.1:{ls.port}", "peer-bucket")
                    rows.append(("LocalStack's Firehose (host mode)",
                                 measure(procs, settings, bodies_path, ls, scratch, target), ""))
                except Exception as exc:  # noqa: BLE001 - a peer that cannot start is skipped, saying why
                    rows.append(("LocalStack's Firehose", None, f"skipped: {type(exc).__name__}: {str(exc)[:300]}"))
    finally:
        procs.stop_all()
    ours = rows[0][1]
    assert ours is not None
    print(f"{len(data.records):,} records, ~{data.nbytes / len(data.records):.0f} bytes each; "
          f"{args.target_mib:g} MiB per endpoint; 8 connections; cpus {os.cpu_count()}")
    print("\n| endpoint | records/s | MiB/s | this daemon's ratio |")
    print("|---|---|---|---|")
    for name, r, note in rows:
        if r is None:
            print(f"| {name} | - | - | {note} |")
            continue
        if not r["records"]:
            detail = {k: r.get(k) for k in ("requests", "throttled", "conn_errors", "failed_put", "rejected",
                                            "rejected_detail")}
            print(f"| {name} | 0 | 0 | nothing acknowledged: {str(detail)[:300]} |")
            continue
        rate, mibs = r["records"] / r["seconds"], r["bytes"] / MIB / r["seconds"]
        ratio = (ours["records"] / ours["seconds"]) / rate
        print(f"| {name} | {rate:,.0f} | {mibs:,.1f} | {ratio:.1f}x |")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
