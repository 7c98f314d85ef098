"""The spool's file format (see firehose/spool.py for the whole contract): segment and frame
headers, frame types, the RECORDS payload layout and durable marks.

File format, version 3 (versions 1 and 2 are still read: see below). Each segment
``seg-<number>.log`` starts with a 20-byte header (``FHSPOOL\\0``, u16 format version, u16
reserved, then the segment's CRC key twice as u32); frames follow, each ``u32 payload length, u32
CRC, u8 type`` then the payload. The CRC is zlib's CRC-32 of type+payload started from the key
instead of 0. The key is random, drawn once per open spool and never exposed: record data is a
client's bytes and may hold a whole frame with a valid plain CRC-32, and a reader that resumes
after damage (salvage, the durable-mark search) must not take such bytes for a frame of ours.
Under an unknown key each forged frame verifies with a chance of 2^-32, and a client can write
many, so past damage salvage resumes only at a DURABLE mark (see firehose/spool_repair.py). The key is written twice so
that damage to one copy does not cost the segment. Version 2 segments (a 12-byte header without
keys, frames with plain CRC-32, key 0) and version 1 ones (no DURABLE frames either) are read as
they are. A RECORDS payload is ``u64 first_seq, u64
arrival_ms, u32 count, u16 flags``, ``count`` little-endian u32 lengths, the record bytes, then
optional JSON sections (per-record metadata, source positions) each prefixed by a u32 length.
SEAL, COMMIT and CHECKPOINT payloads are JSON; a DURABLE payload is ``u64 segment number,
u64 offset``. A reader refuses a newer format version with a
message that says so, rather than guessing."""

from __future__ import annotations

import os
import re
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any, Literal

import orjson
from isal import isal_zlib

from firehose.log import LogError, LogFullError, RecordFrame

FORMAT_VERSION = 3
SEGMENT_MAGIC = b"FHSPOOL\x00"
_SEG_HEADER = struct.Struct(">8sHH")  # what every version starts with
_SEG_KEYS = struct.Struct(">II")  # version 3 on: the CRC key, twice
_FRAME_HEADER = struct.Struct(">IIB")
_RECORDS_HEAD = struct.Struct(">QQIH")

T_RECORDS = 1
T_SEAL = 2
T_COMMIT = 3
T_CHECKPOINT = 4
T_DURABLE = 5
_DURABLE = struct.Struct(">QQ")
# A DURABLE frame's header: payload length 16, any CRC, type 5 (found again past damage by this).
_DURABLE_HEADER_RE = re.compile(rb"\x00\x00\x00\x10.{4}\x05", re.DOTALL)

ROLL_DONE_ACTIVE_BYTES = 1 << 20
LENGTH_TABLE_ENTRIES = 1 << 20  # record offsets read_planned keeps (8 bytes each: 8 MiB at most)

F_META = 1
F_POSITIONS = 2

FsyncPolicy = Literal["always", "interval", "never"]


class SpoolError(LogError):
    """The spool cannot be opened or written; the message names the file."""


class SpoolFullError(SpoolError, LogFullError):
    """The stream's spool is at its size cap; callers answer with back-pressure."""


@dataclass(slots=True)
class _FrameRef:
    segment: int
    offset: int  # offset of the frame header in the segment file
    length: int  # payload length
    first_seq: int
    end_seq: int


@dataclass
class _Segment:
    number: int
    path: str
    size: int
    first_seq: int | None = None
    end_seq: int | None = None
    seal_ids: set[int] = field(default_factory=set)
    version: int = FORMAT_VERSION


def _segment_name(number: int) -> str:
    return f"seg-{number:012d}.log"


_LITTLE = sys.byteorder == "little"
_NO_HEADER = bytes(_FRAME_HEADER.size)
_TYPE_BYTES = tuple(bytes((t,)) for t in range(256))


def new_key() -> int:
    """A random, non-zero CRC key for the segments one open spool writes."""
    return int.from_bytes(os.urandom(4), "big") or 1


def header_size(version: int) -> int:
    """Where a segment's first frame starts."""
    return _SEG_HEADER.size + (_SEG_KEYS.size if version >= 3 else 0)


def segment_header(key: int) -> bytes:
    return _SEG_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0) + _SEG_KEYS.pack(key, key)


def header_keys(data: bytes, version: int) -> tuple[int, int]:
    """A segment's two copies of its CRC key ((0, 0) before version 3); the caller has checked
    that ``data`` holds the whole header."""
    return _SEG_KEYS.unpack_from(data, _SEG_HEADER.size) if version >= 3 else (0, 0)


def frame_at(data: bytes, pos: int, key: int) -> tuple[int, int, bytes] | None:
    """(size, type, payload) of a frame at ``pos`` whose CRC verifies under ``key``, else None.
    Only a frame that verifies is copied out."""
    if len(data) - pos < _FRAME_HEADER.size:
        return None
    length, crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
    start = pos + _FRAME_HEADER.size
    if not T_RECORDS <= ftype <= T_DURABLE or start + length > len(data):
        return None
    with memoryview(data) as view:
        if frame_crc(ftype, view[start : start + length], key) != crc:
            return None
    return _FRAME_HEADER.size + length, ftype, bytes(data[start : start + length])


