"""The Firehose HTTP API: AWS JSON 1.1 protocol on ``POST /``, routed by ``X-Amz-Target``.

Responses are compact JSON with ``x-amzn-RequestId``; errors are ``{"__type","message"}`` with
Firehose's codes, so botocore, the AWS CLI, the JavaScript SDK, Kinesis Agent and Fluent Bit
parse them unchanged (reference §1). Limits are enforced here, on decoded bytes: 1,024,000 bytes
a record, 500 records and 4 MiB a PutRecordBatch.

A PutRecord/PutRecordBatch answers 200 only after its records are in the spool and fsynced.
When the stream's spool is at its cap the whole request is refused with 503
``ServiceUnavailableException`` "Slow down." and nothing of it is written.
"""

from __future__ import annotations

import asyncio
import binascii
import contextvars
import hashlib
import hmac
import random
import sys
import time
import unicodedata
import uuid
import zlib
from array import array
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import pybase64
import structlog
from aiohttp import ClientPayloadError, web

from firehose.access import KeyPolicy, denied_message
from firehose.api_records import DecodedRecords, decode_batch
from firehose.httpserver import BodyBudget, HttpLimits
from firehose.log import LogError, LogFullError, LogTooLargeError
from firehose.names import STREAM_NAME_RE, stream_arn
from firehose.redrive import REDRIVE_HEADER, REDRIVE_ID_RE

if TYPE_CHECKING:
    from firehose.daemon import Daemon

TARGET_PREFIX = "Firehose_20150804."
JSON_CT = "application/x-amz-json-1.1"
MAX_RECORD_BYTES = 1_024_000
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

log = structlog.get_logger()
# The X-Firehose-Redrive-Id of the request being handled (firehose/redrive.py).
_redrive_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("redrive_id", default=None)
#: The signing key's limits (firehose/access.py) for the request being answered; None: unlimited.
_caller: contextvars.ContextVar[KeyPolicy | None] = contextvars.ContextVar("caller", default=None)


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def _validation(path: str, value: Any, constraint: str) -> ApiError:
    shown = value if isinstance(value, str | int) else "..."
    if isinstance(shown, str) and len(shown) > 64:
        shown = shown[:61] + "..."
    return ApiError(
        "ValidationException",
        f"1 validation error detected: Value '{shown}' at '{path}' failed to satisfy constraint: {constraint}",
    )


_ids = random.Random()  # seeded from os.urandom once


def request_id() -> str:
    """A version-4 UUID for ``x-amzn-RequestId``. Not from ``uuid.uuid4()``: its ``os.urandom``
    is a system call that releases the GIL on every request, and an id needs to be unique, not
    unguessable."""
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


def _response(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers={"Content-Type": JSON_CT, "x-amzn-RequestId": request_id()},
    )


def error_response(err: ApiError) -> web.Response:
    return _response({"__type": err.code, "message": err.message}, err.status)


def _str_member(doc: dict[str, Any], name: str, path: str) -> str:
    value = doc.get(name)
    if value is None:
        raise _validation(path, None, "Member must not be null")
    if not isinstance(value, str):
        raise ApiError("SerializationException", f"Unexpected value type for '{name}': expected a string")
    return value


def _stream_name(doc: dict[str, Any]) -> str:
    name = _str_member(doc, "DeliveryStreamName", "deliveryStreamName")
    if not STREAM_NAME_RE.fullmatch(name):
        if not name or len(name) > 64:
            raise _validation(
                "deliveryStreamName", name, "Member must have length between 1 and 64"
                if name else "Member must have length greater than or equal to 1"
            )
        raise _validation("deliveryStreamName", name, "Member must satisfy regular expression pattern: [a-zA-Z0-9_.-]+")
    return name


def _decode_data(record: Any, index: int | None) -> bytes:
    where = "record.data" if index is None else f"records.{index + 1}.member.data"
    if not isinstance(record, dict):
        raise ApiError("SerializationException", "Unexpected value type for a record: expected an object")
    data = record.get("Data")
    if data is None:
        raise _validation(where, None, "Member must not be null")
    if not isinstance(data, str):
        raise ApiError("SerializationException", "Unexpected value type for 'Data': expected a base64 string")
    try:
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("SerializationException", f"Invalid base64 in '{where}'") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise _validation(where, "java.nio.HeapByteBuffer", f"Member must have length less than or equal to {MAX_RECORD_BYTES}")
    return raw


