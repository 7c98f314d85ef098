"""Transforms in the daemon: Lambda-contract handlers in worker processes, built-in processors,
failed records archived in Firehose's error-record format, exactly once across kill -9."""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from firehose.kpl import aggregate
from support import Daemon, daemon_config, local_objects, stream_config, stream_status, wait_for

HANDLERS = '''
import base64, json, os, time, uuid

def _out(r, result, data):
    return {"recordId": r["recordId"], "result": result, "data": base64.b64encode(data).decode()}

def upper(event, context):
    out = []
    for r in event["records"]:
        data = base64.b64decode(r["data"])
        if b"drop" in data:
            out.append(_out(r, "Dropped", data))
        elif b"fail" in data:
            out.append(_out(r, "ProcessingFailed", data))
        else:
            out.append(_out(r, "Ok", data.upper()))
    return {"records": out}

def stamp(event, context):
    # Not deterministic: a replay that re-ran it would deliver a different copy.
    return {"records": [_out(r, "Ok", base64.b64decode(r["data"]).rstrip(b"\\n") + b"|" + uuid.uuid4().hex.encode())
                        for r in event["records"]]}

def explode(event, context):
    raise RuntimeError("handler exploded")

def slow(event, context):
    time.sleep(30)
    return {"records": []}
'''


def write_handlers(tmp: Path) -> None:
    (tmp / "user_handlers.py").write_text(textwrap.dedent(HANDLERS))


def error_docs(objs: dict[str, bytes], kind: str = "processing-failed") -> list[dict[str, Any]]:
    return [json.loads(line) for k, v in objs.items() if kind in k for line in v.splitlines() if line]


def make(tmp: Path, processing: list[dict[str, Any]], **extra: Any) -> Daemon:
    write_handlers(tmp)
    dest = {"type": "local", "path": str(tmp / "out"), "prefix": "ok/"}
    s = stream_config("p", dest, buffering={"size_mib": 1, "interval_secs": 1}, processing=processing, **extra)
    return Daemon(tmp, daemon_config(tmp, [s]))


def test_lambda_ok_dropped_failed_and_delimiter(tmp_path: Path) -> None:
    d = make(tmp_path, [
        {"type": "append_delimiter", "delimiter": "\n"},
        {"type": "lambda", "function": "user_handlers:upper", "buffer_size_mib": 1, "buffer_interval_secs": 0,
         "retries": 1, "timeout_secs": 30},
    ]).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": b"alpha"}, {"Data": b"please drop me"}, {"Data": b"beta"}, {"Data": b"fail this one"},
        ])
        wait_for(lambda: len(local_objects(tmp_path / "out")) >= 2, 30, "delivery and archive")
    finally:
        assert d.stop() == 0
    objs = local_objects(tmp_path / "out")
    delivered = b"".join(v for k, v in objs.items() if k.startswith("ok/") and "processing-failed" not in k)
    assert delivered == b"ALPHA\nBETA\n"
    docs = error_docs(objs)
    assert len(docs) == 1
    doc = docs[0]
    assert base64.b64decode(doc["rawData"]) == b"fail this one"
    assert doc["errorCode"] == "Lambda.ProcessingFailed"
    assert doc["lambdaArn"] == "user_handlers:upper"
    assert doc["attemptsMade"] == 1
    assert isinstance(doc["arrivalTimestamp"], int) and doc["attemptEndingTimestamp"] >= doc["arrivalTimestamp"]
    # No error_output_prefix: <prefix><type>/yyyy/MM/dd/HH/
    (key,) = [k for k in objs if "processing-failed" in k]
    assert re.fullmatch(r"ok/processing-failed/\d{4}/\d{2}/\d{2}/\d{2}/p-1-.*", key), key


def test_function_error_is_retried_then_every_record_is_archived(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    d = make(tmp_path, [
        {"type": "lambda", "function": "user_handlers:explode", "buffer_interval_secs": 0, "retries": 2},
    ], backup={"path": str(backup), "error_output_prefix": "errors/!{firehose:error-output-type}/"}).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[{"Data": b"r%d" % i} for i in range(5)])
        wait_for(lambda: len(error_docs(local_objects(backup))) == 5, 30, "archived records")
    finally:
        assert d.stop() == 0
    docs = error_docs(local_objects(backup))
    assert sorted(base64.b64decode(x["rawData"]) for x in docs) == [b"r%d" % i for i in range(5)]
    assert {x["errorCode"] for x in docs} == {"Lambda.FunctionError"}
    assert {x["attemptsMade"] for x in docs} == {3}
    assert all("handler exploded" in x["errorMessage"] for x in docs)
    assert local_objects(tmp_path / "out") == {}  # nothing delivered, nothing lost
    assert all(k.startswith("errors/processing-failed/") for k in local_objects(backup))


