"""A set of integers stored as sorted, merged half-open ranges; spool bookkeeping uses it."""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

#: Batches of at least this many ranges are merged with numpy (about 20 µs a call, whatever the
#: count); fewer are added one by one.
_VECTOR_MIN = 24


def _merge(starts: Any, ends: Any) -> tuple[array[int], array[int]]:
    """Ranges given as two int64 arrays, in any order and overlapping, as the sorted, disjoint
    ``(starts, ends)`` arrays of an :class:`IntervalSet` (touching ranges joined)."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # A range starts a merged run unless it begins at or before the run's end so far.
    breaks = np.flatnonzero(starts[1:] > ends[:-1]) + 1
    return (array("q", starts[np.concatenate(([0], breaks))].tobytes()),
            array("q", ends[np.concatenate((breaks - 1, [len(ends) - 1]))].tobytes()))


class IntervalSet:
    """Sorted disjoint ``[start, end)`` ranges. Adding adjacent ranges merges them, so a set that
    grows in order (the common case: batches sealed and committed oldest first) stays one range.
    Bounds live in int64 arrays (16 bytes a range): with dynamic partitioning the set holds one
    fragment per buffered record until the partitions' batches are committed."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts = array("q")
        self._ends = array("q")
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            start = min(start, self._starts[j])
            end = max(end, self._ends[j])
            j += 1
        self._starts[i:j] = array("q", (start,))
        self._ends[i:j] = array("q", (end,))

    def add_many(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Add every range of ``ranges`` (a sealed batch's, in any order). A partitioned stream's
        batch has a fragment per record, so a large batch is merged with numpy in one sort of the
        new ranges and the set's ranges they reach, not range by range in Python."""
        if not isinstance(ranges, Ranges):
            ranges = Ranges(ranges)
        if len(ranges) < _VECTOR_MIN:
            for start, end in ranges:
                self.add(start, end)
            return
        new = np.frombuffer(ranges.flat, dtype=np.int64).reshape(-1, 2)
        new = new[new[:, 1] > new[:, 0]]
        if not len(new):
            return
        lo, hi = int(new[:, 0].min()), int(new[:, 1].max())
        # The set's ranges that touch [lo, hi]: every other range is kept as it is.
        i = bisect.bisect_left(self._ends, lo)
        j = bisect.bisect_right(self._starts, hi)
        self._starts[i:j], self._ends[i:j] = _merge(
            np.concatenate((np.frombuffer(self._starts, dtype=np.int64)[i:j], new[:, 0])),
            np.concatenate((np.frombuffer(self._ends, dtype=np.int64)[i:j], new[:, 1])))

    @classmethod
    def union(cls, *sets: IntervalSet) -> IntervalSet:
        """A new set of every integer in any of ``sets``, merged in numpy from their arrays (no
        tuple per range: a partitioned stream's sets can hold a million fragments)."""
        out = cls()
        parts = [s for s in sets if len(s._starts)]
        if not parts:
            return out
        out._starts, out._ends = _merge(np.concatenate([np.frombuffer(s._starts, dtype=np.int64) for s in parts]),
                                        np.concatenate([np.frombuffer(s._ends, dtype=np.int64) for s in parts]))
        return out

    def covers(self, start: int, end: int) -> bool:
        """True when every integer in ``[start, end)`` is in the set (an empty range is covered)."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def __contains__(self, value: int) -> bool:
        return self.covers(value, value + 1)

    def next_gap(self, value: int) -> int:
        """The smallest integer >= ``value`` that is not in the set."""
        i = bisect.bisect_right(self._starts, value) - 1
        if i >= 0 and self._ends[i] > value:
            return self._ends[i]
        return value

    def next_start_after(self, value: int) -> int | None:
        """The start of the first range that begins after ``value``, or None."""
        i = bisect.bisect_right(self._starts, value)
        return self._starts[i] if i < len(self._starts) else None

    def last_end(self) -> int:
        """The end of the last range (0 for an empty set)."""
        return self._ends[-1] if self._ends else 0

    def __bool__(self) -> bool:
        return bool(self._starts)

    def ranges(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def discard_below(self, value: int) -> None:
        """Forget everything below ``value`` (memory stays bounded as the spool is trimmed)."""
        i = bisect.bisect_right(self._ends, value)
        if i:
            del self._starts[:i]
            del self._ends[:i]
        if self._starts and self._starts[0] < value:
            self._starts[0] = value

    def __len__(self) -> int:
        # Summed in numpy: a partitioned stream's sets hold thousands of ranges, and the backlog
        # gauge asks after every delivery.
        return int((np.frombuffer(self._ends, dtype=np.int64) - np.frombuffer(self._starts, dtype=np.int64)).sum())

    def __repr__(self) -> str:
        return f"IntervalSet({list(self.ranges())})"


class Ranges(Sequence[tuple[int, int]]):
    """A batch's ``[start, end)`` record ranges in one int64 array (16 bytes a range, where a list
    of tuples costs about 120): a partition's batch has a range per record."""

    __slots__ = ("_flat",)

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self._flat = array("q")
        for start, end in ranges:
            self._flat.append(start)
            self._flat.append(end)

    @property
    def flat(self) -> array[int]:
        """The bounds as one array, ``[s0, e0, s1, e1, ...]`` (not a copy)."""
        return self._flat

    @classmethod
    def from_flat(cls, flat: array[int]) -> Ranges:
        """Ranges over a copy of ``flat`` (``[s0, e0, s1, e1, ...]``)."""
        out = cls()
        out._flat = array("q", flat)
        return out

    def __len__(self) -> int:
        return len(self._flat) // 2

    @overload
    def __getitem__(self, i: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[int, int]]: ...
    def __getitem__(self, i: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._flat[2 * i], self._flat[2 * i + 1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._flat[0::2], self._flat[1::2], strict=True)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Ranges):
            return self._flat == other._flat
        if isinstance(other, Sequence):
            return list(self) == [tuple(r) for r in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ranges({list(self)})"


def subtract_ranges(ranges: Iterable[tuple[int, int]], remove: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of half-open ``ranges`` that no range of ``remove`` covers, in their order."""
    out = list(ranges)
    for rs, re_ in remove:
        nxt: list[tuple[int, int]] = []
        for s, e in out:
            if e <= rs or s >= re_:
                nxt.append((s, e))
                continue
            if s < rs:
                nxt.append((s, rs))
            if e > re_:
                nxt.append((re_, e))
        out = nxt
    return out
