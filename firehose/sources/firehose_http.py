"""Firehose HTTP deliveries as a source: the receiving side of the HTTP endpoint protocol
(reference §10), so Amazon Data Firehose itself, or another daemon's ``http_endpoint``
destination, can deliver into this stream.

A request is ``POST`` (any path) with ``X-Amz-Firehose-Protocol-Version: 1.0``, the
``X-Amz-Firehose-Request-Id`` header repeated as the body's ``requestId``, and the body
``{"requestId", "timestamp", "records": [{"data": <base64>}]}`` (gzip when ``Content-Encoding:
gzip``). ``X-Amz-Firehose-Access-Key`` must be one of ``access_keys`` (when any are configured).
The answer is Firehose's: ``{"requestId", "timestamp"}`` with 200, or with ``errorMessage`` and
400 (malformed), 401 (access key), 413 (too large) or 503 (the spool is full: the sender retries).

Guarantee: exactly once into the spool per request id. The request id is committed in the same
spool frame as its records (the source position ``firehose_http/<request id>``), and the answer
is sent only once that frame is fsynced. A sender's retry of a request already in the spool (its
answer was lost, or this daemon was killed after the fsync) is answered 200 without adding the
records again; a retry arriving while the first copy is still being written waits for it. The
``dedupe_window`` most recent request ids are remembered (older ones are forgotten in the spool
too, so positions do not grow).

Cluster mode (docs/cluster.md): the source runs once per daemon, behind the same load balancer as
the API, and a retry may reach any daemon, so request ids are deduplicated cluster-wide through
the shared facts as firehose/cluster_ids.py describes: claimed, stored with ``firehose_http/<id>``
among the positions of the same frame, then marked stored; a partition's next owner marks the
ids its log holds.
"""

from __future__ import annotations

import asyncio
import binascii
import time
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import orjson
import pybase64
from aiohttp import ClientPayloadError, web
from pydantic import Field, SecretStr, field_validator

from firehose.api_records import decode_delivery
from firehose.cluster_ids import ClusterIds
from firehose.httpserver import GuardedServer, HttpLimits
from firehose.interfaces import BuildContext, Source, SourceSink
from firehose.log import LogFullError
from firehose.models import StrictModel
from firehose.tls import TlsConfig, TlsContext

KEY_PREFIX = "firehose_http/"
MAX_RECORDS = 10_000



class FirehoseHttpSourceConfig(StrictModel):
    """The receiving side of Firehose's HTTP endpoint delivery: AWS Firehose, or another daemon's
    ``http_endpoint`` destination, delivers into this stream, exactly once per request id. The
    stream still takes Direct PUT."""

    stream_type: ClassVar[str] = "DirectPut"
    exclusive: ClassVar[bool] = False
    cluster_placement: ClassVar[str] = "node"  # one listener per daemon; ids deduplicated cluster-wide

    type: Literal["firehose_http"] = Field(description="`firehose_http`.")
    listen: str = Field(
        description="`HOST:PORT` the source listens on (its own address, not the API's); requests may use "
        "any path.",
    )
    access_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted X-Amz-Firehose-Access-Key values (write them as `${ENV}`); empty: any request "
        "is accepted (Firehose: the endpoint's AccessKey).",
    )
    dedupe_window: int = Field(
        default=10_000, ge=100, le=1_000_000,
        description="The most recent request ids remembered (in the spool) to answer a sender's retry "
        "without adding its records again.",
    )
    max_request_mib: int = Field(
        default=128, ge=1, le=1024,
        description="MiB of a request body as received (before gunzip) at most; larger ones are answered "
        "413.",
    )

    tls: TlsConfig | None = Field(
        default=None, description="Serve HTTPS with this certificate (reloaded on SIGHUP); unset: HTTP.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {v!r}")
        return v

    def build(self, ctx: BuildContext, sink: SourceSink) -> FirehoseHttpSource:
        return FirehoseHttpSource(self, ctx, sink)


def _parse(body: bytes) -> tuple[Any, Any, list[bytes]]:
    """A delivery request's requestId, timestamp and records: in one pass when the body is exactly
    that shape (firehose/api_records.py), else by orjson and pybase64, which raise what is wrong."""
    fast = decode_delivery(body)
    if fast is not None:
        return fast
    doc = orjson.loads(body)
    records = [pybase64.b64decode(r["data"], None, True) for r in doc["records"]]  # (altchars, validate)
    return doc["requestId"], doc["timestamp"], records


def _answer(rid: str, status: int, error: str | None = None) -> web.Response:
    doc: dict[str, Any] = {"requestId": rid, "timestamp": int(time.time() * 1000)}
    if error is not None:
        doc["errorMessage"] = error[:8192]
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


