"""The default :class:`firehose.log.Log`: the segmented file spool of firehose/spool.py, one
directory per log, held by one writer at a time.

Fencing: a writer holds an exclusive ``flock`` on the directory's ``LOCK`` file (the holder's pid
is written in it) from :meth:`FileLog.open` to :meth:`FileLog.aclose`. A second daemon, or
``firehose spool salvage``, meets :class:`LogBusyError` naming the pid instead of writing beside
it. The kernel drops the lock when the holder dies (``kill -9`` included), so a restart never
finds it stale. Before every seal and commit the writer checks that ``LOCK`` is still the file it
locked; if the directory was replaced or the file removed (another writer could now hold a lock
of its own), the log fences itself (:class:`LogFencedError`): appends are refused and the stream
reports itself failed until a restart.

The file cache (records kept in memory for the reader that follows the writer) and the read
plans for large batches stay inside :class:`firehose.spool.Spool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from typing import Any

from firehose.config import SpoolConfig
from firehose.intervals import IntervalSet
from firehose.log import (
    PROCESSED,
    FrameFile,
    Log,
    LogBusyError,
    LogError,
    LogFencedError,
    RecordFrame,
    RecoveryState,
    SealedBatch,
    SizedFrame,
)
from firehose.names import disk_name
from firehose.spool import FsyncPolicy, Spool

LOCK_NAME = "LOCK"


def lock_directory(directory: str, what: str = "the spool") -> tuple[int, tuple[int, int]]:
    """Take ``directory``'s lock (creating both), or raise LogBusyError naming the holder's pid.
    Returns the descriptor (closing it drops the lock) and the lock file's identity."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise LogBusyError(f"{directory}: {what} is in use by another process{who}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


@contextlib.contextmanager
def held(directory: str) -> Iterator[None]:
    """Hold ``directory``'s lock for an operator's command (salvage); LogBusyError if a daemon has it."""
    fd, _ = lock_directory(directory)
    try:
        yield
    finally:
        os.close(fd)


