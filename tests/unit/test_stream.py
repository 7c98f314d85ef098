"""StreamRuntime in-process with an injected clock: buffering rules and replay after a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path

from firehose.clock import ManualClock
from firehose.interfaces import Batch, DeliveryResult
from support import abandon, crash_after_upload, make_runtime, runtime_from_yaml, settle


def files(tmp: Path) -> dict[str, bytes]:
    root = tmp / "out"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def test_interval_flush_uses_the_clock_not_sleeping(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        rt = make_runtime(tmp_path, interval=300, clock=clock)
        await rt.start()
        await rt.put([b"a", b"b"])
        await asyncio.sleep(0.05)
        assert files(tmp_path) == {}  # 300 s have not passed
        clock.advance(299)
        rt.wake()
        await asyncio.sleep(0.05)
        assert files(tmp_path) == {}
        clock.advance(1)
        rt.wake()
        await settle(lambda: len(files(tmp_path)) == 1)
        (key, body), = files(tmp_path).items()
        assert body == b"ab"
        # The key's timestamp is the oldest record's arrival time (the clock at put()).
        assert key.startswith("2024/05/01/12/s-1-2024-05-01-12-20-00-")
        await rt.stop(5)

    asyncio.run(go())


def test_size_flush_splits_at_the_limit(tmp_path: Path) -> None:
    async def go() -> None:
        rt = make_runtime(tmp_path, size_mib=1, interval=900)
        await rt.start()
        rec = b"x" * 100_000
        for _ in range(25):  # 2.5 MB: two full objects, the rest stays buffered
            await rt.put([rec])
        await settle(lambda: len(files(tmp_path)) == 2)
        sizes = sorted(len(b) for b in files(tmp_path).values())
        assert sizes == [1_000_000, 1_000_000]  # ten records fit in 1 MiB, the eleventh would not
        assert rt.status()["open_buffer_records"] == 5
        await rt.stop(5)
        assert sorted(len(b) for b in files(tmp_path).values()) == [500_000, 1_000_000, 1_000_000]

    asyncio.run(go())


def test_zero_interval_delivers_without_waiting(tmp_path: Path) -> None:
    async def go() -> None:
        rt = make_runtime(tmp_path, interval=0)
        await rt.start()
        await rt.put([b"now"])
        await settle(lambda: list(files(tmp_path).values()) == [b"now"])
        await rt.stop(5)

    asyncio.run(go())


def test_a_batch_uploaded_but_not_committed_is_replayed_under_its_sealed_key(tmp_path: Path) -> None:
    """The crash window between upload and commit: the replay overwrites the same object."""
    delivered: list[str] = []

    async def go() -> None:
        rt = make_runtime(tmp_path, interval=0, seed=1)
        await rt.start()
        crash_after_upload(rt, delivered)
        await rt.put([b"r1", b"r2"])
        await settle(lambda: len(delivered) == 1)
        await abandon(rt)  # kill -9: no flush, no commit
        # A different seed: a re-decided key would differ, so equality proves the sealed one was reused.
        rt2 = make_runtime(tmp_path, interval=0, seed=2)
        state = await rt2.start()
        assert [b.key for b in state.pending] == delivered
        await settle(lambda: rt2.status()["pending_batches"] == 0)
        await rt2.stop(5)

    asyncio.run(go())
    assert files(tmp_path) == {delivered[0]: b"r1r2"}


def test_backlog_stays_on_disk_while_delivery_is_stuck(tmp_path: Path) -> None:
    async def go() -> None:
        rt = make_runtime(tmp_path, size_mib=1, interval=0)
        await rt.start()
        assert rt.destination is not None
        gate = asyncio.Event()
        real = rt.destination.deliver

        async def stuck(batch: Batch) -> DeliveryResult:
            await gate.wait()
            return await real(batch)

        rt.destination.deliver = stuck  # type: ignore[method-assign]
        for _ in range(200):  # 20 MB acknowledged while nothing can be delivered
            await rt.put([b"y" * 100_000])
        await asyncio.sleep(0.1)
        # Only max_in_flight + 1 batches are sealed and held; the rest is on disk only.
        assert rt.status()["pending_batches"] <= rt.config.delivery.max_in_flight + 1
        assert rt.spool.size_bytes > 19_000_000
        gate.set()
        await settle(lambda: rt.delivered_records == 200, timeout=20)
        await rt.stop(5)
        assert sum(len(b) for b in files(tmp_path).values()) == 200 * 100_000
        assert rt.spool.size_bytes < 1_000_000  # space freed after delivery

    asyncio.run(go())


def test_partial_failure_resends_only_the_failed_records(tmp_path: Path) -> None:
    from firehose.interfaces import RecordFailure

    calls: list[list[bytes]] = []

    async def go() -> None:
        rt = make_runtime(tmp_path, interval=0)
        rt.config = rt.config.model_copy(update={"delivery": rt.config.delivery.model_copy(
            update={"retry_initial_backoff_ms": 1, "retry_max_backoff_ms": 2})})
        await rt.start()

        async def flaky(batch: Batch) -> DeliveryResult:
            calls.append(list(batch.records))
            if len(calls) == 1:
                failure = RecordFailure(True, "Throttled", "slow down")
                return DeliveryResult({1: failure, 3: failure})
            if len(calls) == 2:
                return DeliveryResult({0: RecordFailure(True, "Throttled", "again")})
            return DeliveryResult.delivered()

        rt.destination.deliver = flaky  # type: ignore[union-attr, method-assign]
        await rt.put([b"a", b"b", b"c", b"d", b"e"])
        await settle(lambda: rt.delivered_records == 5)
        await rt.stop(5)
        assert rt.metrics.delivery_records.labels("s")._value.get() == 5

    asyncio.run(go())
    assert calls == [[b"a", b"b", b"c", b"d", b"e"], [b"b", b"d"], [b"b"]]


def test_status_counts_records_buffered_in_every_partition_and_their_age(tmp_path: Path) -> None:
    clock = ManualClock()
    text = f"""
