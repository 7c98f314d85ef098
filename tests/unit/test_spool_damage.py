"""Damaged spool files: acknowledged data is never dropped silently. A flipped byte below the
durable mark refuses to open (naming segment and offset); a torn or unacknowledged tail is
truncated; `check` and `salvage` report and repair; running out of file descriptors does not
fence the spool."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import struct
import zlib
from pathlib import Path

import orjson
import pytest

from firehose import spool_format
from firehose.spool import FORMAT_VERSION, SealedBatch, Spool, SpoolError
from firehose.spool_format import T_COMMIT, T_DURABLE, T_SEAL, _frame
from firehose.spool_repair import check, salvage


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _acked(spool: Spool, frames: int, per_frame: int = 10) -> list[bytes]:
    """Append frames one request at a time, each acknowledged (fsynced) as the API does."""
    out: list[bytes] = []
    for f in range(frames):
        recs = [f"frame{f:03d}-rec{i:02d}".encode() for i in range(per_frame)]
        spool.append_records(recs, 1_000 + f)
        await spool.wait_durable()
        out.extend(recs)
    return out


def _write(directory: Path, frames: int = 50, **kw: int) -> list[bytes]:
    async def go() -> list[bytes]:
        sp = Spool(str(directory), **kw)  # type: ignore[arg-type]
        sp.open()
        recs = await _acked(sp, frames)
        await sp.aclose()
        return recs
    return run(go())


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.log"))


def _frame_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, payload length, type) of each frame, read with the documented layout."""
    data = path.read_bytes()
    # After the header: 12 bytes, and from format version 3 on the CRC key twice (u32).
    pos, out = (20 if struct.unpack_from(">H", data, 8)[0] >= 3 else 12), []
    while pos + 9 <= len(data):
        length, _crc, ftype = struct.unpack_from(">IIB", data, pos)
        out.append((pos, length, ftype))
        pos += 9 + length
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _records(directory: Path) -> list[bytes]:
    async def go() -> list[bytes]:
        sp = Spool(str(directory))
        sp.open()
        got = sp.read_ranges([(sp.min_seq, sp.next_seq)])[0]
        await sp.aclose()
        return got
    return run(go())


