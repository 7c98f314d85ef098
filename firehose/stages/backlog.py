"""How far behind a stream is: what waits, and since when.

Owns: the arrival time of the oldest record not delivered yet — in an unfinished batch, in an
open buffer, or acknowledged but not read into a buffer yet (waiting for the processing stage or
the batcher) — and the gauges that follow from it and from the spools: spool bytes, backlog
records, active partitions, ``DataFreshness`` (and the destination's own freshness metric).

Calls: the delivery runner's and the batcher's ``oldest_ms``, the router's counts, and the logs'
counters and ``arrival_of`` (one frame, remembered while the same record heads the backlog).
"""

from __future__ import annotations

from firehose.interfaces import Destination
from firehose.log import Log, LogError
from firehose.stages.batcher import Batcher
from firehose.stages.common import StageContext
from firehose.stages.delivery import DeliveryRunner
from firehose.stages.router import PartitionRouter


class _HeadArrival:
    """The arrival time of a record of a log, remembered for the last one asked: ``/healthz``
    asks about the same backlog head again and again while it waits."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[Log, int, int] | None = None  # (log, seq, arrival)

    def at(self, log: Log, seq: int) -> int | None:
        last = self._last
        if last is not None and last[0] is log and last[1] == seq:
            return last[2]
        try:
            arrival = log.arrival_of(seq)  # from memory, or one frame read from storage
        except (OSError, LogError):
            return None
        if arrival is None:
            return None
        self._last = (log, seq, arrival)
        return arrival


class Backlog:
    """One stream's backlog, read from its stages; ``ingest`` and ``out`` are the same log when
    the stream has no processing stage."""

    def __init__(self, ctx: StageContext, ingest: Log, out: Log, runner: DeliveryRunner, batcher: Batcher,
                 router: PartitionRouter, destination: Destination | None = None) -> None:
        self.name, self.clock, self.metrics = ctx.name, ctx.clock, ctx.metrics
        self.ingest = ingest
        self.out = out
        self.runner = runner
        self.batcher = batcher
        self.router = router
        self.destination = destination  # its metrics_prefix (DeliveryToSplunk) gets a freshness gauge too
        self._head = _HeadArrival()

    def oldest_pending_ms(self) -> int | None:
        """Arrival time of the oldest record in an undelivered batch or an open buffer (main,
        partition or archive), or None when there is none."""
        known = [t for t in (self.runner.oldest_ms(), self.batcher.oldest_ms()) if t is not None]
        return min(known) if known else None

    def oldest_unbuffered_ms(self) -> int | None:
        """Arrival time of the first acknowledged record not in any buffer or batch yet (waiting
        for the processing stage, or for the batcher), or None. Records are read in sequence
        order, so it is only the oldest when nothing is buffered or pending."""
        arrivals = []
        head = self.ingest.committed.next_gap(self.ingest.min_seq)
        if head < self.ingest.next_seq:
            arrivals.append(self._head.at(self.ingest, head))
        cursor = self.batcher.cursor
        if self.out is not self.ingest and cursor < self.out.next_seq:
            arrivals.append(self._head.at(self.out, max(cursor, self.out.min_seq)))
        known = [a for a in arrivals if a is not None]
        return min(known) if known else None

    def oldest_ms(self) -> int | None:
        """Arrival time of the oldest record acknowledged and not delivered (None: none)."""
        oldest = self.oldest_pending_ms()
        return oldest if oldest is not None else self.oldest_unbuffered_ms()

    def update_gauges(self) -> None:
        labels = self.name
        ingest = self.ingest
        out_bytes = self.out.size_bytes if self.out is not ingest else 0
        self.metrics.spool_bytes.labels(labels).set(ingest.size_bytes + out_bytes)
        self.metrics.spool_max_bytes.labels(labels).set(ingest.max_size_bytes)
        backlog = ingest.next_seq - ingest.min_seq - len(ingest.committed)
        self.metrics.backlog_records.labels(labels).set(max(0, backlog))
        if self.router.partitioning:
            self.metrics.partition_count.labels(labels).set(self.router.active_partitions)
        oldest = self.oldest_pending_ms()
        age = 0.0 if oldest is None else max(0.0, (self.clock.now_ms() - oldest) / 1000.0)
        self.metrics.data_freshness.labels(labels).set(age)
        prefix = self.destination.metrics_prefix if self.destination is not None else None
        if prefix is not None:
            self.metrics.destination(prefix).freshness.labels(labels).set(age)
