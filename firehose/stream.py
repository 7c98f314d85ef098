"""One delivery stream at run time: its lifecycle, and the entry point of its sources.

``put`` appends records to the ingest spool and returns once they are durable. From there the
stages in :mod:`firehose.stages` take over, each owning its part (see that package)::

    put ──► ingest spool ──► [processing stage ──► outcome spool] ──► batcher (+ partition router)
        ──► seal (fsynced) ──► delivery runner ──► destination ──► commit
                                      └─ failed records ──► archiver ──► backup / error prefix

This class builds the stages on start, recovers the spools (sealed batches are re-sent under
their sealed key), wires the stages together, and stops them in order: sources first, then the
processing stage and the batcher, open buffers sealed, deliveries drained within the timeout.
It also answers what the API, the sources and ``/healthz`` ask of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

import structlog

from firehose.clock import Clock, SystemClock
from firehose.config import StreamConfig
from firehose.filelog import FileLogs
from firehose.interfaces import (
    BuildContext,
    ClusterPlacement,
    Destination,
    ProcessingChain,
    Source,
    format_encoder,
)
from firehose.log import INGEST, PROCESSED, Log, LogFencedError, LogFullError, LogStore, RecoveryState
from firehose.metrics import Metrics
from firehose.stages.archiver import Archiver, error_record_line
from firehose.stages.backlog import Backlog
from firehose.stages.batcher import Batcher
from firehose.stages.common import StageContext
from firehose.stages.delivery import DeliveryRunner
from firehose.stages.health import DeliveryHealth, StreamHealth, health_message, iso_utc, preflight
from firehose.stages.inline import InlineExtraction, inline_query
from firehose.stages.processing import ProcessingStage, load_chain, load_converter, resume_point
from firehose.stages.router import PartitionRouter

__all__ = ["StreamRuntime", "error_record_line", "health_message", "iso_utc", "MAX_RECORD_ROOM"]

# The room a spool needs to count as taking records in /healthz: one maximum-size record
# (Firehose's 1,000 KiB) and its frame.
MAX_RECORD_ROOM = 1_024_000 + 128


def _stage_value(stage: str, name: str, default: Any) -> Any:
    """A read-only attribute of the runtime that is a stage's (``default`` before the stage exists)."""

    def get(self: StreamRuntime) -> Any:
        owner = getattr(self, stage)
        return default if owner is None else getattr(owner, name)

    get.__doc__ = f"The {stage}'s ``{name}``."
    return property(get)