def test_a_hanging_handler_is_killed_and_never_blocks_ingest(tmp_path: Path) -> None:
    d = make(tmp_path, [
        {"type": "lambda", "function": "user_handlers:slow", "buffer_interval_secs": 0, "retries": 0, "timeout_secs": 2},
    ]).start()
    try:
        fh = d.firehose()
        fh.put_record(DeliveryStreamName="p", Record={"Data": b"first"})
        t0 = time.monotonic()
        for i in range(20):  # while the handler hangs, ingest answers at once
            fh.put_record(DeliveryStreamName="p", Record={"Data": b"more %d" % i})
        assert time.monotonic() - t0 < 2
        wait_for(lambda: len(error_docs(local_objects(tmp_path / "out"))) == 21, 40, "timeouts archived")
        t1 = time.monotonic()
    finally:
        assert d.stop() == 0
    assert time.monotonic() - t1 < 15  # shutdown is not held by the hanging handler
    docs = error_docs(local_objects(tmp_path / "out"))
    assert {x["errorCode"] for x in docs} == {"Lambda.Timeout"}


def test_builtin_deaggregation_and_cloudwatch_logs(tmp_path: Path) -> None:
    d = make(tmp_path, [
        {"type": "append_delimiter"},
        {"type": "record_deaggregation", "format": "json"},
    ]).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": b'{"a":1}{"a":2}\n{"a":3}'}, {"Data": b'{"broken":'}, {"Data": b'{"b":1}'},
        ])
        wait_for(lambda: len(local_objects(tmp_path / "out")) >= 2, 30, "objects")
    finally:
        d.stop()
    objs = local_objects(tmp_path / "out")
    delivered = b"".join(v for k, v in objs.items() if "failed" not in k)
    assert delivered == b'{"a":1}\n{"a":2}\n{"a":3}\n{"b":1}\n'
    (doc,) = error_docs(objs)
    assert base64.b64decode(doc["rawData"]) == b'{"broken":'


def test_kpl_aggregates_are_deaggregated_before_delivery(tmp_path: Path) -> None:
    d = make(tmp_path, [{"type": "record_deaggregation", "format": "kpl"}, {"type": "append_delimiter"}]).start()
    agg = aggregate([(f"pk-{i}", b"user-record-%d" % i) for i in range(50)])
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": agg}, {"Data": b"plain"}, {"Data": agg[:-1] + bytes([agg[-1] ^ 1])},
        ])
        wait_for(lambda: len(local_objects(tmp_path / "out")) >= 2, 30, "objects")
    finally:
        d.stop()
    objs = local_objects(tmp_path / "out")
    delivered = b"".join(v for k, v in objs.items() if "failed" not in k)
    assert delivered == b"".join(b"user-record-%d\n" % i for i in range(50)) + b"plain\n"
    (doc,) = error_docs(objs)  # the corrupted aggregate is archived, never dropped
    assert base64.b64decode(doc["rawData"]) == agg[:-1] + bytes([agg[-1] ^ 1])


def test_decompression_and_cloudwatch_log_processing(tmp_path: Path) -> None:
    d = make(tmp_path, [{"type": "decompression"}, {"type": "cloudwatch_log_processing"}]).start()
    envelope = {"messageType": "DATA_MESSAGE", "owner": "1", "logGroup": "g", "logStream": "s",
                "subscriptionFilters": ["f"], "logEvents": [{"id": "1", "timestamp": 1, "message": "hello"},
                                                           {"id": "2", "timestamp": 2, "message": "world"}]}
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": gzip.compress(json.dumps(envelope).encode())}, {"Data": b"not gzip"},
        ])
        wait_for(lambda: len(local_objects(tmp_path / "out")) >= 2, 30, "objects")
    finally:
        d.stop()
    objs = local_objects(tmp_path / "out")
    assert b"".join(v for k, v in objs.items() if "failed" not in k) == b"hello\nworld\n"
    (doc,) = error_docs(objs, "decompression-failed")
    assert base64.b64decode(doc["rawData"]) == b"not gzip"


