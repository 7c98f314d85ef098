"""The delivery runner on its own, over a real log (the file spool, and the in-memory log): batches delivered and committed, at most
``max_in_flight`` at once, partial failures resent, rejected records archived at once, retry
windows, and what a stop leaves behind."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from firehose.clock import ManualClock
from firehose.config import StreamConfig, load_config_text
from firehose.interfaces import Batch, DeliveryResult, Destination, RecordFailure
from firehose.log import SealedBatch
from firehose.metrics import Metrics
from firehose.stages.archiver import Archiver
from firehose.stages.common import PendingBatch, StageContext
from firehose.stages.delivery import DeliveryRunner
from firehose.stages.health import DeliveryHealth

ARRIVAL = 1_714_566_000_000
Script = Callable[[Batch], Awaitable[DeliveryResult]]


async def ok(batch: Batch) -> DeliveryResult:
    return DeliveryResult.delivered()


class Dest(Destination):
    """A destination whose answers come from ``script``; it records every batch it is sent."""

    def __init__(self, script: Script = ok) -> None:
        self.script = script
        self.batches: list[Batch] = []

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return "key"

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        return f"{error_output_type}/{rng.getrandbits(32):08x}"

    async def deliver(self, batch: Batch) -> DeliveryResult:
        self.batches.append(batch)
        return await self.script(batch)


class Setup:
    """A runner over a fresh spool, its destination and archive, and what it reports."""

    def __init__(self, tmp: Path, make_log: Any, dest: Dest, *, delivery: str = "", dp: bool = False) -> None:
        extra = "\n    dynamic_partitioning: {enabled: true, retry_duration_secs: 10}" if dp else ""
        prefix = ', prefix: "c=!{partitionKeyFromQuery:c}/", error_output_prefix: "e/"' if dp else ""
        processing = "\n    processing: [{type: metadata_extraction, query: '{c: .c}'}]" if dp else ""
        text = f"""
streams:
  - name: s
    delivery: {{retry_initial_backoff_ms: 1, retry_max_backoff_ms: 2{delivery}}}{extra}{processing}
    destination: {{type: local, path: {tmp / 'out'}{prefix}}}
