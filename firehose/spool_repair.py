"""Checking and salvaging a damaged spool (``firehose spool check`` / ``salvage``): the file
format and the durable marks are described in firehose/spool.py."""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from firehose.intervals import subtract_ranges
from firehose.spool_format import (
    _DURABLE,
    _DURABLE_HEADER_RE,
    _FRAME_HEADER,
    _RECORDS_HEAD,
    _SEG_HEADER,
    _SEG_KEYS,
    FORMAT_VERSION,
    SEGMENT_MAGIC,
    T_CHECKPOINT,
    T_COMMIT,
    T_DURABLE,
    T_RECORDS,
    T_SEAL,
    SpoolError,
    _frame,
    durable_mark_after,
    frame_at,
    header_keys,
    header_size,
    layout_verifies,
    segment_header,
    stale_checkpoint,
)

_TYPES = (T_RECORDS, T_SEAL, T_COMMIT, T_CHECKPOINT, T_DURABLE)


@dataclass
class SegmentReport:
    """What :func:`check` found in one segment file, and what :func:`salvage` would write."""

    name: str
    frames: int = 0
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of bad bytes
    reasons: list[str] = field(default_factory=list)  # one per damaged range
    durable_mark: int = 0  # the highest offset a DURABLE frame says was fsynced
    lost_seqs: list[tuple[int, int]] = field(default_factory=list)  # record ranges with no valid frame
    header_ok: bool = True
    key: int = field(default=0, repr=False)  # the CRC key its frames verify under (and are rewritten under)
    # The segment as salvage rewrites it: kept frames (bytes) and checkpoints over gaps.
    plan: list[bytes] = field(default_factory=list, repr=False)

    reordered: bool = False  # frames put back in sequence: the file must be rewritten

    @property
    def clean(self) -> bool:
        return self.header_ok and not self.damaged and not self.lost_seqs and not self.reordered


def _layout(data: bytes) -> tuple[int, int, bool] | None:
    """(where the first frame starts, the CRC key, whether the header is damaged) of a segment;
    None when the file does not start as a whole segment header. A damaged key copy or version
    field costs nothing: the layout under which the segment's frames verify is taken."""
    if len(data) < _SEG_HEADER.size or _SEG_HEADER.unpack_from(data, 0)[0] != SEGMENT_MAGIC:
        return None
    version = _SEG_HEADER.unpack_from(data, 0)[1]
    if len(data) < header_size(version):
        return None
    keyed = header_size(FORMAT_VERSION)
    copies = list(_SEG_KEYS.unpack_from(data, _SEG_HEADER.size)) if len(data) >= keyed else []
    stated = (header_size(version), header_keys(data, version)[0])
    damaged = version > FORMAT_VERSION or (version >= 3 and copies[0] != copies[1])
    for start, key in (stated, *((keyed, k) for k in copies), (_SEG_HEADER.size, 0)):
        if layout_verifies(data, start, key):
            return start, key, damaged or (start, key) != stated
    return stated[0], stated[1], damaged


def _records_extent(data: bytes, base: int = 0) -> int | None:
    """The length of the RECORDS payload at ``base`` by its own head, length table and section
    lengths; None when they run past the end of ``data``."""
    if len(data) - base < _RECORDS_HEAD.size:
        return None
    _first, _arrival, count, flags = _RECORDS_HEAD.unpack_from(data, base)
    table_end = base + _RECORDS_HEAD.size + 4 * count
    if table_end > len(data):
        return None
    off = table_end + (sum(struct.unpack_from(f"<{count}I", data, base + _RECORDS_HEAD.size)) if count else 0)
    for bit in (1, 2):  # F_META, F_POSITIONS: u32 length + JSON each
        if flags & bit:
            if off + 4 > len(data):
                return None
            off += 4 + int.from_bytes(data[off : off + 4], "big")
    return off - base if off <= len(data) else None


def _records_shape(payload: bytes) -> tuple[int, int] | None:
    """(first_seq, count) of a RECORDS payload whose internal layout adds up to its length (so
    its length field can be trusted even though its CRC failed), else None."""
    if _records_extent(payload) != len(payload):
        return None
    first, _arrival, count, _flags = _RECORDS_HEAD.unpack_from(payload, 0)
    return first, count


