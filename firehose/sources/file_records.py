"""Records in the bytes a file source reads: one a line or, with ``multi_line_start_pattern``, from
one start line to the next; header lines skipped; a record longer than ``max_record_bytes`` cut
there, ending with the terminator, and the rest of it skipped (see ``firehose.sources.file``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol


class SplitState(Protocol):
    """What splitting keeps of a file between reads (and restarts: it is part of its position)."""

    skip_line: bool  # inside a cut line: skip to its newline
    header_left: int  # header lines still to skip
    skip_record: bool  # inside a multi-line record cut at the limit: skip to the next start line


class RecordSplitter:
    """Splits what is read at a file's position into complete records.

    ``limit``: bytes of a record at most; ``terminator``: what ends a record cut there;
    ``start``: multi-line records' start pattern (compiled with ``re.MULTILINE``), None for one
    record a line; ``truncated``: called once for each record cut."""

    def __init__(
        self, limit: int, terminator: bytes, start: re.Pattern[bytes] | None, truncated: Callable[[], object]
    ) -> None:
        self.limit = limit
        self.terminator = terminator
        self.start = start
        self.truncated = truncated

    def split(self, f: SplitState, data: bytes, *, eof: bool, final: bool = False) -> tuple[list[bytes], int]:
        """Complete records in ``data`` (read at the file's position) and how many bytes they span.
        ``eof``: the file is quiet, so a pending multi-line record is complete; ``final``: the
        file is finished, so even a last line without its newline is a record."""
        limit = self.limit
        term = self.terminator
        records: list[bytes] = []
        pos = 0
        n = len(data)
        if f.skip_line:
            nl = data.find(b"\n")
            if nl < 0:
                return [], n  # still inside the cut line
            pos = nl + 1
            f.skip_line = False
        while f.header_left and pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return records, pos
            pos = nl + 1
            f.header_left -= 1
        if self.start is not None:
            return self._split_multiline(f, data, pos, eof=eof or final, records=records)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                if n - pos >= limit:  # a line longer than a record may be: cut it
                    records.append(data[pos : pos + limit - len(term)] + term)
                    self.truncated()
                    f.skip_line = True
                    return records, n
                if final:
                    records.append(data[pos:])
                    pos = n
                break
            end = nl + 1
            if end - pos > limit:
                records.append(data[pos : pos + limit - len(term)] + term)
                self.truncated()
            else:
                records.append(data[pos:end])
            pos = end
        return records, pos

    def _split_multiline(
        self, f: SplitState, data: bytes, pos: int, *, eof: bool, records: list[bytes]
    ) -> tuple[list[bytes], int]:
        """Records from one start line to the next. A record that outgrows ``limit``
        is cut there, ends with the terminator, and the rest of it (up to the next start line,
        across reads and restarts: ``skip_record``) is skipped."""
        assert self.start is not None
        limit = self.limit
        term = self.terminator
        n = len(data)
        line = pos
        if f.skip_record:  # inside a cut record: skip its lines up to the next start line
            while line < n:
                nl = data.find(b"\n", line)
                if nl < 0:
                    break
                if self.start.match(data, line, nl):
                    f.skip_record = False
                    break
                line = nl + 1
            if f.skip_record:
                if n - line >= limit:  # a partial line longer than a record: skip it too
                    f.skip_line = True
                    return records, n
                return records, line
        start = line  # the current record's first byte
        while line < n:
            nl = data.find(b"\n", line)
            if nl < 0:
                break
            if line > start and self.start.match(data, line, nl):
                rec = data[start:line]
                if len(rec) > limit:
                    rec = rec[: limit - len(term)] + term
                    self.truncated()
                records.append(rec)
                start = line
            line = nl + 1
        if eof and n > start:  # the last record is complete (a finished file's tail too)
            rec = data[start:n]
            if len(rec) > limit:
                rec = rec[: limit - len(term)] + term
                self.truncated()
            records.append(rec)
            return records, n
        if n - start >= limit:  # the current record is already longer than allowed: cut it now
            records.append(data[start : start + limit - len(term)] + term)
            self.truncated()
            f.skip_record = True
            if line < n:  # it ends in a partial line: skip that to its newline first
                f.skip_line = True
                return records, n
            return records, line
        return records, start
