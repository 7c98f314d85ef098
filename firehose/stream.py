"""One delivery stream at run time: spool -> batcher -> delivery runner -> destination.

The batcher reads records from the spool in sequence order, fills the open buffer and seals a
batch when the buffer reaches ``size_mib`` or its oldest record is ``interval_secs`` old,
whichever comes first. Sealing records the batch's identity in the spool (fsynced) before any
upload. The delivery runner sends up to ``max_in_flight`` batches at once and retries failures
with exponential backoff and full jitter, without limit: records are never dropped here. Only
after a batch is delivered is it committed, and only then is its spool space freed.

Memory is bounded by the open buffer plus ``max_in_flight + 1`` sealed batches: when delivery
falls behind, the batcher stops reading and the backlog stays on disk.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from firehose.clock import Clock, SystemClock
from firehose.config import StreamConfig
from firehose.interfaces import Batch, BuildContext, Destination
from firehose.metrics import Metrics
from firehose.spool import RecordFrame, RecoveryState, SealedBatch, Spool, SpoolError, SpoolFullError


@dataclass
class _Pending:
    sealed: SealedBatch
    records: list[bytes] | None  # None: read back from the spool when its delivery starts
    task: asyncio.Task[None] | None = None
    spool: Spool | None = None  # the spool the batch was sealed in (default: the batcher's)


@dataclass
class _OpenBuffer:
    records: list[bytes] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    nbytes: int = 0
    oldest_ms: int = 0

    def add(self, seq: int, record: bytes, arrival_ms: int) -> None:
        if not self.records or arrival_ms < self.oldest_ms:
            self.oldest_ms = arrival_ms
        self.records.append(record)
        self.nbytes += len(record)
        if self.ranges and self.ranges[-1][1] == seq:
            self.ranges[-1] = (self.ranges[-1][0], seq + 1)
        else:
            self.ranges.append((seq, seq + 1))

    def extend(self, frame: RecordFrame, i: int, j: int, nbytes: int) -> None:
        """Add records ``i..j-1`` of ``frame`` (``nbytes`` in all)."""
        if not self.records or frame.arrival_ms < self.oldest_ms:
            self.oldest_ms = frame.arrival_ms
        self.records.extend(frame.records[i:j] if (i, j) != (0, len(frame.records)) else frame.records)
        self.nbytes += nbytes
        start, end = frame.first_seq + i, frame.first_seq + j
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], end)
        else:
            self.ranges.append((start, end))


SOURCE_BACKUP = "\x00source"  # the buffer of untransformed source records (backup mode: all)


def error_record_line(data: bytes, err: dict[str, Any]) -> bytes:
    """One Firehose error record (reference §4.2), a JSON document per line. ``rawData`` is the
    record as it was before the failing stage."""
    if err.get("t") == "format-conversion-failed":
        # Firehose spells these two with capitals in format-conversion error records (§5).
        doc: dict[str, Any] = {
            "attemptsMade": err.get("a", 1),
            "arrivalTimestamp": err.get("ts"),
            "ErrorCode": err.get("c"),
            "ErrorMessage": err.get("m"),
            "attemptEndingTimestamp": err.get("e"),
            "rawData": base64.b64encode(data).decode("ascii"),
        }
        for key in ("sequenceNumber", "subSequenceNumber"):
            if key in err:
                doc[key] = err[key]
        return orjson.dumps(doc) + b"\n"
    doc = {
        "attemptsMade": err.get("a", 1),
        "arrivalTimestamp": err.get("ts"),
        "errorCode": err.get("c"),
        "errorMessage": err.get("m"),
        "attemptEndingTimestamp": err.get("e"),
        "rawData": base64.b64encode(data).decode("ascii"),
    }
    if err.get("l") and err.get("t") == "processing-failed":
        doc["lambdaArn"] = err["l"]
    return orjson.dumps(doc) + b"\n"


class StreamRuntime:
    """Runs one configured stream. All methods run on the daemon's event loop."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        data_dir: str,
        version: int,
        region: str,
        account_id: str,
        metrics: Metrics,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.region = region
        self.account_id = account_id
        self.data_dir = data_dir
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random(int.from_bytes(os.urandom(16), "big"))
        self.log = structlog.get_logger().bind(stream=self.name)
        self.spool = self._make_spool(os.path.join(data_dir, "spool", self.name))
        self.destination: Destination | None = None
        self.archive: Destination | None = None  # where failed records go (backup, or the destination)
        self.chain: Any = None
        # The spool the batcher reads: the ingest spool, or (with processing) the spool of
        # recorded transform outcomes.
        self.out: Spool = self.spool
        self._buffer = _OpenBuffer()
        self._archive_buffers: dict[str, _OpenBuffer] = {}
        self._proc_task: asyncio.Task[None] | None = None
        self._proc_wake = asyncio.Event()
        self.dropped_records = 0
        self.archived_records = 0
        self.backed_up_records = 0
        self.backup_all = False
        self._recorded_upto = 0
        self._cursor = 0
        self._pending: deque[_Pending] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._accepting = False
        self.recovery: RecoveryState | None = None
        self.delivered_records = 0
        self.record_id_prefix = os.urandom(12).hex()
        # Bound metric children once: labels() takes a lock and a dict lookup per call.
        self._m_in_records = metrics.incoming_records.labels(self.name)
        self._m_in_bytes = metrics.incoming_bytes.labels(self.name)
        self._m_in_requests = metrics.incoming_put_requests.labels(self.name)

    def _make_spool(self, directory: str) -> Spool:
        sp = self.config.spool
        return Spool(
            directory,
            fsync=sp.fsync,
            fsync_interval_ms=sp.fsync_interval_ms,
            max_size_bytes=sp.max_size_mib << 20,
            segment_size_bytes=sp.segment_size_mib << 20,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> RecoveryState:
        """Recover the spool, build the destination, start batching and delivery."""
        self.recovery = await asyncio.to_thread(self.spool.open)
        ctx = BuildContext(self.name, self.version, self.region, self.account_id, self.data_dir, self.log)
        self.destination = self.config.destination.build(ctx)
        await self.destination.start()
        self.archive = self.destination
        if self.config.backup is not None:
            from firehose.registry import destination_config_class

            dest = self.config.backup.destination_dict()
            self.archive = destination_config_class(dest["type"]).model_validate(dest).build(ctx)  # type: ignore[attr-defined]
            await self.archive.start()
        self.backup_all = self.config.backup is not None and self.config.backup.mode == "all"
        converter = None
        fmt = self.config.format
        if fmt is not None and fmt.type != "json":
            from firehose.registry import CONVERTER, load

            converter = await asyncio.to_thread(load(CONVERTER), fmt)
            self.destination.set_converter(converter)  # type: ignore[union-attr]
        processed_dir = os.path.join(self.spool.directory, "processed")
        # A processed spool left by an earlier config keeps the stage on (an empty chain passes
        # records through) so its recorded outcomes are not stranded when processing is turned off.
        # Source-record backup rides the stage too: the untransformed records are recorded beside
        # the outcomes, so the copy is exactly-once.
        leftover = os.path.isdir(processed_dir)
        if self.config.processing or self.backup_all or converter is not None or leftover:
            from firehose.registry import PROCESSING_CHAIN, load

            arn = f"arn:aws:firehose:{self.region}:{self.account_id}:deliverystream/{self.name}"
            self.chain = load(PROCESSING_CHAIN)(
                self.config.processing, stream_arn=arn, region=self.region, converter=converter
            )
            await self.chain.start()
        recovery = self.recovery
        if self.chain is not None and (self.chain.enabled or self.backup_all or leftover):
            self.out = self._make_spool(processed_dir)
            recovery = await asyncio.to_thread(self.out.open)
            # Raw records whose outcome is recorded are finished even if their commit was lost.
            done = int(self.out.positions.get("raw_end", 0))
            if done > self.spool.next_seq:
                raise SpoolError(
                    f"{self.out.directory}: outcomes are recorded up to record {done} but the ingest "
                    f"spool ends at {self.spool.next_seq}; refusing to guess (was the spool replaced?)"
                )
            # Batches sealed in the ingest spool before processing was turned on are still
            # delivered from there, and processing starts after them.
            for sealed in self.recovery.pending:
                self._pending.append(_Pending(sealed, None, spool=self.spool))
            if self.recovery.pending:
                done = max(done, self.spool.sealed.next_gap(self.spool.min_seq))
            if done > self.spool.min_seq and not self.spool.committed.covers(self.spool.min_seq, done):
                self.spool.commit_ranges([(self.spool.min_seq, done)])
            self._proc_cursor = max(done, self.spool.min_seq)
            self._proc_task = asyncio.get_running_loop().create_task(
                self._processing_loop(), name=f"processing-{self.name}"
            )
            self._proc_wake.set()  # records ingested before the restart are waiting
        for sealed in recovery.pending:
            self._pending.append(_Pending(sealed, None))
        self._cursor = self.out.min_seq
        self.log.info(
            "stream_recovered",
            pending_batches=len(self.recovery.pending),
            unsealed_records=self.recovery.unsealed_records,
            truncated_bytes=self.recovery.truncated_bytes,
            spool_bytes=self.spool.size_bytes,
        )
        self._accepting = True
        self._loop_task = asyncio.get_running_loop().create_task(self._batcher_loop(), name=f"batcher-{self.name}")
        self._dispatch()
        self._wake.set()
        self._update_gauges()
        return self.recovery

    async def stop(self, timeout: float) -> bool:
        """Stop accepting, seal the open buffer, deliver within ``timeout`` seconds. What is not
        delivered by then stays in the spool (sealed batches keep their keys). Returns True when
        everything sealed was delivered."""
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + timeout
        if self._proc_task is not None:
            self._proc_task.cancel()
            await asyncio.gather(self._proc_task, return_exceptions=True)
        if self._loop_task is not None:
            self._wake.set()
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        try:
            for key in ["", *self._archive_buffers]:
                await asyncio.wait_for(self._seal(key), max(0.1, deadline - time.monotonic()))
        except (TimeoutError, OSError) as exc:
            self.log.warning("stream_seal_on_stop_failed", error=str(exc))
        self._dispatch()
        tasks = [p.task for p in self._pending if p.task is not None]
        clean = True
        if self._pending:
            remaining = max(0.0, deadline - time.monotonic())
            done, not_done = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
            for t in not_done:
                t.cancel()
            if not_done:
                await asyncio.gather(*not_done, return_exceptions=True)
            clean = not self._pending
        await self.spool.aclose()
        if self.out is not self.spool:
            await self.out.aclose()
        if self.chain is not None:
            await self.chain.close()
        if self.destination is not None:
            await self.destination.close()
        if self.archive is not None and self.archive is not self.destination:
            await self.archive.close()
        self.log.info("stream_stopped", clean=clean, pending_batches=len(self._pending))
        return clean

    # ------------------------------------------------------------------ ingest
    @property
    def accepting(self) -> bool:
        return self._accepting

    async def put(self, records: list[bytes], arrival_ms: int | None = None, *, nbytes: int | None = None) -> int:
        """Append records and return once they are durable; the first record's sequence number.

        Raises :class:`SpoolFullError` (nothing written) when the spool is at its cap."""
        if not self._accepting:
            raise SpoolFullError(f"stream {self.name} is not accepting records")
        arrival = self.clock.now_ms() if arrival_ms is None else arrival_ms
        if nbytes is None:
            nbytes = sum(map(len, records))
        first = self.spool.append_records(records, arrival, nbytes=nbytes)
        self._wake.set()
        self._proc_wake.set()
        await self.spool.wait_durable()
        self._m_in_records.inc(len(records))
        self._m_in_bytes.inc(nbytes)
        self._m_in_requests.inc()
        return first

    def has_room(self, nbytes: int) -> bool:
        """The stream's cap counts every spool it owns (ingest and recorded outcomes)."""
        used = self.spool.size_bytes + (self.out.size_bytes if self.out is not self.spool else 0)
        return used + nbytes <= self.spool.max_size_bytes

    def record_id(self, seq: int) -> str:
        # Unique across restarts: a per-process random prefix plus the spool sequence number.
        return f"{self.record_id_prefix}{seq:016x}"

    # ------------------------------------------------------------------ batching
    async def _batcher_loop(self) -> None:
        interval_ms = self.config.interval_secs * 1000
        while not self._stopping:
            timeout: float | None = None
            oldest = self._oldest_buffered()
            if oldest is not None and self._cursor >= self.out.next_seq:
                timeout = max(0.0, (oldest + interval_ms - self.clock.now_ms()) / 1000.0)
            if timeout is None or timeout > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                await self._pump()
                # While a backlog is still on disk the buffer fills by size; sealing it on time
                # would only cut the backlog into small objects.
                if self._cursor >= self.out.next_seq:
                    now = self.clock.now_ms()
                    for key, buf in [("", self._buffer), *self._archive_buffers.items()]:
                        if buf.records and now >= buf.oldest_ms + interval_ms:
                            await self._seal(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the stream alive; the records stay in the spool
                self.log.exception("batcher_failed", error=str(exc))
                await asyncio.sleep(1.0)
            self._update_gauges()

    def _oldest_buffered(self) -> int | None:
        times = [b.oldest_ms for b in (self._buffer, *self._archive_buffers.values()) if b.records]
        return min(times) if times else None

    def _room(self) -> bool:
        return len(self._pending) <= self.config.delivery.max_in_flight

    async def _pump(self) -> None:
        """Move records from the spool into the open buffer, sealing whenever the next record
        would not fit. Works on runs of records (a bisect over cumulative sizes), not one by one.
        Stops, mid-frame if need be, when ``max_in_flight + 1`` batches are pending."""
        size_limit = self.config.size_bytes
        spool = self.out
        sealed = spool.sealed
        while self._cursor < spool.next_seq and self._room() and not self._stopping:
            if self._cursor < spool.min_seq:
                self._cursor = spool.min_seq
                continue
            frame = spool.frame_at(self._cursor)
            if frame is None:  # pragma: no cover - the index always covers [min_seq, next_seq)
                self.log.error("spool_gap", seq=self._cursor)
                self._cursor += 1
                continue
            first = frame.first_seq
            n = len(frame.records)
            if frame.meta is not None:
                if not await self._pump_routed(frame):
                    return
                continue
            cum = frame.cum
            i = self._cursor - first
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
                if j == i and not self._buffer.records:
                    j = i + 1  # a record larger than the buffer goes out on its own
                if j > i:
                    self._buffer.extend(frame, i, j, cum[j] - cum[i])
                    i = j
                if i < end or self._buffer.nbytes >= size_limit:
                    await self._seal()
                    if not self._room() and i < n:
                        self._cursor = first + i
                        return
            self._cursor = frame.end_seq
            spool.release_cache(first)

    async def _pump_routed(self, frame: RecordFrame) -> bool:
        """Records with per-record metadata (transform outcomes): failed ones go to an archive
        buffer per error-output type as Firehose error records, the rest to the main buffer.
        Returns False when it stopped for lack of room (the cursor marks where)."""
        size_limit = self.config.size_bytes
        sealed = self.out.sealed
        assert frame.meta is not None
        first = frame.first_seq
        for i in range(self._cursor - first, len(frame.records)):
            seq = first + i
            if seq in sealed:
                continue
            meta = frame.meta[i]
            err = meta.get("err") if isinstance(meta, dict) else None
            if err is not None:
                key = err["t"]
                record = error_record_line(frame.records[i], err)
                buf = self._archive_buffers.setdefault(key, _OpenBuffer())
            elif isinstance(meta, dict) and meta.get("src"):
                key = SOURCE_BACKUP
                record = frame.records[i]
                buf = self._archive_buffers.setdefault(key, _OpenBuffer())
            else:
                key = ""
                record = frame.records[i]
                buf = self._buffer
            if buf.records and buf.nbytes + len(record) > size_limit:
                await self._seal(key)
                buf = self._archive_buffers.setdefault(key, _OpenBuffer()) if key else self._buffer
            buf.add(seq, record, frame.arrival_ms)
            if not self._room():
                self._cursor = seq + 1
                if self._cursor >= frame.end_seq:
                    self.out.release_cache(first)
                return False
        self._cursor = frame.end_seq
        self.out.release_cache(first)
        return True

    async def _seal(self, buffer_key: str = "") -> None:
        buf = self._archive_buffers.get(buffer_key) if buffer_key else self._buffer
        if buf is None or not buf.records:
            return
        assert self.destination is not None and self.archive is not None
        oldest = datetime.fromtimestamp(buf.oldest_ms / 1000.0, tz=UTC)
        info: dict[str, Any] = {"records": len(buf.records), "bytes": buf.nbytes}
        if buffer_key == SOURCE_BACKUP:
            key = self.archive.batch_key(oldest, self.rng)
            info.update({"sink": "source"})
        elif buffer_key:
            key = self.archive.archive_key(oldest, self.rng, buffer_key)  # type: ignore[attr-defined]
            info.update({"sink": "archive", "type": buffer_key})
        else:
            key = self.destination.batch_key(oldest, self.rng)
            converter = getattr(self.chain, "converter", None)
            if converter is not None:
                info["fmt"] = converter.fingerprint  # the schema its records were checked against
        sealed = SealedBatch(self.out.allocate_batch_id(), key, buf.ranges, buf.oldest_ms, info)
        # The buffer is forgotten only once its seal is written; a failed write leaves it to be
        # sealed again. (A seal written but not yet fsynced is never re-sealed: it is in _pending.)
        written = False
        try:
            await self.out.append_seal(sealed)
            written = True
        finally:
            if written or self.out.sealed.covers(buf.ranges[0][0], buf.ranges[0][1]):
                if buffer_key:
                    self._archive_buffers[buffer_key] = _OpenBuffer()
                else:
                    self._buffer = _OpenBuffer()
                if not written:
                    self._pending.append(_Pending(sealed, buf.records))
        self.log.debug("batch_sealed", batch_id=sealed.batch_id, key=key, records=len(buf.records))
        self._pending.append(_Pending(sealed, buf.records))
        self._dispatch()

    # ------------------------------------------------------------------ processing
    async def _processing_loop(self) -> None:
        """Run the processing chain over ingested records, in order, in processing buffers
        (Firehose's processing buffer hints), and record every outcome in the outcome spool
        (fsynced) before the raw records are released. A restart resumes after the last recorded
        outcome, so no transform runs twice on the same record.

        Several buffers are in processing at once (Firehose keeps up to 5 invocations
        outstanding per shard); their outcomes are recorded strictly in order by the recorder."""
        chain = self.chain
        limit = chain.buffer_size_bytes
        interval_ms = chain.buffer_interval_secs * 1000
        depth = max(2, int(getattr(chain, "concurrency", 2)))
        queue: asyncio.Queue[tuple[list[tuple[int, bytes, int, Any]], list[Any], asyncio.Task[Any]]] = (
            asyncio.Queue(maxsize=depth)
        )
        recorder = asyncio.get_running_loop().create_task(self._record_loop(queue), name=f"recorder-{self.name}")
        pending: list[tuple[int, bytes, int, Any]] = []
        nbytes = 0
        try:
            while not self._stopping:
                timeout: float | None = None
                if pending and interval_ms:
                    timeout = max(0.0, (pending[0][2] + interval_ms - self.clock.now_ms()) / 1000.0)
                if self.out.size_bytes >= self.spool.max_size_bytes // 2:
                    timeout = 1.0 if timeout is None else min(timeout, 1.0)  # throttled: look again soon
                if not pending or timeout:
                    try:
                        await asyncio.wait_for(self._proc_wake.wait(), timeout)
                    except TimeoutError:
                        pass
                self._proc_wake.clear()
                try:
                    # Outcomes wait on disk like records do: stop reading when the batcher is far behind.
                    while self._proc_cursor < self.spool.next_seq and not self._stopping and self.out.size_bytes < (
                        self.spool.max_size_bytes // 2
                    ):
                        frame = self.spool.frame_at(self._proc_cursor)
                        if frame is None:
                            self._proc_cursor = max(self._proc_cursor, self.spool.min_seq)
                            break
                        meta = frame.meta
                        first = frame.first_seq
                        arrival = frame.arrival_ms
                        recs = frame.records
                        i = self._proc_cursor - first
                        while i < len(recs):
                            pending.append((first + i, recs[i], arrival, meta[i] if meta is not None else None))
                            nbytes += len(recs[i])
                            i += 1
                            if nbytes >= limit:
                                self._proc_cursor = first + i
                                await self._submit(queue, pending)
                                pending, nbytes = [], 0
                        self._proc_cursor = frame.end_seq
                        self.spool.release_cache(first)
                    due = pending and (not interval_ms or self.clock.now_ms() >= pending[0][2] + interval_ms)
                    if due:
                        await self._submit(queue, pending)
                        pending, nbytes = [], 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # re-read the unsubmitted records on the next pass
                    self.log.exception("processing_failed", error=str(exc))
                    if pending:
                        self._proc_cursor = pending[0][0]
                        pending, nbytes = [], 0
                    await asyncio.sleep(1.0)
        finally:
            recorder.cancel()
            while not queue.empty():
                queue.get_nowait()[2].cancel()
            await asyncio.gather(recorder, return_exceptions=True)

    async def _submit(self, queue: asyncio.Queue[Any], pending: list[tuple[int, bytes, int, Any]]) -> None:
        from transforms.records import SourceRecord

        sources = [
            SourceRecord(str(seq), data, arrival, meta.get("kinesis") if isinstance(meta, dict) else None)
            for seq, data, arrival, meta in pending
        ]
        task = asyncio.get_running_loop().create_task(self._run_chain(sources))
        await queue.put((pending, sources, task))

    async def _run_chain(self, sources: list[Any]) -> list[Any]:
        t0 = time.monotonic()
        outcomes = list(await self.chain.process(sources))
        self.metrics.execute_processing_seconds.labels(self.name).inc(time.monotonic() - t0)
        self.metrics.execute_processing_calls.labels(self.name).inc()
        return outcomes

    async def _record_loop(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            pending, sources, task = await queue.get()
            while True:
                try:
                    outcomes = await task
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug in a stage: run the same buffer again, in order
                    self.log.exception("processing_failed", error=str(exc))
                    await asyncio.sleep(1.0)
                    task = asyncio.get_running_loop().create_task(self._run_chain(sources))
            await self._record_reliably(pending, outcomes)

    async def _record_reliably(self, pending: list[tuple[int, bytes, int, Any]], outcomes: list[Any]) -> None:
        """Record an outcome, retrying on local I/O errors. The frame is appended at most once:
        after a successful append only the fsync (and the raw commit) are retried."""
        failures = 0
        while True:
            try:
                await self._record(pending, outcomes)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.log.exception("outcome_recording_failed", error=str(exc), attempt=failures)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                if self._recorded_upto >= pending[-1][0] + 1:
                    # Appended already: finish the durability and the release, not the append.
                    await self.out.wait_durable(force=True)
                    self.spool.commit_ranges([(pending[0][0], pending[-1][0] + 1)])
                    self._wake.set()
                    return

    async def _record(self, pending: list[tuple[int, bytes, int, Any]], outcomes: list[Any]) -> None:
        chain = self.chain
        now = self.clock.now_ms()
        records: list[bytes] = []
        metas: list[Any] = []
        dropped = 0
        for o in outcomes:
            if o.result == "Dropped":
                dropped += 1
                continue
            records.append(o.data)
            if o.result == "Ok":
                metas.append({"pk": o.partition_keys} if o.partition_keys else None)
            else:
                metas.append({"err": {
                    "c": o.error_code, "m": o.error_message, "t": o.error_output_type, "a": o.attempts,
                    "ts": pending[o.source][2], "e": now, "l": chain.lambda_arn,
                }})
        if self.backup_all:
            for _seq, data, _arrival, _meta in pending:
                records.append(data)
                metas.append({"src": 1})
        start, end = pending[0][0], pending[-1][0] + 1
        has_meta = any(m is not None for m in metas)
        self.out.append_records(
            records, pending[0][2], meta=metas if has_meta else None, positions={"raw_end": end}, enforce_cap=False
        )
        self._recorded_upto = end
        await self.out.wait_durable(force=True)
        self.spool.commit_ranges([(start, end)])
        self.dropped_records += dropped
        failed = sum(1 for o in outcomes if o.result == "ProcessingFailed")
        ok_bytes = sum(len(o.data) for o in outcomes if o.result == "Ok")
        self.metrics.dropped_records.labels(self.name).inc(dropped)
        self.metrics.failed_processing_records.labels(self.name).inc(failed)
        self.metrics.succeed_processing_records.labels(self.name).inc(len(outcomes) - failed - dropped)
        self.metrics.succeed_processing_bytes.labels(self.name).inc(ok_bytes)
        self.log.debug("records_processed", records=len(pending), outputs=len(records), dropped=dropped, failed=failed)
        self._wake.set()

    # ------------------------------------------------------------------ delivery
    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        for pending in self._pending:
            if self._in_flight >= self.config.delivery.max_in_flight:
                break
            if pending.task is None:
                self._in_flight += 1
                pending.task = loop.create_task(self._deliver(pending), name=f"deliver-{self.name}")

    async def _deliver(self, pending: _Pending) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self._deliver_once(pending)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A bug or a local I/O error (reading the spool, writing the commit): retry
                    # this batch after a pause, in this task, never in a tight loop.
                    failures += 1
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                    self.log.exception("delivery_failed", batch_id=pending.sealed.batch_id, error=str(exc),
                                       retry_in_secs=delay)
                    await asyncio.sleep(delay)
        finally:
            self._in_flight -= 1
            if pending in self._pending:
                pending.task = None  # cancelled at shutdown: stays sealed in the spool
            if not self._stopping:
                self._dispatch()
                self._wake.set()
                self._proc_wake.set()  # the processing stage may be waiting for room
            self._update_gauges()

    async def _deliver_once(self, pending: _Pending) -> None:
        assert self.destination is not None
        sealed = pending.sealed
        spool = pending.spool or self.out
        sink = sealed.info.get("sink", "main")
        archive = sink == "archive"
        destination = self.destination if sink == "main" else self.archive
        assert destination is not None
        records: list[bytes]
        if pending.records is not None:
            records = pending.records
        else:
            records, metas = await asyncio.to_thread(spool.read_ranges, sealed.ranges)
            if archive and metas is not None:
                records = [error_record_line(r, m["err"]) for r, m in zip(records, metas, strict=True)]
        if sink == "main":
            records = await self._recheck_schema(sealed, records)
            if not records:  # every record was archived: no empty file
                spool.append_commit(sealed.batch_id, {"attempts": 0})
                self._pending.remove(pending)
                return
        todo = list(range(len(records)))
        attempt = 0
        d = self.config.delivery
        labels = self.name
        while True:
            attempt += 1
            subset = records if len(todo) == len(records) else [records[i] for i in todo]
            batch = Batch(self.name, sealed.batch_id, sealed.key, subset, sealed.oldest_arrival_ms, attempt)
            if sink == "main" and self.chain is not None:
                batch.delimiter = self.chain.delimiter
            batch.archive = sink != "main"
            self.metrics.delivery_attempts.labels(labels).inc()
            result = await destination.deliver(batch)
            delivered = len(todo) - len(result.failures)
            if delivered:
                nbytes = sum(map(len, subset)) - sum(len(subset[i]) for i in result.failures)
                self.metrics.delivery_records.labels(labels).inc(delivered)
                self.metrics.delivery_bytes.labels(labels).inc(nbytes)
            if result.ok:
                self.metrics.delivery_success.labels(labels).set(1)
                self.metrics.delivery_objects.labels(labels).inc()
                break
            self.metrics.delivery_success.labels(labels).set(0)
            self.metrics.delivery_failures.labels(labels).inc()
            first = next(iter(result.failures.values()))
            # Rejected records have nowhere else to go until a backup location exists, so
            # they are retried too: nothing acknowledged is ever dropped silently.
            todo = [todo[i] for i in sorted(result.failures)]
            backoff_ms = min(d.retry_max_backoff_ms, d.retry_initial_backoff_ms * (2 ** min(attempt - 1, 20)))
            delay = self.rng.uniform(backoff_ms / 2, backoff_ms) / 1000.0
            self.metrics.delivery_retries.labels(labels).inc()
            self.log.warning(
                "delivery_retry_scheduled",
                batch_id=sealed.batch_id,
                key=sealed.key,
                attempt=attempt,
                failed_records=len(todo),
                error_code=first.error_code,
                error_message=first.error_message[:300],
                delay_secs=round(delay, 3),
            )
            await asyncio.sleep(delay)
        spool.append_commit(sealed.batch_id, {"attempts": attempt})
        if archive:
            self.archived_records += len(records)
            self.metrics.archived_records.labels(self.name).inc(len(records))
        elif sink == "source":
            self.backed_up_records += len(records)
        else:
            self.delivered_records += len(records)
        self.log.info(
            "batch_delivered",
            batch_id=sealed.batch_id,
            key=sealed.key,
            records=len(records),
            attempts=attempt,
        )
        self._pending.remove(pending)

    async def _recheck_schema(self, sealed: SealedBatch, records: list[bytes]) -> list[bytes]:
        """A batch sealed under another schema (the format changed across a restart or reload)
        is checked again: records the new schema cannot take are archived as
        format-conversion-failed, the rest written in the new schema, never a mixed file. The
        archive key derives from the batch identity, so a replay overwrites it."""
        converter = getattr(self.chain, "converter", None)
        fmt = sealed.info.get("fmt")
        if converter is None or fmt is None or fmt == converter.fingerprint:
            return records
        verdicts = await asyncio.to_thread(converter.check, records)
        bad = [i for i, v in enumerate(verdicts) if v is not None]
        self.log.warning("batch_schema_changed", batch_id=sealed.batch_id, records=len(records), failed=len(bad))
        if not bad:
            return records
        assert self.archive is not None
        now = self.clock.now_ms()
        lines = []
        for i in bad:
            code, message = verdicts[i]  # type: ignore[misc]
            err = {"c": code, "m": message, "t": "format-conversion-failed", "a": 1,
                   "ts": sealed.oldest_arrival_ms, "e": now}
            lines.append(error_record_line(records[i], err))
        oldest = datetime.fromtimestamp(sealed.oldest_arrival_ms / 1000.0, tz=UTC)
        rng = random.Random(f"{self.name}:{sealed.batch_id}:{sealed.key}")
        key = self.archive.archive_key(oldest, rng, "format-conversion-failed")  # type: ignore[attr-defined]
        batch = Batch(self.name, sealed.batch_id, key, lines, sealed.oldest_arrival_ms, archive=True)
        attempt = 0
        while not (await self.archive.deliver(batch)).ok:  # archiving never gives up
            attempt += 1
            self.log.warning("archive_retry_scheduled", batch_id=sealed.batch_id, key=key, attempt=attempt)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))
        self.archived_records += len(bad)
        keep = set(range(len(records))) - set(bad)
        return [r for i, r in enumerate(records) if i in keep]

    # ------------------------------------------------------------------ observability
    def _update_gauges(self) -> None:
        labels = self.name
        out_bytes = self.out.size_bytes if self.out is not self.spool else 0
        self.metrics.spool_bytes.labels(labels).set(self.spool.size_bytes + out_bytes)
        backlog = self.spool.next_seq - self.spool.min_seq - len(self.spool.committed)
        self.metrics.backlog_records.labels(labels).set(max(0, backlog))
        oldest: int | None = None
        if self._pending:
            oldest = min(p.sealed.oldest_arrival_ms for p in self._pending)
        if self._buffer.records:
            oldest = self._buffer.oldest_ms if oldest is None else min(oldest, self._buffer.oldest_ms)
        age = 0.0 if oldest is None else max(0.0, (self.clock.now_ms() - oldest) / 1000.0)
        self.metrics.data_freshness.labels(labels).set(age)

    def status(self) -> dict[str, Any]:
        return {
            "spool_bytes": self.spool.size_bytes,
            "pending_batches": len(self._pending),
            "open_buffer_records": len(self._buffer.records),
            "delivered_records": self.delivered_records,
            "dropped_records": self.dropped_records,
            "archived_records": self.archived_records,
            "backed_up_records": self.backed_up_records,
            "spool_failed": str(self.spool.failed or self.out.failed or "") or None,
        }
