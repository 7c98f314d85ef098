"""``firehose redrive`` as an operator uses it: a Lambda fails some records (archived as
processing-failed), the handler is fixed, and the archived records are sent back, with the
redrive killed midway and resumed, then run again with and without its ledger: every
once-failed record is delivered exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from support import Daemon, daemon_config, local_objects, stream_config, wait_for


def _archived(d: Daemon, name: str) -> int:
    with urllib.request.urlopen(f"{d.endpoint}/status.json", timeout=10) as resp:
        return int(json.loads(resp.read())["streams"][name]["archived_records_by_type"].get("processing-failed", 0))


def _delivered(out: Path) -> Counter[bytes]:
    return Counter(line for body in local_objects(out).values() for line in body.splitlines() if line)


def _redrive(d: Daemon, backup: Path, ledger: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "firehose", "redrive", "--from", str(backup), "--stream", "s",
                             "--endpoint", d.endpoint, "--error-type", "processing-failed", "--ledger", str(ledger),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_failed_records_are_redriven_once_through_a_kill_and_reruns(tmp_path: Path) -> None:
    out, backup, ledger = tmp_path / "out", tmp_path / "backup", tmp_path / "ledger.json"

    def config(function: str) -> dict[str, object]:
        stream = stream_config("s", {"type": "local", "path": str(out)}, buffering={"size_mib": 1, "interval_secs": 1},
                               processing=[{"type": "lambda", "function": function, "buffer_interval_secs": 0}],
                               backup={"path": str(backup)})
        return daemon_config(tmp_path, [stream])

    d = Daemon(tmp_path, config("handlers.fail_some:handler")).start()
    try:
        client = d.firehose()
        for b in range(6):  # 300 "bad" records in several archive objects
            client.put_record_batch(DeliveryStreamName="s", Records=[
                {"Data": (b"bad-%d\n" if i % 4 == 0 else b"good-%d\n") % (b * 200 + i)} for i in range(200)])
            time.sleep(1.2)
        wait_for(lambda: _archived(d, "s") == 300, 60, "300 records archived as processing-failed")
    finally:
        assert d.stop() == 0
    bad = {b"bad-%d" % n for n in range(0, 1200, 4)}
    assert not bad & set(_delivered(out))

    d = Daemon(tmp_path, config("handlers.identity:handler")).start()  # the handler, fixed
    try:
        dry = subprocess.run([sys.executable, "-m", "firehose", "redrive", "--from", str(backup), "--stream", "s",
                              "--dry-run", "--error-type", "processing-failed"], capture_output=True, text=True)
        assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 300
        first = _redrive(d, backup, ledger, "--rate", "60")  # about 5 s: killed midway
        wait_for(lambda: ledger.exists(), 30, "the first request answered")
        time.sleep(1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        partly = len(json.loads(ledger.read_text())["done"])
        resumed = _redrive(d, backup, ledger)
        assert resumed.wait(120) == 0, resumed.stderr.read() if resumed.stderr else ""
        assert "redrive: 300 records" in (resumed.stdout.read() if resumed.stdout else "")
        assert 0 < partly < len(json.loads(ledger.read_text())["done"])
        again = _redrive(d, backup, ledger)  # everything in the ledger: nothing sent
        assert again.wait(120) == 0
        ledger.unlink()
        no_ledger = _redrive(d, backup, ledger)  # the ledger lost: the daemon refuses the ids it holds
        assert no_ledger.wait(120) == 0
        wait_for(lambda: bad <= set(_delivered(out)), 60, "every once-failed record delivered")
        time.sleep(2)
        counts = _delivered(out)
        assert all(counts[r] == 1 for r in bad), [r for r in bad if counts[r] != 1][:5]
        assert sum(n for r, n in counts.items() if r.startswith(b"bad-")) == 300
        assert any(e.get("event") == "redrive_duplicate" for e in d.events())
    finally:
        d.stop()


def test_the_selection_reads_s3_archives_and_applies_every_filter(moto: Any) -> None:
    """--from s3://bucket/prefix: gzip and plain archive objects as the daemon writes them; only
    the source stream's objects of the chosen type, within the time range, are selected."""
    import base64
    import gzip
    import os

    s3 = moto.client()
    bucket = f"archive-{int(time.time() * 1000)}"
    s3.create_bucket(Bucket=bucket)

    def doc(data: bytes, ended: int) -> bytes:
        return json.dumps({"attemptsMade": 1, "arrivalTimestamp": ended - 5, "errorCode": "Lambda.FunctionError",
                           "errorMessage": "x", "attemptEndingTimestamp": ended,
                           "rawData": base64.b64encode(data).decode()}).encode() + b"\n"

    s3.put_object(Bucket=bucket, Key="errors/processing-failed/2026/12/06/00/s-1-2026-12-06-00-00-00-a.gz",
                  Body=gzip.compress(doc(b"old", 1_000) + doc(b"in-range-1", 5_000) + doc(b"in-range-2", 6_000)))
    s3.put_object(Bucket=bucket, Key="errors/processing-failed/2026/12/06/00/s-1-2026-12-06-00-00-01-b",
                  Body=doc(b"in-range-3", 7_000) + doc(b"too-late", 9_000))
    s3.put_object(Bucket=bucket, Key="errors/delivery-failed/2026/12/06/00/s-1-2026-12-06-00-00-02-c",
                  Body=doc(b"other-type", 5_000))
    s3.put_object(Bucket=bucket, Key="errors/processing-failed/2026/12/06/00/other-1-2026-12-06-00-00-03-d",
                  Body=doc(b"other-stream", 5_000))
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    run = subprocess.run([sys.executable, "-m", "firehose", "redrive", "--dry-run", "--from", f"s3://{bucket}/errors/",
                          "--stream", "s", "--source-stream", "s", "--error-type", "processing-failed",
                          "--since", "4000", "--until", "1970-01-01T00:00:08Z"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    picked = [json.loads(line) for line in run.stdout.splitlines()]
    assert [base64.b64decode(p["data"]) for p in picked] == [b"in-range-1", b"in-range-2", b"in-range-3"]
    assert {p["errorType"] for p in picked} == {"processing-failed"}


def _archive(backup: Path, stream: str, records: list[bytes], per_object: int) -> None:
    """Archive objects as the daemon writes them (Firehose's error-record format, under the
    error-output type's prefix)."""
    import base64

    for k in range(0, len(records), per_object):
        target = backup / "processing-failed" / "2026" / "12" / "06" / "10" / f"{stream}-1-2026-12-06-10-00-{k:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps({
            "attemptsMade": 1, "arrivalTimestamp": 1796551200000, "errorCode": "Lambda.FunctionError",
            "errorMessage": "failed", "attemptEndingTimestamp": 1796551201000,
            "rawData": base64.b64encode(r).decode(), "lambdaArn": "arn:aws:lambda:us-east-1:000000000000:function:f",
        }) + "\n" for r in records[k:k + per_object]))


