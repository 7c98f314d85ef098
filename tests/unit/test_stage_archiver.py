"""The archiver stage on its own: Firehose's error-record format, keys derived from the batch
identity, and archiving that retries until the archive destination takes the records."""

from __future__ import annotations

import asyncio
import base64
import random
from datetime import datetime
from typing import Any

import orjson
import structlog
from structlog.testing import capture_logs

from firehose.clock import ManualClock
from firehose.interfaces import Batch, DeliveryResult, Destination, RecordFailure
from firehose.metrics import Metrics
from firehose.spool import SealedBatch
from firehose.stages.archiver import Archiver, error_record_line
from firehose.stages.common import StageContext
from firehose.stages.health import DeliveryHealth


class Archive(Destination):
    """An archive destination that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[Batch] = []

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return f"src/{rng.random()}"

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        return f"{error_output_type}/{oldest_arrival:%Y/%m/%d/%H}/{rng.getrandbits(32):08x}"

    async def deliver(self, batch: Batch) -> DeliveryResult:
        self.batches.append(batch)
        if self.failures:
            self.failures -= 1
            return DeliveryResult.all_failed(len(batch.records), retryable=True, code="S3.SlowDown",
                                             message="please reduce your request rate")
        return DeliveryResult.delivered()


def make(archive: Archive, clock: ManualClock | None = None) -> tuple[Archiver, DeliveryHealth, Metrics]:
    metrics = Metrics()
    health = DeliveryHealth("backup")
    ctx = StageContext("s", clock or ManualClock(), metrics, structlog.get_logger())
    return Archiver(ctx, archive, health), health, metrics


SEALED = SealedBatch(7, "2024/05/01/12/s-1-x", [(0, 4)], 1_714_566_000_000, {})


def test_error_records_follow_firehoses_format() -> None:
    err = {"c": "Lambda.FunctionError", "m": "boom", "t": "processing-failed", "a": 3, "ts": 1, "e": 2,
           "l": "arn:aws:lambda:us-east-1:000000000000:function:f"}
    doc = orjson.loads(error_record_line(b"raw", err))
    assert list(doc) == ["attemptsMade", "arrivalTimestamp", "errorCode", "errorMessage", "attemptEndingTimestamp",
                         "rawData", "lambdaArn"]
    assert (doc["attemptsMade"], doc["errorCode"], base64.b64decode(doc["rawData"])) == (3, "Lambda.FunctionError", b"raw")
    # Format conversion errors capitalise two members and carry a Kinesis record's sequence numbers.
    conv = orjson.loads(error_record_line(b"x", {"t": "format-conversion-failed", "c": "DataFormatConversion.Bad",
                                                 "m": "no", "sequenceNumber": "49", "subSequenceNumber": 0}))
    assert (conv["ErrorCode"], conv["ErrorMessage"], conv["sequenceNumber"]) == ("DataFormatConversion.Bad", "no", "49")
    assert "lambdaArn" not in conv and conv["attemptsMade"] == 1
    # A destination's own members come before rawData; the Lambda ARN only for processing failures.
    es = orjson.loads(error_record_line(b"d", {"t": "AmazonOpenSearchService-failed", "c": "400", "m": "m",
                                               "l": "arn", "x": {"esDocumentId": "k.1"}}))
    assert list(es)[-2:] == ["esDocumentId", "rawData"] and "lambdaArn" not in es
    assert error_record_line(b"", {}).endswith(b"\n")


def test_archived_lines_get_a_key_derived_from_the_batch_and_the_records() -> None:
    archive = Archive()
    archiver, health, metrics = make(archive)

    async def go() -> None:
        await archiver.archive_lines(SEALED, "splunk-failed", [b"a\n"])
        await archiver.archive_lines(SEALED, "splunk-failed", [b"a\n"])  # a replay: the same key
        await archiver.archive_lines(SEALED, "splunk-failed", [b"b\n"], positions=[1])
        await archiver.archive_lines(SEALED, "splunk-failed", [b"b\n"], positions=[2])

    asyncio.run(go())
    keys = [b.key for b in archive.batches]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    assert all(k.startswith("splunk-failed/2024/05/01/12/") for k in keys)
    assert all(b.archive and b.batch_id == 7 for b in archive.batches)
    assert archiver.archived_records == 4
    assert metrics.archived_records.labels("s")._value.get() == 4
    assert health.last_error is None


def test_failed_records_are_archived_each_with_its_own_failure() -> None:
    archive = Archive()
    archiver, _, _ = make(archive)
    items = [(1, RecordFailure(False, "400", "mapper_parsing_exception", {"esDocumentId": "k.1"})),
             (3, RecordFailure(True, "429", "busy"))]
    asyncio.run(archiver.archive_failed(SEALED, "AmazonOpenSearchService-failed", [b"a", b"b", b"c", b"d"], items, 2))
    (batch,) = archive.batches
    docs = [orjson.loads(line) for line in batch.records]
    assert [base64.b64decode(d["rawData"]) for d in docs] == [b"b", b"d"]
    assert [(d["errorCode"], d["attemptsMade"], d["arrivalTimestamp"]) for d in docs] == [
        ("400", 2, SEALED.oldest_arrival_ms), ("429", 2, SEALED.oldest_arrival_ms)]
    assert docs[0]["esDocumentId"] == "k.1" and "esDocumentId" not in docs[1]
    assert batch.key.startswith("AmazonOpenSearchService-failed/")


def test_archiving_retries_until_the_archive_takes_the_records_and_reports_its_health(monkeypatch: Any) -> None:
    clock = ManualClock()
    archive = Archive(failures=2)
    archiver, health, _ = make(archive, clock)
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def no_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    async def go() -> None:
        monkeypatch.setattr(asyncio, "sleep", no_sleep)
        with capture_logs() as logs:
            task = asyncio.create_task(archiver.archive_lines(SEALED, "processing-failed", [b"x\n"]))
            while len(archive.batches) < 2:
                await real_sleep(0)
            assert health.failing_since_ms == clock.now_ms()
            assert health.last_error is not None and health.last_error.code == "S3.SlowDown"
            await task
        assert [e["attempt"] for e in logs if e["event"] == "archive_retry_scheduled"] == [1, 2]

    asyncio.run(go())
    assert len(archive.batches) == 3 and len({b.key for b in archive.batches}) == 1
    assert slept == [1.0, 2.0]  # backoff, never a tight loop
    assert health.failing_since_ms is None and archiver.archived_records == 1
