"""What the stages of a stream runtime share: the open buffer a batch is built in, a sealed batch
waiting for delivery, and the signals the stages pass each other (stopping, wake-ups).

None of these objects does I/O; each belongs to the stream's event loop.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from dataclasses import dataclass, field
from typing import Any

from firehose.clock import Clock
from firehose.intervals import Ranges
from firehose.log import Log, LogError, RecordFrame, SealedBatch, SizedFrame
from firehose.metrics import Metrics
from firehose.retry import local_failure_pause


class Signals:
    """How the stages of one stream nudge each other. ``stopping`` is set once by the runtime;
    ``batcher`` wakes the batcher (records or room arrived), ``processing`` the processing stage."""

    __slots__ = ("stopping", "batcher", "processing")

    def __init__(self) -> None:
        self.stopping = False
        self.batcher = asyncio.Event()
        self.processing = asyncio.Event()

    def wake(self) -> None:
        """Records arrived, or delivery made room: every stage looks again."""
        self.batcher.set()
        self.processing.set()


@dataclass
class StageContext:
    """What every stage of one stream is given: the stream's name (metric label, task names),
    the injected clock, the metrics, the stream's logger, the signals the stages share, the
    random source batch keys are drawn from (seeded in tests)."""

    name: str
    clock: Clock
    metrics: Metrics
    log: Any
    signals: Signals = field(default_factory=Signals)
    rng: random.Random = field(default_factory=random.Random)


@dataclass(eq=False)  # compared by identity: deque membership and removal stay cheap
class PendingBatch:
    """A sealed batch not yet finished (delivered, or archived)."""

    sealed: SealedBatch
    records: list[bytes] | None  # None: read back from the spool when its delivery starts
    task: asyncio.Task[None] | None = None
    spool: Log | None = None  # the log the batch was sealed in (default: the batcher's)
    partition: tuple[str, ...] | None = None  # dynamic partitioning: the partition it counts for
    durable: bool = True  # its seal is on disk, so it may be delivered


class OpenBuffer:
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

    def extend(self, frame: RecordFrame | SizedFrame, i: int, j: int, nbytes: int) -> None:
        """Add records ``i..j-1`` of ``frame`` (``nbytes`` in all). Records known by their sizes
        alone spill the buffer: its batch is read back from the log at delivery."""
        if not self.count or frame.arrival_ms < self.oldest_ms:
            self.oldest_ms = frame.arrival_ms
        if frame.records is None:
            if not self.spilled:
                self.spill()
        elif not self.spilled:
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

    def extend_picked(self, frame: RecordFrame, picked: list[int], nbytes: int) -> None:
        """Add the records at indices ``picked`` (ascending) of ``frame``, ``nbytes`` in all: what
        :meth:`add` of each in turn would do."""
        if not self.count or frame.arrival_ms < self.oldest_ms:
            self.oldest_ms = frame.arrival_ms
        if not self.spilled:
            records = frame.records
            self.records.extend([records[i] for i in picked])
        self.count += len(picked)
        self.nbytes += nbytes
        b = self.bounds
        first = frame.first_seq
        for i in picked:
            seq = first + i
            if b and b[-1] == seq:
                b[-1] = seq + 1
            else:
                b.append(seq)
                b.append(seq + 1)

    def spill(self) -> int:
        """Forget the record bytes (they are in the spool); returns the bytes freed."""
        freed = self.memory_bytes
        self.records = []
        self.spilled = True
        return freed


def log_failure(log: Any, event: str, exc: BaseException, **fields: Any) -> None:
    """A stage's failed step, retried: one line for an operational failure (the log, the disk,
    the network: its message says what), the traceback only for anything else (a bug)."""
    if isinstance(exc, LogError | OSError):
        log.error(event, error=str(exc), **fields)
    else:
        log.exception(event, error=str(exc), **fields)


async def retry_after(log: Any, event: str, exc: BaseException, failures: int, wake: asyncio.Event) -> None:
    """A stage's pass failed, the ``failures``-th time in a row: logged, then, after a pause that
    grows with the failures (firehose.retry.local_failure_pause), the stage is woken to try again
    by itself, not at the next record's arrival."""
    log_failure(log, event, exc, attempt=failures)
    await asyncio.sleep(local_failure_pause(failures))
    wake.set()
