"""Firehose's built-in processors, as pure functions over a processing batch.

Each processor maps ``list[Outcome] -> list[Outcome]`` the way one entry of a stream's
``ProcessingConfiguration.Processors`` does in Firehose (reference §4.3):

==============================  ==========================================================
Firehose processor              function
==============================  ==========================================================
(KPL de-aggregation, implicit)  :func:`kpl_deaggregation`
RecordDeAggregation             :func:`record_deaggregation`
Decompression                   :func:`decompression`
CloudWatchLogProcessing         :func:`cloudwatch_log_processing`
MetadataExtraction              :func:`metadata_extraction`
AppendDelimiterToRecord         (applied when objects are written: ``Batch.delimiter``)
==============================  ==========================================================

Shared contract of the outcome processors:

* only ``Ok`` outcomes are processed; ``Dropped`` and ``ProcessingFailed`` ones are returned
  unchanged, so a record failed by an earlier stage keeps its first error;
* output order follows input order, and the outcomes a record splits into stay together in order;
* every derived outcome keeps ``source`` (the index of the original source record) and everything
  else of its parent except what the processor changes (``dataclasses.replace``);
* a record that cannot be processed becomes ``ProcessingFailed`` with its data unchanged -- it is
  never silently dropped, because the error output is where the user finds it;
* a record that yields nothing (an aggregate holding no user records, a CloudWatch Logs control
  message) becomes ``Dropped`` with empty data rather than disappearing, so every source record
  stays accounted for.

Parameter values arrive already decoded (e.g. the ``Delimiter`` of RecordDeAggregation, which the
API carries base64-encoded, is passed here as raw bytes); validating them is the configuration
layer's job, but the processors still refuse values they cannot honour with ``ValueError``.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import replace
from typing import Any, Final, NoReturn

import orjson

from firehose.kpl import KplError, deaggregate
from firehose.records import DECOMPRESSION_FAILED, PARTITIONING_FAILED, Outcome

__all__ = [
    "MAX_SUB_RECORDS",
    "cloudwatch_log_processing",
    "decompression",
    "kpl_deaggregation",
    "metadata_extraction",
    "record_deaggregation",
]

#: RecordDeAggregation splits a record into at most this many sub-records; a record that would
#: yield more is passed on whole.
MAX_SUB_RECORDS: Final = 500

KPL_DEAGGREGATION_FAILED: Final = "Kinesis.KplDeaggregationFailed"
JSON_PARSING_FAILED: Final = "DeAggregation.JsonParsingFailed"
DECOMPRESSION_FAILED_CODE: Final = "Decompression.Failed"
CLOUDWATCH_LOGS_FAILED: Final = "CloudWatchLogs.ProcessingFailed"
METADATA_EXTRACTION_FAILED: Final = "DynamicPartitioning.MetadataExtractionFailed"

#: Firehose allows up to 50 partition keys per record.
MAX_PARTITION_KEYS: Final = 50

# JSON's insignificant whitespace (RFC 8259 §2): exactly these four, nothing Unicode-wide.
_JSON_WS: Final = re.compile(r"[ \t\n\r]*")


def kpl_deaggregation(outcomes: list[Outcome]) -> list[Outcome]:
    """Split every ``Ok`` outcome that holds a KPL aggregate into its user records.

    Each user record becomes an outcome with ``data`` = the user record's bytes, ``sub_index`` =
    its sub-sequence number, and ``meta`` = the parent's meta plus ``partitionKey`` and
    ``explicitHashKey`` (``None`` when the user record has none). Data without the KPL magic passes
    through unchanged. An aggregate that does not verify (bad MD5, malformed protobuf, table index
    out of range) becomes ``ProcessingFailed`` with code ``Kinesis.KplDeaggregationFailed`` and
    the parser's message; an aggregate holding no user records becomes ``Dropped``.
    """
    result: list[Outcome] = []
    for outcome in outcomes:
        if not outcome.ok:
            result.append(outcome)
            continue
        try:
            user_records = deaggregate(outcome.data)
        except KplError as exc:
            result.append(outcome.failed(KPL_DEAGGREGATION_FAILED, str(exc)))
            continue
        if user_records is None:
            result.append(outcome)
        elif not user_records:
            result.append(replace(outcome, result="Dropped", data=b""))
        else:
            result.extend(
                replace(
                    outcome,
                    data=user.data,
                    sub_index=user.sub_sequence,
                    meta={
                        **outcome.meta,
                        "partitionKey": user.partition_key,
                        "explicitHashKey": user.explicit_hash_key,
                    },
                )
                for user in user_records
            )
    return result


def record_deaggregation(
    outcomes: list[Outcome],
    sub_record_type: str,
    delimiter: bytes = b"",
) -> list[Outcome]:
    """Firehose's RecordDeAggregation: split each ``Ok`` record into sub-records.

    ``sub_record_type`` is Firehose's ``SubRecordType`` value, ``"JSON"`` or ``"DELIMITED"`` (typed
    ``str`` because it comes straight from configuration; anything else is a ``ValueError``).

    ``JSON``: the record must be a sequence of JSON *objects*, optionally separated by JSON
    whitespace (``{"a":1}{"a":2}``, NDJSON, pretty-printed objects). Each object becomes one
    outcome whose data is that object's exact original bytes -- not re-serialised, and without the
    whitespace around it. A record that is not such a sequence (invalid JSON, invalid UTF-8, a
    top-level array or scalar, NaN/Infinity) becomes ``ProcessingFailed`` with code
    ``DeAggregation.JsonParsingFailed`` and a message naming the byte offset of the fault.

    ``DELIMITED``: the record is split on every occurrence of ``delimiter`` (raw bytes; decode the
    API's base64 first); an empty piece after a final delimiter is dropped (the delimiter
    terminated the last sub-record), empty pieces elsewhere are kept as empty records.

    Sub-records get ``sub_index`` 0, 1, 2, ... A record that would yield more than
    :data:`MAX_SUB_RECORDS` sub-records passes through whole and unsplit (Firehose's documented
    cap), as does a record that yields none (empty or whitespace-only data), since there is
    nothing to split. Raises ``ValueError`` for an unknown ``sub_record_type`` or a ``DELIMITED``
    split without a delimiter.
    """
    if sub_record_type == "DELIMITED":
        if not delimiter:
            raise ValueError("RecordDeAggregation with SubRecordType DELIMITED needs a non-empty Delimiter")
    elif sub_record_type != "JSON":
        raise ValueError(f"unknown SubRecordType {sub_record_type!r}: expected 'JSON' or 'DELIMITED'")
    result: list[Outcome] = []
    for outcome in outcomes:
        if not outcome.ok:
            result.append(outcome)
            continue
        if sub_record_type == "JSON":
            try:
                pieces = _split_json_objects(outcome.data)
            except _JsonSplitError as exc:
                result.append(outcome.failed(JSON_PARSING_FAILED, str(exc)))
                continue
        else:
            pieces = _split_delimited(outcome.data, delimiter)
        if not pieces or len(pieces) > MAX_SUB_RECORDS:
            result.append(outcome)
        else:
            result.extend(replace(outcome, data=piece, sub_index=i) for i, piece in enumerate(pieces))
    return result


def decompression(outcomes: list[Outcome], compression_format: str = "GZIP") -> list[Outcome]:
    """Firehose's Decompression processor: gunzip each ``Ok`` record.

    Intended for CloudWatch Logs subscription payloads, which are gzip. A record holding several
    concatenated gzip members decompresses to their concatenation (as ``gzip.decompress`` and
    zcat do). A record that is not valid gzip (empty, bad header, corrupt or truncated stream, bad
    CRC or length, trailing garbage) becomes ``ProcessingFailed`` with code ``Decompression.Failed`` and
    error output type ``decompression-failed``, keeping its original compressed bytes as data so
    the error record carries them as ``rawData``. ``GZIP`` is the only format Firehose defines;
    anything else raises ``ValueError``.
    """
    if compression_format != "GZIP":
        raise ValueError(f"unsupported CompressionFormat {compression_format!r}: only 'GZIP' is defined")
    result: list[Outcome] = []
    for outcome in outcomes:
        if not outcome.ok:
            result.append(outcome)
            continue
        try:
            # gzip.decompress(b"") returns b"", but an empty record holds no gzip member at all.
            if not outcome.data:
                raise EOFError("record is empty")
            data = gzip.decompress(outcome.data)
        except (OSError, EOFError, zlib.error) as exc:
            # gzip raises BadGzipFile (an OSError) for header/trailer faults, EOFError for a
            # truncated stream and zlib.error for a corrupt deflate body.
            message = f"record is not valid GZIP data: {str(exc) or type(exc).__name__}"
            result.append(outcome.failed(DECOMPRESSION_FAILED_CODE, message, DECOMPRESSION_FAILED))
            continue
        result.append(replace(outcome, data=data))
    return result


def cloudwatch_log_processing(outcomes: list[Outcome], data_message_extraction: bool = True) -> list[Outcome]:
    """Firehose's CloudWatchLogProcessing: turn CloudWatch Logs envelopes into log lines.

    Expects each ``Ok`` record to be a decompressed subscription envelope
    ``{messageType, owner, logGroup, logStream, subscriptionFilters, logEvents: [{id, timestamp,
    message}]}`` (run :func:`decompression` first).

    With ``data_message_extraction`` (the default): a ``DATA_MESSAGE`` becomes one outcome per log
    event, in order, with data = the event's ``message`` + ``"\\n"`` in UTF-8 and ``sub_index`` =
    the event's position; a ``CONTROL_MESSAGE`` (CloudWatch Logs' connectivity probe), or a
    ``DATA_MESSAGE`` without events, becomes ``Dropped`` with empty data. A record that is not JSON,
    not an object, has another ``messageType``, or whose ``logEvents`` is not a list of objects
    with a string ``message`` becomes ``ProcessingFailed`` with code
    ``CloudWatchLogs.ProcessingFailed``.

    Without it, records pass through as they are (the envelope is delivered whole).
    """
    if not data_message_extraction:
        return list(outcomes)
    result: list[Outcome] = []
    for outcome in outcomes:
        if not outcome.ok:
            result.append(outcome)
            continue
        try:
            messages = _log_messages(outcome.data)
        except _EnvelopeError as exc:
            result.append(outcome.failed(CLOUDWATCH_LOGS_FAILED, str(exc)))
            continue
        if not messages:
            result.append(replace(outcome, result="Dropped", data=b""))
        else:
            result.extend(
                replace(outcome, data=message.encode("utf-8") + b"\n", sub_index=i)
                for i, message in enumerate(messages)
            )
    return result


# --- helpers ---------------------------------------------------------------------------------------


class _JsonSplitError(ValueError):
    """A record is not a sequence of JSON objects; the message names the byte offset."""


class _NonStandardConstantError(ValueError):
    """Raised from the decoder for NaN/Infinity, which Python's json accepts but JSON forbids."""


