"""Test your Firehose transformation Lambda the way the daemon (and Amazon Kinesis Data Firehose) runs it.

Import this in your own test suite (pytest, unittest, anything). It builds the exact event
Firehose sends, calls your handler in-process, and checks the response with the same validation
the daemon applies, so a handler that passes here behaves the same once deployed behind a
delivery stream::

    from firehose.testing import run_transform

    from my_project.transform import lambda_handler


    def test_uppercases_names():
        run = run_transform(lambda_handler, [{"name": "ada"}, {"name": "grace"}])

        assert [r.json()["name"] for r in run.ok] == ["ADA", "GRACE"]
        assert run.dropped == [] and run.failed == []


    def test_partitions_by_customer():
        run = run_transform(lambda_handler, [{"customer": 7, "name": "x"}])
        assert run.results[0].partition_keys == {"customer": "7"}

Records can be given as ``bytes`` (sent as is), ``str`` (UTF-8 encoded) or ``dict`` (encoded as
compact JSON, ``json.dumps(d, separators=(",", ":"))``, with no trailing newline). Each record gets
a Firehose-style ``recordId`` and the handler receives it base64-encoded in ``data``, exactly like
on AWS.

A response Firehose would reject raises :class:`~firehose.transforms.lambda_.LambdaInvocationError` whose
``code`` is the error Firehose would report for the whole batch:

========================================  ==================================================================
``Lambda.MissingRecordId``                a record you were given is not in the response
``Lambda.DuplicatedRecordId``             a ``recordId`` appears twice
``Lambda.JsonProcessingException``        not an object, no ``records`` array, a ``result`` other than
                                          ``Ok``/``Dropped``/``ProcessingFailed``, ``data`` missing or not
                                          base64, a non-string partition key value, an unknown ``recordId``
``Lambda.FunctionError``                  the response cannot be serialised to JSON (e.g. ``bytes`` in
                                          ``data``): ``"Runtime.MarshalError: ..."``
========================================  ==================================================================

An exception raised by your handler propagates unchanged, with its traceback, so a failing test
points at your code (on Firehose it would be ``Lambda.FunctionError`` and the batch retried).

To test the handler against the real execution path instead (a worker process, timeouts, JSON over
a pipe), use :class:`firehose.transforms.lambda_.LocalFunction` with :func:`firehose.transforms.lambda_.invoke_with_retries`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from firehose.names import stream_arn
from firehose.records import SourceRecord
from firehose.transforms.lambda_ import (
    FUNCTION_ERROR,
    JSON_PROCESSING,
    LambdaContext,
    LambdaInvocationError,
    build_event,
    parse_response,
)

__all__ = [
    "TransformResult",
    "TransformRun",
    "make_context",
    "make_event",
    "make_records",
    "run_transform",
]

# Firehose's record ids are long decimal strings; these look the same and are stable between runs.
_RECORD_ID_BASE = 49546986683135544286507457936321625675700192471156785154

RecordInput = bytes | bytearray | memoryview | str | dict[str, Any]


@dataclass
class TransformResult:
    """What became of one input record.

    ``result`` is ``"Ok"``, ``"Dropped"`` or ``"ProcessingFailed"``. ``data`` is the transformed
    payload (decoded from base64) for ``Ok`` records, and the *original* input bytes for ``Dropped``
    and ``ProcessingFailed`` ones (what the daemon keeps: a failed record goes to the error output
    with its original data, whatever the function returned). ``partition_keys`` is
    ``metadata.partitionKeys`` of an ``Ok`` record, or ``None``; ``otf_metadata`` its
    ``metadata.otfMetadata`` (Iceberg routing), or ``None``.
    """

    record_id: str
    result: str
    data: bytes
    partition_keys: dict[str, str] | None = None
    otf_metadata: dict[str, str] | None = None

    @property
    def text(self) -> str:
        """``data`` decoded as UTF-8."""
        return self.data.decode("utf-8")

    def json(self) -> Any:
        """``data`` parsed as one JSON document (a trailing newline is fine)."""
        return json.loads(self.data)


@dataclass
class TransformRun:
    """The outcome of one invocation: one :class:`TransformResult` per input record, in input order.

    ``ok``, ``dropped`` and ``failed`` filter ``results`` by result; ``raw_response`` is the
    handler's return value after a JSON round trip (what Firehose receives); ``event`` is the event
    the handler was called with.
    """

    results: list[TransformResult]
    raw_response: Any
    event: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[TransformResult]:
        """Records the handler returned with ``result: "Ok"``."""
        return [r for r in self.results if r.result == "Ok"]

    @property
    def dropped(self) -> list[TransformResult]:
        """Records the handler returned with ``result: "Dropped"``."""
        return [r for r in self.results if r.result == "Dropped"]

    @property
    def failed(self) -> list[TransformResult]:
        """Records the handler returned with ``result: "ProcessingFailed"``."""
        return [r for r in self.results if r.result == "ProcessingFailed"]


def _encode(record: RecordInput) -> bytes:
    if isinstance(record, (bytes, bytearray, memoryview)):
        return bytes(record)
    if isinstance(record, str):
        return record.encode("utf-8")
    if isinstance(record, dict):
        return json.dumps(record, separators=(",", ":")).encode("utf-8")
    raise TypeError(f"a record must be bytes, str or dict, not {type(record).__name__}")


def make_records(records: Iterable[RecordInput], *, arrival_ms: int | None = None) -> list[SourceRecord]:
    """The :class:`~firehose.records.SourceRecord` objects :func:`make_event` sends: record ids
    ``"49546986683135544286507457936321625675700192471156785154"``, ``...155``, ... and
    ``arrival_ms`` (default: now) as every record's arrival time."""
    arrival = int(time.time() * 1000) if arrival_ms is None else arrival_ms
    return [SourceRecord(str(_RECORD_ID_BASE + i), _encode(r), arrival) for i, r in enumerate(records)]


