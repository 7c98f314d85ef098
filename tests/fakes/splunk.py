"""Splunk's HTTP Event Collector with indexer acknowledgement, as the wire shows it:

* ``POST /services/collector/event`` (also ``/services/collector``): concatenated HEC event JSON
  objects, each with a non-blank ``event`` (HEC codes 5, 6, 12, 13 otherwise);
  ``POST /services/collector/raw``: the body split into events at newlines.
* ``Authorization: Splunk <token>`` (codes 2, 3, 4; a disabled token 1), a channel GUID from
  ``X-Splunk-Request-Channel`` or ``?channel=`` (codes 10, 11), ``{"text": "Success", "code": 0,
  "ackId": n}`` with ack ids counted per channel.
* ``POST /services/collector/ack?channel=``: ``{"acks": [ids]}`` -> ``{"acks": {"id": bool}}``.
  An id turns true ``ack_delay`` seconds after its request (its events are indexed then), or never
  for the requests chosen by ``unacked``/``never_ack`` (their events are indexed anyway: the
  acknowledgement was what got lost). An id reported true is forgotten, as HEC does.
* ``busy`` requests answer 503 ``{"text": "Server is busy", "code": 9}``; ``ack_enabled=False``
  answers the ack endpoint with code 14 and requests without an ``ackId``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from fakes.server import ThreadedServer


def _reply(status: int, text: str, code: int, **extra: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"text": text, "code": code, **extra}),
                        content_type="application/json")


def split_events(body: bytes) -> list[bytes] | tuple[int, str, int]:
    """Concatenated JSON event objects, or (code, text, invalid event number)."""
    events: list[bytes] = []
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, end = decoder.raw_decode(text, pos)
        except ValueError:
            return 6, "Invalid data format", len(events)
        if not isinstance(doc, dict) or "event" not in doc:
            return 12, "Event field is required", len(events)
        if doc["event"] in ("", None, {}):
            return 13, "Event field cannot be blank", len(events)
        events.append(text[pos:end].encode())
        pos = end
    if not events:
        return 5, "No data", 0
    return events


class SplunkHecServer(ThreadedServer):
    def __init__(self, port: int | None = None, token: str = "00000000-0000-0000-0000-000000000001",
                 ack_delay: float = 0.05) -> None:
        super().__init__(port)
        self.token = token
        self.token_disabled = False
        self.ack_enabled = True
        self.ack_delay = ack_delay
        self.busy = 0  # the next N data requests answer 503
        self.never_ack = False  # every request from now on is indexed but never acknowledged
        self.unacked = 0  # the next N requests are indexed but never acknowledged
        self.indexed: list[bytes] = []  # events, in the order they were indexed
        self.requests = 0
        self.ack_polls = 0
        self.channels: set[str] = set()
        self._next_ack: dict[str, int] = {}
        self._pending: dict[tuple[str, int], tuple[float, list[bytes] | None]] = {}  # None: indexed, never acked
        self._acked: set[tuple[str, int]] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/services/collector", self._event)
        app.router.add_post("/services/collector/event", self._event)
        app.router.add_post("/services/collector/event/1.0", self._event)
        app.router.add_post("/services/collector/raw", self._raw)
        app.router.add_post("/services/collector/raw/1.0", self._raw)
        app.router.add_post("/services/collector/ack", self._ack)

    def stats(self) -> dict[str, Any]:
        self._settle()
        return {"records": len(self.indexed), "bytes": sum(map(len, self.indexed)), "requests": self.requests,
                "ack_polls": self.ack_polls}

    def events(self) -> list[bytes]:
        with self.lock:
            self._settle()
            return list(self.indexed)

    def _settle(self) -> None:
        now = time.monotonic()
        for key, (due, events) in list(self._pending.items()):
            if events is not None and due <= now:
                self.indexed.extend(events)
                self._acked.add(key)
                del self._pending[key]

    def _check(self, request: web.Request) -> web.Response | str:
        auth = request.headers.get("Authorization", "")
        if not auth:
            return _reply(401, "Token is required", 2)
        scheme, _, token = auth.partition(" ")
        if scheme != "Splunk" or not token:
            return _reply(401, "Invalid authorization", 3)
        if token != self.token:
            return _reply(403, "Invalid token", 4)
        if self.token_disabled:
            return _reply(403, "Token disabled", 1)
        channel = request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel", "")
        if not channel:
            return _reply(400, "Data channel is missing", 10)
        try:
            uuid.UUID(channel)
        except ValueError:
            return _reply(400, "Invalid data channel", 11)
        return channel

    async def _event(self, request: web.Request) -> web.Response:
        return await self._data(request, raw=False)

    async def _raw(self, request: web.Request) -> web.Response:
        return await self._data(request, raw=True)

    async def _data(self, request: web.Request, raw: bool) -> web.Response:
        body = await request.read()
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        channel = checked
        with self.lock:
            self.requests += 1
            if self.busy > 0:
                self.busy -= 1
                return _reply(503, "Server is busy", 9)
        if raw:
            events = [line for line in body.split(b"\n") if line.strip()]
            if not events:
                return _reply(400, "No data", 5)
        else:
            parsed = split_events(body)
            if isinstance(parsed, tuple):
                code, text, number = parsed
                return _reply(400, text, code, **({"invalid-event-number": number} if code != 5 else {}))
            events = parsed
        with self.lock:
            self.channels.add(channel)
            if not self.ack_enabled:
                self.indexed.extend(events)
                return _reply(200, "Success", 0)
            ack_id = self._next_ack.get(channel, 0)
            self._next_ack[channel] = ack_id + 1
            lost = self.never_ack or self.unacked > 0
            if self.unacked > 0:
                self.unacked -= 1
            if lost:
                self.indexed.extend(events)
                self._pending[(channel, ack_id)] = (float("inf"), None)
            else:
                self._pending[(channel, ack_id)] = (time.monotonic() + self.ack_delay, events)
        return _reply(200, "Success", 0, ackId=ack_id)

    async def _ack(self, request: web.Request) -> web.Response:
        body = await request.read()
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        if not self.ack_enabled:
            return _reply(400, "ACK is disabled", 14)
        try:
            ids = orjson.loads(body)["acks"]
            assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        except (orjson.JSONDecodeError, KeyError, TypeError, AssertionError):
            return _reply(400, "Invalid data format", 6)
        with self.lock:
            self.ack_polls += 1
            self._settle()
            result = {}
            for i in ids:
                key = (checked, i)
                result[str(i)] = key in self._acked
                self._acked.discard(key)  # reported once, then forgotten
        return web.Response(body=orjson.dumps({"acks": result}), content_type="application/json")