streams:
  - name: s
    buffering: {{size_mib: 1, interval_secs: 900}}
    dynamic_partitioning: {{enabled: true}}
    processing:
      - {{type: metadata_extraction, query: '{{c: .c}}'}}
    destination: {{type: local, path: {tmp_path / 'out'}, prefix: "c=!{{partitionKeyFromQuery:c}}/",
                   error_output_prefix: "err/!{{firehose:error-output-type}}/"}}
"""

    async def go() -> None:
        rt = runtime_from_yaml(tmp_path, text, clock=clock)
        await rt.start()
        await rt.put([b'{"c": "a"}', b'{"c": "b"}', b'{"c": "a"}'])
        await settle(lambda: rt.status()["open_buffer_records"] == 3)
        clock.advance(5)
        await rt.put([b'{"c": "c"}'])
        await settle(lambda: rt.status()["open_buffer_records"] == 4)
        st = rt.status()
        assert (st["open_partitions"], st["pending_batches"], st["oldest_pending_age_secs"]) == (3, 0, 5.0)
        # DataFreshness counts the partitions' buffers too (it was 0 while they held records).
        assert 'firehose_DeliveryToS3_DataFreshness{DeliveryStreamName="s"} 5.0' in rt.metrics.render().decode()
        await rt.stop(5)
        st = rt.status()
        assert (st["open_buffer_records"], st["oldest_pending_age_secs"]) == (0, 0.0)
        out = tmp_path / "out"
        assert sorted(p.relative_to(out).parts[0] for p in out.rglob("s-1-*")) == ["c=a", "c=b", "c=c"]

    asyncio.run(go())


def test_status_ages_records_still_waiting_for_the_processing_stage(tmp_path: Path) -> None:
    """Records acknowledged but not yet in a buffer (a slow Lambda): oldest_pending_age_secs counts
    them, read from their spool frame."""
    clock = ManualClock()
    text = f"""
streams:
  - name: s
    buffering: {{size_mib: 1, interval_secs: 0}}
    processing:
      - {{type: lambda, function: "handlers.sleeps:handler", timeout_secs: 60, buffer_interval_secs: 0}}
    destination: {{type: local, path: {tmp_path / 'out'}}}