def layout_verifies(data: bytes, start: int, key: int) -> bool:
    """Whether a segment's frames verify when they start at ``start`` under ``key``: its opening
    frame, else the frame after it (the opening one damaged, its length intact), else (under a
    key) any DURABLE mark. This is how a damaged header's version or key copy is told apart."""
    first = frame_at(data, start, key)
    if first is not None:
        return True
    if len(data) - start >= _FRAME_HEADER.size:
        nxt = start + _FRAME_HEADER.size + _FRAME_HEADER.unpack_from(data, start)[0]
        if nxt < len(data) and frame_at(data, nxt, key) is not None:
            return True
    return key != 0 and durable_mark_after(data, start - 1, None, key) > 0  # (under key 0 one can be forged)


def _keyed_after_all(data: bytes) -> bool:
    """Whether a segment that says it is older than version 3 holds a key pair whose frames
    verify (by chance: 2^-64): a version 3 segment whose version field is damaged."""
    if len(data) < header_size(3):
        return False
    key, again = _SEG_KEYS.unpack_from(data, _SEG_HEADER.size)
    return key == again != 0 and layout_verifies(data, header_size(3), key)


def stale_checkpoint(payload: bytes | memoryview) -> bool:
    """Whether a CHECKPOINT met after a segment's first frame carries source positions. Only a
    segment's opening checkpoint does (salvage's own carry none), so such a frame is a copy moved
    by damage, and applying it would send the sources back to where they were then."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False  # not readable at all: reported as such where it is applied
    return isinstance(doc, dict) and bool(doc.get("positions"))


def read_header(data: bytes, path: str, directory: str) -> tuple[int, int] | None:
    """A segment's (format version, CRC key); None when ``data`` is shorter than its header.
    Raises :class:`SpoolError` for a file that is no segment, a newer version, or a damaged key."""
    if len(data) < _SEG_HEADER.size:
        return None
    magic, version, _ = _SEG_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise SpoolError(f"{path}: not a firehose spool segment (bad magic)")
    if version > FORMAT_VERSION:
        raise SpoolError(f"{path}: spool format version {version} was written by a newer firehose; this "
                         f"release reads version {FORMAT_VERSION}. Upgrade firehose or restore its data_dir (if no "
                         f"newer release wrote it, the version field is damaged: `firehose spool check {directory}`)")
    if len(data) < header_size(version):
        return None
    key, again = header_keys(data, version)
    if version < 3 and _keyed_after_all(data):
        key, again = 0, 1  # a version 3 header whose version field is damaged: never a torn tail
    if key != again:
        raise SpoolError(f"{path}: the segment header is damaged; see `firehose spool check {directory}` "
                         "and `firehose spool salvage`")
    return version, key


def encode_records_frame(
    first_seq: int,
    arrival_ms: int,
    records: Sequence[bytes],
    meta: list[Any] | None = None,
    positions: dict[str, Any] | None = None,
    key: int = 0,
) -> bytearray:
    """A whole RECORDS frame, built in one copy of the records: the frame header's place is
    reserved, the parts joined once, and the header written in after the CRC (under ``key``)."""
    parts = _records_parts(first_seq, arrival_ms, records, meta, positions)
    parts[0] = _NO_HEADER
    frame = bytearray().join(parts)
    payload = memoryview(frame)[_FRAME_HEADER.size :]
    _FRAME_HEADER.pack_into(frame, 0, len(payload), frame_crc(T_RECORDS, payload, key), T_RECORDS)
    payload.release()
    return frame


def records_payload(
    first_seq: int,
    arrival_ms: int,
    records: Sequence[bytes],
    meta: list[Any] | None = None,
    positions: dict[str, Any] | None = None,
) -> bytes:
    """A RECORDS frame's payload (see the module docstring)."""
    return b"".join(_records_parts(first_seq, arrival_ms, records, meta, positions)[1:])


def _records_parts(first_seq: int, arrival_ms: int, records: Sequence[bytes], meta: list[Any] | None,
                   positions: dict[str, Any] | None) -> list[bytes]:
    """A place for the frame header, then the payload's parts."""
    lengths = array("I", [len(r) for r in records])
    if not _LITTLE:  # pragma: no cover - the format is little-endian on disk
        lengths.byteswap()
    flags = (F_META if meta is not None else 0) | (F_POSITIONS if positions else 0)
    parts: list[bytes] = [b"", _RECORDS_HEAD.pack(first_seq, arrival_ms, len(records), flags), lengths.tobytes()]
    parts.extend(records)
    if meta is not None:
        blob = orjson.dumps(meta)
        parts.append(struct.pack(">I", len(blob)))
        parts.append(blob)
    if positions:
        blob = orjson.dumps(positions)
        parts.append(struct.pack(">I", len(blob)))
        parts.append(blob)
    return parts


