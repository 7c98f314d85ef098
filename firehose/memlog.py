"""An in-memory :class:`firehose.log.Log`, for tests of the stages and of a stream runtime.

A :class:`MemoryLogStore` is the log's durable state; it outlives the :class:`MemoryLog` writers
opened on it, so a restart (or a crash: a writer dropped without ``aclose``) is a new writer on
the same store. Opening a writer fences the previous one: its seals, commits and appends raise
:class:`LogFencedError`, exactly as a replicated log treats a writer that lost its lease.
Everything a call wrote is "durable" when it returns.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from firehose.intervals import IntervalSet
from firehose.log import (
    FrameFile,
    Log,
    LogError,
    LogFencedError,
    LogFullError,
    RecordFrame,
    RecoveryState,
    SealedBatch,
    SizedFrame,
    read_ranges_by_frame,
)


@dataclass
class MemoryLogStore:
    """One log's durable state."""

    name: str = "memory"
    frames: list[RecordFrame] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # frames' first_seq, for bisect
    seals: dict[int, SealedBatch] = field(default_factory=dict)  # sealed, not committed
    sealed: IntervalSet = field(default_factory=IntervalSet)
    committed: IntervalSet = field(default_factory=IntervalSet)
    positions: dict[str, Any] = field(default_factory=dict)
    next_seq: int = 0
    min_seq: int = 0
    next_batch_id: int = 1
    size_bytes: int = 0
    epoch: int = 0  # incremented by every open: the current writer's number
    commits: int = 0  # commit calls, for tests that count them


class MemoryLog:
    """One writer of a :class:`MemoryLogStore` (implements :class:`Log`)."""

    def __init__(self, store: MemoryLogStore | None = None, *, max_size_bytes: int = 1 << 30) -> None:
        self.store = store if store is not None else MemoryLogStore()
        self._max_size_bytes = max_size_bytes
        self._epoch = -1
        self._fenced: LogFencedError | None = None

    # ------------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return self.store.name

    @property
    def next_seq(self) -> int:
        return self.store.next_seq

    @property
    def min_seq(self) -> int:
        return self.store.min_seq

    @property
    def sealed(self) -> IntervalSet:
        return self.store.sealed

    @property
    def committed(self) -> IntervalSet:
        return self.store.committed

    @property
    def size_bytes(self) -> int:
        return self.store.size_bytes

    @property
    def max_size_bytes(self) -> int:
        return self._max_size_bytes

    @property
    def positions(self) -> dict[str, Any]:
        return self.store.positions

    @property
    def failed(self) -> LogError | None:
        return self._fenced

    def _check_owner(self) -> None:
        if self._fenced is None and self.store.epoch != self._epoch:
            self._fenced = LogFencedError(f"{self.name}: another writer opened this log")
        if self._fenced is not None:
            raise self._fenced

    # ------------------------------------------------------------------ open
    async def open(self) -> RecoveryState:
        st = self.store
        st.epoch += 1
        self._epoch = st.epoch
        pending = [st.seals[b] for b in sorted(st.seals)]
        unsealed = st.next_seq - st.min_seq - len(st.sealed)
        return RecoveryState(pending, dict(st.positions), unsealed, 0)

    # ------------------------------------------------------------------ writing
    def has_room(self, nbytes: int) -> bool:
        return self._fenced is None and self.store.size_bytes + nbytes <= self._max_size_bytes

    async def append(self, records: Sequence[bytes], arrival_ms: int, *, meta: list[Any] | None = None,
                     positions: dict[str, Any] | None = None, enforce_cap: bool = True,
                     nbytes: int | None = None) -> int:
        self._check_owner()
        st = self.store
        size = sum(map(len, records)) if nbytes is None else nbytes
        if enforce_cap and not self.has_room(size):
            raise LogFullError(f"{self.name} is at its cap of {self._max_size_bytes} bytes")
        first = st.next_seq
        if records:
            st.frames.append(RecordFrame(first, arrival_ms, list(records), None if meta is None else list(meta)))
            st.starts.append(first)
            st.next_seq = first + len(records)
            st.size_bytes += size
        for key, value in (positions or {}).items():
            if value is None:
                st.positions.pop(key, None)
            else:
                st.positions[key] = value
        return first

    def allocate_batch_id(self) -> int:
        bid = self.store.next_batch_id
        self.store.next_batch_id += 1
        return bid

    async def seal(self, batches: Sequence[SealedBatch]) -> None:
        self._check_owner()
        st = self.store
        for batch in batches:
            if batch.batch_id in st.seals or st.committed.covers(*batch.ranges[0]):
                continue  # sealed already (a call made again after a cancellation)
            st.seals[batch.batch_id] = batch
            st.next_batch_id = max(st.next_batch_id, batch.batch_id + 1)
            st.sealed.add_many(batch.ranges)

    async def commit(self, batch_id: int, info: dict[str, Any] | None = None) -> None:
        self._check_owner()
        batch = self.store.seals.pop(batch_id, None)
        self.store.commits += 1
        if batch is not None:
            await self._commit(batch.ranges)

    async def commit_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._check_owner()
        await self._commit(ranges)

    async def _commit(self, ranges: Sequence[tuple[int, int]]) -> None:
        st = self.store
        st.committed.add_many(ranges)
        # Trim the front: frames whose every record is committed go.
        drop = 0
        while drop < len(st.frames) and st.committed.covers(st.frames[drop].first_seq, st.frames[drop].end_seq):
            st.size_bytes -= sum(map(len, st.frames[drop].records))
            drop += 1
        if drop:
            del st.frames[:drop]
            del st.starts[:drop]
        st.min_seq = st.frames[0].first_seq if st.frames else st.next_seq
        st.committed.discard_below(st.min_seq)
        st.sealed.discard_below(st.min_seq)

    # ------------------------------------------------------------------ reading
    async def read_frame(self, seq: int) -> RecordFrame | None:
        return self._frame(seq)

    def sizes_at(self, seq: int) -> SizedFrame | None:
        return None  # every frame is in memory

    def frame_file(self, seq: int) -> FrameFile | None:
        return None

    def arrival_of(self, seq: int) -> int | None:
        frame = self._frame(seq)
        return frame.arrival_ms if frame is not None else None

    def _frame(self, seq: int) -> RecordFrame | None:
        st = self.store
        i = bisect.bisect_right(st.starts, seq) - 1
        if i < 0 or not st.frames[i].first_seq <= seq < st.frames[i].end_seq:
            return None
        return st.frames[i]

    def reader_passed(self, seq: int) -> None:
        """Nothing to release: the store is the memory."""

    async def read_records(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return (await self.read_ranges(ranges))[0]

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
        return await read_ranges_by_frame(self, ranges)

    async def aclose(self) -> None:
        """Nothing to flush: every call was complete when it returned."""


class MemoryLogs:
    """A :class:`firehose.log.LogStore` of memory logs, kept across runtimes (restarts)."""

    def __init__(self, max_size_bytes: int = 1 << 30) -> None:
        self.max_size_bytes = max_size_bytes
        self.stores: dict[tuple[str, str], MemoryLogStore] = {}

    def log(self, stream: str, name: str, *, cache_bytes: int = 64 << 20) -> Log:
        store = self.stores.setdefault((stream, name), MemoryLogStore(name=f"memory:{stream}/{name}"))
        return MemoryLog(store, max_size_bytes=self.max_size_bytes)

    def exists(self, stream: str, name: str) -> bool:
        return (stream, name) in self.stores
