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
import re
import time
import zlib
from array import array
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from firehose.clock import Clock, SystemClock
from firehose.config import StreamConfig
from firehose.interfaces import (
    PREFLIGHT_TIMEOUT_SECS,
    Batch,
    BuildContext,
    Destination,
    RecordFailure,
    Source,
)
from firehose.intervals import Ranges
from firehose.metrics import Metrics
from firehose.names import disk_name
from firehose.spool import RecordFrame, RecoveryState, SealedBatch, Spool, SpoolError, SpoolFullError


@dataclass(eq=False)  # compared by identity: deque membership and removal stay cheap
class _Pending:
    sealed: SealedBatch
    records: list[bytes] | None  # None: read back from the spool when its delivery starts
    task: asyncio.Task[None] | None = None
    spool: Spool | None = None  # the spool the batch was sealed in (default: the batcher's)
    partition: tuple[str, ...] | None = None  # dynamic partitioning: the partition it counts for
    durable: bool = True  # its seal is on disk, so it may be delivered


class _OpenBuffer:
    """Records waiting to be sealed into one batch, and the spool ranges they come from (a flat
    array of ``[start, end)`` pairs: a partition's records are scattered through the spool). A
    *spilled* buffer keeps only its ranges; its batch is read back from the spool at delivery."""

    __slots__ = ("records", "bounds", "nbytes", "count", "oldest_ms", "spilled")

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.bounds = array("q")
        self.nbytes = 0
        self.count = 0
        self.oldest_ms = 0
        self.spilled = False

    @property
    def ranges(self) -> Ranges:
        return Ranges.from_flat(self.bounds)

    @property
    def memory_bytes(self) -> int:
        return 0 if self.spilled else self.nbytes

    def add(self, seq: int, record: bytes, arrival_ms: int) -> None:
        if not self.count or arrival_ms < self.oldest_ms:
            self.oldest_ms = arrival_ms
        if not self.spilled:
            self.records.append(record)
        self.count += 1
        self.nbytes += len(record)
        b = self.bounds
        if b and b[-1] == seq:
            b[-1] = seq + 1
        else:
            b.append(seq)
            b.append(seq + 1)

    def extend(self, frame: RecordFrame, i: int, j: int, nbytes: int) -> None:
        """Add records ``i..j-1`` of ``frame`` (``nbytes`` in all)."""
        if not self.count or frame.arrival_ms < self.oldest_ms:
            self.oldest_ms = frame.arrival_ms
        self.records.extend(frame.records[i:j] if (i, j) != (0, len(frame.records)) else frame.records)
        self.count += j - i
        self.nbytes += nbytes
        start, end = frame.first_seq + i, frame.first_seq + j
        b = self.bounds
        if b and b[-1] == start:
            b[-1] = end
        else:
            b.append(start)
            b.append(end)

    def spill(self) -> int:
        """Forget the record bytes (they are in the spool); returns the bytes freed."""
        freed = self.memory_bytes
        self.records = []
        self.spilled = True
        return freed


# The error-output type of records whose partition could not be delivered within
# dynamic_partitioning.retry_duration_secs (Firehose's own string for this is not documented).
DELIVERY_FAILED = "delivery-failed"

# What an open partition's bookkeeping costs, counted against dynamic_partitioning.memory_budget_mib
# beside the record bytes held: a spool range (two int64) and a buffer with its dict entry.
RANGE_BYTES = 16
PARTITION_BYTES = 512

# The room a spool needs to count as taking records in /healthz: one maximum-size record
# (Firehose's 1,000 KiB) and its frame.
MAX_RECORD_ROOM = 1_024_000 + 128

SOURCE_BACKUP = "\x00source"  # the buffer of untransformed source records (backup mode: all)

# What /healthz may show of an error message: destinations' messages name URLs (with query
# strings) and file paths; the log keeps them whole, health shows a placeholder.
_URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_PATH_RE = re.compile(r"(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\":,;()<>]+")
MAX_HEALTH_MESSAGE = 256


def health_message(message: str) -> str:
    """An error message fit for ``/healthz``: URLs and file paths replaced, one line, bounded."""
    text = _PATH_RE.sub("<path>", _URL_RE.sub("<url>", " ".join(message.split())))
    return text if len(text) <= MAX_HEALTH_MESSAGE else text[: MAX_HEALTH_MESSAGE - 3] + "..."


