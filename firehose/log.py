"""The log a stream's stages read and write: the :class:`Log` protocol and the types it speaks.

A stream owns one or more logs, each an ordered, durable sequence of records numbered from 0
(``seq``), plus the batch decisions taken on them. Today a stream has an *ingest* log (what its
sources acknowledged) and, when it processes records, an *outcome* log (the transform results);
a :class:`LogStore` opens a stream's logs by name, so an implementation may also give a stream one
log per partition. The stages touch a log only through this protocol:

* the segmented file spool (:class:`firehose.filelog.FileLog`, the default), and
* an in-memory log (:class:`firehose.memlog.MemoryLog`), which the unit tests run the stages on
  (a restart is a new ``MemoryLog`` on the same store).

Each call's guarantee is in its docstring. The ones exactly-once delivery rests on:

* :meth:`Log.append` returns once the records are durable (as the log's durability policy
  defines it): a source acknowledges after it returns, never before.
* :meth:`Log.seal` returns once the batch identities are durable, and is idempotent per batch id.
  A batch is never re-decided: after a restart it comes back from :meth:`Log.open` with the same
  key and ranges, and is delivered again under that key (which overwrites).
* :meth:`Log.seal`, :meth:`Log.commit` and :meth:`Log.commit_ranges` are conditional: they raise
  :class:`LogFencedError` when another writer has taken the log since this one opened it (a second
  daemon, an operator's salvage, a cluster peer). The fenced writer refuses further appends too;
  it must stop, since its view of the log is stale.

Only the stages' own task calls a log (one asyncio event loop); implementations may use threads
inside.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from firehose.intervals import IntervalSet


class LogError(Exception):
    """A log cannot be opened, read or written; the message names it."""


class LogFullError(LogError):
    """The log is at its size cap; callers answer with back-pressure."""


class LogFencedError(LogError):
    """Another writer took the log: this one must stop writing (its view is stale)."""


class LogTooLargeError(LogError):
    """One append is larger than the log can take in one piece (a NATS server's max_payload);
    nothing was written, and retrying the same request cannot succeed."""


class LogBusyError(LogError):
    """The log is held by another live writer, so it cannot be opened now."""


@dataclass
class RecordFrame:
    """The records of one append, in order, as read back."""

    first_seq: int
    arrival_ms: int
    records: list[bytes]
    meta: list[Any] | None = None

    @property
    def end_seq(self) -> int:
        return self.first_seq + len(self.records)

    @functools.cached_property
    def cum(self) -> list[int]:
        """Cumulative record sizes: ``cum[j] - cum[i]`` is the size of records ``i..j-1``."""
        return [0, *itertools.accumulate(map(len, self.records))]


@dataclass
class SizedFrame:
    """A frame's records by their sizes alone (:meth:`Log.sizes_at`): what a reader needs to
    cut batches when their bytes are read back later. ``cum[j] - cum[i]`` is the size of records
    ``i..j-1`` (``cum`` may start anywhere: only differences count)."""

    first_seq: int
    arrival_ms: int
    count: int
    cum: Sequence[int]
    records: None = None
    meta: None = None

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count


class FrameFile(NamedTuple):
    """Where a RECORDS frame is stored (:meth:`Log.frame_file`): its payload is ``length`` bytes
    at ``offset`` of the file at ``path``, and holds records ``[first_seq, end_seq)``."""

    path: str
    offset: int
    length: int
    first_seq: int
    end_seq: int


@dataclass
class SealedBatch:
    """A batch identity recorded by :meth:`Log.seal`."""

    batch_id: int
    key: str
    ranges: Sequence[tuple[int, int]]  # a list, or compact Ranges for a partition's scattered records
    oldest_arrival_ms: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecoveryState:
    """What :meth:`Log.open` found: the work to resume."""

    pending: list[SealedBatch]  # sealed and not committed, in batch-id order
    positions: dict[str, Any]  # the sources' positions, as last appended
    unsealed_records: int  # records the batcher reads again
    truncated_bytes: int  # an unacknowledged tail dropped (a write cut short by a crash)


class Log(Protocol):
    """One durable, ordered log of records with the batch decisions taken on it.

    Records are numbered by ``seq`` from 0, without gaps; ``[min_seq, next_seq)`` can be read
    (below ``min_seq`` everything was committed and may be gone). ``sealed`` and ``committed``
    are the record ranges sealed into a batch and finished (delivered, archived, or recorded
    elsewhere)."""

    @property
    def name(self) -> str:
        """Where the log is, for messages (a directory, a subject)."""

    @property
    def next_seq(self) -> int: ...
    @property
    def min_seq(self) -> int: ...
    @property
    def sealed(self) -> IntervalSet: ...
    @property
    def committed(self) -> IntervalSet: ...
    @property
    def size_bytes(self) -> int:
        """What the log holds now, in bytes (records not yet trimmed, and its bookkeeping)."""

    @property
    def max_size_bytes(self) -> int:
        """The cap past which :meth:`append` raises :class:`LogFullError`."""

    @property
    def positions(self) -> dict[str, Any]:
        """Source positions, merged from every append (a key appended as None is removed)."""

    @property
    def failed(self) -> LogError | None:
        """Set once the log can no longer be trusted to write (a failed fsync, fencing): appends
        are refused until the daemon restarts."""

    async def open(self) -> RecoveryState:
        """Take the log for this writer (fencing any earlier one, or :class:`LogBusyError` when a
        live writer holds it) and recover it: sealed but uncommitted batches come back."""

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would fit under the cap (and the log is not failed)."""

    async def append(self, records: Sequence[bytes], arrival_ms: int, *, meta: list[Any] | None = None,
                     positions: dict[str, Any] | None = None, enforce_cap: bool = True,
                     nbytes: int | None = None) -> int:
        """Append one frame of records (with optional per-record metadata, and source positions
        such as a file offset or a shard checkpoint); returns the first record's ``seq`` once the
        frame is durable. Concurrent appends share the work of making them durable. Raises
        :class:`LogFullError` at the cap (nothing written) unless ``enforce_cap`` is False."""

    async def read_frame(self, seq: int) -> RecordFrame | None:
        """The frame holding record ``seq`` (None outside ``[min_seq, next_seq)``): from memory
        when recent, else one read of storage."""

    def sizes_at(self, seq: int) -> SizedFrame | None:
        """The frame holding record ``seq`` by its records' sizes, when that is much cheaper than
        :meth:`read_frame` (the frame is no longer in memory, and carries no per-record
        metadata); None otherwise. Its records stay readable by :meth:`read_records`."""

    def frame_file(self, seq: int) -> FrameFile | None:
        """Where the frame holding record ``seq`` is stored, for another process on this machine
        to read it (written already, maybe not yet durable); None when the log keeps no frames in
        local files, or ``seq`` is outside ``[min_seq, next_seq)``. The file is not removed while
        the record is uncommitted."""

    def arrival_of(self, seq: int) -> int | None:
        """The arrival time (ms) of record ``seq`` (None outside ``[min_seq, next_seq)``), for
        ``/healthz``: cheap, blocking at most for one read of local storage."""

    def reader_passed(self, seq: int) -> None:
        """The stage reading this log has consumed every record below ``seq``; the log may drop
        whatever it kept in memory for them (they stay readable until committed)."""

    async def read_records(self, ranges: Sequence[tuple[int, int]]) -> Sequence[bytes]:
        """The bytes of the records in ``ranges`` (sealed, uncommitted ranges), in order: a list,
        or records packed in one buffer (:class:`firehose.packed.PackedRecords`)."""

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
        """Like :meth:`read_records`, with the records' metadata (None when none has any)."""

    def allocate_batch_id(self) -> int:
        """A new batch id, above every id sealed in this log."""

    async def seal(self, batches: Sequence[SealedBatch]) -> None:
        """Record batch identities; returns once they are all durable (whatever the durability
        policy: exactly-once rests on it). A batch id already sealed is not recorded twice, so
        a call cancelled midway can be made again with the same batches. Conditional: raises
        :class:`LogFencedError` if another writer took the log."""

    async def commit(self, batch_id: int, info: dict[str, Any] | None = None) -> None:
        """Mark a sealed batch finished; what it alone held may be trimmed. Its durability is not
        awaited: a commit lost in a crash re-sends the batch under its key, which overwrites.
        Conditional, like :meth:`seal`."""

    async def commit_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Mark records finished without a batch (their outcome was recorded durably in another
        log). Durability and conditions as :meth:`commit`."""

    async def aclose(self) -> None:
        """Finish pending writes and give the log up (another writer may then open it)."""


class LogStore(Protocol):
    """Where a stream's logs live: opens them by stream and log name."""

    def log(self, stream: str, name: str, *, cache_bytes: int = 64 << 20) -> Log:
        """The log ``name`` of ``stream`` (``ingest``, ``processed``, ...), not yet opened.
        ``cache_bytes`` bounds what the log keeps in memory for its reader."""

    def exists(self, stream: str, name: str) -> bool:
        """Whether the log was ever written (a leftover log keeps its stage on)."""


async def read_ranges_by_frame(log: Log, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
    """:meth:`Log.read_ranges` done with :meth:`Log.read_frame`, for logs that read whole frames."""
    out: list[bytes] = []
    metas: list[Any] = []
    for start, end in ranges:
        seq = start
        while seq < end:
            frame = await log.read_frame(seq)
            if frame is None:
                raise LogError(f"{log.name}: record {seq} is missing from the log")
            lo, hi = seq - frame.first_seq, min(end, frame.end_seq) - frame.first_seq
            out.extend(frame.records[lo:hi])
            metas.extend(frame.meta[lo:hi] if frame.meta is not None else [None] * (hi - lo))
            seq = frame.first_seq + hi
    return out, (metas if any(m is not None for m in metas) else None)


INGEST = "ingest"
PROCESSED = "processed"
