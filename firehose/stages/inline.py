"""Partition keys extracted as the batcher reads the ingest log: dynamic partitioning's common case
without the processing stage.

A stream whose only processor is ``metadata_extraction`` (with or without ``append_delimiter``)
has nothing the processing stage must record: the extraction is a pure function of the record and
the query, so a replay after a crash computes exactly the keys (or the error) the first pass
did. Such a stream writes no outcome log: the batcher reads the ingest log and asks
:class:`InlineExtraction` for each frame's metadata, the same ``{"pk": ...}`` /
``{"err": ...}`` the processing stage would have recorded (the same extraction code, the same
error records). Every record is written and fsynced once instead of twice, and the per-record
bookkeeping of the stage (buffers, outcomes, the outcome frame, the raw commit) is gone.

Not taken (the processing stage runs as before) with any other processor, ``backup: {mode: all}``
(source copies are recorded beside the outcomes), a ``format:`` (records are checked against the
schema in the stage), a destination that reads record metadata at delivery, or an outcome log left
by an earlier config (its recorded outcomes are delivered first).

Exactly-once is unchanged: a batch is sealed (its ranges of the ingest log and its key) before it
is delivered, and re-sent under that key after a crash; records not sealed yet are routed again,
to the same partitions.

Parsing each record for its keys is most of the work (``orjson.loads`` of the whole record), and
in the daemon it holds the GIL that ingest needs. On a machine with more than one core, frames of
at least :data:`POOL_MIN_RECORDS` records are extracted in a worker process, one for the whole
daemon (the batcher asks for the next frame's while it routes the current one); smaller frames,
and any frame while the worker starts or after it failed, are extracted in the daemon. Both run :func:`extract_frame`, the same
pure function, so where it ran changes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from firehose.config import StreamConfig
from firehose.records import Outcome, RecordMeta
from firehose.registry import METADATA_EXTRACTION, load
from firehose.stages.common import StageContext
from firehose.stages.processing import outcome_meta

_INLINE_TYPES = frozenset(("metadata_extraction", "append_delimiter"))
#: Frames with at least this many records are extracted in the worker process.
POOL_MIN_RECORDS = 64
#: Worker processes for extraction: one, where there is a second core.
POOL_PROCESSES = 1 if (os.cpu_count() or 1) > 1 else 0

log = structlog.get_logger()


def inline_query(config: StreamConfig, *, backup_all: bool, converter: Any, leftover: bool,
                 reads_record_metadata: bool) -> str | None:
    """The ``metadata_extraction`` query when the stream can extract inline (see the module
    docstring), else None."""
    processors = config.processing
    if backup_all or converter is not None or leftover or reads_record_metadata or not processors:
        return None
    if any(getattr(p, "type", None) not in _INLINE_TYPES for p in processors):
        return None
    queries = [p.query for p in processors if getattr(p, "type", None) == "metadata_extraction"]
    return queries[0] if len(queries) == 1 else None


def extract_frame(query: str, records: list[bytes], source: list[Any] | None, arrival_ms: int,
                  now_ms: int) -> tuple[list[Any], int, int, int]:
    """Each record's metadata as the processing stage would record it (``outcome_meta``): a
    source's own error is kept; otherwise the keys, or the extraction's error. Also how many
    records were extracted, how many failed, and the bytes of those that passed. A pure function
    of its arguments (run in the daemon or in a worker process)."""
    todo = [i for i in range(len(records)) if source is None or RecordMeta.error(source[i]) is None]
    outcomes = load(METADATA_EXTRACTION)([Outcome(i, records[i]) for i in todo], query)
    out: list[Any] = list(source) if source is not None else [None] * len(records)
    failed = ok_bytes = 0
    for o in outcomes:
        i = todo[o.source]
        if o.result == "Ok":
            ok_bytes += len(o.data)
        else:
            failed += 1
        out[i] = outcome_meta(o, (i, records[i], arrival_ms, out[i]), now_ms, None)
    return out, len(todo), failed, ok_bytes


def _die_with_parent(parent: int) -> None:
    """In the worker process (Linux): the kernel kills it when the daemon dies, even by kill -9,
    instead of leaving it waiting for work that never comes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the daemon died before the call above
        os._exit(1)


