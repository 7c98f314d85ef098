"""The delivery runner: sealed batches to their destination, retried until done.

Owns: the sealed batches not yet finished, in seal order (``pending``); which of them are in
flight (at most ``delivery.max_in_flight``); retries with exponential backoff and full jitter;
retry windows (dynamic partitioning's ``retry_duration_secs`` for a partition's batch, or a
destination's own ``retry_duration_secs``), after which what is left is archived; records a
destination rejects for good (archived at once); committing a batch once it is finished; the
counts of delivered and backed-up records.

One delivery is four steps: *load* the records (from the sealed batch, else read back from the
log; a batch sealed under another schema is checked again), *attempt* (one ``deliver`` call),
*classify* the result (done; rejected records archived; the rest retried or, past the window,
archived), *commit* (``commit``, then the batch is forgotten). Nothing is dropped: a
record ends delivered or archived.

Calls: the :class:`Log` (``read_records``, ``read_ranges``, ``commit``),
the destinations' ``deliver``, the :class:`Archiver`, and callbacks the runtime wires:
``routing_error`` (the partition router's error for a record it archived, when its archive batch
is read back after a restart) and ``release_partition``; it wakes the other stages when a
delivery ends (there may be room now).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from firehose.config import StreamConfig
from firehose.interfaces import Batch, DeliveryResult, Destination, RecordFailure
from firehose.log import Log, SealedBatch
from firehose.packed import records_nbytes
from firehose.records import ErrorInfo, RecordMeta
from firehose.retry import jittered_backoff, local_failure_pause
from firehose.stages.archiver import Archiver, error_record_line
from firehose.stages.common import PendingBatch, StageContext, log_failure
from firehose.stages.health import DeliveryHealth

# The error-output type of records whose partition could not be delivered within
# dynamic_partitioning.retry_duration_secs (Firehose's own string for this is not documented).
DELIVERY_FAILED = "delivery-failed"


@dataclass
class _Run:
    """One batch's delivery: what is left to send and how long it may still be retried."""

    sealed: SealedBatch
    sink: str  # "main", "archive" (error records) or "source" (source-record backup)
    destination: Destination
    records: Sequence[bytes]
    todo: list[int]  # positions in the sealed batch not delivered yet
    window: float | None  # the destination's own retry window (main batches only)
    expires: float | None  # monotonic time after which what is left is archived
    expire_type: str  # ... under this error-output type
    rejected_type: str | None  # records refused for good are archived at once under it
    attempt: int = 0
    expired: int = 0  # records archived instead of delivered
    metas: list[Any] | None = None  # each record's metadata, for a destination that reads it


