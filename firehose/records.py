"""The record shapes that flow through a stream's processing chain.

A processing batch starts as :class:`SourceRecord` objects (what the spool holds) and ends as
:class:`Outcome` objects, one or more per source record (de-aggregation makes several). Every
stage maps ``list[Outcome] -> list[Outcome]``; stages pass non-``Ok`` outcomes through untouched,
so a record failed by an early stage keeps its error.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Any, Literal, overload

Result = Literal["Ok", "Dropped", "ProcessingFailed"]

# Firehose's error-output types (reference §6.3), used as the !{firehose:error-output-type} value.
PROCESSING_FAILED = "processing-failed"
DECOMPRESSION_FAILED = "decompression-failed"
# Dynamic partitioning: Firehose's own string for these is not documented (reference §6.3).
PARTITIONING_FAILED = "partitioning-failed"
ACTIVE_PARTITION_EXCEEDED = "activePartitionExceeded"


# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ goes through
# object.__setattr__ per field, and these are built once per record on the hot path.
@dataclass(slots=True)
class SourceRecord:
    """A record as it arrived: ``record_id`` is unique within a processing batch."""

    record_id: str
    data: bytes
    arrival_ms: int
    kinesis: dict[str, Any] | None = None  # kinesisRecordMetadata for a Kinesis stream source


def sequence_position(index: int, n: int, what: str) -> int:
    """A sequence index (negative from the end) as a position in ``range(n)``."""
    i = operator.index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{what} index out of range")
    return i


class SourceBatch(Sequence[SourceRecord]):
    """A processing buffer's records held as columns, read from the spool in runs: record ``i``
    is ``SourceRecord(str(first_seq + i), datas[i], arrivals[i], kinesis[i])``, made only when
    asked for. The Lambda path reads the columns (the record bytes go to the worker as they
    are), so a buffer of a thousand records costs no thousand objects on the event loop; a step
    that wants :class:`SourceRecord` objects gets them (``list(batch)``). Slices are batches."""

    __slots__ = ("arrivals", "datas", "first_seq", "kinesis")

    def __init__(self, first_seq: int, datas: list[bytes], arrivals: list[int],
                 kinesis: list[dict[str, Any] | None] | None = None) -> None:
        self.first_seq = first_seq
        self.datas = datas
        self.arrivals = arrivals
        self.kinesis = kinesis  # None: no record has kinesisRecordMetadata

    @property
    def record_ids(self) -> list[str]:
        return list(map(str, range(self.first_seq, self.first_seq + len(self.datas))))

    def __len__(self) -> int:
        return len(self.datas)

    @overload
    def __getitem__(self, index: int) -> SourceRecord: ...
    @overload
    def __getitem__(self, index: slice) -> SourceBatch: ...

    def __getitem__(self, index: int | slice) -> SourceRecord | SourceBatch:
        n = len(self.datas)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise ValueError("a SourceBatch is sliced in runs only")
            stop = max(start, stop)
            return SourceBatch(self.first_seq + start, self.datas[start:stop], self.arrivals[start:stop],
                               self.kinesis[start:stop] if self.kinesis is not None else None)
        i = sequence_position(index, n, "SourceBatch")
        return SourceRecord(str(self.first_seq + i), self.datas[i], self.arrivals[i],
                            self.kinesis[i] if self.kinesis is not None else None)

    def __iter__(self) -> Iterator[SourceRecord]:
        first = self.first_seq
        return map(SourceRecord, map(str, range(first, first + len(self.datas))), self.datas, self.arrivals,
                   self.kinesis if self.kinesis is not None else repeat(None))


def record_datas(records: Sequence[SourceRecord]) -> list[bytes]:
    """The records' bytes, in order (a batch's own column, without making its records)."""
    return records.datas if isinstance(records, SourceBatch) else [r.data for r in records]


@dataclass(slots=True)
class Outcome:
    """What became of (part of) source record ``source`` (an index into the processing batch)."""

    source: int
    data: bytes
    result: Result = "Ok"
    partition_keys: dict[str, str] | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_output_type: str = PROCESSING_FAILED
    attempts: int = 1
    sub_index: int | None = None  # position within a de-aggregated source record
    meta: dict[str, Any] = field(default_factory=dict)
    query_keys: dict[str, str] | None = None  # MetadataExtraction's output (partitionKeyFromQuery)
    otf: dict[str, str] | None = None  # a Lambda's metadata.otfMetadata (Iceberg routing)

    def failed(self, code: str, message: str, error_output_type: str = PROCESSING_FAILED) -> Outcome:
        return replace(
            self, result="ProcessingFailed", error_code=code, error_message=message,
            error_output_type=error_output_type,
        )

    @property
    def ok(self) -> bool:
        return self.result == "Ok"


class UnchangedOutcomes(Sequence[Outcome]):
    """A processing buffer's outcomes when the function gave every record back Ok, with its own
    bytes and no metadata (an identity function, a filter that kept everything): outcome ``i`` is
    ``Outcome(i, datas[i], "Ok", attempts=attempts)``, made only when asked for. The processing
    stage records the records as they are, without an object per record on the event loop."""

    __slots__ = ("attempts", "datas")

    def __init__(self, datas: list[bytes], attempts: int) -> None:
        self.datas = datas
        self.attempts = attempts

    def __len__(self) -> int:
        return len(self.datas)

    @overload
    def __getitem__(self, index: int) -> Outcome: ...
    @overload
    def __getitem__(self, index: slice) -> list[Outcome]: ...

    def __getitem__(self, index: int | slice) -> Outcome | list[Outcome]:
        if isinstance(index, slice):
            return list(self)[index]
        i = sequence_position(index, len(self.datas), "UnchangedOutcomes")
        return Outcome(i, self.datas[i], attempts=self.attempts)

    def __iter__(self) -> Iterator[Outcome]:
        attempts = self.attempts
        return (Outcome(i, data, attempts=attempts) for i, data in enumerate(self.datas))

    def __eq__(self, other: object) -> bool:  # as the list of the same outcomes would compare
        return isinstance(other, list | UnchangedOutcomes) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


def initial_outcomes(records: list[SourceRecord]) -> list[Outcome]:
    return [Outcome(i, r.data) for i, r in enumerate(records)]


@dataclass(slots=True)
class ErrorInfo:
    """Why a record was not delivered, as its spool metadata keeps it (``{"err": ...}``) until the
    archiver writes it as a Firehose error record. :meth:`encode` / :meth:`decode` are the one
    place that knows the compact spool keys: ``c`` code, ``m`` message, ``t`` error-output type,
    ``a`` attempts, ``ts`` arrival, ``e`` attempt end, ``l`` Lambda ARN, ``x`` a destination's own
    members; any other key (``sequenceNumber``, ...) is kept in ``extra``."""

    code: str | None
    message: str | None
    output_type: str | None = PROCESSING_FAILED
    attempts: int = 1
    arrival_ms: int | None = None
    end_ms: int | None = None
    lambda_arn: str | None = None
    fields: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """The compact spool form (``l`` and ``x`` only when set)."""
        doc: dict[str, Any] = {"c": self.code, "m": self.message, "t": self.output_type, "a": self.attempts,
                               "ts": self.arrival_ms, "e": self.end_ms}
        if self.lambda_arn is not None:
            doc["l"] = self.lambda_arn
        if self.fields is not None:
            doc["x"] = self.fields
        doc.update(self.extra)
        return doc

    @classmethod
    def decode(cls, doc: dict[str, Any]) -> ErrorInfo:
        """Read the compact spool form (as written by every version: missing keys default)."""
        extra = {k: v for k, v in doc.items() if k not in _ERR_KEYS}
        return cls(doc.get("c"), doc.get("m"), doc.get("t"), doc.get("a", 1), doc.get("ts"), doc.get("e"),
                   doc.get("l"), doc.get("x"), extra)


_ERR_KEYS = frozenset(("c", "m", "t", "a", "ts", "e", "l", "x"))


class RecordMeta:
    """A record's metadata in the spool: None, or one JSON object whose members only this class
    names. ``err``: why the record failed (:class:`ErrorInfo`'s compact form); ``pk``: its
    partition keys, namespaced (``partitionKeyFromQuery:k``, ``partitionKeyFromLambda:k``);
    ``src``: an untransformed source copy (``backup: {mode: all}``); ``kinesis``: the
    kinesisRecordMetadata of a record read from a Kinesis data stream; ``otf``: a Lambda's
    ``otfMetadata`` (the Iceberg table and operation of the record). Plain dicts, not objects:
    routing reads them once per record."""

    SOURCE_COPY: dict[str, Any] = {"src": 1}

    @staticmethod
    def failed(err: ErrorInfo, kinesis: dict[str, Any] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"err": err.encode()}
        if kinesis is not None:
            doc["kinesis"] = kinesis
        return doc

    @staticmethod
    def keyed(partition_keys: dict[str, str]) -> dict[str, Any]:
        return {"pk": partition_keys}

    @staticmethod
    def from_kinesis(kinesis: dict[str, Any]) -> dict[str, Any]:
        return {"kinesis": kinesis}

    @staticmethod
    def error(meta: Any) -> dict[str, Any] | None:
        """The compact error of a failed record (None: it did not fail)."""
        return meta.get("err") if isinstance(meta, dict) else None

    @staticmethod
    def is_source_copy(meta: Any) -> bool:
        return isinstance(meta, dict) and bool(meta.get("src"))

    @staticmethod
    def routed(meta: Any) -> bool:
        """Whether the record goes to a buffer of its own (failed, or a source copy)."""
        return isinstance(meta, dict) and ("err" in meta or "src" in meta)

    @staticmethod
    def partition_keys(meta: Any) -> dict[str, Any] | None:
        pk = meta.get("pk") if isinstance(meta, dict) else None
        return pk if isinstance(pk, dict) else None

    @staticmethod
    def otf(meta: Any) -> dict[str, Any] | None:
        """A Lambda's ``otfMetadata`` of the record (``destinationDatabaseName``,
        ``destinationTableName``, ``operation``), or None."""
        otf = meta.get("otf") if isinstance(meta, dict) else None
        return otf if isinstance(otf, dict) else None

    @staticmethod
    def kinesis(meta: Any) -> dict[str, Any] | None:
        """The kinesisRecordMetadata of a record read from a Kinesis data stream."""
        kinesis = meta.get("kinesis") if isinstance(meta, dict) else None
        return kinesis if isinstance(kinesis, dict) else None
