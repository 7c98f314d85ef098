"""The splunk destination against an HEC server with indexer acknowledgement
(tests/fakes/splunk.py): in process for the acknowledgement rules, and through the daemon."""

from __future__ import annotations

import asyncio
import base64
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fakes.splunk import SplunkHecServer
from firehose.destinations.splunk import SplunkDestination, SplunkDestinationConfig
from firehose.interfaces import Batch, BuildContext, DeliveryResult
from support import Daemon, daemon_config, local_objects, stream_config, wait_for

TOKEN = "5a4b3c2d-0000-4000-8000-00000000beef"


@pytest.fixture
def hec() -> Iterator[SplunkHecServer]:
    server = SplunkHecServer(token=TOKEN).start()
    yield server
    server.stop()


def destination(hec: SplunkHecServer, **extra: Any) -> SplunkDestination:
    cfg = SplunkDestinationConfig.model_validate({
        "type": "splunk", "hec_endpoint": hec.endpoint, "hec_endpoint_type": "event", "hec_token": TOKEN,
        "ack_poll_interval_ms": 50, **extra})
    return cfg.build(BuildContext("s", 1, "us-east-1", "000000000000", "/tmp"))


def send(dest: SplunkDestination, records: list[bytes], **config: Any) -> DeliveryResult:
    if config:  # e.g. an ack timeout shorter than Firehose's 180 s minimum, for the test's sake
        dest.config = dest.config.model_copy(update=config)

    async def go() -> DeliveryResult:
        try:
            return await dest.deliver(Batch("s", 1, dest.batch_key(None, random.Random(3)), records, 0))  # type: ignore[arg-type]
        finally:
            await dest.close()

    return asyncio.run(go())


EVENTS = [b'{"event": {"n": 1}, "sourcetype": "clicks"}', b'{"event": "two", "time": 1700000000}\n']


def test_delivered_only_once_acknowledged(hec: SplunkHecServer) -> None:
    hec.ack_delay = 0.4
    assert send(destination(hec), EVENTS).ok
    assert hec.ack_polls >= 2  # polled while the indexer had not acknowledged yet
    assert hec.events() == [EVENTS[0], EVENTS[1].rstrip()]


def test_an_ack_that_never_comes_is_an_ack_timeout(hec: SplunkHecServer) -> None:
    hec.never_ack = True
    result = send(destination(hec), EVENTS, hec_ack_timeout_secs=0.5)
    assert set(result.failures) == {0, 1}
    failure = result.failures[0]
    assert failure.retryable and failure.error_code == "Splunk.AckTimeout"
    assert failure.fields is not None and re.fullmatch(r"\d{56}\.0", failure.fields["EventId"])
    assert len(hec.events()) == 2  # indexed all the same: a resend duplicates (at-least-once)


@pytest.mark.parametrize(("setup", "records", "code"), [
    (lambda h: setattr(h, "busy", 1), EVENTS, "Splunk.ServerError"),
    (lambda h: setattr(h, "token", "another"), EVENTS, "Splunk.InvalidToken"),
    (lambda h: setattr(h, "token_disabled", True), EVENTS, "Splunk.DisabledToken"),
    (lambda h: setattr(h, "ack_enabled", False), EVENTS, "Splunk.DisabledAck"),
    (lambda h: None, [b'{"time": 1}'], "Splunk.InvalidDataFormat"),
    (lambda h: None, [b"not json"], "Splunk.InvalidDataFormat"),
])
def test_hec_errors_get_firehoses_codes(hec: SplunkHecServer, setup: Any, records: list[bytes], code: str) -> None:
    setup(hec)
    result = send(destination(hec), records)
    assert {f.error_code for f in result.failures.values()} == {code}
    assert all(f.retryable for f in result.failures.values())  # Firehose retries them all


def test_an_unreachable_endpoint(hec: SplunkHecServer) -> None:
    hec.stop()
    result = send(destination(hec), EVENTS)
    assert {f.error_code for f in result.failures.values()} == {"Splunk.InvalidEndpoint"}


def test_raw_events_through_the_daemon_and_splunk_failed(tmp_path: Path, hec: SplunkHecServer) -> None:
    dest = {"type": "splunk", "hec_endpoint": hec.endpoint, "hec_endpoint_type": "Raw", "hec_token": "${HEC_TOKEN}",
            "ack_poll_interval_ms": 50, "retry_duration_secs": 2}
    stream = stream_config("splunk", dest, buffering={"size_mib": 1, "interval_secs": 0},
                           delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 200},
                           backup={"path": str(tmp_path / "backup"), "mode": "FailedEventsOnly"})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream]), env={"HEC_TOKEN": TOKEN}).start()
    try:
        fh = d.firehose()
        hec.busy = 2
        fh.put_record_batch(DeliveryStreamName="splunk", Records=[{"Data": b"line %d\n" % i} for i in range(3)])
        wait_for(lambda: len(hec.events()) == 3, 20, "raw events after two busy answers")
        assert hec.events() == [b"line 0", b"line 1", b"line 2"]
        assert len(hec.channels) == 1
        hec.busy = 10_000
        fh.put_record(DeliveryStreamName="splunk", Record={"Data": b"lost line\n"})
        wait_for(lambda: "splunk-failed/" in "".join(local_objects(tmp_path / "backup")), 30, "splunk-failed")
        desc = fh.describe_delivery_stream(DeliveryStreamName="splunk")["DeliveryStreamDescription"]
        sd = desc["Destinations"][0]["SplunkDestinationDescription"]
        assert (sd["HECEndpointType"], sd["HECAcknowledgmentTimeoutInSeconds"], sd["S3BackupMode"]) == (
            "Raw", 180, "FailedEventsOnly")
        assert sd["BufferingHints"] == {"SizeInMBs": 1, "IntervalInSeconds": 0} and "HECToken" not in sd
        assert TOKEN not in d.logs()
    finally:
        assert d.stop() == 0
    (body,) = [b for k, b in local_objects(tmp_path / "backup").items() if k.startswith("splunk-failed/")]
    (doc,) = [orjson.loads(line) for line in body.splitlines()]
    assert doc["errorCode"] == "Splunk.ServerError" and base64.b64decode(doc["rawData"]) == b"lost line\n"
    assert re.fullmatch(r"\d{56}\.0", doc["EventId"]) and doc["attemptsMade"] > 1


def test_config_rules() -> None:
    from firehose.config import ConfigError, load_config_text

    text = """streams:
  - name: s
    buffering: {size_mib: 5, interval_secs: 61}
    destination:
      type: splunk
      hec_endpoint: https://splunk:8088
      hec_endpoint_type: json
      hec_token: t
      hec_ack_timeout_secs: 120
    backup: {path: /tmp/b}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    message = str(info.value)
    assert "f.yaml:7: streams[0].destination.hec_endpoint_type: " in message
    assert "f.yaml:9: streams[0].destination.hec_ack_timeout_secs: " in message
    text = text.replace("json", "event").replace("120", "600")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    assert "f.yaml:3: streams[0].buffering.interval_secs: must be between 0 and 60" in str(info.value)