"""

    async def go() -> None:
        rt = runtime_from_yaml(tmp_path, text, clock=clock)
        await rt.start()
        await rt.put([b"1"])  # the handler sleeps 1 s
        clock.advance(7)
        st = rt.status()
        assert (st["open_buffer_records"], st["pending_batches"], st["oldest_pending_age_secs"]) == (0, 0, 7.0)
        await settle(lambda: rt.delivered_records == 1)
        assert rt.status()["oldest_pending_age_secs"] == 0.0
        await rt.stop(5)

    asyncio.run(go())


def test_a_backlog_batched_by_record_sizes_survives_a_kill_and_is_delivered_once(tmp_path: Path) -> None:
    """Frames out of the spool's memory are batched by their record sizes and read back at
    delivery (here every frame: a spool that caches nothing). A kill -9 with such batches sealed,
    some delivered and some not, then a restart: every record ends up in the output exactly
    once, in order, and the spool is emptied."""
    from firehose.config import SpoolConfig
    from firehose.filelog import FileLogs
    from firehose.log import Log

    class NoCache(FileLogs):
        def log(self, stream: str, name: str, *, cache_bytes: int = 64 << 20) -> Log:
            return super().log(stream, name, cache_bytes=0)

    records = [b"%06d:" % i + b"z" * (40_000 + 997 * (i % 50)) for i in range(300)]
    delivered: list[int] = []

    async def go() -> None:
        logs = NoCache(str(tmp_path / "data"), SpoolConfig())
        rt = make_runtime(tmp_path, size_mib=1, interval=0, logs=logs)
        await rt.start()
        assert rt.destination is not None
        real = rt.destination.deliver
        gate = asyncio.Event()

        async def slow(batch: Batch) -> DeliveryResult:
            if len(delivered) >= 3:
                await gate.wait()  # stuck from the fourth batch on: the kill comes here
            delivered.append(len(batch.records))
            return await real(batch)

        rt.destination.deliver = slow  # type: ignore[method-assign]
        for i in range(0, len(records), 10):
            await rt.put(records[i : i + 10])
        await settle(lambda: len(delivered) >= 3)
        await asyncio.sleep(0.1)
        assert all(p.records is None for p in rt._pending)  # read back at delivery
        await abandon(rt)
        # Another seed, as a restarted daemon draws other random key parts.
        rt2 = make_runtime(tmp_path, size_mib=1, interval=0, seed=2,
                           logs=NoCache(str(tmp_path / "data"), SpoolConfig()))
        await rt2.start()
        await settle(lambda: rt2.delivered_records >= len(records) - sum(delivered[:3]), timeout=20)
        await rt2.stop(5)

    asyncio.run(go())
    out = b"".join(data for _key, data in sorted(files(tmp_path).items()))
    got = [out[i : i + 7] for i in range(len(out)) if out[i : i + 7].endswith(b":") and out[i : i + 6].isdigit()]
    assert sorted(got) == [b"%06d:" % i for i in range(len(records))]
    assert sum(len(r) for r in records) == len(out)


def test_freshness_and_backlog_gauges_grow_while_the_destination_is_down(tmp_path: Path) -> None:
    """The state gauges are read when scraped: with every delivery failing and no record
    arriving, DataFreshness still counts the oldest record's age (an operator alerts on it)."""
    clock = ManualClock()

    def gauge(rt: object, name: str) -> float:
        text = rt.metrics.render().decode()  # type: ignore[attr-defined]
        line = next(x for x in text.splitlines() if x.startswith(f'firehose_{name}{{DeliveryStreamName="s"}}'))
        return float(line.rsplit(" ", 1)[1])

    async def go() -> None:
        rt = make_runtime(tmp_path, interval=0, clock=clock)
        await rt.start()
        assert rt.destination is not None
        attempts: list[int] = []

        async def down(batch: Batch) -> DeliveryResult:
            attempts.append(batch.attempt)
            raise ConnectionError("destination unreachable")

        rt.destination.deliver = down  # type: ignore[method-assign]
        await rt.put([b"a", b"b", b"c"])
        await settle(lambda: len(attempts) >= 1)
        assert gauge(rt, "BacklogRecords") == 3
        clock.advance(40)
        assert gauge(rt, "DeliveryToS3_DataFreshness") == 40.0
        clock.advance(20)
        assert gauge(rt, "DeliveryToS3_DataFreshness") == 60.0
        assert gauge(rt, "BacklogRecords") == 3 and gauge(rt, "SpoolBytes") > 0
        await rt.stop(0.1)

    asyncio.run(go())