@pytest.mark.parametrize("which", ["first", "middle", "last-acknowledged"])
def test_a_flipped_byte_below_the_durable_mark_refuses_to_open(tmp_path: Path, which: str) -> None:
    _write(tmp_path)
    [seg] = _segments(tmp_path)
    records = [f for f in _frame_offsets(seg) if f[2] == 1]
    offset, length, _ = {"first": records[0], "middle": records[len(records) // 2],
                         "last-acknowledged": records[-1]}[which]
    _flip(seg, offset + 9 + length // 2)  # inside the payload: its CRC no longer matches
    with pytest.raises(SpoolError) as info:
        Spool(str(tmp_path)).open()
    message = str(info.value)
    assert seg.name in message and f"offset {offset}" in message and "durable point" in message
    assert "firehose spool salvage" in message
    assert seg.read_bytes()[offset + 9 + length // 2] != 0  # nothing was truncated


def test_a_flipped_length_field_below_the_durable_mark_refuses_to_open(tmp_path: Path) -> None:
    _write(tmp_path)
    [seg] = _segments(tmp_path)
    offset, _length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][10]
    _flip(seg, offset)  # the top byte of the length: the frame now seems to run past the end
    with pytest.raises(SpoolError, match="durable point"):
        Spool(str(tmp_path)).open()


def test_a_torn_last_frame_is_truncated_and_every_acknowledged_record_kept(tmp_path: Path) -> None:
    acked = _write(tmp_path)
    [seg] = _segments(tmp_path)
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # a crash mid-write: a frame header and half its payload
        f.write(struct.pack(">IIB", 4000, 12345, 1) + b"x" * 100)
    assert _records(tmp_path) == acked
    assert seg.stat().st_size < size + 109


def test_a_damaged_frame_past_every_durable_mark_is_an_unacknowledged_tail(tmp_path: Path) -> None:
    acked = _write(tmp_path)
    [seg] = _segments(tmp_path)
    with open(seg, "ab") as f:  # complete, but its CRC fails, and no fsync ever covered it
        f.write(struct.pack(">IIB", 30, 999, 1) + b"y" * 30)
    assert _records(tmp_path) == acked


def test_damage_in_an_older_segment_refuses_to_open(tmp_path: Path) -> None:
    _write(tmp_path, frames=200, segment_size_bytes=8192)
    segs = _segments(tmp_path)
    assert len(segs) >= 3
    offset, length, _ = [f for f in _frame_offsets(segs[0]) if f[2] == 1][2]
    _flip(segs[0], offset + 9 + length - 1)
    with pytest.raises(SpoolError, match="not the newest"):
        Spool(str(tmp_path)).open()


def _as_written_before(seg: Path, version: int) -> None:
    """Rewrite a segment as a release before format version 3 wrote it: a 12-byte header and
    frames under the plain CRC-32 (version 1: without DURABLE frames either)."""
    data = seg.read_bytes()
    frames = [(t, data[o + 9 : o + 9 + n]) for o, n, t in _frame_offsets(seg) if version >= 2 or t != 5]
    # A DURABLE mark's offset moves with its frame: the header is 8 bytes shorter.
    frames = [(t, struct.pack(">QQ", struct.unpack(">QQ", p)[0], struct.unpack(">QQ", p)[1] - 8) if t == 5 else p)
              for t, p in frames]
    seg.write_bytes(data[:8] + struct.pack(">HH", version, 0) + b"".join(_frame(t, p) for t, p in frames))


def test_a_version_1_segment_with_damage_before_more_data_refuses_to_open(tmp_path: Path) -> None:
    _write(tmp_path)
    [seg] = _segments(tmp_path)
    _as_written_before(seg, 1)
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][5]
    _flip(seg, offset + 9 + 3)
    with pytest.raises(SpoolError, match="without durable marks"):
        Spool(str(tmp_path)).open()


def test_the_format_version_is_3_with_keyed_crcs_and_durable_frames(tmp_path: Path) -> None:
    _write(tmp_path, frames=5)
    _write(tmp_path, frames=5)  # a second open: a second segment, under a key of its own
    segs = _segments(tmp_path)
    keys = []
    for seg in segs:
        data = seg.read_bytes()
        magic, version, _reserved, key, again = struct.unpack_from(">8sHHII", data, 0)
        assert (magic, version, FORMAT_VERSION) == (b"FHSPOOL\x00", 3, 3) and key == again != 0
        keys.append(key)
        frames = _frame_offsets(seg)
        assert 5 in {t for _o, _l, t in frames}
        for o, n, t in frames:  # each CRC is zlib's CRC-32 of type + payload, started from the key
            crc = struct.unpack_from(">I", data, o + 4)[0]
            payload = data[o + 9 : o + 9 + n]
            assert crc == zlib.crc32(payload, zlib.crc32(bytes((t,)), key)) != zlib.crc32(bytes((t,)) + payload)
    assert len(segs) == 2 and keys[0] != keys[1]


def test_check_reports_and_salvage_keeps_every_frame_that_verifies(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"

    async def go() -> list[bytes]:
        sp = Spool(str(spool_dir))
        sp.open()
        recs = await _acked(sp, 30)
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "k/a", [(0, 300)], 1000))
        await sp.aclose()
        return recs
    acked = run(go())
    [seg] = _segments(spool_dir)
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][7]  # records 70..79
    _flip(seg, offset + 9 + 20)
    [report] = check(str(spool_dir))
    assert not report.clean and report.damaged[0][0] == offset and report.lost_seqs == [(70, 80)]
    assert report.durable_mark > offset

    result = salvage(str(spool_dir))
    assert result["lost_records"] == 10 and result["lost_ranges"] == [(70, 80)]
    aside = Path(result["aside"])
    assert (aside / seg.name).exists() and list(aside.glob("*.bin"))
    assert all(r.clean for r in check(str(spool_dir)))

    async def reopen() -> None:
        sp = Spool(str(spool_dir))
        state = sp.open()
        [batch] = state.pending
        assert batch.key == "k/a" and list(batch.ranges) == [(0, 70), (80, 300)]
        got, _meta = sp.read_ranges(batch.ranges)
        assert got == acked[:70] + acked[80:]
        await sp.aclose()
    run(reopen())