def make_event(
    records: Iterable[RecordInput],
    *,
    stream_name: str = "test-stream",
    region: str = "us-east-1",
    account_id: str = "000000000000",
    arrival_ms: int | None = None,
    invocation_id: str = "00000000-0000-4000-8000-000000000000",
) -> dict[str, Any]:
    """A Firehose transformation event for ``records`` from a Direct PUT stream.

    ``deliveryStreamArn`` is ``arn:aws:firehose:<region>:<account_id>:deliverystream/<stream_name>``;
    ``approximateArrivalTimestamp`` is ``arrival_ms`` (epoch milliseconds, default: now) on every
    record. Useful to call a handler by hand or to store as a fixture::

        event = make_event([b"raw line", {"id": 1}])
        response = lambda_handler(event, make_context())
    """
    return build_event(
        make_records(records, arrival_ms=arrival_ms),
        invocation_id=invocation_id,
        delivery_stream_arn=stream_arn(region, account_id, stream_name),
        region=region,
    )


def make_context(
    function_name: str = "test-function",
    *,
    timeout_secs: float = 60.0,
    region: str = "us-east-1",
    account_id: str = "000000000000",
    memory_limit_in_mb: str = "128",
) -> LambdaContext:
    """A Lambda ``context`` object like AWS's: ``aws_request_id``, ``function_name``,
    ``function_version`` (``"$LATEST"``), ``invoked_function_arn``, ``memory_limit_in_mb`` (a
    string, as on AWS), ``log_group_name``, ``log_stream_name`` and
    ``get_remaining_time_in_millis()`` counting down from ``timeout_secs``."""
    return LambdaContext.create(
        function_name,
        timeout_secs=timeout_secs,
        region=region,
        account_id=account_id,
        memory_limit_in_mb=memory_limit_in_mb,
    )


def _resolve(handler: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(handler):
        return handler
    from firehose.transforms.workers import load_function

    return load_function(handler)


def _as_lambda_would_return(response: object) -> Any:
    # AWS's Python runtime serialises the return value with json.dumps before Firehose sees it: a
    # value that cannot be serialised is a function error there, and tuples, int keys and the like
    # arrive as what JSON makes of them.
    try:
        text = json.dumps(response)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LambdaInvocationError(
            FUNCTION_ERROR, f"Runtime.MarshalError: Unable to marshal response: {exc}"
        ) from None
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    # json.dumps writes NaN/Infinity, which are not JSON: Firehose's parser rejects the response.
    raise LambdaInvocationError(
        JSON_PROCESSING,
        f"There was an error parsing returned records from the Lambda function ({name} is not JSON)",
    )


def run_transform(
    handler: Callable[..., Any] | str,
    records: Iterable[RecordInput],
    *,
    context: Any = None,
    **event_kwargs: Any,
) -> TransformRun:
    """Call ``handler(event, context)`` on ``records`` and check the response as Firehose does.

    ``handler`` is your Lambda handler function, or a ``"package.module:function"`` reference (the
    form the daemon's configuration uses). ``records`` are ``bytes``, ``str`` or ``dict`` (see the
    module documentation). ``context`` defaults to :func:`make_context`. ``event_kwargs`` go to
    :func:`make_event` (``stream_name``, ``region``, ``account_id``, ``arrival_ms``,
    ``invocation_id``).

    The handler gets its own deep copy of the event, so mutating it is harmless. The response goes
    through a JSON round trip, as on Lambda, then :func:`~firehose.transforms.lambda_.parse_response`, the
    validation the daemon uses. Returns a :class:`TransformRun`; raises
    :class:`~firehose.transforms.lambda_.LambdaInvocationError` with Firehose's error code when Firehose
    would reject the response (the whole batch would then be retried and finally failed). Exceptions
    raised by the handler propagate unchanged.
    """
    function = _resolve(handler)
    source = make_records(records, arrival_ms=event_kwargs.pop("arrival_ms", None))
    stream_name = event_kwargs.pop("stream_name", "test-stream")
    region = event_kwargs.pop("region", "us-east-1")
    account_id = event_kwargs.pop("account_id", "000000000000")
    invocation_id = event_kwargs.pop("invocation_id", "00000000-0000-4000-8000-000000000000")
    if event_kwargs:
        raise TypeError(
            f"run_transform() got unexpected keyword arguments: {', '.join(sorted(event_kwargs))}"
        )
    event = build_event(
        source,
        invocation_id=invocation_id,
        delivery_stream_arn=stream_arn(region, account_id, stream_name),
        region=region,
    )
    ctx = context if context is not None else make_context(region=region, account_id=account_id)
    response = _as_lambda_would_return(function(copy.deepcopy(event), ctx))
    outcomes = parse_response(response, source)
    results = [
        TransformResult(
            record_id=source[o.source].record_id,
            result=o.result,
            data=o.data,
            partition_keys=o.partition_keys,
            otf_metadata=o.otf,
        )
        for o in outcomes
    ]
    return TransformRun(results=results, raw_response=response, event=event)
