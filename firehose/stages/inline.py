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
daemon, spoken to over pipes by the event loop itself (``firehose/stages/extract_worker.py``); the
batcher asks for the next frame's keys while it routes the current one. Smaller frames, and any
frame while the worker starts or after it failed, are extracted in the daemon. Both run
:func:`extract_frame`, the same pure function, so where it ran changes nothing.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from typing import Any, NamedTuple

import structlog

from firehose.config import StreamConfig
from firehose.log import FrameFile, LogError, RecordFrame
from firehose.records import Outcome, RecordMeta
from firehose.registry import METADATA_EXTRACTION, QUERY_KEYS, load
from firehose.spool_format import decode_records_payload
from firehose.stages.common import StageContext
from firehose.stages.extract_worker import ANSWER_TIMEOUT_SECS, SharedWorker, WorkerFailed
from firehose.stages.processing import QUERY_KEY, outcome_meta

_INLINE_TYPES = frozenset(("metadata_extraction", "append_delimiter"))
#: Frames with at least this many records are extracted in the worker process.
POOL_MIN_RECORDS = 64
#: Worker processes for extraction: one, where there is a second core.
POOL_PROCESSES = 1 if (os.cpu_count() or 1) > 1 else 0

#: The worker's two calls: a frame's records sent, or where the frame is stored.
RECORDS, STORED = "records", "stored"

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


class FrameMetas(NamedTuple):
    """A frame's metadata, compact: record ``i``'s is ``distinct[codes[i]]`` (records of one
    partition share one entry), with what the extraction counted. ``picked[c]`` lists the records
    of code ``c`` in order, ``sizes[c]`` their bytes: the batcher buffers a frame a partition at a
    time without touching its records again."""

    distinct: list[Any]
    codes: array[int]
    extracted: int  # records extracted (not those a source had failed already)
    failed: int
    ok_bytes: int  # bytes of the records that passed
    picked: list[list[int]]
    sizes: list[int]

    def expand(self) -> list[Any]:
        """Each record's metadata."""
        distinct = self.distinct
        return [distinct[c] for c in self.codes]


def extract_frame(query: str, records: list[bytes], source: list[Any] | None, arrival_ms: int,
                  now_ms: int) -> FrameMetas:
    """Each record's metadata as the processing stage would record it (``outcome_meta``): a
    source's own error is kept; otherwise the keys, or the extraction's error. A pure function
    of its arguments (run in the daemon or in a worker process).

    A record whose keys are plain strings found by a path-only query gets them directly
    (``query_keys``), and records with the same keys share their metadata; the others go
    through ``metadata_extraction`` itself, which decides their keys or their error."""
    codes = array("I", [0]) * len(records)
    distinct: list[Any] = []
    picked: list[list[int]] = []
    sizes: list[int] = []

    def alone(i: int, meta: Any) -> None:  # a record with metadata of its own
        codes[i] = len(distinct)
        distinct.append(meta)
        picked.append([i])
        sizes.append(len(records[i]))

    todo = list(range(len(records)))
    if source is not None:
        todo = []
        for i, meta in enumerate(source):
            if RecordMeta.error(meta) is None:
                todo.append(i)
            else:  # failed before: kept
                alone(i, meta)
    plain = load(QUERY_KEYS)([records[i] for i in todo], query, QUERY_KEY)
    ok_bytes = 0
    rest = todo
    if plain is not None:
        rest = []
        shared: dict[tuple[str, ...], int] = {}
        for i, keys in zip(todo, plain, strict=True):
            if keys is None:
                rest.append(i)
                continue
            ident = tuple(keys.values())
            code = shared.get(ident)
            if code is None:
                code = shared[ident] = len(distinct)
                distinct.append(RecordMeta.keyed(keys))
                picked.append([])
                sizes.append(0)
            codes[i] = code
            picked[code].append(i)
            n = len(records[i])
            sizes[code] += n
            ok_bytes += n
    failed = 0
    for o in load(METADATA_EXTRACTION)([Outcome(k, records[i]) for k, i in enumerate(rest)], query) if rest else ():
        i = rest[o.source]
        if o.result == "Ok":
            ok_bytes += len(o.data)
        else:
            failed += 1
        alone(i, outcome_meta(o, (i, records[i], arrival_ms, source[i] if source is not None else None), now_ms, None))
    return FrameMetas(distinct, codes, len(todo), failed, ok_bytes, picked, sizes)


