"""The processing stage on its own, between two real logs (file spools, and in-memory logs): outcomes recorded in order before the
raw records are released, what an outcome frame holds, where a restart resumes, and
back-pressure from the outcome spool."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from firehose.clock import ManualClock
from firehose.log import LogError, SealedBatch
from firehose.metrics import Metrics
from firehose.records import Outcome, SourceBatch, SourceRecord
from firehose.stages.common import StageContext
from firehose.stages.processing import ProcessingStage, outcome_frame, resume_point

ARN = "arn:aws:lambda:us-east-1:000000000000:function:f"


class Chain:
    """A processing chain: upper-cases records, drops b"drop", fails b"bad", gives b"k=..." a key.
    Buffers whose first record is in ``slow`` take longer, so several are in flight at once."""

    def __init__(self, buffer_size_bytes: int = 1 << 20, slow: tuple[bytes, ...] = ()) -> None:
        self.buffer_size_bytes = buffer_size_bytes
        self.buffer_interval_secs = 0
        self.concurrency = 3
        self.lambda_arn: str | None = ARN
        self.slow = slow
        self.calls: list[list[bytes]] = []
        self.seen: list[SourceRecord] = []
        self.fail_next = 0

    async def process(self, records: Sequence[SourceRecord]) -> list[Outcome]:
        self.calls.append([r.data for r in records])
        self.seen += records
        if records and records[0].data in self.slow:
            await asyncio.sleep(0.05)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("a bug in a stage")
        outs = []
        for i, r in enumerate(records):
            o = Outcome(i, r.data.upper())
            if r.data == b"drop":
                o.result = "Dropped"
            elif r.data == b"bad":
                o = o.failed("Lambda.FunctionError", "no")
            elif r.data.startswith(b"k="):
                o.query_keys = {"c": r.data[2:].decode()}
            outs.append(o)
        return outs


class Setup:
    def __init__(self, tmp: Path, make_log: Any, chain: Chain, *, cap_bytes: int = 1 << 30,
                 backup_all: bool = False) -> None:
        self.clock = ManualClock()
        self.ctx = StageContext("s", self.clock, Metrics(), structlog.get_logger())
        self.ingest = make_log("spool")
        self.out = make_log("spool/processed")
        asyncio.run(self.ingest.open())
        asyncio.run(self.out.open())
        self.chain = chain
        self.stage = ProcessingStage(self.ctx, chain, self.ingest, self.out, cap_bytes=cap_bytes,
                                     backup_all=backup_all)

    def outcomes(self) -> list[tuple[bytes, Any]]:
        """Every recorded outcome record with its metadata, in order."""
        records, metas = asyncio.run(self.out.read_ranges([(self.out.min_seq, self.out.next_seq)]))
        return list(zip(records, metas or [None] * len(records), strict=True))

    async def run_until(self, raw_end: int) -> None:
        self.stage.start(self.ingest.min_seq)
        for _ in range(500):
            # Recorded (raw_end in the outcome log) and released (the raw records committed):
            # the stage is done with them only once both are.
            if self.out.positions.get("raw_end") == raw_end and \
                    self.ingest.committed.covers(self.ingest.min_seq, raw_end):
                break
            await asyncio.sleep(0.01)
        self.ctx.signals.stopping = True
        await self.stage.cancel()

    async def stop_once_recorded(self, raw_end: int) -> None:
        """Stop the stage once outcomes are recorded up to ``raw_end`` (released or not)."""
        for _ in range(500):
            if self.out.positions.get("raw_end") == raw_end:
                break
            await asyncio.sleep(0.01)
        self.ctx.signals.stopping = True
        await self.stage.cancel()

    async def close(self) -> None:
        await self.ingest.aclose()
        await self.out.aclose()


def test_an_outcome_frame_records_keys_errors_and_drops() -> None:
    batch = SourceBatch(10, [b"a", b"b", b"c"], [100, 200, 300])
    source_metas = [None, {"kinesis": {"sequenceNumber": "49", "subsequenceNumber": 2}}, None]
    outs = [Outcome(0, b"A", query_keys={"c": "x"}, partition_keys={"c": "y"}), Outcome(0, b"A2"),
            Outcome(1, b"b").failed("Lambda.FunctionError", "boom"), Outcome(2, b"c", result="Dropped")]
    records, metas, dropped, failed, ok_bytes, nbytes = outcome_frame(outs, batch, source_metas, now_ms=999,
                                                                      lambda_arn=ARN, backup_all=True)
    assert (dropped, failed, ok_bytes, nbytes) == (1, 1, 3, sum(map(len, records)))
    assert records == [b"A", b"A2", b"b", b"a", b"b", b"c"]  # outcomes, then the source copies
    assert metas[0] == {"pk": {"partitionKeyFromQuery:c": "x", "partitionKeyFromLambda:c": "y"}}
    assert metas[1] is None
    assert metas[2] == {"err": {"c": "Lambda.FunctionError", "m": "boom", "t": "processing-failed", "a": 1,
                                "ts": 200, "e": 999, "l": ARN, "sequenceNumber": "49", "subSequenceNumber": 2}}
    assert metas[3:] == [{"src": 1}] * 3


def test_outcomes_are_recorded_in_order_before_the_raw_records_are_released(tmp_path: Path, make_log: Any) -> None:
    # One record a buffer, the first slowest: they finish out of order, are recorded in order.
    chain = Chain(buffer_size_bytes=1, slow=(b"k=a",))
    s = Setup(tmp_path, make_log, chain)

    async def go() -> None:
        await s.ingest.append([b"k=a", b"drop", b"bad", b"plain"], 100)
        s.ctx.signals.batcher.clear()
        await s.run_until(4)
        assert s.ctx.signals.batcher.is_set()  # the batcher is told outcomes are there
        await s.close()

    asyncio.run(go())
    assert chain.calls == [[b"k=a"], [b"drop"], [b"bad"], [b"plain"]]
    got = s.outcomes()
    assert [r for r, _ in got] == [b"K=A", b"BAD", b"PLAIN"]
    assert got[0][1] == {"pk": {"partitionKeyFromQuery:c": "a"}}
    assert got[1][1]["err"]["c"] == "Lambda.FunctionError" and got[2][1] is None
    # Released only after the outcomes were recorded (committed, or already trimmed away).
    assert s.ingest.min_seq == 4 or s.ingest.committed.covers(0, 4)
    assert s.stage.dropped_records == 1 and s.stage.recorded_upto == 4
    assert s.ctx.metrics.failed_processing_records.labels("s")._value.get() == 1


def test_source_copies_are_recorded_beside_the_outcomes(tmp_path: Path, make_log: Any) -> None:
    s = Setup(tmp_path, make_log, Chain(), backup_all=True)

    async def go() -> None:
        await s.ingest.append([b"x", b"drop"], 100)
        await s.run_until(2)
        await s.close()

    asyncio.run(go())
    assert s.outcomes() == [(b"X", None), (b"x", {"src": 1}), (b"drop", {"src": 1})]


def test_a_buffer_the_function_gave_back_whole_is_recorded_as_it_came(tmp_path: Path, make_log: Any) -> None:
    """A chain that answers UnchangedOutcomes (its function gave every record back unchanged): the
    records are recorded as they are, Ok and without metadata, source copies after them, counted."""
    from firehose.records import UnchangedOutcomes, record_datas

    class Whole(Chain):
        async def process(self, records: Sequence[SourceRecord]) -> Any:
            self.calls.append(record_datas(records))
            return UnchangedOutcomes(record_datas(records), 1)

    s = Setup(tmp_path, make_log, Whole(), backup_all=True)

    async def go() -> None:
        await s.ingest.append([b"a", b"bb"], 100)
        await s.ingest.append([b"ccc"], 200)
        await s.run_until(3)
        await s.close()

    asyncio.run(go())
    assert s.outcomes() == [(b"a", None), (b"bb", None), (b"ccc", None), (b"a", {"src": 1}), (b"bb", {"src": 1}),
                            (b"ccc", {"src": 1})]
    m = s.ctx.metrics
    assert m.succeed_processing_records.labels("s")._value.get() == 3
    assert m.succeed_processing_bytes.labels("s")._value.get() == 6


def test_a_record_its_source_failed_skips_the_chain(tmp_path: Path, make_log: Any) -> None:
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)
    err = {"c": "Kinesis.Aggregate", "m": "bad digest", "t": "processing-failed"}

    async def go() -> None:
        await s.ingest.append([b"a", b"agg", b"b"], 100, meta=[None, {"err": err}, None])
        await s.run_until(3)
        await s.close()

    asyncio.run(go())
    assert chain.calls == [[b"a", b"b"]]
    got = s.outcomes()
    assert [r for r, _ in got] == [b"A", b"agg", b"B"]
    assert (got[1][1]["err"]["c"], got[1][1]["err"]["m"]) == ("Kinesis.Aggregate", "bad digest")


def test_a_buffer_across_frames_with_and_without_metadata_gives_each_record_its_own(
    tmp_path: Path, make_log: Any,
) -> None:
    """One processing buffer over frames without, then with, per-record metadata: each record
    reaches the chain under its sequence number with its own arrival time and Kinesis metadata,
    and the one its source failed skips the chain with its error."""
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)
    err = {"c": "Kinesis.Aggregate", "m": "bad digest", "t": "processing-failed"}
    k1, k2 = {"sequenceNumber": "1", "subsequenceNumber": 0}, {"sequenceNumber": "2", "subsequenceNumber": 3}

    async def go() -> None:
        await s.ingest.append([b"a", b"b"], 100)
        await s.ingest.append([b"c", b"agg", b"d"], 200, meta=[{"kinesis": k1}, {"err": err}, {"kinesis": k2}])
        await s.ingest.append([b"e"], 300)
        await s.run_until(6)
        await s.close()

    asyncio.run(go())
    assert chain.calls == [[b"a", b"b", b"c", b"d", b"e"]]
    assert [(r.record_id, r.data, r.arrival_ms, r.kinesis) for r in chain.seen] == [
        ("0", b"a", 100, None), ("1", b"b", 100, None), ("2", b"c", 200, k1), ("4", b"d", 200, k2),
        ("5", b"e", 300, None)]
    got = s.outcomes()
    assert [r for r, _ in got] == [b"A", b"B", b"C", b"agg", b"D", b"E"]
    assert got[3][1]["err"]["c"] == "Kinesis.Aggregate" and got[3][1]["err"]["ts"] == 200


def test_a_stage_that_cannot_read_the_ingest_log_tries_again_by_itself(tmp_path: Path, make_log: Any) -> None:
    """Reading the ingest log fails twice in a row after the last record arrived: the stage reads
    again a second later without waiting for another record, and every outcome is recorded."""
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)
    real = s.ingest.read_frame
    failures = [LogError("the disk is gone for a moment")] * 2

    async def flaky(seq: int) -> Any:
        if failures:
            raise failures.pop()
        return await real(seq)

    s.ingest.read_frame = flaky

    async def go() -> None:
        await s.ingest.append([b"a", b"b"], 100)
        await s.run_until(2)
        await s.close()

    asyncio.run(go())
    assert not failures and [r for r, _ in s.outcomes()] == [b"A", b"B"]


def test_a_chain_that_fails_is_run_again_on_the_same_buffer(tmp_path: Path, make_log: Any, monkeypatch: Any) -> None:
    chain = Chain()
    chain.fail_next = 1
    s = Setup(tmp_path, make_log, chain)
    real_sleep = asyncio.sleep

    async def short(delay: float) -> None:
        await real_sleep(min(delay, 0.01))

    async def go() -> None:
        monkeypatch.setattr(asyncio, "sleep", short)
        await s.ingest.append([b"a", b"b"], 100)
        await s.run_until(2)
        monkeypatch.undo()
        await s.close()

    asyncio.run(go())
    assert chain.calls == [[b"a", b"b"], [b"a", b"b"]]
    assert [r for r, _ in s.outcomes()] == [b"A", b"B"]


def test_nothing_is_read_while_the_outcome_spool_holds_half_the_cap(tmp_path: Path, make_log: Any) -> None:
    chain = Chain()
    s = Setup(tmp_path, make_log, chain, cap_bytes=0)  # any outcome spool is over half of it

    async def go() -> None:
        await s.ingest.append([b"a"], 100)
        s.stage.start(0)
        await asyncio.sleep(0.05)
        s.ctx.signals.stopping = True
        await s.stage.cancel()
        await s.close()

    asyncio.run(go())
    assert chain.calls == [] and s.stage.cursor == 0


def test_a_restart_resumes_after_the_recorded_outcomes_and_releases_them_again(tmp_path: Path, make_log: Any) -> None:
    async def go() -> None:
        ingest = make_log("spool")
        await ingest.open()
        await ingest.append([b"a", b"b", b"c", b"d", b"e", b"f"], 100)
        # Batches sealed here before processing was turned on are delivered from here: skipped.
        await ingest.seal([SealedBatch(ingest.allocate_batch_id(), "k", [(0, 2)], 100)])
        assert await resume_point(ingest, 0, name="processed") == 2
        # Outcomes were recorded up to record 4, but the raw commit was lost in a crash.
        assert await resume_point(ingest, 4, name="processed") == 4
        assert ingest.committed.covers(2, 4) and not ingest.committed.covers(4, 5)
        # The sealed batch is finished by its own COMMIT once delivered: committed by range now,
        # its records could be deleted before it is sent.
        assert not any(seq in ingest.committed for seq in (0, 1))
        with pytest.raises(LogError, match="processed: outcomes are recorded up to record 9 but the ingest spool "
                                             "ends at 6; refusing to guess"):
            await resume_point(ingest, 9, name="processed")
        await ingest.aclose()

    asyncio.run(go())



def test_source_copies_left_when_backup_all_is_turned_off_are_dropped_not_delivered(tmp_path: Path) -> None:
    """Outcomes and source copies recorded under backup: {mode: all}, then the stream restarts
    without a backup: the outcomes are delivered, the copies (nowhere to go) are dropped and
    counted, never written into the destination beside the records themselves."""
    from support import abandon, runtime_from_yaml, settle

    out = tmp_path / "out"
    plain = f"streams:\n  - name: s\n    buffering: {{size_mib: 1, interval_secs: 900}}\n" \
            f"    destination: {{type: local, path: {out}}}\n"
    with_copies = plain + f"    backup: {{path: {tmp_path / 'backup'}, mode: all}}\n"

    async def go() -> None:
        first = runtime_from_yaml(tmp_path, with_copies)
        await first.start()
        await first.put([b"a\n", b"b\n"])
        await settle(lambda: first._recorded_upto == 2)  # outcomes and copies recorded, not sealed
        await abandon(first)
        second = runtime_from_yaml(tmp_path, plain, seed=2)
        await second.start()
        assert await second.stop(10)
        assert second.runner.dropped_source_copies == 2 and second.delivered_records == 2

    asyncio.run(go())
    assert sorted(line for f in out.rglob("*") if f.is_file() for line in f.read_bytes().splitlines()) == [b"a", b"b"]
    assert not (tmp_path / "backup").exists()


def test_buffers_finished_while_an_earlier_one_runs_are_recorded_in_one_frame(tmp_path: Path, make_log: Any) -> None:
    # The first buffer is slow (50 ms); the other three finish meanwhile and wait for it: when it
    # is done, the four are recorded as one outcome frame (one fsync), still in order.
    chain = Chain(buffer_size_bytes=1, slow=(b"k=a",))
    s = Setup(tmp_path, make_log, chain)

    async def go() -> Any:
        await s.ingest.append([b"k=a", b"drop", b"bad", b"plain"], 100)
        await s.run_until(4)
        first = await s.out.read_frame(s.out.min_seq)
        await s.close()
        return first

    first = asyncio.run(go())
    assert first is not None and list(first.records) == [b"K=A", b"BAD", b"PLAIN"]  # every buffer in one frame
    assert s.out.positions.get("raw_end") == 4


def test_a_processing_buffer_takes_records_in_order_and_knows_their_runs() -> None:
    """A buffer takes the next records to process, in order, across ranges stepped over (a run
    each); one that would go back is refused (the stage then reads again from the buffer's first
    record). Record ids are the first record's number plus a position: unique in the buffer."""
    from firehose.log import RecordFrame
    from firehose.stages.processing import _Buffer

    buf = _Buffer()
    buf.add(RecordFrame(10, 1, [b"x", b"a", b"b"]), 1, 3)
    with pytest.raises(LogError, match="record 10 comes after record 12"):
        buf.add(RecordFrame(10, 1, [b"x", b"a", b"b"]), 0, 1)
    buf.add(RecordFrame(13, 2, [b"c", b"d"], [None, {"kinesis": {"sequenceNumber": "7"}}]), 0, 2)
    buf.add(RecordFrame(20, 3, [b"e"]), 0, 1)  # records 15-19 stepped over
    batch, metas, _nbytes, runs = buf.take()
    assert runs == [(11, 15), (20, 21)]
    assert [(r.record_id, r.data, r.arrival_ms, r.kinesis) for r in batch] == [
        ("11", b"a", 1, None), ("12", b"b", 1, None), ("13", b"c", 2, None), ("14", b"d", 2, {"sequenceNumber": "7"}),
        ("15", b"e", 3, None)]
    assert metas == [None, None, None, {"kinesis": {"sequenceNumber": "7"}}, None]


