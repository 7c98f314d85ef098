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
"""

from __future__ import annotations

from typing import Any

from firehose.config import StreamConfig
from firehose.records import ErrorInfo, Outcome, RecordMeta
from firehose.registry import METADATA_EXTRACTION, load
from firehose.stages.common import StageContext

_INLINE_TYPES = frozenset(("metadata_extraction", "append_delimiter"))


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


class InlineExtraction:
    """Each record's metadata as the processing stage would record it, computed when read."""

    def __init__(self, ctx: StageContext, query: str) -> None:
        self.clock = ctx.clock
        self.query = query
        self._extract = load(METADATA_EXTRACTION)
        m = ctx.metrics
        self._m_failed = m.failed_processing_records.labels(ctx.name)
        self._m_ok = m.succeed_processing_records.labels(ctx.name)
        self._m_ok_bytes = m.succeed_processing_bytes.labels(ctx.name)

    def metas(self, records: list[bytes], source: list[Any] | None, arrival_ms: int, *,
              count: bool = True) -> list[Any]:
        """One metadata per record: a source's own error is kept; otherwise the keys, or the
        extraction's error (with the Kinesis sequence numbers of a Kinesis source's record)."""
        todo = [i for i in range(len(records)) if source is None or RecordMeta.error(source[i]) is None]
        outcomes = self._extract([Outcome(i, records[i]) for i in todo], self.query)
        out: list[Any] = list(source) if source is not None else [None] * len(records)
        now_ms = self.clock.now_ms()
        failed = ok_bytes = 0
        for o in outcomes:
            i = todo[o.source]
            if o.result == "Ok":
                ok_bytes += len(o.data)
                out[i] = RecordMeta.keyed({"partitionKeyFromQuery:" + k: v for k, v in (o.query_keys or {}).items()})
                continue
            failed += 1
            err = ErrorInfo(o.error_code, o.error_message, o.error_output_type, o.attempts, arrival_ms, now_ms)
            kinesis = RecordMeta.kinesis(out[i])
            if kinesis is not None:
                err.extra["sequenceNumber"] = kinesis.get("sequenceNumber")
                err.extra["subSequenceNumber"] = kinesis.get("subsequenceNumber")
            out[i] = RecordMeta.failed(err)
        if count:
            self._m_failed.inc(failed)
            self._m_ok.inc(len(outcomes) - failed)
            self._m_ok_bytes.inc(ok_bytes)
        return out

    def meta_of(self, record: bytes, source: Any, arrival_ms: int) -> Any:
        """One record's metadata (an archive batch read back after a restart)."""
        return self.metas([record], [source], arrival_ms, count=False)[0]