class _Scan:
    """One segment's frames that verify and can be read, in file order, and the damaged ranges
    between them: found once, used by both of salvage's passes.

    After a frame that fails its CRC, the walk resumes where its own length says when a frame
    that verifies (or the end) follows. Otherwise, in a segment with a CRC key (format version
    3), it resumes at the next DURABLE mark that verifies under the key: one follows every
    fsync, and the frame after it starts on a frame boundary. What lies between (the damaged
    frame and the rest of its fsync group) is set aside; its records are counted as lost by the
    sequence numbers around them. It never searches record data for other frames: a client's
    record can hold forged frames, and though each verifies under a key it never saw with a
    chance of 2^-32, a client can write many. A forged DURABLE mark taken instead does no harm:
    marks are dropped, and the walk goes on from it only over frames that verify themselves
    (the one after a forgery is the client's bytes again, or the spool's own next frame). A
    segment without a key (versions 1 and 2) has no search at all: there a forged mark would
    verify, so the rest of the segment is set aside."""

    def __init__(self, data: bytes) -> None:
        layout = _layout(data)
        self.ok = layout is not None
        self.start, self.key, self.header_damaged = layout or (len(data), 0, False)
        self.frames: list[tuple[int, int, int]] = []  # (offset, size, type)
        self.damaged: list[tuple[int, int, str]] = []  # (offset, length, reason)
        self._marks: list[int] | None = None  # offsets of the DURABLE marks that verify
        pos = self.start
        while pos < len(data):
            frame = frame_at(data, pos, self.key)
            if frame is not None and _readable(frame[1], frame[2]):
                self.frames.append((pos, frame[0], frame[1]))
                pos += frame[0]
                continue
            nxt = self._resume(data, pos) if frame is None else pos + frame[0]
            self.damaged.append((pos, nxt - pos, "CRC mismatch" if frame is None
                                 else "a frame that verifies but cannot be read"))
            pos = nxt

    def _resume(self, data: bytes, pos: int) -> int:
        end = len(data)
        if end - pos >= _FRAME_HEADER.size:
            length, _crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
            nxt = pos + _FRAME_HEADER.size + length
            # Under a key, a frame that verifies where the length points is evidence enough, even
            # when the type byte is what was damaged; without one, the type must be plausible too.
            if (self.key or ftype in _TYPES) and nxt <= end and (nxt == end or frame_at(data, nxt, self.key)):
                return nxt
        if not self.key:
            return end
        if self._marks is None:  # found once per segment, in one regex pass: linear in its size
            self._marks = [m.start() for m in _DURABLE_HEADER_RE.finditer(data, self.start)
                           if frame_at(data, m.start(), self.key) is not None]
        i = bisect.bisect_right(self._marks, pos)
        return self._marks[i] if i < len(self._marks) else end


@dataclass
class _Sorted:
    """One segment's frames as salvage will write them back."""

    leading: list[bytes] = field(default_factory=list)
    records: list[tuple[int, int, int, bytes]] = field(default_factory=list)  # (first_seq, count, offset, raw)
    others: list[bytes] = field(default_factory=list)
    first_type: int = 0
    cp_ahead: int = 0  # the highest next_seq of a checkpoint met so far after the leading one
    start: int = 0  # where the segment's first frame is
    cp_misplaced: bool = False