def test_records_sealed_past_the_resume_point_before_processing_was_on_are_not_processed_again(
        tmp_path: Path, make_log: Any) -> None:
    """A partitioned stream seals records out of order: killed with record 0 still in an open
    partition and records 2-3 sealed in another, then restarted with processing turned on. The
    sealed records go out in their own batch; processing takes only 0-1 and 4-5, and releases only
    those (a range commit of 2-3 could delete them before their batch is sent)."""
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)

    async def go() -> None:
        await s.ingest.append([b"a", b"b", b"c", b"d", b"e", b"f"], 100)
        await s.ingest.seal([SealedBatch(s.ingest.allocate_batch_id(), "k", [(2, 4)], 100)])
        cursor = await resume_point(s.ingest, 0, name="processed")
        assert cursor == 0
        s.stage.start(cursor)
        await s.stop_once_recorded(6)
        assert s.ingest.committed.covers(0, 2) and s.ingest.committed.covers(4, 6)
        assert not any(seq in s.ingest.committed for seq in (2, 3))
        assert s.ingest.sealed.covers(2, 4)
        await s.close()

    asyncio.run(go())
    assert [r for r, _ in s.outcomes()] == [b"A", b"B", b"E", b"F"]
    assert [r.data for r in chain.seen] == [b"a", b"b", b"e", b"f"]


