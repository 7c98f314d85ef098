"""The archiver: failed records, as Firehose error records, to the archive destination.

Owns: the error-record format (:func:`error_record_line`, reference §4.2 and §5), the keys of
error records split off a sealed batch at delivery (derived from the batch identity, so a replay
overwrites them), retrying an archive write without limit, and the count of archived records.

Calls: the archive destination (the stream's ``backup:``, else its destination) through
``archive_key`` and ``deliver``; reports every attempt to its :class:`DeliveryHealth`.
"""

from __future__ import annotations

import asyncio
import base64
import random
import zlib
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from firehose.interfaces import Batch, Destination, RecordFailure, archive_of
from firehose.log import SealedBatch
from firehose.records import ErrorInfo
from firehose.retry import local_failure_pause
from firehose.stages.common import StageContext
from firehose.stages.health import DeliveryHealth


def error_record_line(data: bytes, err: dict[str, Any] | ErrorInfo) -> bytes:
    """One Firehose error record (reference §4.2), a JSON document per line. ``rawData`` is the
    record as it was before the failing stage. ``err`` is why (or its compact spool form, see
    :class:`firehose.records.ErrorInfo`)."""
    info = err if isinstance(err, ErrorInfo) else ErrorInfo.decode(err)
    if info.output_type == "format-conversion-failed":
        # Firehose spells these two with capitals in format-conversion error records (§5).
        doc: dict[str, Any] = {
            "attemptsMade": info.attempts,
            "arrivalTimestamp": info.arrival_ms,
            "ErrorCode": info.code,
            "ErrorMessage": info.message,
            "attemptEndingTimestamp": info.end_ms,
            "rawData": base64.b64encode(data).decode("ascii"),
        }
        for key in ("sequenceNumber", "subSequenceNumber"):
            if key in info.extra:
                doc[key] = info.extra[key]
        return orjson.dumps(doc) + b"\n"
    doc = {
        "attemptsMade": info.attempts,
        "arrivalTimestamp": info.arrival_ms,
        "errorCode": info.code,
        "errorMessage": info.message,
        "attemptEndingTimestamp": info.end_ms,
        "rawData": base64.b64encode(data).decode("ascii"),
    }
    if info.lambda_arn and info.output_type == "processing-failed":
        doc["lambdaArn"] = info.lambda_arn
    if info.fields:  # a destination's own members (esDocumentId, EventId, ...), before rawData
        raw = doc.pop("rawData")
        doc.update(info.fields)
        doc["rawData"] = raw
    return orjson.dumps(doc) + b"\n"


class Archiver:
    """Writes error records of one stream to its archive destination; never gives up."""

    def __init__(self, ctx: StageContext, destination: Destination, health: DeliveryHealth) -> None:
        self.name, self.clock, self.metrics, self.log = ctx.name, ctx.clock, ctx.metrics, ctx.log
        self.destination = destination
        self.health = health
        self.archived_records = 0

    def count(self, records: int, output_type: str) -> None:
        """``records`` of ``output_type`` (``processing-failed``, ...) reached the archive."""
        self.archived_records += records
        self.metrics.archived_records.labels(self.name).inc(records)
        self.metrics.archived_by_type.labels(self.name, output_type).inc(records)

    async def archive_failed(
        self, sealed: SealedBatch, error_output_type: str, records: Sequence[bytes],
        items: list[tuple[int, RecordFailure]], attempt: int,
    ) -> None:
        """Archive records a destination failed: ``items`` are (position in the sealed batch, its
        failure), each failure in its own error record."""
        now = self.clock.now_ms()
        lines = []
        for pos, f in items:
            err = ErrorInfo(f.error_code, f.error_message, error_output_type, attempt, sealed.oldest_arrival_ms,
                            now, fields=f.fields)
            lines.append(error_record_line(records[pos], err))
        await self.archive_lines(sealed, error_output_type, lines, [pos for pos, _ in items])

    async def archive_lines(
        self, sealed: SealedBatch, error_output_type: str, lines: list[bytes], positions: list[int] | None = None
    ) -> None:
        """Archive error records split off a sealed batch at delivery. The key derives from the
        batch identity (and which of its records, when a batch archives several times), so a
        replay overwrites it; archiving never gives up."""
        oldest = datetime.fromtimestamp(sealed.oldest_arrival_ms / 1000.0, tz=UTC)
        which = "" if positions is None else f":{zlib.crc32(array('q', positions).tobytes())}:{len(positions)}"
        rng = random.Random(f"{self.name}:{sealed.batch_id}:{sealed.key}:{error_output_type}{which}")
        key = archive_of(self.destination).archive_key(oldest, rng, error_output_type)
        batch = Batch(self.name, sealed.batch_id, key, lines, sealed.oldest_arrival_ms, archive=True)
        attempt = 0
        while not (result := await self.destination.deliver(batch)).ok:
            first = next(iter(result.failures.values()))
            self.health.failed(first.error_code, first.error_message, self.clock.now_ms())
            attempt += 1
            self.log.warning("archive_retry_scheduled", batch_id=sealed.batch_id, key=key, attempt=attempt,
                             error_code=first.error_code)
            await asyncio.sleep(local_failure_pause(attempt))
        self.health.succeeded()
        self.count(len(lines), error_output_type)