class _Walker:
    """One pass over a spool's segments, oldest first, carrying the expected next sequence
    number across them. Within a segment, RECORDS frames are put back in sequence order (frames
    swapped or moved by damage keep their records); a frame that repeats or overlaps records
    already kept is set aside; gaps are lost records, bridged by a checkpoint."""

    def __init__(self, firsts: set[int]) -> None:
        self.next_seq: int | None = None
        self.seals: dict[int, dict[str, Any]] = {}
        self.firsts = firsts  # first_seq of every RECORDS frame that verifies, in any segment
        self.deferred: dict[int, tuple[int, bytes]] = {}  # frames found before their turn
        self.moved = False  # a frame was deferred or emitted away from its file position
        self.committed: list[tuple[int, int]] = []  # COMMIT ranges: records already finished
        self.committed_ids: set[int] = set()  # COMMITs of sealed batches
        self.base: int | None = None  # next_seq of the oldest segment's opening checkpoint, if it verifies
        self.segments = 0
        self.oldest_kept: int | None = None  # the first record of the oldest RECORDS frame kept

    def segment(self, name: str, data: bytes, scan: _Scan, *, newest: bool) -> SegmentReport:
        rep = SegmentReport(name)
        self.segments += 1
        if not scan.ok:
            # An empty newest file is a segment created just before a crash; anything else is damage.
            rep.header_ok = data == b"" and newest
            if not rep.header_ok:
                rep.damaged.append((0, len(data)))
                rep.reasons.append("bad or truncated segment header")
            return rep
        rep.key = scan.key
        if scan.header_damaged:
            rep.damaged.append((0, scan.start))
            rep.reasons.append("damaged segment header")
        rep.durable_mark = durable_mark_after(data, scan.start - 1, int(name[4:-4]), rep.key)
        rep.frames = len(scan.frames)
        rep.damaged += [(offset, length) for offset, length, _why in scan.damaged]
        rep.reasons += [why for _offset, _length, why in scan.damaged]
        sorted_ = _Sorted(start=scan.start)
        for pos, size, ftype in scan.frames:
            self._sort(rep, sorted_, pos, data[pos : pos + size], ftype, data[pos + _FRAME_HEADER.size : pos + size])
        self.moved = False
        emitted = self._in_sequence(rep, sorted_.records)
        # Every frame under this segment's key: some were moved here from another segment.
        rep.plan = [segment_header(rep.key), *(_rekey(f, rep.key) for f in (*sorted_.leading, *emitted, *sorted_.others))]
        kept = [_RECORDS_HEAD.unpack_from(raw, _FRAME_HEADER.size)[0] for raw in emitted if raw[8] == T_RECORDS]
        kept_set = set(kept)
        in_order = [first for first, _c, _p, _r in sorted_.records if first in kept_set]
        rep.reordered = self.moved or sorted_.cp_misplaced or kept != in_order or (
            bool(sorted_.leading) and sorted_.first_type != T_CHECKPOINT)
        return rep

    def _sort(self, rep: SegmentReport, into: _Sorted, pos: int, raw: bytes, ftype: int, payload: bytes) -> None:
        """File one frame of a segment: the leading checkpoint, a RECORDS frame, or the rest."""
        into.first_type = into.first_type or ftype
        if ftype == T_RECORDS:
            first, _arrival, count, _flags = _RECORDS_HEAD.unpack_from(payload, 0)
            into.records.append((first, count, pos, raw))
            into.cp_misplaced = into.cp_misplaced or first < into.cp_ahead
        elif ftype == T_CHECKPOINT and not into.leading and (pos == into.start or _opening(payload)):
            # The segment's opening state, first in it or wherever damage moved it. Salvage's own
            # checkpoints (bridges, fix-ups: next_batch_id 0) are not, unless first; the spool's
            # always have a next_batch_id of 1 or more.
            into.leading.append(raw)
            self._checkpoint_seen(rep, payload, at_start=pos == into.start)
        elif ftype == T_CHECKPOINT and stale_checkpoint(payload):
            rep.damaged.append((pos, len(raw)))
            rep.reasons.append("a copy of an opening checkpoint out of place")
        elif ftype == T_CHECKPOINT:
            into.others.append(raw)
            into.cp_ahead = max(into.cp_ahead, int(orjson.loads(payload)["next_seq"]))
        elif ftype != T_DURABLE:  # a DURABLE frame's offsets are this file's: meaningless once rewritten
            doc = orjson.loads(payload)
            if ftype == T_SEAL:
                self.seals[int(doc["id"])] = doc
            elif ftype == T_COMMIT:
                self.committed.extend((int(s), int(e)) for s, e in doc.get("ranges", []))
                if isinstance(doc.get("id"), int):
                    self.committed_ids.add(doc["id"])
            into.others.append(raw)

    def _checkpoint_seen(self, rep: SegmentReport, payload: bytes, *, at_start: bool) -> None:
        target = int(orjson.loads(payload)["next_seq"])
        if self.segments == 1 and at_start:  # where the oldest segment says the spool starts
            self.base = target
        if self.next_seq is not None and target > self.next_seq:
            rep.lost_seqs.append((self.next_seq, target))  # the records of a lost segment
        self.next_seq = max(self.next_seq or 0, target)

    def _in_sequence(self, rep: SegmentReport, records: list[tuple[int, int, int, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        for first, count, pos, raw in sorted(records, key=lambda r: (r[0], r[2])):
            if self.next_seq is None:
                self.next_seq = first
                if first > 0:
                    # The spool's oldest records with no checkpoint before them: the segment's
                    # opening one is lost. One must say where they start, or a reader starting
                    # at 0 takes them for damage (and, in the newest segment, for a torn tail).
                    out.append(self._checkpoint())
                    self.moved = True  # the file no longer opens as it is: rewrite it
            if first < self.next_seq:
                rep.damaged.append((pos, len(raw)))
                rep.reasons.append(f"records {first}..{first + count - 1} repeat records already kept")
                continue
            if first > self.next_seq and self.next_seq in self.firsts:
                self.deferred[first] = (count, raw)  # moved here by damage: its turn comes later
                self.moved = True
                continue
            self._emit(rep, out, first, count, raw)
        return out

    def _emit(self, rep: SegmentReport, out: list[bytes], first: int, count: int, raw: bytes) -> None:
        assert self.next_seq is not None
        if first > self.next_seq:
            rep.lost_seqs.append((self.next_seq, first))
            self.next_seq = first
            out.append(self._checkpoint())
        out.append(raw)
        self.oldest_kept = first if self.oldest_kept is None else min(self.oldest_kept, first)
        self.next_seq = first + count
        while self.next_seq in self.deferred:  # frames that were waiting for these records
            nxt_first = self.next_seq
            nxt_count, nxt_raw = self.deferred.pop(nxt_first)
            out.append(nxt_raw)
            self.next_seq = nxt_first + nxt_count
            self.moved = True

    def finish(self, rep: SegmentReport) -> None:
        """Frames still waiting at the end go into the newest segment, in order."""
        if not self.deferred:
            return
        tail: list[bytes] = []
        for first in sorted(self.deferred):
            count, raw = self.deferred.pop(first)
            if self.next_seq is not None and first >= self.next_seq:
                self._emit(rep, tail, first, count, raw)
        rep.plan.extend(_rekey(f, rep.key) for f in tail)
        rep.reordered = True

    def _checkpoint(self) -> bytes:
        return _frame(T_CHECKPOINT, orjson.dumps({"next_seq": self.next_seq, "next_batch_id": 0, "positions": {}}))


def _opening(payload: bytes) -> bool:
    """Whether a CHECKPOINT is one the spool wrote to open a segment (not one of salvage's)."""
    doc = orjson.loads(payload)
    return isinstance(doc, dict) and int(doc.get("next_batch_id", 0)) >= 1


def _rekey(raw: bytes, key: int) -> bytes:
    """A verified frame with its CRC computed again under ``key``."""
    _length, _crc, ftype = _FRAME_HEADER.unpack_from(raw, 0)
    return _frame(ftype, raw[_FRAME_HEADER.size :], key)


def _readable(ftype: int, payload: bytes) -> bool:
    """Whether a frame that verifies can also be read (a CRC can match by chance on bytes that
    were never a frame of ours)."""
    try:
        if ftype == T_RECORDS:
            return _records_shape(payload) is not None
        if ftype == T_DURABLE:
            return len(payload) == _DURABLE.size
        doc = orjson.loads(payload)
        if ftype == T_SEAL:
            return isinstance(doc, dict) and isinstance(doc.get("id"), int) and isinstance(doc.get("ranges"), list)
        if ftype == T_CHECKPOINT:
            return isinstance(doc, dict) and isinstance(doc.get("next_seq"), int)
        return isinstance(doc, dict)
    except (orjson.JSONDecodeError, struct.error, ValueError):
        return False


def _segment_names(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))


def _analyse(directory: str) -> tuple[list[SegmentReport], dict[int, dict[str, Any]], list[int]]:
    names, blobs = _read_segments(directory)
    scans = [_Scan(data) for data in blobs]
    walker = _Walker(_record_firsts(blobs, scans))
    reports = [walker.segment(name, data, scan, newest=i == len(names) - 1)
               for i, (name, data, scan) in enumerate(zip(names, blobs, scans, strict=True))]
    if reports and reports[-1].header_ok and reports[-1].plan:
        walker.finish(reports[-1])
    for rep in reports:  # a loss a salvage already recorded (a COMMIT of the range) is not news
        rep.lost_seqs = [r for r in rep.lost_seqs if subtract_ranges([r], walker.committed)]
    if reports:
        _lost_at_the_end(reports, walker, blobs[-1], scans[-1])
    lost, finished = _missing_sealed(walker, [r for rep in reports for r in rep.lost_seqs])
    if reports:
        reports[0].lost_seqs[:0] = lost
    return reports, walker.seals, finished


def _missing_sealed(walker: _Walker, lost: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """Records a sealed batch with no COMMIT names that no frame holds, below the oldest record
    kept, where no gap says they are lost. The seal says they were there. Below where the oldest
    segment's opening checkpoint says it starts, they were in segments deleted because
    everything in them was finished: a batch all of whose records are there is finished (its
    COMMIT was in the damage; without one it would wait for records that are gone). Above it
    (or with that checkpoint damaged) they are lost. Returns (lost ranges, finished batch ids)."""
    # With no record kept anywhere, every record a seal names is gone.
    held_from = walker.oldest_kept if walker.oldest_kept is not None else walker.next_seq
    held_from = max((int(e) for doc in walker.seals.values() for _s, e in doc["ranges"]), default=0) \
        if held_from is None else held_from
    base = walker.base or 0
    missing_all: list[tuple[int, int]] = []
    finished: list[int] = []
    for bid, doc in sorted(walker.seals.items()):
        if bid in walker.committed_ids:
            continue
        ranges = subtract_ranges([(int(s), int(e)) for s, e in doc["ranges"]], lost)
        missing = [(s, min(e, held_from)) for s, e in ranges if s < held_from]
        if not missing:
            continue
        trimmed = [(s, min(e, base)) for s, e in missing if s < base]
        missing_all += subtract_ranges(missing, [(0, base)])
        if ranges and not subtract_ranges(ranges, trimmed):
            finished.append(bid)
    return sorted(missing_all), finished


def _read_segments(directory: str) -> tuple[list[str], list[bytes]]:
    """The segments' names and contents, leaving out an empty newest one (created just before a
    crash, nothing in it: the one before it is the newest)."""
    names = _segment_names(directory)
    while names and os.path.getsize(os.path.join(directory, names[-1])) == 0:
        names.pop()
    blobs = []
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            blobs.append(f.read())
    ours_later = False  # whether a later segment is of this release's version
    for name, data in reversed(list(zip(names, blobs, strict=True))):
        _refuse_newer(os.path.join(directory, name), data, ours_later)
        ours_later = ours_later or _version(data) == FORMAT_VERSION
    return names, blobs


def _lost_at_the_end(reports: list[SegmentReport], walker: _Walker, data: bytes, scan: _Scan) -> None:
    """Records lost after the last one any valid frame holds: as the damaged frames at the end of
    the newest segment count them, and as far as sealed batches name records."""
    newest = reports[-1]
    if newest.header_ok and walker.next_seq is not None:
        end = max(_records_in_damage(data, scan, newest.durable_mark, walker.next_seq),
                  _verified_records_end(data, scan, newest.durable_mark, walker.next_seq))
        if end > walker.next_seq:
            newest.lost_seqs.append((walker.next_seq, end))
            walker.next_seq = end
    sealed_end = max((int(e) for doc in walker.seals.values() for _s, e in doc["ranges"]), default=0)
    if walker.next_seq is not None and sealed_end > walker.next_seq and any(not r.clean for r in reports):
        newest.lost_seqs.append((walker.next_seq, sealed_end))
        walker.next_seq = sealed_end


def _records_in_damage(data: bytes, scan: _Scan, durable_mark: int, next_seq: int) -> int:
    """Where the acknowledged records that damaged frames after the newest segment's last kept
    RECORDS frame held end, as their own heads say: no frame that verifies tells how many were
    lost there. Read only below the durable mark, frame by frame from where the damage starts,
    a RECORDS frame's length taken from its own length table. The first head must start at or
    before ``next_seq`` (where the kept records end), each later one go on from the one before,
    and each add up to its length field (or be followed by a head that goes on from it); the
    walk stops at the first that does not. A lower bound, never more than the bytes hold."""
    last_kept = max((pos for pos, _size, ftype in scan.frames if ftype == T_RECORDS), default=-1)
    chain: int | None = None  # where the last head read ends
    for offset, length, _why in scan.damaged:
        if offset < last_kept:
            continue
        pos, end = offset, min(offset + length, durable_mark)
        while pos + _FRAME_HEADER.size + _RECORDS_HEAD.size <= end:
            size, _crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
            if ftype == T_RECORDS:
                first, _arrival, count, _flags = _RECORDS_HEAD.unpack_from(data, pos + _FRAME_HEADER.size)
                extent = _records_extent(data, pos + _FRAME_HEADER.size)
                if extent is None or first != (chain if chain is not None else first) or first > (chain or next_seq):
                    return max(next_seq, chain or 0)
                if extent != size and _next_head(data, pos + _FRAME_HEADER.size + extent) != first + count:
                    return max(next_seq, chain or 0)  # a head neither whole nor followed by the next
                chain, size = first + count, extent
            elif ftype not in _TYPES:
                break
            pos += _FRAME_HEADER.size + size
    return max(next_seq, chain or 0)


def _verified_records_end(data: bytes, scan: _Scan, durable_mark: int, next_seq: int) -> int:
    """Where the RECORDS frames that verify inside the damaged ranges after the newest segment's
    last kept RECORDS frame (starting below the durable mark) end: intact frames of the damaged
    frame's fsync group, set aside with it. Used to count what was lost, never to keep anything
    (a client's record could hold a forged frame), so a lucky forgery could only make the count
    high. Bounded: one place in 16 of the bytes looked at, their CRCs 8 bytes per byte."""
    if not scan.key:
        return next_seq
    last_kept = max((pos for pos, _size, ftype in scan.frames if ftype == T_RECORDS), default=-1)
    best = next_seq
    for offset, length, _why in scan.damaged:
        if offset < last_kept or offset >= durable_mark:
            continue
        end, places, budget = offset + length, length // 16 + 1024, 8 * length
        at = data.find(b"\x01", offset + _FRAME_HEADER.size)
        while 0 <= at < min(end, durable_mark + _FRAME_HEADER.size) and places > 0 and budget > 0:
            places -= 1
            start = at - (_FRAME_HEADER.size - 1)
            size = _FRAME_HEADER.unpack_from(data, start)[0]
            if start + _FRAME_HEADER.size + size <= end and size >= _RECORDS_HEAD.size:
                first, _arrival, count, _flags = _RECORDS_HEAD.unpack_from(data, start + _FRAME_HEADER.size)
                if next_seq <= first and first + count <= next_seq + length and _RECORDS_HEAD.size + 4 * count <= size:
                    budget -= size
                    if frame_at(data, start, scan.key) is not None:
                        best = max(best, first + count)
            at = data.find(b"\x01", at + 1)
    return best


def _next_head(data: bytes, at: int) -> int | None:
    """first_seq of the RECORDS frame header at ``at``, or after a few other frames there."""
    for _ in range(4):
        if len(data) - at < _FRAME_HEADER.size + _RECORDS_HEAD.size:
            return None
        length, _crc, ftype = _FRAME_HEADER.unpack_from(data, at)
        if ftype == T_RECORDS:
            return int(_RECORDS_HEAD.unpack_from(data, at + _FRAME_HEADER.size)[0])
        if ftype not in _TYPES:
            return None
        at += _FRAME_HEADER.size + length
    return None


def _version(data: bytes) -> int | None:
    if len(data) < _SEG_HEADER.size or _SEG_HEADER.unpack_from(data, 0)[0] != SEGMENT_MAGIC:
        return None
    return int(_SEG_HEADER.unpack_from(data, 0)[1])


def _refuse_newer(path: str, data: bytes, ours_later: bool) -> None:
    """Check and salvage read and rewrite this release's format only: a newer segment is left
    alone, whole, unless a later segment is of this release's version. This release never
    writes after a segment it cannot read, so then the newer-looking version field is damage."""
    version = _version(data)
    if version is not None and version > FORMAT_VERSION and not ours_later:
        raise SpoolError(f"{path}: spool format version {version} was written by a newer firehose; this "
                         f"release reads version {FORMAT_VERSION} and changes nothing. Use the release that "
                         f"wrote it (if none did, the version field is damaged)")


def _record_firsts(blobs: list[bytes], scans: list[_Scan]) -> set[int]:
    """first_seq of every RECORDS frame that verifies, in any segment."""
    return {_RECORDS_HEAD.unpack_from(data, pos + _FRAME_HEADER.size)[0]
            for data, scan in zip(blobs, scans, strict=True) for pos, _size, ftype in scan.frames if ftype == T_RECORDS}


def check(directory: str) -> list[SegmentReport]:
    """Read every segment of a spool directory without changing anything and report its damage:
    byte ranges that are no valid frame (or frames out of order), the durable mark, and the
    records no valid frame holds."""
    return _analyse(directory)[0]


def _rewrite(directory: str, rep: SegmentReport, aside: str) -> None:
    """Set a damaged segment aside (whole, and each damaged range) and write its plan."""
    import shutil

    path = os.path.join(directory, rep.name)
    shutil.copy2(path, os.path.join(aside, rep.name))
    with open(path, "rb") as f:
        data = f.read()
    for offset, size in rep.damaged:
        with open(os.path.join(aside, f"{rep.name}.offset-{offset}.length-{size}.bin"), "wb") as f:
            f.write(data[offset : offset + size])
    if not rep.plan:  # nothing readable: the segment goes (its records are counted as lost)
        os.unlink(path)
        return
    tmp = path + ".salvage"
    with open(tmp, "wb") as f:
        f.write(b"".join(rep.plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_fixups(directory: str, lost: list[tuple[int, int]], seals: dict[int, dict[str, Any]],
                   keys: dict[str, int], finished: list[int]) -> None:
    """Mark ``lost`` records finished, re-seal batches that named them, and commit the
    ``finished`` batches, in the newest segment (under its CRC key, from ``keys`` by name)."""
    names = _segment_names(directory)
    while names and os.path.getsize(os.path.join(directory, names[-1])) == 0:
        os.unlink(os.path.join(directory, names.pop()))  # created just before a crash: nothing in it
    if not (lost or finished) or not names:
        return
    key = keys.get(names[-1], 0)
    extra = bytearray()
    if lost:
        extra += _frame(T_COMMIT, orjson.dumps({"ranges": [list(r) for r in lost]}), key)
        # New records continue after the lost ones, never reusing their sequence numbers.
        end = max(e for _s, e in lost)
        extra += _frame(T_CHECKPOINT, orjson.dumps({"next_seq": end, "next_batch_id": 0, "positions": {}}), key)
    for batch_id in finished:
        extra += _frame(T_COMMIT, orjson.dumps({"id": batch_id}), key)
    for doc in seals.values():
        ranges = [(int(s), int(e)) for s, e in doc["ranges"]]
        kept = subtract_ranges(ranges, lost)
        if kept != ranges:
            extra += _frame(T_SEAL, orjson.dumps({**doc, "ranges": [list(r) for r in kept]}), key)
            if not kept:  # every record of it lost: nothing is left to deliver
                extra += _frame(T_COMMIT, orjson.dumps({"id": doc["id"]}), key)
    if names:
        with open(os.path.join(directory, names[-1]), "ab") as f:
            f.write(extra)
            f.flush()
            os.fsync(f.fileno())


def salvage(directory: str, aside: str | None = None) -> dict[str, Any]:
    """Rewrite a damaged spool so that it opens: every frame whose CRC verifies and that is in
    sequence is kept, in order; the damaged bytes (and a copy of each damaged segment as it was)
    go to ``aside`` (default ``<directory>/damaged-<time>``); records no valid frame holds are
    marked finished (a checkpoint bridges the gap), and sealed batches that named them are
    re-sealed without them. Returns a report of what was dropped.

    Run it with the daemon stopped. What it cannot know is reported, not guessed: a damaged SEAL
    makes its records be batched again (they may be delivered a second time); a damaged COMMIT
    makes a delivered batch be delivered again under the same key (an overwrite), unless its
    records are gone from the spool (then it is committed). Where a damaged frame's own length
    cannot be trusted, the walk resumes at the next DURABLE mark that verifies under the
    segment's CRC key (see :class:`_Scan`); in a segment written before keys (format version 2
    or older) the rest of it is set aside instead, since record data may contain forged frames."""
    import time as _time

    reports, seals, finished = _analyse(directory)
    damaged = [r for r in reports if not r.clean]
    if not damaged:
        return {"damaged_segments": [], "lost_records": 0, "lost_ranges": [], "finished_batches": [], "aside": None}
    aside = aside or os.path.join(directory, f"damaged-{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}")
    os.makedirs(aside, exist_ok=True)
    lost = [r for rep in reports for r in rep.lost_seqs]
    for rep in damaged:
        _rewrite(directory, rep, aside)
    _append_fixups(directory, lost, seals, {r.name: r.key for r in reports}, finished)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {
        "damaged_segments": [{"segment": r.name, "damaged": r.damaged, "reasons": r.reasons,
                              "header_ok": r.header_ok} for r in damaged],
        "lost_records": sum(e - s for s, e in lost),
        "lost_ranges": lost,
        "finished_batches": finished,
        "aside": aside,
    }