def test_running_out_of_descriptors_does_not_fence_the_spool(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            while True:
                try:
                    held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            sp.append_records([b"while out of descriptors"], 1)
            await sp.wait_durable()  # fsyncs the file and its (new) directory entry
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert sp.failed is None
        sp.append_records([b"after"], 2)
        await sp.wait_durable()
        await sp.aclose()

    run(go())
    assert _records(tmp_path) == [b"while out of descriptors", b"after"]


@pytest.mark.parametrize("damage", ["flipped in the newest segment", "cut out of an older segment"])
def test_salvage_bridges_a_lost_opening_checkpoint_of_the_oldest_segment(tmp_path: Path, damage: str) -> None:
    """The oldest segment left (older ones deleted once delivered) opens with the checkpoint that
    says where its records start. With that frame lost, salvage must say it again: its records
    do not start at 0, and a spool read from the first segment would take them for damage (in
    the newest segment, for a torn tail, dropping every acknowledged record)."""
    spool_dir = tmp_path / "spool"
    newest = damage.endswith("newest segment")

    async def go() -> list[bytes]:
        sp = Spool(str(spool_dir))
        sp.open()
        early = await _acked(sp, 5)
        sp.commit_ranges([(0, len(early))])
        await sp.wait_durable(force=True)
        await sp.aclose()
        recs: list[bytes] = []
        for _ in range(1 if newest else 2):
            sp = Spool(str(spool_dir))
            sp.open()  # the delivered segment is deleted; the next one opens with next_seq 50
            recs += await _acked(sp, 5)
            await sp.aclose()
        return recs
    acked = run(go())
    oldest = _segments(spool_dir)[0]
    assert len(_segments(spool_dir)) == (1 if newest else 2)
    offset, length, ftype = _frame_offsets(oldest)[0]
    assert ftype == 4 and offset == 20  # T_CHECKPOINT, after the header
    if newest:
        _flip(oldest, offset + 9 + length // 2)
    else:
        data = oldest.read_bytes()
        oldest.write_bytes(data[:offset] + data[offset + 9 + length :])
    with pytest.raises(SpoolError, match="below the durable point" if newest else "not the newest"):
        _records(spool_dir)

    result = salvage(str(spool_dir))
    assert result["lost_records"] == 0
    assert all(r.clean for r in check(str(spool_dir)))
    assert _records(spool_dir) == acked


# ---------------------------------------------------------------- keyed CRCs (format version 3)
def _forging_spool(spool_dir: Path, forged: bytes, *, sealed_after: bool) -> list[bytes]:
    """Ten records, one record that is a whole frame with a valid plain CRC-32 (as any client may
    send), ten more; then the record frame holding the forgery gets a length field that ends
    its real frame just before the forged bytes, with a valid frame (the forgery) seemingly
    after it: the one guess salvage makes about a damaged frame's length."""
    before = [b"before-%02d" % i for i in range(10)]
    after = [b"after-%02d" % i for i in range(10)]

    async def go() -> None:
        sp = Spool(str(spool_dir))
        sp.open()
        for recs in (before, [forged], after):
            sp.append_records(recs, 1000)
            await sp.wait_durable()
        if sealed_after:
            await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "real/key", [(0, 21)], 1000))
        await sp.aclose()
    run(go())
    [seg] = _segments(spool_dir)
    offset, _length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][1]
    data = bytearray(seg.read_bytes())
    length_to_record = 22 + 4  # the RECORDS head and one length
    crc = struct.unpack_from(">I", data, offset + 4)[0]
    struct.pack_into(">II", data, offset, length_to_record, crc ^ 1)
    seg.write_bytes(bytes(data))
    return [*before, forged, *after]