def _reject_constant(name: str) -> NoReturn:
    raise _NonStandardConstantError(name)


# strict=True (the default) already rejects raw control characters inside strings; parse_constant
# makes NaN, Infinity and -Infinity errors, as they are for every other JSON reader downstream.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _split_json_objects(data: bytes) -> list[bytes]:
    """Split ``data`` into the exact bytes of each top-level JSON object it holds.

    Raises :class:`_JsonSplitError` naming the byte offset of the first fault.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _JsonSplitError(f"invalid UTF-8 at byte offset {exc.start}") from None
    # raw_decode works in characters; sub-record boundaries have to be in bytes. For ASCII they
    # coincide; otherwise byte offsets are advanced by encoding each span once (linear overall).
    ascii_only = text.isascii()
    char_pos = 0
    byte_pos = 0

    def byte_offset(char_index: int) -> int:
        if ascii_only:
            return char_index
        return byte_pos + len(text[char_pos:char_index].encode("utf-8"))

    pieces: list[bytes] = []
    end = len(text)
    while True:
        whitespace = _JSON_WS.match(text, char_pos)
        start = whitespace.end() if whitespace else char_pos
        if start == end:
            return pieces
        if text[start] != "{":
            kind = "an array" if text[start] == "[" else "a value that is not an object"
            raise _JsonSplitError(f"expected a JSON object at byte offset {byte_offset(start)}, found {kind}")
        try:
            _, stop = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            raise _JsonSplitError(f"invalid JSON at byte offset {byte_offset(exc.pos)}: {exc.msg}") from None
        except _NonStandardConstantError as exc:
            raise _JsonSplitError(
                f"invalid JSON in the object at byte offset {byte_offset(start)}: "
                f"non-standard constant {exc}"
            ) from None
        start_byte = byte_offset(start)
        stop_byte = byte_offset(stop)
        pieces.append(data[start_byte:stop_byte])
        char_pos, byte_pos = stop, stop_byte


def _split_delimited(data: bytes, delimiter: bytes) -> list[bytes]:
    pieces = data.split(delimiter)
    if not pieces[-1]:
        pieces.pop()
    return pieces


class _EnvelopeError(ValueError):
    """A record is not a well-formed CloudWatch Logs subscription envelope."""


def _log_messages(data: bytes) -> list[str]:
    """The ``logEvents[].message`` strings of a ``DATA_MESSAGE``; ``[]`` for a ``CONTROL_MESSAGE``."""
    try:
        envelope = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _EnvelopeError(f"record is not a JSON CloudWatch Logs envelope: {exc}") from None
    if not isinstance(envelope, dict):
        raise _EnvelopeError(f"CloudWatch Logs envelope is a JSON {type(envelope).__name__}, not an object")
    message_type = envelope.get("messageType")
    if message_type == "CONTROL_MESSAGE":
        return []
    if message_type != "DATA_MESSAGE":
        raise _EnvelopeError(f"unknown CloudWatch Logs messageType {message_type!r}")
    events = envelope.get("logEvents")
    if not isinstance(events, list):
        raise _EnvelopeError("CloudWatch Logs DATA_MESSAGE has no logEvents list")
    messages: list[str] = []
    for i, event in enumerate(events):
        message = event.get("message") if isinstance(event, dict) else None
        if not isinstance(message, str):
            raise _EnvelopeError(f"CloudWatch Logs logEvents[{i}] has no string message")
        messages.append(message)
    return messages


class _ExtractionError(ValueError):
    pass


def _key_value(name: str, value: object) -> str:
    """A partition key's value as text, as jq's ``tostring`` writes scalars."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
            value = float(value)  # jq holds numbers as doubles: past 64 bits, written as one
        return orjson.dumps(value).decode()
    if value is None:
        raise _ExtractionError(f"partition key {name!r} is null (the query found no value)")
    kind = "an object" if isinstance(value, dict) else "an array"
    raise _ExtractionError(f"partition key {name!r} is {kind}; partition keys must be strings, numbers or booleans")