def test_kill9_during_processing_never_reruns_a_recorded_outcome(tmp_path: Path) -> None:
    """A non-deterministic handler: if a transform ran twice for a record, two different
    copies would be delivered. Every acknowledged record must appear exactly once."""
    d = make(tmp_path, [
        {"type": "append_delimiter"},
        {"type": "lambda", "function": "user_handlers:stamp", "buffer_size_mib": 0.2, "buffer_interval_secs": 0},
    ])
    rng = random.Random(3)
    acked: set[bytes] = set()
    for run in range(5):
        d.start()
        fh = d.firehose()
        deadline = time.monotonic() + rng.uniform(0.5, 1.5)
        n = 0
        while time.monotonic() < deadline:  # load for a random while; the kill comes after
            recs = [b"id-%d-%d" % (run, n + i) for i in range(200)]
            resp = fh.put_record_batch(DeliveryStreamName="p", Records=[{"Data": r} for r in recs])
            assert resp["FailedPutCount"] == 0
            acked.update(recs)
            n += 200
        d.kill9()
    d.start()
    try:
        def delivered() -> list[bytes]:
            body = b"".join(v for k, v in local_objects(tmp_path / "out").items() if "failed" not in k)
            return [line.split(b"|")[0] for line in body.splitlines()]

        wait_for(lambda: acked <= set(delivered()), 90, "every acknowledged record")
    finally:
        d.stop()
    ids = delivered()
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert acked <= set(ids)
    assert error_docs(local_objects(tmp_path / "out")) == []


def test_processing_config_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "streams:\n  - name: a\n    processing:\n      - {type: lambda, function: m:f}\n"
        "      - {type: lambda, function: m:g}\n    destination: {type: local, path: out}\n"
    )
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{cfg}:3: streams[0].processing: only one lambda processor" in res.stderr
    cfg.write_text("streams:\n  - name: a\n    processing:\n      - {type: lambda, function: m:f, buffer_size_mib: 9}\n"
                   "    destination: {type: local, path: out}\n")
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2 and "streams[0].processing[0].buffer_size_mib" in res.stderr
    _ = pytest


def test_backup_mode_all_keeps_untransformed_source_records(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    d = make(tmp_path, [
        {"type": "append_delimiter"},
        {"type": "lambda", "function": "user_handlers:upper", "buffer_interval_secs": 0},
    ], backup={"path": str(backup), "prefix": "source/", "error_output_prefix": "errors/!{firehose:error-output-type}/",
               "mode": "Enabled"}).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": b"one;"}, {"Data": b"drop me;"}, {"Data": b"fail me;"},
        ])
        wait_for(lambda: len(local_objects(backup)) >= 2 and local_objects(tmp_path / "out"), 30, "objects")
    finally:
        d.stop()
    b = local_objects(backup)
    source = b"".join(v for k, v in b.items() if k.startswith("source/"))
    assert source == b"one;drop me;fail me;"  # every source record, as it arrived, dropped and failed included
    (doc,) = error_docs(b)
    assert base64.b64decode(doc["rawData"]) == b"fail me;"
    assert b"".join(local_objects(tmp_path / "out").values()) == b"ONE;\n"


def test_remote_lambda_by_arn_through_the_invoke_api(tmp_path: Path) -> None:
    from handlers import upper
    from lambda_server import LambdaServer

    server = LambdaServer()
    server.add_function("enrich", upper.handler)
    server.start()
    try:
        d = make(tmp_path, [{"type": "lambda", "arn": server.arn("enrich"), "endpoint_url": server.endpoint,
                             "region": "us-east-1", "buffer_interval_secs": 0, "retries": 1}]).start()
        try:
            d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
                {"Data": b'{"name": "ada", "customer": 7}'}, {"Data": b"not json"},
            ])
            wait_for(lambda: len(local_objects(tmp_path / "out")) >= 2, 30, "objects")
        finally:
            d.stop()
    finally:
        server.stop()
    objs = local_objects(tmp_path / "out")
    delivered = b"".join(v for k, v in objs.items() if "failed" not in k)
    assert json.loads(delivered) == {"name": "ADA", "customer": 7}
    (doc,) = error_docs(objs)
    assert base64.b64decode(doc["rawData"]) == b"not json"
    assert doc["lambdaArn"] == server.arn("enrich")
    assert len(server.invocations) == 1


