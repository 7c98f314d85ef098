"""The durable spool: an append-only, segmented log per delivery stream.

Contract (DESIGN.md, "Acknowledged means durable" and "Exactly-once objects"):

* ``append_records`` writes a frame of records (plus, optionally, per-record source metadata and
  source positions such as a file offset or shard checkpoint) and ``wait_durable`` returns once
  that frame is fsynced. Concurrent waiters share one fsync (group commit). A source acknowledges
  only after ``wait_durable``.
* ``append_seal`` records a batch's identity (its record ranges and its destination key) and is
  always fsynced before it returns, whatever the fsync policy, so a batch is never re-decided.
* ``append_commit`` marks a batch finished (delivered, or archived with its error). Segments are
  deleted oldest first once every record and every seal in them is committed.

On open, the log is scanned; sealed but uncommitted batches come back as :class:`SealedBatch` to
be re-sent under the same key; records never sealed are read again by the batcher in order.

Damage is told apart from a torn tail by a durable watermark. After every fsync that completes, a
small DURABLE frame records how far the active segment was on disk at that moment (written
without a further fsync; it reaches the disk with the next one, and at once in the page cache, so
a ``kill -9`` never loses it). A frame that fails its CRC in the newest segment is then:

* below a later DURABLE frame's watermark: acknowledged data is damaged. The stream refuses to
  start with a message naming the segment and offset; ``firehose spool check`` shows the damage
  and ``firehose spool salvage`` keeps every frame whose CRC verifies (see :func:`salvage`);
* past every watermark: an unacknowledged tail (a crash mid-write). It is truncated, with a
  warning (``spool_tail_truncated``) giving the byte count.

A segment written before watermarks existed (format version 1) can only have an incomplete last
frame truncated; any other damage in it refuses to start. Damage in a segment that is not the
newest always refuses to start.

The file format (version 3, whose frame CRCs are keyed so that a frame in record data does not
verify; versions 1 and 2 are still read) is described in firehose/spool_format.py.

Thread-safety: a Spool belongs to one asyncio event loop; only fsyncs (with the closes and unlinks
that wait for them) run on its sync thread (firehose/spool_sync.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import struct
import threading
from array import array
from collections.abc import Sequence
from typing import Any

import orjson
import structlog

from firehose.intervals import IntervalSet, Ranges
from firehose.log import FrameFile, RecordFrame, RecoveryState, SealedBatch, SizedFrame
from firehose.packed import PackedRecords, read_packed
from firehose.spool_format import (  # noqa: F401  (FORMAT_VERSION, ... are re-exported)
    _DURABLE,
    _FRAME_HEADER,
    _RECORDS_HEAD,
    _SEG_HEADER,
    F_META,
    F_POSITIONS,
    FORMAT_VERSION,
    LENGTH_TABLE_ENTRIES,
    ROLL_DONE_ACTIVE_BYTES,
    SEGMENT_MAGIC,
    T_CHECKPOINT,
    T_COMMIT,
    T_DURABLE,
    T_RECORDS,
    T_SEAL,
    FsyncPolicy,
    SpoolError,
    SpoolFullError,
    _frame,
    _FrameRef,
    _incomplete_tail,
    _Segment,
    _segment_name,
    decode_records_payload,
    durable_mark_after,
    encode_records_frame,
    frame_crc,
    header_size,
    new_key,
    read_header,
    read_length_table,
    segment_header,
    stale_checkpoint,
)
from firehose.spool_sync import SyncJob, SyncThread, fsync_job

log = structlog.get_logger()


class Spool:
    """One durable log in one directory: the engine of :class:`firehose.filelog.FileLog`, which
    is what the stages use. See the module docstring."""

    def __init__(
        self,
        directory: str,
        *,
        fsync: FsyncPolicy = "always",
        fsync_interval_ms: int = 200,
        max_size_bytes: int = 1 << 30,
        segment_size_bytes: int = 64 << 20,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.directory = directory
        self.fsync_policy: FsyncPolicy = fsync
        self.fsync_interval = fsync_interval_ms / 1000.0
        self.max_size_bytes = max_size_bytes
        self.segment_size_bytes = segment_size_bytes
        self._cache_limit = cache_bytes
        self._segments: dict[int, _Segment] = {}
        # The frame index, as parallel arrays (about 36 bytes a frame, no object per frame), so
        # memory stays small even for a backlog of millions of single-record PutRecord frames.
        self._frame_starts = array("q")  # first_seq, ascending
        self._frame_ends = array("q")
        self._frame_segs = array("l")
        self._frame_offsets = array("q")
        self._frame_lengths = array("l")
        self._active: _Segment | None = None
        self._key = new_key()  # the CRC key of every segment this open spool writes
        self._fd = -1
        # The directory stays open: fsyncing it must not need a new descriptor, or running out
        # of descriptors (EMFILE under many connections) would look like a failed fsync.
        self._dir_fd = -1
        self._durable_marked = 0  # the active segment's offset the last DURABLE frame recorded
        self._read_fds: dict[int, int] = {}
        self._to_close: list[int] = []
        self._dir_dirty = False
        # Segments whose deletion waits for the commit that freed them to be on disk:
        # (the append counter when they were freed, path).
        self._pending_unlinks: list[tuple[int, str]] = []
        self.next_seq = 0
        self.next_batch_id = 1
        self.min_seq = 0
        self.size_bytes = 0
        self.positions: dict[str, Any] = {}
        self.sealed = IntervalSet()
        self.committed = IntervalSet()
        self._seals: dict[int, SealedBatch] = {}
        self._committed_ids: set[int] = set()
        self._cache: dict[int, RecordFrame] = {}
        self._cache_bytes: dict[int, int] = {}  # first_seq -> its records' size (not summed again)
        self._length_tables: dict[int, array[int]] = {}  # first_seq -> record offsets (read_planned)
        self._length_entries = 0
        self._length_lock = threading.Lock()  # readers run on worker threads
        self._cache_size = 0
        self._written = 0
        self._synced = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._interval_task: asyncio.Task[None] | None = None
        self._sync_taken = self._sync_demand = 0  # append counts: the last cycle's, the next one's
        self._syncer = SyncThread("spool-fsync", self._take_sync, lambda job: fsync_job(job, self._dir_fd),
                                  self._on_synced, self._fence)
        self._closed = False
        self._failed: SpoolError | None = None

    # ------------------------------------------------------------------ open / recovery
    def open(self) -> RecoveryState:
        """Scan the log (blocking I/O; call before serving). Returns the work to resume."""
        os.makedirs(self.directory, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        names = sorted(n for n in os.listdir(self.directory) if n.startswith("seg-") and n.endswith(".log"))
        truncated = 0
        commits: list[int] = []
        for idx, name in enumerate(names):
            number = int(name[4:-4])
            path = os.path.join(self.directory, name)
            seg = _Segment(number, path, 0)
            self._segments[number] = seg
            truncated += self._scan_segment(seg, last=idx == len(names) - 1, commits=commits)
            if seg.size == 0:
                # A segment created just before a crash, with not even its header on disk: it
                # held nothing acknowledged. Remove it so it is not taken for damage later.
                os.unlink(path)
                del self._segments[number]
        for batch_id in commits:
            self._committed_ids.add(batch_id)
            seal = self._seals.get(batch_id)
            if seal is not None:
                self.committed.add_many(seal.ranges)
        if self._frame_starts:
            self.min_seq = self._frame_starts[0]
        else:
            self.min_seq = self.next_seq
        self.size_bytes = sum(s.size for s in self._segments.values())
        pending = [b for bid, b in sorted(self._seals.items()) if bid not in self._committed_ids]
        # Sealed batches already committed need no memory once their segment is gone.
        for bid in list(self._seals):
            if bid in self._committed_ids:
                del self._seals[bid]
        self._open_new_segment()
        # The new segment's CHECKPOINT (the counters and source positions) is on disk before an
        # old segment holding the previous ones is deleted.
        os.fsync(self._fd)
        os.fsync(self._dir_fd)
        self._trim(defer=False)
        # Sealed ranges lie within [min_seq, next_seq) (trimming discards them below min_seq).
        self.sealed.discard_below(self.min_seq)
        unsealed = self.next_seq - self.min_seq - len(self.sealed)
        return RecoveryState(pending, dict(self.positions), unsealed, truncated)

    def _scan_segment(self, seg: _Segment, *, last: bool, commits: list[int]) -> int:
        with open(seg.path, "rb") as f:
            data = f.read()
        header = read_header(data, seg.path, self.directory)
        if header is None:  # not even a whole header
            if last:  # a segment created just before a crash
                os.truncate(seg.path, 0)
                seg.size = 0
                return len(data)
            raise SpoolError(f"{seg.path}: segment header is truncated; the spool is damaged")
        version, key = header
        seg.version = version
        pos = header_size(version)
        end = len(data)
        view = memoryview(data)
        while pos < end:
            if end - pos < _FRAME_HEADER.size:
                break
            length, crc, ftype = _FRAME_HEADER.unpack_from(data, pos)
            body_start = pos + _FRAME_HEADER.size
            if body_start + length > end:
                break
            payload = view[body_start : body_start + length]
            if frame_crc(ftype, payload, key) != crc:
                break
            if ftype == T_RECORDS and length >= _RECORDS_HEAD.size and \
                    _RECORDS_HEAD.unpack_from(payload, 0)[0] != self.next_seq:
                break  # a valid frame out of sequence (duplicated or misplaced): damage, not data
            if ftype == T_CHECKPOINT and pos > header_size(version) and stale_checkpoint(payload):
                break  # an opening checkpoint's copy out of place: its positions would go back
            try:
                self._apply_frame(seg, pos, ftype, bytes(payload), commits)
            except (ValueError, KeyError, TypeError, struct.error) as exc:  # orjson's errors are ValueErrors
                # The CRC matched bytes that are not a frame of ours (chance, or a forged frame).
                raise SpoolError(f"{seg.path}: the frame at offset {pos} verifies but cannot be read "
                                 f"({type(exc).__name__}); see `firehose spool check {self.directory}`") from None
            pos = body_start + length
        if pos < end:
            if not last:
                raise SpoolError(
                    f"{seg.path}: damaged frame at offset {pos} in a segment that is not the newest; "
                    f"refusing to guess which records it held. See `firehose spool check {self.directory}` "
                    "and `firehose spool salvage`."
                )
            mark = durable_mark_after(data, pos, seg.number, key)
            incomplete = _incomplete_tail(data, pos)
            if mark > pos or (version < 2 and not incomplete):
                why = (f"below the durable point {mark} (acknowledged records are damaged)" if mark > pos
                       else "followed by more data in a segment without durable marks")
                raise SpoolError(
                    f"{seg.path}: damaged frame at offset {pos}, {why}; the stream is not started. "
                    f"`firehose spool check {self.directory}` shows the damage; `firehose spool salvage "
                    f"{self.directory}` keeps every frame that verifies and sets the damaged bytes aside."
                )
            # Past every durable mark: written but never acknowledged (acks follow the fsync whose
            # mark would cover it). A crash mid-write leaves this; drop it.
            os.truncate(seg.path, pos)
            log.warning("spool_tail_truncated", directory=self.directory, segment=os.path.basename(seg.path),
                        offset=pos, bytes=end - pos, incomplete_frame=incomplete)
        seg.size = pos
        return end - pos

    def _apply_frame(self, seg: _Segment, offset: int, ftype: int, payload: bytes, commits: list[int]) -> None:
        if ftype == T_RECORDS:
            first_seq, _arrival, count, flags = _RECORDS_HEAD.unpack_from(payload, 0)
            if count:
                self._add_frame_ref(seg, _FrameRef(seg.number, offset, len(payload), first_seq, first_seq + count))
            self.next_seq = max(self.next_seq, first_seq + count)
            if flags & F_POSITIONS:
                _frame, positions = decode_records_payload(payload)
                if positions:
                    self._merge_positions(positions)
        elif ftype == T_SEAL:
            doc = orjson.loads(payload)
            batch = SealedBatch(
                doc["id"], doc["key"], Ranges(doc["ranges"]), doc["oldest"], doc.get("info", {})
            )
            self._seals[batch.batch_id] = batch
            seg.seal_ids.add(batch.batch_id)
            self.sealed.add_many(batch.ranges)
            self.next_batch_id = max(self.next_batch_id, batch.batch_id + 1)
        elif ftype == T_COMMIT:
            doc = orjson.loads(payload)
            if "ranges" in doc:
                self.committed.add_many(doc["ranges"])
            else:
                commits.append(doc["id"])
        elif ftype == T_DURABLE:
            pass  # only read when a frame before it is damaged (durable_mark_after)
        elif ftype == T_CHECKPOINT:
            doc = orjson.loads(payload)
            self.next_seq = max(self.next_seq, doc["next_seq"])
            self.next_batch_id = max(self.next_batch_id, doc["next_batch_id"])
            self._merge_positions(doc.get("positions", {}))
        else:
            raise SpoolError(f"{seg.path}: unknown frame type {ftype} at offset {offset}")

    def _add_frame_ref(self, seg: _Segment, ref: _FrameRef) -> None:
        self._frame_starts.append(ref.first_seq)
        self._frame_ends.append(ref.end_seq)
        self._frame_segs.append(ref.segment)
        self._frame_offsets.append(ref.offset)
        self._frame_lengths.append(ref.length)
        if seg.first_seq is None:
            seg.first_seq = ref.first_seq
        seg.end_seq = ref.end_seq

    # ------------------------------------------------------------------ writing
    def _open_new_segment(self) -> None:
        """Write the next segment's header and CHECKPOINT, then make it the one written. Until it is
        complete the old file stays in use: a failed write (a full disk) changes nothing."""
        number = max(self._segments, default=0) + 1
        path = os.path.join(self.directory, _segment_name(number))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        seg = _Segment(number, path, 0)
        try:
            os.ftruncate(fd, 0)  # the counters and source positions open each segment: trims never lose them
            doc = {"next_seq": self.next_seq, "next_batch_id": self.next_batch_id, "positions": self.positions}
            self._write(seg, fd, segment_header(self._key) + _frame(T_CHECKPOINT, orjson.dumps(doc), self._key),
                        counted=False)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        with self._syncer.lock:  # the sync thread sees the old file closing or still written, never both
            if self._fd >= 0:
                self._to_close.append(self._fd)
            self._segments[number] = seg
            self._active = seg
            self._fd = fd
            self._durable_marked = 0
            self._dir_dirty = True
            self._written += 1  # the CHECKPOINT, written above

    def _write(self, seg: _Segment, fd: int, data: bytes | bytearray, *, counted: bool = True) -> int:
        """Append ``data``; ``counted`` appends are what :meth:`wait_durable` waits to see fsynced."""
        offset = seg.size
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            # A short write (ENOSPC, EIO) must not leave half a frame in the middle of the log,
            # where recovery would take it for damage: cut the file back to the frame's start.
            try:
                os.ftruncate(fd, offset)
            except OSError:
                pass
            raise
        seg.size += len(data)
        self.size_bytes += len(data)
        if counted:
            self._written += 1  # only now: the sync thread takes this count as written
        return offset

    def _append(self, data: bytes | bytearray) -> tuple[_Segment, int]:
        if self._closed:
            raise SpoolError(f"{self.directory}: spool is closed")
        if self._failed is not None:
            raise self._failed
        assert self._active is not None
        if self._active.size + len(data) > self.segment_size_bytes and self._active.size > 4096:
            self._open_new_segment()
        seg = self._active
        return seg, self._write(seg, self._fd, data)

    def abandon(self) -> None:  # a ``kill -9`` in tests: nothing more is fsynced, closed or unlinked
        self._syncer.abandon()

    def has_room(self, nbytes: int) -> bool:
        return self._failed is None and self.size_bytes + nbytes <= self.max_size_bytes

    @property
    def failed(self) -> SpoolError | None:
        """Set once an fsync failed: appends are refused (ingest answers 503) until a restart."""
        return self._failed

    def append_records(
        self,
        records: Sequence[bytes],
        arrival_ms: int,
        *,
        meta: list[Any] | None = None,
        positions: dict[str, Any] | None = None,
        enforce_cap: bool = True,
        nbytes: int | None = None,
    ) -> int:
        """Write one frame of records; returns the first sequence number. Not yet durable:
        await :meth:`wait_durable` before acknowledging. Raises :class:`SpoolFullError` at the cap."""
        if self._failed is not None:
            raise self._failed
        first_seq = self.next_seq
        data = encode_records_frame(first_seq, arrival_ms, records, meta, positions, self._key)
        if enforce_cap and not self.has_room(len(data)):
            raise SpoolFullError(f"spool {self.directory} is at its cap of {self.max_size_bytes} bytes")
        seg, offset = self._append(data)
        self.next_seq = first_seq + len(records)
        if records:  # a frame of positions only (every record dropped) holds nothing to read
            ref = _FrameRef(seg.number, offset, len(data) - _FRAME_HEADER.size, first_seq, self.next_seq)
            self._add_frame_ref(seg, ref)
        if positions:
            self._merge_positions(positions)
        nbytes = sum(map(len, records)) if nbytes is None else nbytes
        if records and self._cache_size + nbytes <= self._cache_limit:
            self._cache[first_seq] = RecordFrame(first_seq, arrival_ms, list(records), meta)
            self._cache_bytes[first_seq] = nbytes
            self._cache_size += nbytes
        return first_seq

    async def append_seal(self, batch: SealedBatch, *, durable: bool = True) -> None:
        """Record a batch identity durably (always fsynced: exactly-once depends on it). With
        ``durable=False`` the caller seals several batches and awaits ``wait_durable(force=True)``
        once, before any of them is delivered."""
        doc = {
            "id": batch.batch_id,
            "key": batch.key,
            "ranges": list(batch.ranges),
            "oldest": batch.oldest_arrival_ms,
            "info": batch.info,
        }
        seg, _ = self._append(_frame(T_SEAL, orjson.dumps(doc), self._key))
        seg.seal_ids.add(batch.batch_id)
        self._seals[batch.batch_id] = batch
        self.sealed.add_many(batch.ranges)
        if durable:
            await self.wait_durable(force=True)

    def allocate_batch_id(self) -> int:
        bid = self.next_batch_id
        self.next_batch_id += 1
        return bid

    def append_commit(self, batch_id: int, info: dict[str, Any] | None = None) -> None:
        """Mark a sealed batch finished. Durability of the commit itself is not awaited: if it is
        lost in a crash, the batch is re-sent under the same key, which overwrites."""
        doc: dict[str, Any] = {"id": batch_id}
        if info:
            doc["info"] = info
        self._append(_frame(T_COMMIT, orjson.dumps(doc), self._key))
        self._committed_ids.add(batch_id)
        batch = self._seals.pop(batch_id, None)
        if batch is not None:
            self.committed.add_many(batch.ranges)
        self._trim()
        if self.fsync_policy != "never":
            self._kick_sync()

    def commit_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Mark records finished without a sealed batch (a processing stage has recorded their
        outcome elsewhere durably). Like :meth:`append_commit`, durability is not awaited."""
        doc = {"ranges": [list(r) for r in ranges]}
        self._append(_frame(T_COMMIT, orjson.dumps(doc), self._key))
        self.committed.add_many(ranges)
        self._trim()
        if self.fsync_policy != "never":
            self._kick_sync()

    # ------------------------------------------------------------------ durability
    async def wait_durable(self, *, force: bool = False) -> None:
        """Return once everything appended before the call is on disk (per the fsync policy;
        ``force`` fsyncs whatever the policy). Concurrent callers share one fsync."""
        if self._failed is not None:
            raise self._failed
        if not force and self.fsync_policy != "always":
            if self.fsync_policy == "interval":
                self._ensure_interval_task()
            return
        target = self._written
        if self._synced >= target and not self._dir_dirty:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._kick_sync()
        await fut

    def _kick_sync(self) -> None:
        """Have everything written so far fsynced (``fsync: interval`` and ``never`` fsync only
        when asked: the thread covers appends up to the latest demand, not every append)."""
        self._sync_demand = self._written
        self._syncer.kick()

    def _take_sync(self) -> SyncJob | None:
        """What the next fsync covers; None when nothing. In the sync thread, under its lock."""
        target = self._sync_demand
        ready = [(m, p) for m, p in self._pending_unlinks if m <= target]
        if target <= self._sync_taken and not self._dir_dirty and not self._to_close and not ready:
            return None
        self._sync_taken = max(self._sync_taken, target)
        active = self._active
        closing, self._to_close = self._to_close, []
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        if ready:
            self._pending_unlinks = [(m, p) for m, p in self._pending_unlinks if m > target]
        return SyncJob(target, [self._fd] if self._fd >= 0 else [], closing, dir_dirty, [p for _, p in ready],
                        active, active.size if active is not None else 0)

    def _on_synced(self, job: SyncJob) -> None:
        """On the loop: the writes ``job`` covers are on disk."""
        self._synced = max(self._synced, job.target)
        active = self._active
        if active is not None and job.active is active and job.fds:
            self._mark_durable(active, job.active_size)
        self._release_waiters()

    def _fence(self, exc: OSError) -> None:
        """After a failed fsync the kernel may have dropped the dirty pages: nothing written since
        the last good fsync can be trusted, and a retried fsync can falsely succeed. The spool
        fences itself; a restart recovers from what is really on disk."""
        self._failed = SpoolError(f"{self.directory}: fsync failed ({exc}); the spool is fenced "
                                  "until the daemon restarts")
        for _t, fut in self._waiters:
            if not fut.done():
                fut.set_exception(self._failed)
        self._waiters.clear()

    def _release_waiters(self) -> None:
        """Wake every ``wait_durable`` whose appends are now covered by an fsync."""
        still: list[tuple[int, asyncio.Future[None]]] = []
        for t, fut in self._waiters:
            if t > self._synced:
                still.append((t, fut))
            elif not fut.done():
                fut.set_result(None)
        self._waiters = still

    def _mark_durable(self, seg: _Segment, offset: int) -> None:
        """Record that ``seg`` is on disk up to ``offset`` (a DURABLE frame, not fsynced itself and
        not counted as unsynced data, so it never causes an fsync of its own)."""
        if offset <= self._durable_marked or self._fd < 0 or self._closed:
            return
        data = _frame(T_DURABLE, _DURABLE.pack(seg.number, offset), self._key)
        try:
            self._write(seg, self._fd, data, counted=False)
        except OSError:
            return  # a full disk: the mark is an aid to recovery, never a reason to fail a write
        self._durable_marked = offset

    def _ensure_interval_task(self) -> None:
        if self._interval_task is None or self._interval_task.done():
            self._interval_task = asyncio.get_running_loop().create_task(self._interval_loop())

    async def _interval_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.fsync_interval)
            if self._written > self._synced or self._dir_dirty:
                self._kick_sync()

    # ------------------------------------------------------------------ reading
    def _frame_index(self, seq: int) -> int:
        """Where the frame holding ``seq`` is in the frame index; -1 when none holds it."""
        i = bisect.bisect_right(self._frame_starts, seq) - 1
        return i if i >= 0 and self._frame_starts[i] <= seq < self._frame_ends[i] else -1

    def frame_at(self, seq: int) -> RecordFrame | None:
        """The RECORDS frame containing ``seq`` (from memory when recent, else from disk)."""
        i = self._frame_index(seq)
        if i < 0:
            return None
        cached = self._cache.get(self._frame_starts[i])
        if cached is not None:
            return cached
        frame, _ = decode_records_payload(os.pread(self._read_fd(self._frame_segs[i]), self._frame_lengths[i],
                                                   self._frame_offsets[i] + _FRAME_HEADER.size))
        return frame

    def frame_file(self, seq: int) -> FrameFile | None:
        """Where the RECORDS frame holding ``seq`` is (:meth:`firehose.log.Log.frame_file`)."""
        i = self._frame_index(seq)
        if i < 0:
            return None
        return FrameFile(self._segments[self._frame_segs[i]].path, self._frame_offsets[i] + _FRAME_HEADER.size,
                         self._frame_lengths[i], self._frame_starts[i], self._frame_ends[i])

    def release_below(self, seq: int) -> None:
        """The reader has consumed every record below ``seq``: drop the frames it passed from the
        cache (they were cached in order, so the oldest come first)."""
        while self._cache:
            first = next(iter(self._cache))
            if self._cache[first].end_seq > seq:
                break
            self.release_cache(first)

    def has_seal(self, batch_id: int) -> bool:
        """Whether ``batch_id`` was sealed in this log (and is still known to it)."""
        return batch_id in self._seals or batch_id in self._committed_ids

    def release_cache(self, first_seq: int) -> None:
        """The batcher has consumed this frame; drop the in-memory copy."""
        if self._cache.pop(first_seq, None) is not None:
            self._cache_size -= self._cache_bytes.pop(first_seq)

    def _merge_positions(self, positions: dict[str, Any]) -> None:
        """Later positions replace earlier ones; a key set to None is removed (a source
        forgetting a finished file or an expired shard), so positions do not grow forever."""
        for key, value in positions.items():
            if value is None:
                self.positions.pop(key, None)
            else:
                self.positions[key] = value

    def _read_fd(self, segment: int) -> int:
        fd = self._read_fds.get(segment)
        if fd is None:
            fd = os.open(self._segments[segment].path, os.O_RDONLY)
            self._read_fds[segment] = fd
        return fd

    def _length_table(self, fd: int, offset: int, first: int, count: int) -> array[int]:
        """The file offsets of the records of the frame at ``offset`` (record k spans
        ``[t[k], t[k+1])``). Kept for recent frames, up to LENGTH_TABLE_ENTRIES entries in all:
        the batches of many partitions read the same frames in turn."""
        hit = self._length_tables.get(first)
        if hit is not None:
            return hit
        return self._read_length_table(fd, offset, first, count)[2]

    def _read_length_table(self, fd: int, offset: int, first: int, count: int) -> tuple[int, int, array[int]]:
        """:func:`read_length_table`, its offsets kept (see :meth:`_length_table`)."""
        arrival_ms, flags, entry = read_length_table(fd, offset, first, count, self.directory)
        with self._length_lock:
            self._length_tables[first] = entry
            self._length_entries += len(entry)
            while self._length_entries > LENGTH_TABLE_ENTRIES and len(self._length_tables) > 1:
                old = self._length_tables.pop(next(iter(self._length_tables)))
                self._length_entries -= len(old)
        return arrival_ms, flags, entry

    def sizes_at(self, seq: int) -> SizedFrame | None:
        """The frame holding ``seq`` by its record sizes (:meth:`firehose.log.Log.sizes_at`): one
        read of its head and length table, kept for :meth:`read_planned`. None when the frame is
        cached, has per-record metadata, or is outside the log."""
        i = self._frame_index(seq)
        if i < 0 or self._frame_starts[i] in self._cache:
            return None
        first, end = self._frame_starts[i], self._frame_ends[i]
        fd = self._read_fd(self._frame_segs[i])
        arrival_ms, flags, offsets = self._read_length_table(fd, self._frame_offsets[i], first, end - first)
        if flags & F_META:
            return None
        return SizedFrame(first, arrival_ms, end - first, offsets)

    def plan_records(self, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        """Where the records of ``ranges`` are, resolved against the frame index now. Call it on
        the event loop, which alone changes the index (trimming shifts it); ``read_planned`` then
        reads on a worker thread. Records still in the frame cache are taken from it here."""
        plan: list[Any] = []
        starts, ends = self._frame_starts, self._frame_ends
        for start, end in ranges:
            seq = start
            while seq < end:
                i = self._frame_index(seq)
                if i < 0:
                    raise SpoolError(f"{self.directory}: record {seq} is missing from the spool")
                first, stop = starts[i], min(end, ends[i])
                cached = self._cache.get(first)
                if cached is not None:
                    plan.append(cached.records[seq - first : stop - first])
                else:
                    fd = self._read_fd(self._frame_segs[i])
                    plan.append((fd, self._frame_offsets[i], first, ends[i] - first, seq - first, stop - first))
                seq = stop
        return plan

    def read_planned(self, plan: list[Any]) -> PackedRecords:
        """Record bytes of a ``plan_records`` plan, packed into one buffer (blocking reads; for a
        worker thread): from each frame only the records asked for, by its length table. A
        partition's records are scattered a few to a frame; decoding whole frames would cost a
        frame per record. The segments are not deleted meanwhile: their records are not committed."""
        return read_packed(plan, self._length_table, self.directory)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
        """Record bytes (and per-record metadata, if any) for sealed ranges, in order."""
        out: list[bytes] = []
        metas: list[Any] = []
        has_meta = False
        for start, end in ranges:
            seq = start
            while seq < end:
                frame = self.frame_at(seq)
                if frame is None:
                    raise SpoolError(f"{self.directory}: record {seq} is missing from the spool")
                lo = seq - frame.first_seq
                hi = min(end, frame.end_seq) - frame.first_seq
                out.extend(frame.records[lo:hi])
                if frame.meta is not None:
                    has_meta = True
                    metas.extend(frame.meta[lo:hi])
                else:
                    metas.extend([None] * (hi - lo))
                seq = frame.first_seq + hi
        return out, (metas if has_meta else None)

    # ------------------------------------------------------------------ trimming
    def _segment_done(self, seg: _Segment) -> bool:
        if seg.first_seq is not None and not self.committed.covers(seg.first_seq, seg.end_seq or 0):
            return False
        return all(bid in self._committed_ids for bid in seg.seal_ids)

    def _trim(self, defer: bool = True) -> None:
        """Delete the oldest segments whose records and seals are all committed. With ``defer``
        the files are unlinked only once the commits that freed them are fsynced: an unlink that
        reached the disk before its commit would leave a pending batch without its records."""
        active = self._active
        roll_at = min(ROLL_DONE_ACTIVE_BYTES, max(4096, self.max_size_bytes // 8))
        # A fully delivered active segment is rolled over, so space is freed without waiting for
        # the segment to fill (the cap counts bytes on disk).
        if (
            active is not None
            and not self._closed
            and active.size > roll_at
            and len(self._segments) == 1
            and self._segment_done(active)
        ):
            with contextlib.suppress(OSError):  # a full disk: the segment is rolled over later
                self._open_new_segment()
        for number in sorted(self._segments):
            seg = self._segments[number]
            if seg is self._active or not self._segment_done(seg):
                break
            self._delete_segment(seg, defer)

    def _delete_segment(self, seg: _Segment, defer: bool = True) -> None:
        fd = self._read_fds.pop(seg.number, None)
        if fd is not None:
            os.close(fd)
        if not defer:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
        self.size_bytes -= seg.size
        del self._segments[seg.number]
        self._committed_ids.difference_update(seg.seal_ids)
        drop = 0
        while drop < len(self._frame_segs) and self._frame_segs[drop] == seg.number:
            drop += 1
        for first in self._frame_starts[:drop]:
            self.release_cache(first)
        for arr in (self._frame_starts, self._frame_ends, self._frame_segs, self._frame_offsets, self._frame_lengths):
            del arr[:drop]
        if seg.end_seq is not None:
            self.min_seq = max(self.min_seq, seg.end_seq)
            self.committed.discard_below(self.min_seq)
            self.sealed.discard_below(self.min_seq)
        with self._syncer.lock:  # once the bookkeeping is done: the unlink waits for its commit's fsync
            if defer:
                self._pending_unlinks.append((self._written, seg.path))
            self._dir_dirty = True
        if defer:
            self._kick_sync()

    # ------------------------------------------------------------------ close
    async def aclose(self) -> None:
        """Fsync what was written and release file descriptors (raises, released, when fenced)."""
        if self._closed:
            return
        try:
            if self._fd >= 0:
                await self.wait_durable(force=True)
        finally:
            await self._release()

    async def _release(self) -> None:
        self._closed = True
        if self._interval_task is not None:
            self._interval_task.cancel()
        await self._syncer.close()  # after the cycles still needed: the last unlinks
        for fd in self._to_close:
            os.close(fd)
        self._to_close = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