Opened = tuple[list[tuple[str, list[tuple[int, int]]]], list[tuple[int, int]], dict[int, bytes]]


def _opened(spool_dir: Path) -> Opened:
    """(pending batches' keys and ranges, the ranges marked finished, every record by sequence)."""
    async def go() -> Opened:
        sp = Spool(str(spool_dir))
        state = sp.open()
        by_seq = {}
        for first, end in zip(sp._frame_starts, sp._frame_ends, strict=True):
            recs, _meta = sp.read_ranges([(first, end)])
            by_seq.update(zip(range(first, end), recs, strict=True))
        await sp.aclose()
        return [(b.key, list(b.ranges)) for b in state.pending], list(sp.committed.ranges()), by_seq
    return run(go())


def test_a_forged_seal_in_record_data_does_not_come_to_life_in_salvage(tmp_path: Path) -> None:
    forged = _frame(T_SEAL, orjson.dumps({"id": 99, "key": "attacker/chosen-key", "ranges": [[0, 21]],
                                          "oldest": 1, "info": {}}))
    written = _forging_spool(tmp_path, forged, sealed_after=True)
    result = salvage(str(tmp_path))
    pending, _unsealed, by_seq = _opened(tmp_path)
    # The forgery is not a frame: the salvage resumes at the next genuine one (the key tells).
    assert pending == [("real/key", [(0, 10), (11, 21)])]
    assert by_seq == {s: r for s, r in enumerate(written) if s != 10}
    assert result["lost_ranges"] == [(10, 11)]


def test_a_forged_commit_in_record_data_finishes_nothing_in_salvage(tmp_path: Path) -> None:
    forged = _frame(T_COMMIT, orjson.dumps({"ranges": [[0, 1_000_000]]}))
    written = _forging_spool(tmp_path, forged, sealed_after=False)
    result = salvage(str(tmp_path))
    _pending, finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(written) if s != 10}
    assert finished == [(10, 11)]  # the one record lost; the rest still to be delivered
    assert result["lost_ranges"] == [(10, 11)]


def test_a_forged_durable_mark_in_an_unacknowledged_tail_does_not_block_the_stream(tmp_path: Path) -> None:
    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path))
        sp.open()
        acked = await _acked(sp, 5)
        seg = sp._active
        assert seg is not None
        torn_at = seg.size
        sp.append_records([b"never acknowledged"], 2000)
        # A record holding a DURABLE frame that says the segment is on disk past the torn frame.
        sp.append_records([b"pad" + _frame(T_DURABLE, struct.pack(">QQ", seg.number, torn_at + 1))], 2000)
        sp.abandon()
        os.close(sp._fd)
        return acked
    acked = run(go())
    [seg] = _segments(tmp_path)
    offset = [f for f in _frame_offsets(seg) if f[2] == 1][-2][0]
    _flip(seg, offset + 9 + 5)  # the unacknowledged frame, torn
    assert _records(tmp_path) == acked  # the tail is truncated; the forged mark is not believed


@pytest.mark.parametrize("copy", [0, 1])
def test_a_damaged_key_copy_is_reported_and_salvaged_without_loss(tmp_path: Path, copy: int) -> None:
    acked = _write(tmp_path, frames=20)
    [seg] = _segments(tmp_path)
    _flip(seg, 12 + 4 * copy + 2)
    with pytest.raises(SpoolError, match="segment header is damaged"):
        Spool(str(tmp_path)).open()
    [report] = check(str(tmp_path))
    assert report.reasons == ["damaged segment header"] and report.lost_seqs == []
    assert salvage(str(tmp_path))["lost_records"] == 0
    assert all(r.clean for r in check(str(tmp_path)))
    assert _records(tmp_path) == acked


