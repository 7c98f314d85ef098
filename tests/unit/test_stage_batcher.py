"""The batcher on its own, reading a real log (the file spool, and the in-memory log): buffers sealed on size, on time and on stop,
back-pressure from the delivery runner, routed records (error records, source copies,
partitions), records sealed before a restart skipped, and a failed seal retried."""

from __future__ import annotations

import asyncio
import base64
import errno
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from firehose.clock import ManualClock
from firehose.config import load_config_text
from firehose.interfaces import Batch, BuildContext, DeliveryResult, Destination
from firehose.log import SealedBatch
from firehose.metrics import Metrics
from firehose.stages.batcher import SOURCE_BACKUP, Batcher, routes
from firehose.stages.common import PendingBatch, StageContext
from firehose.stages.router import PartitionRouter

ARRIVAL = 1_714_566_000_000  # ManualClock's epoch


class Runner:
    """Stands in for the delivery runner: takes sealed batches; has room while it holds no more
    than ``max_pending`` (None: always)."""

    def __init__(self) -> None:
        self.pending: list[PendingBatch] = []
        self.max_pending: int | None = None
        self.dispatched = 0

    def add(self, pending: PendingBatch) -> None:
        self.pending.append(pending)

    def has_room(self) -> bool:
        return self.max_pending is None or len(self.pending) <= self.max_pending

    def not_durable(self) -> list[PendingBatch]:
        return [p for p in self.pending if not p.durable]

    def mark_durable(self, batches: list[PendingBatch]) -> None:
        for p in batches:
            p.durable = True

    def dispatch(self) -> None:
        self.dispatched += 1


class Keys(Destination):
    """Keys name the batch's oldest arrival and the kind of buffer."""

    def batch_key(self, oldest_arrival: datetime, rng: random.Random, partition_keys: Any = None) -> str:
        return f"main/{oldest_arrival:%H%M%S}" if partition_keys is None else f"part/{partition_keys}"

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        return f"{error_output_type}/{oldest_arrival:%H%M%S}"

    async def deliver(self, batch: Batch) -> DeliveryResult:
        raise AssertionError("the batcher never delivers")


class Backup(Keys):
    def batch_key(self, oldest_arrival: datetime, rng: random.Random, partition_keys: Any = None) -> str:
        return f"source/{oldest_arrival:%H%M%S}"


class Setup:
    def __init__(self, tmp: Path, make_log: Any, *, size_mib: int = 1, interval: int = 60,
                 partitioned: bool = False) -> None:
        self.clock = ManualClock()
        self.ctx = StageContext("s", self.clock, Metrics(), structlog.get_logger(), rng=random.Random(1))
        self.spool = make_log("spool")
        self.recovery = asyncio.run(self.spool.open())
        self.runner = Runner()
        if partitioned:
            text = f"""
streams:
  - name: s
    buffering: {{size_mib: {size_mib}, interval_secs: {interval}}}
    dynamic_partitioning: {{enabled: true}}
    processing: [{{type: metadata_extraction, query: '{{c: .c}}'}}]
    destination: {{type: local, path: {tmp / 'out'}, prefix: "c=!{{partitionKeyFromQuery:c}}/",
                   error_output_prefix: "err/!{{firehose:error-output-type}}/"}}
"""
        else:
            text = f"""
streams:
  - name: s
    buffering: {{size_mib: {size_mib}, interval_secs: {interval}}}
    destination: {{type: local, path: {tmp / 'out'}}}
"""
        config = load_config_text(text, "t.yaml", {}).streams[0]
        if partitioned:
            destination: Destination = config.destination.build(BuildContext("s", 1, "us-east-1", "0", str(tmp)))
        else:
            destination = Keys()
        self.router = PartitionRouter.for_stream(self.ctx, config, destination)
        self.batcher = Batcher(self.ctx, config, self.spool, destination, Backup(), self.router,
                               self.runner)  # type: ignore[arg-type]

    async def put(self, records: list[bytes], meta: list[Any] | None = None) -> int:
        return await self.spool.append(records, self.clock.now_ms(), meta=meta)

    def sealed(self) -> list[SealedBatch]:
        return [p.sealed for p in self.runner.pending]


def _count(batch: SealedBatch) -> int:
    return sum(e - s for s, e in batch.ranges)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_buffer_is_sealed_when_the_next_record_would_not_fit(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, size_mib=1)
    rec = b"x" * 100_000

    async def go() -> None:
        for _ in range(25):
            await s.put([rec])
        await s.batcher.pump()
        await s.spool.aclose()

    run(go())
    # Ten records fit in 1 MiB, the eleventh would not: two batches, five records still buffered.
    assert [(_count(b), b.info["bytes"], b.key) for b in s.sealed()] == [
        (10, 1_000_000, "main/122000"), (10, 1_000_000, "main/122000")]
    assert [list(b.ranges) for b in s.sealed()] == [[(0, 10)], [(10, 20)]]
    assert all(p.records == [rec] * 10 and p.durable for p in s.runner.pending)
    assert s.batcher.buffered_records == 5 and s.batcher.caught_up and s.runner.dispatched == 2
    again = make_log("spool")  # a restart: the seals are durable
    assert [b.key for b in run(again.open()).pending] == ["main/122000", "main/122000"]


