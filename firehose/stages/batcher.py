"""The batcher: records from the log into open buffers, sealed into batches.

Owns: the read cursor in the log it batches from (the ingest spool, or the processed spool of
recorded outcomes), the main buffer, an archive buffer per error-output type (failed records as
Firehose error records) and the source-backup buffer (``backup: {mode: all}``); which buffer a
record goes to; sealing a buffer when the next record would not fit (``size_mib``) or its oldest
record is ``interval_secs`` old, and on stop. A seal decides the batch's identity (its key, from
the destination, and its ranges) and writes it to the log before any upload; many seals can
share one durable write (:meth:`Batcher.seal_many`), and a batch whose seal is not yet durable is
never dispatched. It reads ahead only while the delivery runner has room (``max_in_flight + 1``
batches), so a backlog stays on disk.

With dynamic partitioning a record goes to its partition's buffer, which the
:class:`PartitionRouter` keeps (admission, the guard, the memory budget); the batcher fills and
seals them like its own.

Calls: the :class:`Log` (``read_frame``, ``reader_passed``, ``sealed``, ``allocate_batch_id``,
``seal``), the router, the destinations' ``batch_key`` / ``archive_key``, and the
:class:`DeliveryRunner` (``add``, ``has_room``, ``not_durable``, ``mark_durable``, ``dispatch``).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from firehose.config import StreamConfig
from firehose.interfaces import Destination, archive_of, partitioned_keys
from firehose.log import FrameFile, Log, LogError, RecordFrame, SealedBatch, SizedFrame
from firehose.records import PROCESSING_FAILED, ErrorInfo, RecordMeta
from firehose.stages.archiver import error_record_line
from firehose.stages.common import OpenBuffer, PendingBatch, StageContext, retry_after
from firehose.stages.delivery import DeliveryRunner
from firehose.stages.inline import FrameMetas, InlineExtraction
from firehose.stages.router import Partition, PartitionRouter

#: Frames read ahead of the one being routed, their partition keys extracted meanwhile.
INLINE_AHEAD = 4
SOURCE_BACKUP = "\x00source"  # the buffer of untransformed source records (backup mode: all)

#: Which buffer: "" the main buffer, an error-output type an archive buffer, a tuple a partition.
BufferKey = str | Partition


def routes(metas: list[Any]) -> bool:
    """Whether a frame's records need the per-record path: some go elsewhere than the main
    buffer (failed, or source copies). Metadata that only describes records (a Kinesis source's
    kinesisRecordMetadata) does not."""
    return any(map(RecordMeta.routed, metas))


class Batcher:
    """Builds one stream's batches. All methods run on the stream's event loop."""

    def __init__(
        self, ctx: StageContext, config: StreamConfig, out: Log, destination: Destination, archive: Destination,
        router: PartitionRouter, runner: DeliveryRunner, *, converter: Any = None, inline: InlineExtraction | None = None,
    ) -> None:
        self.ctx = ctx
        self.name, self.clock, self.metrics, self.log = ctx.name, ctx.clock, ctx.metrics, ctx.log
        self.signals, self.rng = ctx.signals, ctx.rng
        self.size_limit = config.size_bytes
        self.interval_ms = config.interval_secs * 1000
        self.out = out
        self.destination = destination
        self.archive = archive
        self.router = router
        self.runner = runner
        self.converter = converter
        self.cursor = 0  # the next record of the log to buffer
        self.task: asyncio.Task[None] | None = None
        self._buffer = OpenBuffer()
        self._archive_buffers: dict[str, OpenBuffer] = {}
        # Partition keys extracted as the ingest log is read (firehose/stages/inline.py).
        self.inline = inline
        self._inline_frame: tuple[int, FrameMetas] | None = None  # (first_seq, metadata)
        # The next frames, their extractions under way: first_seq -> (the worker's answer to
        # come, None if extracted here when routed; the frame read already, or where it is stored
        # when the worker reads it from there), in order.
        self._inline_next: dict[int, tuple[asyncio.Future[Any] | None, RecordFrame | FrameFile]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, cursor: int) -> None:
        """Batch from ``cursor`` on (records already sealed are skipped), in a task."""
        self.cursor = cursor
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def cancel(self) -> None:
        """Stop the batching task (open buffers stay: :meth:`seal_all` seals them)."""
        if self.task is not None:
            self.signals.batcher.set()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self._inline_next.clear()

    async def seal_all(self, deadline: float) -> None:
        """At stop: seal every open buffer, within ``deadline`` (``time.monotonic()``), and make
        the seals durable so they can be delivered. What cannot be sealed stays in the log."""
        try:
            # Records acknowledged since the batcher last read the log join the buffers first.
            await asyncio.wait_for(self.pump(final=True), max(0.1, deadline - time.monotonic()))
            for key in ["", *self._archive_buffers]:
                await asyncio.wait_for(self.seal(key), max(0.1, deadline - time.monotonic()))
            partitions = self.router.open()
            if partitions:
                await asyncio.wait_for(self.seal_many(partitions, "stop"), max(0.1, deadline - time.monotonic()))
        except (TimeoutError, OSError, LogError) as exc:
            self.log.warning("stream_seal_on_stop_failed", error=str(exc))
        # Seals written by a call that did not finish (cancelled by the deadline) become
        # deliverable once the log has them durably: passed again, they are not recorded twice.
        again = self.runner.not_durable()
        if again:
            try:
                await self.out.seal([p.sealed for p in again])
                self.runner.mark_durable(again)
            except (OSError, LogError) as exc:
                self.log.warning("stream_seal_on_stop_failed", error=str(exc))

    # ------------------------------------------------------------------ what it holds
    @property
    def buffered_records(self) -> int:
        """Records read into open buffers and not sealed yet: the main buffer, every partition's
        buffer and the archive buffers."""
        return (self._buffer.count + self.router.buffered_records
                + sum(b.count for b in self._archive_buffers.values()))

    @property
    def caught_up(self) -> bool:
        """Every record of the log has been read into a buffer (or was sealed already)."""
        return self.cursor >= self.out.next_seq

    def oldest_ms(self) -> int | None:
        """Arrival of the oldest record in an open buffer (None: all are empty)."""
        times = [b.oldest_ms for b in (self._buffer, *self._archive_buffers.values()) if b.count]
        partitions = self.router.oldest_ms()
        if partitions is not None:
            times.append(partitions)
        return min(times) if times else None

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        failures = 0
        while not self.signals.stopping:
            await self._wait()
            try:
                await self.pump()
                # While a backlog is still on disk the buffer fills by size; sealing it on time
                # would only cut the backlog into small objects.
                if self.caught_up:
                    await self.seal_due()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the stream alive; the records stay in the spool
                failures += 1
                await retry_after(self.log, "batcher_failed", exc, failures, self.signals.batcher)

    async def _wait(self) -> None:
        """Until woken, or until the oldest buffered record is due (when caught up)."""
        timeout: float | None = None
        oldest = self.oldest_ms()
        if oldest is not None and self.caught_up:
            timeout = max(0.0, (oldest + self.interval_ms - self.clock.now_ms()) / 1000.0)
        if timeout is None or timeout > 0:
            try:
                await asyncio.wait_for(self.signals.batcher.wait(), timeout)
            except TimeoutError:
                pass
        self.signals.batcher.clear()

    async def seal_due(self) -> None:
        """Seal every buffer whose oldest record is ``interval_secs`` old."""
        now = self.clock.now_ms()
        for key, buf in [("", self._buffer), *self._archive_buffers.items()]:
            if buf.count and now >= buf.oldest_ms + self.interval_ms:
                await self.seal(key)
        due = self.router.due(now, self.interval_ms)
        if due:
            await self.seal_many(due, "interval")

    async def pump(self, *, final: bool = False) -> None:
        """Move records from the log into open buffers, sealing whenever the next record would
        not fit. Stops, mid-frame if need be, when the delivery runner has no room (or the
        stream is stopping, unless this is the ``final`` pump of the stop itself)."""
        spool = self.out
        while self.cursor < spool.next_seq and self.runner.has_room() and (final or not self.signals.stopping):
            if self.cursor < spool.min_seq:
                self.cursor = spool.min_seq
                continue
            ahead = self._inline_next.get(self.cursor)  # read already, for its extraction
            if ahead is None and self.inline is None and not self.router.partitioning:
                # A frame no longer in memory goes to the main buffer by its sizes alone: the batch's
                # records are read back at delivery, on a thread, not read and split here.
                sized = spool.sizes_at(self.cursor)
                if sized is not None:
                    if not await self._pump_frame(sized):
                        return
                    continue
            known = ahead[1] if ahead is not None else None  # read ahead, or only located
            frame = known if isinstance(known, RecordFrame) else await spool.read_frame(self.cursor)
            if frame is None:  # pragma: no cover - the index always covers [min_seq, next_seq)
                self.log.error("spool_gap", seq=self.cursor)
                self.cursor += 1
                continue
            if not frame.first_seq <= self.cursor < frame.end_seq:  # never spin on a wrong frame
                raise LogError(f"the log answered record {self.cursor} with records "
                               f"[{frame.first_seq}, {frame.end_seq})")
            if self.inline is not None or self.router.partitioning or (frame.meta is not None and routes(frame.meta)):
                done = await self._pump_routed(frame)
            else:
                done = await self._pump_frame(frame)
            if not done:
                return

    async def _pump_frame(self, frame: RecordFrame | SizedFrame) -> bool:
        """Records without routing into the main buffer, by runs (a bisect over cumulative sizes),
        not one by one. Returns False when it stopped for lack of room (the cursor marks where)."""
        size_limit = self.size_limit
        sealed = self.out.sealed
        first = frame.first_seq
        n = frame.end_seq - first
        cum = frame.cum
        i = self.cursor - first
        while i < n:
            seq = first + i
            gap = sealed.next_gap(seq)
            if gap != seq:  # already sealed before a restart: skip it
                i = min(n, gap - first)
                continue
            nxt = sealed.next_start_after(seq)
            end = n if nxt is None else min(n, nxt - first)
            space = size_limit - self._buffer.nbytes
            j = bisect.bisect_right(cum, cum[i] + space, i, end + 1) - 1
            if j == i and not self._buffer.count:
                j = i + 1  # a record larger than the buffer goes out on its own
            if j > i:
                self._buffer.extend(frame, i, j, cum[j] - cum[i])
                i = j
            if i < end or self._buffer.nbytes >= size_limit:
                await self.seal()
                if not self.runner.has_room() and i < n:
                    self.cursor = first + i
                    return False
        self.cursor = frame.end_seq
        self.out.reader_passed(self.cursor)
        return True

    async def _pump_routed(self, frame: RecordFrame) -> bool:
        """Records with per-record metadata (transform outcomes), or any record when the stream
        partitions, one by one to the buffer :meth:`_route` picks. A record that needs no seal is
        buffered without an await. Returns False when it stopped for lack of room (the cursor
        marks where)."""
        sealed = self.out.sealed
        if sealed.covers(self.cursor, frame.end_seq):  # every one sealed before a restart: nothing to route
            self.cursor = frame.end_seq
            self.out.reader_passed(self.cursor)
            return True
        metas, codes, extracted = await self._frame_metas(frame)
        # The partition each code was admitted to, until the next await (a seal closes buffers,
        # and a delivery can free the guard's room): records of an open partition need no check.
        admitted: dict[int, Partition] = {}
        records = frame.records
        first = frame.first_seq
        arrival_ms = frame.arrival_ms
        size_limit = self.size_limit
        start = self.cursor - first
        # Records sealed before a restart are skipped; a frame with none is not searched record by record.
        nxt = sealed.next_start_after(self.cursor - 1)
        check_sealed = self.cursor in sealed or (nxt is not None and nxt < frame.end_seq)
        if not start and not check_sealed and self._route_whole(frame, extracted):
            self.cursor = frame.end_seq
            self.out.reader_passed(self.cursor)
            return True
        for i in range(start, len(records)):
            seq = first + i
            if check_sealed and seq in sealed:
                continue
            record = records[i]
            code = codes[i] if codes is not None else i
            key: BufferKey | None = admitted.get(code)
            if key is None:
                key, record = self._route(metas[code] if metas is not None else None, record, arrival_ms)
                if codes is not None and isinstance(key, tuple):
                    admitted[code] = key
            # The cursor is at this record during every await: a seal that fails is retried from
            # it, and records already buffered are not buffered again.
            buf = self._peek(key)
            if buf is not None and buf.count and buf.nbytes + len(record) > size_limit:
                self.cursor = seq
                await self.seal(key, reason="size")
                admitted.clear()
            if self._add(key, seq, record, arrival_ms):
                self.cursor = seq
                await self._after_add(key)
                admitted.clear()
            self.cursor = seq + 1
            if not self.runner.has_room():
                self.out.reader_passed(self.cursor)
                return False
        self.cursor = frame.end_seq
        self.out.reader_passed(self.cursor)
        return True

    async def _frame_metas(
        self, frame: RecordFrame,
    ) -> tuple[list[Any] | None, Sequence[int] | None, FrameMetas | None]:
        """The frame's metadata, and with inline extraction a code per record: record ``i``'s
        metadata is ``metas[codes[i]]`` (None: ``metas[i]``), with the extraction itself."""
        if self.inline is None:
            return frame.meta, None, None
        extracted = await self._inline_metas(frame)
        return extracted.distinct, extracted.codes, extracted

    def _route_whole(self, frame: RecordFrame, extracted: FrameMetas | None) -> bool:
        """Buffer a whole frame of inline-extracted records a partition at a time, when none of
        them needs the per-record path: each goes to a partition whose buffer is open and keeps
        room after all of the frame's records for it, within the memory budget. The buffers end
        as the per-record path would leave them (each partition's records in order); no seal is
        due and nothing awaits. False (nothing buffered) otherwise."""
        router = self.router
        if extracted is None or not router.partitioning:
            return False
        # Several codes may lead to one partition (records extracted one by one, a query key the
        # Prefix does not use): their records are merged back into record order.
        groups: dict[Partition, tuple[list[int], int]] = {}
        merged: set[Partition] = set()
        for meta, picked, nbytes in zip(extracted.distinct, extracted.picked, extracted.sizes, strict=True):
            ident = None if RecordMeta.routed(meta) else router.partition_of(meta)
            if ident is None or router.buffer(ident) is None:
                return False  # failed, a source copy, a missing key, or not open: record by record
            have = groups.get(ident)
            if have is None:
                groups[ident] = (picked, nbytes)
            else:
                groups[ident] = (have[0] + picked, have[1] + nbytes)
                merged.add(ident)
        for ident in merged:
            groups[ident][0].sort()
        total = 0
        for ident, (_picked, nbytes) in groups.items():
            buf = router.buffer(ident)
            assert buf is not None
            if buf.nbytes + nbytes >= self.size_limit:  # it would fill: sealed mid-frame
                return False
            total += nbytes
        if not router.fits(total, len(frame.records)):
            return False
        for ident, (picked, nbytes) in groups.items():
            router.add_picked(ident, frame, picked, nbytes)
        return True

    async def _inline_metas(self, frame: RecordFrame) -> FrameMetas:
        """The frame's metadata from the stream's inline extraction (firehose/stages/inline.py),
        kept while the frame is read (a frame read in two goes is extracted once). The next
        :data:`INLINE_AHEAD` frames' extractions are under way meanwhile, so a worker process
        extracts while this one is routed, and a batcher that is behind finds their keys ready."""
        assert self.inline is not None
        if self._inline_frame is not None and self._inline_frame[0] == frame.first_seq:
            return self._inline_frame[1]
        ahead = self._inline_next
        entry = None
        while ahead:
            first = next(iter(ahead))
            if first == frame.first_seq:
                entry = ahead.pop(first)
                break
            if first > frame.first_seq:  # read out of order: start again from here
                ahead.clear()
                break
            ahead.pop(first)  # passed (skipped, or read again)
        sent = entry[0] if entry is not None else self.inline.start(self.out.frame_file(frame.first_seq) or frame)
        nxt = frame.end_seq
        for later in ahead.values():
            nxt = later[1].end_seq
        depth = INLINE_AHEAD if self.inline.processes else 0  # no worker: nothing to read ahead for
        while len(ahead) < depth and nxt < self.out.next_seq:
            # Where the frame is stored is enough when the worker reads it; else it is read here.
            after = self.out.frame_file(nxt) or await self.out.read_frame(nxt)
            if after is None or after.first_seq != nxt:
                break
            ahead[nxt] = (self.inline.start(after), after)
            nxt = after.end_seq
        metas = await self.inline.finish(sent, frame.records, frame.meta, frame.arrival_ms)
        self._inline_frame = (frame.first_seq, metas)
        return metas

    def _route(self, meta: Any, record: bytes, arrival_ms: int) -> tuple[BufferKey, bytes]:
        """Which buffer a record goes to, and what it is there: failed ones to an archive buffer
        per error-output type as Firehose error records, source copies to the backup buffer, the
        rest to the main buffer or, with dynamic partitioning, to their partition's."""
        err = RecordMeta.error(meta)
        key: BufferKey = ""
        if err is None and RecordMeta.is_source_copy(meta):
            key = SOURCE_BACKUP
        elif err is None and self.router.partitioning:
            ident = self.router.partition_of(meta)
            err = self.router.admit(ident, arrival_ms)
            if err is None and ident is not None:
                key = ident
        if err is not None:
            info = ErrorInfo.decode(err)
            return info.output_type or PROCESSING_FAILED, error_record_line(record, info)
        return key, record

    def _add(self, key: BufferKey, seq: int, record: bytes, arrival_ms: int) -> bool:
        """Add one record to buffer ``key`` (the caller sealed it first if the record would not
        fit). True when a seal is due after it: the buffer is full (or one record over the
        limit: out now, as whole frames do), or partitions are over their memory budget."""
        if isinstance(key, tuple):
            buf = self.router.add(key, seq, record, arrival_ms)
            return buf.nbytes >= self.size_limit or self.router.over_budget()
        buf = self._buffer_for(key)
        buf.add(seq, record, arrival_ms)
        return buf.nbytes >= self.size_limit

    async def _after_add(self, key: BufferKey) -> None:
        buf = self._peek(key)
        if buf is not None and buf.nbytes >= self.size_limit:
            await self.seal(key, reason="size")
        elif isinstance(key, tuple) and self.router.over_budget():
            flush = self.router.relieve()
            if flush:
                await self.seal_many(flush, "memory")

    # ------------------------------------------------------------------ buffers
    def _peek(self, key: BufferKey) -> OpenBuffer | None:
        if isinstance(key, tuple):
            return self.router.buffer(key)
        return self._archive_buffers.get(key) if key else self._buffer

    def _buffer_for(self, key: str) -> OpenBuffer:
        return self._archive_buffers.setdefault(key, OpenBuffer()) if key else self._buffer

    def _forget(self, key: BufferKey) -> None:
        if isinstance(key, tuple):
            self.router.close(key)
        elif key:
            self._archive_buffers[key] = OpenBuffer()
        else:
            self._buffer = OpenBuffer()

    # ------------------------------------------------------------------ sealing
    async def seal_many(self, keys: list[Partition], reason: str) -> None:
        """Seal several partition buffers in one durable write; none is delivered before it."""
        await self._seal_buffers(list(keys), reason)

    async def seal(self, buffer_key: BufferKey = "", reason: str | None = None) -> None:
        """Seal buffer ``buffer_key`` (nothing if it is empty): its identity is written durably to
        the log and the batch goes to the delivery runner."""
        await self._seal_buffers([buffer_key], reason)

    async def _seal_buffers(self, keys: list[BufferKey], reason: str | None) -> None:
        new: list[tuple[BufferKey, PendingBatch]] = []
        for buffer_key in keys:
            buf = self._peek(buffer_key)
            if buf is None or not buf.count:
                continue
            key, info, partition, records = self._identity(buffer_key, buf, reason)
            sealed = SealedBatch(self.out.allocate_batch_id(), key, buf.ranges, buf.oldest_ms, info)
            new.append((buffer_key, PendingBatch(sealed, records, partition=partition, durable=False)))
            if partition is not None:
                self.router.count_batch(partition)
        if not new:
            return
        # Seals an earlier call wrote without finishing (cancelled at stop, or failed midway) are
        # passed again: the log records none twice, and they become durable with these.
        again = self.runner.not_durable()
        batches = [*again, *(pending for _key, pending in new)]
        # A buffer is forgotten once its seal is written; a failed write leaves it to be sealed
        # again. (A seal written but not yet durable is never re-sealed: it is pending.)
        try:
            await self.out.seal([p.sealed for p in batches])
            self.runner.mark_durable(batches)
        finally:
            for buffer_key, pending in new:
                first = pending.sealed.ranges[0]
                if pending.durable or self.out.sealed.covers(first[0], first[1]):
                    self._forget(buffer_key)
                    self.runner.add(pending)
                elif pending.partition is not None:
                    self.router.release(pending.partition)
        for _key, pending in new:
            self.log.debug("batch_sealed", batch_id=pending.sealed.batch_id, key=pending.sealed.key,
                           records=pending.sealed.info.get("records"), reason=reason)
        self.runner.dispatch()

    def _identity(
        self, buffer_key: BufferKey, buf: OpenBuffer, reason: str | None,
    ) -> tuple[str, dict[str, Any], Partition | None, list[bytes] | None]:
        """A new batch's key, seal info, partition and held records (None: read back at delivery)."""
        oldest = datetime.fromtimestamp(buf.oldest_ms / 1000.0, tz=UTC)
        info: dict[str, Any] = {"records": buf.count, "bytes": buf.nbytes}
        partition: Partition | None = None
        records: list[bytes] | None = None if buf.spilled else buf.records
        if buffer_key == SOURCE_BACKUP:
            key = self.archive.batch_key(oldest, self.rng)
            info.update({"sink": "source"})
        elif isinstance(buffer_key, tuple):
            from firehose.keys import PrefixError

            try:
                key = partitioned_keys(self.destination).batch_key(oldest, self.rng, self.router.keys(buffer_key))
                partition = buffer_key
                info["p"] = list(buffer_key)
            except PrefixError:  # cannot happen for an admitted partition; archive, never drop
                key = archive_of(self.archive).archive_key(oldest, self.rng, "partitioning-failed")
                info.update({"sink": "archive", "type": "partitioning-failed", "p": list(buffer_key)})
                records = None  # error records are rebuilt from the spool at delivery
            self.metrics.partition_flushes.labels(self.name, reason or "size").inc()
        elif buffer_key:
            key = archive_of(self.archive).archive_key(oldest, self.rng, buffer_key)
            info.update({"sink": "archive", "type": buffer_key})
        else:
            key = self.destination.batch_key(oldest, self.rng)
        if info.get("sink", "main") == "main" and self.converter is not None:
            info["fmt"] = self.converter.fingerprint  # the schema its records were checked against
        return key, info, partition, records