"""
        self.config: StreamConfig = load_config_text(text, "t.yaml", {}).streams[0]
        self.clock = ManualClock()
        self.spool = make_log("spool")
        asyncio.run(self.spool.open())
        self.dest = dest
        self.archive = Dest()
        self.health = DeliveryHealth("destination")
        self.archive_health = DeliveryHealth("backup")
        self.released: list[tuple[str, ...]] = []
        self.ctx = StageContext("s", self.clock, Metrics(), structlog.get_logger(), rng=random.Random(1))
        self.archiver = Archiver(self.ctx, self.archive, self.archive_health)
        self.runner = DeliveryRunner(self.ctx, self.config, self.spool, dest, self.archiver, self.health,
                                     routing_error=self.routing_error, release_partition=self.released.append)

    @staticmethod
    def routing_error(meta: Any, sealed: SealedBatch, record: bytes) -> dict[str, Any]:
        return {"t": "partitioning-failed", "c": "Routed", "m": f"meta {meta}", "ts": sealed.oldest_arrival_ms}

    async def seal(self, records: list[bytes], *, info: dict[str, Any] | None = None, meta: list[Any] | None = None,
                   keep: bool = True, partition: tuple[str, ...] | None = None) -> PendingBatch:
        first = await self.spool.append(records, ARRIVAL, meta=meta)
        sealed = SealedBatch(self.spool.allocate_batch_id(), f"key-{first}", [(first, first + len(records))],
                             ARRIVAL, info or {})
        await self.spool.seal([sealed])
        pending = PendingBatch(sealed, list(records) if keep else None, partition=partition)
        self.runner.add(pending)
        return pending


async def settle(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_batches_are_delivered_committed_and_counted(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, Dest())

    async def go() -> None:
        await s.seal([b"a", b"b"])
        await s.seal([b"c"], keep=False)  # read back from the log
        await s.seal([b"d"], partition=("x",))
        s.runner.signals.batcher.clear()
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        assert s.runner.signals.batcher.is_set()  # room: the batcher may seal more
        await s.spool.aclose()

    asyncio.run(go())
    # Delivered concurrently (two at a time by default), each under its sealed key.
    assert sorted((b.key, list(b.records)) for b in s.dest.batches) == [
        ("key-0", [b"a", b"b"]), ("key-2", [b"c"]), ("key-3", [b"d"])]
    assert s.runner.delivered_records == 4 and s.released == [("x",)]
    again = make_log("spool")
    assert asyncio.run(again.open()).pending == []  # committed: nothing to re-send after a restart


def test_at_most_max_in_flight_deliveries_run_and_room_is_max_in_flight_plus_one(tmp_path: Path, make_log: Any) -> None:
    gate = asyncio.Event()
    running = 0
    peak = 0

    async def slow(batch: Batch) -> DeliveryResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return DeliveryResult.delivered()

    s = Setup(tmp_path, make_log, Dest(slow), delivery=", max_in_flight: 2")

    async def go() -> None:
        for i in range(3):
            await s.seal([b"%d" % i])
            assert s.runner.has_room() == (i < 2)
        s.runner.dispatch()
        await asyncio.sleep(0.05)
        assert peak == 2 and s.runner.oldest_ms() == ARRIVAL
        gate.set()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert peak == 2 and s.runner.delivered_records == 3 and s.runner.oldest_ms() is None


def test_a_batch_whose_seal_is_not_durable_waits(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, Dest())

    async def go() -> None:
        pending = await s.seal([b"a"])
        pending.durable = False
        assert s.runner.not_durable() == [pending]
        s.runner.dispatch()
        await asyncio.sleep(0.02)
        assert s.dest.batches == []
        s.runner.mark_durable([pending])
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert len(s.dest.batches) == 1


def test_partial_failures_resend_only_the_failed_records_with_their_positions(tmp_path: Path, make_log: Any) -> None:
    answers = [DeliveryResult({1: RecordFailure(True, "Throttled", "slow down"), 3: RecordFailure(True, "T", "x")}),
               DeliveryResult({0: RecordFailure(True, "Throttled", "again")})]

    async def flaky(batch: Batch) -> DeliveryResult:
        return answers.pop(0) if answers else DeliveryResult.delivered()

    s = Setup(tmp_path, make_log, Dest(flaky))

    async def go() -> None:
        await s.seal([b"a", b"b", b"c", b"d", b"e"])
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    sent = [(list(b.records), b.indices, b.attempt) for b in s.dest.batches]
    assert sent == [([b"a", b"b", b"c", b"d", b"e"], None, 1), ([b"b", b"d"], [1, 3], 2), ([b"b"], [1], 3)]
    assert s.runner.delivered_records == 5
    assert s.health.failing_since_ms is None  # the last attempt succeeded
    assert s.health.last_error is not None and s.health.last_error.code == "Throttled"
    assert s.ctx.metrics.delivery_records.labels("s")._value.get() == 5
    assert s.ctx.metrics.delivery_retries.labels("s")._value.get() == 2


def test_rejected_records_are_archived_at_once_and_a_window_archives_the_rest(tmp_path: Path, make_log: Any) -> None:
    async def refuse(batch: Batch) -> DeliveryResult:
        s.clock.advance(4)
        if batch.attempt == 1:
            return DeliveryResult({0: RecordFailure(False, "400", "mapping", {"esDocumentId": "k.0"}),
                                   2: RecordFailure(True, "503", "busy")})
        return DeliveryResult.all_failed(len(batch.records), retryable=True, code="503", message="busy")

    dest = Dest(refuse)
    dest.retry_duration_secs = 10
    dest.error_output_type = "AmazonOpenSearchService-failed"
    s = Setup(tmp_path, make_log, dest)

    async def go() -> None:
        await s.seal([b"a", b"b", b"c"])
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert 3 <= len(dest.batches) <= 5  # about 10 s of the clock after the first failure
    archived = [orjson.loads(line) for b in s.archive.batches for line in b.records]
    assert [(base64.b64decode(d["rawData"]), d["errorCode"]) for d in archived] == [(b"a", "400"), (b"c", "503")]
    assert archived[0]["esDocumentId"] == "k.0"
    assert {b.key.split("/")[0] for b in s.archive.batches} == {"AmazonOpenSearchService-failed"}
    assert s.runner.delivered_records == 1 and s.archiver.archived_records == 2


def test_a_partitions_batch_is_archived_as_delivery_failed_after_its_retry_duration(tmp_path: Path, make_log: Any) -> None:
    async def denied(batch: Batch) -> DeliveryResult:
        s.clock.advance(3)
        return DeliveryResult.all_failed(len(batch.records), retryable=True, code="S3.AccessDenied", message="no")

    s = Setup(tmp_path, make_log, Dest(denied), dp=True)

    async def go() -> None:
        await s.seal([b"x", b"y"], partition=("b",))
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert 3 <= len(s.dest.batches) <= 5
    docs = [orjson.loads(line) for b in s.archive.batches for line in b.records]
    assert [base64.b64decode(d["rawData"]) for d in docs] == [b"x", b"y"]
    assert {(d["errorCode"], d["attemptsMade"]) for d in docs} == {("S3.AccessDenied", len(s.dest.batches))}
    assert s.archive.batches[0].key.startswith("delivery-failed/")
    assert s.runner.delivered_records == 0 and s.released == [("b",)]
    assert s.health.failing_since_ms is not None  # the prefix never went through


def test_an_archive_batch_read_back_gets_its_error_records_rebuilt(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, Dest())
    err = {"t": "processing-failed", "c": "Lambda.X", "m": "bad", "a": 1, "ts": 5, "e": 6}

    async def go() -> None:
        await s.seal([b"p", b"q"], info={"sink": "archive", "type": "processing-failed"}, keep=False,
                     meta=[{"err": err}, {"pk": {}}])
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert s.dest.batches == []
    (batch,) = s.archive.batches
    assert batch.archive and batch.key == "key-0"
    docs = [orjson.loads(line) for line in batch.records]
    assert [(d["errorCode"], base64.b64decode(d["rawData"])) for d in docs] == [("Lambda.X", b"p"), ("Routed", b"q")]
    assert docs[1]["errorMessage"] == "meta {'pk': {}}"
    assert s.archiver.archived_records == 2 and s.runner.delivered_records == 0


def test_a_local_error_is_retried_after_a_pause_and_shows_in_health(tmp_path: Path, make_log: Any, monkeypatch: Any) -> None:
    calls = 0

    async def broken(batch: Batch) -> DeliveryResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk on fire")
        return DeliveryResult.delivered()

    s = Setup(tmp_path, make_log, Dest(broken))
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def no_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    async def go() -> None:
        await s.seal([b"a"])
        monkeypatch.setattr(asyncio, "sleep", no_sleep)
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        monkeypatch.undo()
        await s.spool.aclose()

    asyncio.run(go())
    assert calls == 2 and 1.0 in slept
    assert s.health.last_error is not None
    assert (s.health.last_error.code, s.health.last_error.message) == ("Daemon.DeliveryFailed", "OSError: disk on fire")
    assert s.health.failing_since_ms is None and s.runner.delivered_records == 1


def test_drain_stops_at_the_deadline_and_leaves_the_batch_sealed(tmp_path: Path, make_log: Any) -> None:
    async def never(batch: Batch) -> DeliveryResult:
        await asyncio.Event().wait()
        raise AssertionError

    s = Setup(tmp_path, make_log, Dest(never))

    async def go() -> None:
        await s.seal([b"a"])
        s.runner.signals.stopping = True
        assert await s.runner.drain(time.monotonic() + 0.05) is False
        assert len(s.runner.pending) == 1 and s.runner.pending[0].task is None
        await s.spool.aclose()

    asyncio.run(go())
    again = make_log("spool")
    assert [b.key for b in asyncio.run(again.open()).pending] == ["key-0"]  # re-sent under its key after a restart


@pytest.mark.parametrize("ordered", [True, False])
def test_an_ordered_destination_is_entered_in_seal_order_whatever_the_reads_take(
        tmp_path: Path, make_log: Any, ordered: bool) -> None:
    """The first batch is read back from the log slowly, the second is held in memory: an
    ordered destination (Iceberg) still sees the first one's deliver() start first; another
    sees whichever is ready first."""
    entered: list[str] = []

    class Ordered(Dest):
        ordered_delivery = ordered

        async def deliver(self, batch: Batch) -> DeliveryResult:
            entered.append(batch.key)  # before any await: what the destination orders by
            return await super().deliver(batch)

    s = Setup(tmp_path, make_log, Ordered())
    read = s.spool.read_records

    async def slow_read(ranges: Any) -> list[bytes]:
        await asyncio.sleep(0.2)
        return await read(ranges)

    s.spool.read_records = slow_read  # type: ignore[method-assign]

    async def go() -> None:
        await s.seal([b"first"], keep=False)
        await s.seal([b"second"])
        s.runner.dispatch()
        await settle(lambda: not s.runner.pending)
        await s.spool.aclose()

    asyncio.run(go())
    assert entered == (["key-0", "key-1"] if ordered else ["key-1", "key-0"])