def test_a_version_2_spool_opens_continues_and_salvages(tmp_path: Path) -> None:
    acked = _write(tmp_path, frames=20)
    [seg] = _segments(tmp_path)
    _as_written_before(seg, 2)
    assert _records(tmp_path) == acked  # read as it is; the new segment is version 3
    assert [struct.unpack_from(">H", s.read_bytes(), 8)[0] for s in _segments(tmp_path)] == [2, 3]
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][3]  # records 30..39
    _flip(seg, offset + 9 + length // 2)
    assert salvage(str(tmp_path))["lost_ranges"] == [(30, 40)]
    assert all(r.clean for r in check(str(tmp_path)))
    _pending, finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(acked) if not 30 <= s < 40} and finished == [(30, 40)]


def test_the_search_after_damage_is_bounded_whatever_the_records_hold(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Record bytes that each look like a frame header with a long length (here 0x01 bytes:
    type 1, length 0x01010101) must not make the search check each candidate's whole length."""
    async def go() -> None:
        sp = Spool(str(tmp_path), segment_size_bytes=64 << 20)
        sp.open()
        for recs in ([b"x" * 100], [b"\x01" * (1 << 20)], [b"\x00" * (16 << 20)], [b"y" * 100]):
            sp.append_records(recs, 1000)
            await sp.wait_durable()
        await sp.aclose()
    run(go())
    [seg] = _segments(tmp_path)
    offset, _length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][1]
    _flip(seg, offset + 1)  # the 1 MiB record's length field: it no longer ends where it did
    checked = [0]
    real = spool_format.frame_crc

    def counting(ftype: int, payload: bytes | memoryview, key: int = 0) -> int:
        checked[0] += len(payload)
        return real(ftype, payload, key)
    monkeypatch.setattr(spool_format, "frame_crc", counting)
    [report] = check(str(tmp_path))
    size = seg.stat().st_size
    assert not report.clean and checked[0] <= 40 * size, (checked[0], size)


@pytest.mark.parametrize("header", ["version reads 2", "version reads 1", "first key copy"])
def test_header_damage_with_the_opening_checkpoint_damaged_too_loses_nothing(tmp_path: Path, header: str) -> None:
    acked = _write(tmp_path, frames=20)
    [seg] = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    if header == "first key copy":
        data[13] ^= 0x10
    else:
        struct.pack_into(">H", data, 8, int(header[-1]))
    offset, length, ftype = _frame_offsets(seg)[0]
    assert ftype == 4
    data[offset + 9 + length // 2] ^= 0x40  # the opening CHECKPOINT
    seg.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="header is damaged|durable point"):
        Spool(str(tmp_path)).open()  # never taken for a torn tail
    assert seg.stat().st_size == len(data)
    assert salvage(str(tmp_path))["lost_records"] == 0
    assert all(r.clean for r in check(str(tmp_path)))
    assert _records(tmp_path) == acked


