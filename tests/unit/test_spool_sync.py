"""The spool's sync thread (firehose/spool_sync.py): fsyncs run back to back in a thread of their
own while the loop keeps writing, rolling segments over and deleting them."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firehose import spool_sync
from firehose.spool import SEGMENT_MAGIC, Spool, SpoolError


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "spool-fsync"]


def no_room_for_a_new_segment(real_write: Callable[[int, bytes], int]) -> Callable[[int, bytes], int]:
    """``os.write`` on a disk too full for a new segment's first bytes (ENOSPC)."""

    def write(fd: int, data: bytes) -> int:
        if bytes(data[: len(SEGMENT_MAGIC)]) == SEGMENT_MAGIC:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    return write


def recording(calls: list[int]) -> Callable[[int], None]:
    """``os.fsync`` that notes each descriptor it fsyncs in ``calls``."""
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    return fsync


async def no_sync_thread() -> None:
    deadline = time.monotonic() + 5
    while sync_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not sync_threads()


async def opened(path: Path, replace_fsync: Callable[[int], None] | None, monkeypatch: pytest.MonkeyPatch,
                 **kwargs: Any) -> Spool:
    """A new spool, its first fsync done, then ``os.fsync`` replaced by ``replace_fsync``."""
    sp = Spool(str(path), **kwargs)
    sp.open()
    await sp.wait_durable(force=True)
    if replace_fsync is not None:
        monkeypatch.setattr(os, "fsync", replace_fsync)
    return sp


def test_rollovers_and_deletions_racing_the_sync_thread_lose_nothing(tmp_path: Path) -> None:
    """Many small segments rolled over and deleted while waiters wait: no file is fsynced after
    it was closed (that would fence the spool), no acknowledged record is missing after a
    reopen, and deleted segments are gone from the directory."""
    per_task, tasks = 60, 8

    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path), segment_size_bytes=4096)
        sp.open()
        acked: list[bytes] = []

        async def writer(w: int) -> None:
            for i in range(per_task):
                rec = b"w%d-%03d-" % (w, i) + b"x" * 700
                sp.append_records([rec], 1)
                await sp.wait_durable()
                acked.append(rec)

        await asyncio.gather(*(writer(w) for w in range(tasks)))
        assert sp.failed is None
        # Commit the first half: the segments holding only it are deleted after an fsync.
        half = sp.next_seq // 2
        sp.commit_ranges([(0, half)])
        await sp.wait_durable(force=True)
        kept = sp.read_ranges([(half, sp.next_seq)])[0]
        await sp.aclose()
        return kept

    kept = asyncio.run(go())
    again = Spool(str(tmp_path), segment_size_bytes=4096)
    state = again.open()
    assert state.unsealed_records == len(kept) and again.read_ranges([(again.min_seq, again.next_seq)])[0] == kept
    assert again.min_seq > 0  # deleted segments were really deleted
    files = sorted(os.listdir(tmp_path))
    assert all(name.startswith("seg-") for name in files) and len(files) == len(again._segments)
    asyncio.run(again.aclose())


def test_a_write_made_during_an_fsync_gets_a_cycle_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread looks for new writes after each fsync without waiting for the loop: a frame
    written while an fsync is under way is covered by the next one, and acknowledged only then."""
    real = os.fsync
    entered, release = threading.Event(), threading.Event()
    synced_fds: list[int] = []

    def slow(fd: int) -> None:
        synced_fds.append(fd)
        if len(synced_fds) == 1:
            entered.set()
            release.wait(5)
        real(fd)

    async def go() -> None:
        sp = await opened(tmp_path, slow, monkeypatch)
        sp.append_records([b"first"], 1)
        first = asyncio.ensure_future(sp.wait_durable())
        await asyncio.to_thread(entered.wait, 5)
        sp.append_records([b"second"], 1)  # written while the first fsync runs
        second = asyncio.ensure_future(sp.wait_durable())
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert len(synced_fds) >= 2  # the second write needed a second fsync
        await sp.aclose()

    asyncio.run(go())


def test_a_failed_fsync_is_never_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an fsync fails the kernel may have dropped the pages: the thread stops, later
    waiters are refused, and no later fsync can falsely succeed."""
    calls: list[int] = []

    def eio(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "Input/output error")

    async def go() -> None:
        sp = await opened(tmp_path, eio, monkeypatch)
        sp.append_records([b"a"], 1)
        waits = [asyncio.ensure_future(sp.wait_durable()) for _ in range(3)]
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, SpoolError) for r in results)
        n = len(calls)
        with pytest.raises(SpoolError, match="fenced"):
            await sp.wait_durable(force=True)
        sp._kick_sync()
        await asyncio.sleep(0.1)
        assert len(calls) == n == 1 and not sync_threads()
        monkeypatch.undo()

    asyncio.run(go())


