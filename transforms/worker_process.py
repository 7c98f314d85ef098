"""The worker process's side of :mod:`firehose.transforms.workers`: the messages it exchanges with
the daemon, how it imports the handler, and its loop that answers invocations (an event dict, or
records it builds the event from and whose response it validates).

Every message a worker sends starts with one of the bytes below; the daemon sends a pickled event
(which starts with 0x80), ``RECORDS`` then the pickled records, or ``SHUTDOWN``.
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib
import io
import json
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from itertools import repeat
from multiprocessing.connection import Connection
from typing import Any, Final

import orjson

from firehose.records import SourceRecord
from firehose.transforms.lambda_ import (
    JSON_PROCESSING,
    LambdaContext,
    LambdaInvocationError,
    build_event,
    validate_response,
)

# First byte of every message a worker sends.
READY: Final = 0x52  # b"R": the handler imported; serving
LOAD_FAILED: Final = 0x4C  # b"L": + utf-8 "<Type>: <message>"
MAX_RESPONSE_BYTES: Final = 6_291_556  # Lambda's limit for a synchronous invocation's response
RESULT: Final = 0x4F  # b"O": + the handler's response as JSON
ERROR: Final = 0x45  # b"E": + utf-8 "<errorType>: <errorMessage>"
VALIDATED: Final = 0x56  # b"V": + the validated response (pickled list of lambda_.Validated)
REJECTED: Final = 0x4A  # b"J": + pickled (code, message): the response fails Firehose's checks
TOO_LARGE: Final = 0x5A  # b"Z": + ascii size: the event is over the payload limit; not invoked
SHUTDOWN: Final = b""  # daemon -> worker: exit cleanly
RECORDS: Final = 0x43  # b"C": daemon -> worker: an invocation as records (a pickle starts with 0x80)

CONTEXT_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(LambdaContext))


def load_function(spec: str) -> Callable[..., Any]:
    """Import and return the callable named by ``spec``.

    ``spec`` is ``"package.module:attr"`` (``attr`` may be dotted, e.g. ``"mod:Class.method"``) or
    Lambda's ``"module.function"`` form. Raises :class:`ValueError` for a malformed reference,
    :class:`ImportError` (and whatever the module raises while importing) when the module cannot be
    imported, :class:`AttributeError` when the attribute is missing and :class:`TypeError` when it
    is not callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep:
        module_name, _, attr_path = spec.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"{spec!r} is not a handler reference: expected 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is a {type(target).__name__}, not a callable")
    return target


def describe_exception(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not take the worker down
        text = f"<unprintable {type(exc).__name__}>"
    return f"{type(exc).__name__}: {text}"


def _decimal_as_float(value: object) -> object:
    # What AWS's Python runtime does with Decimal (common in DynamoDB-sourced data) when marshalling.
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ORJSON_STRICT: Final = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def marshal(result: object) -> bytes:
    """The handler's result as JSON, as AWS's Python runtime (``json.dumps``) would write it.

    orjson is tried first (about ten times faster on a 500-record response), restricted to the
    types ``json`` accepts; anything it refuses (Decimal, non-string keys, big ints, subclasses...)
    goes through ``json.dumps`` for Lambda's exact behaviour and error text. Known differences of
    the fast path: NaN/Infinity become ``null``, and ``uuid.UUID`` and plain ``Enum`` values are
    serialised where Lambda would report a MarshalError.
    """
    try:
        return orjson.dumps(result, default=_refuse, option=_ORJSON_STRICT)
    except TypeError:
        return json.dumps(result, default=_decimal_as_float).encode("utf-8")


def add_working_directory() -> None:
    """Where a worker imports handlers from: the daemon's ``sys.path``, then the working
    directory, after it, so the project never shadows an installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def serve(function: str, conn: Connection, nice: int = 0) -> None:
    """Worker process main loop: import the handler once, then answer requests until told to stop."""
    # Ctrl-C reaches the whole process group; the daemon decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass  # refused (the systemd unit's seccomp filter takes setpriority away): same priority then
    add_working_directory()
    try:
        handler = load_function(function)
    except BaseException as exc:  # SyntaxError, SystemExit in module code...: all are load failures
        conn.send_bytes(bytes([LOAD_FAILED]) + describe_exception(exc).encode("utf-8", "replace"))
        return
    conn.send_bytes(bytes([READY]))
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the daemon is gone
        if request == SHUTDOWN:
            return
        if request[0] == RECORDS:
            conn.send_bytes(serve_records(handler, request))
        else:
            event, fields = pickle.loads(request)
            kind, body = run_handler(handler, event, fields)
            conn.send_bytes(bytes([kind]) + body)


def run_handler(handler: Callable[..., Any], event: dict[str, Any], fields: dict[str, Any]) -> tuple[int, bytes]:
    """Call the handler as Lambda's Python runtime does: (RESULT, its response as JSON), or
    (ERROR, "<errorType>: <errorMessage>")."""
    try:
        result = handler(event, LambdaContext(**fields))
    except Exception as exc:
        # SystemExit/KeyboardInterrupt are not caught: like on Lambda, they end the runtime.
        traceback.print_exc(file=sys.stderr)
        return ERROR, describe_exception(exc).encode("utf-8", "replace")
    try:
        body = marshal(result)
    except (TypeError, ValueError, RecursionError) as exc:
        return ERROR, f"Runtime.MarshalError: Unable to marshal response: {exc}".encode("utf-8", "replace")
    if len(body) > MAX_RESPONSE_BYTES:
        # Lambda's synchronous response limit: the invocation fails, as it does on AWS.
        message = (f"Function.ResponseSizeTooLarge: Response payload size ({len(body)} bytes) exceeded "
                   f"maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes).")
        return ERROR, message.encode()
    return RESULT, body


def serve_records(handler: Callable[..., Any], request: bytes) -> bytes:
    """One invocation sent as records (see :meth:`WorkerPool.invoke_records`): the event is built
    and measured here, and the response decoded and validated here, so the daemon's event loop
    does none of it. Answers VALIDATED, REJECTED, TOO_LARGE or ERROR."""
    stream = io.BytesIO(request)
    stream.seek(1)
    header, ids, arrivals, datas, kinesis, max_payload = pickle.load(stream)
    fields = pickle.load(stream)
    invocation_id, stream_arn, region, source_arn = header
    records = [SourceRecord(i, d, a, k) for i, d, a, k in zip(ids, datas, arrivals, kinesis or repeat(None),
                                                              strict=False)]
    event = build_event(records, invocation_id=invocation_id, delivery_stream_arn=stream_arn, region=region,
                        source_kinesis_stream_arn=source_arn)
    sent = [item["data"] for item in event["records"]]
    size = len(orjson.dumps(event))
    if size > max_payload:
        return bytes([TOO_LARGE]) + str(size).encode()
    kind, body = run_handler(handler, event, fields)
    if kind != RESULT:
        return bytes([kind]) + body
    try:
        validated = validate_response(decode_response(body), ids, sent)
    except LambdaInvocationError as exc:
        return bytes([REJECTED]) + pickle.dumps((exc.code, exc.message))
    return bytes([VALIDATED]) + pickle.dumps(validated, protocol=pickle.HIGHEST_PROTOCOL)


def decode_response(body: bytes | memoryview) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Only NaN/Infinity get here (json.dumps emits them); Firehose's parser rejects them.
        raise LambdaInvocationError(JSON_PROCESSING, f"The response is not valid JSON: {exc}") from None
