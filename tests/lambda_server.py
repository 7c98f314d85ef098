"""An AWS Lambda ``Invoke`` API endpoint for tests, running Python handlers in-process.

Speaks the REST-JSON wire protocol boto3's ``lambda`` client uses (``endpoint_url`` override, any
credentials), with the status codes, headers and bodies AWS Lambda answers:

* ``POST /2015-03-31/functions/{FunctionName}/invocations`` (``Qualifier`` query parameter,
  ``X-Amz-Invocation-Type``: ``RequestResponse`` -> 200, ``Event`` -> 202, ``DryRun`` -> 204);
  ``FunctionName`` may be a name, a name with ``:qualifier``, a partial ARN
  (``<account>:function:<name>``) or an ARN, with ``$LATEST`` as the only version;
* success: 200, the handler's return value as JSON, ``X-Amz-Executed-Version: $LATEST``;
* handler exception: 200 with ``X-Amz-Function-Error: Unhandled`` and
  ``{"errorMessage", "errorType", "requestId", "stackTrace"}``; a result that cannot be
  serialised: ``Runtime.MarshalError``; a result over 6 MB: ``Function.ResponseSizeTooLarge``;
  a handler still running after the function's ``timeout_secs``: ``Task timed out after N seconds``
  (the handler thread is abandoned, as a thread cannot be killed);
* unknown function or qualifier: 404 ``ResourceNotFoundException``
  ``{"Type": "User", "Message": "Function not found: <arn>"}``;
* request body over 6 MB (6291456 bytes): 413 ``RequestEntityTooLargeException``;
* request body that is not JSON: 400 ``InvalidRequestContentException``;
* throttling on demand (:meth:`LambdaServer.throttle`): 429 ``TooManyRequestsException``.

Errors carry ``x-amzn-ErrorType`` (what botocore reads as the error code) and ``x-amzn-RequestId``.
Every invocation request that reached a function is recorded in :attr:`LambdaServer.invocations`
the moment it reaches it (its outcome is filled in when the handler returns), so a handler still
running after its caller gave up (a client read timeout) cannot add itself to the list later:
:meth:`LambdaServer.reset` gives the next test a list holding only its own requests.
"""

from __future__ import annotations

import base64
import decimal
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: Lambda's synchronous invocation limits (the documented "6 MB").
MAX_REQUEST_BYTES = 6_291_456
MAX_RESPONSE_BYTES = 6_291_556

_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
_ARN = re.compile(
    r"^(?:arn:(?P<partition>[^:]+):lambda:(?P<region>[^:]+):)?(?:(?P<account>\d{12}):function:)?"
    r"(?P<name>[A-Za-z0-9_-]+)(?::(?P<qualifier>[^:]+))?$"
)


@dataclass
class Function:
    """A function the server can invoke: ``handler(event, context)`` with a Lambda-like context."""

    name: str
    handler: Callable[..., Any]
    timeout_secs: float = 60.0


@dataclass
class Invocation:
    """One request that reached a function: its name as sent, decoded payload and outcome
    (``status`` is None while the handler is still running)."""

    function: str
    event: Any
    status: int | None = None
    function_error: str | None = None


@dataclass
class LambdaServer:
    """A threaded HTTP server on 127.0.0.1 implementing Lambda's ``Invoke`` (use as a context manager)."""

    region: str = "us-east-1"
    account_id: str = "123456789012"
    functions: dict[str, Function] = field(default_factory=dict)
    invocations: list[Invocation] = field(default_factory=list)
    _throttle_left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- configuration ---------------------------------------------------------------------

    def add_function(self, name: str, handler: Callable[..., Any], *, timeout_secs: float = 60.0) -> str:
        """Register ``handler`` as function ``name``; returns its unqualified ARN."""
        self.functions[name] = Function(name, handler, timeout_secs)
        return self.arn(name)

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{name}"

    def throttle(self, requests: int) -> None:
        """Answer the next ``requests`` invocations with 429 ``TooManyRequestsException``."""
        with self._lock:
            self._throttle_left = requests

    def _take_throttle(self) -> bool:
        with self._lock:
            if self._throttle_left > 0:
                self._throttle_left -= 1
                return True
            return False

    def record(self, invocation: Invocation) -> None:
        with self._lock:
            self.invocations.append(invocation)

    def reset(self) -> None:
        """Forget recorded invocations and pending throttling (between tests sharing the server).

        A request that reached a function before the reset was recorded then, so it is gone from
        the list even if its handler is still running (it never appends itself when it returns)."""
        with self._lock:
            self.invocations = []
            self._throttle_left = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LambdaServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True  # abandoned (timed-out) handlers must not hold up shutdown
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="lambda-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> LambdaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- function resolution -----------------------------------------------------------------

    def resolve(self, raw_name: str, qualifier: str | None) -> tuple[Function | None, str]:
        """The function ``raw_name`` designates and the ARN Lambda names in "not found" errors."""
        match = _ARN.match(raw_name)
        if not match:
            return None, raw_name
        name = match["name"]
        qualifier = qualifier or match["qualifier"]
        arn = self.arn(name) + (f":{qualifier}" if qualifier else "")
        region, account = match["region"], match["account"]
        if (region and region != self.region) or (account and account != self.account_id):
            return None, arn
        if qualifier not in (None, "$LATEST"):
            return None, arn
        return self.functions.get(name), arn


