"""What the destinations that are not object stores share (OpenSearch, Splunk, HTTP endpoint):
Firehose requires an S3 backup for them (its ``S3Configuration``: where failed records, and with
``mode: all`` every record, are archived), a retry window (``RetryOptions``) the delivery runner
enforces, TLS settings, and one aiohttp client session per destination.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, ClassVar

import aiohttp
from pydantic import Field

from firehose.models import StrictModel


class RemoteConfig(StrictModel):
    """Base of the non-object-store destination configs (validated and frozen, no I/O)."""

    requires_backup: ClassVar[bool] = True  # the config loader insists on the stream's backup:
    #: Firehose's S3BackupMode names for (failed_only, all) in DescribeDeliveryStream.
    BACKUP_MODE_NAMES: ClassVar[tuple[str, str]] = ("FailedDataOnly", "AllData")

    retry_duration_secs: int = Field(
        default=300, ge=0, le=7200,
        description="Seconds failed deliveries are retried after the first failed attempt; then the records "
        "are archived to the stream's backup. 0: one attempt (Firehose: RetryOptions.DurationInSeconds).",
    )
    tls_verify: bool = Field(
        default=True,
        description="Verify the server's TLS certificate (https:// URLs).",
    )
    ca_file: str | None = Field(
        default=None,
        description="A PEM file of CA certificates to verify the server with, for a private CA; unset: the "
        "system's.",
    )
    connect_timeout_secs: int = Field(
        default=10, ge=1, le=300,
        description="Seconds to connect before the attempt fails (and is retried).",
    )

    def backup_description(self, backup: Any, buffering: Any, account_id: str) -> dict[str, Any]:
        """``S3BackupMode`` and ``S3DestinationDescription`` from the stream's ``backup:``."""
        return backup_description(self.BACKUP_MODE_NAMES, backup, buffering, account_id)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.tls_verify:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True


def backup_description(mode_names: tuple[str, str], backup: Any, buffering: Any, account_id: str) -> dict[str, Any]:
    """``S3BackupMode`` (``mode_names``: the destination's names for failed-only and all) and
    ``S3DestinationDescription`` from a stream's ``backup:``."""
    if backup is None:
        return {"S3BackupMode": mode_names[0]}
    from firehose.registry import destination_config_class

    dest = backup.destination_dict()
    from firehose.destinations.objectstore import ObjectStoreConfig

    cfg = destination_config_class(dest["type"]).model_validate(dest)
    assert isinstance(cfg, ObjectStoreConfig)  # a backup is an s3 or local destination
    arn = f"arn:aws:s3:::{dest.get('bucket') or 'local'}"
    s3 = cfg.describe_destination(arn, buffering, account_id)["S3DestinationDescription"]
    mode = mode_names[1 if backup.mode == "all" else 0]
    return {"S3BackupMode": mode, "S3DestinationDescription": s3}


def is_http_url(v: str, max_length: int) -> bool:
    """An http:// or https:// URL with something after the scheme, at most ``max_length`` long."""
    return v.startswith(("http://", "https://")) and len(v) <= max_length and not v.endswith("://")


def client_session(config: RemoteConfig, read_timeout_secs: float, limit: int = 16) -> aiohttp.ClientSession:
    """A session whose every request has a connect and a total timeout (bounded shutdown); the
    delivery runner owns retries, so nothing here retries or follows redirects by itself."""
    connector = aiohttp.TCPConnector(limit=limit, ssl=config.ssl_context(), enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=read_timeout_secs, sock_connect=config.connect_timeout_secs)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True)


def connection_error(exc: BaseException) -> tuple[str, str]:
    """Classify a transport failure as (kind, message): kind is ``timeout``, ``reset`` or ``connect``."""
    message = f"{type(exc).__name__}: {exc}"[:1000]
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", message
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionResetError):
        return "reset", message
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return "ssl", message
    return "connect", message