def _query_keys(result: object) -> dict[str, str]:
    if not isinstance(result, dict):
        raise _ExtractionError(
            f"the query must produce one JSON object of partition keys, got {orjson.dumps(result).decode()[:100]}"
        )
    if not result:
        raise _ExtractionError("the query produced no partition keys")
    if len(result) > MAX_PARTITION_KEYS:
        raise _ExtractionError(f"the query produced {len(result)} partition keys; at most {MAX_PARTITION_KEYS} are allowed")
    return {name: _key_value(name, value) for name, value in result.items()}


def _extract_paths(outcomes: list[Outcome], ok: list[int], paths: Any) -> list[Outcome]:
    from firehose.transforms.jqpaths import evaluate

    out = list(outcomes)
    for i in ok:
        o = outcomes[i]
        try:
            try:
                doc = orjson.loads(o.data)
            except orjson.JSONDecodeError as exc:
                raise _ExtractionError(f"the record is not a single JSON document: {exc}") from None
            try:
                result = evaluate(paths, doc)
            except ValueError as exc:
                raise _ExtractionError(f"the query failed: {exc}") from None
            o.query_keys = _query_keys(result)
        except _ExtractionError as exc:
            out[i] = o.failed(METADATA_EXTRACTION_FAILED, str(exc), PARTITIONING_FAILED)
    return out