def decode_records(records: list[Any]) -> tuple[list[bytes], int]:
    """Decode a PutRecordBatch's ``Records``: the record bytes and their total size.

    The general way, for a body :func:`firehose.api_records.decode_batch` did not take: every
    record with pybase64 (SIMD; ~4x binascii); any problem falls back to the per-record path,
    which names the offending record in Firehose's error wording.
    """
    try:
        # Positional (altchars, validate): keyword parsing was a quarter of the call's cost.
        out = [pybase64.b64decode(r["Data"], None, True) for r in records]
    except (TypeError, KeyError, ValueError):  # binascii.Error is a ValueError
        out = [_decode_data(r, i) for i, r in enumerate(records)]
    return out, _checked_sizes(out)


def _checked_sizes(records: list[bytes]) -> int:
    """The records' total size, after a ValidationException naming the first one over the limit."""
    lengths = list(map(len, records))
    if max(lengths, default=0) > MAX_RECORD_BYTES:
        i = next(i for i, n in enumerate(lengths) if n > MAX_RECORD_BYTES)
        raise _validation(f"records.{i + 1}.member.data", "java.nio.HeapByteBuffer",
                          f"Member must have length less than or equal to {MAX_RECORD_BYTES}")
    return sum(lengths)


def record_ids_json(prefix: str, first: int, count: int) -> str:
    """``{"RecordId":"<prefix><16 hex digits of seq>"}`` for ``count`` sequence numbers from
    ``first``, comma-separated: one ``bytes.hex`` of the big-endian sequence numbers, a comma
    after every 8 bytes, and the commas replaced by what lies between two ids (a fifth of the
    cost of formatting 500 ids one by one; 500 dicts through orjson cost more still)."""
    if count <= 0:
        return ""
    seqs = array("Q", range(first, first + count))
    if sys.byteorder == "little":
        seqs.byteswap()
    return ('{"RecordId":"' + prefix + seqs.tobytes().hex(",", 8).replace(",", '"},{"RecordId":"' + prefix)
            + '"}')


class HealthSubject(Protocol):
    """What ``/healthz`` reads of a stream (a :class:`firehose.stream.StreamRuntime`)."""

    @property
    def can_accept(self) -> bool:
        """Whether a small PutRecord would be taken now."""

    @property
    def fenced(self) -> bool:
        """Whether the stream's spool refuses records until a restart (a failed fsync)."""

    def failing_for_secs(self) -> float | None:
        """How long the current run of failed delivery attempts has lasted (None: not failing)."""

    def status(self) -> dict[str, Any]:
        """The stream's fields of the report (docs/operations.md, "Health")."""


def health_report(
    streams: Mapping[str, HealthSubject], *, ready: bool, degraded_after_secs: float
) -> tuple[int, dict[str, Any]]:
    """``GET /healthz``: the HTTP status and the body (docs/operations.md, "Health").

    The daemon is ``starting`` (503) until it is ready, and again while it shuts down;
    ``unavailable`` (503) when it has streams and none of them can take a record; ``degraded``
    (200: a load balancer keeps sending, records are safe in the spool) when a stream's
    destination has been failing for longer than ``degraded_after_secs`` or a spool is fenced;
    else ``ok``. ``reasons`` says why, one line per stream that is not ``ok``."""
    docs: dict[str, Any] = {}
    reasons: list[str] = []
    degraded = False
    accepting = 0
    for name in sorted(streams):
        rt = streams[name]
        doc = rt.status()
        failing = rt.failing_for_secs()
        state = "ok"
        if failing is not None and failing > degraded_after_secs:
            state = "degraded"
            degraded = True
            reasons.append(f"stream '{name}': delivery has been failing for {int(failing)} s "
                           f"(api.health.degraded_after_secs: {degraded_after_secs:g})")
        if rt.fenced:
            degraded = True
            reasons.append(f"stream '{name}': spool fenced after a failed fsync; restart the daemon")
        if rt.can_accept:
            accepting += 1
        else:
            state = "unavailable"
            if not rt.fenced:
                reasons.append(f"stream '{name}': not accepting records (spool at its cap, or stopping)")
        docs[name] = {"status": state, **doc}
    if not ready:
        status = "starting"
    elif streams and not accepting:
        status = "unavailable"
    else:
        status = "degraded" if degraded else "ok"
    code = 200 if status in ("ok", "degraded") else 503
    return code, {"status": status, "reasons": reasons, "streams": docs}