def test_a_buffer_spans_the_sealed_records_it_steps_over(tmp_path: Path, make_log: Any) -> None:
    """Partition b's records (the odd ones) sealed, partition a's still open at the crash: the
    hundred open records go through the chain in one buffer, not a hundred, and only they are
    released."""
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)

    async def go() -> None:
        await s.ingest.append([b"r%d" % i for i in range(200)], 100)
        odd = [(i, i + 1) for i in range(1, 200, 2)]
        await s.ingest.seal([SealedBatch(s.ingest.allocate_batch_id(), "b", odd, 100)])
        s.stage.start(await resume_point(s.ingest, 0, name="processed"))
        await s.stop_once_recorded(199)
        assert all(i in s.ingest.committed for i in range(0, 200, 2))
        assert not any(i in s.ingest.committed for i in range(1, 200, 2))
        await s.close()

    asyncio.run(go())
    assert chain.calls == [[b"r%d" % i for i in range(0, 200, 2)]]
    assert [r for r, _ in s.outcomes()] == [b"R%d" % i for i in range(0, 200, 2)]


def test_a_release_that_fails_again_after_the_outcomes_are_recorded_is_retried(
        tmp_path: Path, make_log: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outcomes are durable, then releasing the raw records fails twice: the stage keeps
    retrying the release (never the append), counts the buffer once, and goes on with the records
    after them."""
    import firehose.stages.processing as processing

    monkeypatch.setattr(processing, "local_failure_pause", lambda n: 0.001)
    chain = Chain()
    s = Setup(tmp_path, make_log, chain)
    failures = [2]
    commit_ranges = s.ingest.commit_ranges

    async def failing_commit(ranges: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError("disk hiccup")
        await commit_ranges(ranges)

    s.ingest.commit_ranges = failing_commit

    async def go() -> None:
        await s.ingest.append([b"a", b"drop", b"bad"], 100)
        s.stage.start(0)
        for _ in range(500):
            if s.ingest.committed.covers(0, 3):
                break
            await asyncio.sleep(0.01)
        await s.ingest.append([b"c"], 100)
        s.ctx.signals.processing.set()
        await s.run_until(4)
        await s.close()

    asyncio.run(go())
    assert failures == [0]
    assert [r for r, _ in s.outcomes()] == [b"A", b"BAD", b"C"]  # each outcome recorded once
    m = s.ctx.metrics
    assert s.stage.dropped_records == 1 and m.failed_processing_records.labels("s")._value.get() == 1
    assert m.succeed_processing_records.labels("s")._value.get() == 2