class FirehoseHttpSource(Source):
    """Serves one listen address for its stream; runs on the daemon's event loop."""

    def __init__(self, config: FirehoseHttpSourceConfig, ctx: BuildContext, sink: SourceSink) -> None:
        self.config = config
        self.sink = sink
        self.log = ctx.log.bind(source="firehose_http", listen=config.listen)
        self._keys = {k.get_secret_value() for k in config.access_keys}
        self._seen: OrderedDict[str, int] = OrderedDict()  # request id -> when it was spooled
        self._inflight: dict[str, asyncio.Future[web.Response]] = {}
        self._server: GuardedServer | None = None
        self._tls: TlsContext | None = None
        self.duplicates = 0
        self.stream_name = ctx.stream_name
        # Cluster mode: request ids are claimed in the shared facts (firehose/cluster_ids.py).
        self.ids = ClusterIds(ctx.cluster, ctx.stream_name, prefix=KEY_PREFIX, kind="http", log=self.log) \
            if ctx.cluster is not None else None

    async def start(self) -> None:
        known = sorted((v, k[len(KEY_PREFIX):]) for k, v in self.sink.positions.items() if k.startswith(KEY_PREFIX))
        self._seen = OrderedDict((rid, when) for when, rid in known)
        app = web.Application(client_max_size=self.config.max_request_mib << 20)
        app.router.add_post("/{tail:.*}", self._handle)
        host, _, port = self.config.listen.rpartition(":")
        # The same bounds as the API: connections, header/body/idle deadlines. aiohttp inflates
        # gzip bodies here, within client_max_size (a compression bomb is refused at that size).
        self._tls = TlsContext(self.config.tls) if self.config.tls is not None else None
        self._server = GuardedServer(app, host.strip("[]"), int(port), HttpLimits(), name=self.config.listen,
                                     auto_decompress=True, ssl_context=self._tls.context if self._tls else None)
        await self._server.start()
        self.log.info("firehose_http_source_started", remembered_requests=len(self._seen))

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.wait_for(self._server.close(), 10)
            self._server = None

    async def _handle(self, request: web.Request) -> web.Response:
        rid = request.headers.get("X-Amz-Firehose-Request-Id", "")
        if request.headers.get("X-Amz-Firehose-Protocol-Version") != "1.0":
            return _answer(rid, 400, "X-Amz-Firehose-Protocol-Version must be 1.0")
        if self._keys and request.headers.get("X-Amz-Firehose-Access-Key") not in self._keys:
            return _answer(rid, 401, "The access key is missing or not valid")
        try:
            async with asyncio.timeout(HttpLimits.body_timeout_secs):
                body = await request.read()  # aiohttp inflates Content-Encoding: gzip
        except web.HTTPRequestEntityTooLarge:
            return _answer(rid, 413, f"The request is over {self.config.max_request_mib} MiB")
        except TimeoutError:
            return _answer(rid, 408, "The request body was not received in time")
        except (ConnectionResetError, ClientPayloadError):
            self.log.info("http_client_disconnected", request_id=rid[:64])
            return _answer(rid, 400, "The connection closed before the body was read")
        try:
            body_rid, stamp, records = _parse(body)
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error, ValueError) as exc:
            return _answer(rid, 400, f"The body is not a Firehose HTTP delivery request: {type(exc).__name__}: {exc}")
        if not rid or body_rid != rid or not isinstance(stamp, int) or len(records) > MAX_RECORDS:
            return _answer(rid, 400, "requestId must match X-Amz-Firehose-Request-Id, with a timestamp and at most "
                                     f"{MAX_RECORDS} records")
        if self.ids is not None:
            return await self._claim_and_store(rid, records)
        if rid in self._seen:
            self.duplicates += 1
            return _answer(rid, 200)
        running = self._inflight.get(rid)
        if running is not None:  # a retry while the first copy is being written: its answer is ours
            return await asyncio.shield(running)
        future: asyncio.Future[web.Response] = asyncio.get_running_loop().create_future()
        self._inflight[rid] = future
        try:
            response = await self._spool(rid, records)
        except BaseException:
            future.set_result(_answer(rid, 503, "The request was not stored; send it again"))
            raise
        finally:
            self._inflight.pop(rid, None)
        if not future.done():
            future.set_result(response)
        return response

    async def _spool(self, rid: str, records: list[bytes]) -> web.Response:
        now = int(time.time() * 1000)
        positions: dict[str, Any] = {KEY_PREFIX + rid: now}
        while len(self._seen) >= self.config.dedupe_window:
            old, _ = self._seen.popitem(last=False)
            positions[KEY_PREFIX + old] = None
        try:
            await self.sink.put(records, positions=positions)
        except LogFullError as exc:
            return _answer(rid, 503, f"The stream cannot take records now: {exc}")
        self._seen[rid] = now
        return _answer(rid, 200)

    # ------------------------------------------------------------------ cluster mode
    async def _claim_and_store(self, rid: str, records: list[bytes]) -> web.Response:
        """Cluster mode: claim the id, store the records, mark the id stored (firehose/cluster_ids.py)."""
        assert self.ids is not None
        try:
            outcome = await self.ids.store(rid, lambda positions: self.sink.put(records, positions=positions))
        except LogFullError as exc:
            return _answer(rid, 503, f"The stream cannot take records now: {str(exc)[:300]}")
        except Exception as exc:  # noqa: BLE001 - NATS away, or nothing of it stored: the sender retries
            self.log.warning("firehose_http_claim_failed", request_id=rid[:64], error=str(exc)[:300])
            return _answer(rid, 503, f"The cluster cannot take the request now; send it again ({str(exc)[:300]})")
        if outcome == "busy":
            return _answer(rid, 503, "The request is being stored by an earlier attempt; send it again")
        if outcome == "duplicate":
            self.duplicates += 1
        return _answer(rid, 200)

    async def tend_partition(self, sink: SourceSink, *, opened: bool) -> None:
        """Cluster mode, for each partition this daemon owns (firehose/cluster_ids.py)."""
        if self.ids is not None:
            await self.ids.tend_partition(sink, opened=opened)
