"""Amazon Kinesis Data Firehose's Lambda data-transformation contract (reference §4.2, error codes §11).

A stream with a ``Lambda`` processor hands each processing batch to a function as one event and
reads one response back. This module owns both sides of that exchange exactly as Firehose runs it:

* :func:`build_event` writes the event Firehose sends (``invocationId``, ``deliveryStreamArn``,
  ``region``, ``records[]`` with base64 ``data``, and ``kinesisRecordMetadata`` for a Kinesis
  Data Streams source);
* :func:`parse_response` validates the function's answer the way Firehose does and turns it into
  :class:`~firehose.records.Outcome` objects, or rejects the whole invocation with Firehose's
  error code (``Lambda.MissingRecordId``, ``Lambda.DuplicatedRecordId``,
  ``Lambda.JsonProcessingException``);
* :func:`invoke_with_retries` runs one batch through an :class:`Invoker` with Firehose's retry
  semantics: every attempt carries a new ``invocationId`` with the same ``recordId`` values and
  data, up to ``NumberOfRetries + 1`` attempts, then every record of the invocation fails with the
  last error and its original bytes.

Two invokers exist: :class:`LocalFunction` runs a Python handler (``"package.module:function"``)
in worker processes owned by the daemon (:mod:`firehose.transforms.workers`), and
:class:`firehose.transforms.lambda_remote.RemoteFunction` calls a real (or emulated) AWS Lambda
function through boto3's ``Invoke`` API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, cast, overload

import orjson
import pybase64
import structlog

from firehose.records import PROCESSING_FAILED, Outcome, SourceRecord, UnchangedOutcomes, record_datas

if TYPE_CHECKING:
    from firehose.transforms.workers import WorkerPool

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "FUNCTION_ERROR",
    "INVOKE_LIMIT_EXCEEDED",
    "JSON_PROCESSING",
    "MISSING_RECORD_ID",
    "DUPLICATED_RECORD_ID",
    "PAYLOAD_TOO_LARGE",
    "PROCESSING_FAILED_CODE",
    "PROCESSING_FAILED_MESSAGE",
    "SERVICE_EXCEPTION",
    "TIMEOUT",
    "TIMEOUT_MESSAGE",
    "Invoker",
    "LambdaContext",
    "LambdaInvocationError",
    "LocalFunction",
    "PayloadOverLimit",
    "build_event",
    "invoke_with_retries",
    "parse_response",
]

log = structlog.get_logger()
T = TypeVar("T")

# --- error codes (reference §11; the last three are this daemon's own, for conditions AWS cannot reach) ---
FUNCTION_ERROR: Final = "Lambda.FunctionError"
JSON_PROCESSING: Final = "Lambda.JsonProcessingException"
MISSING_RECORD_ID: Final = "Lambda.MissingRecordId"
DUPLICATED_RECORD_ID: Final = "Lambda.DuplicatedRecordId"
INVOKE_LIMIT_EXCEEDED: Final = "Lambda.InvokeLimitExceeded"
RESOURCE_NOT_FOUND: Final = "Lambda.ResourceNotFound"
INVOKE_ACCESS_DENIED: Final = "Lambda.InvokeAccessDenied"
TIMEOUT: Final = "Lambda.Timeout"
SERVICE_EXCEPTION: Final = "Lambda.ServiceException"
PAYLOAD_TOO_LARGE: Final = "Lambda.PayloadTooLarge"
PROCESSING_FAILED_CODE: Final = "Lambda.ProcessingFailed"

#: Firehose's wording for an invocation that did not answer in time (reference §4.2).
TIMEOUT_MESSAGE: Final = (
    "Firehose encountered timeout errors when calling AWS Lambda. "
    "The maximum supported function timeout is 5 minutes."
)
PROCESSING_FAILED_MESSAGE: Final = "The record was marked ProcessingFailed by the function"

# Firehose's CloudWatch Logs wording for the response-validation and invoke errors (reference §11).
_JSON_PROCESSING_TEXT: Final = (
    "There was an error parsing returned records from the Lambda function. "
    "Ensure that the returned records follow the status model required by Firehose."
)
_MISSING_TEXT: Final = (
    "One or more record IDs were not returned. "
    "Ensure that the Lambda function returns all received record IDs."
)
_DUPLICATED_TEXT: Final = (
    "Multiple records were returned with the same record ID. "
    "Ensure that the Lambda function returns unique record IDs for each record."
)

#: Lambda's synchronous request limit is 6 MB; Firehose keeps every event below it.
DEFAULT_MAX_PAYLOAD_BYTES: Final = 6_000_000


class LambdaInvocationError(Exception):
    """A whole invocation failed: every record it carried shares ``code`` and ``message``.

    ``code`` is Firehose's error code as it appears in ``errorCode`` of a processing-failed record
    (``Lambda.FunctionError``, ``Lambda.JsonProcessingException``, ``Lambda.MissingRecordId``,
    ``Lambda.DuplicatedRecordId``, ``Lambda.Timeout``, ``Lambda.InvokeLimitExceeded``,
    ``Lambda.ResourceNotFound``, ``Lambda.InvokeAccessDenied``, ``Lambda.ServiceException``,
    ``Lambda.PayloadTooLarge``, ...); ``message`` is the human-readable ``errorMessage``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PayloadOverLimit(Exception):
    """The event a worker built for an invocation is ``size`` bytes, over the payload limit it was
    given: nothing was invoked."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


# --------------------------------------------------------------------------------------------------
# The event
# --------------------------------------------------------------------------------------------------


def _kinesis_metadata(meta: dict[str, Any], arrival_ms: int) -> dict[str, Any]:
    # The documented key order, then anything else the source recorded. approximateArrivalTimestamp
    # and subsequenceNumber are always present in Firehose's event, so absent ones get the record's
    # arrival time and 0 (a number, as the Go and Java event types declare it).
    out: dict[str, Any] = {
        "shardId": meta.get("shardId"),
        "partitionKey": meta.get("partitionKey"),
        "approximateArrivalTimestamp": meta.get("approximateArrivalTimestamp", arrival_ms),
        "sequenceNumber": meta.get("sequenceNumber"),
        "subsequenceNumber": meta.get("subsequenceNumber", 0),
    }
    for key, value in meta.items():
        out.setdefault(key, value)
    return out


def _event_record(record: SourceRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "recordId": record.record_id,
        "approximateArrivalTimestamp": record.arrival_ms,
        "data": pybase64.b64encode(record.data).decode("ascii"),
    }
    if record.kinesis is not None:
        item["kinesisRecordMetadata"] = _kinesis_metadata(record.kinesis, record.arrival_ms)
    return item


def build_event(
    records: Sequence[SourceRecord],
    *,
    invocation_id: str,
    delivery_stream_arn: str,
    region: str,
    source_kinesis_stream_arn: str | None = None,
) -> dict[str, Any]:
    """The event Firehose sends to a transformation function for ``records``.

    Keys, in Firehose's order: ``invocationId``, ``deliveryStreamArn``, ``sourceKinesisStreamArn``
    (only when given: a Kinesis Data Streams source), ``region``, ``records``. Each record has
    ``recordId`` (``SourceRecord.record_id``), ``approximateArrivalTimestamp`` (epoch ms, a
    number), ``data`` (standard base64 of the bytes, padded) and, when ``SourceRecord.kinesis`` is
    set, ``kinesisRecordMetadata`` (``shardId``, ``partitionKey``, ``approximateArrivalTimestamp``,
    ``sequenceNumber``, ``subsequenceNumber``, then any further keys the source recorded). The
    result is a fresh dict of JSON types only; it is safe to serialise or pickle as is.
    """
    event: dict[str, Any] = {"invocationId": invocation_id, "deliveryStreamArn": delivery_stream_arn}
    if source_kinesis_stream_arn is not None:
        event["sourceKinesisStreamArn"] = source_kinesis_stream_arn
    event["region"] = region
    event["records"] = [_event_record(r) for r in records]
    return event


# --------------------------------------------------------------------------------------------------
# The response
# --------------------------------------------------------------------------------------------------


def _reject(detail: str) -> LambdaInvocationError:
    return LambdaInvocationError(JSON_PROCESSING, f"{_JSON_PROCESSING_TEXT} ({detail})")


def _b64decode(text: str, record_id: str) -> bytes:
    # Firehose decodes with a strict RFC 4648 decoder that accepts missing padding (Java's
    # Base64.getDecoder()), so whitespace and non-alphabet characters are rejected but an unpadded
    # tail is fine.
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:
        raise _reject(f"record {record_id!r}: data is not valid base64") from None


#: The members of ``metadata.otfMetadata`` (Iceberg routing) a function may return.
OTF_FIELDS = ("destinationDatabaseName", "destinationTableName", "operation")


def _metadata(item: dict[str, Any], record_id: str) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """``metadata.partitionKeys`` and ``metadata.otfMetadata`` of a returned record (each None
    when absent); values must be strings."""
    metadata = item.get("metadata")
    if metadata is None:
        return None, None
    if not isinstance(metadata, dict):
        raise _reject(f"record {record_id!r}: metadata is not an object")
    return (_string_map(metadata, "partitionKeys", record_id, "partition key"),
            _string_map(metadata, "otfMetadata", record_id, "otfMetadata member", OTF_FIELDS))


def _string_map(metadata: dict[str, Any], name: str, record_id: str, what: str,
                only: tuple[str, ...] | None = None) -> dict[str, str] | None:
    keys = metadata.get(name)
    if keys is None:
        return None
    if not isinstance(keys, dict):
        raise _reject(f"record {record_id!r}: metadata.{name} is not an object")
    for key, value in keys.items():
        if not isinstance(value, str):
            raise _reject(f"record {record_id!r}: {what} {key!r} is not a string")
    return dict(keys) if only is None else {k: v for k, v in keys.items() if k in only}


def parse_response(response: object, records: Sequence[SourceRecord]) -> list[Outcome]:
    """Validate a function's response as Firehose does and map it to one outcome per input record.

    ``response`` is the decoded JSON the function returned; ``records`` are the records the event
    carried, in event order. The response must be an object with a ``records`` array holding, for
    every input ``recordId`` exactly once, an object with ``recordId`` (string), ``result``
    (``"Ok"``, ``"Dropped"`` or ``"ProcessingFailed"``) and ``data`` (base64 string; Firehose
    requires it on every record), plus optional ``metadata.partitionKeys`` (an object of string
    values) and ``metadata.otfMetadata`` (Iceberg routing: ``destinationDatabaseName``,
    ``destinationTableName``, ``operation``, string values). Other keys are ignored.

    Returns outcomes in input order (``Outcome.source`` = index into ``records``):

    * ``Ok`` -> ``Outcome(i, decoded data, partition_keys=metadata.partitionKeys or None,
      otf=metadata.otfMetadata or None)``;
    * ``Dropped`` -> ``Outcome(i, original data, result="Dropped")``;
    * ``ProcessingFailed`` -> ``Outcome(i, original data)`` failed with ``Lambda.ProcessingFailed``
      (the original bytes are what goes to the processing-failed error output).

    Raises :class:`LambdaInvocationError` for the whole invocation: ``Lambda.DuplicatedRecordId``
    when an id comes back twice, ``Lambda.MissingRecordId`` when an input id is absent, and
    ``Lambda.JsonProcessingException`` for anything else that does not conform (not an object, no
    ``records`` array, wrong types, an unknown result, invalid base64, non-string partition keys,
    an id that was never sent).
    """
    return _parse(response, records, 0, 1, None)


def _parse(
    response: object,
    records: Sequence[SourceRecord],
    offset: int,
    attempts: int,
    failed_meta: dict[str, Any] | None,
) -> list[Outcome]:
    return _outcomes(validate_response(response, [r.record_id for r in records]), records, offset, attempts,
                     failed_meta)


#: One validated record of a response, at its input position: (result, data, partition keys,
#: otfMetadata). ``result`` is 0 Ok, 1 Dropped, 2 ProcessingFailed; ``data`` is the decoded bytes, or
#: None when the function returned exactly the base64 text it was sent (the input bytes, unchanged).
Validated = tuple[int, bytes | None, dict[str, str] | None, dict[str, str] | None]
_RESULT_CODES: Final = {"Ok": 0, "Dropped": 1, "ProcessingFailed": 2}


def validate_response(response: object, ids: Sequence[str], sent: Sequence[str] | None = None) -> list[Validated]:
    """Firehose's checks of a function's response (see :func:`parse_response`) for an event that
    carried the records ``ids`` (in event order), as one :data:`Validated` per input position.

    ``sent`` are the base64 ``data`` strings the event carried; a returned ``data`` equal to the one
    sent is valid base64 of the input bytes, so it is not decoded again (None in the result). Runs in
    the daemon for remote functions and in the worker process for local ones; both raise the same
    :class:`LambdaInvocationError` for the same response.
    """
    if not isinstance(response, dict):
        raise _reject(f"the response is a JSON {_json_type(response)}, not an object")
    items = response.get("records")
    if not isinstance(items, list):
        raise _reject("the response has no 'records' array")
    index = {record_id: i for i, record_id in enumerate(ids)}
    validated: list[Validated | None] = [None] * len(ids)
    codes = _RESULT_CODES
    for item in items:
        if not isinstance(item, dict):
            raise _reject(f"a returned record is a JSON {_json_type(item)}, not an object")
        get = item.get
        record_id = get("recordId")
        if not isinstance(record_id, str):
            raise _reject("a returned record has no string 'recordId'")
        result = get("result")
        code = codes.get(result) if isinstance(result, str) else None
        if code is None:
            raise _reject(f"record {record_id!r}: result {result!r} is not Ok, Dropped or ProcessingFailed")
        data = get("data")
        if not isinstance(data, str):
            raise _reject(f"record {record_id!r}: 'data' is missing or not a string")
        position = index.get(record_id)
        # Decode every record's data, as Firehose deserialises the whole response before acting on it.
        decoded = None if sent is not None and position is not None and data == sent[position] \
            else _b64decode(data, record_id)
        keys, otf = (None, None) if get("metadata") is None else _metadata(item, record_id)
        if position is None:
            raise _reject(f"record {record_id!r} was not in the invocation")
        if validated[position] is not None:
            raise LambdaInvocationError(DUPLICATED_RECORD_ID, f"{_DUPLICATED_TEXT} (recordId {record_id!r})")
        validated[position] = (code, decoded, keys, otf)
    missing = [ids[i] for i, v in enumerate(validated) if v is None]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise LambdaInvocationError(MISSING_RECORD_ID, f"{_MISSING_TEXT} ({len(missing)} missing: {shown})")
    return cast(list[Validated], validated)


#: A record the function gave back Ok, with its own data and no metadata.
_UNCHANGED: Validated = (0, None, None, None)


def _compact_outcomes(validated: list[Validated], records: Sequence[SourceRecord], offset: int, attempts: int,
                      failed_meta: dict[str, Any] | None, compact: bool) -> list[Outcome] | UnchangedOutcomes:
    """:func:`_outcomes`, or with ``compact`` a whole batch given back unchanged as such."""
    if compact and validated.count(_UNCHANGED) == len(validated):
        return UnchangedOutcomes(record_datas(records), attempts)
    return _outcomes(validated, records, offset, attempts, failed_meta)


def _outcomes(validated: list[Validated], records: Sequence[SourceRecord], offset: int, attempts: int,
              failed_meta: dict[str, Any] | None) -> list[Outcome]:
    # The outcome fields invoke_with_retries needs are set at construction time: rebuilding 500
    # outcomes with dataclasses.replace would double the cost of a batch.
    outcomes = []
    datas = record_datas(records)
    for position, (result, decoded, keys, otf) in enumerate(validated):
        source = position + offset
        if result == 0:
            data = datas[position] if decoded is None else decoded
            # Positional: a third cheaper than keywords, and this runs once per record.
            outcomes.append(Outcome(source, data, "Ok", keys, None, None, PROCESSING_FAILED, attempts, None, {},
                                    None, otf))
        elif result == 1:
            outcomes.append(Outcome(source, datas[position], result="Dropped", attempts=attempts))
        else:
            outcomes.append(Outcome(
                source,
                datas[position],
                result="ProcessingFailed",
                error_code=PROCESSING_FAILED_CODE,
                error_message=PROCESSING_FAILED_MESSAGE,
                attempts=attempts,
                meta=dict(failed_meta) if failed_meta else {},
            ))
    return outcomes


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# The context object a Python handler receives
# --------------------------------------------------------------------------------------------------


@dataclass
class LambdaContext:
    """The ``context`` argument of a Python Lambda handler, with the attributes AWS's runtime provides.

    Plain data, so it pickles and can be rebuilt in a worker process from
    ``dataclasses.asdict(context)``. ``memory_limit_in_mb`` is a string, as in AWS's Python runtime
    (it comes from an environment variable there). ``deadline_ms`` is the epoch-ms instant the
    invocation times out; :meth:`get_remaining_time_in_millis` counts down to it.
    """

    aws_request_id: str
    function_name: str
    function_version: str = "$LATEST"
    invoked_function_arn: str = ""
    memory_limit_in_mb: str = "128"
    log_group_name: str = ""
    log_stream_name: str = ""
    deadline_ms: int = 0
    identity: Any = None
    client_context: Any = None

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the invocation times out (never negative)."""
        return max(0, self.deadline_ms - int(time.time() * 1000))

    @classmethod
    def create(
        cls,
        function_name: str,
        *,
        timeout_secs: float = 60.0,
        region: str = "us-east-1",
        account_id: str = "000000000000",
        function_version: str = "$LATEST",
        memory_limit_in_mb: str = "128",
        invoked_function_arn: str | None = None,
        aws_request_id: str | None = None,
    ) -> LambdaContext:
        """A context for one invocation starting now: a fresh request id, a deadline ``timeout_secs`` away,
        and the log group/stream names Lambda would use (``/aws/lambda/<name>``,
        ``YYYY/MM/DD/[$LATEST]<hex>``)."""
        now = datetime.now(UTC)
        return cls(
            aws_request_id=aws_request_id or str(uuid.uuid4()),
            function_name=function_name,
            function_version=function_version,
            invoked_function_arn=invoked_function_arn
            or f"arn:aws:lambda:{region}:{account_id}:function:{function_name}",
            memory_limit_in_mb=memory_limit_in_mb,
            log_group_name=f"/aws/lambda/{function_name}",
            log_stream_name=f"{now:%Y/%m/%d}/[{function_version}]{uuid.uuid4().hex}",
            deadline_ms=int(now.timestamp() * 1000 + timeout_secs * 1000),
        )