def test_a_redrive_killed_midway_resumes_through_another_cluster_daemon_without_its_ledger(
        tmp_path: Path, nats_server: Any) -> None:
    """Cluster mode: redrive ids are claimed cluster-wide, so a rerun through any daemon, even
    with its ledger lost, sends nothing twice."""
    from e2e.test_cluster import _cluster_daemon, _fresh

    name, out, backup, ledger = _fresh(), tmp_path / "out", tmp_path / "backup", tmp_path / "ledger.json"
    records = [b"redriven-%d\n" % i for i in range(600)]
    _archive(backup, name, records, 20)
    a = _cluster_daemon(tmp_path, "d1", nats_server, out, name).start()
    b = _cluster_daemon(tmp_path, "d2", nats_server, out, name).start()
    try:
        wait_for(lambda: all(d.health()["streams"][name]["owned_partitions"] for d in (a, b)), 30,
                 "both daemons owning partitions")

        def redrive(d: Daemon, *extra: str) -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, "-m", "firehose", "redrive", "--from", str(backup), "--stream",
                                     name, "--endpoint", d.endpoint, "--ledger", str(ledger), *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        first = redrive(a, "--rate", "100")  # about 6 s: killed midway
        wait_for(lambda: ledger.exists(), 30, "the first request answered")
        time.sleep(1.5)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        ledger.unlink()  # lost: only the cluster remembers what was sent
        resumed = redrive(b)
        assert resumed.wait(120) == 0, resumed.stderr.read() if resumed.stderr else ""
        ledger.unlink()
        again = redrive(a)  # every id stored already: the daemons store nothing
        assert again.wait(120) == 0, again.stderr.read() if again.stderr else ""
        wait_for(lambda: set(records) <= {x + b"\n" for x in _delivered(out)}, 60, "every record delivered")
        time.sleep(2)
        counts = _delivered(out)
        assert all(counts[r.rstrip(b"\n")] == 1 for r in records), \
            [r for r in records if counts[r.rstrip(b"\n")] != 1][:5]
        duplicates = [e for d in (a, b) for e in d.events() if e.get("event") == "redrive_duplicate"]
        assert len(duplicates) >= 600 // 20 // 2  # the rerun's batches (and the resumed run's first ones)
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