def test_an_idle_thread_exits_and_the_next_write_starts_another(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_sync, "IDLE_EXIT_SECS", 0.05)

    async def go() -> None:
        sp = await opened(tmp_path, None, monkeypatch)
        sp.append_records([b"a"], 1)
        await sp.wait_durable()
        await no_sync_thread()
        sp.append_records([b"b"], 1)
        await asyncio.wait_for(sp.wait_durable(), 5)
        await sp.aclose()
        assert not sync_threads()

    asyncio.run(go())
    again = Spool(str(tmp_path))
    assert again.open().unsealed_records == 2
    asyncio.run(again.aclose())


def test_durable_marks_cause_no_fsync_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    async def go() -> None:
        sp = await opened(tmp_path, recording(calls), monkeypatch)
        for i in range(5):
            sp.append_records([b"r%d" % i], 1)
            await sp.wait_durable()
        await asyncio.sleep(0.2)  # a DURABLE frame written after each fsync must not start another
        assert len(calls) == 5
        await sp.aclose()

    asyncio.run(go())


def test_an_abandoned_spool_leaves_no_thread_and_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """A spool dropped without aclose (the tests' simulated kill -9) on a loop that then closes."""
    monkeypatch.setattr(spool_sync, "IDLE_EXIT_SECS", 0.05)

    async def go() -> None:
        sp = await opened(tmp_path, None, monkeypatch)
        sp.append_records([b"a"], 1)
        await sp.wait_durable()
        sp.append_records([b"b"], 1)
        sp._kick_sync()  # a cycle whose answer arrives after the loop is gone

    asyncio.run(go())
    deadline = time.monotonic() + 5
    while sync_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not sync_threads()
    assert "Exception in thread" not in capfd.readouterr().err


def test_a_cycle_taken_during_a_rollover_sees_the_old_file_closing_and_the_new_one_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread finishes an fsync while the loop is half way through opening the next segment
    (the old file already queued to close, the new one not yet in use). Without the lock the
    cycle fsyncs and closes the old file, then fsyncs it again: EBADF, and the spool fences."""
    real_fsync, real_ftruncate = os.fsync, os.ftruncate
    in_fsync, rolling = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if not in_fsync.is_set():
            in_fsync.set()
            rolling.wait(5)  # the first cycle ends while the rollover is under way
        real_fsync(fd)

    def ftruncate(fd: int, length: int) -> None:
        rolling.set()
        time.sleep(0.1)  # the GIL is free: the thread takes its next cycle now, if it may
        real_ftruncate(fd, length)

    async def go() -> None:
        sp = await opened(tmp_path, fsync, monkeypatch, segment_size_bytes=8192)
        sp.append_records([b"a" * 5000], 1)
        first = asyncio.ensure_future(sp.wait_durable())
        await asyncio.to_thread(in_fsync.wait, 5)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        sp.append_records([b"b" * 5000], 1)  # does not fit: a new segment
        monkeypatch.setattr(os, "ftruncate", real_ftruncate)
        await asyncio.wait_for(first, 5)
        await asyncio.wait_for(sp.wait_durable(), 5)
        assert sp.failed is None and len(sp._segments) == 2
        await sp.aclose()

    asyncio.run(go())
    again = Spool(str(tmp_path), segment_size_bytes=8192)
    assert again.open().unsealed_records == 2
    asyncio.run(again.aclose())


def test_a_thread_that_cannot_start_is_started_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = threading.Thread.start
    refused: list[str] = []

    def start_once(self: threading.Thread) -> None:
        if self.name == "spool-fsync" and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(spool_sync, "IDLE_EXIT_SECS", 0.05)

    async def go() -> None:
        sp = await opened(tmp_path, None, monkeypatch)
        await no_sync_thread()  # the next kick must start one
        monkeypatch.setattr(threading.Thread, "start", start_once)
        sp.append_records([b"a"], 1)
        await asyncio.wait_for(sp.wait_durable(), 5)  # started again half a second later
        assert refused and sp.failed is None
        sp.append_records([b"b"], 1)
        await asyncio.wait_for(sp.wait_durable(), 5)
        await sp.aclose()

    asyncio.run(go())


def test_a_rollover_that_fails_on_a_full_disk_leaves_the_old_segment_in_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new segment's first write fails (ENOSPC): the append fails, the old file stays the
    one written (it was queued for closing before: the next cycle closed it, then fsynced it
    again and fenced the spool), and the half-made file is gone."""
    real_write = os.write
    full = no_room_for_a_new_segment(real_write)

    async def go() -> None:
        sp = await opened(tmp_path, None, monkeypatch, segment_size_bytes=8192)
        sp.append_records([b"a" * 5000], 1)
        await sp.wait_durable()
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space"):
            sp.append_records([b"b" * 5000], 1)
        monkeypatch.setattr(os, "write", real_write)
        sp.append_records([b"c" * 100], 1)  # the client's retry, into the old file
        await asyncio.wait_for(sp.wait_durable(), 5)
        assert sp.failed is None and len(sp._segments) == 1 and len(os.listdir(tmp_path)) == 1
        await sp.aclose()

    asyncio.run(go())
    again = Spool(str(tmp_path), segment_size_bytes=8192)
    assert again.open().unsealed_records == 2
    assert again.read_ranges([(again.min_seq, again.next_seq)])[0] == [b"a" * 5000, b"c" * 100]
    asyncio.run(again.aclose())