# --------------------------------------------------------------------------------------------------
# Invokers
# --------------------------------------------------------------------------------------------------


class Invoker(Protocol):
    """Something that runs a transformation function synchronously (Lambda's ``RequestResponse``).

    ``name`` is the value written as ``lambdaArn`` in processing-failed records. ``invoke`` sends
    one event and returns the function's decoded JSON response, unvalidated (that is
    :func:`parse_response`'s job); it raises :class:`LambdaInvocationError` when the invocation
    itself fails. ``close`` releases processes, threads and connections; it is idempotent.
    """

    name: str

    async def invoke(self, event: dict[str, Any]) -> object: ...

    async def close(self) -> None: ...


_ARN_RE: Final = re.compile(
    r"^arn:[^:]+:lambda:(?P<region>[^:]*):(?P<account>[^:]*):function:(?P<name>[^:]+)"
)


class LocalFunction(Invoker):
    """A Python handler ``"package.module:function"`` run in daemon-owned worker processes.

    ``processes`` workers serve invocations concurrently (more queue); an invocation running past
    ``timeout_secs`` is killed and fails with ``Lambda.Timeout``; a handler exception fails it with
    ``Lambda.FunctionError``. ``name`` (default: ``function``) is the ``lambdaArn`` of error
    records; when it is a Lambda ARN its function name and region also feed the handler's context.
    Workers start on :meth:`start` or on the first invocation; :meth:`start` raises
    :class:`ValueError` when the handler cannot be imported. ``nice`` lowers the workers' CPU
    priority (``os.nice``) so that, on a busy machine, the daemon's ingest goes first.
    """

    def __init__(
        self,
        function: str,
        *,
        processes: int = 1,
        timeout_secs: float = 60.0,
        name: str | None = None,
        region: str = "us-east-1",
        account_id: str = "000000000000",
        memory_limit_in_mb: str = "128",
        start_method: str = "spawn",
        nice: int = 0,
    ) -> None:
        from firehose.transforms.workers import WorkerPool  # workers imports this module; import late

        self.function = function
        self.name = name or function
        self.timeout_secs = timeout_secs
        self.pool: WorkerPool = WorkerPool(function, processes, timeout_secs, start_method=start_method, nice=nice)
        arn = _ARN_RE.match(self.name)
        if arn:
            self._function_name = arn["name"]
            self._region = arn["region"] or region
            self._account_id = arn["account"] or account_id
            self._arn: str | None = self.name
        else:
            # Lambda function names are [A-Za-z0-9_-]+; a handler reference is not, so derive one.
            self._function_name = re.sub(r"[^A-Za-z0-9_-]+", "-", function).strip("-") or "function"
            self._region, self._account_id, self._arn = region, account_id, None
        self._memory = memory_limit_in_mb

    async def start(self) -> None:
        """Start the worker processes now (otherwise the first invocation does). Raises ValueError
        naming the function and the import error when the handler cannot be loaded."""
        await self.pool.start()

    async def invoke(self, event: dict[str, Any]) -> object:
        """Run the handler on ``event`` in a worker; see :meth:`firehose.transforms.workers.WorkerPool.call`."""
        return await self.pool.call(event, dataclasses.asdict(self._context()))

    async def invoke_records(
        self,
        records: Sequence[SourceRecord],
        *,
        invocation_id: str,
        stream_arn: str,
        region: str,
        source_kinesis_stream_arn: str | None,
        max_payload_bytes: int,
        finish: Callable[[list[Validated]], T],
    ) -> T:
        """One invocation of ``records``, its event built and its response validated in the worker;
        returns ``finish(validated)`` (see :meth:`firehose.transforms.workers.WorkerPool.invoke_records`)."""
        return await self.pool.invoke_records(
            records, invocation_id=invocation_id, stream_arn=stream_arn, region=region,
            source_kinesis_stream_arn=source_kinesis_stream_arn, max_payload_bytes=max_payload_bytes,
            context_fields=dataclasses.asdict(self._context()), finish=finish,
        )

    def _context(self) -> LambdaContext:
        return LambdaContext.create(
            self._function_name,
            timeout_secs=self.timeout_secs,
            region=self._region,
            account_id=self._account_id,
            memory_limit_in_mb=self._memory,
            invoked_function_arn=self._arn,
        )

    async def close(self) -> None:
        """Stop the workers (bounded: a few seconds at most)."""
        await self.pool.close()