def test_a_record_larger_than_the_buffer_goes_out_on_its_own(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, size_mib=1)

    async def go() -> None:
        await s.put([b"a", b"x" * 1_100_000, b"b"])
        await s.batcher.pump()
        await s.spool.aclose()

    run(go())
    assert [list(b.ranges) for b in s.sealed()] == [[(0, 1)], [(1, 2)]]
    assert s.batcher.buffered_records == 1


def test_without_room_the_batcher_stops_reading_and_resumes_where_it_stopped(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, size_mib=1)
    rec = b"y" * 500_000

    async def go() -> None:
        await s.put([rec] * 10)  # one frame
        s.runner.max_pending = 0
        await s.batcher.pump()
        # It sealed the first full buffer, then stopped mid-frame: the rest stays on disk.
        assert [list(b.ranges) for b in s.sealed()] == [[(0, 2)]]
        assert s.batcher.cursor == 2 and not s.batcher.caught_up
        s.runner.max_pending = None
        await s.batcher.pump()
        await s.spool.aclose()

    run(go())
    assert [list(b.ranges) for b in s.sealed()] == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]]
    assert s.batcher.buffered_records == 2


def test_buffers_are_sealed_on_time_by_the_clock(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, interval=300)

    async def go() -> None:
        await s.put([b"a"])
        s.clock.advance(100)
        await s.put([b"b"])
        await s.batcher.pump()
        assert s.batcher.oldest_ms() == ARRIVAL
        s.clock.advance(199)
        await s.batcher.seal_due()
        assert s.sealed() == []
        s.clock.advance(1)
        await s.batcher.seal_due()
        await s.spool.aclose()

    run(go())
    (batch,) = s.sealed()
    assert _count(batch) == 2 and batch.oldest_arrival_ms == ARRIVAL and s.batcher.oldest_ms() is None


def test_the_loop_reads_when_woken(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, interval=0)

    async def go() -> None:
        s.batcher.start(s.spool.min_seq)
        await s.put([b"now"])
        s.ctx.signals.batcher.set()
        for _ in range(200):
            if s.runner.pending:
                break
            await asyncio.sleep(0.01)
        s.ctx.signals.stopping = True
        await s.batcher.cancel()
        await s.spool.aclose()

    run(go())
    assert [p.records for p in s.runner.pending] == [[b"now"]]


def test_failed_records_and_source_copies_go_to_their_own_buffers(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log)
    err = {"t": "processing-failed", "c": "Lambda.X", "m": "bad", "a": 2, "ts": ARRIVAL, "e": ARRIVAL}
    metas = [None, {"err": err}, {"src": 1}, {"kinesis": {"sequenceNumber": "1"}}]
    assert routes(metas) and not routes([None, {"kinesis": {}}])

    async def go() -> None:
        await s.put([b"ok", b"failed", b"copy", b"ok2"], meta=metas)
        await s.batcher.pump()
        assert s.batcher.buffered_records == 4
        await s.batcher.seal_all(deadline=float("inf"))
        await s.spool.aclose()

    run(go())
    by_key = {p.sealed.key: p for p in s.runner.pending}
    assert set(by_key) == {"main/122000", "processing-failed/122000", "source/122000"}
    assert by_key["main/122000"].records == [b"ok", b"ok2"]
    assert list(by_key["main/122000"].sealed.ranges) == [(0, 1), (3, 4)]
    failed = by_key["processing-failed/122000"]
    assert failed.sealed.info["sink"] == "archive" and failed.sealed.info["type"] == "processing-failed"
    (doc,) = [orjson.loads(line) for line in failed.records or []]
    assert (doc["errorCode"], doc["attemptsMade"], base64.b64decode(doc["rawData"])) == ("Lambda.X", 2, b"failed")
    assert by_key["source/122000"].sealed.info["sink"] == "source" and by_key["source/122000"].records == [b"copy"]
    assert SOURCE_BACKUP not in by_key


def test_records_sealed_before_a_restart_are_not_batched_again(tmp_path: Path, make_log: Any) -> None:
    first = Setup(tmp_path, make_log)

    async def seal_some() -> None:
        await first.put([b"a", b"b", b"c", b"d"])
        await first.spool.seal([SealedBatch(first.spool.allocate_batch_id(), "old", [(1, 3)], ARRIVAL)])
        await first.spool.aclose()

    run(seal_some())
    s = Setup(tmp_path, make_log)  # the same spool, recovered
    assert [b.key for b in s.recovery.pending] == ["old"]

    async def go() -> None:
        await s.batcher.pump()
        await s.batcher.seal_all(deadline=float("inf"))
        await s.spool.aclose()

    run(go())
    (batch,) = s.sealed()
    assert list(batch.ranges) == [(0, 1), (3, 4)]


