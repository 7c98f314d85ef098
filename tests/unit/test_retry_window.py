"""The delivery runner's per-destination retry window and rejected records (OpenSearch, Splunk and
HTTP endpoint destinations declare them): archived under the destination's error-output type."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import orjson

from firehose.clock import ManualClock
from firehose.interfaces import Batch, DeliveryResult, RecordFailure
from support import make_runtime, settle


def error_docs(tmp: Path, kind: str) -> list[dict[str, Any]]:
    root = tmp / "backup" / kind
    docs = []
    for p in sorted(root.rglob("*")) if root.exists() else []:
        if p.is_file():
            docs += [orjson.loads(line) for line in p.read_bytes().splitlines()]
    return docs


async def run(tmp: Path, clock: ManualClock, window: int, kind: str, deliver: Any, records: list[bytes],
              done: Any) -> None:
    """Put ``records`` through a stream whose destination declares ``window`` and ``kind`` and
    delivers with ``deliver``; return once ``done(runtime)`` holds."""
    rt = make_runtime(tmp, interval=0, delivery="{retry_initial_backoff_ms: 1, retry_max_backoff_ms: 2}", backup=True,
                      clock=clock)
    await rt.start()
    dest: Any = rt.destination
    dest.retry_duration_secs = window
    dest.error_output_type = kind
    dest.deliver = deliver
    await rt.put(records)
    await settle(lambda: done(rt))
    await rt.stop(5)


def test_rejected_records_are_archived_at_once_and_the_rest_retried(tmp_path: Path) -> None:
    clock = ManualClock()
    calls: list[tuple[list[bytes], list[int] | None]] = []

    async def deliver(batch: Batch) -> DeliveryResult:
        calls.append((list(batch.records), None if batch.indices is None else list(batch.indices)))
        if len(calls) == 1:
            return DeliveryResult({
                1: RecordFailure(False, "400", "mapper_parsing_exception", {"esDocumentId": "k.1"}),
                3: RecordFailure(True, "429", "es_rejected_execution_exception"),
            })
        return DeliveryResult.delivered()

    asyncio.run(run(tmp_path, clock, 300, "AmazonOpenSearchService-failed", deliver, [b"a", b"b", b"c", b"d"],
                    lambda rt: rt.delivered_records == 3 and rt.archived_records == 1))
    # The rejected record is not retried; the throttled one is, with its position in the batch.
    assert calls == [([b"a", b"b", b"c", b"d"], None), ([b"d"], [3])]
    (doc,) = error_docs(tmp_path, "AmazonOpenSearchService-failed")
    assert base64.b64decode(doc["rawData"]) == b"b"
    assert (doc["errorCode"], doc["errorMessage"], doc["esDocumentId"]) == ("400", "mapper_parsing_exception", "k.1")
    assert list(doc) == ["attemptsMade", "arrivalTimestamp", "errorCode", "errorMessage", "attemptEndingTimestamp",
                         "esDocumentId", "rawData"]


def test_the_window_starts_at_the_first_failure_then_the_rest_is_archived(tmp_path: Path) -> None:
    clock = ManualClock()
    attempts: list[int] = []

    async def deliver(batch: Batch) -> DeliveryResult:
        attempts.append(len(batch.records))
        clock.advance(3)
        if len(attempts) == 1:  # one record goes through; the other never does
            return DeliveryResult({0: RecordFailure(True, "Splunk.AckTimeout", "no ack")})
        return DeliveryResult.all_failed(len(batch.records), retryable=True, code="Splunk.ServerError",
                                     message="503 server busy")

    asyncio.run(run(tmp_path, clock, 10, "splunk-failed", deliver, [b"x", b"y"],
                    lambda rt: rt.delivered_records == 1 and rt.archived_records == 1))
    assert 3 <= len(attempts) <= 5  # about 10 s of the stream's clock after the first failure
    (doc,) = error_docs(tmp_path, "splunk-failed")
    assert base64.b64decode(doc["rawData"]) == b"x"
    assert doc["errorCode"] == "Splunk.ServerError" and doc["attemptsMade"] == len(attempts)


def test_zero_retry_duration_archives_after_one_attempt(tmp_path: Path) -> None:
    clock = ManualClock()
    attempts: list[int] = []

    async def deliver(batch: Batch) -> DeliveryResult:
        attempts.append(len(batch.records))
        return DeliveryResult.all_failed(len(batch.records), retryable=True,
                                     code="HttpEndpoint.DestinationException", message="500")

    asyncio.run(run(tmp_path, clock, 0, "http-endpoint-failed", deliver, [b"x", b"y"], lambda rt: rt.archived_records == 2))
    assert attempts == [2]
    assert len(error_docs(tmp_path, "http-endpoint-failed")) == 2