# --------------------------------------------------------------------------------------------------
# Firehose's invocation loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """What every invocation of one processing batch shares."""

    invoker: Invoker
    stream_arn: str
    region: str
    source_kinesis_stream_arn: str | None
    retries: int
    max_payload_bytes: int
    clock: Callable[[], float]
    backoff_secs: float

    def event(self, records: Sequence[SourceRecord], invocation_id: str) -> dict[str, Any]:
        return build_event(
            records,
            invocation_id=invocation_id,
            delivery_stream_arn=self.stream_arn,
            region=self.region,
            source_kinesis_stream_arn=self.source_kinesis_stream_arn,
        )

    def error_meta(self) -> dict[str, Any]:
        return {"lambdaArn": self.invoker.name, "attemptEndingTimestamp": int(self.clock() * 1000)}


@overload
async def invoke_with_retries(
    invoker: Invoker, records: Sequence[SourceRecord], *, retries: int, stream_arn: str, region: str,
    source_kinesis_stream_arn: str | None = None, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    clock: Callable[[], float] = time.time, backoff_secs: float = 0.0, compact: Literal[False] = False,
) -> list[Outcome]: ...
@overload
async def invoke_with_retries(
    invoker: Invoker, records: Sequence[SourceRecord], *, retries: int, stream_arn: str, region: str,
    source_kinesis_stream_arn: str | None = None, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    clock: Callable[[], float] = time.time, backoff_secs: float = 0.0, compact: bool,
) -> list[Outcome] | UnchangedOutcomes: ...