class _Context:
    """The ``context`` a handler receives (the attributes of AWS's Python runtime)."""

    def __init__(self, function: Function, arn: str, request_id: str, deadline: float) -> None:
        self.aws_request_id = request_id
        self.function_name = function.name
        self.function_version = "$LATEST"
        self.invoked_function_arn = arn
        self.memory_limit_in_mb = "128"
        self.log_group_name = f"/aws/lambda/{function.name}"
        self.log_stream_name = f"2024/01/01/[$LATEST]{uuid.uuid4().hex}"
        self.identity = None
        self.client_context = None
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _decimal_as_float(value: object) -> object:
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_handler(server: LambdaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass  # quiet test output

        # -- responses ---------------------------------------------------------------------

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-amzn-RequestId", self.request_id)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (a read timeout): as on AWS, nobody hears

        def _error(
            self, status: int, error_type: str, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            self._send(status, json.dumps(body).encode(), {"x-amzn-ErrorType": error_type, **(headers or {})})

        # -- the operation -----------------------------------------------------------------

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.request_id = str(uuid.uuid4())
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            match = _PATH.match(url.path)
            if not match:
                self._error(
                    404, "UnknownOperationException", {"Type": "User", "Message": "Unknown operation"}
                )
                return
            raw_name = unquote(match["name"])
            qualifiers = parse_qs(url.query).get("Qualifier")
            qualifier = qualifiers[0] if qualifiers else None
            function, arn = server.resolve(raw_name, qualifier)
            if function is None:
                self._error(
                    404,
                    "ResourceNotFoundException",
                    {"Type": "User", "Message": f"Function not found: {arn}"},
                )
                return
            if server._take_throttle():
                self._error(
                    429,
                    "TooManyRequestsException",
                    {
                        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
                        "Type": "User",
                        "message": "Rate Exceeded.",
                    },
                    {"Retry-After": "1"},
                )
                return
            if len(body) > MAX_REQUEST_BYTES:
                self._error(
                    413,
                    "RequestEntityTooLargeException",
                    {
                        "Type": "User",
                        "message": f"Request must be smaller than {MAX_REQUEST_BYTES} bytes "
                        "for the InvokeFunction operation",
                    },
                )
                return
            try:
                event = json.loads(body) if body else {}
            except ValueError as exc:
                self._error(
                    400,
                    "InvalidRequestContentException",
                    {"Type": "User", "message": f"Could not parse request body into json: {exc}"},
                )
                return
            invocation_type = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
            if invocation_type == "DryRun":
                self._send(204, b"")
                return
            invocation = Invocation(raw_name, event)
            server.record(invocation)  # now, not when the handler returns: see the module docstring
            status, payload, function_error, log_text = self._run(function, arn, event)
            invocation.status, invocation.function_error = status, function_error
            if invocation_type == "Event":
                self._send(202, b"")
                return
            headers = {"X-Amz-Executed-Version": "$LATEST"}
            if function_error:
                headers["X-Amz-Function-Error"] = function_error
            if self.headers.get("X-Amz-Log-Type") == "Tail":
                headers["X-Amz-Log-Result"] = base64.b64encode(log_text.encode()[-4096:]).decode()
            self._send(status, payload, headers)

        def _run(self, function: Function, arn: str, event: Any) -> tuple[int, bytes, str | None, str]:
            started = time.monotonic()
            deadline = time.monotonic() + function.timeout_secs
            context = _Context(function, arn, self.request_id, deadline)
            outcome: dict[str, Any] = {}

            def call() -> None:
                try:
                    outcome["result"] = function.handler(event, context)
                except Exception as exc:
                    outcome["error"] = exc
                    outcome["trace"] = traceback.format_list(traceback.extract_tb(exc.__traceback__))

            worker = threading.Thread(target=call, daemon=True)
            worker.start()
            worker.join(function.timeout_secs)
            # The platform lines of a Lambda log tail (handler output is not captured: stdout is
            # process-wide and other threads are using it).
            rid = self.request_id
            log_text = (
                f"START RequestId: {rid} Version: $LATEST\nEND RequestId: {rid}\n"
                f"REPORT RequestId: {rid}\tDuration: {(time.monotonic() - started) * 1000:.2f} ms\n"
            )
            if worker.is_alive():
                message = f"{self.request_id} Task timed out after {function.timeout_secs:.2f} seconds"
                return 200, json.dumps({"errorMessage": message}).encode(), "Unhandled", log_text
            if "error" in outcome:
                exc = outcome["error"]
                body = {
                    "errorMessage": str(exc),
                    "errorType": type(exc).__name__,
                    "requestId": self.request_id,
                    "stackTrace": outcome["trace"],
                }
                return 200, json.dumps(body).encode(), "Unhandled", log_text
            try:
                payload = json.dumps(outcome.get("result"), default=_decimal_as_float).encode()
            except (TypeError, ValueError) as exc:
                body = {
                    "errorMessage": f"Unable to marshal response: {exc}",
                    "errorType": "Runtime.MarshalError",
                    "requestId": self.request_id,
                    "stackTrace": [],
                }
                return 200, json.dumps(body).encode(), "Unhandled", log_text
            if len(payload) > MAX_RESPONSE_BYTES:
                body = {
                    "errorMessage": f"Response payload size ({len(payload)} bytes) exceeded maximum allowed "
                    f"payload size ({MAX_RESPONSE_BYTES} bytes).",
                    "errorType": "Function.ResponseSizeTooLarge",
                }
                return 200, json.dumps(body).encode(), "Unhandled", log_text
            return 200, payload, None, log_text

    return Handler


def running(functions: dict[str, Callable[..., Any]], **kwargs: Any) -> Iterator[LambdaServer]:
    """Generator for a pytest fixture: a started server with ``functions`` registered, stopped after."""
    server = LambdaServer(**kwargs)
    for name, handler in functions.items():
        server.add_function(name, handler)
    server.start()
    try:
        yield server
    finally:
        server.stop()
