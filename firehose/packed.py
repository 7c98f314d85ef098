"""A batch's records back to back in one buffer, read from the spool without a copy per record.

Delivery reads a sealed batch back from the spool: a 5 MiB batch is some 5,000 records from
about ten RECORDS frames. Reading each frame's records into a bytes object, slicing it into one
bytes object per record, and joining them again into the object's body cost two copies of the
batch and 5,000 allocations, all with the GIL held, in a worker thread beside the event loop that
acknowledges ingest. :func:`read_packed` reads the records' bytes straight into one buffer
(``os.preadv``, the GIL released) and keeps their offsets in a numpy array; an object store's
body is then the buffer itself. A destination that looks at records one by one still gets each
as ``bytes``, made when it asks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any, overload

import numpy as np

from firehose.records import sequence_position
from firehose.spool_format import SpoolError

# A plan step (Spool.plan_records): records still in memory, or where a frame's are on disk:
# (fd, frame offset, frame's first seq, frame's record count, first index, end index).
FileStep = tuple[int, int, int, int, int, int]
LengthTable = Callable[[int, int, int, int], Sequence[int]]


class PackedRecords(Sequence[bytes]):
    """Records held back to back in ``buffer``: record ``i`` is ``buffer[offsets[i]:offsets[i+1]]``.
    Indexing and iterating give ``bytes`` (a copy of that record); ``buffer`` is all of them."""

    __slots__ = ("_bounds", "_view", "buffer", "offsets")

    def __init__(self, buffer: bytearray, offsets: np.ndarray) -> None:
        if len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(buffer):
            raise ValueError("offsets must run from 0 to the buffer's length")
        self.buffer = buffer
        self.offsets = offsets
        self._view = memoryview(buffer)
        self._bounds: list[int] | None = None

    @classmethod
    def of(cls, records: Sequence[bytes]) -> PackedRecords:
        """Pack ``records`` (tests and in-memory records)."""
        return cls(bytearray(b"".join(records)), _bounds_of(records))

    @property
    def nbytes(self) -> int:
        """The records' bytes in all."""
        return len(self.buffer)

    def _offsets(self) -> list[int]:
        if self._bounds is None:  # Python ints index a memoryview several times faster than numpy's
            self._bounds = self.offsets.tolist()
        return self._bounds

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = sequence_position(index, len(self), "PackedRecords")
        bounds = self._offsets()
        return bytes(self._view[bounds[i] : bounds[i + 1]])

    def __iter__(self) -> Iterator[bytes]:
        view = self._view
        for start, end in pairwise(self._offsets()):
            yield bytes(view[start:end])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedRecords):
            return self.buffer == other.buffer and np.array_equal(self.offsets, other.offsets)
        if isinstance(other, list | tuple):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable buffer, as a list

    def __repr__(self) -> str:
        return f"PackedRecords({len(self)} records, {self.nbytes} bytes)"


def _bounds_of(records: Sequence[bytes]) -> np.ndarray:
    """Offsets 0, len(r0), len(r0)+len(r1), ... of ``records`` laid end to end."""
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    return np.concatenate((np.zeros(1, dtype=np.int64), np.cumsum(lengths)))


def records_nbytes(records: Sequence[bytes]) -> int:
    """The bytes of ``records`` in all, without a pass over them when they are packed."""
    return records.nbytes if isinstance(records, PackedRecords) else sum(map(len, records))


def read_packed(plan: Sequence[Any], length_table: LengthTable, where: str) -> PackedRecords:
    """The records of a ``Spool.plan_records`` plan, read into one buffer (blocking; for a worker
    thread). ``length_table(fd, offset, first, count)`` gives a frame's record file offsets."""
    spans: list[tuple[Any, int, int, np.ndarray]] = []  # (fd or records, file start, size, offsets from 0)
    total = 0
    for step in plan:
        if isinstance(step, list):
            rel = _bounds_of(step)
            spans.append((step, 0, int(rel[-1]), rel))
        else:
            fd, offset, first, count, lo, hi = step
            table = np.asarray(length_table(fd, offset, first, count), dtype=np.int64)[lo : hi + 1]
            rel = table - table[0]
            spans.append((fd, int(table[0]), int(rel[-1]), rel))
        total += int(rel[-1])
    buffer = bytearray(total)
    view = memoryview(buffer)
    starts: list[np.ndarray] = []
    pos = 0
    for source, start, size, rel in spans:
        if isinstance(source, list):
            view[pos : pos + size] = b"".join(source)
        else:
            _pread_into(source, view[pos : pos + size], start, where)
        starts.append(rel[:-1] + pos)
        pos += size
    starts.append(np.array([total], dtype=np.int64))
    return PackedRecords(buffer, np.concatenate(starts).astype(np.int64, copy=False))


def _pread_into(fd: int, view: memoryview, offset: int, where: str) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise SpoolError(f"{where}: records at offset {offset} do not read back (the file is shorter)")
        view = view[n:]
        offset += n
