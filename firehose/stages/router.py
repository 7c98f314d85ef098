"""The partition router: dynamic partitioning's admission and bookkeeping.

Owns: the open partition buffers (one :class:`OpenBuffer` per partition, in creation order, which
is oldest first), the active partitions (open buffers plus undelivered batches, counted per
partition) that the ``max_active_partitions`` guard counts, and the memory they cost against
``memory_budget_mib`` (record bytes held plus ``RANGE_BYTES`` a range plus ``PARTITION_BYTES`` a
partition). Over the budget it *spills* the largest buffers (their bytes are dropped, the batch
is read back from the log at delivery) and names the partitions to seal early.

A record's partition is its values for the namespaced keys the Prefix uses
(``partitionKeyFromQuery:k``, ``partitionKeyFromLambda:k``), recorded with its outcome by the
processing stage. A record that cannot be admitted (a missing key, a prefix that cannot be
evaluated, the guard) gets the error that archives it.

Calls: the destination's ``batch_key`` (to evaluate a prefix; no I/O) and metrics. It does no
I/O and never awaits: the batcher fills and seals the buffers it keeps.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from firehose.config import StreamConfig
from firehose.interfaces import Destination, partitioned_keys
from firehose.log import RecordFrame, SealedBatch
from firehose.records import ErrorInfo, RecordMeta
from firehose.stages.common import OpenBuffer, StageContext
from firehose.stages.inline import InlineExtraction

# What an open partition's bookkeeping costs, counted against dynamic_partitioning.memory_budget_mib
# beside the record bytes held: a spool range (two int64) and a buffer with its dict entry.
RANGE_BYTES = 16
PARTITION_BYTES = 512

Partition = tuple[str, ...]


class PartitionRouter:
    """One stream's partitions. ``refs`` is None when the stream does not partition: then only
    the active counts of partition batches recovered from the log are kept."""

    def __init__(self, ctx: StageContext, destination: Destination | None, refs: tuple[str, ...] | None, *,
                 max_active: int = 500, budget_bytes: int = 64 << 20) -> None:
        self.name, self.clock, self.metrics = ctx.name, ctx.clock, ctx.metrics
        self.destination = destination
        self.refs = refs
        self.max_active = max_active
        self.budget_bytes = budget_bytes
        self._partitions: dict[Partition, OpenBuffer] = {}
        self._active: dict[Partition, int] = {}
        self._memory_held = 0  # record bytes held by unspilled partition buffers
        self._ranges_held = 0  # entries of all partition buffers' range arrays
        self.inline: InlineExtraction | None = None  # set by the stream (firehose/stages/inline.py)

    @classmethod
    def for_stream(cls, ctx: StageContext, config: StreamConfig, destination: Destination) -> PartitionRouter:
        """The router of a configured stream: the keys its Prefix uses (when it partitions) and
        its ``dynamic_partitioning`` limits."""
        refs = None
        if config.partitioned:
            from firehose.keys import partition_key_refs

            refs = partition_key_refs(config.destination.prefix)
        dp = config.dynamic_partitioning
        if dp is None:
            return cls(ctx, destination, refs)
        return cls(ctx, destination, refs, max_active=dp.max_active_partitions,
                   budget_bytes=dp.memory_budget_mib << 20)

    # ------------------------------------------------------------------ what it reports
    @property
    def partitioning(self) -> bool:
        return self.refs is not None

    @property
    def open_partitions(self) -> int:
        return len(self._partitions)

    @property
    def active_partitions(self) -> int:
        return len(self._active)

    @property
    def buffered_records(self) -> int:
        """Records in open partition buffers."""
        return sum(b.count for b in self._partitions.values())

    @property
    def memory_bytes(self) -> int:
        """What open partitions cost against the budget: record bytes held plus bookkeeping."""
        return self._memory_held + self._bookkeeping_bytes()

    def over_budget(self) -> bool:
        return self.memory_bytes > self.budget_bytes

    def oldest_ms(self) -> int | None:
        """Arrival of the oldest record in a partition buffer (the first created is the oldest)."""
        return next(iter(self._partitions.values())).oldest_ms if self._partitions else None

    def open(self) -> list[Partition]:
        """The open partitions, in creation order."""
        return list(self._partitions)

    def due(self, now_ms: int, interval_ms: int) -> list[Partition]:
        """Partitions whose oldest record is ``interval_ms`` old. They sit in creation order,
        which is (nearly) oldest first: the scan stops at the first one not due."""
        due = []
        for ident, buf in self._partitions.items():
            if now_ms < buf.oldest_ms + interval_ms:
                break
            due.append(ident)
        return due

    # ------------------------------------------------------------------ admission
    def partition_of(self, meta: Any) -> Partition | None:
        """A record's partition: its values for the keys the Prefix uses, or None if one is missing."""
        assert self.refs is not None
        pk = RecordMeta.partition_keys(meta)
        if pk is None:
            return None
        values = []
        for ref in self.refs:
            v = pk.get(ref)
            if v is None:
                v = pk.get(ref.partition(":")[2])  # outcomes recorded before keys were namespaced
                if v is None:
                    return None
            values.append(v)
        return tuple(values)

    def admit(self, ident: Partition | None, arrival_ms: int) -> dict[str, Any] | None:
        """None if a record of partition ``ident`` may be buffered (creating the partition's
        buffer), else the error that archives it: a missing key, a prefix that cannot be
        evaluated, or the active-partition guard."""
        if ident is not None and ident in self._partitions:
            return None
        err = self.error_for(ident, arrival_ms, admitting=True)
        if err is None:
            assert ident is not None
            self._open(ident)
            self.metrics.partition_count_exceeded.labels(self.name).set(0)
        return err

    def error_for(self, ident: Partition | None, arrival_ms: int, *, admitting: bool) -> dict[str, Any] | None:
        """Why a record of partition ``ident`` cannot be delivered under the Prefix (None if it can).
        Without ``admitting``, the error of a record archived earlier (its archive batch read
        back): a partition that evaluates was refused by the guard."""
        from firehose.keys import PrefixError
        from firehose.records import ACTIVE_PARTITION_EXCEEDED, PARTITIONING_FAILED

        assert self.refs is not None and self.destination is not None
        now = self.clock.now_ms()
        if ident is None:
            missing = ", ".join(self.refs)
            return ErrorInfo("DynamicPartitioning.PartitionKeyMissing",
                             f"the record has no value for a partition key the prefix uses ({missing})",
                             PARTITIONING_FAILED, 1, arrival_ms, now).encode()
        try:
            when = datetime.fromtimestamp(arrival_ms / 1000.0, tz=UTC)
            partitioned_keys(self.destination).batch_key(when, random.Random(0), self.keys(ident))
        except PrefixError as exc:
            return ErrorInfo("DynamicPartitioning.PrefixEvaluationFailed", str(exc), PARTITIONING_FAILED, 1,
                             arrival_ms, now).encode()
        limit = self.max_active
        if not admitting or (ident not in self._active and len(self._active) >= limit):
            self.metrics.partition_count_exceeded.labels(self.name).set(1)
            self.metrics.partition_exceeded_records.labels(self.name).inc()
            return ErrorInfo("DynamicPartitioning.ActivePartitionsLimitExceeded",
                             f"the stream has {len(self._active)} active partitions, the limit "
                             f"(dynamic_partitioning.max_active_partitions) is {limit}",
                             ACTIVE_PARTITION_EXCEEDED, 1, arrival_ms, now).encode()
        return None

    def routing_error(self, meta: Any, sealed: SealedBatch, record: bytes) -> dict[str, Any]:
        """The error of a record the batcher archived (not its transform): rebuilt when its
        archive batch is read back from the log after a restart. With inline extraction the
        record's metadata is computed again first: its error may be the extraction's."""
        if self.inline is not None:
            meta = self.inline.meta_of(record, meta, sealed.oldest_arrival_ms)
            err = RecordMeta.error(meta)
            if err is not None:
                return err
        if self.refs is not None:
            err = self.error_for(self.partition_of(meta), sealed.oldest_arrival_ms, admitting=False)
            if err is not None:
                return err
        # Dynamic partitioning was turned off since: the batch's type is all that is known.
        return ErrorInfo("DynamicPartitioning.Failed", "archived by dynamic partitioning",
                         sealed.info.get("type", "partitioning-failed"), 1, sealed.oldest_arrival_ms,
                         self.clock.now_ms()).encode()

    def keys(self, ident: Partition) -> dict[str, str]:
        """A partition's key values by namespaced key, as ``batch_key`` takes them."""
        assert self.refs is not None
        return dict(zip(self.refs, ident, strict=True))

    # ------------------------------------------------------------------ buffers
    def buffer(self, ident: Partition) -> OpenBuffer | None:
        """The open buffer of ``ident`` (None: not open)."""
        return self._partitions.get(ident)

    def add(self, ident: Partition, seq: int, record: bytes, arrival_ms: int) -> OpenBuffer:
        """Buffer one record in its partition (opened if it is not: after a seal, the next
        record of the partition starts a new buffer); returns the buffer."""
        buf = self._partitions.get(ident) or self._open(ident)
        self._ranges_held -= len(buf.bounds)
        buf.add(seq, record, arrival_ms)
        self._ranges_held += len(buf.bounds)
        if not buf.spilled:
            self._memory_held += len(record)
        return buf

    def add_picked(self, ident: Partition, frame: RecordFrame, picked: list[int], nbytes: int) -> None:
        """Buffer records ``picked`` of ``frame`` (``nbytes`` in all) in the open partition
        ``ident``, as :meth:`add` of each would."""
        buf = self._partitions[ident]
        self._ranges_held -= len(buf.bounds)
        buf.extend_picked(frame, picked, nbytes)
        self._ranges_held += len(buf.bounds)
        if not buf.spilled:
            self._memory_held += nbytes

    def fits(self, nbytes: int, records: int) -> bool:
        """Whether ``records`` more records of ``nbytes`` keep open partitions within the memory
        budget (counting a range for each)."""
        return self.memory_bytes + nbytes + 2 * RANGE_BYTES * records <= self.budget_bytes

    def close(self, ident: Partition) -> OpenBuffer:
        """The partition's buffer was sealed: forget it (the batch now counts as active)."""
        buf = self._partitions.pop(ident)
        self._memory_held -= buf.memory_bytes
        self._ranges_held -= len(buf.bounds)
        self.release(ident)
        return buf

    def count_batch(self, ident: Partition) -> None:
        """An undelivered batch of ``ident`` (sealed, or recovered from the log) is active."""
        self._active[ident] = self._active.get(ident, 0) + 1

    def release(self, ident: Partition) -> None:
        """An open buffer or a batch of ``ident`` is gone; an idle partition stops being active."""
        n = self._active.get(ident, 0) - 1
        if n > 0:
            self._active[ident] = n
        else:
            self._active.pop(ident, None)

    def _open(self, ident: Partition) -> OpenBuffer:
        buf = self._partitions[ident] = OpenBuffer()
        self.count_batch(ident)
        return buf

    # ------------------------------------------------------------------ the memory budget
    def _bookkeeping_bytes(self) -> int:
        """What open partitions cost besides their records: ranges and buffers."""
        return RANGE_BYTES * self._ranges_held + PARTITION_BYTES * len(self._partitions)

    def relieve(self) -> list[Partition]:
        """Bring open partitions back within the memory budget: first keep the largest buffers on
        disk only (their records are read back from the log at delivery); if bookkeeping alone is
        still over half the budget, return the partitions holding the most ranges, to be sealed
        early (the caller seals them)."""
        budget = self.budget_bytes
        book = self._bookkeeping_bytes()
        if self._memory_held and self._memory_held + book > budget:
            target = max(0, budget // 2 - book)
            for buf in sorted(self._partitions.values(), key=lambda b: b.memory_bytes, reverse=True):
                if self._memory_held <= target or not buf.memory_bytes:
                    break
                self._memory_held -= buf.spill()
                self.metrics.partition_spills.labels(self.name).inc()
        book = self._bookkeeping_bytes()
        flush: list[Partition] = []
        if book > budget // 2:
            order = sorted(self._partitions.items(), key=lambda kv: len(kv[1].bounds), reverse=True)
            for ident, buf in order:
                if book <= budget // 4:
                    break
                flush.append(ident)
                book -= RANGE_BYTES * len(buf.bounds) + PARTITION_BYTES
        return flush