def test_an_opening_checkpoint_copied_later_does_not_send_the_sources_back(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        for n in range(1, 21):
            sp.append_records([b"line %d" % n], 1000, positions={"file": {"offset": n}})
            await sp.wait_durable()
        await sp.aclose()
        sp = Spool(str(tmp_path))
        sp.open()  # a second segment, opening with {"offset": 20}
        for n in range(21, 41):
            sp.append_records([b"line %d" % n], 1000, positions={"file": {"offset": n}})
            await sp.wait_durable()
        await sp.aclose()
    run(go())
    segs = _segments(tmp_path)
    data = segs[-1].read_bytes()
    cp_offset, cp_length, ftype = _frame_offsets(segs[-1])[0]
    assert ftype == 4
    at = [f for f in _frame_offsets(segs[-1]) if f[2] == 1][15][0]  # a frame boundary
    segs[-1].write_bytes(data[:at] + data[cp_offset : cp_offset + 9 + cp_length] + data[at:])
    with pytest.raises(SpoolError, match="durable point"):
        Spool(str(tmp_path)).open()
    reasons = [why for rep in check(str(tmp_path)) for why in rep.reasons]
    assert reasons == ["a copy of an opening checkpoint out of place"]
    assert salvage(str(tmp_path))["lost_records"] == 0

    async def reopen() -> dict[str, object]:
        sp = Spool(str(tmp_path))
        state = sp.open()
        await sp.aclose()
        return state.positions
    assert run(reopen()) == {"file": {"offset": 40}}


def test_salvage_with_an_empty_newest_segment_still_opens(tmp_path: Path) -> None:
    acked = _write(tmp_path, frames=20)
    [seg] = _segments(tmp_path)
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][4]
    _flip(seg, offset + 9 + length // 2)
    (tmp_path / "seg-000000000002.log").write_bytes(b"")  # created just before a crash
    assert salvage(str(tmp_path))["lost_ranges"] == [(40, 50)]
    _pending, finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(acked) if not 40 <= s < 50} and finished == [(40, 50)]


def test_check_and_salvage_leave_a_newer_format_alone(tmp_path: Path) -> None:
    _write(tmp_path, frames=5)
    [seg] = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    struct.pack_into(">H", data, 8, FORMAT_VERSION + 1)
    seg.write_bytes(bytes(data))
    for tool in (check, salvage):
        with pytest.raises(SpoolError, match=f"format version {FORMAT_VERSION + 1} was written by a newer"):
            tool(str(tmp_path))
    assert seg.read_bytes() == bytes(data) and _segments(tmp_path) == [seg]


@pytest.mark.parametrize("damage", ["the last frame's records", "a length field, version 2"])
def test_records_lost_at_the_end_of_the_newest_segment_are_counted(tmp_path: Path, damage: str) -> None:
    """No frame that verifies comes after them to say how many there were: their own heads do."""
    acked = _write(tmp_path, frames=20)
    [seg] = _segments(tmp_path)
    if damage.endswith("version 2"):
        _as_written_before(seg, 2)  # never searched: the rest of the segment is set aside
        offset, _length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][7]
        _flip(seg, offset + 2)
        lost = (70, 200)
    else:
        offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][-1]
        _flip(seg, offset + 9 + length - 1)
        lost = (190, 200)
    result = salvage(str(tmp_path))
    assert result["lost_ranges"] == [lost] and result["lost_records"] == lost[1] - lost[0]
    _pending, finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(acked) if not lost[0] <= s < lost[1]} and finished == [lost]


def test_after_damage_in_random_record_data_only_the_damaged_frame_is_lost(tmp_path: Path) -> None:
    """Compressed or random record bytes hold frame type bytes with lengths that fit: the search
    must not spend its bounds on them and give up on the intact frames after."""
    rng = random.Random(7)

    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path), segment_size_bytes=64 << 20)
        sp.open()
        recs = [b"before", rng.randbytes(1 << 20), *(b"after-%d" % i + b"." * (1 << 20) for i in range(40))]
        for rec in recs:
            sp.append_records([rec], 1000)
            await sp.wait_durable()
        await sp.aclose()
        return recs
    written = run(go())
    [seg] = _segments(tmp_path)
    offset, _length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][1]
    _flip(seg, offset)  # the random record's length field now runs past the end
    assert salvage(str(tmp_path))["lost_ranges"] == [(1, 2)]
    _pending, _finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(written) if s != 1}


