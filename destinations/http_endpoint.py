"""HTTP endpoint destination: Firehose's HTTP delivery request and response format (reference §10).

Each request is ``POST <url>`` (verbatim; any scheme and port, unlike Firehose's https-on-443)
with the body ``{"requestId", "timestamp", "records": [{"data": <base64>}]}`` and the headers
``X-Amz-Firehose-Protocol-Version: 1.0``, ``X-Amz-Firehose-Request-Id``,
``X-Amz-Firehose-Source-Arn``, ``X-Amz-Firehose-Access-Key`` and
``X-Amz-Firehose-Common-Attributes`` (when configured), ``Content-Encoding: gzip`` (when
``content_encoding: gzip``). A batch of more than 10,000 records (Firehose's per-request limit)
goes as several requests.

Request ids: a batch's id is its sealed key (a GUID decided at seal time and recorded in the
spool), and a batch's n-th request of 10,000 records uses a GUID derived from it. A retry, and a
replay after a crash, therefore sends the same request id with the same records, so an endpoint
that deduplicates by request id (the ``firehose_http`` source does) sees every record once.

Responses: only a 200 whose JSON body echoes the request id and carries a timestamp is success
(Firehose treats any other response as a 500 with no body); redirects are not followed; a body
over 1 MiB is ``HttpEndpoint.ResponseTooLarge``. Every failure is retried by the delivery runner
until ``retry_duration_secs`` (after the first failed attempt) runs out; then the records are
archived as ``http-endpoint-failed``. A 413 is permanent: Firehose drops such a batch without
backing it up; here it is archived at once, since nothing acknowledged is lost silently.

Guarantee: at-least-once; exactly-once into an endpoint that deduplicates by request id.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import time
import uuid
from datetime import datetime
from typing import Any, ClassVar, Literal

import aiohttp
import orjson
import pybase64
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
from firehose.names import stream_arn

# Firehose's HTTP endpoint ranges (reference §3): 1-64 MiB (5), 0-900 s. The interval default is
# UNCERTAIN (docs table 60 s, API model 300 s); both are accepted by the SDKs: we take the model's.
HTTP_BUFFERING = BufferingLimits(1, 64, 5, 0, 900, 300)
MAX_RECORDS_PER_REQUEST = 10_000
MAX_RESPONSE_BYTES = 1 << 20
ERROR_OUTPUT_TYPE = "http-endpoint-failed"


class HttpEndpointDestinationConfig(RemoteConfig):
    """An HTTP endpoint that takes Firehose's HTTP delivery requests (Firehose:
    HttpEndpointDestinationConfiguration); needs the stream's ``backup:``."""

    BACKUP_MODE_NAMES: ClassVar[tuple[str, str]] = ("FailedDataOnly", "AllData")

    type: Literal["http_endpoint"] = Field(description="`http_endpoint`.")
    url: str = Field(
        description="The URL each batch is POSTed to: http:// or https://, any port, at most 1000 characters "
        "(Firehose: EndpointConfiguration.Url).",
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="A display name for the endpoint (Firehose: EndpointConfiguration.Name).",
    )
    access_key: SecretStr | None = Field(
        default=None,
        description="Sent in the X-Amz-Firehose-Access-Key header, at most 4096 characters; write it as "
        "`${ENV}` (Firehose: EndpointConfiguration.AccessKey).",
    )
    common_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Name -> value pairs sent in the X-Amz-Firehose-Common-Attributes header: at most 50, "
        "names 1-256 characters, values at most 1024 (Firehose: RequestConfiguration.CommonAttributes).",
    )
    content_encoding: str = Field(
        default="none",
        description="`none` or `gzip` (Firehose's NONE, GZIP): whether request bodies are gzipped (Firehose: "
        "RequestConfiguration.ContentEncoding).",
    )
    request_timeout_secs: int = Field(
        default=180, ge=1, le=900,
        description="Seconds to wait for the endpoint's answer; then the request failed and is retried "
        "(Firehose waits 3 minutes).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not is_http_url(v, 1000):
            raise ValueError(f"must be an http:// or https:// URL of at most 1000 characters, got {v!r}")
        return v

    @field_validator("access_key")
    @classmethod
    def _access_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) > 4096:
            raise ValueError("must be at most 4096 characters (Firehose's AccessKey)")
        return v

    @field_validator("common_attributes")
    @classmethod
    def _attributes(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 50:
            raise ValueError(f"at most 50 attributes (Firehose's CommonAttributes), got {len(v)}")
        for name, value in v.items():
            if not 1 <= len(name) <= 256 or len(value) > 1024:
                raise ValueError(f"attribute {name!r}: names are 1-256 characters, values at most 1024")
        return v

    @field_validator("content_encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        low = v.lower()
        if low not in ("none", "gzip"):
            raise ValueError(f"must be none or gzip (or Firehose's NONE, GZIP), got {v!r}")
        return low

    def buffering_limits(self) -> BufferingLimits:
        return HTTP_BUFFERING

    def describe(self, buffering: Any, account_id: str, backup: Any = None) -> dict[str, Any]:
        """Firehose's HttpEndpointDestinationDescription (the URL and key are not shown: sensitive)."""
        endpoint: dict[str, Any] = {}
        if self.name:
            endpoint["Name"] = self.name
        request: dict[str, Any] = {"ContentEncoding": self.content_encoding.upper()}
        if self.common_attributes:
            request["CommonAttributes"] = [
                {"AttributeName": k, "AttributeValue": v} for k, v in self.common_attributes.items()
            ]
        return {
            "HttpEndpointDestinationDescription": {
                "EndpointConfiguration": endpoint,
                "BufferingHints": {"SizeInMBs": buffering.size_mib, "IntervalInSeconds": buffering.interval_secs},
                "CloudWatchLoggingOptions": {"Enabled": False},
                "RequestConfiguration": request,
                "ProcessingConfiguration": {"Enabled": False, "Processors": []},
                "RoleARN": f"arn:aws:iam::{account_id}:role/firehose",
                "RetryOptions": {"DurationInSeconds": self.retry_duration_secs},
                **self.backup_description(backup, buffering, account_id),
            }
        }

    def build(self, ctx: BuildContext) -> HttpEndpointDestination:
        return HttpEndpointDestination(self, ctx)


def request_id(batch_key: str, chunk: int) -> str:
    """The request id of a batch's ``chunk``-th request: the batch key itself, then GUIDs derived
    from it (stable, so a retry or replay repeats it)."""
    if chunk == 0:
        return batch_key
    return str(uuid.uuid5(uuid.UUID(batch_key), str(chunk)))


def request_body(rid: str, timestamp_ms: int, records: list[bytes]) -> bytes:
    """The JSON body, built from bytes (base64 never needs escaping): no per-record dicts."""
    parts = [b'{"requestId":"', rid.encode(), b'","timestamp":', str(timestamp_ms).encode(), b',"records":[']
    if records:
        parts.append(b'{"data":"' + b'"},{"data":"'.join(pybase64.b64encode(r) for r in records) + b'"}')
    parts.append(b"]}")
    return b"".join(parts)


class HttpEndpointDestination(Destination):
    error_output_type = ERROR_OUTPUT_TYPE
    metrics_prefix = "DeliveryToHttpEndpoint"

    def __init__(self, config: HttpEndpointDestinationConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self.retry_duration_secs = config.retry_duration_secs
        self._session: aiohttp.ClientSession | None = None
        headers = {
            "Content-Type": "application/json",
            "X-Amz-Firehose-Protocol-Version": "1.0",
            "X-Amz-Firehose-Source-Arn": stream_arn(ctx.region, ctx.account_id, ctx.stream_name),
        }
        if config.access_key is not None:
            headers["X-Amz-Firehose-Access-Key"] = config.access_key.get_secret_value()
        if config.common_attributes:
            headers["X-Amz-Firehose-Common-Attributes"] = orjson.dumps(
                {"commonAttributes": config.common_attributes}
            ).decode()
        if config.content_encoding == "gzip":
            headers["Content-Encoding"] = "gzip"
        self._headers = headers

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(self.config, self.config.request_timeout_secs)
        return self._session

    async def deliver(self, batch: Batch) -> DeliveryResult:
        positions = list(batch.indices) if batch.indices is not None else list(range(len(batch.records)))
        # Requests group records by their position in the sealed batch, so a retried request has
        # the same id and the same records as the first time.
        chunks: dict[int, list[int]] = {}
        for i, pos in enumerate(positions):
            chunks.setdefault(pos // MAX_RECORDS_PER_REQUEST, []).append(i)
        failures: dict[int, RecordFailure] = {}
        for chunk, members in chunks.items():
            rid = request_id(batch.key, chunk)
            failure = await self._send(rid, [batch.records[i] for i in members])
            if failure is not None:
                failures.update((i, failure) for i in members)
        return DeliveryResult(failures)

    async def _send(self, rid: str, records: list[bytes]) -> RecordFailure | None:
        body = request_body(rid, int(time.time() * 1000), records)
        if self.config.content_encoding == "gzip":
            body = await asyncio.to_thread(gzip.compress, body, 6)
        headers = {**self._headers, "X-Amz-Firehose-Request-Id": rid}
        try:
            async with self._client().post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                length = resp.content_length
                if length is not None and length > MAX_RESPONSE_BYTES:
                    return RecordFailure(True, "HttpEndpoint.ResponseTooLarge",
                                         f"The response from the endpoint is {length} bytes, over 1 MiB")
                raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                if len(raw) > MAX_RESPONSE_BYTES:
                    return RecordFailure(True, "HttpEndpoint.ResponseTooLarge",
                                         "The response from the endpoint is over 1 MiB")
                content_type = resp.headers.get("Content-Type", "")
        except Exception as exc:  # transport errors: classified, retried by the runner
            kind, message = connection_error(exc)
            code = {"timeout": "HttpEndpoint.RequestTimeout", "reset": "HttpEndpoint.ConnectionReset"}.get(
                kind, "HttpEndpoint.ConnectionFailed")
            return RecordFailure(True, code, message)
        return check_response(rid, status, content_type, raw)


    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def check_response(rid: str, status: int, content_type: str, raw: bytes) -> RecordFailure | None:
    """Validate a response as Firehose does: only a conforming 200 is success."""
    text = raw[:2000].decode("utf-8", "replace")
    if status == 413:
        return RecordFailure(False, "HttpEndpoint.DestinationException",
                             f"Received the following response from the endpoint destination. 413: {text}")
    if status != 200:
        return RecordFailure(True, "HttpEndpoint.DestinationException",
                             f"Received the following response from the endpoint destination. {status}: {text}")
    problem = None
    doc: Any = None
    if not content_type.split(";")[0].strip().lower() == "application/json":
        problem = f"Content-Type is {content_type!r}, not application/json"
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem = "the body is not JSON"
    if problem is None:
        if not isinstance(doc, dict) or doc.get("requestId") != rid:
            problem = f"requestId does not match {rid}"
        elif not isinstance(doc.get("timestamp"), int):
            problem = "timestamp is missing"
    if problem is not None:
        return RecordFailure(True, "HttpEndpoint.InvalidResponseFromDestination",
                             f"The response received from the endpoint is invalid: {problem}. {text[:500]}")
    return None