def query_keys(records: list[bytes], query: str, prefix: str = "") -> list[dict[str, str] | None] | None:
    """The partition keys :func:`metadata_extraction` sets, for the records where that is plain:
    the query picks fields only (``compile_paths``), the record is a JSON object and every value
    found is a string. Such a record's keys are exactly what the full evaluation gives (a string
    is its own key text); every other record (an error, a null, a number, ...) is None, for the
    full evaluation to decide. None for all when the query is not path-only. ``prefix`` is put
    before each key's name (the namespace a record's metadata uses)."""
    from firehose.transforms.jqpaths import compile_paths

    paths = compile_paths(query)
    if paths is None or len(paths) > MAX_PARTITION_KEYS or len({name for name, _steps in paths}) != len(paths):
        return None
    plan = [(prefix + name, steps) for name, steps in paths]
    loads, not_json = orjson.loads, orjson.JSONDecodeError
    out: list[dict[str, str] | None] = []
    append = out.append
    for data in records:
        try:
            cur = doc = loads(data)
        except not_json:
            append(None)
            continue
        keys: dict[str, str] | None = {}
        for name, steps in plan:
            cur = doc
            for step in steps:
                cur = cur.get(step) if cur.__class__ is dict else None
            if cur.__class__ is not str:
                keys = None
                break
            keys[name] = cur  # type: ignore[index]
        append(keys)
    return out