class StreamRuntime:
    """Runs one configured stream. All methods run on the daemon's event loop."""

    def __init__(self, config: StreamConfig, *, data_dir: str, version: int, region: str, account_id: str,
                 metrics: Metrics, clock: Clock | None = None, rng: random.Random | None = None,
                 logs: LogStore | None = None, placement: ClusterPlacement | None = None) -> None:
        self.config = config
        self.placement = placement  # cluster mode: this runtime is one partition of the stream
        self.name = config.name
        self.version = version
        self.region = region
        self.account_id = account_id
        self.data_dir = data_dir
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random(int.from_bytes(os.urandom(16), "big"))
        self.log = structlog.get_logger().bind(stream=self.name)
        if placement is not None:
            self.log = self.log.bind(partition=placement.partition)
        # Where the stream's logs live: the file spool under data_dir unless told otherwise.
        self.logs: LogStore = logs if logs is not None else FileLogs(data_dir, config.spool)
        self.spool: Log = self.logs.log(self.name, INGEST)
        # The log the batcher reads: the ingest log, or (with processing) the log of recorded
        # transform outcomes.
        self.out: Log = self.spool
        self.destination: Destination | None = None
        self.archive: Destination | None = None  # where failed records go (backup, or the destination)
        self.chain: ProcessingChain | None = None
        self.inline_query: str | None = None  # metadata_extraction done by the batcher (stages/inline.py)
        self.sources: list[Source] = []
        self.backup_all = False
        self.recovery: RecoveryState | None = None
        self.record_id_prefix = os.urandom(12).hex()
        self.stage_context = StageContext(self.name, self.clock, metrics, self.log, rng=self.rng)
        self.signals = self.stage_context.signals
        self.health = StreamHealth()
        # The stages, built by start() (see firehose/stages/).
        self.processing: ProcessingStage | None = None
        self.router: PartitionRouter | None = None
        self.archiver: Archiver | None = None
        self.runner: DeliveryRunner | None = None
        self.batcher: Batcher | None = None
        self.backlog: Backlog | None = None
        self._accepting = False
        self._preflight_task: asyncio.Task[None] | None = None
        # Bound metric children once: labels() takes a lock and a dict lookup per call.
        self._m_in_records = metrics.incoming_records.labels(self.name)
        self._m_in_bytes = metrics.incoming_bytes.labels(self.name)
        self._m_in_requests = metrics.incoming_put_requests.labels(self.name)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> RecoveryState:
        """Recover the spool, build the destinations and the stages, start batching and delivery."""
        self.recovery = await self.spool.open()
        ctx = BuildContext(self.name, self.version, self.region, self.account_id, self.data_dir, self.log,
                           cluster=self.placement)
        await self._open_destinations(ctx)
        self.backup_all = self.config.backup is not None and self.config.backup.mode == "all"
        converter = await load_converter(self.config.format)
        if converter is not None:
            format_encoder(self.destination).set_converter(converter)
        proc_cursor, recovery = await self._open_processing(converter)
        self._wire()
        self._recover(recovery)
        if self.processing is not None and proc_cursor is not None:
            self.processing.start(proc_cursor)
        self.log.info("stream_recovered", pending_batches=len(self.recovery.pending),
                      unsealed_records=self.recovery.unsealed_records,
                      truncated_bytes=self.recovery.truncated_bytes, spool_bytes=self.spool.size_bytes)
        self._accepting = True
        assert self.batcher is not None and self.runner is not None
        self.batcher.start(self.out.min_seq)
        self.runner.dispatch()
        self.signals.batcher.set()
        self.metrics.add_refresher(self.update_gauges)
        for source_config in self.config.sources:
            if self.placement is not None and getattr(source_config, "cluster_placement", None) != "partition":
                continue  # a per-daemon source: the cluster runs it once, over every owned partition
            source = source_config.build(ctx, self)
            await source.start()
            self.sources.append(source)
        return self.recovery

    async def _open_destinations(self, ctx: BuildContext) -> None:
        """Build and start the destination and, with ``backup:``, the backup (the archive)."""
        self.destination = self.config.destination.build(ctx)
        await self.destination.start()
        self.archive = self.destination
        checks = [("destination", self.config.destination.type, self.destination)]
        if self.config.backup is not None:
            from firehose.registry import destination_config_class

            dest = self.config.backup.destination_dict()
            self.archive = destination_config_class(dest["type"]).model_validate(dest).build(ctx)
            await self.archive.start()
            self.health.backup = DeliveryHealth("backup")
            checks.append(("backup", str(dest["type"]), self.archive))
        # Checked in the background: start never waits for it, nor fails by it.
        self._preflight_task = asyncio.get_running_loop().create_task(
            preflight(checks, self.log), name=f"preflight-{self.name}"
        )

    async def _open_processing(self, converter: Any) -> tuple[int | None, RecoveryState]:
        """Start the chain and open the outcome spool when the stream processes records. Returns
        where processing resumes (None: no processing stage) and the recovery of the spool the
        batcher reads."""
        assert self.recovery is not None
        # A processed spool left by an earlier config keeps the stage on (an empty chain passes
        # records through) so its recorded outcomes are not stranded when processing is turned off.
        # Source-record backup rides the stage too: the untransformed records are recorded beside
        # the outcomes, so the copy is exactly-once.
        leftover = self.logs.exists(self.name, PROCESSED)
        if self.config.processing or self.backup_all or converter is not None or leftover:
            self.chain = await load_chain(self.config, region=self.region, account_id=self.account_id,
                                          converter=converter)
        assert self.destination is not None
        self.inline_query = inline_query(self.config, backup_all=self.backup_all, converter=converter,
                                         leftover=leftover, reads_record_metadata=self.destination.reads_record_metadata)
        if self.inline_query is not None or self.chain is None or not (
                self.chain.enabled or self.backup_all or leftover):
            return None, self.recovery
        # The batcher reads outcomes right after they are recorded: a small cache serves that.
        self.out = self.logs.log(self.name, PROCESSED, cache_bytes=16 << 20)
        recovery = await self.out.open()
        raw_end = int(self.out.positions.get("raw_end", 0))
        cursor = await resume_point(self.spool, raw_end, name=self.out.name)
        return cursor, recovery

    def _wire(self) -> None:
        """Build the stages and connect them (who wakes whom, who releases what)."""
        assert self.destination is not None and self.archive is not None
        ctx = self.stage_context
        self.archiver = Archiver(ctx, self.archive, self.health.archive)
        self.router = PartitionRouter.for_stream(ctx, self.config, self.destination)
        inline = InlineExtraction(ctx, self.inline_query) if self.inline_query is not None else None
        self.router.inline = inline
        converter = self.chain.converter if self.chain is not None else None
        self.runner = DeliveryRunner(
            ctx, self.config, self.out, self.destination, self.archiver, self.health.main, converter=converter,
            delimiter=self.chain.delimiter if self.chain is not None else None,
            routing_error=self.router.routing_error, release_partition=self.router.release,
        )
        self.batcher = Batcher(ctx, self.config, self.out, self.destination, self.archive, self.router,
                               self.runner, converter=converter, inline=inline)
        if self.out is not self.spool:  # an outcome log is opened only with a chain
            assert self.chain is not None
            self.processing = ProcessingStage(ctx, self.chain, self.spool, self.out,
                                              cap_bytes=self.spool.max_size_bytes, backup_all=self.backup_all)
        self.backlog = Backlog(ctx, self.spool, self.out, self.runner, self.batcher, self.router, self.destination)

    def _recover(self, recovery: RecoveryState) -> None:
        """Hand the sealed but uncommitted batches to the delivery runner: re-sent under their key."""
        assert self.recovery is not None and self.runner is not None and self.router is not None
        if self.out is not self.spool:  # batches sealed in the ingest spool before processing was on
            self.runner.resume(self.recovery.pending, spool=self.spool)
        for pending in self.runner.resume(recovery.pending):
            if pending.partition is not None:
                self.router.count_batch(pending.partition)  # undelivered batches count as active

    async def stop(self, timeout: float) -> bool:
        """Stop accepting, seal the open buffers, deliver within ``timeout`` seconds. What is not
        delivered by then stays in the spool (sealed batches keep their keys). Returns True when
        everything sealed was delivered. Also closes what a failed start had opened."""
        deadline = time.monotonic() + timeout
        if self._preflight_task is not None:
            self._preflight_task.cancel()
            await asyncio.gather(self._preflight_task, return_exceptions=True)
        for source in self.sources:  # first, so what they acknowledged is all in the spool
            await source.stop()
        self._accepting = False
        self.signals.stopping = True
        if self.processing is not None:
            await self.processing.cancel()
        if self.batcher is not None:
            await self.batcher.cancel()
            await self.batcher.seal_all(deadline)
        clean = await self.runner.drain(deadline) if self.runner is not None else True
        if self.router is not None and self.router.inline is not None:
            await self.router.inline.aclose()  # its worker process, if one started
        self.metrics.remove_refresher(self.update_gauges)
        with contextlib.suppress(Exception):  # the final state stays exported, read before the logs close
            self.update_gauges()
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

    # ------------------------------------------------------------------ ingest (the sources' sink)
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

        Raises :class:`LogFullError` (nothing written) when the spool is at its cap."""
        if not self._accepting:
            raise LogFullError(f"stream {self.name} is not accepting records")
        arrival = self.clock.now_ms() if arrival_ms is None else arrival_ms
        if nbytes is None:
            nbytes = sum(map(len, records))
        # Woken before the append too: the file log makes records readable before its fsync,
        # so the stages read them while it runs.
        self.signals.wake()
        first = await self.spool.append(records, arrival, nbytes=nbytes, meta=meta, positions=positions)
        self.signals.wake()
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

    def wake(self) -> None:
        """Have the stages look at the clock again now (interval seals, processing buffers): what
        a test that moved its ManualClock calls; records and deliveries wake them by themselves."""
        self.signals.wake()

    # ------------------------------------------------------------------ counts (kept by the stages)
    delivered_records = _stage_value("runner", "delivered_records", 0)
    backed_up_records = _stage_value("runner", "backed_up_records", 0)
    archived_records = _stage_value("archiver", "archived_records", 0)
    dropped_records = _stage_value("processing", "dropped_records", 0)

    open_partitions = _stage_value("router", "open_partitions", 0)
    active_partitions = _stage_value("router", "active_partitions", 0)

    def buffered_records(self) -> int:
        """Records in open buffers, not sealed yet: main, partitions' and archive buffers."""
        return self.batcher.buffered_records if self.batcher is not None else 0

    # Names that tests/support.py's abandon() (a kill -9 in process) and bench/ reach for.
    _pending = _stage_value("runner", "pending", ())
    _loop_task = _stage_value("batcher", "task", None)
    _proc_task = _stage_value("processing", "task", None)
    _cursor = _stage_value("batcher", "cursor", 0)
    _recorded_upto = _stage_value("processing", "recorded_upto", 0)

    @property
    def _stopping(self) -> bool:
        return self.signals.stopping

    @_stopping.setter
    def _stopping(self, value: bool) -> None:
        self.signals.stopping = value

    # ------------------------------------------------------------------ observability
    def backlog_records(self) -> int:
        """Acknowledged records not yet delivered (nor archived, nor dropped)."""
        ingest = self.spool
        return max(0, ingest.next_seq - ingest.min_seq - len(ingest.committed))

    def update_gauges(self) -> None:
        if self.backlog is not None:
            self.backlog.update_gauges()

    def failing_for_secs(self) -> float | None:
        """How long the longest current run of failed delivery attempts of this stream's
        destinations has lasted, in seconds; None when the latest attempt of each succeeded."""
        return self.health.failing_for_secs(self.clock.now_ms())

    @property
    def fenced(self) -> bool:
        """One of the stream's logs failed (an fsync failed, or another writer took it): it
        refuses records until a restart."""
        return self.spool.failed is not None or self.out.failed is not None

    def _failure_code(self) -> str | None:
        error = self.spool.failed or self.out.failed
        if error is None:
            return None
        return "fenced" if isinstance(error, LogFencedError) else "fsync_failed"

    @property
    def can_accept(self) -> bool:
        """Whether the stream takes records now: it is running, its spool is not fenced, and the
        spool has room for a maximum-size record (a quarter of its cap when that is smaller):
        nearer its cap, most requests are refused with "Slow down."."""
        need = min(MAX_RECORD_ROOM, self.spool.max_size_bytes // 4)
        return self._accepting and not self.fenced and self.has_room(need)

    def status(self) -> dict[str, Any]:
        """The stream's part of ``/healthz`` (every field is documented in docs/operations.md).
        Nothing in it names a file path, a URL or a secret."""
        now = self.clock.now_ms()
        oldest = self.backlog.oldest_ms() if self.backlog is not None else None
        last = self.health.last_error()
        since = self.health.failing_since_ms()
        return {
            "accepting_records": self.can_accept,
            "oldest_pending_age_secs": 0.0 if oldest is None else round(max(0.0, (now - oldest) / 1000.0), 3),
            "last_delivery_error": last.to_json() if last is not None else None,
            "failing_since": iso_utc(since) if since is not None else None,
            "spool_bytes": self.spool.size_bytes,
            "backlog_records": self.backlog_records(),
            "pending_batches": len(self._pending),
            "open_buffer_records": self.buffered_records(),
            "open_partitions": self.open_partitions,
            "active_partitions": self.active_partitions,
            "delivered_records": self.delivered_records,
            "dropped_records": self.dropped_records,
            "archived_records": self.archived_records,
            "backed_up_records": self.backed_up_records,
            # A stable code: the spool's own message (with its directory) is in the log.
            "spool_failed": self._failure_code(),
        }
