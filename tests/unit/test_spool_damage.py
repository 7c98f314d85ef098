"""Damaged spool files: acknowledged data is never dropped silently. A flipped byte below the
durable mark refuses to open (naming segment and offset); a torn or unacknowledged tail is
truncated; `check` and `salvage` report and repair; running out of file descriptors does not
fence the spool."""

from __future__ import annotations

import asyncio
import os
import resource
import struct
from pathlib import Path

import pytest

from firehose.spool import FORMAT_VERSION, SealedBatch, Spool, SpoolError
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
    pos, out = 12, []
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


def test_a_version_1_segment_with_damage_before_more_data_refuses_to_open(tmp_path: Path) -> None:
    _write(tmp_path)
    [seg] = _segments(tmp_path)
    # As a release without durable marks wrote it: version 1, no DURABLE frames.
    data = seg.read_bytes()
    kept = b"".join(data[o : o + 9 + n] for o, n, t in _frame_offsets(seg) if t != 5)
    seg.write_bytes(data[:8] + struct.pack(">H", 1) + data[10:12] + kept)
    offset, length, _ = [f for f in _frame_offsets(seg) if f[2] == 1][5]
    _flip(seg, offset + 9 + 3)
    with pytest.raises(SpoolError, match="without durable marks"):
        Spool(str(tmp_path)).open()


def test_the_format_version_is_2_with_durable_frames(tmp_path: Path) -> None:
    _write(tmp_path, frames=5)
    [seg] = _segments(tmp_path)
    assert FORMAT_VERSION == 2 and struct.unpack_from(">H", seg.read_bytes(), 8)[0] == 2
    assert 5 in {t for _o, _l, t in _frame_offsets(seg)}


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
    assert ftype == 4 and offset == 12  # T_CHECKPOINT
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
