"""Checking and salvaging a damaged spool (``firehose spool check`` / ``salvage``): the file
format and the durable marks are described in firehose/spool.py."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from firehose.spool import (
    _DURABLE,
    _FRAME_HEADER,
    _RECORDS_HEAD,
    _SEG_HEADER,
    FORMAT_VERSION,
    SEGMENT_MAGIC,
    T_CHECKPOINT,
    T_COMMIT,
    T_DURABLE,
    T_RECORDS,
    T_SEAL,
    _frame,
)

_CANDIDATE_RE = re.compile(rb"\x00.{7}[\x01-\x05]", re.DOTALL)  # a frame header under 16 MiB


@dataclass
class SegmentReport:
    """What :func:`check` found in one segment file."""

    name: str
    frames: int = 0
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of bad bytes
    durable_mark: int = 0  # the highest offset a DURABLE frame says was fsynced
    lost_seqs: list[tuple[int, int]] = field(default_factory=list)  # record ranges with no valid frame
    header_ok: bool = True

    @property
    def clean(self) -> bool:
        return self.header_ok and not self.damaged


def _walk(data: bytes) -> Iterator[tuple[int, int, int, bytes | None]]:
    """Every frame of a segment body as ``(offset, size, type, payload)``; a run of bytes that is
    no valid frame comes as ``(offset, size, 0, None)``, and the walk resumes at the next offset
    where a frame verifies (its header is plausible and its CRC matches)."""
    pos = _SEG_HEADER.size
    end = len(data)
    view = memoryview(data)
    while pos < end:
        frame = _frame_at(data, view, pos)
        if frame is not None:
            size, ftype, payload = frame
            yield pos, size, ftype, payload
            pos += size
            continue
        nxt = end
        for m in _CANDIDATE_RE.finditer(data, pos + 1):
            if _frame_at(data, view, m.start()) is not None:
                nxt = m.start()
                break
        yield pos, nxt - pos, 0, None
        pos = nxt


def _frame_at(data: bytes, view: memoryview, pos: int) -> tuple[int, int, bytes] | None:
    if len(data) - pos < _FRAME_HEADER.size:
        return None
    length, crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
    start = pos + _FRAME_HEADER.size
    if ftype not in (T_RECORDS, T_SEAL, T_COMMIT, T_CHECKPOINT, T_DURABLE) or start + length > len(data):
        return None
    payload = view[start : start + length]
    if zlib.crc32(payload, zlib.crc32(bytes((ftype,)))) != crc:
        return None
    return _FRAME_HEADER.size + length, ftype, bytes(payload)


def _segment_names(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))


def check(directory: str) -> list[SegmentReport]:
    """Read every segment of a spool directory without changing anything and report its damage:
    byte ranges that are no valid frame, the durable mark, and the records no valid frame holds."""
    reports = []
    for name in _segment_names(directory):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        rep = SegmentReport(name)
        reports.append(rep)
        if len(data) < _SEG_HEADER.size or _SEG_HEADER.unpack_from(data, 0)[0] != SEGMENT_MAGIC:
            rep.header_ok = data == b""  # an empty file is a segment created just before a crash
            continue
        prev_end: int | None = None
        gap_open = False
        for offset, size, ftype, payload in _walk(data):
            if payload is None:
                rep.damaged.append((offset, size))
                gap_open = True
                continue
            rep.frames += 1
            if ftype == T_DURABLE:
                rep.durable_mark = max(rep.durable_mark, _DURABLE.unpack(payload)[1])
            elif ftype == T_RECORDS:
                first, _arrival, count, _flags = _RECORDS_HEAD.unpack_from(payload, 0)
                if gap_open and prev_end is not None and first > prev_end:
                    rep.lost_seqs.append((prev_end, first))
                prev_end = first + count
                gap_open = False
    return reports


def _subtract(ranges: list[tuple[int, int]], remove: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = ranges
    for rs, re_ in remove:
        nxt: list[tuple[int, int]] = []
        for s, e in out:
            if e <= rs or s >= re_:
                nxt.append((s, e))
                continue
            if s < rs:
                nxt.append((s, rs))
            if e > re_:
                nxt.append((re_, e))
        out = nxt
    return out


def _salvage_segment(directory: str, rep: SegmentReport, aside: str, seals: dict[int, dict[str, Any]]) -> None:
    """Keep every valid frame of one segment (rewriting it if it is damaged), noting its seals."""
    import shutil

    path = os.path.join(directory, rep.name)
    with open(path, "rb") as f:
        data = f.read()
    if not rep.clean:
        shutil.copy2(path, os.path.join(aside, rep.name))
        if not rep.header_ok:
            os.unlink(path)
            return
    out = bytearray(_SEG_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0))
    for offset, size, ftype, payload in _walk(data):
        if payload is None:
            with open(os.path.join(aside, f"{rep.name}.offset-{offset}.length-{size}.bin"), "wb") as f:
                f.write(data[offset : offset + size])
            continue
        if ftype == T_SEAL:
            doc = orjson.loads(payload)
            seals[doc["id"]] = doc
        if ftype != T_DURABLE:  # a DURABLE frame's offsets are the old file's: meaningless once rewritten
            out += data[offset : offset + size]
    if rep.clean:
        return
    tmp = path + ".salvage"
    with open(tmp, "wb") as f:
        f.write(out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_fixups(directory: str, lost: list[tuple[int, int]], seals: dict[int, dict[str, Any]]) -> None:
    """Mark ``lost`` records finished and re-seal batches that named them, in the newest segment."""
    if not lost:
        return
    extra = bytearray(_frame(T_COMMIT, orjson.dumps({"ranges": [list(r) for r in lost]})))
    for doc in seals.values():
        ranges = [(int(s), int(e)) for s, e in doc["ranges"]]
        kept = _subtract(ranges, lost)
        if kept != ranges:
            extra += _frame(T_SEAL, orjson.dumps({**doc, "ranges": [list(r) for r in kept]}))
    names = _segment_names(directory)
    if names:
        with open(os.path.join(directory, names[-1]), "ab") as f:
            f.write(extra)
            f.flush()
            os.fsync(f.fileno())


def salvage(directory: str, aside: str | None = None) -> dict[str, Any]:
    """Rewrite a damaged spool so that it opens: every frame whose CRC verifies is kept, in order;
    the damaged bytes (and a copy of each damaged segment as it was) go to ``aside`` (default
    ``<directory>/damaged-<time>``); records no valid frame holds are marked finished, and sealed
    batches that named them are re-sealed without them. Returns a report of what was dropped.

    Run it with the daemon stopped. What it cannot know is reported, not guessed: a damaged SEAL
    makes its records be batched again (they may be delivered a second time); a damaged COMMIT
    makes a delivered batch be delivered again under the same key (an overwrite)."""
    import time as _time

    reports = check(directory)
    damaged = [r for r in reports if not r.clean]
    if not damaged:
        return {"damaged_segments": [], "lost_records": 0, "lost_ranges": [], "aside": None}
    aside = aside or os.path.join(directory, f"damaged-{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}")
    os.makedirs(aside, exist_ok=True)
    lost: list[tuple[int, int]] = []
    seals: dict[int, dict[str, Any]] = {}
    for rep in reports:
        _salvage_segment(directory, rep, aside, seals)
        lost.extend(rep.lost_seqs)
    _append_fixups(directory, lost, seals)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {
        "damaged_segments": [{"segment": r.name, "damaged": r.damaged, "header_ok": r.header_ok} for r in damaged],
        "lost_records": sum(e - s for s, e in lost),
        "lost_ranges": lost,
        "aside": aside,
    }