class FileLog:
    """One log in one directory (implements :class:`Log`). See the module docstring."""

    def __init__(self, directory: str, *, fsync: FsyncPolicy = "always", fsync_interval_ms: int = 200,
                 max_size_bytes: int = 1 << 30, segment_size_bytes: int = 64 << 20,
                 cache_bytes: int = 64 << 20) -> None:
        self.directory = directory
        self._spool = Spool(directory, fsync=fsync, fsync_interval_ms=fsync_interval_ms,
                            max_size_bytes=max_size_bytes, segment_size_bytes=segment_size_bytes,
                            cache_bytes=cache_bytes)
        self._lock_fd = -1
        self._lock_id: tuple[int, int] | None = None
        self._fenced: LogFencedError | None = None

    # ------------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return self.directory

    @property
    def next_seq(self) -> int:
        return self._spool.next_seq

    @property
    def min_seq(self) -> int:
        return self._spool.min_seq

    @property
    def sealed(self) -> IntervalSet:
        return self._spool.sealed

    @property
    def committed(self) -> IntervalSet:
        return self._spool.committed

    @property
    def size_bytes(self) -> int:
        return self._spool.size_bytes

    @property
    def max_size_bytes(self) -> int:
        return self._spool.max_size_bytes

    @property
    def positions(self) -> dict[str, Any]:
        return self._spool.positions

    @property
    def failed(self) -> LogError | None:
        return self._fenced or self._spool.failed

    # ------------------------------------------------------------------ ownership
    async def open(self) -> RecoveryState:
        self._lock_fd, self._lock_id = await asyncio.to_thread(lock_directory, self.directory)
        try:
            return await asyncio.to_thread(self._spool.open)
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the only descriptor drops the flock
            self._lock_fd = -1

    def _check_owner(self) -> None:
        """Raise LogFencedError unless ``LOCK`` is still the file this writer locked."""
        if self._fenced is not None:
            raise self._fenced
        try:
            st = os.stat(os.path.join(self.directory, LOCK_NAME))
            ours = (st.st_dev, st.st_ino) == self._lock_id
        except OSError:
            ours = False
        if not ours:
            self._fenced = LogFencedError(
                f"{self.directory}: the spool's lock file was replaced or removed, so another writer may "
                "hold the spool; this stream stops writing to it until the daemon restarts")
            raise self._fenced

    # ------------------------------------------------------------------ writing
    def has_room(self, nbytes: int) -> bool:
        return self._fenced is None and self._spool.has_room(nbytes)

    async def append(self, records: Sequence[bytes], arrival_ms: int, *, meta: list[Any] | None = None,
                     positions: dict[str, Any] | None = None, enforce_cap: bool = True,
                     nbytes: int | None = None) -> int:
        if self._fenced is not None:
            raise self._fenced
        first = self._spool.append_records(records, arrival_ms, meta=meta, positions=positions,
                                           enforce_cap=enforce_cap, nbytes=nbytes)
        await self._spool.wait_durable()
        return first

    def allocate_batch_id(self) -> int:
        return self._spool.allocate_batch_id()

    async def seal(self, batches: Sequence[SealedBatch]) -> None:
        self._check_owner()
        for batch in batches:
            if not self._spool.has_seal(batch.batch_id):
                await self._spool.append_seal(batch, durable=False)
        await self._spool.wait_durable(force=True)

    async def commit(self, batch_id: int, info: dict[str, Any] | None = None) -> None:
        self._check_owner()
        self._spool.append_commit(batch_id, info)

    async def commit_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._check_owner()
        self._spool.commit_ranges(ranges)

    # ------------------------------------------------------------------ reading
    async def read_frame(self, seq: int) -> RecordFrame | None:
        return self._spool.frame_at(seq)

    def sizes_at(self, seq: int) -> SizedFrame | None:
        return self._spool.sizes_at(seq)

    def frame_file(self, seq: int) -> FrameFile | None:
        return self._spool.frame_file(seq)

    def arrival_of(self, seq: int) -> int | None:
        frame = self._spool.frame_at(seq)
        return frame.arrival_ms if frame is not None else None

    def reader_passed(self, seq: int) -> None:
        self._spool.release_below(seq)

    async def read_records(self, ranges: Sequence[tuple[int, int]]) -> Sequence[bytes]:
        # The frame index is resolved on the loop (trimming shifts it); only the reads go to a thread.
        plan = self._spool.plan_records(ranges)
        return await asyncio.to_thread(self._spool.read_planned, plan)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
        return self._spool.read_ranges(ranges)

    def abandon(self) -> None:
        """Give the lock up without flushing anything: what the kernel does when the process dies.
        Tests use it to stand for a ``kill -9`` of a runtime running in their own process."""
        self._spool.abandon()
        self._unlock()

    async def aclose(self) -> None:
        try:
            await self._spool.aclose()
        finally:
            self._unlock()


class FileLogs:
    """The file :class:`firehose.log.LogStore`: a stream's ingest log is
    ``<data_dir>/spool/<stream>``; its other logs are subdirectories of it (``processed``)."""

    def __init__(self, data_dir: str, config: SpoolConfig) -> None:
        self.data_dir = data_dir
        self.config = config

    def directory(self, stream: str, name: str) -> str:
        base = os.path.join(self.data_dir, "spool", disk_name(stream))
        return base if name == "ingest" else os.path.join(base, disk_name(name))

    def log(self, stream: str, name: str, *, cache_bytes: int = 64 << 20) -> Log:
        sp = self.config
        # The outcome log is fsynced before the raw records it replaces are committed, whatever
        # the policy: otherwise a crash could lose both.
        fsync: FsyncPolicy = "always" if name == PROCESSED else sp.fsync
        return FileLog(self.directory(stream, name), fsync=fsync, fsync_interval_ms=sp.fsync_interval_ms,
                       max_size_bytes=sp.max_size_mib << 20, segment_size_bytes=sp.segment_size_mib << 20,
                       cache_bytes=cache_bytes)

    def exists(self, stream: str, name: str) -> bool:
        return os.path.isdir(self.directory(stream, name))
