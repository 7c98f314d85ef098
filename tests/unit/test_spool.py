from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from firehose.spool import FORMAT_VERSION, SealedBatch, Spool, SpoolError, SpoolFullError


def run(coro):
    return asyncio.run(coro)


async def _fill(spool: Spool, n_frames: int, per_frame: int = 3) -> list[bytes]:
    out: list[bytes] = []
    for f in range(n_frames):
        recs = [f"frame{f}-rec{i}".encode() for i in range(per_frame)]
        spool.append_records(recs, 1_000 + f)
        out.extend(recs)
    await spool.wait_durable()
    return out


def test_append_recover_returns_unsealed_records_in_order(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        expected = await _fill(sp, 4)
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert state.unsealed_records == 12
        assert state.pending == []
        got = sp2.read_ranges([(sp2.min_seq, sp2.next_seq)])[0]
        assert got == expected
        assert sp2.next_seq == 12
        await sp2.aclose()

    run(go())


def test_sealed_uncommitted_batch_comes_back_with_same_key(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        await _fill(sp, 2)
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "k/obj-1", [(0, 4)], 1000))
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "k/obj-2", [(4, 6)], 1001))
        sp.append_commit(1)
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert [(b.batch_id, b.key, b.ranges) for b in state.pending] == [(2, "k/obj-2", [(4, 6)])]
        recs, meta = sp2.read_ranges(state.pending[0].ranges)
        assert recs == [b"frame1-rec1", b"frame1-rec2"]
        assert meta is None
        assert state.unsealed_records == 0
        assert sp2.allocate_batch_id() == 3
        await sp2.aclose()

    run(go())


def test_torn_tail_is_truncated_and_earlier_frames_survive(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        await _fill(sp, 3)
        await sp.aclose()
        seg = sorted(tmp_path.glob("seg-*.log"))[-1]
        size = seg.stat().st_size
        with open(seg, "ab") as f:  # half a frame, as a crash mid-write leaves it
            f.write(struct.pack(">IIB", 1000, 0, 1) + b"x" * 10)
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert state.truncated_bytes == 19
        assert seg.stat().st_size == size
        assert state.unsealed_records == 9
        await sp2.aclose()

    run(go())


def test_corrupt_frame_in_older_segment_refuses_to_start(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path), segment_size_bytes=8192)
        sp.open()
        for _ in range(10):
            sp.append_records([b"x" * 3000], 1)
        await sp.aclose()
        first = sorted(tmp_path.glob("seg-*.log"))[0]
        data = bytearray(first.read_bytes())
        data[200] ^= 0xFF
        first.write_bytes(bytes(data))
        with pytest.raises(SpoolError, match="damaged frame"):
            Spool(str(tmp_path)).open()

    run(go())


def test_newer_format_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "seg-000000000001.log").write_bytes(b"FHSPOOL\x00" + struct.pack(">HH", FORMAT_VERSION + 1, 0))
    with pytest.raises(SpoolError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        Spool(str(tmp_path)).open()


def test_segments_are_deleted_only_after_commit(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path), segment_size_bytes=16 * 1024)
        sp.open()
        for _ in range(20):
            sp.append_records([b"y" * 4000], 1)
        await sp.wait_durable()
        segs_before = len(list(tmp_path.glob("seg-*.log")))
        assert segs_before >= 5
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "a", [(0, 10)], 1))
        assert len(list(tmp_path.glob("seg-*.log"))) == segs_before  # sealed is not delivered
        size_before = sp.size_bytes
        sp.append_commit(1)
        # Files go only once the commit that freed them is on disk.
        await sp.wait_durable(force=True)
        after = len(list(tmp_path.glob("seg-*.log")))
        assert after < segs_before
        assert sp.size_bytes < size_before
        assert sp.min_seq > 0
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert state.unsealed_records == 10
        assert sp2.next_seq == 20
        await sp2.aclose()

    run(go())


def test_counters_survive_when_every_segment_was_trimmed(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path), segment_size_bytes=8192)
        sp.open()
        for _ in range(5):
            sp.append_records([b"z" * 3000], 1, positions={"file:a": {"offset": 7}})
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "a", [(0, 5)], 1))
        sp.append_commit(1)
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert sp2.next_seq == 5
        assert sp2.next_batch_id == 2
        assert state.positions == {"file:a": {"offset": 7}}
        await sp2.aclose()

    run(go())