class _Body:
    __slots__ = ("data", "sha256")

    def __init__(self, data: bytes, sha256: str) -> None:
        self.data = data
        self.sha256 = sha256


def _document(op: str | None, body: bytes) -> dict[str, Any]:
    """The request's JSON object: a PutRecordBatch of the exact expected shape in one pass
    (firehose/api_records.py), anything else by orjson."""
    if op == "PutRecordBatch" and (batch := decode_batch(body)) is not None:
        return batch
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise ApiError("SerializationException", "Request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ApiError("SerializationException", "Request body must be a JSON object")
    return doc


def _too_large() -> ApiError:
    return ApiError("SerializationException", f"Request body is larger than {MAX_BODY_BYTES} bytes", 413)


def _inflate(data: bytes, encoding: str) -> bytes:
    """Undo a request's Content-Encoding (gzip or deflate), never producing more than the body
    limit: a compression bomb is refused after at most MAX_BODY_BYTES of output."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return data
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise ApiError("SerializationException", f"Unsupported Content-Encoding {encoding[:32]!r}", 415)
    wbits = 31 if enc != "deflate" else (15 if data[:1] == b"\x78" else -15)
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error:
        raise ApiError("SerializationException", f"Request body is not valid {enc}") from None
    if len(out) > MAX_BODY_BYTES or inflater.unconsumed_tail:
        raise _too_large()
    if not inflater.eof:
        raise ApiError("SerializationException", f"Request body is not valid {enc} (truncated)")
    return out


class FirehoseApi:
    """The aiohttp application serving the Firehose API, ``/healthz`` and ``/metrics``."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ops: dict[str, Callable[[dict[str, Any]], Awaitable[web.Response]]] = {
            "PutRecord": self.put_record,
            "PutRecordBatch": self.put_record_batch,
            "ListDeliveryStreams": self.list_delivery_streams,
            "DescribeDeliveryStream": self.describe_delivery_stream,
            "ListTagsForDeliveryStream": self.list_tags,
            "TagDeliveryStream": self.tag_stream,
            "UntagDeliveryStream": self.untag_stream,
        }
        if daemon.control is not None:
            self.ops.update({"CreateDeliveryStream": self.create_delivery_stream,
                             "DeleteDeliveryStream": self.delete_delivery_stream,
                             "UpdateDestination": self.update_destination,
                             "StartDeliveryStreamEncryption": self.start_encryption,
                             "StopDeliveryStreamEncryption": self.stop_encryption})
        lim = daemon.config.api.limits
        self.limits = HttpLimits(
            max_connections=lim.max_connections, header_timeout_secs=lim.header_timeout_secs,
            body_timeout_secs=lim.body_timeout_secs, idle_timeout_secs=lim.idle_timeout_secs,
            max_inflight_body_bytes=lim.max_inflight_body_mib << 20,
            max_unauthenticated_body_bytes=lim.max_unauthenticated_body_mib << 20,
        )
        self.budget = BodyBudget(self.limits)
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_post("/", self.handle)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/status.json", self.status_json)
        self.app.router.add_get("/status", self.status_page)

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``. With auth on it stays public for load balancers, with only
        ``{"status": ...}``; the details (``?detail=1``) need an operator token or a signature."""
        code, body = health_report(self.daemon.streams, ready=self.daemon.ready,
                                   degraded_after_secs=self.daemon.config.api.health.degraded_after_secs)
        for name, reason in sorted(self.daemon.failed_streams.items()):
            body["streams"][name] = {"status": "failed", "accepting_records": False, "reason": reason}
            body["reasons"].append(f"stream '{name}': not started: {reason}")
            if body["status"] == "ok":
                body["status"] = "degraded"
        if self.daemon.failed_streams and self.daemon.ready and not any(
                rt.can_accept for rt in self.daemon.streams.values()):
            code, body["status"] = 503, "unavailable"  # no stream can take records
        if self.daemon.config.api.auth.mode != "none":
            detail = request.query.get("detail") not in (None, "", "0", "false")
            if not detail:
                body = {"status": body["status"]}
            elif not self._operator(request):
                return error_response(ApiError("AccessDeniedException", "An operator token or a signed "
                                               "request is needed for health details.", 403))
        return web.Response(body=orjson.dumps(body), status=code, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        if self.daemon.config.api.auth.mode != "none" and not self._operator(request):
            return error_response(ApiError("AccessDeniedException", "An operator token or a signed request "
                                           "is needed for metrics.", 403))
        return web.Response(body=self.daemon.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def status_json(self, request: web.Request) -> web.Response:
        """``GET /status.json`` (firehose/status.py); ``?history=1`` adds the charts' samples."""
        from firehose.status import status_document

        if self.daemon.config.api.auth.mode != "none" and not self._operator(request):
            return error_response(ApiError("AccessDeniedException", "An operator token or a signed request "
                                           "is needed for the status.", 403))
        history = request.query.get("history") not in (None, "", "0", "false")
        doc = status_document(self.daemon, self.daemon.status_sampler, history=history)
        return web.Response(body=orjson.dumps(doc), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def status_page(self, request: web.Request) -> web.Response:
        """``GET /status``: the status page, one self-contained HTML file (no external assets).
        It holds no figures: it reads ``/status.json``, with the operator token from its URL
        fragment when auth is on, so the page itself can be served to anyone."""
        from importlib.resources import files

        page = files("firehose").joinpath("status.html").read_bytes()
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:",
            "X-Content-Type-Options": "nosniff"})

    def _operator(self, request: web.Request) -> bool:
        """Whether a request to an operator endpoint may see details: ``Authorization: Bearer <one
        of api.operator_tokens>`` or a valid SigV4 signature (GET, empty body)."""
        api = self.daemon.config.api
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[7:].strip().encode("utf-8", "surrogateescape")
            return any(hmac.compare_digest(given, t.encode("utf-8", "surrogateescape")) for t in api.operator_tokens)
        if header.startswith("AWS4-HMAC-SHA256 ") and request.method == "GET":
            from firehose.auth import AuthError, preverify

            try:
                pending = preverify(request.method, request.raw_path.split("?", 1)[0], request.query_string,
                                    list(request.headers.items()), api.auth.secrets)
                pending.verify(hashlib.sha256(b"").hexdigest())
            except (AuthError, ValueError):
                return False
            # Status and metrics name every stream: a key limited to some (firehose/access.py) may not read them.
            return pending.akid in api.auth.credentials and api.auth.policy(pending.akid) is None
        return False

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /``. Authentication comes before anything about the operation is answered:
        with SigV4 on, every header check runs before the body is read, the body is hashed as it
        is read (the bytes as sent, before any Content-Encoding is undone), and the signature is
        checked before the operation is looked at. Bodies are read within ``body_timeout_secs``,
        no further than the size limit (413), and only while the bytes being read at once across
        every request stay under their caps (503 otherwise, before reading)."""
        target = request.headers.get("X-Amz-Target", "")
        op = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else None
        handler = self.ops.get(op) if op else None
        try:
            auth = self.daemon.config.api.auth
            pending = None
            if auth.mode == "sigv4":
                from firehose.auth import AuthError, preverify

                try:
                    pending = preverify(request.method, request.raw_path.split("?", 1)[0], request.query_string,
                                        list(request.headers.items()), auth.secrets)
                except AuthError as exc:
                    raise ApiError(exc.code, exc.message, exc.status) from None
            raw = await self._read_body(request, hashing=pending is not None)
            if pending is not None:
                try:
                    pending.verify(raw.sha256)
                except AuthError as exc:
                    raise ApiError(exc.code, exc.message, exc.status) from None
            if handler is None:
                if op in _KNOWN_UNSUPPORTED:
                    raise ApiError(
                        "InvalidArgumentException",
                        f"{op} is not supported: delivery streams are configured in the daemon's YAML file",
                    )
                raise ApiError("UnknownOperationException", f"Unknown operation {target[:128]!r}")
            doc = _document(op, _inflate(raw.data, request.headers.get("Content-Encoding", "")))
            if pending is not None:
                self._authorize(pending.akid, op or "", doc)
            redrive = request.headers.get(REDRIVE_HEADER)
            if redrive is not None:
                if op != "PutRecordBatch" or not REDRIVE_ID_RE.fullmatch(redrive):
                    raise ApiError("InvalidArgumentException",
                                   f"{REDRIVE_HEADER} must be 8-64 of [A-Za-z0-9_-], on PutRecordBatch only")
                _redrive_id.set(redrive)
            return await handler(doc)
        except ApiError as err:
            self.daemon.metrics.refused_requests.labels(err.code).inc()
            return error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not take the daemon down; answer like AWS does
            log.error("api_request_failed", operation=op, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
            return error_response(ApiError("InternalFailure", "An internal error occurred", 500))

    def _authorize(self, akid: str, op: str, doc: dict[str, Any]) -> None:
        """IAM-lite (firehose/access.py): AccessDeniedException unless the key's ``allow`` matches
        the action and, for a call on a stream, its ``streams`` match the stream's name. Checked
        before the call is looked at further, so a key learns nothing about streams it may not see."""
        api = self.daemon.config.api
        if akid not in api.auth.credentials:
            # Signed with a key a reload has since removed (the signature was checked against the
            # credentials of the time): nothing is allowed.
            raise ApiError("AccessDeniedException", denied_message(akid, api.account_id, f"firehose:{op}", "*"), 400)
        policy = api.auth.policy(akid)
        _caller.set(policy)
        if policy is None:
            return
        action = f"firehose:{op}"
        name = doc.get("DeliveryStreamName")
        valid_name = isinstance(name, str) and STREAM_NAME_RE.fullmatch(name) is not None
        if op == "ListDeliveryStreams":
            allowed = policy.allows_action(action)
        else:
            allowed = policy.allows_action(action) and valid_name and policy.allows_stream(str(name))
        if not allowed:
            # A name that is not a stream name is not echoed back: the resource is written as *.
            resource = stream_arn(api.region, api.account_id, str(name) if valid_name else "*")
            raise ApiError("AccessDeniedException", denied_message(akid, api.account_id, action, resource), 400)

    async def _read_body(self, request: web.Request, *, hashing: bool) -> _Body:
        """The request body as sent, read within the deadline and the caps (see :meth:`handle`).
        Bytes are reserved as they arrive, so a request that declares a large body and stalls
        holds only what it sent; when the caps are already reached, 503 before reading."""
        limits = self.budget.limits
        declared = request.content_length
        if declared is not None and declared > MAX_BODY_BYTES:
            raise _too_large()
        authenticated = not hashing and self.daemon.config.api.auth.mode == "none"
        if not self.budget.reserve(min(declared or 1, 1 << 16), authenticated=authenticated):
            self.budget.refused += 1
            log.info("http_body_refused", reason="too many body bytes being read at once", declared_bytes=declared)
            raise ApiError("ServiceUnavailableException", "Slow down.", 503)
        reserved = min(declared or 1, 1 << 16)
        digest = hashlib.sha256() if hashing else None
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(limits.body_timeout_secs):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise _too_large()
                    if size > reserved:
                        if not self.budget.reserve(size - reserved, authenticated=authenticated):
                            self.budget.refused += 1
                            log.info("http_body_refused", reason="too many body bytes being read at once",
                                     declared_bytes=declared, received_bytes=size)
                            raise ApiError("ServiceUnavailableException", "Slow down.", 503)
                        reserved = size
                    if digest is not None:
                        digest.update(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            log.info("http_body_timed_out", received_bytes=size, declared_bytes=declared)
            raise ApiError("RequestTimeoutException", "The request body was not received in time.", 408) from None
        except (ClientPayloadError, ConnectionResetError):
            # The client went away mid-body: nothing to answer, nothing wrong with the daemon.
            log.info("http_client_disconnected", received_bytes=size, declared_bytes=declared)
            raise ApiError("RequestTimeoutException", "The connection closed before the body was read.", 400) from None
        finally:
            self.budget.release(reserved, authenticated=authenticated)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return _Body(data, digest.hexdigest() if digest is not None else "")

    # ------------------------------------------------------------------ data plane
    def _stream(self, name: str) -> Any:
        rt = self.daemon.streams.get(name)
        control = self.daemon.control
        if rt is None and (name in self.daemon.reloading or name in self.daemon.failed_streams
                           or (control is not None and not control.settled)):
            raise ApiError("ServiceUnavailableException", "Slow down.", 503)
        if rt is None:
            raise ApiError(
                "ResourceNotFoundException",
                f"Firehose {name} under account {self.daemon.config.api.account_id} not found.",
            )
        return rt

    async def _direct_put_stream(self, name: str) -> Any:
        control = self.daemon.control
        if control is not None and name not in self.daemon.streams:
            await control.find(name)  # cluster mode: created through another daemon a moment ago
        if control is not None and (name in control.deleting or name in control.creating):
            status = control.status(name)
            raise ApiError("ResourceNotFoundException", f"Firehose {name} under account "
                           f"{self.daemon.config.api.account_id} is {status}; it takes no records.")
        rt = self._stream(name)
        stype = self.daemon.stream_type(name)
        if stype != "DirectPut":
            raise ApiError("InvalidArgumentException", f"This operation is not permitted on {stype} delivery stream type.")
        return rt

    def _refuse_over_limits(self, rt: Any, records: list[bytes], nbytes: int) -> None:
        """503 "Slow down." for the whole request when the stream is not accepting, its spool is
        at its cap, or the request is over its quotas (firehose/quotas.py): nothing of it is half
        stored, and every SDK retries a 503."""
        quota = self.daemon.quotas.get(rt.name)
        if (not rt.accepting or not rt.has_room(nbytes + 64 + 4 * len(records))
                or (quota is not None and not quota.admit(len(records), nbytes))):
            self.daemon.metrics.throttled_records.labels(rt.name).inc(len(records))
            raise ApiError("ServiceUnavailableException", "Slow down.", 503)

    async def _ingest(self, rt: Any, records: list[bytes], nbytes: int) -> int:
        self._refuse_over_limits(rt, records, nbytes)
        try:
            return int(await rt.put(records, nbytes=nbytes))
        except LogFullError:
            self.daemon.metrics.throttled_records.labels(rt.name).inc(len(records))
            raise ApiError("ServiceUnavailableException", "Slow down.", 503) from None
        except LogTooLargeError as exc:  # cluster mode: a retry cannot succeed, so no 503
            raise ApiError("InvalidArgumentException", str(exc)) from None
        except (LogError, OSError) as exc:
            log.error("spool_append_failed", stream=rt.name, error=str(exc))
            raise ApiError("ServiceUnavailableException", "Slow down.", 503) from None

    async def put_record(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        record = doc.get("Record")
        if record is None:
            raise _validation("record", None, "Member must not be null")
        data = _decode_data(record, None)
        rt = await self._direct_put_stream(name)
        seq = await self._ingest(rt, [data], len(data))
        return _response({"RecordId": rt.record_id(seq), "Encrypted": False})

    async def put_record_batch(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        records = doc.get("Records")
        if records is None:
            raise _validation("records", None, "Member must not be null")
        if not isinstance(records, list):
            raise ApiError("SerializationException", "Unexpected value type for 'Records': expected a list")
        if not records:
            raise _validation("records", "[]", "Member must have length greater than or equal to 1")
        if len(records) > MAX_BATCH_RECORDS:
            raise _validation("records", "...", f"Member must have length less than or equal to {MAX_BATCH_RECORDS}")
        decoded: list[bytes]
        if isinstance(records, DecodedRecords):
            decoded, nbytes = records, _checked_sizes(records)
        else:
            decoded, nbytes = decode_records(records)
        if nbytes > MAX_BATCH_BYTES:
            raise ApiError("InvalidArgumentException", "Records size exceeds 4 MB limit")
        rt = await self._direct_put_stream(name)
        redrive = _redrive_id.get()
        if redrive is not None:
            from firehose.api_redrive import store_redriven

            return await store_redriven(self, rt, redrive, decoded, nbytes)
        first = await self._ingest(rt, decoded, nbytes)
        body = '{"FailedPutCount":0,"Encrypted":false,"RequestResponses":[' + record_ids_json(
            rt.record_id_prefix, first, len(decoded)) + "]}"
        return web.Response(
            body=body.encode(),
            headers={"Content-Type": JSON_CT, "x-amzn-RequestId": request_id()},
        )

    # ------------------------------------------------------------------ control plane
    async def list_delivery_streams(self, doc: dict[str, Any]) -> web.Response:
        limit = doc.get("Limit", 10)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise ApiError("SerializationException", "Unexpected value type for 'Limit': expected an integer")
        if not 1 <= limit <= 10000:
            raise _validation("limit", limit, "Member must have value between 1 and 10000")
        stype = doc.get("DeliveryStreamType")
        if stype is not None and stype not in ("DirectPut", "KinesisStreamAsSource", "MSKAsSource", "DatabaseAsSource"):
            raise _validation(
                "deliveryStreamType", stype,
                "Member must satisfy enum value set: [DirectPut, KinesisStreamAsSource, MSKAsSource, DatabaseAsSource]",
            )
        start = doc.get("ExclusiveStartDeliveryStreamName")
        if self.daemon.control is not None:
            await self.daemon.control.refresh()
        names = sorted({*self.daemon.streams, *(self.daemon.control.creating if self.daemon.control else ())})
        policy = _caller.get()
        if policy is not None:  # only the streams the caller's key may see
            names = [n for n in names if policy.allows_stream(n)]
        if stype is not None:
            names = [n for n in names if self.daemon.stream_type(n) == stype]
        if isinstance(start, str):
            names = [n for n in names if n > start]
        page = names[:limit]
        return _response({"DeliveryStreamNames": page, "HasMoreDeliveryStreams": len(names) > limit})

    async def describe_delivery_stream(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        control = self.daemon.control
        if control is not None:
            await control.find(name)
        failed = control is not None and name in control.docs and name not in self.daemon.streams \
            and name in self.daemon.failed_streams
        if control is not None and (name in control.creating or failed):
            api = self.daemon.config.api
            cfg = control.creating.get(name)
            desc: dict[str, Any] = {
                "DeliveryStreamName": name, "DeliveryStreamARN": stream_arn(api.region, api.account_id, name),
                "DeliveryStreamStatus": "CREATING_FAILED" if failed else "CREATING",
                "DeliveryStreamType": cfg.stream_type if cfg is not None else "DirectPut", "VersionId": "1",
                "CreateTimestamp": round(time.time(), 3), "Destinations": [], "HasMoreDestinations": False}
            if failed:
                desc["FailureDescription"] = {"Type": "UNKNOWN_ERROR", "Details": self.daemon.failed_streams[name]}
            return _response({"DeliveryStreamDescription": desc})
        self._stream(name)
        desc = self.daemon.describe(name)
        if control is not None:
            desc["DeliveryStreamStatus"] = control.status(name)
        return _response({"DeliveryStreamDescription": desc})

    # ------------------------------------------------------------------ control plane (firehose/control.py)
    async def _control(self, call: Callable[[dict[str, Any]], Awaitable[Any]], doc: dict[str, Any]) -> Any:
        from firehose.control import ControlError

        try:
            return await call(doc)
        except ControlError as exc:
            raise ApiError(exc.code, exc.message) from None

    async def create_delivery_stream(self, doc: dict[str, Any]) -> web.Response:
        assert self.daemon.control is not None
        control = self.daemon.control
        limited = _caller.get() is not None
        name = await self._control(lambda d: control.create(d, limited=limited), doc)
        api = self.daemon.config.api
        return _response({"DeliveryStreamARN": stream_arn(api.region, api.account_id, name)})

    async def delete_delivery_stream(self, doc: dict[str, Any]) -> web.Response:
        assert self.daemon.control is not None
        await self._control(self.daemon.control.delete, doc)
        return _response({})

    async def start_encryption(self, doc: dict[str, Any]) -> web.Response:
        control = self.daemon.control
        assert control is not None
        await self._control(lambda d: control.encryption(d, True), doc)
        return _response({})

    async def stop_encryption(self, doc: dict[str, Any]) -> web.Response:
        control = self.daemon.control
        assert control is not None
        await self._control(lambda d: control.encryption(d, False), doc)
        return _response({})

    async def update_destination(self, doc: dict[str, Any]) -> web.Response:
        assert self.daemon.control is not None
        await self._control(self.daemon.control.update_destination, doc)
        return _response({})

    async def list_tags(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        self._stream(name)
        tags = self.daemon.state.tags(name)
        start = doc.get("ExclusiveStartTagKey")
        limit = _int_member(doc, "Limit", "limit", 1, 50, default=50)
        items = sorted(tags.items())
        if start is not None:
            _tag_text(start, "exclusiveStartTagKey", 1, 128, key=True)
            items = [kv for kv in items if kv[0] > start]
        page = items[:limit]
        return _response(
            {"Tags": [{"Key": k, "Value": v} for k, v in page], "HasMoreTags": len(items) > len(page)}
        )

    async def tag_stream(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        self._stream(name)
        tags = doc.get("Tags")
        if not isinstance(tags, list) or not tags:
            raise _validation("tags", None, "Member must have length greater than or equal to 1")
        if len(tags) > 50:
            raise _validation("tags", None, "Member must have length less than or equal to 50")
        new: dict[str, str] = {}
        for i, tag in enumerate(tags):
            if not isinstance(tag, dict) or tag.get("Key") is None:
                raise _validation(f"tags.{i + 1}.member.key", None, "Member must not be null")
            key = _tag_text(tag["Key"], f"tags.{i + 1}.member.key", 1, 128, key=True)
            value = _tag_text(tag.get("Value", ""), f"tags.{i + 1}.member.value", 0, 256, key=False)
            new[key] = value
        def merge(current: dict[str, str]) -> dict[str, str]:
            if len(set(current) | set(new)) > 50:
                raise ApiError("LimitExceededException", "A delivery stream can have at most 50 tags")
            return {**current, **new}

        await asyncio.to_thread(self.daemon.state.update_tags, name, merge)
        return _response({})

    async def untag_stream(self, doc: dict[str, Any]) -> web.Response:
        name = _stream_name(doc)
        self._stream(name)
        keys = doc.get("TagKeys")
        if not isinstance(keys, list) or not keys:
            raise _validation("tagKeys", None, "Member must have length greater than or equal to 1")
        if len(keys) > 50:
            raise _validation("tagKeys", None, "Member must have length less than or equal to 50")
        for i, key in enumerate(keys):
            _tag_text(key, f"tagKeys.{i + 1}.member", 1, 128, key=True)
        await asyncio.to_thread(self.daemon.state.update_tags, name,
                                lambda current: {k: v for k, v in current.items() if k not in keys})
        return _response({})


_TAG_PUNCTUATION = frozenset("_.:/=+-@%")


def _tag_text(value: Any, path: str, low: int, high: int, *, key: bool) -> str:
    """A tag key or value as botocore's model constrains it: length, and letters, separators,
    numbers and ``_.:/=+-@%`` only (keys never start with ``aws:``)."""
    if not isinstance(value, str):
        raise ApiError("SerializationException", f"Unexpected value type at '{path}': expected a string")
    if len(value) < low:
        raise _validation(path, value, f"Member must have length greater than or equal to {low}")
    if len(value) > high:
        raise _validation(path, value, f"Member must have length less than or equal to {high}")
    allowed = all(c in _TAG_PUNCTUATION or unicodedata.category(c)[0] in "LZN" for c in value)
    if not allowed or (key and value.startswith("aws:")):
        pattern = r"^(?!aws:)[\p{L}\p{Z}\p{N}_.:\/=+\-@%]*$" if key else r"^[\p{L}\p{Z}\p{N}_.:\/=+\-@%]*$"
        raise _validation(path, value, f"Member must satisfy regular expression pattern: {pattern}")
    return value


def _int_member(doc: dict[str, Any], name: str, path: str, low: int, high: int, *, default: int) -> int:
    value = doc.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError("SerializationException", f"Unexpected value type for '{name}': expected an integer")
    if value < low:
        raise _validation(path, value, f"Member must have value greater than or equal to {low}")
    if value > high:
        raise _validation(path, value, f"Member must have value less than or equal to {high}")
    return value


_KNOWN_UNSUPPORTED = {
    "CreateDeliveryStream",
    "DeleteDeliveryStream",
    "UpdateDestination",
    "StartDeliveryStreamEncryption",
    "StopDeliveryStreamEncryption",
}
