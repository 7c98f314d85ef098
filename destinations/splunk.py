"""Splunk destination: the HTTP Event Collector with indexer acknowledgement (reference §9).

A batch is one HEC request: the records concatenated as they are (Firehose adds no delimiter) to
``/services/collector/event`` (``hec_endpoint_type: event``: records must be HEC event JSON) or
``/services/collector/raw`` (``raw``), with ``Authorization: Splunk <token>`` and the
destination's channel in ``X-Splunk-Request-Channel``. A 200 answer carries an ``ackId``; the
batch counts as delivered only once ``POST /services/collector/ack?channel=...`` reports that id
``true``, never merely on the 200. Polling starts after 50 ms and backs off to
``ack_poll_interval_ms``; an id not acknowledged within ``hec_ack_timeout_secs`` (180..600) is
``Splunk.AckTimeout`` and the batch is sent again.

Errors get Firehose's codes (``Splunk.InvalidToken``, ``.DisabledToken``, ``.DisabledAck``,
``.InvalidDataFormat``, ``.InvalidIndex``, ``.ServerError``, ``.AckTimeout``,
``.ConnectionTimeout``, ``.ConnectionClosed``, ``.InvalidEndpoint``, ``.SSLHandshake``,
``.ProxyWithoutStickySessions``) and, as Firehose does, are all retried until
``retry_duration_secs`` (after the first failed attempt) runs out; an outstanding acknowledgement
is still waited for. Then the records are archived as ``splunk-failed`` with an ``EventId``
(``<batch key>.<position>``).

Guarantee: at-least-once. An acknowledgement that times out does not mean the events were not
indexed, so a resend can duplicate them (as Firehose documents).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import datetime
from typing import Any, ClassVar, Literal

import aiohttp
import orjson
from pydantic import Field, SecretStr, field_validator

from firehose.destinations.remote import RemoteConfig, client_session, connection_error, is_http_url
from firehose.interfaces import (
    Batch,
    BufferingLimits,
    BuildContext,
    DeliveryResult,
    Destination,
    RecordFailure,
)
from firehose.redact import url_without_credentials

# Firehose's Splunk ranges (reference §3): 1-5 MiB (5), 0-60 s (60).
SPLUNK_BUFFERING = BufferingLimits(1, 5, 5, 0, 60, 60)
ERROR_OUTPUT_TYPE = "splunk-failed"
_PATHS = {"event": "/services/collector/event", "raw": "/services/collector/raw"}

# HEC's numeric response codes (Splunk's "Troubleshoot HTTP Event Collector") -> Firehose's codes.
_HEC_CODES = {
    1: "Splunk.DisabledToken", 2: "Splunk.InvalidToken", 3: "Splunk.InvalidToken", 4: "Splunk.InvalidToken",
    5: "Splunk.InvalidDataFormat", 6: "Splunk.InvalidDataFormat", 7: "Splunk.InvalidIndex",
    8: "Splunk.ServerError", 9: "Splunk.ServerError", 10: "Splunk.InvalidDataFormat",
    11: "Splunk.InvalidDataFormat", 12: "Splunk.InvalidDataFormat", 13: "Splunk.InvalidDataFormat",
    14: "Splunk.DisabledAck",
}


class SplunkDestinationConfig(RemoteConfig):
    """Splunk's HTTP Event Collector, with indexer acknowledgement (Firehose:
    SplunkDestinationConfiguration); needs the stream's ``backup:``."""

    BACKUP_MODE_NAMES: ClassVar[tuple[str, str]] = ("FailedEventsOnly", "AllEvents")

    type: Literal["splunk"] = Field(description="`splunk`.")
    hec_endpoint: str = Field(
        description="The HEC base URL, `http(s)://host:port` (Firehose: HECEndpoint).",
    )
    hec_endpoint_type: str = Field(
        default="raw",
        description="`raw` (records as they are, to /services/collector/raw) or `event` (records are HEC "
        "event JSON, to /services/collector/event), in any case (Firehose: HECEndpointType).",
    )
    hec_token: SecretStr = Field(
        description="The HEC token, with indexer acknowledgement enabled; write it as `${ENV}` (Firehose: "
        "HECToken).",
    )
    hec_ack_timeout_secs: int = Field(
        default=180, ge=180, le=600,
        description="Seconds to wait for a batch's acknowledgement; then it is `Splunk.AckTimeout` and the "
        "batch is sent again (Firehose: HECAcknowledgmentTimeoutInSeconds).",
    )
    ack_poll_interval_ms: int = Field(
        default=1000, ge=10, le=60_000,
        description="Milliseconds between acknowledgement polls at most (polling starts at 50 ms and backs "
        "off to this).",
    )
    request_timeout_secs: int = Field(
        default=60, ge=1, le=600,
        description="Seconds to wait for an HEC request's answer; then the request failed and is retried.",
    )
    channel: str | None = Field(
        default=None,
        description="The X-Splunk-Request-Channel GUID; unset: a new one each start.",
    )

    @field_validator("hec_endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not is_http_url(v, 2048):
            raise ValueError(f"must be the HEC base URL, http(s)://host:port, got {v!r}")
        return v.rstrip("/")

    @field_validator("hec_endpoint_type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v.lower() not in _PATHS:
            raise ValueError(f"must be event or raw (or Firehose's Event, Raw), got {v!r}")
        return v.lower()

    @field_validator("hec_token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value() or len(v.get_secret_value()) > 2048:
            raise ValueError("must be a HEC token")
        return v

    @field_validator("channel")
    @classmethod
    def _channel(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                uuid.UUID(v)
            except ValueError:
                raise ValueError(f"must be a GUID (HEC's channel), got {v!r}") from None
        return v

    def buffering_limits(self) -> BufferingLimits:
        return SPLUNK_BUFFERING

    def describe(self, buffering: Any, account_id: str, backup: Any = None) -> dict[str, Any]:
        """Firehose's SplunkDestinationDescription (the token is not shown)."""
        return {
            "SplunkDestinationDescription": {
                "HECEndpoint": url_without_credentials(self.hec_endpoint),
                "HECEndpointType": self.hec_endpoint_type.capitalize(),
                "HECAcknowledgmentTimeoutInSeconds": self.hec_ack_timeout_secs,
                "RetryOptions": {"DurationInSeconds": self.retry_duration_secs},
                "ProcessingConfiguration": {"Enabled": False, "Processors": []},
                "CloudWatchLoggingOptions": {"Enabled": False},
                "BufferingHints": {"SizeInMBs": buffering.size_mib, "IntervalInSeconds": buffering.interval_secs},
                **self.backup_description(backup, buffering, account_id),
            }
        }

    def build(self, ctx: BuildContext) -> SplunkDestination:
        return SplunkDestination(self, ctx)


class _Failed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SplunkDestination(Destination):
    error_output_type = ERROR_OUTPUT_TYPE
    metrics_prefix = "DeliveryToSplunk"

    def __init__(self, config: SplunkDestinationConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self.retry_duration_secs = config.retry_duration_secs
        self.channel = config.channel or str(uuid.uuid4())
        self._session: aiohttp.ClientSession | None = None
        self._headers = {
            "Authorization": f"Splunk {config.hec_token.get_secret_value()}",
            "X-Splunk-Request-Channel": self.channel,
        }
        self._url = config.hec_endpoint + _PATHS[config.hec_endpoint_type]
        self._ack_url = f"{config.hec_endpoint}/services/collector/ack?channel={self.channel}"
        self.ack_latency_secs = 0.0  # the last batch's (DeliveryToSplunk.DataAckLatency)

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return f"{rng.randrange(10**56):056d}"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(self.config, self.config.request_timeout_secs)
        return self._session

    async def deliver(self, batch: Batch) -> DeliveryResult:
        positions = batch.indices if batch.indices is not None else range(len(batch.records))
        try:
            ack_id = await self._post(b"".join(batch.records))
            await self._wait_for_ack(ack_id)
            return DeliveryResult.delivered()
        except _Failed as failure:
            return DeliveryResult({
                i: RecordFailure(True, failure.code, failure.message, {"EventId": f"{batch.key}.{pos}"})
                for i, pos in enumerate(positions)
            })

    async def _call(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
        try:
            async with self._client().post(url, data=body, headers=headers or self._headers,
                                           allow_redirects=False) as resp:
                raw = await resp.content.read(1 << 20)
                status = resp.status
        except Exception as exc:
            kind, message = connection_error(exc)
            code = {"timeout": "Splunk.ConnectionTimeout", "reset": "Splunk.ConnectionClosed",
                    "ssl": "Splunk.SSLHandshake"}.get(kind, "Splunk.InvalidEndpoint")
            raise _Failed(code, message) from None
        text = raw[:1000].decode("utf-8", "replace")
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            doc = None
        return status, doc, text

    @staticmethod
    def _error(status: int, doc: Any, text: str) -> _Failed:
        hec = doc.get("code") if isinstance(doc, dict) else None
        if isinstance(hec, int) and hec in _HEC_CODES:
            code = _HEC_CODES[hec]
        elif status == 404:
            code = "Splunk.InvalidEndpoint"
        elif status in (401, 403):
            code = "Splunk.InvalidToken"
        else:
            code = "Splunk.ServerError"
        return _Failed(code, f"HEC answered {status}: {text}")

    async def _post(self, body: bytes) -> int:
        status, doc, text = await self._call(self._url, body)
        if status != 200 or not isinstance(doc, dict) or doc.get("code", 0) != 0:
            raise self._error(status, doc, text)
        ack_id = doc.get("ackId")
        if not isinstance(ack_id, int):
            # HEC answers without an ackId when the token does not have indexer acknowledgement on.
            raise _Failed("Splunk.DisabledAck", f"HEC accepted the data without an ackId: {text}")
        return ack_id

    async def _wait_for_ack(self, ack_id: int) -> None:
        started = time.monotonic()
        deadline = started + self.config.hec_ack_timeout_secs
        delay = 0.05
        body = orjson.dumps({"acks": [ack_id]})
        while True:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, self.config.ack_poll_interval_ms / 1000.0)
            status, doc, text = await self._call(self._ack_url, body)
            if status != 200 or not isinstance(doc, dict):
                failure = self._error(status, doc, text)
                if failure.code == "Splunk.InvalidDataFormat":  # unknown channel: another indexer answered
                    failure = _Failed("Splunk.ProxyWithoutStickySessions", failure.message)
                raise failure
            acks = doc.get("acks")
            if isinstance(acks, dict) and acks.get(str(ack_id)) is True:
                self.ack_latency_secs = time.monotonic() - started
                return
            if time.monotonic() >= deadline:
                raise _Failed(
                    "Splunk.AckTimeout",
                    "Did not receive an acknowledgement from HEC before the HEC acknowledgement timeout expired. "
                    "Despite the acknowledgement timeout, it's possible the data was indexed successfully in "
                    f"Splunk (ackId {ack_id}, channel {self.channel}).",
                )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