class DeliveryRunner:
    """Delivers one stream's sealed batches. All methods run on the stream's event loop."""

    def __init__(
        self, ctx: StageContext, config: StreamConfig, out: Log, destination: Destination, archiver: Archiver,
        health: DeliveryHealth, *, converter: Any = None, delimiter: bytes | None = None,
        routing_error: Callable[[Any, SealedBatch, bytes], dict[str, Any]] | None = None,
        release_partition: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.name, self.clock, self.metrics, self.log = ctx.name, ctx.clock, ctx.metrics, ctx.log
        self.signals, self.rng = ctx.signals, ctx.rng
        self.delivery = config.delivery
        self.dynamic_partitioning = config.dynamic_partitioning
        # Source copies recorded while backup: {mode: all} was on have nowhere to go once the
        # stream has no backup: they are dropped (counted), never written to the destination.
        self.has_backup = config.backup is not None
        self.dropped_source_copies = 0
        self.out = out
        self.destination = destination
        self.archiver = archiver
        self.health = health
        self.converter = converter
        self.delimiter = delimiter
        self.routing_error = routing_error
        self.release_partition = release_partition
        self.pending: deque[PendingBatch] = deque()
        self.delivered_records = 0
        self.backed_up_records = 0
        self._in_flight = 0
        self._delivering: set[asyncio.Task[None]] = set()
        # An ordered destination's main batches enter deliver() in dispatch order: each waits for
        # the future of the one dispatched before it (set when that one entered deliver()).
        self._turn_tail: asyncio.Future[None] | None = None
        self._oldest: tuple[float, int] | None = None  # (when computed, oldest arrival)

    # ------------------------------------------------------------------ the queue
    def add(self, pending: PendingBatch) -> None:
        """A batch was sealed (or recovered): deliver it once its seal is durable."""
        self.pending.append(pending)

    def resume(self, batches: Iterable[SealedBatch], spool: Log | None = None) -> list[PendingBatch]:
        """Batches sealed before a restart and not committed, to be re-sent under their sealed
        key; ``spool``: the log they were sealed in, when it is not the runner's own (the ingest
        log, for batches sealed before processing was turned on). A main batch sealed in the
        runner's log for a partition (``info.p``) counts for that partition."""
        added = []
        for sealed in batches:
            p = sealed.info.get("p")
            main = spool is None and sealed.info.get("sink", "main") == "main"
            partition = tuple(p) if main and isinstance(p, list) else None
            pending = PendingBatch(sealed, None, spool=spool, partition=partition)
            self.pending.append(pending)
            added.append(pending)
        return added

    def has_room(self) -> bool:
        """Whether the batcher may seal another batch (``max_in_flight + 1`` are held at most)."""
        return len(self.pending) <= self.delivery.max_in_flight

    def not_durable(self) -> list[PendingBatch]:
        """Batches whose seal was written by a call that did not finish: held back until a later
        seal makes them durable."""
        return [p for p in self.pending if not p.durable]

    def mark_durable(self, batches: Iterable[PendingBatch]) -> None:
        """These batches' seals are durable (the log's ``seal`` returned): they may go."""
        for p in batches:
            p.durable = True

    def dispatch(self) -> None:
        """Start deliveries, oldest first, up to ``max_in_flight``."""
        loop = asyncio.get_running_loop()
        for pending in self.pending:
            if self._in_flight >= self.delivery.max_in_flight:
                break
            if pending.task is None and pending.durable:
                self._in_flight += 1
                turn = None
                if self.destination.ordered_delivery and pending.sealed.info.get("sink", "main") == "main":
                    turn = (self._turn_tail, loop.create_future())
                    self._turn_tail = turn[1]
                pending.task = loop.create_task(self._deliver(pending, turn), name=f"deliver-{self.name}")
                self._delivering.add(pending.task)
                pending.task.add_done_callback(self._delivering.discard)

    async def drain(self, deadline: float) -> bool:
        """Keep delivering until nothing is pending or ``deadline`` (``time.monotonic()``) passes;
        then cancel what is in flight (it stays sealed in the log). True when nothing is left."""
        while self.pending:
            self.dispatch()
            remaining = deadline - time.monotonic()
            if not self._delivering or remaining <= 0:
                break
            await asyncio.wait(self._delivering, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        not_done = list(self._delivering)
        for t in not_done:
            t.cancel()
        if not_done:
            await asyncio.gather(*not_done, return_exceptions=True)
        return not self.pending

    def oldest_ms(self) -> int | None:
        """Arrival time of the oldest record in an unfinished batch (None: none is pending)."""
        if not self.pending:
            self._oldest = None
            return None
        # Thousands of partition batches can be pending: scan them at most once a second
        # (and again when the batch found oldest is done).
        mono = time.monotonic()
        if self._oldest is None or mono - self._oldest[0] >= 1.0:
            self._oldest = (mono, min(p.sealed.oldest_arrival_ms for p in self.pending))
        return self._oldest[1]

    def _finish(self, pending: PendingBatch) -> None:
        """A batch is done (delivered, or archived): forget it."""
        self.pending.remove(pending)
        if self._oldest is not None and pending.sealed.oldest_arrival_ms <= self._oldest[1]:
            self._oldest = None  # it was (one of) the oldest: look again
        if pending.partition is not None and self.release_partition is not None:
            self.release_partition(pending.partition)

    def _health_of(self, sink: str) -> DeliveryHealth:
        return self.health if sink == "main" else self.archiver.health

    # ------------------------------------------------------------------ one batch
    async def _deliver(self, pending: PendingBatch,
                       turn: tuple[asyncio.Future[None] | None, asyncio.Future[None]] | None = None) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self._deliver_once(pending, turn)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A bug or a local I/O error (reading the spool, writing the commit): retry
                    # this batch after a pause, in this task, never in a tight loop.
                    failures += 1
                    delay = local_failure_pause(failures)
                    log_failure(self.log, "delivery_failed", exc, batch_id=pending.sealed.batch_id,
                                retry_in_secs=delay)
                    self._health_of(pending.sealed.info.get("sink", "main")).failed(
                        "Daemon.DeliveryFailed", f"{type(exc).__name__}: {exc}", self.clock.now_ms())
                    await asyncio.sleep(delay)
        finally:
            if turn is not None and not turn[1].done():
                turn[1].set_result(None)  # it never reached deliver(): the next one goes on
            self._in_flight -= 1
            if pending in self.pending:
                pending.task = None  # cancelled at shutdown: stays sealed in the spool
            if not self.signals.stopping:
                self.dispatch()
                self.signals.wake()  # the batcher and the processing stage may be waiting for room

    async def _deliver_once(self, pending: PendingBatch,
                            turn: tuple[asyncio.Future[None] | None, asyncio.Future[None]] | None = None) -> None:
        """load -> (attempt -> classify)* -> commit. ``turn`` (an ordered destination): the
        future of the batch dispatched before this one, and this one's, set on entering deliver()."""
        spool = pending.spool or self.out
        if pending.sealed.info.get("sink") == "source" and not self.has_backup:
            await spool.commit(pending.sealed.batch_id, {"attempts": 0})
            self.dropped_source_copies += int(pending.sealed.info.get("records", 0))
            self.log.warning("source_copies_dropped", batch_id=pending.sealed.batch_id,
                             records=pending.sealed.info.get("records"), reason="the stream has no backup any more")
            self._finish(pending)
            return
        records = await self._load(pending, spool)
        if records is None:  # every record was archived by the schema check: no empty file
            await spool.commit(pending.sealed.batch_id, {"attempts": 0})
            self._finish(pending)
            return
        run = self._plan(pending, records)
        if run.sink == "main" and run.destination.reads_record_metadata:
            metas = (await spool.read_ranges(pending.sealed.ranges))[1]
            run.metas = list(metas) if metas is not None else [None] * len(records)
        if turn is not None and turn[0] is not None:
            await asyncio.shield(turn[0])
        while True:
            result = await self._attempt(run, turn[1] if turn is not None else None)
            turn = None
            failures = await self._classify(run, result)
            if failures is None or await self._retry_or_expire(run, failures):
                break
        await self._commit(pending, spool, run)

    async def _load(self, pending: PendingBatch, spool: Log) -> Sequence[bytes] | None:
        """The batch's records: held since the seal, or read back from the log. None when a main
        batch has nothing left to deliver after a schema re-check."""
        sealed = pending.sealed
        sink = sealed.info.get("sink", "main")
        records: Sequence[bytes]
        if pending.records is not None:
            records = pending.records
        elif sink != "archive":
            records = await spool.read_records(sealed.ranges)
        else:
            records = await self._read_error_records(spool, sealed)
        if sink == "main":
            records = await self._recheck_schema(sealed, records)
            if not records:
                return None
        return records

    async def _read_error_records(self, spool: Log, sealed: SealedBatch) -> list[bytes]:
        """An archive batch read back (after a restart): its records' error records, rebuilt from
        their metadata."""
        records, metas = await spool.read_ranges(sealed.ranges)
        lines = []
        for r, m in zip(records, metas or [None] * len(records), strict=True):
            err = RecordMeta.error(m)
            if err is None:
                assert self.routing_error is not None
                err = self.routing_error(m, sealed, r)
            lines.append(error_record_line(r, err))
        return lines

    def _plan(self, pending: PendingBatch, records: Sequence[bytes]) -> _Run:
        """How a batch is retried. Dynamic partitioning's RetryOptions: how long one prefix is
        retried before its records are archived (delivery-failed). A destination with a retry
        window of its own (OpenSearch, Splunk, HTTP endpoint) starts it at the first failed
        attempt, as Firehose does, and archives under its error-output type. Without either,
        delivery retries without limit."""
        sealed = pending.sealed
        sink = sealed.info.get("sink", "main")
        main = sink == "main"
        destination = self.destination if main else self.archiver.destination
        expires: float | None = None
        expire_type = DELIVERY_FAILED
        window = destination.retry_duration_secs if main else None
        dp = self.dynamic_partitioning
        if main and pending.partition is not None and dp is not None:
            expires = self.clock.monotonic() + dp.retry_duration_secs
        elif window is not None and destination.error_output_type:
            expire_type = destination.error_output_type
        rejected_type = destination.error_output_type if main else None
        return _Run(sealed, sink, destination, records, list(range(len(records))), window, expires, expire_type,
                    rejected_type)

    async def _attempt(self, run: _Run, entered: asyncio.Future[None] | None = None) -> DeliveryResult:
        """One ``deliver`` call with the records not delivered yet, counted; ``entered`` is set as
        deliver() is entered (its synchronous start has run before the next batch's begins)."""
        run.attempt += 1
        records, todo, sealed = run.records, run.todo, run.sealed
        subset = records if len(todo) == len(records) else [records[i] for i in todo]
        batch = Batch(self.name, sealed.batch_id, sealed.key, subset, sealed.oldest_arrival_ms, run.attempt)
        if len(todo) != len(records):
            batch.indices = todo
        if run.metas is not None:
            batch.meta = run.metas if len(todo) == len(records) else [run.metas[i] for i in todo]
        if run.sink == "main":
            batch.delimiter = self.delimiter
        batch.archive = run.sink != "main"
        labels = self.name
        self.metrics.delivery_attempts.labels(labels).inc()
        call = run.destination.deliver(batch)
        if entered is not None and not entered.done():
            entered.set_result(None)  # woken tasks run after this one's deliver() reaches its first await
        result = await call
        delivered = len(todo) - len(result.failures)
        nbytes = records_nbytes(subset) - sum(len(subset[i]) for i in result.failures) if delivered else 0
        if delivered:
            self.metrics.delivery_records.labels(labels).inc(delivered)
            self.metrics.delivery_bytes.labels(labels).inc(nbytes)
        prefix = run.destination.metrics_prefix
        if run.sink == "main" and prefix is not None:
            self.metrics.destination(prefix).attempt(labels, delivered, nbytes, result.ok)
        return result

    async def _classify(self, run: _Run, result: DeliveryResult) -> dict[int, RecordFailure] | None:
        """The failures left to retry (by index in the attempt), or None when the batch is done.
        Records the destination refuses for good (a mapping error) are archived at once; without
        an error-output type they are retried: never dropped silently."""
        labels = self.name
        health = self._health_of(run.sink)
        if result.ok:
            health.succeeded()
            self.metrics.delivery_success.labels(labels).set(1)
            self.metrics.delivery_objects.labels(labels).inc()
            return None
        self.metrics.delivery_success.labels(labels).set(0)
        self.metrics.delivery_failures.labels(labels).inc()
        first = next(iter(result.failures.values()))
        health.failed(first.error_code, first.error_message, self.clock.now_ms())
        failures = result.failures
        if run.rejected_type is not None:
            rejected = sorted(i for i, f in failures.items() if not f.retryable)
            if rejected:
                items = [(run.todo[i], failures[i]) for i in rejected]
                await self.archiver.archive_failed(run.sealed, run.rejected_type, run.records, items, run.attempt)
                run.expired += len(rejected)
                if len(rejected) == len(failures):
                    # The destination answered: records it refuses are no outage of it.
                    health.succeeded()
                    self.metrics.delivery_success.labels(labels).set(1)
                    return None
                failures = {i: f for i, f in failures.items() if f.retryable}
        return failures

    async def _retry_or_expire(self, run: _Run, failures: dict[int, RecordFailure]) -> bool:
        """Wait out the backoff before the next attempt; or, when that would end past the retry
        window, archive what is left and return True."""
        first = next(iter(failures.values()))
        if run.window is not None and run.expires is None:
            run.expires = self.clock.monotonic() + run.window
        run.todo = [run.todo[i] for i in sorted(failures)]
        d = self.delivery
        delay = jittered_backoff(self.rng, run.attempt, d.retry_initial_backoff_ms, d.retry_max_backoff_ms)
        self.metrics.delivery_retries.labels(self.name).inc()
        self.log.warning(
            "delivery_retry_scheduled",
            batch_id=run.sealed.batch_id,
            key=run.sealed.key,
            attempt=run.attempt,
            failed_records=len(run.todo),
            error_code=first.error_code,
            error_message=first.error_message[:300],
            delay_secs=round(delay, 3),
        )
        if run.expires is not None and self.clock.monotonic() + delay >= run.expires:
            await self._expire(run, failures, first)
            return True
        await asyncio.sleep(delay)
        return False

    async def _expire(self, run: _Run, failures: dict[int, RecordFailure], first: RecordFailure) -> None:
        """The retry window is over: archive the records not delivered."""
        sealed = run.sealed
        if run.expire_type == DELIVERY_FAILED:
            err = ErrorInfo(first.error_code, first.error_message, DELIVERY_FAILED, run.attempt,
                            sealed.oldest_arrival_ms, self.clock.now_ms())
            lines = [error_record_line(run.records[i], err) for i in run.todo]
            await self.archiver.archive_lines(sealed, DELIVERY_FAILED, lines)
        else:
            failed = [failures[i] for i in sorted(failures)]
            items = list(zip(run.todo, failed, strict=True))
            await self.archiver.archive_failed(sealed, run.expire_type, run.records, items, run.attempt)
        run.expired += len(run.todo)
        self.log.warning("delivery_retry_expired" if run.window is not None else "partition_retry_expired",
                         batch_id=sealed.batch_id, key=sealed.key, archived_records=len(run.todo),
                         error_code=first.error_code)

    async def _commit(self, pending: PendingBatch, spool: Log, run: _Run) -> None:
        """The batch is finished: commit it (its spool space can be freed) and count it."""
        sealed = run.sealed
        await spool.commit(sealed.batch_id, {"attempts": run.attempt})
        n = len(run.records)
        if run.sink == "archive":
            self.archiver.count(n, str(sealed.info.get("type", "processing-failed")))
        elif run.sink == "source":
            self.backed_up_records += n
        else:
            self.delivered_records += n - run.expired
        self.log.info("batch_delivered", batch_id=sealed.batch_id, key=sealed.key, records=n, attempts=run.attempt)
        self._finish(pending)

    async def _recheck_schema(self, sealed: SealedBatch, records: Sequence[bytes]) -> Sequence[bytes]:
        """A batch sealed under another schema (the format changed across a restart or reload)
        is checked again: records the new schema cannot take are archived as
        format-conversion-failed, the rest written in the new schema, never a mixed file. The
        archive key derives from the batch identity, so a replay overwrites it."""
        converter = self.converter
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
            code, message = verdicts[i]
            err = ErrorInfo(code, message, "format-conversion-failed", 1, sealed.oldest_arrival_ms, now)
            lines.append(error_record_line(records[i], err))
        await self.archiver.archive_lines(sealed, "format-conversion-failed", lines)
        keep = set(range(len(records))) - set(bad)
        return [r for i, r in enumerate(records) if i in keep]
