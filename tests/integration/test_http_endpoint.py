"""The http_endpoint destination through the daemon subprocess, into a protocol-faithful endpoint
(tests/fakes/http_endpoint.py): request and headers as Firehose sends them, stable request ids
across retries, response validation, the retry window and the http-endpoint-failed archive."""

from __future__ import annotations

import base64
import http.client
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fakes.http_endpoint import HttpEndpointServer
from support import Daemon, daemon_config, local_objects, stream_config, wait_for


@pytest.fixture
def endpoint() -> Iterator[HttpEndpointServer]:
    server = HttpEndpointServer(access_key="s3cret-key").start()
    yield server
    server.stop()


def start(tmp: Path, endpoint: HttpEndpointServer, interval: int = 0, **dest: Any) -> Daemon:
    destination = {"type": "http_endpoint", "url": endpoint.endpoint + "/ingest?x=1",
                   "access_key": "${COLLECTOR_KEY}", **dest}
    stream = stream_config("web", destination, buffering={"size_mib": 1, "interval_secs": interval},
                           delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 200},
                           backup={"path": str(tmp / "backup"), "mode": "FailedDataOnly"})
    return Daemon(tmp, daemon_config(tmp, [stream]), env={"COLLECTOR_KEY": "s3cret-key"}).start()


def error_docs(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for key, body in sorted(local_objects(tmp / "backup").items())
            if key.startswith(kind + "/") for line in body.splitlines()]


def test_request_and_headers_are_firehoses(tmp_path: Path, endpoint: HttpEndpointServer) -> None:
    d = start(tmp_path, endpoint, content_encoding="GZIP", common_attributes={"env": "prod"}, name="collector")
    try:
        records = [b'{"n":%d}\n' % i for i in range(300)] + [b""]
        d.firehose().put_record_batch(DeliveryStreamName="web", Records=[{"Data": r} for r in records])
        wait_for(lambda: len(endpoint.records()) == len(records), 20, "delivery")
        assert endpoint.records() == records
        h = endpoint.headers[0]
        rid = endpoint.attempts[0]
        assert uuid.UUID(rid).version == 4
        assert h["X-Amz-Firehose-Protocol-Version"] == "1.0"
        assert h["X-Amz-Firehose-Access-Key"] == "s3cret-key"
        assert h["X-Amz-Firehose-Source-Arn"] == "arn:aws:firehose:us-east-1:000000000000:deliverystream/web"
        assert orjson.loads(h["X-Amz-Firehose-Common-Attributes"]) == {"commonAttributes": {"env": "prod"}}
        assert h["Content-Type"] == "application/json" and h["Content-Encoding"] == "gzip"
        assert endpoint.wire_bytes < sum(map(len, records))  # gzip on the wire
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="web")["DeliveryStreamDescription"]
        hd = desc["Destinations"][0]["HttpEndpointDestinationDescription"]
        assert hd["EndpointConfiguration"] == {"Name": "collector"}  # Url and AccessKey are sensitive
        assert hd["RequestConfiguration"] == {
            "ContentEncoding": "GZIP", "CommonAttributes": [{"AttributeName": "env", "AttributeValue": "prod"}]}
        assert hd["S3BackupMode"] == "FailedDataOnly" and hd["RetryOptions"] == {"DurationInSeconds": 300}
        assert hd["BufferingHints"] == {"SizeInMBs": 1, "IntervalInSeconds": 0}
        assert "s3cret-key" not in d.logs()
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert 'firehose_DeliveryToHttpEndpoint_Records_total{DeliveryStreamName="web"} 301.0' in metrics
        assert 'firehose_DeliveryToHttpEndpoint_Success{DeliveryStreamName="web"} 1.0' in metrics
    finally:
        assert d.stop() == 0


def test_failures_are_retried_under_the_same_request_id(tmp_path: Path, endpoint: HttpEndpointServer) -> None:
    endpoint.faults = [500, "bad_id", "html", 503]
    d = start(tmp_path, endpoint)
    try:
        d.firehose().put_record_batch(DeliveryStreamName="web", Records=[{"Data": b"a"}, {"Data": b"b"}])
        wait_for(lambda: endpoint.records() == [b"a", b"b"], 30, "delivery after four failures")
        assert len(endpoint.attempts) == 5 and len(set(endpoint.attempts)) == 1
        codes = [e["error_code"] for e in d.events() if e.get("event") == "delivery_retry_scheduled"]
        assert codes == ["HttpEndpoint.DestinationException", "HttpEndpoint.InvalidResponseFromDestination",
                         "HttpEndpoint.InvalidResponseFromDestination", "HttpEndpoint.DestinationException"]
    finally:
        assert d.stop() == 0
    assert error_docs(tmp_path, "http-endpoint-failed") == []


def test_expired_and_413_batches_are_archived_as_http_endpoint_failed(
    tmp_path: Path, endpoint: HttpEndpointServer
) -> None:
    endpoint.faults = [500] * 1000
    d = start(tmp_path, endpoint, retry_duration_secs=1)
    try:
        d.firehose().put_record_batch(DeliveryStreamName="web", Records=[{"Data": b"x"}, {"Data": b"y"}])
        wait_for(lambda: len(error_docs(tmp_path, "http-endpoint-failed")) == 2, 30, "archive after the window")
        endpoint.faults = [413]
        d.firehose().put_record(DeliveryStreamName="web", Record={"Data": b"too big"})
        wait_for(lambda: len(error_docs(tmp_path, "http-endpoint-failed")) == 3, 30, "a 413 archived at once")
    finally:
        assert d.stop() == 0
    docs = error_docs(tmp_path, "http-endpoint-failed")
    assert sorted(base64.b64decode(doc["rawData"]) for doc in docs) == [b"too big", b"x", b"y"]
    for doc in docs:
        assert set(doc) == {"attemptsMade", "arrivalTimestamp", "errorCode", "errorMessage",
                            "attemptEndingTimestamp", "rawData"}
        assert doc["errorCode"] == "HttpEndpoint.DestinationException"
        assert doc["errorMessage"].startswith("Received the following response from the endpoint destination.")
    assert {doc["attemptsMade"] for doc in docs if doc["rawData"] == "eA=="} != {1}  # retried before expiring
    assert endpoint.records() == []


def test_a_batch_over_10000_records_goes_as_several_requests(tmp_path: Path, endpoint: HttpEndpointServer) -> None:
    d = start(tmp_path, endpoint, interval=900)
    try:
        fh = d.firehose()
        for i in range(50):
            fh.put_record_batch(DeliveryStreamName="web", Records=[{"Data": b"%d," % (i * 500 + j)} for j in range(500)])
    finally:
        assert d.stop() == 0  # SIGTERM flushes the one open batch
    assert endpoint.records() == [b"%d," % i for i in range(25_000)]
    assert [len(r) for r in endpoint.requests.values()] == [10_000, 10_000, 5_000]


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    from firehose.config import ConfigError, load_config_text

    text = """streams:
  - name: s
    buffering: {size_mib: 65}
    destination:
      type: http_endpoint
      url: ftp://x
      content_encoding: br
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    message = str(info.value)
    assert "f.yaml:6: streams[0].destination.url: " in message
    assert "f.yaml:7: streams[0].destination.content_encoding: " in message
    text = text.replace("ftp://x", "http://x").replace("br", "gzip")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    assert "f.yaml:3: streams[0].buffering.size_mib: must be between 1 and 64" in str(info.value)
    text = text.replace("65", "64")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    assert "streams[0].backup: required for a http_endpoint destination" in str(info.value)