def iso_utc(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds: ``2026-12-05T10:00:00.123Z``."""
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DeliveryError:
    """A failed delivery attempt as ``/healthz`` shows it (``message`` already fit for it)."""

    code: str
    message: str
    time_ms: int
    destination: str  # "destination" or "backup"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "time": iso_utc(self.time_ms),
                "destination": self.destination}


class DeliveryHealth:
    """Whether one destination of a stream delivers: its latest failed attempt, and when the
    current run of failed attempts started (None once an attempt succeeds). Updated on the event
    loop by the delivery runner after every attempt."""

    __slots__ = ("role", "last_error", "failing_since_ms")

    def __init__(self, role: str) -> None:
        self.role = role
        self.last_error: DeliveryError | None = None
        self.failing_since_ms: int | None = None

    def failed(self, code: str, message: str, now_ms: int) -> None:
        self.last_error = DeliveryError(code, health_message(message), now_ms, self.role)
        if self.failing_since_ms is None:
            self.failing_since_ms = now_ms

    def succeeded(self) -> None:
        """The destination took an attempt (the last error stays, for the record)."""
        self.failing_since_ms = None


def _routes(metas: list[Any]) -> bool:
    """Whether a frame's records need the per-record path: some go elsewhere than the main
    buffer (failed, or source copies). Metadata that only describes records (a Kinesis source's
    kinesisRecordMetadata) does not."""
    return any(isinstance(m, dict) and ("err" in m or "src" in m) for m in metas)


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
    if err.get("x"):  # a destination's own members (esDocumentId, EventId, ...), before rawData
        raw = doc.pop("rawData")
        doc.update(err["x"])
        doc["rawData"] = raw
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
        self.spool = self._make_spool(os.path.join(data_dir, "spool", disk_name(self.name)))
        self.destination: Destination | None = None
        self.sources: list[Source] = []
        self.archive: Destination | None = None  # where failed records go (backup, or the destination)
        self.chain: Any = None
        # The spool the batcher reads: the ingest spool, or (with processing) the spool of
        # recorded transform outcomes.
        self.out: Spool = self.spool
        self._buffer = _OpenBuffer()
        self._archive_buffers: dict[str, _OpenBuffer] = {}
        # Dynamic partitioning: the namespaced keys the Prefix uses (None: not partitioning), the
        # open partition buffers in creation order, and the active partitions (open buffers plus
        # undelivered batches, counted per partition) the max_active_partitions guard counts.
        self._refs: tuple[str, ...] | None = None
        self._partitions: dict[tuple[str, ...], _OpenBuffer] = {}
        self._active: dict[tuple[str, ...], int] = {}
        self._memory_held = 0  # record bytes held by unspilled partition buffers
        self._ranges_held = 0  # entries of all partition buffers' range arrays
        dp = config.dynamic_partitioning
        self._budget = (dp.memory_budget_mib if dp is not None else 64) << 20
        self._proc_task: asyncio.Task[None] | None = None
        self._proc_wake = asyncio.Event()
        self.dropped_records = 0
        self.archived_records = 0
        self.backed_up_records = 0
        self.backup_all = False
        self._recorded_upto = 0
        self._cursor = 0
        self._pending: deque[_Pending] = deque()
        self._delivering: set[asyncio.Task[None]] = set()
        self._oldest_pending: tuple[float, int] | None = None  # (when computed, oldest arrival)
        self._backlog_head: tuple[int, int, int] | None = None  # (0 ingest/1 processed spool, seq, arrival)
        # Delivery health per destination ("backup" only when failed records go elsewhere).
        self._health: dict[str, DeliveryHealth] = {"destination": DeliveryHealth("destination")}
        self._preflight_task: asyncio.Task[None] | None = None
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

    def _make_spool(self, directory: str, cache_bytes: int = 64 << 20) -> Spool:
        sp = self.config.spool
        return Spool(
            directory,
            fsync=sp.fsync,
            fsync_interval_ms=sp.fsync_interval_ms,
            max_size_bytes=sp.max_size_mib << 20,
            segment_size_bytes=sp.segment_size_mib << 20,
            cache_bytes=cache_bytes,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> RecoveryState:
        """Recover the spool, build the destination, start batching and delivery."""
        self.recovery = await asyncio.to_thread(self.spool.open)
        ctx = BuildContext(self.name, self.version, self.region, self.account_id, self.data_dir, self.log)
        self.destination = self.config.destination.build(ctx)
        await self.destination.start()
        self.archive = self.destination
        backup_type: str | None = None
        if self.config.backup is not None:
            from firehose.registry import destination_config_class

            dest = self.config.backup.destination_dict()
            backup_type = str(dest["type"])
            self.archive = destination_config_class(dest["type"]).model_validate(dest).build(ctx)  # type: ignore[attr-defined]
            await self.archive.start()
            self._health["backup"] = DeliveryHealth("backup")
        self._start_preflight(backup_type)
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
            kinesis = [s for s in self.config.sources if s.stream_type == "KinesisStreamAsSource"]
            self.chain = load(PROCESSING_CHAIN)(
                self.config.processing, stream_arn=arn, region=self.region, converter=converter,
                source_kinesis_stream_arn=kinesis[0].arn_for(self.region, self.account_id) if kinesis else None,
            )
            await self.chain.start()
        recovery = self.recovery
        if self.chain is not None and (self.chain.enabled or self.backup_all or leftover):
            # The batcher reads outcomes right after they are recorded: a small cache serves that.
            self.out = self._make_spool(processed_dir, cache_bytes=16 << 20)
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
        if self.config.partitioned:
            from firehose.destinations.keys import partition_key_refs

            self._refs = partition_key_refs(self.config.destination.prefix)
        for sealed in recovery.pending:
            p = sealed.info.get("p")
            part = tuple(p) if isinstance(p, list) and sealed.info.get("sink", "main") == "main" else None
            if part is not None:
                self._active[part] = self._active.get(part, 0) + 1
            self._pending.append(_Pending(sealed, None, partition=part))
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
        for source_config in self.config.sources:
            source = source_config.build(ctx, self)
            await source.start()
            self.sources.append(source)
        return self.recovery

    def _start_preflight(self, backup_type: str | None) -> None:
        """Check the destinations in the background (start never waits for it, nor fails by it)."""
        assert self.destination is not None and self.archive is not None
        checks = [("destination", self.config.destination.type, self.destination)]
        if backup_type is not None:
            checks.append(("backup", backup_type, self.archive))
        self._preflight_task = asyncio.get_running_loop().create_task(
            self._preflight(checks), name=f"preflight-{self.name}"
        )

    async def _preflight(self, checks: list[tuple[str, str, Destination]]) -> None:
        async def check(role: str, kind: str, destination: Destination) -> None:
            try:
                reason = await asyncio.wait_for(destination.preflight(), PREFLIGHT_TIMEOUT_SECS)
            except TimeoutError:
                reason = f"no answer within {PREFLIGHT_TIMEOUT_SECS:g} s"
            except Exception as exc:  # a bug in a check: say so, and keep the stream running
                reason = f"the check itself failed: {type(exc).__name__}: {exc}"
            if reason is None:
                self.log.info("destination_preflight_passed", destination=kind, role=role)
            else:
                self.log.warning("destination_preflight_failed", destination=kind, role=role, reason=reason)

        await asyncio.gather(*(check(*c) for c in checks))

    async def stop(self, timeout: float) -> bool:
        """Stop accepting, seal the open buffer, deliver within ``timeout`` seconds. What is not
        delivered by then stays in the spool (sealed batches keep their keys). Returns True when
        everything sealed was delivered."""
        deadline = time.monotonic() + timeout
        if self._preflight_task is not None:
            self._preflight_task.cancel()
            await asyncio.gather(self._preflight_task, return_exceptions=True)
        for source in self.sources:  # first, so what they acknowledged is all in the spool
            await source.stop()
        self._accepting = False
        self._stopping = True
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
            if self._partitions:
                await asyncio.wait_for(self._seal_many(list(self._partitions), "stop"),
                                       max(0.1, deadline - time.monotonic()))
        except (TimeoutError, OSError) as exc:
            self.log.warning("stream_seal_on_stop_failed", error=str(exc))
        # Seals written without their fsync (a batcher cancelled in _seal_many) become deliverable
        # once they are on disk.
        if any(not p.durable for p in self._pending):
            try:
                await self.out.wait_durable(force=True)
                for p in self._pending:
                    p.durable = True
            except OSError as exc:
                self.log.warning("stream_seal_on_stop_failed", error=str(exc))
        # Keep delivering (max_in_flight at a time) until everything sealed is out or time is up.
        while self._pending:
            self._dispatch()
            remaining = deadline - time.monotonic()
            if not self._delivering or remaining <= 0:
                break
            await asyncio.wait(self._delivering, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        not_done = list(self._delivering)
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

    async def put(
        self, records: list[bytes], arrival_ms: int | None = None, *, nbytes: int | None = None,
        meta: list[Any] | None = None, positions: dict[str, Any] | None = None,
    ) -> int:
        """Append records and return once they are durable; the first record's sequence number.
        A source passes per-record ``meta`` (``{"kinesis": {...}}``: kinesisRecordMetadata) and
        the ``positions`` the records bring it to, written in the same frame.

        Raises :class:`SpoolFullError` (nothing written) when the spool is at its cap."""
        if not self._accepting:
            raise SpoolFullError(f"stream {self.name} is not accepting records")
        arrival = self.clock.now_ms() if arrival_ms is None else arrival_ms
        if nbytes is None:
            nbytes = sum(map(len, records))
        first = self.spool.append_records(records, arrival, nbytes=nbytes, meta=meta, positions=positions)
        self._wake.set()
        self._proc_wake.set()
        await self.spool.wait_durable()
        if records:  # a source's position-only write is not an incoming request
            self._m_in_records.inc(len(records))
            self._m_in_bytes.inc(nbytes)
            self._m_in_requests.inc()
        return first

    @property
    def positions(self) -> dict[str, Any]:
        """Source positions committed in the ingest spool."""
        return self.spool.positions

    @property
    def max_size_bytes(self) -> int:
        return self.spool.max_size_bytes

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
                        if buf.count and now >= buf.oldest_ms + interval_ms:
                            await self._seal(key)
                    # Partitions sit in creation order, which is (nearly) oldest first.
                    due = []
                    for ident, buf in self._partitions.items():
                        if now < buf.oldest_ms + interval_ms:
                            break
                        due.append(ident)
                    if due:
                        await self._seal_many(due, "interval")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the stream alive; the records stay in the spool
                self.log.exception("batcher_failed", error=str(exc))
                await asyncio.sleep(1.0)
            self._update_gauges()

    def _oldest_buffered(self) -> int | None:
        times = [b.oldest_ms for b in (self._buffer, *self._archive_buffers.values()) if b.count]
        if self._partitions:
            times.append(next(iter(self._partitions.values())).oldest_ms)
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
            if self._refs is not None or (frame.meta is not None and _routes(frame.meta)):
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
                if j == i and not self._buffer.count:
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
        """Records with per-record metadata (transform outcomes), or any record when the stream
        partitions: failed ones go to an archive buffer per error-output type as Firehose error
        records, source copies to the backup buffer, the rest to the main buffer or, with dynamic
        partitioning, to their partition's buffer. Returns False when it stopped for lack of room
        (the cursor marks where)."""
        size_limit = self.config.size_bytes
        sealed = self.out.sealed
        refs = self._refs
        metas = frame.meta
        first = frame.first_seq
        buf: _OpenBuffer
        key: str | tuple[str, ...]
        for i in range(self._cursor - first, len(frame.records)):
            seq = first + i
            if seq in sealed:
                continue
            meta = metas[i] if metas is not None else None
            record = frame.records[i]
            err = meta.get("err") if isinstance(meta, dict) else None
            if err is None and isinstance(meta, dict) and meta.get("src"):
                key = SOURCE_BACKUP
            elif err is None and refs is not None:
                ident = self._partition_of(meta)
                err = self._admit(ident, frame.arrival_ms)
                key = ident if err is None and ident is not None else ""
            else:
                key = ""
            if err is not None:
                key = err["t"]
                record = error_record_line(record, err)
            buf = self._buffer_for(key)
            # The cursor moves with every record, before any await: a seal that fails here is
            # retried from this record, and records already buffered are not buffered again.
            self._cursor = seq
            if buf.count and buf.nbytes + len(record) > size_limit:
                await self._seal(key, reason="size")
                buf = self._buffer_for(key)
            if isinstance(key, tuple):
                self._ranges_held -= len(buf.bounds)
                buf.add(seq, record, frame.arrival_ms)
                self._ranges_held += len(buf.bounds)
                if not buf.spilled:
                    self._memory_held += len(record)
            else:
                buf.add(seq, record, frame.arrival_ms)
            self._cursor = seq + 1
            if buf.nbytes >= size_limit:  # full (or one record over the limit): out now, as _pump does
                await self._seal(key, reason="size")
            elif isinstance(key, tuple) and self._over_budget():
                await self._enforce_budget()
            if not self._room():
                self._cursor = seq + 1
                if self._cursor >= frame.end_seq:
                    self.out.release_cache(first)
                return False
        self._cursor = frame.end_seq
        self.out.release_cache(first)
        return True

    # ------------------------------------------------------------------ dynamic partitioning
    def _partition_of(self, meta: Any) -> tuple[str, ...] | None:
        """A record's partition: its values for the keys the Prefix uses, or None if one is missing."""
        assert self._refs is not None
        pk = meta.get("pk") if isinstance(meta, dict) else None
        if not isinstance(pk, dict):
            return None
        values = []
        for ref in self._refs:
            v = pk.get(ref)
            if v is None:
                v = pk.get(ref.partition(":")[2])  # outcomes recorded before keys were namespaced
                if v is None:
                    return None
            values.append(v)
        return tuple(values)

    def _admit(self, ident: tuple[str, ...] | None, arrival_ms: int) -> dict[str, Any] | None:
        """None if a record of partition ``ident`` may be buffered (creating the partition's
        buffer), else the error that archives it: a missing key, a prefix that cannot be
        evaluated, or the active-partition guard."""
        if ident is not None and ident in self._partitions:
            return None
        err = self._partition_error(ident, arrival_ms, admitting=True)
        if err is None:
            assert ident is not None
            self._partitions[ident] = _OpenBuffer()
            self._active[ident] = self._active.get(ident, 0) + 1
            self.metrics.partition_count_exceeded.labels(self.name).set(0)
        return err

    def _partition_error(self, ident: tuple[str, ...] | None, arrival_ms: int, *, admitting: bool) -> dict[str, Any] | None:
        """Why a record of partition ``ident`` cannot be delivered under the Prefix (None if it can).
        Also used to rebuild the error record of an archived batch read back from the spool."""
        from firehose.destinations.keys import PrefixError
        from firehose.transforms.records import ACTIVE_PARTITION_EXCEEDED, PARTITIONING_FAILED

        assert self._refs is not None and self.destination is not None
        base = {"a": 1, "ts": arrival_ms, "e": self.clock.now_ms()}
        if ident is None:
            missing = ", ".join(self._refs)
            return {**base, "t": PARTITIONING_FAILED, "c": "DynamicPartitioning.PartitionKeyMissing",
                    "m": f"the record has no value for a partition key the prefix uses ({missing})"}
        try:
            when = datetime.fromtimestamp(arrival_ms / 1000.0, tz=UTC)
            self.destination.batch_key(when, random.Random(0), dict(zip(self._refs, ident, strict=True)))  # type: ignore[call-arg]
        except PrefixError as exc:
            return {**base, "t": PARTITIONING_FAILED, "c": "DynamicPartitioning.PrefixEvaluationFailed", "m": str(exc)}
        assert self.config.dynamic_partitioning is not None
        limit = self.config.dynamic_partitioning.max_active_partitions
        if not admitting or (ident not in self._active and len(self._active) >= limit):
            self.metrics.partition_count_exceeded.labels(self.name).set(1)
            self.metrics.partition_exceeded_records.labels(self.name).inc()
            return {**base, "t": ACTIVE_PARTITION_EXCEEDED, "c": "DynamicPartitioning.ActivePartitionsLimitExceeded",
                    "m": f"the stream has {len(self._active)} active partitions, the limit "
                         f"(dynamic_partitioning.max_active_partitions) is {limit}"}
        return None

    def _bookkeeping_bytes(self) -> int:
        """What open partitions cost besides their records: ranges and buffers."""
        return RANGE_BYTES * self._ranges_held + PARTITION_BYTES * len(self._partitions)

    def _over_budget(self) -> bool:
        return self._memory_held + self._bookkeeping_bytes() > self._budget

    async def _enforce_budget(self) -> None:
        """Keep open partitions within the memory budget: first keep the largest buffers on disk
        only (their records are read back from the spool at delivery), and if bookkeeping alone
        is still too large, seal the buffers holding the most ranges early."""
        budget = self._budget
        book = self._bookkeeping_bytes()
        if self._memory_held and self._memory_held + book > budget:
            target = max(0, budget // 2 - book)
            for buf in sorted(self._partitions.values(), key=lambda b: b.memory_bytes, reverse=True):
                if self._memory_held <= target or not buf.memory_bytes:
                    break
                self._memory_held -= buf.spill()
                self.metrics.partition_spills.labels(self.name).inc()
        book = self._bookkeeping_bytes()
        if book > budget // 2:
            order = sorted(self._partitions.items(), key=lambda kv: len(kv[1].bounds), reverse=True)
            flush = []
            for ident, buf in order:
                if book <= budget // 4:
                    break
                flush.append(ident)
                book -= RANGE_BYTES * len(buf.bounds) + PARTITION_BYTES
            await self._seal_many(flush, "memory")

    def _buffer_for(self, key: str | tuple[str, ...], *, create: bool = True) -> _OpenBuffer:
        """The open buffer for ``key``: "" the main buffer, a string an archive buffer, a tuple a
        partition. Without ``create`` a missing one is returned as an empty stand-in."""
        if not key:
            return self._buffer
        if isinstance(key, tuple):
            buf = self._partitions.get(key)
            if buf is None:
                buf = _OpenBuffer()
                if create:
                    self._partitions[key] = buf
                    self._active[key] = self._active.get(key, 0) + 1
            return buf
        if create:
            return self._archive_buffers.setdefault(key, _OpenBuffer())
        return self._archive_buffers.get(key) or _OpenBuffer()

    def _forget_buffer(self, key: str | tuple[str, ...], buf: _OpenBuffer) -> None:
        if isinstance(key, tuple):
            del self._partitions[key]
            self._memory_held -= buf.memory_bytes
            self._ranges_held -= len(buf.bounds)
            self._release_partition(key)
        elif key:
            self._archive_buffers[key] = _OpenBuffer()
        else:
            self._buffer = _OpenBuffer()

    def _release_partition(self, ident: tuple[str, ...]) -> None:
        n = self._active.get(ident, 0) - 1
        if n > 0:
            self._active[ident] = n
        else:
            self._active.pop(ident, None)

    def _finish(self, pending: _Pending) -> None:
        """A batch is done (delivered, or archived): forget it."""
        self._pending.remove(pending)
        if self._oldest_pending is not None and pending.sealed.oldest_arrival_ms <= self._oldest_pending[1]:
            self._oldest_pending = None  # it was (one of) the oldest: look again
        if pending.partition is not None:
            self._release_partition(pending.partition)

    async def _seal_many(self, keys: list[tuple[str, ...]], reason: str) -> None:
        """Seal several partition buffers with one fsync; none is delivered before it."""
        try:
            for key in keys:
                await self._seal(key, reason=reason, sync=False)
        finally:
            await self.out.wait_durable(force=True)
            for p in self._pending:
                p.durable = True
            self._dispatch()

    async def _seal(self, buffer_key: str | tuple[str, ...] = "", reason: str | None = None, *, sync: bool = True) -> None:
        buf = self._buffer_for(buffer_key, create=False)
        if not buf.count:
            return
        assert self.destination is not None and self.archive is not None
        oldest = datetime.fromtimestamp(buf.oldest_ms / 1000.0, tz=UTC)
        info: dict[str, Any] = {"records": buf.count, "bytes": buf.nbytes}
        partition: tuple[str, ...] | None = None
        records: list[bytes] | None = None if buf.spilled else buf.records
        if buffer_key == SOURCE_BACKUP:
            key = self.archive.batch_key(oldest, self.rng)
            info.update({"sink": "source"})
        elif isinstance(buffer_key, tuple):
            from firehose.destinations.keys import PrefixError

            assert self._refs is not None
            try:
                key = self.destination.batch_key(oldest, self.rng, dict(zip(self._refs, buffer_key, strict=True)))  # type: ignore[call-arg]
                partition = buffer_key
                info["p"] = list(buffer_key)
            except PrefixError:  # cannot happen for an admitted partition; archive, never drop
                key = self.archive.archive_key(oldest, self.rng, "partitioning-failed")  # type: ignore[attr-defined]
                info.update({"sink": "archive", "type": "partitioning-failed", "p": list(buffer_key)})
                records = None  # error records are rebuilt from the spool at delivery
            self.metrics.partition_flushes.labels(self.name, reason or "size").inc()
        elif buffer_key:
            key = self.archive.archive_key(oldest, self.rng, buffer_key)  # type: ignore[attr-defined]
            info.update({"sink": "archive", "type": buffer_key})
        else:
            key = self.destination.batch_key(oldest, self.rng)
        if info.get("sink", "main") == "main":
            converter = getattr(self.chain, "converter", None)
            if converter is not None:
                info["fmt"] = converter.fingerprint  # the schema its records were checked against
        ranges = buf.ranges
        sealed = SealedBatch(self.out.allocate_batch_id(), key, ranges, buf.oldest_ms, info)
        pending = _Pending(sealed, records, partition=partition, durable=sync)
        if partition is not None:
            self._active[partition] = self._active.get(partition, 0) + 1
        # The buffer is forgotten only once its seal is written; a failed write leaves it to be
        # sealed again. (A seal written but not yet fsynced is never re-sealed: it is in _pending.)
        written = False
        try:
            await self.out.append_seal(sealed, durable=sync)
            written = True
        finally:
            if written or self.out.sealed.covers(ranges[0][0], ranges[0][1]):
                self._forget_buffer(buffer_key, buf)
                self._pending.append(pending)
            elif partition is not None:
                self._release_partition(partition)
        self.log.debug("batch_sealed", batch_id=sealed.batch_id, key=key, records=buf.count, reason=reason)
        if sync:
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
        from firehose.transforms.records import SourceRecord

        sources = [
            SourceRecord(str(seq), data, arrival, meta.get("kinesis") if isinstance(meta, dict) else None)
            for seq, data, arrival, meta in pending
        ]
        task = asyncio.get_running_loop().create_task(self._run_chain(pending, sources))
        await queue.put((pending, sources, task))

    async def _run_chain(self, pending: list[tuple[int, bytes, int, Any]], sources: list[Any]) -> list[Any]:
        t0 = time.monotonic()
        # A record its source already failed (a KPL aggregate that does not verify) skips the chain.
        failed = {i: m["err"] for i, (_, _, _, m) in enumerate(pending) if isinstance(m, dict) and "err" in m}
        if not failed:
            outcomes = list(await self.chain.process(sources))
        else:
            from firehose.transforms.records import Outcome

            keep = [i for i in range(len(sources)) if i not in failed]
            outcomes = list(await self.chain.process([sources[i] for i in keep])) if keep else []
            for o in outcomes:
                o.source = keep[o.source]
            outcomes += [Outcome(i, sources[i].data).failed(e["c"], e["m"], e["t"]) for i, e in failed.items()]
            outcomes.sort(key=lambda o: o.source)  # stable: a record's outcomes keep their order
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
                    task = asyncio.get_running_loop().create_task(self._run_chain(pending, sources))
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
                if o.partition_keys is None and o.query_keys is None:
                    metas.append(None)
                    continue
                # Namespaced, so a query key and a Lambda key of the same name stay apart.
                pk = {}
                if o.query_keys:
                    for name, value in o.query_keys.items():
                        pk["partitionKeyFromQuery:" + name] = value
                if o.partition_keys:
                    for name, value in o.partition_keys.items():
                        pk["partitionKeyFromLambda:" + name] = value
                metas.append({"pk": pk})
            else:
                err = {
                    "c": o.error_code, "m": o.error_message, "t": o.error_output_type, "a": o.attempts,
                    "ts": pending[o.source][2], "e": now, "l": chain.lambda_arn,
                }
                source_meta = pending[o.source][3]
                if isinstance(source_meta, dict) and "kinesis" in source_meta:  # a KDS source's record
                    err["sequenceNumber"] = source_meta["kinesis"].get("sequenceNumber")
                    err["subSequenceNumber"] = source_meta["kinesis"].get("subsequenceNumber")
                metas.append({"err": err})
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
            if pending.task is None and pending.durable:
                self._in_flight += 1
                pending.task = loop.create_task(self._deliver(pending), name=f"deliver-{self.name}")
                self._delivering.add(pending.task)
                pending.task.add_done_callback(self._delivering.discard)

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
                    main = pending.sealed.info.get("sink", "main") == "main"
                    self._health_of(self.destination if main else self.archive).failed(
                        "Daemon.DeliveryFailed", f"{type(exc).__name__}: {exc}", self.clock.now_ms())
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
            if not archive:
                # The frame index is read here, on the loop (trimming shifts it); only reads go to a thread.
                records = await asyncio.to_thread(spool.read_planned, spool.plan_records(sealed.ranges))
            else:
                # On the loop: frame lookups must not race the trimming of the index (this path is
                # rare: archive batches are read back only after a restart).
                records, metas = spool.read_ranges(sealed.ranges)
                records = [
                    error_record_line(r, m["err"] if isinstance(m, dict) and "err" in m else self._routing_error(m, sealed))
                    for r, m in zip(records, metas or [None] * len(records), strict=True)
                ]
        if sink == "main":
            records = await self._recheck_schema(sealed, records)
            if not records:  # every record was archived: no empty file
                spool.append_commit(sealed.batch_id, {"attempts": 0})
                self._finish(pending)
                return
        todo = list(range(len(records)))
        attempt = 0
        d = self.config.delivery
        labels = self.name
        # Dynamic partitioning's RetryOptions: how long one prefix is retried before its records
        # are archived (delivery-failed). A destination with a retry window of its own (OpenSearch,
        # Splunk, HTTP endpoint) starts it at the first failed attempt, as Firehose does, and
        # archives under its error-output type. Without either, delivery retries without limit.
        expires: float | None = None
        expire_type = DELIVERY_FAILED
        window = destination.retry_duration_secs if sink == "main" else None
        if sink == "main" and pending.partition is not None and self.config.dynamic_partitioning is not None:
            expires = self.clock.monotonic() + self.config.dynamic_partitioning.retry_duration_secs
        elif window is not None and destination.error_output_type:
            expire_type = destination.error_output_type
        rejected_type = destination.error_output_type if sink == "main" else None
        expired = 0
        while True:
            attempt += 1
            subset = records if len(todo) == len(records) else [records[i] for i in todo]
            batch = Batch(self.name, sealed.batch_id, sealed.key, subset, sealed.oldest_arrival_ms, attempt)
            if len(todo) != len(records):
                batch.indices = todo
            if sink == "main" and self.chain is not None:
                batch.delimiter = self.chain.delimiter
            batch.archive = sink != "main"
            self.metrics.delivery_attempts.labels(labels).inc()
            result = await destination.deliver(batch)
            delivered = len(todo) - len(result.failures)
            nbytes = sum(map(len, subset)) - sum(len(subset[i]) for i in result.failures) if delivered else 0
            if delivered:
                self.metrics.delivery_records.labels(labels).inc(delivered)
                self.metrics.delivery_bytes.labels(labels).inc(nbytes)
            if sink == "main" and destination.metrics_prefix is not None:
                self.metrics.destination(destination.metrics_prefix).attempt(labels, delivered, nbytes, result.ok)
            health = self._health_of(destination)
            if result.ok:
                health.succeeded()
                self.metrics.delivery_success.labels(labels).set(1)
                self.metrics.delivery_objects.labels(labels).inc()
                break
            self.metrics.delivery_success.labels(labels).set(0)
            self.metrics.delivery_failures.labels(labels).inc()
            first = next(iter(result.failures.values()))
            health.failed(first.error_code, first.error_message, self.clock.now_ms())
            if rejected_type is not None:
                # Records the destination refuses for good (a mapping error) are archived at once;
                # without an error-output type they are retried: never dropped silently.
                rejected = sorted(i for i, f in result.failures.items() if not f.retryable)
                if rejected:
                    items = [(todo[i], result.failures[i]) for i in rejected]
                    await self._archive_failed(sealed, rejected_type, records, items, attempt)
                    expired += len(rejected)
                    if len(rejected) == len(result.failures):
                        # The destination answered: records it refuses are no outage of it.
                        health.succeeded()
                        self.metrics.delivery_success.labels(labels).set(1)
                        break
                    first = next(f for f in result.failures.values() if f.retryable)
                    result.failures = {i: f for i, f in result.failures.items() if f.retryable}
            if window is not None and expires is None:
                expires = self.clock.monotonic() + window
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
            if expires is not None and self.clock.monotonic() + delay >= expires:
                now = self.clock.now_ms()
                if expire_type == DELIVERY_FAILED:
                    err = {"c": first.error_code, "m": first.error_message, "t": DELIVERY_FAILED, "a": attempt,
                           "ts": sealed.oldest_arrival_ms, "e": now}
                    await self._archive_lines(sealed, DELIVERY_FAILED, [error_record_line(records[i], err) for i in todo])
                else:
                    failed = [result.failures[i] for i in sorted(result.failures)]
                    await self._archive_failed(sealed, expire_type, records, list(zip(todo, failed, strict=True)), attempt)
                expired += len(todo)
                self.log.warning("delivery_retry_expired" if window is not None else "partition_retry_expired",
                                 batch_id=sealed.batch_id, key=sealed.key, archived_records=len(todo),
                                 error_code=first.error_code)
                break
            await asyncio.sleep(delay)
        spool.append_commit(sealed.batch_id, {"attempts": attempt})
        if archive:
            self.archived_records += len(records)
            self.metrics.archived_records.labels(self.name).inc(len(records))
        elif sink == "source":
            self.backed_up_records += len(records)
        else:
            self.delivered_records += len(records) - expired
        self.log.info(
            "batch_delivered",
            batch_id=sealed.batch_id,
            key=sealed.key,
            records=len(records),
            attempts=attempt,
        )
        self._finish(pending)

    def _routing_error(self, meta: Any, sealed: SealedBatch) -> dict[str, Any]:
        """The error of a record the batcher archived (not its transform): rebuilt when its
        archive batch is read back from the spool after a restart."""
        if self._refs is not None:
            err = self._partition_error(self._partition_of(meta), sealed.oldest_arrival_ms, admitting=False)
            if err is not None:
                return err
        # Dynamic partitioning was turned off since: the batch's type is all that is known.
        return {"t": sealed.info.get("type", "partitioning-failed"), "c": "DynamicPartitioning.Failed",
                "m": "archived by dynamic partitioning", "a": 1, "ts": sealed.oldest_arrival_ms,
                "e": self.clock.now_ms()}

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
        now = self.clock.now_ms()
        lines = []
        for i in bad:
            code, message = verdicts[i]  # type: ignore[misc]
            err = {"c": code, "m": message, "t": "format-conversion-failed", "a": 1,
                   "ts": sealed.oldest_arrival_ms, "e": now}
            lines.append(error_record_line(records[i], err))
        await self._archive_lines(sealed, "format-conversion-failed", lines)
        keep = set(range(len(records))) - set(bad)
        return [r for i, r in enumerate(records) if i in keep]

    async def _archive_failed(
        self, sealed: SealedBatch, error_output_type: str, records: list[bytes],
        items: list[tuple[int, RecordFailure]], attempt: int,
    ) -> None:
        """Archive records a destination failed: ``items`` are (position in the sealed batch, its
        failure), each failure in its own error record."""
        now = self.clock.now_ms()
        lines = []
        for pos, f in items:
            err = {"c": f.error_code, "m": f.error_message, "t": error_output_type, "a": attempt,
                   "ts": sealed.oldest_arrival_ms, "e": now, "x": f.fields}
            lines.append(error_record_line(records[pos], err))
        await self._archive_lines(sealed, error_output_type, lines, [pos for pos, _ in items])

    async def _archive_lines(
        self, sealed: SealedBatch, error_output_type: str, lines: list[bytes], positions: list[int] | None = None
    ) -> None:
        """Archive error records split off a sealed batch at delivery. The key derives from the
        batch identity (and which of its records, when a batch archives several times), so a
        replay overwrites it; archiving never gives up."""
        assert self.archive is not None
        oldest = datetime.fromtimestamp(sealed.oldest_arrival_ms / 1000.0, tz=UTC)
        which = "" if positions is None else f":{zlib.crc32(array('q', positions).tobytes())}:{len(positions)}"
        rng = random.Random(f"{self.name}:{sealed.batch_id}:{sealed.key}:{error_output_type}{which}")
        key = self.archive.archive_key(oldest, rng, error_output_type)  # type: ignore[attr-defined]
        batch = Batch(self.name, sealed.batch_id, key, lines, sealed.oldest_arrival_ms, archive=True)
        attempt = 0
        health = self._health_of(self.archive)
        while not (result := await self.archive.deliver(batch)).ok:
            first = next(iter(result.failures.values()))
            health.failed(first.error_code, first.error_message, self.clock.now_ms())
            attempt += 1
            self.log.warning("archive_retry_scheduled", batch_id=sealed.batch_id, key=key, attempt=attempt,
                             error_code=first.error_code)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))
        health.succeeded()
        self.archived_records += len(lines)
        self.metrics.archived_records.labels(self.name).inc(len(lines))

    # ------------------------------------------------------------------ observability
    def _update_gauges(self) -> None:
        labels = self.name
        out_bytes = self.out.size_bytes if self.out is not self.spool else 0
        self.metrics.spool_bytes.labels(labels).set(self.spool.size_bytes + out_bytes)
        backlog = self.spool.next_seq - self.spool.min_seq - len(self.spool.committed)
        self.metrics.backlog_records.labels(labels).set(max(0, backlog))
        if self._refs is not None:
            self.metrics.partition_count.labels(labels).set(len(self._active))
        oldest = self._oldest_pending_ms()
        age = 0.0 if oldest is None else max(0.0, (self.clock.now_ms() - oldest) / 1000.0)
        self.metrics.data_freshness.labels(labels).set(age)
        prefix = getattr(self.destination, "metrics_prefix", None)
        if prefix is not None:
            self.metrics.destination(prefix).freshness.labels(labels).set(age)

    def _oldest_pending_ms(self) -> int | None:
        """Arrival time of the oldest record in an undelivered batch or an open buffer (main,
        partition or archive), or None when there is none."""
        oldest: int | None = None
        if self._pending:
            # Thousands of partition batches can be pending: scan them at most once a second
            # (and again when the batch found oldest is done).
            mono = time.monotonic()
            if self._oldest_pending is None or mono - self._oldest_pending[0] >= 1.0:
                self._oldest_pending = (mono, min(p.sealed.oldest_arrival_ms for p in self._pending))
            oldest = self._oldest_pending[1]
        else:
            self._oldest_pending = None
        buffered = self._oldest_buffered()
        if buffered is not None:
            oldest = buffered if oldest is None else min(oldest, buffered)
        return oldest

    def _oldest_unbuffered_ms(self) -> int | None:
        """Arrival time of the first acknowledged record not in any buffer or batch yet (waiting
        for the processing stage, or for the batcher), or None. Records are read in sequence
        order, so it is only the oldest when nothing is buffered or pending."""
        arrivals = []
        head = self.spool.committed.next_gap(self.spool.min_seq)
        if head < self.spool.next_seq:
            arrivals.append(self._arrival_at(self.spool, head))
        if self.out is not self.spool and self._cursor < self.out.next_seq:
            arrivals.append(self._arrival_at(self.out, max(self._cursor, self.out.min_seq)))
        known = [a for a in arrivals if a is not None]
        return min(known) if known else None

    def _arrival_at(self, spool: Spool, seq: int) -> int | None:
        which = 0 if spool is self.spool else 1
        if self._backlog_head is not None and self._backlog_head[:2] == (which, seq):
            return self._backlog_head[2]
        try:
            frame = spool.frame_at(seq)  # from the cache, or one frame read from disk
        except (OSError, SpoolError):
            return None
        if frame is None:
            return None
        self._backlog_head = (which, seq, frame.arrival_ms)
        return frame.arrival_ms

    def _health_of(self, destination: Destination | None) -> DeliveryHealth:
        backup = self._health.get("backup")
        return backup if backup is not None and destination is not self.destination else self._health["destination"]

    def failing_for_secs(self) -> float | None:
        """How long the longest current run of failed delivery attempts of this stream's
        destinations has lasted, in seconds; None when the latest attempt of each succeeded."""
        since = [h.failing_since_ms for h in self._health.values() if h.failing_since_ms is not None]
        return None if not since else max(0.0, (self.clock.now_ms() - min(since)) / 1000.0)

    @property
    def fenced(self) -> bool:
        """An fsync of one of the stream's spools failed: it refuses records until a restart."""
        return self.spool.failed is not None or self.out.failed is not None

    @property
    def can_accept(self) -> bool:
        """Whether the stream takes records now: it is running, its spool is not fenced, and the
        spool has room for a maximum-size record (a quarter of its cap when that is smaller):
        nearer its cap, most requests are refused with "Slow down."."""
        need = min(MAX_RECORD_ROOM, self.spool.max_size_bytes // 4)
        return self._accepting and not self.fenced and self.has_room(need)

    def buffered_records(self) -> int:
        """Records read from the spool into open buffers and not sealed yet: the main buffer,
        every partition's buffer and the archive buffers."""
        return (self._buffer.count + sum(b.count for b in self._partitions.values())
                + sum(b.count for b in self._archive_buffers.values()))

    def status(self) -> dict[str, Any]:
        """The stream's part of ``/healthz`` (every field is documented in docs/operations.md).
        Nothing in it names a file path, a URL or a secret."""
        now = self.clock.now_ms()
        oldest = self._oldest_pending_ms()
        if oldest is None:
            oldest = self._oldest_unbuffered_ms()
        errors = [h.last_error for h in self._health.values() if h.last_error is not None]
        last = max(errors, key=lambda e: e.time_ms) if errors else None
        since = [h.failing_since_ms for h in self._health.values() if h.failing_since_ms is not None]
        return {
            "accepting_records": self.can_accept,
            "oldest_pending_age_secs": 0.0 if oldest is None else round(max(0.0, (now - oldest) / 1000.0), 3),
            "last_delivery_error": last.to_json() if last is not None else None,
            "failing_since": iso_utc(min(since)) if since else None,
            "spool_bytes": self.spool.size_bytes,
            "pending_batches": len(self._pending),
            "open_buffer_records": self.buffered_records(),
            "open_partitions": len(self._partitions),
            "active_partitions": len(self._active),
            "delivered_records": self.delivered_records,
            "dropped_records": self.dropped_records,
            "archived_records": self.archived_records,
            "backed_up_records": self.backed_up_records,
            # A stable code: the spool's own message (with its directory) is in the log.
            "spool_failed": "fsync_failed" if self.fenced else None,
        }
