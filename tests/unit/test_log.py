"""The Log protocol's guarantees, on both of its implementations (the file spool and the in-memory
log): appends read back in order, seals durable and idempotent, commits trimming, recovery, and
fencing (a writer that lost the log refuses to write)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firehose.filelog import FileLog, held
from firehose.log import LogBusyError, LogFencedError, LogFullError, SealedBatch
from firehose.memlog import MemoryLog, MemoryLogStore


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_appends_read_back_in_order_with_metadata_and_positions(make_log: Any) -> None:
    async def go() -> None:
        log = make_log()
        state = await log.open()
        assert (state.pending, state.unsealed_records, log.next_seq) == ([], 0, 0)
        assert await log.append([b"a", b"b"], 10, meta=[{"k": 1}, None], positions={"shard": "1"}) == 0
        assert await log.append([b"c"], 20, positions={"shard": "2", "gone": None}) == 2
        frame = await log.read_frame(1)
        assert (frame.first_seq, frame.records, frame.meta, frame.arrival_ms) == (0, [b"a", b"b"], [{"k": 1}, None], 10)
        assert await log.read_frame(3) is None and log.arrival_of(2) == 20
        assert await log.read_records([(1, 3)]) == [b"b", b"c"]
        assert await log.read_ranges([(0, 3)]) == ([b"a", b"b", b"c"], [{"k": 1}, None, None])
        assert log.positions == {"shard": "2"}
        log.reader_passed(3)  # the reader is done with them; they stay readable until committed
        assert await log.read_records([(0, 1)]) == [b"a"]
        await log.aclose()

    run(go())


def test_a_file_log_says_where_a_frame_is_stored_and_another_reader_finds_it_there(make_log: Any) -> None:
    """``frame_file`` (for the extraction worker, which reads frames itself): a file log names the
    file, offset and length of the frame holding a record, readable before it is durable; a log
    without local files (memory, JetStream) says None."""
    from firehose.spool_format import decode_records_payload

    async def go() -> None:
        log = make_log()
        await log.open()
        await log.append([b"a", b"bc"], 10)
        await log.append([b"d", b"", b"ef"], 20, meta=[None, {"k": 1}, None])
        if isinstance(log, MemoryLog):
            assert log.frame_file(0) is None and log.frame_file(3) is None
            return
        assert log.frame_file(5) is None and log.frame_file(-1) is None
        where = log.frame_file(3)
        assert (where.first_seq, where.end_seq) == (2, 5) and log.frame_file(4) == where
        with open(where.path, "rb") as f:
            f.seek(where.offset)
            frame, _ = decode_records_payload(f.read(where.length))
        assert (frame.first_seq, frame.records, frame.meta, frame.arrival_ms) == (2, [b"d", b"", b"ef"],
                                                                                  [None, {"k": 1}, None], 20)
        assert log.frame_file(1).offset < where.offset
        await log.aclose()

    run(go())


def test_a_sealed_batch_comes_back_once_after_a_restart_until_committed(make_log: Any) -> None:
    async def go() -> None:
        log = make_log()
        await log.open()
        await log.append([b"a", b"b", b"c", b"d"], 10)
        one = SealedBatch(log.allocate_batch_id(), "key-1", [(0, 2)], 10, {"records": 2})
        two = SealedBatch(log.allocate_batch_id(), "key-2", [(2, 4)], 10)
        await log.seal([one, two])
        await log.seal([one])  # made again (after a cancelled call): not recorded twice
        await log.commit(two.batch_id, {"attempts": 1})
        await log.aclose()

        again = make_log()
        state = await again.open()
        assert [(b.batch_id, b.key, list(b.ranges), b.info) for b in state.pending] == [
            (one.batch_id, "key-1", [(0, 2)], {"records": 2})]
        assert again.allocate_batch_id() > two.batch_id  # ids are never reused
        assert await again.read_records([(0, 2)]) == [b"a", b"b"]
        await again.commit(one.batch_id)
        await again.aclose()

        last = make_log()
        assert (await last.open()).pending == []
        await last.aclose()

    run(go())


def test_unsealed_records_are_counted_and_committed_ranges_are_finished(make_log: Any) -> None:
    async def go() -> None:
        log = make_log()
        await log.open()
        await log.append([b"a", b"b", b"c"], 10)
        await log.commit_ranges([(0, 2)])
        assert log.min_seq == 2 or log.committed.covers(0, 2)
        await log.aclose()
        again = make_log()
        await again.open()
        # The commit survives the restart (the records are finished or trimmed); record 2 is not.
        assert again.min_seq == 2 or again.committed.covers(0, 2)
        assert again.next_seq == 3 and not again.committed.covers(2, 3)
        assert await again.read_records([(2, 3)]) == [b"c"]
        await again.aclose()

    run(go())


def test_the_cap_refuses_an_append_and_writes_nothing(make_log: Any) -> None:
    async def go() -> None:
        log = make_log(max_size_bytes=4096)
        await log.open()
        await log.append([b"x" * 1000], 1)
        with pytest.raises(LogFullError):
            await log.append([b"y" * 8000], 1)
        assert log.next_seq == 1 and not log.has_room(8000)
        assert await log.append([b"z" * 8000], 1, enforce_cap=False) == 1  # outcomes may pass it
        await log.aclose()

    run(go())


def test_a_second_writer_fences_the_first_memory_log() -> None:
    store = MemoryLogStore()

    async def go() -> None:
        first = MemoryLog(store)
        await first.open()
        await first.append([b"a"], 1)
        batch = SealedBatch(first.allocate_batch_id(), "k", [(0, 1)], 1)
        second = MemoryLog(store)  # a new owner: a peer took over, or a restart after a crash
        await second.open()
        for attempt in (first.seal([batch]), first.commit(1), first.commit_ranges([(0, 1)]), first.append([b"b"], 1)):
            with pytest.raises(LogFencedError, match="another writer opened this log"):
                await attempt
        assert first.failed is not None and not first.has_room(1)
        assert second.failed is None
        await second.seal([batch])
        assert [b.key for b in store.seals.values()] == ["k"]

    run(go())


def test_a_live_file_log_is_busy_for_another_writer_until_closed_or_its_process_dies(tmp_path: Path) -> None:
    async def go() -> None:
        first = FileLog(str(tmp_path / "s"))
        await first.open()
        with pytest.raises(LogBusyError, match=rf"the spool is in use by another process \(pid {os.getpid()}\)"):
            await FileLog(str(tmp_path / "s")).open()
        with pytest.raises(LogBusyError):
            with held(str(tmp_path / "s")):  # what `firehose spool salvage` takes
                pass
        await first.aclose()
        second = FileLog(str(tmp_path / "s"))
        await second.open()
        second.abandon()  # a process that died: the kernel dropped its lock
        third = FileLog(str(tmp_path / "s"))
        await third.open()
        await third.aclose()

    run(go())


def test_a_file_log_held_by_another_process_names_its_pid(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    code = ("import sys, time; from firehose.filelog import lock_directory; lock_directory(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LogBusyError, match=rf"in use by another process \(pid {holder.pid}\)"):
            run(FileLog(str(directory)).open())
        holder.kill()
        holder.wait()
        log = FileLog(str(directory))  # kill -9 released it
        run(log.open())
        run(log.aclose())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_file_log_whose_lock_file_was_replaced_fences_itself(tmp_path: Path) -> None:
    async def go() -> None:
        log = FileLog(str(tmp_path / "s"))
        await log.open()
        await log.append([b"a", b"b"], 1)
        batch = SealedBatch(log.allocate_batch_id(), "k", [(0, 2)], 1)
        # Someone moved the spool aside and another writer could now lock a new LOCK file.
        os.rename(tmp_path / "s" / "LOCK", tmp_path / "s" / "LOCK.old")
        (tmp_path / "s" / "LOCK").write_text("1\n")
        with pytest.raises(LogFencedError, match="lock file was replaced or removed"):
            await log.seal([batch])
        with pytest.raises(LogFencedError):
            await log.append([b"c"], 1)
        with pytest.raises(LogFencedError):
            await log.commit(batch.batch_id)
        assert log.failed is not None and not log.has_room(1)
        await log.aclose()

    run(go())
    assert run(FileLog(str(tmp_path / "s")).open()).pending == []  # the fenced seal was never written


def _delivered(out: Path) -> list[bytes]:
    return sorted(line for f in out.rglob("*") if f.is_file() for line in f.read_bytes().splitlines())


def test_a_stream_runs_on_memory_logs_through_a_crash_and_a_fenced_writer(tmp_path: Path) -> None:
    """The whole runtime on the in-memory log: records acknowledged before a crash are delivered
    by the next owner exactly once, and a writer whose log was taken refuses records (503)."""
    from firehose.memlog import MemoryLogs
    from support import abandon, make_runtime

    logs = MemoryLogs()

    async def go() -> None:
        first = make_runtime(tmp_path, interval=900, logs=logs)
        await first.start()
        await first.put([b"a\n", b"b\n"])
        await abandon(first)  # kill -9: nothing sealed, nothing delivered
        assert not (tmp_path / "out").exists() or _delivered(tmp_path / "out") == []

        second = make_runtime(tmp_path, interval=900, logs=logs)
        await second.start()
        assert second.recovery is not None and second.recovery.unsealed_records == 2
        # The first writer is still around (a stalled process): its log was taken, so it refuses.
        with pytest.raises(LogFencedError):
            await first.put([b"stale\n"])
        assert first.status()["spool_failed"] == "fenced" and not first.can_accept
        await second.put([b"c\n"])
        assert await second.stop(5)
        assert second.delivered_records == 3

    run(go())
    assert _delivered(tmp_path / "out") == [b"a", b"b", b"c"]

