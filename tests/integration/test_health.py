"""/healthz through the daemon subprocess: a failing S3 destination (a bucket that does not exist)
makes the stream report its error, since when it fails and how old its oldest record is, the
daemon turns degraded (still HTTP 200) and back to ok once the bucket exists; partition buffers
are counted; the start-up check (preflight) warns about a missing bucket, missing credentials or a
directory that cannot be written, and says nothing at warning level when all is well."""

from __future__ import annotations

import http.client
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from support import Daemon, MotoServer, daemon_config, s3_objects, stream_config, wait_for


def s3_dest(moto: MotoServer, bucket: str, **extra: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "region": "us-east-1",
            "access_key_id": "x", "secret_access_key": "x", **extra}


def healthz(d: Daemon) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


def with_health(cfg: dict[str, Any], degraded_after_secs: int) -> dict[str, Any]:
    cfg["api"]["health"] = {"degraded_after_secs": degraded_after_secs}
    return cfg


def test_a_missing_bucket_degrades_health_until_it_exists_then_delivery_resumes(
    tmp_path: Path, moto: MotoServer
) -> None:
    bucket = f"health-missing-{uuid.uuid4().hex[:8]}"
    stream = stream_config("h", s3_dest(moto, bucket), buffering={"size_mib": 1, "interval_secs": 0},
                           delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 300})
    d = Daemon(tmp_path, with_health(daemon_config(tmp_path, [stream]), 2)).start()
    try:
        wait_for(lambda: bool(events(d, "destination_preflight_failed")), 20, "the preflight warning")
        (warning,) = events(d, "destination_preflight_failed")
        assert (warning["level"], warning["stream"], warning["destination"], warning["reason"]) == (
            "warning", "h", "s3", f"bucket '{bucket}' does not exist")

        d.firehose().put_record_batch(DeliveryStreamName="h", Records=[{"Data": b"r%d;" % i} for i in range(10)])
        wait_for(lambda: healthz(d)[1]["streams"]["h"]["failing_since"] is not None, 20, "failing_since")
        code, body = healthz(d)
        h = body["streams"]["h"]
        assert (code, body["status"]) == (200, "ok")  # failing, but for less than degraded_after_secs
        err = h["last_delivery_error"]
        assert err["code"] == "S3.NoSuchBucket" and err["destination"] == "destination"
        assert err["time"].endswith("Z") and err["time"] >= h["failing_since"]
        assert "127.0.0.1" not in orjson.dumps(body).decode()  # no endpoint URL, no path in health
        first_age = h["oldest_pending_age_secs"]

        wait_for(lambda: healthz(d)[1]["status"] == "degraded", 20, "status degraded")
        code, body = healthz(d)
        h = body["streams"]["h"]
        assert (code, h["status"], h["accepting_records"]) == (200, "degraded", True)
        assert h["oldest_pending_age_secs"] > first_age and h["oldest_pending_age_secs"] > 2
        assert body["reasons"][0].startswith("stream 'h': delivery has been failing for ")

        moto.client().create_bucket(Bucket=bucket)
        wait_for(lambda: healthz(d)[1]["streams"]["h"]["delivered_records"] == 10, 30, "the records delivered")
        code, body = healthz(d)
        h = body["streams"]["h"]
        assert (code, body["status"], body["reasons"]) == (200, "ok", [])
        assert (h["failing_since"], h["oldest_pending_age_secs"], h["pending_batches"]) == (None, 0.0, 0)
        assert h["last_delivery_error"]["code"] == "S3.NoSuchBucket"  # the latest failure stays on record
    finally:
        assert d.stop() == 0
    assert b"".join(s3_objects(moto.client(), bucket).values()) == b"".join(b"r%d;" % i for i in range(10))


def test_records_buffered_in_partitions_are_counted(tmp_path: Path) -> None:
    dest = {"type": "local", "path": str(tmp_path / "out"), "prefix": "c=!{partitionKeyFromQuery:c}/",
            "error_output_prefix": "errors/!{firehose:error-output-type}/"}
    stream = stream_config("p", dest, buffering={"size_mib": 1, "interval_secs": 900},
                           dynamic_partitioning={"enabled": True},
                           processing=[{"type": "metadata_extraction", "query": "{c: .c}"}])
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        records = [{"Data": orjson.dumps({"c": c, "i": i})} for i, c in enumerate("abcabcab")]
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=records)
        wait_for(lambda: healthz(d)[1]["streams"]["p"]["open_buffer_records"] == 8, 20, "8 buffered records")
        code, body = healthz(d)
        p = body["streams"]["p"]
        assert (code, body["status"], p["open_partitions"], p["pending_batches"]) == (200, "ok", 3, 0)
        wait_for(lambda: healthz(d)[1]["streams"]["p"]["oldest_pending_age_secs"] >= 0.5, 10,
                 "the buffered records to age")
    finally:
        assert d.stop() == 0


def test_the_preflight_passes_quietly_for_an_existing_bucket(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream_config("ok", s3_dest(moto, bucket))])).start()
    try:
        wait_for(lambda: bool(events(d, "destination_preflight_passed")), 20, "the preflight to pass")
    finally:
        assert d.stop() == 0
    assert [e for e in d.events() if e.get("level") in ("warning", "error")] == []


def test_the_preflight_warns_when_no_credentials_are_found(
    tmp_path: Path, moto: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing to find credentials in: no keys in the config or the environment, no profile files,
    # no container or instance role.
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    dest = {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "region": "us-east-1"}
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream_config("nc", dest)]), env=env).start()
    try:
        wait_for(lambda: bool(events(d, "destination_preflight_failed")), 20, "the preflight warning")
        (warning,) = events(d, "destination_preflight_failed")
        assert warning["reason"].startswith("no credentials found")
        assert healthz(d)[0] == 200  # the daemon serves: records are accepted and kept in the spool
    finally:
        assert d.stop() == 0


def test_the_preflight_warns_about_a_directory_that_cannot_be_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file where the directory should be")
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream_config("l", {"type": "local", "path": str(out)})])).start()
    try:
        wait_for(lambda: bool(events(d, "destination_preflight_failed")), 20, "the preflight warning")
        (warning,) = events(d, "destination_preflight_failed")
        assert (warning["stream"], warning["destination"], warning["reason"]) == (
            "l", "local", f"path '{out}' is not a directory")
    finally:
        assert d.stop() == 0


def test_health_is_unavailable_only_while_no_stream_can_take_a_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("the destination is down")
    stream = stream_config("full", {"type": "local", "path": str(out)},
                           buffering={"size_mib": 1, "interval_secs": 0}, spool={"max_size_mib": 1},
                           delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 200})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        fh = d.firehose()
        record = [{"Data": b"x" * 100_000}]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                fh.put_record_batch(DeliveryStreamName="full", Records=record)
            except fh.exceptions.ServiceUnavailableException:
                break
        code, body = healthz(d)
        assert (code, body["status"], body["streams"]["full"]["accepting_records"]) == (503, "unavailable", False)
        out.unlink()  # the destination is back: the spool drains and takes records again
        wait_for(lambda: healthz(d)[0] == 200, 30, "health back to 200")
        assert healthz(d)[1]["status"] == "ok"
    finally:
        assert d.stop() == 0