def test_archiving_waits_for_a_broken_backup_location_and_loses_nothing(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.write_text("not a directory")  # the backup location is down
    d = make(tmp_path, [{"type": "lambda", "function": "user_handlers:upper", "buffer_interval_secs": 0}],
             backup={"path": str(backup)}, delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 300})
    d.start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[{"Data": b"fail %d" % i} for i in range(10)])
        wait_for(lambda: any(e.get("event") == "delivery_retry_scheduled" for e in d.events()), 30, "retries")
        backup.unlink()
        wait_for(lambda: len(error_docs(local_objects(backup))) == 10, 30, "archive after repair")
    finally:
        assert d.stop() == 0
    docs = error_docs(local_objects(backup))
    assert sorted(base64.b64decode(x["rawData"]) for x in docs) == [b"fail %d" % i for i in range(10)]


def test_turning_processing_off_and_on_across_restarts_strands_nothing(tmp_path: Path) -> None:
    write_handlers(tmp_path)
    out = tmp_path / "out"
    dest = {"type": "local", "path": str(out)}
    lam = {"type": "lambda", "function": "user_handlers:upper", "buffer_interval_secs": 0}
    plain = stream_config("p", dest, buffering={"size_mib": 1, "interval_secs": 900})
    proc = stream_config("p", dest, buffering={"size_mib": 1, "interval_secs": 900}, processing=[lam])
    cfg = daemon_config(tmp_path, [plain])
    d = Daemon(tmp_path, cfg)
    # 1. no processing: records wait in the open buffer (900 s), then a crash
    d.start()
    d.firehose().put_record_batch(DeliveryStreamName="p", Records=[{"Data": b"a;"}, {"Data": b"b;"}])
    d.kill9()
    # 2. processing on: the earlier records are processed too (they were never sealed)
    d.write_config({**cfg, "streams": [proc]})
    d.start()
    d.firehose().put_record_batch(DeliveryStreamName="p", Records=[{"Data": b"c;"}])
    # The three outcomes are recorded before their records join the (900 s) buffer.
    wait_for(lambda: stream_status(d.port, "p")["open_buffer_records"] == 3, 20, "a, b and c processed and buffered")
    d.kill9()
    # 3. processing off again: recorded outcomes are still delivered
    d.write_config({**cfg, "streams": [plain]})
    d.start()
    d.firehose().put_record_batch(DeliveryStreamName="p", Records=[{"Data": b"d;"}])
    assert d.stop() == 0
    body = b"".join(local_objects(out).values())
    for rec in (b"A;", b"B;", b"C;", b"d;"):
        assert body.count(rec) == 1, (rec, body)
    assert b"a;" not in body and b"b;" not in body and b"c;" not in body


def test_processing_resumes_after_a_destination_outage_filled_the_spool(tmp_path: Path) -> None:
    write_handlers(tmp_path)
    out = tmp_path / "out"
    out.write_text("down")
    s = stream_config("p", {"type": "local", "path": str(out)}, buffering={"size_mib": 1, "interval_secs": 0},
                      processing=[{"type": "record_deaggregation", "format": "json"}],
                      spool={"max_size_mib": 2}, delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 300})
    d = Daemon(tmp_path, daemon_config(tmp_path, [s])).start()
    try:
        from support import batch_body, raw_call

        accepted: list[bytes] = []
        for i in range(60):
            recs = [b'{"i":%d,"pad":"%s"}' % (i * 10 + j, b"x" * 5000) for j in range(10)]
            status, _ = raw_call(d.port, "PutRecordBatch", batch_body("p", recs))
            if status == 200:
                accepted.extend(recs)
            else:
                assert status == 503
        assert len(accepted) < 600  # the cap pushed back
        out.unlink()  # the destination returns; nobody puts anything
        wait_for(lambda: b"".join(local_objects(out).values()).count(b'{"i":') == len(accepted), 60,
                   "every accepted record delivered without new puts")
        status, _ = raw_call(d.port, "PutRecordBatch", batch_body("p", [b'{"after":1}']))
        assert status == 200  # and ingest is open again
    finally:
        assert d.stop() == 0
