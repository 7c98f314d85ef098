"""Log files as a source: what Kinesis Agent does, inside the daemon (reference §12).

Files matching ``paths`` (globs, re-scanned every ``discovery_interval_ms``) are read as they
grow; each line (or multi-line record) becomes a record, converted by the source's ``processing``
options (Kinesis Agent's dataProcessingOptions) before it reaches the spool.

Guarantee: exactly once into the spool. A file is known by device and inode plus a fingerprint of
its first bytes (so a reused inode is a new file), and its position (the offset after the last
record in the spool) is committed in the same spool frame as the records it covers. A restart,
even after ``kill -9``, resumes from the spool: no gap, no duplicate, nothing kept under /var/run.

* **Rotation.** Rename-and-create: the renamed file is followed by inode through its open handle
  and read to its end; the new file at the name is a new file, read from its start. A file with a
  position that is no longer under a name ``paths`` matches and has no open handle (the daemon
  was down, or its descriptor was closed while idle) is looked for by identity (device, inode,
  first bytes) in the directory it was in (``IdentitySearch``); found under another name, it is
  read from its position to its end; not found, or holding other content, its position is released
  and the loss reported (``file_source_rotated_file_lost``, counted as
  ``firehose_FileSourceErrors_total{reason="rotated_file_lost"}``). Delete: the open handle is
  read to its end. Copytruncate: a file whose size falls below its position was
  truncated and is read again from its start; a copy that appears with the old content's
  fingerprint (when ``paths`` matches the rotated names) continues at the old position, so the
  copied lines are neither lost nor repeated. A file is released once it is at its end, no longer
  matched by ``paths`` (or deleted) and idle for ``close_inactive_ms``.
* **Partial lines** are not sent until their newline arrives, except at ``max_record_bytes``: a
  longer line is cut there, ends with ``truncated_record_terminator``, and the rest of it is
  skipped, as Kinesis Agent does. With ``multi_line_start_pattern`` a record runs from one
  matching line to the next; the last one is sent once the file has been idle for
  ``multi_line_timeout_ms`` (or is finished).
* **Back-pressure.** While the spool is at its cap nothing is read; nothing is buffered beyond one
  read chunk per file in progress, however many files or however large the backlog.
* **Bad input.** A file that cannot be opened or read is logged (``file_source_error``) and counted
  (``firehose_FileSourceErrors_total``), then retried on the next scan; a record a processing
  option cannot convert (binary garbage, a line the log format does not match) is sent unconverted,
  logged and counted; the other files and records keep flowing.
* **Positions** live under ``file/<device>:<inode>`` keys; a released file's key is removed. A
  stream may have several file sources; a file should be matched by one of them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import os
import re
import stat
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from firehose.interfaces import BuildContext, Source, SourceSink
from firehose.log import LogFullError
from firehose.models import StrictModel
from firehose.sources.file_position import FINGERPRINT_BYTES, FollowedFile, fingerprint, starts_with
from firehose.sources.file_records import RecordSplitter
from firehose.sources.identity_search import SEARCH_ENTRIES_PER_SCAN as SEARCH_ENTRIES_PER_SCAN  # re-exported
from firehose.sources.identity_search import Ident, IdentitySearch
from firehose.sources.identity_search import SearchStep as SearchStep  # re-exported

CHUNK_BYTES = 1 << 20
SMALL_CHUNK_BYTES = 64 << 10  # when the spool's cap is too small for a full chunk
COPY_HOLD_SECS = 5.0
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")
STARTED_KEY = "file/started"


class FileSourceConfig(StrictModel):
    """Log files tailed by the daemon, with Kinesis Agent's options, exactly once into the spool:
    positions are kept in the spool, rotations (rename, copytruncate, delete) are followed. The
    stream still takes Direct PUT."""

    stream_type: ClassVar[str] = "DirectPut"
    exclusive: ClassVar[bool] = False

    type: Literal["file"] = Field(description="`file`.")
    paths: list[str] = Field(
        min_length=1,
        description="Files to read: paths or globs such as `/var/log/app/*.log`, re-scanned every "
        "`discovery_interval_ms` (Kinesis Agent: filePattern).",
    )
    initial_position: Literal["start_of_file", "end_of_file"] = Field(
        default="end_of_file",
        description="Where files found at the stream's first start are read from; files found later are read "
        "from their start (Kinesis Agent: initialPosition, default END_OF_FILE).",
    )
    multi_line_start_pattern: str | None = Field(
        default=None,
        description="A regular expression: a record starts at each line it matches and runs to the next; "
        "unset: one record per line (Kinesis Agent: multiLineStartPattern).",
    )
    skip_header_lines: int = Field(
        default=0, ge=0,
        description="Lines skipped at the start of each file (Kinesis Agent: skipHeaderLines).",
    )
    max_record_bytes: int = Field(
        default=1_024_000, ge=16, le=1_024_000,
        description="Bytes of a record at most; a longer one is cut and ends with "
        "`truncated_record_terminator`, as Kinesis Agent truncates at Firehose's 1,000 KiB record limit.",
    )
    truncated_record_terminator: str = Field(
        default="\n",
        description="What ends a record cut at `max_record_bytes` (Kinesis Agent: truncatedRecordTerminator).",
    )
    processing: list[Any] = Field(
        default=[],
        description="Options converting each record before it reaches the spool, in order, each chosen by "
        "its `type` (Kinesis Agent: dataProcessingOptions).",
    )
    poll_interval_ms: int = Field(
        default=100, ge=10, le=60_000,
        description="Milliseconds between checks of a file for new data.",
    )
    discovery_interval_ms: int = Field(
        default=1000, ge=10, le=600_000,
        description="Milliseconds between scans of `paths` for new, rotated and deleted files.",
    )
    multi_line_timeout_ms: int = Field(
        default=1000, ge=10, le=600_000,
        description="With `multi_line_start_pattern`: milliseconds a file must be quiet before its last "
        "record is sent.",
    )
    close_inactive_ms: int = Field(
        default=5000, ge=10, le=3_600_000,
        description="Milliseconds a finished file (read to its end, no longer matched or deleted) stays open "
        "before it is released.",
    )

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or p.endswith("/"):
                raise ValueError(f"each path must name files (a path or a glob such as /var/log/app/*.log), got {p!r}")
        return v

    @field_validator("multi_line_start_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v.encode())
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from None
        return v

    @field_validator("processing", mode="before")
    @classmethod
    def _processing(cls, v: Any) -> Any:
        if not v:
            return []
        from pydantic import TypeAdapter

        from firehose.sources.file_options import FileOption

        return TypeAdapter(list[FileOption]).validate_python(v, strict=True)

    @model_validator(mode="after")
    def _terminator(self) -> FileSourceConfig:
        if len(self.truncated_record_terminator.encode()) >= self.max_record_bytes:
            raise ValueError("truncated_record_terminator must be shorter than max_record_bytes")
        return self

    def build(self, ctx: BuildContext, sink: SourceSink) -> FileSource:
        return FileSource(self, ctx, sink)


def matched_by(path: str, patterns: list[str]) -> bool:
    """Whether ``glob.glob`` of one of ``patterns`` could return ``path`` (component by component,
    with glob's rule that a wildcard does not match a leading dot)."""
    parts = path.split(os.sep)
    for pattern in patterns:
        pp = pattern.split(os.sep)
        if len(pp) == len(parts) and all(
            fnmatch.fnmatchcase(n, p) and (not glob.has_magic(p) or not n.startswith(".") or p.startswith("."))
            for n, p in zip(parts, pp, strict=True)
        ):
            return True
    return False


class FileSource(Source):
    """Tails the files of one ``type: file`` source into its stream's spool; see the module docstring."""

    stream_type = "DirectPut"

    def __init__(self, config: FileSourceConfig, ctx: BuildContext, sink: SourceSink) -> None:
        self.config = config
        self.sink = sink
        self.log = ctx.log.bind(source="file")
        self._files: dict[tuple[int, int], FollowedFile] = {}
        # Fingerprints of truncated files and their old positions: a copy made by copytruncate
        # continues there (kept for a while after the truncation).
        self._truncated: list[tuple[str, int, int, float]] = []
        # file -> (its position when last truncated, when)
        self._truncated_at: dict[tuple[int, int], tuple[int, float]] = {}
        # Files with a position that went missing from ``paths`` with no open handle, looked for
        # by identity; and the positions recovered at start, checked against the first scan.
        self._missing: dict[Ident, FollowedFile] = {}
        self._search = IdentitySearch()
        self._recovered: list[FollowedFile] = []
        self._convert: Callable[[bytes], bytes] | None = None
        if config.processing:
            from firehose.sources.file_options import build_converter

            self._convert = build_converter(config.processing)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_scan = True
        self._paused = False
        self._unsaved: dict[str, Any] = {}  # positions chosen by a scan, written after it
        self._scanning: asyncio.Future[None] | None = None
        self._last_scan = 0.0
        self._reported: set[tuple[str, str]] = set()
        m, label = sink.metrics, ctx.stream_name
        self._m = {
            "records": m.file_records.labels(label), "bytes": m.file_bytes.labels(label),
            "unconverted": m.file_unconverted.labels(label), "truncated": m.file_truncated.labels(label),
            "files": m.file_files.labels(label),
        }
        self._m_errors = m.file_errors
        # MULTILINE: the pattern is tried at line starts inside a chunk, where "^" must match.
        start = (re.compile(config.multi_line_start_pattern.encode(), re.MULTILINE)
                 if config.multi_line_start_pattern else None)
        self._splitter = RecordSplitter(config.max_record_bytes, config.truncated_record_terminator.encode(), start,
                                        self._m["truncated"].inc)
        self._stream = label

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._first_scan = STARTED_KEY not in self.sink.positions
        # What the spool knew of each file: a file found now with the same first bytes under a new
        # inode (copytruncate's copy, made while the daemon was down) continues where it stopped.
        now = time.monotonic()
        for key, pos in self.sink.positions.items():
            # Only full fingerprints: a short shared prefix is too weak to skip a file's start on.
            if key.startswith("file/") and isinstance(pos, dict) and pos.get("fp_len") == FINGERPRINT_BYTES:
                try:
                    self._truncated.append((str(pos["fp"]), int(pos["fp_len"]), int(pos["offset"]), now))
                except (KeyError, TypeError, ValueError):
                    continue
        self._recovered = self._tracked_positions()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"file-source-{self._stream}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._scanning is not None:  # a scan's worker thread outlives the cancelled task
            await asyncio.gather(self._scanning, return_exceptions=True)
        self._search.close()
        for f in list(self._files.values()):
            self._close(f)

    def describe(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ main loop
    async def _run(self) -> None:
        poll = self.config.poll_interval_ms / 1000.0
        while not self._stopping:
            try:
                now = time.monotonic()
                if now - self._last_scan >= self.config.discovery_interval_ms / 1000.0:
                    self._scanning = asyncio.get_running_loop().run_in_executor(None, self._scan)
                    await asyncio.shield(self._scanning)
                    self._last_scan = now
                    if self._first_scan or self._unsaved:
                        positions, self._unsaved = self._unsaved, {}
                        if self._first_scan:
                            positions[STARTED_KEY] = True
                        await self._put([], positions)
                        self._first_scan = False
                progressed = False
                for f in list(self._files.values()):
                    if self._stopping:
                        return
                    progressed |= await self._read(f)
                self._m["files"].set(len(self._files))
                if not progressed:
                    await asyncio.sleep(poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the stream: log it and go on
                self.log.exception("file_source_failed", error=str(exc))
                await asyncio.sleep(1.0)

    def _error(self, path: str, reason: str, exc: BaseException | str) -> None:
        self._m_errors.labels(self._stream, reason).inc()
        if (path, reason) not in self._reported:  # once per file and reason, not every poll
            self._reported.add((path, reason))
            self.log.warning("file_source_error", path=path, reason=reason, error=str(exc))

    # ------------------------------------------------------------------ discovery
    def _scan(self) -> None:
        """Find the files ``paths`` match now (runs on a worker thread: only stat/open calls)."""
        seen = self._scan_paths()
        self._unmatched(seen)
        for f in self._recovered:  # the first scan: positions whose file is no longer at its name
            if (f.dev, f.ino) not in seen and (f.dev, f.ino) not in self._files:
                self._look_for(f)
        self._recovered = []
        if self._missing:
            self._search_missing()
        horizon = time.monotonic() - 600
        self._truncated = [t for t in self._truncated if t[3] >= horizon]

    def _scan_paths(self) -> set[Ident]:
        """Follow each file ``paths`` matches now (once, under its first name); returns their identities."""
        seen: set[Ident] = set()
        for pattern in self.config.paths:
            for path in sorted(glob.glob(pattern)):
                st = self._stat_log(path)
                if st is None or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                self._matched(path, st)
        return seen

    def _stat_log(self, path: str) -> os.stat_result | None:
        """The status of a file ``paths`` matched, or None if it is not a log to tail (or, reported,
        cannot be examined)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            self._error(path, "stat", exc)
            return None
        if not stat.S_ISREG(st.st_mode) or path.endswith(COMPRESSED_SUFFIXES):
            return None  # logrotate's compressed rotations are not logs to tail (Kinesis Agent skips them too)
        return st

    def _matched(self, path: str, st: os.stat_result) -> None:
        """A file at ``path``, which ``paths`` matches: followed already, back from missing, or new."""
        ident = (st.st_dev, st.st_ino)
        f = self._files.get(ident)
        if f is None and ident in self._missing:  # back under a name ``paths`` matches
            f = self._back(self._missing.pop(ident), path)
        if f is None:
            self._track(path, st)
            return
        f.path, f.matched = path, True
        if f.fd < 0 and st.st_size != f.offset:
            self._open(f)

    def _unmatched(self, seen: set[Ident]) -> None:
        """Files followed that ``paths`` no longer matches (renamed away or deleted): one still open
        is read to its end through its descriptor; one closed while idle is looked for by identity."""
        for ident, f in list(self._files.items()):
            if ident not in seen:
                f.matched = False
                if f.fd < 0:  # closed at its end while idle, then renamed away or deleted: look for it
                    del self._files[ident]
                    self._truncated_at.pop(ident, None)
                    self._look_for(f)

    # ------------------------------------------------------------------ rotated files gone missing
    def _tracked_positions(self) -> list[FollowedFile]:
        """The files the spool holds positions for, under names this source's ``paths`` match (a
        stream's other file sources keep theirs)."""
        out = []
        for key, pos in self.sink.positions.items():
            if not key.startswith("file/") or key == STARTED_KEY or not isinstance(pos, dict):
                continue
            try:
                dev, ino = (int(n) for n in key.removeprefix("file/").split(":"))
                f = FollowedFile(dev, ino, str(pos["path"]), "", 0, 0, matched=False)
                f.restore(pos)
            except (KeyError, TypeError, ValueError):
                continue
            if matched_by(f.path, self.config.paths):
                out.append(f)
        return out

    def _look_for(self, f: FollowedFile) -> None:
        """``f`` has a position but is no longer at a name ``paths`` matches, and no descriptor
        follows it: look for it by identity where it was (rename rotation while we did not look)."""
        f.matched = False
        self._missing[(f.dev, f.ino)] = f
        self._search.want(os.path.dirname(f.path) or os.curdir, (f.dev, f.ino))

    def _back(self, f: FollowedFile, path: str) -> FollowedFile | None:
        """A missing file's inode is at ``path`` again: the same file, or (reused) another one."""
        self._search.drop((f.dev, f.ino))
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (f.dev, f.ino) and starts_with(fd, f.fp, f.fp_len)
            finally:
                os.close(fd)
        except OSError:
            same = True  # cannot tell now: kept, and the open or read that follows reports the error
        if not same:
            self._lost(f, "other_content")
            return None  # tracked as a new file
        self._files[(f.dev, f.ino)] = f
        return f

    def _search_missing(self) -> None:
        step = self._search.step()
        for directory, exc in step.failed:
            self._error(directory, "search", exc)
        for ident, reason in step.gone:
            self._lost(self._missing.pop(ident), reason)
        for ident, path in step.found:
            self._take_up(self._missing.pop(ident), path)

    def _take_up(self, f: FollowedFile, path: str) -> None:
        """Follow a missing file found at ``path``: from its position to its end, then released
        like any file renamed away (``_read``)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # renamed again since it was listed: another pass
            self._look_for(f)
            return
        except OSError as exc:
            try:
                unread: int | None = max(os.stat(path).st_size - f.offset, 0)
            except OSError:
                unread = None
            self._lost(f, "unreadable", error=str(exc), bytes_unread=unread)
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (f.dev, f.ino):  # replaced since it was listed
                os.close(fd)
                self._look_for(f)
                return
            same = starts_with(fd, f.fp, f.fp_len)
        except OSError as exc:
            os.close(fd)
            self._lost(f, "unreadable", error=str(exc))
            return
        if not same:  # the inode now holds another file: the one we knew is gone
            os.close(fd)
            self._lost(f, "other_content")
            return
        # Found now: quiet is counted from here, so it is released only after close_inactive_ms at
        # its end (a logger may still be writing to it through its old handle).
        f.fd, f.matched, f.seen_size, f.stall, f.last_growth = fd, False, -1, None, time.monotonic()
        self._files[(f.dev, f.ino)] = f
        self.log.info("file_source_rotated_file_found", path=f.path, found_as=path, offset=f.offset,
                      bytes_unread=max(st.st_size - f.offset, 0))

    def _lost(self, f: FollowedFile, reason: str, *, error: str | None = None, bytes_unread: int | None = None) -> None:
        """Give up a missing file: its position is released, the loss reported and counted.
        ``bytes_unread`` is None when unknowable (a file gone takes its size with it)."""
        self._unsaved[f.key] = None
        if reason in ("not_found", "directory_gone") and f.seen_size >= 0 and f.seen_size == f.offset:
            # It had been read to its end when last seen (closed while idle), then removed: old
            # logs cleaned up. Nothing is known to be lost, so this is not a warning.
            self.log.info("file_source_released", path=f.path, reason=f"{reason} after it was read to its end",
                          offset=f.offset)
            return
        self._m_errors.labels(self._stream, "rotated_file_lost").inc()
        self.log.warning("file_source_rotated_file_lost", path=f.path, reason=reason, offset=f.offset,
                         bytes_unread=bytes_unread, error=error)

    def _open(self, f: FollowedFile) -> bool:
        try:
            fd = os.open(f.path, os.O_RDONLY)
            st = os.fstat(fd)
        except OSError as exc:
            self._error(f.path, "open", exc)
            return False
        if (st.st_dev, st.st_ino) != (f.dev, f.ino):  # replaced between stat and open
            os.close(fd)
            return False
        f.fd = fd
        return True

    def _track(self, path: str, st: os.stat_result) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)  # the file actually opened (a rotation may have come after the stat)
            fp, fp_len = fingerprint(fd, FINGERPRINT_BYTES)
        except OSError as exc:
            self._error(path, "open", exc)
            return
        if (st.st_dev, st.st_ino) in self._files:
            os.close(fd)
            return
        f = FollowedFile(st.st_dev, st.st_ino, path, fp, fp_len, 0, fd=fd, header_left=self.config.skip_header_lines)
        saved = self.sink.positions.get(f.key)
        if isinstance(saved, dict) and self._same_content(fd, saved):
            f.restore(saved)
        else:
            copied = self._copy_of(fd, st.st_size)
            original = None if copied is not None else self._original_of(fd, st.st_size)
            if copied is not None:
                f.offset, f.header_left = copied, 0
            elif original is not None:
                f.held_by, f.held_since = original, time.monotonic()
                f.held_until = f.held_since + COPY_HOLD_SECS
            elif self._first_scan and self.config.initial_position == "end_of_file":
                f.offset, f.header_left = st.st_size, 0
            if f.offset:  # a position a restart could not work out again: into the spool with the next write
                self._unsaved[f.key] = f.position()
        self._files[(f.dev, f.ino)] = f
        self.log.info("file_source_following", path=path, offset=f.offset)

    @staticmethod
    def _same_start(f: FollowedFile) -> bool:
        try:
            return starts_with(f.fd, f.fp, f.fp_len)
        except OSError:
            return True  # unreadable now: reported by the read that follows

    @staticmethod
    def _same_content(fd: int, saved: dict[str, Any]) -> bool:
        try:
            return starts_with(fd, str(saved["fp"]), int(saved["fp_len"]))
        except (KeyError, ValueError, TypeError, OSError):
            return False

    def _copy_of(self, fd: int, size: int) -> int | None:
        """The old position, if this new file is copytruncate's copy of a truncated file."""
        for fp, fp_len, offset, _when in self._truncated:
            if fp_len >= 64 and size >= offset and starts_with(fd, fp, fp_len):
                return offset
        return None

    def _original_of(self, fd: int, size: int) -> tuple[int, int] | None:
        """A file being read whose first bytes this new file repeats (a copy in the making)."""
        for ident, other in self._files.items():
            if other.fp_len >= 64 and size >= other.fp_len and starts_with(fd, other.fp, other.fp_len):
                return ident
        return None

    def _close(self, f: FollowedFile) -> None:
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1

    # ------------------------------------------------------------------ reading
    async def _read(self, f: FollowedFile) -> bool:
        """Read what ``f`` has past its position; returns True if it made progress."""
        st = self._stat_open(f)
        if st is None:
            return False
        now = time.monotonic()
        # Truncation is checked even while the spool is full, so a copytruncate during an outage
        # is not mistaken for growth: a smaller size, or (when it grew) other first bytes.
        grew = st.st_size != f.seen_size
        if self._truncated_now(f, st.st_size, grew=grew):
            await self._restart(f, st.st_size, now)
            return True
        chunk, room = self._chunk_and_room()
        if f.held_by is not None and not await self._hold_ends(f, f.held_by, grew=grew, room=room, now=now):
            return False
        if not self._room_to_read(room):
            return False
        return await self._read_on(f, st, chunk, now)

    def _stat_open(self, f: FollowedFile) -> os.stat_result | None:
        """The status of ``f``'s open descriptor; None if it has none, or (reported) cannot be read."""
        if f.fd < 0:
            return None
        try:
            return os.fstat(f.fd)
        except OSError as exc:
            self._error(f.path, "read", exc)
            return None

    def _truncated_now(self, f: FollowedFile, size: int, *, grew: bool) -> bool:
        """Whether ``f`` was truncated: its size is below its position or, when it grew, its first
        bytes changed (truncated, then written past the old position)."""
        return size < f.offset or bool(grew and f.offset and f.fp_len and not self._same_start(f))

    async def _restart(self, f: FollowedFile, size: int, now: float) -> None:
        """Read a truncated file again from its start, its position reset in the spool. Its old
        fingerprint and position are kept, so copytruncate's copy continues there."""
        self._truncated.append((f.fp, f.fp_len, f.offset, now))
        self._truncated_at[(f.dev, f.ino)] = (f.offset, now)
        self.log.info("file_source_truncated", path=f.path, offset=f.offset, size=size)
        f.offset, f.skip_line, f.skip_record = 0, False, False
        f.header_left = self.config.skip_header_lines
        f.fp, f.fp_len = fingerprint(f.fd, FINGERPRINT_BYTES)
        f.seen_size, f.stall = size, None
        await self._put([], {f.key: f.position()})

    def _chunk_and_room(self) -> tuple[int, bool]:
        """The bytes a read takes (fewer when the spool's cap is too small for a full chunk), and
        whether the spool takes records now."""
        chunk = CHUNK_BYTES if self.sink.has_room(CHUNK_BYTES) else SMALL_CHUNK_BYTES
        return chunk, self.sink.accepting and self.sink.has_room(chunk)

    async def _hold_ends(self, f: FollowedFile, original: Ident, *, grew: bool, room: bool, now: float) -> bool:
        """Whether ``f``, held as a possible copytruncate copy of ``original``, is read now: as the
        copy (continuing at the original's old position) once the original was truncated after
        ``f`` appeared; as a file of its own (from its start) once the original is gone, or the
        hold ran out with room in the spool. Otherwise it keeps waiting."""
        cut = self._truncated_at.get(original)
        if grew:  # a copy still being written: keep waiting for the original's truncation
            f.held_until = max(f.held_until, now + COPY_HOLD_SECS)
        if cut is not None and cut[1] >= f.held_since:
            # the original was truncated after this file appeared: this is its copy
            f.offset, f.header_left, f.held_by = cut[0], 0, None
            await self._put([], {f.key: f.position()})
        elif original not in self._files or (room and now >= f.held_until):
            f.held_by = None  # not a copy after all: a file of its own, read from its start
        else:
            return False
        return True

    def _room_to_read(self, room: bool) -> bool:
        """Back-pressure: nothing is read while the spool is full (or stopping); the pause and the
        resumption are logged once each."""
        if not room:
            if not self._paused:
                self._paused = True
                self.log.info("file_source_paused", reason="spool full" if self.sink.accepting else "stopping")
            return False
        if self._paused:
            self._paused = False
            self.log.info("file_source_resumed")
        return True

    async def _read_on(self, f: FollowedFile, st: os.stat_result, chunk: int, now: float) -> bool:
        """Read ``f`` on from its position, with room in the spool; a file at its end is released
        once finished, or its descriptor closed once idle."""
        if st.st_size != f.seen_size:
            f.seen_size, f.last_growth = st.st_size, now
        quiet = now - f.last_growth
        finished = (not f.matched or st.st_nlink == 0) and quiet >= self.config.close_inactive_ms / 1000.0
        if st.st_size == f.offset:
            return await self._at_end(f, quiet=quiet, finished=finished)
        if self._stalled(f, st.st_size, quiet=quiet, finished=finished):
            return False  # an unchanged partial tail: not read again every poll
        return await self._read_chunk(f, chunk, st.st_size, quiet=quiet, finished=finished)

    async def _at_end(self, f: FollowedFile, *, quiet: float, finished: bool) -> bool:
        """``f`` is read to its end: released once finished; returns True if it was."""
        if finished:  # rotated away or deleted, read to its end and quiet: release it
            await self._release(f)
            return True
        if quiet >= self.config.close_inactive_ms / 1000.0 and f.held_by is None:
            # Idle at its end: give the descriptor back (a scan reopens it when it grows), so
            # thousands of finished files that still match do not hold thousands of fds.
            self._close(f)
        return False

    async def _release(self, f: FollowedFile) -> None:
        """Stop following ``f``; its position is removed from the spool."""
        self._close(f)
        del self._files[(f.dev, f.ino)]
        self._truncated_at.pop((f.dev, f.ino), None)
        await self._put([], {f.key: None})
        self.log.info("file_source_released", path=f.path, offset=f.offset)

    def _stalled(self, f: FollowedFile, size: int, *, quiet: float, finished: bool) -> bool:
        """Whether the last read of ``f`` found nothing to send and nothing it depended on changed
        since: the size, and whether the file has become quiet or finished."""
        if f.stall is None:
            return False
        stall_size, eof_was, final_was = f.stall
        return stall_size == size and (eof_was or quiet < self.config.multi_line_timeout_ms / 1000.0) and (
            final_was or not finished
        )

    async def _read_chunk(self, f: FollowedFile, chunk: int, size: int, *, quiet: float, finished: bool) -> bool:
        """Read up to ``chunk`` bytes at ``f``'s position and put the records they complete into the
        spool with the position after them; returns True if it did."""
        try:
            data = await asyncio.to_thread(os.pread, f.fd, chunk, f.offset)
        except OSError as exc:
            self._error(f.path, "read", exc)
            return False
        if f.fp_len < FINGERPRINT_BYTES and f.offset < FINGERPRINT_BYTES:
            f.fp, f.fp_len = fingerprint(f.fd, FINGERPRINT_BYTES)
        at_end = f.offset + len(data) >= size
        eof = at_end and quiet >= self.config.multi_line_timeout_ms / 1000.0 and data.endswith(b"\n")
        final = at_end and finished
        records, consumed = self._splitter.split(f, data, eof=eof, final=final)
        if not records and consumed == 0:
            f.stall = (size, eof, final)  # nothing to do until one of these changes
            return False
        f.stall = None
        await self._emit(f, records, consumed)
        return True

    async def _emit(self, f: FollowedFile, records: list[bytes], consumed: int) -> None:
        """Convert and put ``records`` (which span ``consumed`` bytes from ``f.offset``) in one
        spool frame with the position after them (a read is at most CHUNK_BYTES)."""
        if self._convert is not None:
            records = [self._converted(f, r) for r in records]
        old = f.offset
        f.offset += consumed
        try:
            await self._put(records, {f.key: f.position()})
        except BaseException:
            f.offset = old
            raise
        if records:
            self._m["records"].inc(len(records))
            self._m["bytes"].inc(sum(map(len, records)))

    def _converted(self, f: FollowedFile, record: bytes) -> bytes:
        from firehose.sources.file_options import ConversionError

        assert self._convert is not None
        try:
            return self._convert(record)
        except ConversionError as exc:
            self._m["unconverted"].inc()
            self._error(f.path, "conversion", exc)
            return record

    async def _put(self, records: list[bytes], positions: dict[str, Any]) -> None:
        """Put into the spool, waiting while it is full (back-pressure, never a drop)."""
        nbytes = sum(map(len, records))
        while True:
            while not self.sink.has_room(nbytes) and not self._stopping:
                await asyncio.sleep(0.05)
            try:
                await self.sink.put(records, nbytes=nbytes, positions=positions)
                return
            except LogFullError:
                await asyncio.sleep(0.05)
