"""A set of integers stored as sorted, merged half-open ranges; spool bookkeeping uses it."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class IntervalSet:
    """Sorted disjoint ``[start, end)`` ranges. Adding adjacent ranges merges them, so a set that
    grows in order (the common case: batches sealed and committed oldest first) stays one range."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
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
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

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
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __repr__(self) -> str:
        return f"IntervalSet({list(self.ranges())})"


def to_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Compress ascending sequence numbers into ``[start, end)`` ranges."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out