def test_cap_refuses_appends_and_writes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path), max_size_bytes=10_000)
        sp.open()
        sp.append_records([b"a" * 4000], 1)
        size = sp.size_bytes
        with pytest.raises(SpoolFullError):
            sp.append_records([b"b" * 8000], 1)
        assert sp.size_bytes == size
        assert sp.next_seq == 1
        await sp.aclose()

    run(go())


def test_concurrent_waiters_share_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = os.fsync

    def counting(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        await sp.wait_durable(force=True)
        monkeypatch.setattr(os, "fsync", counting)

        async def one(i: int) -> None:
            sp.append_records([b"r%d" % i], 1)
            await sp.wait_durable()

        await asyncio.gather(*(one(i) for i in range(200)))
        await sp.aclose()

    run(go())
    assert 1 <= calls < 50  # 200 acknowledged appends, far fewer fsyncs


def test_metadata_and_positions_round_trip(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        sp.append_records([b"a", b"b"], 5, meta=[{"pk": "1"}, {"pk": "2"}], positions={"shard-1": "49"})
        await sp.wait_durable()
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert state.positions == {"shard-1": "49"}
        recs, meta = sp2.read_ranges([(0, 2)])
        assert recs == [b"a", b"b"] and meta == [{"pk": "1"}, {"pk": "2"}]
        await sp2.aclose()

    run(go())


def test_a_failed_write_leaves_no_partial_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        sp.append_records([b"good"], 1)
        await sp.wait_durable()
        real_write = os.write
        calls = {"n": 0}

        def short_then_enospc(fd: int, data: bytes) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                return real_write(fd, bytes(data)[:10])  # half a frame reaches the file
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", short_then_enospc)
        with pytest.raises(OSError):
            sp.append_records([b"x" * 1000], 1)
        monkeypatch.setattr(os, "write", real_write)
        sp.append_records([b"after"], 1)  # the log continues cleanly
        await sp.aclose()
        sp2 = Spool(str(tmp_path))
        state = sp2.open()
        assert state.truncated_bytes == 0
        assert sp2.read_ranges([(0, sp2.next_seq)])[0] == [b"good", b"after"]
        await sp2.aclose()

    run(go())


def test_an_empty_segment_left_by_a_crash_is_removed_not_taken_for_damage(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        sp.append_records([b"kept"], 1)
        await sp.aclose()
        (tmp_path / "seg-000000000009.log").write_bytes(b"")  # created, then power lost
        for _ in range(2):  # the second restart must not find a "truncated header" either
            sp2 = Spool(str(tmp_path))
            sp2.open()
            assert sp2.read_ranges([(sp2.min_seq, sp2.next_seq)])[0] == [b"kept"]
            await sp2.aclose()

    run(go())


def test_index_memory_per_frame_is_small(tmp_path: Path) -> None:
    """A backlog of single-record PutRecord frames must not cost an object per frame."""
    import tracemalloc

    async def go() -> float:
        sp = Spool(str(tmp_path), fsync="never", cache_bytes=0)
        sp.open()
        tracemalloc.start()
        try:
            for _ in range(50_000):
                sp.append_records([b"x" * 200], 1)
            current, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        frame = sp.frame_at(31_337)
        assert frame is not None and frame.records == [b"x" * 200]
        await sp.aclose()
        return current / 50_000

    assert run(go()) < 64


def test_a_failed_fsync_fences_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        sp.append_records([b"ok"], 1)
        await sp.wait_durable()

        def eio(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", eio)
        sp.append_records([b"lost?"], 1)
        with pytest.raises(SpoolError, match="fsync failed"):
            await sp.wait_durable()
        monkeypatch.undo()
        assert sp.failed is not None and not sp.has_room(1)
        with pytest.raises(SpoolError, match="fenced"):
            sp.append_records([b"refused"], 1)

    run(go())


def test_planned_reads_pick_scattered_records_from_disk_and_cache(tmp_path: Path) -> None:
    """A partition's records are a few per frame: a planned read reads just those, from the frame
    cache when the frame is there and from disk otherwise, and gives what read_ranges gives."""

    async def go() -> None:
        sp = Spool(str(tmp_path), cache_bytes=1 << 20)
        sp.open()
        records = [b"r%d-" % i + b"x" * (i % 7) for i in range(60)]
        for i in range(0, 60, 10):
            sp.append_records(records[i : i + 10], 1000 + i, meta=[{"i": j} for j in range(i, i + 10)])
        await sp.wait_durable()
        for first in (0, 20, 40):  # half the frames are only on disk
            sp.release_cache(first)
        ranges = [(0, 1), (3, 5), (9, 12), (25, 26), (29, 31), (40, 41), (47, 60)]
        want = [r for s, e in ranges for r in records[s:e]]
        assert sp.read_planned(sp.plan_records(ranges)) == want
        assert sp.read_ranges(ranges)[0] == want
        with pytest.raises(SpoolError, match="record 60 is missing"):
            sp.read_planned(sp.plan_records([(59, 61)]))
        await sp.aclose()

    run(go())


def test_the_frame_cache_holds_what_its_limit_allows_and_frees_exactly_what_it_held(tmp_path: Path) -> None:
    """Frames are cached while their records fit the cache's byte limit (a caller may give their
    size, or the spool sums it); releasing them frees exactly their size, so later frames are
    cached again."""

    async def go() -> None:
        sp = Spool(str(tmp_path), cache_bytes=100)
        sp.open()
        a = sp.append_records([b"x" * 30, b"y" * 30], 1)  # 60 bytes, summed here
        b = sp.append_records([b"z" * 30], 1, nbytes=30)  # 90 in all
        c = sp.append_records([b"w" * 20], 1)  # would make 110: on disk only
        await sp.wait_durable()
        assert [seq in sp._cache for seq in (a, b, c)] == [True, True, False]
        sp.release_cache(a)
        sp.release_cache(c)  # not cached: nothing to free
        d = sp.append_records([b"v" * 70], 1)  # 30 + 70 fits again
        assert d in sp._cache
        sp.release_cache(b)
        sp.release_cache(d)
        assert sp.append_records([b"u" * 100], 1) in sp._cache  # 100 of 100: the limit is inclusive
        frame = sp.frame_at(c)
        assert frame is not None and frame.records == [b"w" * 20]  # read back from disk
        await sp.aclose()

    run(go())


def test_a_position_set_to_none_is_forgotten_also_after_recovery(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path), segment_size_bytes=4096)
        sp.open()
        sp.append_records([b"a"], 1, positions={"file/1:2": {"offset": 2}, "file/1:3": {"offset": 9}})
        for _ in range(20):  # roll over a few segments, whose headers snapshot the positions
            sp.append_records([b"x" * 500], 2)
        sp.append_records([b"b"], 3, positions={"file/1:2": None})
        await sp.wait_durable()
        assert sp.positions == {"file/1:3": {"offset": 9}}
        await sp.aclose()
        sp2 = Spool(str(tmp_path), segment_size_bytes=4096)
        assert sp2.open().positions == {"file/1:3": {"offset": 9}}
        await sp2.aclose()

    run(go())


def test_a_records_frame_is_the_same_bytes_as_its_payload_framed_and_its_crc_is_zlibs() -> None:
    """The one-copy RECORDS frame and ISA-L's CRC write exactly the format zlib's CRC defined, and
    a payload reads back (from bytes, a bytearray or a memoryview) as the records, metadata and
    positions written."""
    import random
    import zlib

    from firehose.spool_format import (
        T_RECORDS,
        _frame,
        decode_records_payload,
        encode_records_frame,
        frame_crc,
        records_payload,
    )

    rng = random.Random(3)
    for _ in range(50):
        records = [rng.randbytes(rng.choice([0, 1, 7, 1000, 70_000])) for _ in range(rng.randrange(0, 40))]
        meta = [{"k": i} for i in range(len(records))] if rng.random() < 0.3 else None
        positions = {"file": rng.randrange(1 << 40)} if rng.random() < 0.3 else None
        first, arrival = rng.randrange(1 << 50), rng.randrange(1 << 42)
        payload = records_payload(first, arrival, records, meta, positions)
        assert encode_records_frame(first, arrival, records, meta, positions) == _frame(T_RECORDS, payload)
        for ftype in (T_RECORDS, 0, 255):
            assert frame_crc(ftype, payload) == zlib.crc32(payload, zlib.crc32(bytes((ftype,))))
        for given in (payload, bytearray(payload), memoryview(payload)):
            frame, got_positions = decode_records_payload(given)
            assert (frame.first_seq, frame.arrival_ms, frame.records, frame.meta, got_positions) == (
                first, arrival, records, meta, positions)
            assert all(type(r) is bytes for r in frame.records)
