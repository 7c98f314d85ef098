"""The record shapes that flow through a stream's processing chain.

A processing batch starts as :class:`SourceRecord` objects (what the spool holds) and ends as
:class:`Outcome` objects, one or more per source record (de-aggregation makes several). Every
stage maps ``list[Outcome] -> list[Outcome]``; stages pass non-``Ok`` outcomes through untouched,
so a record failed by an early stage keeps its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

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

    def failed(self, code: str, message: str, error_output_type: str = PROCESSING_FAILED) -> Outcome:
        return replace(
            self, result="ProcessingFailed", error_code=code, error_message=message,
            error_output_type=error_output_type,
        )

    @property
    def ok(self) -> bool:
        return self.result == "Ok"


def initial_outcomes(records: list[SourceRecord]) -> list[Outcome]:
    return [Outcome(i, r.data) for i, r in enumerate(records)]