@pytest.mark.parametrize("fsyncs", ["one per frame", "one for them all"])
def test_after_a_damaged_length_the_walk_resumes_at_the_next_durable_mark(tmp_path: Path, fsyncs: str) -> None:
    """What the damaged frame's fsync group held after it is set aside and counted; nothing
    else is lost. (Record data is never searched for frames: see _Scan.)"""
    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path))
        sp.open()
        recs: list[bytes] = []
        for f in range(20):
            batch = [b"frame%02d-rec%d" % (f, i) for i in range(10)]
            sp.append_records(batch, 1000)
            recs += batch
            if fsyncs == "one per frame":
                await sp.wait_durable()
        await sp.wait_durable()
        await sp.aclose()
        return recs
    written = run(go())
    [seg] = _segments(tmp_path)
    frames = [f for f in _frame_offsets(seg) if f[2] == 1]
    _flip(seg, frames[5][0] + 1)  # frame 5's length field: it now ends inside a later frame
    _flip(seg, frames[7][0] + 9 + frames[7][1] - 1)  # frame 7's records
    lost = [(50, 60), (70, 80)] if fsyncs == "one per frame" else [(50, 200)]
    assert salvage(str(tmp_path))["lost_ranges"] == lost
    _pending, finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(written) if not any(a <= s < b for a, b in lost)}
    assert finished == lost


def test_a_newer_looking_version_before_a_segment_of_this_release_is_damage(tmp_path: Path) -> None:
    acked = _write(tmp_path, frames=10) + _write(tmp_path, frames=10)
    first, _second = _segments(tmp_path)
    data = bytearray(first.read_bytes())
    data[8] ^= 0x20  # the version reads 8195: this release never writes after a newer segment
    first.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="the version field is damaged"):
        Spool(str(tmp_path)).open()
    [report, _] = check(str(tmp_path))
    assert report.reasons == ["damaged segment header"]
    assert salvage(str(tmp_path))["lost_records"] == 0
    assert _records(tmp_path) == acked


def test_a_damaged_commit_of_a_batch_whose_records_are_gone_does_not_leave_it_pending(tmp_path: Path) -> None:
    """The batch was delivered and committed, and the segment holding its records deleted; then
    its COMMIT frame is damaged. Salvage must not leave it waiting for records that are gone."""
    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path))
        sp.open()
        sp.append_records([b"a%d" % i for i in range(5)], 1000)
        await sp.wait_durable()
        await sp.aclose()
        sp = Spool(str(tmp_path))
        sp.open()  # the second segment opens with next_seq 5
        bid = sp.allocate_batch_id()
        await sp.append_seal(SealedBatch(bid, "k/delivered", [(0, 5)], 1000))
        later = [b"b%d" % i for i in range(5)]
        sp.append_records(later, 1000)
        await sp.wait_durable()
        sp.append_commit(bid)  # delivered: the first segment goes
        await sp.wait_durable(force=True)
        sp.append_records([b"c"], 1000)
        await sp.wait_durable()
        await sp.aclose()
        return later + [b"c"]
    kept = run(go())
    [seg] = _segments(tmp_path)
    [(offset, length, _)] = [f for f in _frame_offsets(seg) if f[2] == 3]  # the COMMIT
    _flip(seg, offset + 9 + length // 2)
    assert salvage(str(tmp_path))["lost_records"] == 0
    pending, _finished, by_seq = _opened(tmp_path)
    assert pending == [] and by_seq == dict(zip(range(5, 11), kept, strict=True))


@pytest.mark.parametrize("damage", ["type byte", "whole header"])
def test_a_destroyed_frame_header_in_a_group_at_the_end_is_counted(tmp_path: Path, damage: str) -> None:
    async def go() -> list[bytes]:
        sp = Spool(str(tmp_path))
        sp.open()
        recs = [b"r%02d" % i for i in range(50)]
        sp.append_records(recs[:10], 1000)
        await sp.wait_durable()
        for f in range(1, 5):  # four frames in one fsync
            sp.append_records(recs[10 * f : 10 * f + 10], 1000)
        await sp.wait_durable()
        await sp.aclose()
        return recs
    written = run(go())
    [seg] = _segments(tmp_path)
    offset = [f for f in _frame_offsets(seg) if f[2] == 1][1][0]
    if damage == "type byte":  # of the frame of records 10..19 (1 -> 0x41): its length still leads on
        _flip(seg, offset + 8)
        lost = (10, 20)
    else:  # header zeroed: the rest of its fsync group is set aside, and counted by its intact frames
        data = bytearray(seg.read_bytes())
        data[offset : offset + 16] = bytes(16)
        seg.write_bytes(bytes(data))
        lost = (10, 50)
    assert salvage(str(tmp_path))["lost_ranges"] == [lost]
    _pending, _finished, by_seq = _opened(tmp_path)
    assert by_seq == {s: r for s, r in enumerate(written) if not lost[0] <= s < lost[1]}


def _sealed_then(directory: Path, more: list[bytes]) -> None:
    """Records 0..9 sealed in a pending batch ("k/undelivered"), then ``more`` records, if any."""
    async def go() -> None:
        sp = Spool(str(directory))
        sp.open()
        sp.append_records([b"a%d" % i for i in range(10)], 1000)
        await sp.wait_durable()
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "k/undelivered", [(0, 10)], 1000))
        if more:
            sp.append_records(more, 1000)
            await sp.wait_durable()
        await sp.aclose()
    run(go())


