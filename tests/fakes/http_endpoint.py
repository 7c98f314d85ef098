"""An HTTP endpoint that speaks Firehose's HTTP delivery protocol the way a real receiver must
(reference §10): it checks the protocol version, the access key, that the ``X-Amz-Firehose-
Request-Id`` header matches the body's ``requestId``, reads gzip bodies, decodes every record's
base64, and answers ``{"requestId", "timestamp"}`` (with ``errorMessage`` on failure).

Records are kept per request id, so a retry of a request overwrites its first copy (as a
receiver deduplicating by request id does); ``deliveries`` counts every accepted request, so a
test can also see the at-least-once side. ``faults`` scripts the next responses: an HTTP
status, ``"bad_id"`` (a 200 echoing another request id), ``"html"`` (a 200 that is not JSON).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import time
from typing import Any

import orjson
from aiohttp import web

from fakes.server import ThreadedServer


class HttpEndpointServer(ThreadedServer):
    def __init__(self, port: int | None = None, access_key: str | None = None) -> None:
        super().__init__(port)
        self.access_key = access_key
        self.requests: dict[str, list[bytes]] = {}  # request id -> its records, in order
        self.order: list[str] = []  # request ids as first accepted
        self.deliveries = 0
        self.attempts: list[str] = []  # every request id received, accepted or not
        self.headers: list[dict[str, str]] = []
        self.faults: list[int | str] = []
        self.wire_bytes = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._handle)

    def stats(self) -> dict[str, Any]:
        return {"records": sum(len(r) for r in self.requests.values()), "requests": self.deliveries,
                "bytes": sum(len(x) for r in self.requests.values() for x in r), "wire_bytes": self.wire_bytes}

    def records(self) -> list[bytes]:
        with self.lock:
            return [r for rid in self.order for r in self.requests[rid]]

    def _answer(self, rid: str, status: int, error: str | None = None) -> web.Response:
        doc: dict[str, Any] = {"requestId": rid, "timestamp": int(time.time() * 1000)}
        if error is not None:
            doc["errorMessage"] = error
        return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        header_id = request.headers.get("X-Amz-Firehose-Request-Id", "")
        with self.lock:
            # aiohttp inflates a gzip body before read(): the header tells what the wire carried.
            self.wire_bytes += int(request.headers.get("Content-Length", len(raw)))
            self.attempts.append(header_id)
            self.headers.append(dict(request.headers))
            fault = self.faults.pop(0) if self.faults else None
        if request.headers.get("X-Amz-Firehose-Protocol-Version") != "1.0":
            return self._answer(header_id, 400, "unsupported protocol version")
        if self.access_key is not None and request.headers.get("X-Amz-Firehose-Access-Key") != self.access_key:
            return self._answer(header_id, 401, "invalid access key")
        if request.headers.get("Content-Encoding") == "gzip" and raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)  # (aiohttp may already have inflated it)
        try:
            doc = orjson.loads(raw)
            rid = doc["requestId"]
            records = [base64.b64decode(r["data"], validate=True) for r in doc["records"]]
            assert isinstance(doc["timestamp"], int) and 1 <= len(records) <= 10_000
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error, AssertionError) as exc:
            return self._answer(header_id, 400, f"malformed body: {exc}")
        if rid != header_id:
            return self._answer(header_id, 400, "requestId does not match X-Amz-Firehose-Request-Id")
        if isinstance(fault, int):
            return self._answer(rid, fault, "scripted failure")
        if fault == "bad_id":
            return self._answer("not-" + rid, 200)
        if fault == "html":
            return web.Response(status=200, text="<html>ok</html>", content_type="text/html")
        with self.lock:
            if rid not in self.requests:
                self.order.append(rid)
            self.requests[rid] = records
            self.deliveries += 1
        return self._answer(rid, 200)