def frame_crc(ftype: int, payload: bytes | memoryview, key: int = 0) -> int:
    """A frame's CRC-32 (zlib's polynomial) over its type byte and payload, started from ``key``
    (0 is the plain CRC-32). ISA-L's CRC (python-isal, already a dependency for gzip) is the same
    function as zlib's at many times the speed: ~50 GiB/s against ~2 on this project's test
    machine, where zlib's was 8% of the ingest loop."""
    return isal_zlib.crc32(payload, isal_zlib.crc32(_TYPE_BYTES[ftype], key))


def iter_frames(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every frame in ``data``, a whole number of frames; a frame that fails
    its CRC or runs past the end raises :class:`SpoolError` naming ``where``."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < _FRAME_HEADER.size:
            raise SpoolError(f"{where}: a frame is cut short at offset {pos}")
        length, crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
        start = pos + _FRAME_HEADER.size
        payload = data[start : start + length]
        if len(payload) != length or frame_crc(ftype, payload) != crc:
            raise SpoolError(f"{where}: the frame at offset {pos} fails its CRC")
        yield ftype, payload
        pos = start + length


def _frame(ftype: int, payload: bytes, key: int = 0) -> bytes:
    crc = frame_crc(ftype, payload, key)
    return _FRAME_HEADER.pack(len(payload), crc, ftype) + payload


def _incomplete_tail(data: bytes, pos: int) -> bool:
    """Whether the frame at ``pos`` runs past the end of the data (a write cut short)."""
    if len(data) - pos < _FRAME_HEADER.size:
        return True
    length, _crc, _ftype = _FRAME_HEADER.unpack_from(data, pos)
    return pos + _FRAME_HEADER.size + length > len(data)


def durable_mark_after(data: bytes, pos: int, segment: int | None, key: int) -> int:
    """The highest offset of ``segment`` (None: of any) that a valid DURABLE frame (under the
    segment's CRC ``key``) found after ``pos`` records as fsynced (0 if none). Found by their
    fixed header, so damage before them does not hide them; under a key, a DURABLE frame in
    record data verifies with a chance of 2^-32."""
    best = 0
    for m in _DURABLE_HEADER_RE.finditer(data, pos + 1):
        start = m.start()
        length, crc, ftype = _FRAME_HEADER.unpack_from(data, start)
        payload = data[start + _FRAME_HEADER.size : start + _FRAME_HEADER.size + length]
        if len(payload) != length or frame_crc(ftype, payload, key) != crc:
            continue
        number, offset = _DURABLE.unpack(payload)
        if (segment is None or number == segment) and offset <= start:
            best = max(best, offset)
    return best


def decode_records_payload(payload: bytes) -> tuple[RecordFrame, dict[str, Any] | None]:
    first_seq, arrival_ms, count, flags = _RECORDS_HEAD.unpack_from(payload, 0)
    pos = _RECORDS_HEAD.size
    lengths = array("I")
    lengths.frombytes(payload[pos : pos + 4 * count])
    if not _LITTLE:  # pragma: no cover
        lengths.byteswap()
    pos += 4 * count
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    # Each record sliced from the payload's bytes: one object and one copy per record (a memoryview
    # slice turned into bytes makes two objects).
    ends = list(accumulate(lengths, initial=pos))
    records = [payload[a:b] for a, b in pairwise(ends)]
    pos = ends[-1]
    view = memoryview(payload)
    meta = None
    positions = None
    if flags & F_META:
        (n,) = struct.unpack_from(">I", payload, pos)
        meta = orjson.loads(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if flags & F_POSITIONS:
        (n,) = struct.unpack_from(">I", payload, pos)
        positions = orjson.loads(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return RecordFrame(first_seq, arrival_ms, records, meta), positions


def read_length_table(fd: int, offset: int, first: int, count: int, where: str) -> tuple[int, int, array[int]]:
    """The arrival time, flags and record file offsets (record k spans ``[t[k], t[k+1])``) of
    the RECORDS frame of ``count`` records from ``first`` at file ``offset``: one pread of its
    head and length table, not of its records."""
    head = os.pread(fd, _RECORDS_HEAD.size + 4 * count, offset + _FRAME_HEADER.size)
    if len(head) != _RECORDS_HEAD.size + 4 * count or _RECORDS_HEAD.unpack_from(head)[0] != first:
        raise SpoolError(f"{where}: the frame of record {first} does not read back")
    _first, arrival_ms, _count, flags = _RECORDS_HEAD.unpack_from(head)
    lengths = array("I")
    lengths.frombytes(head[_RECORDS_HEAD.size :])
    if not _LITTLE:  # pragma: no cover
        lengths.byteswap()
    return arrival_ms, flags, array("q", accumulate(lengths, initial=offset + _FRAME_HEADER.size + len(head)))