def test_sealed_records_lost_before_the_first_kept_one_are_counted_not_committed(tmp_path: Path) -> None:
    """The opening checkpoint's length is damaged: the walk resumes at the next durable mark,
    past the first records. The seal says they were there: lost, and the batch not finished."""
    _sealed_then(tmp_path, [b"b%d" % i for i in range(10)])
    [seg] = _segments(tmp_path)
    offset, _length, ftype = _frame_offsets(seg)[0]
    assert ftype == 4
    _flip(seg, offset + 2)  # the opening checkpoint's length field
    result = salvage(str(tmp_path))
    assert result["lost_ranges"] == [(0, 10)] and result["finished_batches"] == []
    pending, finished, by_seq = _opened(tmp_path)
    assert sorted(by_seq) == list(range(10, 20)) and finished == [(0, 10)]
    assert pending == []  # every record of it lost: nothing left to deliver


def test_when_no_record_is_kept_the_sealed_ones_are_counted_and_numbering_goes_on(tmp_path: Path) -> None:
    _sealed_then(tmp_path, [])
    [seg] = _segments(tmp_path)
    _flip(seg, _frame_offsets(seg)[0][0] + 2)  # the opening checkpoint's length: the records go too
    assert salvage(str(tmp_path))["lost_ranges"] == [(0, 10)]

    async def reopen() -> tuple[int, list[SealedBatch]]:
        sp = Spool(str(tmp_path))
        state = sp.open()
        await sp.aclose()
        return sp.next_seq, state.pending
    assert run(reopen()) == (10, [])  # new records are not numbered 0..9 under the old batch


def test_a_second_salvage_does_not_take_its_own_checkpoint_for_the_opening_one(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Spool(str(tmp_path))
        sp.open()
        for k in range(3):
            sp.append_records([b"r%d-%d" % (k, i) for i in range(5)], 1000)
            await sp.wait_durable()
        await sp.append_seal(SealedBatch(sp.allocate_batch_id(), "k/undelivered", [(0, 5)], 1000))
        await sp.aclose()
    run(go())
    [seg] = _segments(tmp_path)
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][1]
    _flip(seg, offset + 9 + length - 1)
    assert salvage(str(tmp_path))["lost_ranges"] == [(5, 10)]  # a bridging checkpoint now follows
    offset, length, ftype = _frame_offsets(seg)[0]
    assert ftype == 4
    _flip(seg, offset + 9 + length // 2)  # then the opening checkpoint is damaged
    result = salvage(str(tmp_path))
    assert result["lost_ranges"] == [] and result["finished_batches"] == []
    pending, _finished, by_seq = _opened(tmp_path)
    assert pending == [("k/undelivered", [(0, 5)])] and sorted(by_seq) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