async def invoke_with_retries(
    invoker: Invoker,
    records: Sequence[SourceRecord],
    *,
    retries: int,
    stream_arn: str,
    region: str,
    source_kinesis_stream_arn: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    clock: Callable[[], float] = time.time,
    backoff_secs: float = 0.0,
    compact: bool = False,
) -> list[Outcome] | UnchangedOutcomes:
    """Transform ``records`` through ``invoker`` with Firehose's invocation and retry semantics.

    Returns one outcome per input record, in input order (``Outcome.source`` indexes
    ``records``); never raises for invocation failures (``asyncio.CancelledError`` still
    propagates).

    * Each attempt sends a new ``invocationId`` (uuid4) with the same ``recordId`` values and data;
      an attempt fails on any :class:`LambdaInvocationError` from the invoker or from
      :func:`parse_response` (other exceptions count as ``Lambda.ServiceException``). Up to
      ``retries + 1`` attempts are made (Firehose's ``NumberOfRetries``, default 3).
    * A successful attempt's outcomes carry ``attempts`` = that attempt's number; its
      ``ProcessingFailed`` records are failed with ``Lambda.ProcessingFailed`` and the original data.
    * After the last failed attempt every record of the invocation is failed with that attempt's
      code and message, ``attempts`` = the number of attempts and its original data.
    * Failed outcomes get ``meta["lambdaArn"]`` (``invoker.name``) and
      ``meta["attemptEndingTimestamp"]`` (epoch ms from ``clock``), the fields of Firehose's
      processing-failed records.
    * When the event's JSON would exceed ``max_payload_bytes`` (or the service answers
      ``Lambda.PayloadTooLarge``), the records are split in halves, recursively, and each part is
      invoked on its own with its own retries. A single record that is too large on its own fails
      with ``Lambda.PayloadTooLarge`` and ``attempts=0`` (no invocation was made).
    * ``backoff_secs`` > 0 waits ``backoff_secs * 2**(n-1)`` before retry ``n``; Firehose documents
      no delay, so the default is none.
    * With ``compact``, a batch the function gave back whole (every record Ok, its own data, no
      metadata; the worker tells it from the response) comes back as an
      :class:`~firehose.records.UnchangedOutcomes`, a sequence of the same outcomes, not a list.
    """
    if retries < 0:
        raise ValueError("retries must be >= 0")
    batch = _Batch(
        invoker,
        stream_arn,
        region,
        source_kinesis_stream_arn,
        retries,
        max_payload_bytes,
        clock,
        backoff_secs,
    )
    if not records:
        return []
    return await _invoke_part(batch, records, 0, compact)