def extract_stored(query: str, where: FrameFile, now_ms: int) -> FrameMetas:
    """:func:`extract_frame` of the frame stored at ``where`` (read here: run in the worker
    process, it spares the daemon sending the records). Raises when the file does not hold
    that frame."""
    fd = os.open(where.path, os.O_RDONLY)
    try:
        payload = os.pread(fd, where.length, where.offset)
    finally:
        os.close(fd)
    if len(payload) != where.length:
        raise LogError(f"{where.path}: the frame of record {where.first_seq} is cut short")
    frame, _ = decode_records_payload(payload)
    if (frame.first_seq, frame.end_seq) != (where.first_seq, where.end_seq):
        raise LogError(f"{where.path}: the frame at {where.offset} is not that of record {where.first_seq}")
    return extract_frame(query, frame.records, frame.meta, frame.arrival_ms, now_ms)


_worker = SharedWorker()


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
    def worker_pid(self) -> int | None:
        """The worker process's pid while it runs and this stream uses it."""
        return _worker.pid if id(self) in _worker.users else None

    @property
    def worker_ready(self) -> bool:
        return self.worker_pid is not None and _worker.ready

    def metas(self, records: list[bytes], source: list[Any] | None, arrival_ms: int, *,
              count: bool = True) -> FrameMetas:
        """The records' metadata, extracted here."""
        out = extract_frame(self.query, records, source, arrival_ms, self.clock.now_ms())
        if count:
            self._count(out)
        return out

    def _count(self, out: FrameMetas) -> None:
        self._m_failed.inc(out.failed)
        self._m_ok.inc(out.extracted - out.failed)
        self._m_ok_bytes.inc(out.ok_bytes)

    def start(self, frame: RecordFrame | FrameFile) -> asyncio.Future[Any] | None:
        """Send the frame to the worker process when it is large enough and the worker is up (see
        the module docstring): where it is stored when the log says (the worker reads it), else
        its records. :meth:`finish` gives its metadata. None: extracted here, then."""
        if not self.processes or frame.end_seq - frame.first_seq < POOL_MIN_RECORDS:
            return None
        _worker.acquire(self)
        if not _worker.ready:
            return None
        try:
            if isinstance(frame, FrameFile):
                return _worker.submit(STORED, self.query, frame, self.clock.now_ms())
            return _worker.submit(RECORDS, self.query, frame.records, frame.meta, frame.arrival_ms, self.clock.now_ms())
        except WorkerFailed as exc:
            log.warning("extraction_worker_failed", stream=self.name, error=str(exc))
            return None

    async def finish(self, sent: asyncio.Future[Any] | None, records: list[bytes], source: list[Any] | None,
                     arrival_ms: int) -> FrameMetas:
        """The metadata of a frame :meth:`start` took: the worker's answer, or extracted here
        (not sent, or the worker failed)."""
        if sent is not None:
            try:
                # A done answer is taken as is: wait_for would cost a turn of the loop.
                ok, answer = sent.result() if sent.done() else await asyncio.wait_for(sent, ANSWER_TIMEOUT_SECS)
                if not ok:
                    raise WorkerFailed(answer)
            except TimeoutError:
                _worker.timed_out()
            except WorkerFailed as exc:
                log.warning("extraction_worker_failed", stream=self.name, error=str(exc))
            else:
                self.pooled_frames += 1
                self._count(answer)
                return answer  # type: ignore[no-any-return]
        return self.metas(records, source, arrival_ms)

    async def frame_metas(self, records: list[bytes], source: list[Any] | None, arrival_ms: int) -> FrameMetas:
        """The records' metadata, from the worker process or extracted here."""
        sent = self.start(RecordFrame(0, arrival_ms, records, source))
        return await self.finish(sent, records, source, arrival_ms)

    async def aclose(self) -> None:
        """The stream stops: the worker process stops with the last stream using it."""
        self.processes = 0
        await _worker.release(self)

    def meta_of(self, record: bytes, source: Any, arrival_ms: int) -> Any:
        """One record's metadata (an archive batch read back after a restart)."""
        return self.metas([record], [source], arrival_ms, count=False).expand()[0]