def test_partitions_are_sealed_together_with_one_fsync_and_their_keys(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, interval=60, partitioned=True)
    pk = "partitionKeyFromQuery:c"

    async def go() -> None:
        await s.put([b"1", b"2", b"3", b"4"], meta=[{"pk": {pk: "a"}}, {"pk": {pk: "b"}}, {"pk": {pk: "a"}}, {"pk": {}}])
        await s.batcher.pump()
        assert (s.router.open_partitions, s.router.buffered_records, s.batcher.buffered_records) == (2, 3, 4)
        s.clock.advance(60)
        await s.batcher.seal_due()
        await s.spool.aclose()

    run(go())
    by_part = {p.partition: p for p in s.runner.pending}
    assert set(by_part) == {("a",), ("b",), None}
    assert by_part[("a",)].records == [b"1", b"3"] and by_part[("a",)].sealed.info["p"] == ["a"]
    assert by_part[("a",)].sealed.key.startswith("c=a/2024/05/01/12/")
    assert by_part[None].sealed.info["type"] == "partitioning-failed"  # the record with no key
    assert all(p.durable for p in s.runner.pending)
    assert s.router.active_partitions == 2  # the batches count until they are delivered
    flushes = s.ctx.metrics.partition_flushes.labels("s", "interval")._value.get()
    assert flushes == 2


def test_a_seal_that_cannot_be_written_leaves_the_buffer_to_be_sealed_again(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, interval=0)
    real = s.spool.seal
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    async def flaky(batches: list[SealedBatch]) -> None:
        if failures:
            raise failures.pop()
        await real(batches)

    s.spool.seal = flaky

    async def go() -> None:
        await s.put([b"a", b"b"])
        await s.batcher.pump()
        try:
            await s.batcher.seal_due()
        except OSError:
            pass
        assert s.sealed() == [] and s.batcher.buffered_records == 2
        await s.batcher.seal_due()
        await s.spool.aclose()

    run(go())
    (batch,) = s.sealed()
    assert _count(batch) == 2 and list(batch.ranges) == [(0, 2)]


def test_the_stop_seals_records_the_batcher_had_not_read_yet(tmp_path: Path, make_log: Any) -> None:
    """Records acknowledged just before a stop, before the batcher's loop had a turn, are read
    and sealed by the stop itself: a clean stop leaves nothing acknowledged unsealed."""
    s = Setup(tmp_path, make_log)

    async def go() -> None:
        await s.put([b"a", b"b"])
        s.ctx.signals.stopping = True  # the stream is stopping: the loop reads no more
        await s.batcher.seal_all(deadline=float("inf"))
        await s.spool.aclose()

    run(go())
    assert [list(b.ranges) for b in s.sealed()] == [[(0, 2)]]


def test_frames_no_longer_in_memory_are_batched_by_their_sizes_and_read_back_at_delivery(tmp_path: Path) -> None:
    """A frame the log no longer holds in memory goes to the main buffer by its record sizes
    alone (one small read of its length table): the batches are cut exactly where they are when
    every frame is in memory, hold no records, and read back from the log as the records sent.
    A frame with per-record metadata is still read whole."""
    from firehose.filelog import FileLog

    rng = random.Random(7)
    frames = [[rng.randbytes(rng.choice([1, 300, 9_000, 120_000, 700_000])) for _ in range(rng.randrange(1, 30))]
              for _ in range(40)]
    kinesis = {"kinesis": {"partitionKey": "p", "sequenceNumber": "1", "approximateArrivalTimestamp": 1}}

    def batches(cache_bytes: int, name: str) -> tuple[list[tuple[list[tuple[int, int]], int]], list[list[bytes]]]:
        s = Setup(tmp_path, lambda _n: FileLog(str(tmp_path / name), cache_bytes=cache_bytes), size_mib=1)

        async def go() -> list[list[bytes]]:
            for i, recs in enumerate(frames):
                await s.put(recs, [kinesis] * len(recs) if i % 7 == 3 else None)
            await s.batcher.pump()
            held = []
            for p in s.runner.pending:
                held.append(p.records if p.records is not None else await s.spool.read_records(p.sealed.ranges))
            await s.spool.aclose()
            return held

        held = run(go())
        cuts = [(list(p.sealed.ranges), p.sealed.info["bytes"]) for p in s.runner.pending]
        if cache_bytes == 0:  # every batch but those of whole metadata frames is read back
            assert sum(p.records is None for p in s.runner.pending) >= len(s.runner.pending) - 6
        else:
            assert all(p.records is not None for p in s.runner.pending)
        return cuts, held

    in_memory, held_in_memory = batches(1 << 30, "cached")
    by_sizes, read_back = batches(0, "sized")
    assert by_sizes == in_memory and len(in_memory) > 10
    assert read_back == held_in_memory
    flat = [r for recs in frames for r in recs]
    assert [r for recs in read_back for r in recs] == flat[: sum(len(r) for r in read_back)]