async def _invoke_part(batch: _Batch, records: Sequence[SourceRecord], offset: int,
                       compact: bool = False) -> list[Outcome] | UnchangedOutcomes:
    # An invoker with invoke_records (a local function) builds and measures the event, and
    # validates the response, in its worker process; for any other, it is done here, and the
    # records are encoded once: attempts differ only in invocationId (a uuid: fixed length, so the
    # first attempt's size is every attempt's size).
    by_records = getattr(batch.invoker, "invoke_records", None)
    invocation_id = str(uuid.uuid4())
    event: dict[str, Any] = {}
    if by_records is None:
        event = batch.event(records, invocation_id)
        size = len(orjson.dumps(event))
        if size > batch.max_payload_bytes:
            return await _over_limit(batch, records, offset, size)
    last: LambdaInvocationError | None = None
    attempts = batch.retries + 1
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            if batch.backoff_secs > 0:
                await asyncio.sleep(batch.backoff_secs * 2 ** (attempt - 2))
            invocation_id = str(uuid.uuid4())
            if event:
                # A shallow copy: "invocationId" keeps its first position; the records list is
                # shared (invokers treat events as read-only).
                event = {**event, "invocationId": invocation_id}
        try:
            if by_records is not None:
                return cast(list[Outcome] | UnchangedOutcomes, await by_records(
                    records, invocation_id=invocation_id, stream_arn=batch.stream_arn, region=batch.region,
                    source_kinesis_stream_arn=batch.source_kinesis_stream_arn,
                    max_payload_bytes=batch.max_payload_bytes,
                    finish=partial(_finish, records=records, offset=offset, attempts=attempt, batch=batch,
                                   compact=compact)))
            validated = validate_response(await batch.invoker.invoke(event), [r.record_id for r in records])
            return _compact_outcomes(validated, records, offset, attempt, batch.error_meta(), compact)
        except PayloadOverLimit as over:
            return await _over_limit(batch, records, offset, over.size)
        except LambdaInvocationError as exc:
            last = exc
        except Exception as exc:  # an invoker bug must not lose the batch: count it as a failed attempt
            last = LambdaInvocationError(SERVICE_EXCEPTION, f"{type(exc).__name__}: {exc}")
        log.warning(
            "lambda_invocation_failed",
            function=batch.invoker.name,
            invocation_id=invocation_id,
            attempt=attempt,
            of=attempts,
            code=last.code,
            error=last.message,
            records=len(records),
        )
        if last.code == PAYLOAD_TOO_LARGE:
            # The service measured the payload bigger than we did: resending it cannot help, halves can.
            if len(records) > 1:
                return await _split(batch, records, offset)
            return _fail_all(batch, records, offset, last.code, last.message, attempts=attempt)
    assert last is not None
    return _fail_all(batch, records, offset, last.code, last.message, attempts=attempts)


