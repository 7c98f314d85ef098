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
the API, and a retry may reach any daemon, so request ids are deduplicated cluster-wide in the
shared facts (the ``FH_SOURCES`` key-value bucket, keyed by a digest of the stream and the id):

1. the request's id is *claimed* (created only if absent, with a short TTL);
2. its records go into a partition this daemon owns, with ``firehose_http/<id>`` among the
   positions of the same frame, as on one node;
3. the claim becomes *stored* (kept for ``CLUSTER_REMEMBER_SECS``).

A retry that finds the id stored is answered 200 without its records; one that finds it claimed
(the first attempt still running) gets 503 and comes again. If the daemon dies between 2 and 3,
the partition's next owner finds the id in the log's positions when it opens it and marks it
stored; that happens within the lease TTL, well before the claim's TTL lets a retry in. The
positions are forgotten again after ``CLUSTER_POSITION_SECS``.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import time
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import orjson
import pybase64
from aiohttp import ClientPayloadError, web
from pydantic import Field, SecretStr, field_validator

from firehose.httpserver import GuardedServer, HttpLimits
from firehose.interfaces import BuildContext, Source, SourceSink
from firehose.log import LogFullError
from firehose.models import StrictModel
from firehose.tls import TlsConfig, TlsContext

KEY_PREFIX = "firehose_http/"
MAX_RECORDS = 10_000
# Cluster mode: how long a stored request id is remembered (Firehose retries an HTTP endpoint for
# at most 7,200 seconds), and how long it stays among a partition log's positions.
CLUSTER_REMEMBER_SECS = 24 * 3600
CLUSTER_POSITION_SECS = 600
STORED, CLAIMED = b"stored", b"claimed"


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


def request_fact(stream: str, rid: str) -> str:
    """Cluster mode: the shared fact's key of a request id (a digest: the id is the sender's)."""
    return "http." + hashlib.sha256(f"{stream}\0{rid}".encode()).hexdigest()[:40]


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
        self.cluster = ctx.cluster  # cluster mode: request ids are claimed in the shared facts
        self._unmarked: dict[str, int] = {}  # stored, but the claim not yet turned "stored" (NATS away)

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
            doc = orjson.loads(body)
            records = [pybase64.b64decode(r["data"], validate=True) for r in doc["records"]]
            body_rid = doc["requestId"]
            stamp = doc["timestamp"]
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error, ValueError) as exc:
            return _answer(rid, 400, f"The body is not a Firehose HTTP delivery request: {type(exc).__name__}: {exc}")
        if not rid or body_rid != rid or not isinstance(stamp, int) or len(records) > MAX_RECORDS:
            return _answer(rid, 400, "requestId must match X-Amz-Firehose-Request-Id, with a timestamp and at most "
                                     f"{MAX_RECORDS} records")
        if self.cluster is not None:
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
    def _fact(self, rid: str) -> str:
        return request_fact(self.stream_name, rid)

    def _claim_ttl(self) -> float:
        """Seconds a claim lives: well past a takeover (the lease TTL) and a publish timeout."""
        assert self.cluster is not None
        return max(60.0, 6 * self.cluster.lease_ttl_secs)

    async def _claim_and_store(self, rid: str, records: list[bytes]) -> web.Response:
        """Cluster mode: claim the id, store the records, mark the id stored (module docstring)."""
        assert self.cluster is not None
        facts = self.cluster.facts
        claim_ttl = self._claim_ttl()
        try:
            revision = await facts.create(self._fact(rid), CLAIMED, ttl_secs=claim_ttl)
            if revision is None:
                found = await facts.get(self._fact(rid))
                if found is not None and found[0] == STORED:
                    self.duplicates += 1
                    return _answer(rid, 200)
                return _answer(rid, 503, "The request is being stored by an earlier attempt; send it again")
        except Exception as exc:  # noqa: BLE001 - NATS away: the sender retries
            self.log.warning("firehose_http_claim_failed", request_id=rid[:64], error=str(exc)[:300])
            return _answer(rid, 503, "The cluster cannot take the request now; send it again")
        try:
            await self.sink.put(records, positions={KEY_PREFIX + rid: int(time.time() * 1000)})
        except Exception as exc:  # noqa: BLE001 - nothing of it stored: let a retry claim it again
            await self._release(rid, revision)
            return _answer(rid, 503, f"The stream cannot take records now: {str(exc)[:300]}")
        await self._mark_stored(rid, revision)
        return _answer(rid, 200)

    async def _release(self, rid: str, revision: int) -> None:
        assert self.cluster is not None
        try:
            await self.cluster.facts.update(self._fact(rid), b"", revision, ttl_secs=1)
        except Exception:  # noqa: BLE001 - the claim's own TTL frees it
            pass

    async def _mark_stored(self, rid: str, revision: int | None) -> None:
        assert self.cluster is not None
        facts = self.cluster.facts
        try:
            if revision is not None and await facts.update(self._fact(rid), STORED, revision,
                                                           ttl_secs=CLUSTER_REMEMBER_SECS) is not None:
                self._unmarked.pop(rid, None)
                return
            found = await facts.get(self._fact(rid))
            if found is None or found[0] != STORED:
                new = await facts.create(self._fact(rid), STORED, ttl_secs=CLUSTER_REMEMBER_SECS) if found is None \
                    else await facts.update(self._fact(rid), STORED, found[1], ttl_secs=CLUSTER_REMEMBER_SECS)
                if new is None:
                    raise RuntimeError("the claim moved while it was being marked")
            self._unmarked.pop(rid, None)
        except Exception as exc:  # noqa: BLE001 - tried again at the next lease round
            self._unmarked[rid] = revision or 0
            self.log.warning("firehose_http_mark_failed", request_id=rid[:64], error=str(exc)[:300])

    async def tend_partition(self, sink: SourceSink, *, opened: bool) -> None:
        """Cluster mode, for each partition this daemon owns: when it is taken, mark stored every
        request id its log holds (an earlier owner may have died before marking them); at every
        round, retry the marks that failed and forget positions older than
        ``CLUSTER_POSITION_SECS``."""
        for rid, revision in list(self._unmarked.items()):
            await self._mark_stored(rid, revision or None)
        ids = {k[len(KEY_PREFIX):]: v for k, v in sink.positions.items() if k.startswith(KEY_PREFIX) and v is not None}
        now = int(time.time() * 1000)
        if opened:
            # Only ids recent enough for their claim to matter (an older claim has expired), a
            # few at a time.
            assert self.cluster is not None
            recent = now - int(2000 * self._claim_ttl())
            todo = [rid for rid, when in ids.items() if isinstance(when, int) and when >= recent]
            for i in range(0, len(todo), 64):
                await asyncio.gather(*(self._mark_stored(rid, None) for rid in todo[i:i + 64]))
        cutoff = now - CLUSTER_POSITION_SECS * 1000
        old = {KEY_PREFIX + rid: None for rid, when in ids.items() if not isinstance(when, int) or when < cutoff}
        if old:
            await sink.put([], positions=old)