class _SharedWorker:
    """The one extraction worker process of this daemon, shared by every stream that extracts
    inline (in cluster mode a daemon runs each stream's partitions as separate runtimes); it is
    started on first use and stopped when the last of them stops."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.ready = False  # the process has started
        self.users: set[int] = set()

    def acquire(self, user: object, processes: int) -> ProcessPoolExecutor:
        """The pool (started if need be; OSError/RuntimeError if it cannot start)."""
        self.users.add(id(user))
        if self.pool is None:
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_die_with_parent, initargs=(os.getpid(),))
            pool.submit(os.getpid).add_done_callback(functools.partial(self._started, pool))
            self.pool, self.ready = pool, False
        return self.pool

    def _started(self, pool: ProcessPoolExecutor, fut: Any) -> None:
        # Runs in the pool's thread: only a flag is set.
        if pool is self.pool:
            self.ready = not fut.cancelled() and fut.exception() is None

    def broken(self, pool: ProcessPoolExecutor) -> None:
        """``pool`` failed: the next use starts another."""
        if pool is self.pool:
            self.pool, self.ready = None, False
        pool.shutdown(wait=False, cancel_futures=True)

    def release(self, user: object) -> None:
        self.users.discard(id(user))
        if not self.users and self.pool is not None:
            self.broken(self.pool)


_worker = _SharedWorker()


class InlineExtraction:
    """Each record's metadata as the processing stage would record it, computed when read."""

    def __init__(self, ctx: StageContext, query: str, *, processes: int = POOL_PROCESSES) -> None:
        self.name = ctx.name
        self.clock = ctx.clock
        self.query = query
        self.processes = processes
        m = ctx.metrics
        self._m_failed = m.failed_processing_records.labels(ctx.name)
        self._m_ok = m.succeed_processing_records.labels(ctx.name)
        self._m_ok_bytes = m.succeed_processing_bytes.labels(ctx.name)
        self.pooled_frames = 0  # frames the worker extracted

    @property
    def worker(self) -> ProcessPoolExecutor | None:
        """The worker process's pool while it is up and this stream uses it."""
        return _worker.pool if id(self) in _worker.users else None

    @property
    def worker_ready(self) -> bool:
        return self.worker is not None and _worker.ready

    def metas(self, records: list[bytes], source: list[Any] | None, arrival_ms: int, *,
              count: bool = True) -> list[Any]:
        """The records' metadata, extracted here."""
        out, extracted, failed, ok_bytes = extract_frame(self.query, records, source, arrival_ms, self.clock.now_ms())
        if count:
            self._count(extracted, failed, ok_bytes)
        return out

    def _count(self, extracted: int, failed: int, ok_bytes: int) -> None:
        self._m_failed.inc(failed)
        self._m_ok.inc(extracted - failed)
        self._m_ok_bytes.inc(ok_bytes)

    async def frame_metas(self, records: list[bytes], source: list[Any] | None, arrival_ms: int) -> list[Any]:
        """The records' metadata, from the worker process when the frame is large enough and the
        worker is up (see the module docstring), else extracted here."""
        if self.processes and len(records) >= POOL_MIN_RECORDS:
            try:
                pool = _worker.acquire(self, self.processes)
            except (OSError, RuntimeError) as exc:
                log.warning("extraction_worker_failed", stream=self.name, error=f"{type(exc).__name__}: {exc}")
                self.processes = 0  # extract here from now on
            else:
                if _worker.ready:
                    try:
                        fut = pool.submit(extract_frame, self.query, records, source, arrival_ms, self.clock.now_ms())
                        out, extracted, failed, ok_bytes = await asyncio.wrap_future(fut)
                    except (BrokenProcessPool, OSError, RuntimeError) as exc:
                        log.warning("extraction_worker_failed", stream=self.name,
                                    error=f"{type(exc).__name__}: {exc}")
                        _worker.broken(pool)
                    else:
                        self.pooled_frames += 1
                        self._count(extracted, failed, ok_bytes)
                        return out
        return self.metas(records, source, arrival_ms)

    def close(self) -> None:
        """The stream stops: the worker process stops with the last stream using it."""
        self.processes = 0
        _worker.release(self)

    def meta_of(self, record: bytes, source: Any, arrival_ms: int) -> Any:
        """One record's metadata (an archive batch read back after a restart)."""
        return self.metas([record], [source], arrival_ms, count=False)[0]