def _finish(validated: list[Validated], *, records: Sequence[SourceRecord], offset: int, attempts: int,
            batch: _Batch, compact: bool) -> list[Outcome] | UnchangedOutcomes:
    return _compact_outcomes(validated, records, offset, attempts, batch.error_meta(), compact)


async def _over_limit(batch: _Batch, records: Sequence[SourceRecord], offset: int, size: int) -> list[Outcome]:
    """The event for ``records`` would be ``size`` bytes, over the payload limit: halves are
    invoked on their own; a single record fails without an invocation."""
    if len(records) > 1:
        return await _split(batch, records, offset)
    message = (
        f"The record is too large for one Lambda invocation: the event would be {size} bytes, "
        f"above the {batch.max_payload_bytes}-byte payload limit"
    )
    return _fail_all(batch, records, offset, PAYLOAD_TOO_LARGE, message, attempts=0)


async def _split(batch: _Batch, records: Sequence[SourceRecord], offset: int) -> list[Outcome]:
    middle = len(records) // 2
    first = await _invoke_part(batch, records[:middle], offset)
    second = await _invoke_part(batch, records[middle:], offset + middle)
    return [*first, *second]


def _fail_all(
    batch: _Batch, records: Sequence[SourceRecord], offset: int, code: str, message: str, *, attempts: int
) -> list[Outcome]:
    meta = batch.error_meta()
    return [
        Outcome(offset + i, r.data, attempts=attempts, meta=dict(meta)).failed(code, message)
        for i, r in enumerate(records)
    ]