def _run_query(program: Any, data: bytes) -> dict[str, str]:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _ExtractionError(f"the record is not a single JSON document: {exc}") from None
    try:
        results = program.input_text(data.decode("utf-8")).all()
    except ValueError as exc:
        raise _ExtractionError(f"the query failed: {exc}") from None
    if len(results) != 1:
        raise _ExtractionError(f"the query must produce one JSON object of partition keys, got {len(results)} results")
    return _query_keys(results[0])


def metadata_extraction(outcomes: list[Outcome], query: str) -> list[Outcome]:
    """Firehose's MetadataExtraction (inline parsing for dynamic partitioning): run the jq
    ``query`` over each ``Ok`` record and set ``query_keys`` from the object it produces.

    A record that is not one JSON document, a query that fails on it or produces anything but one
    object, and a key whose value is null, an object or an array make the record
    ``ProcessingFailed`` (``partitioning-failed``); numbers and booleans become text as jq's
    ``tostring`` writes them. The records of a batch go through jq in one call (jq's own parser
    reads them as a stream); only a batch with a failing record is evaluated record by record.
    """
    from firehose.transforms.config import compile_query
    from firehose.transforms.jqpaths import compile_paths

    ok = [i for i, o in enumerate(outcomes) if o.result == "Ok"]
    if not ok:
        return outcomes
    paths = compile_paths(query)
    if paths is not None:  # field picks only: looked up on the parsed record, libjq's answers exactly
        return _extract_paths(outcomes, ok, paths)
    program = compile_query(query)
    out = list(outcomes)
    results: list[Any] | None = None
    try:
        for i in ok:  # each record must be exactly one JSON document
            orjson.loads(outcomes[i].data)
        text = b"\n".join(outcomes[i].data for i in ok).decode("utf-8")
        # Each record's results collected in one array, so a record with none and a record with
        # two cannot shift the others' keys; any record without exactly one goes the slow way.
        arrays = compile_query(f"[{query}]").input_text(text).all()
        if len(arrays) == len(ok) and all(len(a) == 1 for a in arrays):
            results = [a[0] for a in arrays]
    except ValueError:  # orjson.JSONDecodeError, invalid UTF-8 and jq errors are ValueErrors
        results = None
    for k, i in enumerate(ok):
        o = outcomes[i]
        try:
            keys = _query_keys(results[k]) if results is not None else _run_query(program, o.data)
        except _ExtractionError as exc:
            out[i] = o.failed(METADATA_EXTRACTION_FAILED, str(exc), PARTITIONING_FAILED)
            continue
        o.query_keys = keys
    return out