@pytest.mark.parametrize("policy", ["never", "interval"])
def test_without_fsync_always_the_thread_fsyncs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  policy: str) -> None:
    """A seal's forced fsync must not turn into fsyncs back to back behind every later append."""
    calls: list[int] = []
    real = os.fsync

    def slow(fd: int) -> None:  # appends keep arriving while one runs
        calls.append(fd)
        time.sleep(0.005)
        real(fd)

    async def go() -> None:
        sp = await opened(tmp_path, slow, monkeypatch, fsync=policy, fsync_interval_ms=60_000)
        sp.append_records([b"first"], 1)
        forced = asyncio.ensure_future(sp.wait_durable(force=True))  # a seal, say
        deadline = time.monotonic() + 0.3
        n = 0
        while time.monotonic() < deadline:
            sp.append_records([b"r%d" % n], 1)
            await sp.wait_durable()  # returns at once: not fsync always
            n += 1
            await asyncio.sleep(0.001)
        await forced
        assert n > 50 and len(calls) <= 2  # the forced one (and one for writes made meanwhile), no more
        asked = len(calls)
        await sp.wait_durable(force=True)
        assert len(calls) == asked + 1
        await sp.aclose()

    asyncio.run(go())


def test_closing_a_fenced_spool_still_releases_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def go() -> None:
        before = set(os.listdir("/proc/self/fd"))
        sp = await opened(tmp_path, None, monkeypatch)
        sp.append_records([b"a"], 1)
        sp.read_ranges([(0, 1)])  # a read descriptor too
        monkeypatch.setattr(os, "fsync", eio)
        with pytest.raises(SpoolError, match="fenced"):
            await sp.aclose()
        monkeypatch.undo()
        await asyncio.sleep(0)
        assert set(os.listdir("/proc/self/fd")) <= before | {str(sp._dir_fd)} and sp._fd == -1

    asyncio.run(go())


def test_a_full_disk_when_a_delivered_segment_would_roll_over_does_not_fail_the_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    full = no_room_for_a_new_segment(real_write)

    async def go() -> None:
        sp = await opened(tmp_path, None, monkeypatch, max_size_bytes=64 * 1024)
        first = sp.append_records([b"x" * 9000], 1)
        await sp.wait_durable()
        monkeypatch.setattr(os, "write", full)
        sp.commit_ranges([(first, first + 1)])  # would roll the delivered segment over: no room
        monkeypatch.setattr(os, "write", real_write)
        assert len(sp._segments) == 1 and sp.failed is None
        nxt = sp.append_records([b"y"], 1)
        await sp.wait_durable()
        sp.commit_ranges([(nxt, nxt + 1)])  # room again: rolled over, the old segment deleted
        await sp.wait_durable(force=True)
        assert list(sp._segments) == [2]
        await sp.aclose()

    asyncio.run(go())


def test_reopening_fsyncs_the_new_checkpoint_before_deleting_the_old_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def fill() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        first = sp.append_records([b"a", b"b"], 1)
        sp.commit_ranges([(first, first + 2)])
        await sp.wait_durable(force=True)
        await sp.aclose()

    asyncio.run(fill())
    events: list[str] = []
    real_fsync, real_unlink = os.fsync, os.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)) and None)
    monkeypatch.setattr(os, "unlink", lambda path: (events.append("unlink " + os.path.basename(path)),
                                                    real_unlink(path)) and None)
    again = Spool(str(tmp_path))
    again.open()
    monkeypatch.undo()
    assert "unlink seg-000000000001.log" in events
    assert events.index("unlink seg-000000000001.log") > events.index("fsync")
    assert again.next_seq == 2
    asyncio.run(again.aclose())


def test_an_abandoned_spool_syncs_nothing_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``abandon`` (a test's kill -9): the thread ends, and nothing written after is fsynced."""
    calls: list[int] = []

    async def go() -> None:
        sp = await opened(tmp_path, recording(calls), monkeypatch)
        sp.append_records([b"a"], 1)
        await sp.wait_durable()
        assert calls and sync_threads()
        sp.abandon()
        assert not sync_threads()
        n = len(calls)
        sp.append_records([b"b"], 1)
        sp._kick_sync()
        await asyncio.sleep(0.1)
        assert len(calls) == n and not sync_threads()

    asyncio.run(go())
