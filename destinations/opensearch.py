"""OpenSearch (and Elasticsearch) destination: one ``_bulk`` request per batch (reference §8).

Each record must be a JSON object; it is indexed with an explicit action line
``{"index": {"_index": <index>[-suffix], "_type": <type_name, if set>, "_id": <id>}}``. The index
suffix follows Firehose's rotation (``-2016-02-25-13``, ``-2016-02-25``, ``-2016-w08``,
``-2016-02``) from the batch's oldest arrival time, which is sealed with the batch.

Document ids: ``firehose_default`` gives each record ``<batch key>.<position>``, the batch key a
56-digit number drawn at seal time (Firehose's ids look like that) and recorded in the spool, so
a retry or a replay after a crash overwrites the same documents: exactly-once.
``no_document_id`` lets the cluster choose ids: a retry of a document whose first attempt was
indexed but not acknowledged duplicates it (at-least-once), as Firehose documents.

Per-item results are classified: 429 and 5xx items are retried (only those items); any other
item error (a mapping conflict, a malformed document) is permanent and archived at once under
``AmazonOpenSearchService-failed`` (``elasticsearch-failed`` with ``engine: elasticsearch``)
with ``esDocumentId``, ``esIndexName`` and ``esTypeName`` in its error record. Whole-request
failures (connection, authentication, 5xx) are retried until ``retry_duration_secs`` runs out.

Client: ``opensearch-py``'s asyncio client (``AsyncHttpConnection``, over aiohttp: the daemon's HTTP stack), with HTTP
basic authentication or SigV4 (Amazon OpenSearch Service, service ``es``; Serverless ``aoss``).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import Field, SecretStr, field_validator

from firehose.destinations.remote import RemoteConfig, connection_error, is_http_url
from firehose.interfaces import (
    Batch,
    BufferingLimits,
    BuildContext,
    DeliveryResult,
    Destination,
    RecordFailure,
)
from firehose.models import StrictModel
from firehose.redact import url_without_credentials

# Firehose's OpenSearch ranges (reference §3): 1-100 MiB (5), 0-900 s (300).
OPENSEARCH_BUFFERING = BufferingLimits(1, 100, 5, 0, 900, 300)

ROTATIONS = {
    "no_rotation": "NoRotation", "one_hour": "OneHour", "one_day": "OneDay", "one_week": "OneWeek",
    "one_month": "OneMonth",
}
# Firehose's OneWeek example (2016-02-25 -> myindex-2016-w08) is strftime's %U: weeks start on
# Sunday and the days before the year's first Sunday are week 00.
_SUFFIX = {"no_rotation": "", "one_hour": "-%Y-%m-%d-%H", "one_day": "-%Y-%m-%d", "one_week": "-%Y-w%U",
           "one_month": "-%Y-%m"}
DOCUMENT_IDS = {"firehose_default": "FIREHOSE_DEFAULT", "no_document_id": "NO_DOCUMENT_ID"}


class BasicAuth(StrictModel):
    """HTTP basic authentication."""

    type: Literal["basic"] = Field(description="`basic`.")
    user: str = Field(description="The user name.")
    password: SecretStr = Field(description="The password; write it as `${ENV}`.")


class SigV4Auth(StrictModel):
    """AWS SigV4 (Amazon OpenSearch Service). Credentials: the keys given here, else botocore's
    usual chain (environment, profile, instance role)."""

    type: Literal["sigv4"] = Field(description="`sigv4`.")
    region: str = Field(description="The domain's region, as signed.")
    service: Literal["es", "aoss"] = Field(
        default="es",
        description="The signing service: `es` (Amazon OpenSearch Service) or `aoss` (OpenSearch "
        "Serverless).",
    )
    access_key_id: str | None = Field(
        default=None,
        description="The access key id; unset: botocore's usual credential chain.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="The secret access key; write it as `${ENV}`.",
    )
    session_token: SecretStr | None = Field(
        default=None,
        description="A session token, for temporary credentials.",
    )


class NoAuth(StrictModel):
    """No authentication."""

    type: Literal["none"] = Field(description="`none`.")


class OpenSearchDestinationConfig(RemoteConfig):
    """An OpenSearch or Elasticsearch cluster, through its bulk API (Firehose:
    AmazonopensearchserviceDestinationConfiguration, or ElasticsearchDestinationConfiguration with
    ``engine: elasticsearch``); needs the stream's ``backup:``."""

    BACKUP_MODE_NAMES: ClassVar[tuple[str, str]] = ("FailedDocumentsOnly", "AllDocuments")

    type: Literal["opensearch"] = Field(description="`opensearch`.")
    endpoint: str = Field(
        description="The cluster's URL, http:// or https:// (Firehose: ClusterEndpoint).",
    )
    index: str = Field(
        min_length=1, max_length=80,
        description="The index name: lowercase, without spaces or \\ / * ? \" < > | , # :, not starting "
        "with - _ + (Firehose: IndexName).",
    )
    index_rotation: str = Field(
        default="one_day",
        description="Suffix appended to `index` from the batch's oldest arrival time: no_rotation, one_hour "
        "(`-2016-02-25-13`), one_day (`-2016-02-25`), one_week (`-2016-w08`), one_month (`-2016-02`), or "
        "Firehose's NoRotation, OneHour, OneDay, OneWeek, OneMonth (Firehose: IndexRotationPeriod).",
    )
    type_name: str = Field(
        default="", max_length=100,
        description="The document type, for Elasticsearch 6 and older; empty: none (Firehose: TypeName).",
    )
    document_id: str = Field(
        default="firehose_default",
        description="`firehose_default`: ids derived from the batch, so a retry overwrites (exactly once); "
        "`no_document_id`: the cluster picks ids (at least once). Or Firehose's FIREHOSE_DEFAULT, "
        "NO_DOCUMENT_ID (Firehose: DocumentIdOptions.DefaultDocumentIdFormat).",
    )
    engine: Literal["opensearch", "elasticsearch"] = Field(
        default="opensearch",
        description="The cluster's kind; `elasticsearch` archives failures as `elasticsearch-failed` with "
        "`ES.*` error codes, as Firehose's Elasticsearch destination does.",
    )
    auth: Annotated[BasicAuth | SigV4Auth | NoAuth, Field(discriminator="type")] = Field(
        default=NoAuth(type="none"),
        description="How requests are authenticated, chosen by its `type`: `basic`, `sigv4` or `none`.",
    )
    request_timeout_secs: int = Field(
        default=60, ge=1, le=3600,
        description="Seconds to wait for a bulk request's answer; then the request failed and is retried.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not is_http_url(v, 512):
            raise ValueError(f"must be an http:// or https:// URL (the cluster endpoint), got {v!r}")
        return v.rstrip("/")

    @field_validator("index")
    @classmethod
    def _index(cls, v: str) -> str:
        if v != v.lower() or any(c in v for c in ' "*\\<|,>/?#:') or v[0] in "-_+":
            raise ValueError(f"must be a valid index name (lowercase, no spaces or \\\"*<|,>/?#:), got {v!r}")
        return v

    @field_validator("index_rotation")
    @classmethod
    def _rotation(cls, v: str) -> str:
        for ours, firehose in ROTATIONS.items():
            if v in (ours, firehose):
                return ours
        raise ValueError(f"must be one of {', '.join(ROTATIONS)} (or Firehose's {', '.join(ROTATIONS.values())}), got {v!r}")

    @field_validator("document_id")
    @classmethod
    def _document_id(cls, v: str) -> str:
        for ours, firehose in DOCUMENT_IDS.items():
            if v in (ours, firehose):
                return ours
        raise ValueError(f"must be firehose_default or no_document_id (or Firehose's FIREHOSE_DEFAULT, NO_DOCUMENT_ID), got {v!r}")

    def buffering_limits(self) -> BufferingLimits:
        return OPENSEARCH_BUFFERING

    @property
    def error_output_type(self) -> str:
        return "elasticsearch-failed" if self.engine == "elasticsearch" else "AmazonOpenSearchService-failed"

    def index_name(self, oldest_arrival_ms: int) -> str:
        when = datetime.fromtimestamp(oldest_arrival_ms / 1000.0, tz=UTC)
        return self.index + when.strftime(_SUFFIX[self.index_rotation])

    def describe(self, buffering: Any, account_id: str, backup: Any = None) -> dict[str, Any]:
        """Firehose's AmazonopensearchserviceDestinationDescription (ElasticsearchDestinationDescription
        for ``engine: elasticsearch``)."""
        desc: dict[str, Any] = {
            "RoleARN": f"arn:aws:iam::{account_id}:role/firehose",
            "ClusterEndpoint": url_without_credentials(self.endpoint),
            "IndexName": self.index,
            "IndexRotationPeriod": ROTATIONS[self.index_rotation],
            "BufferingHints": {"SizeInMBs": buffering.size_mib, "IntervalInSeconds": buffering.interval_secs},
            "RetryOptions": {"DurationInSeconds": self.retry_duration_secs},
            "ProcessingConfiguration": {"Enabled": False, "Processors": []},
            "CloudWatchLoggingOptions": {"Enabled": False},
            "DocumentIdOptions": {"DefaultDocumentIdFormat": DOCUMENT_IDS[self.document_id]},
            **self.backup_description(backup, buffering, account_id),
        }
        if self.type_name:
            desc["TypeName"] = self.type_name
        key = "ElasticsearchDestinationDescription" if self.engine == "elasticsearch" else (
            "AmazonopensearchserviceDestinationDescription")
        return {key: desc}

    def build(self, ctx: BuildContext) -> OpenSearchDestination:
        return OpenSearchDestination(self, ctx)


def _item_failure(item: dict[str, Any], doc_id: str | None, index: str, type_name: str) -> RecordFailure | None:
    result: dict[str, Any] = next(iter(item.values()), {}) if item else {}
    status = int(result.get("status", 500))
    if 200 <= status < 300:
        return None
    error = result.get("error") or {}
    if isinstance(error, dict):
        message = f"{error.get('type', 'error')}: {error.get('reason', '')}"
    else:
        message = str(error)
    fields = {"esDocumentId": result.get("_id", doc_id), "esIndexName": index, "esTypeName": type_name}
    # 429 (es_rejected_execution_exception) and 5xx are transient for that item; the rest are not.
    return RecordFailure(status == 429 or status >= 500, str(status), message[:2000], fields)


class OpenSearchDestination(Destination):
    def __init__(self, config: OpenSearchDestinationConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self.retry_duration_secs = config.retry_duration_secs
        self.error_output_type = config.error_output_type
        self.metrics_prefix = "DeliveryToElasticsearch" if config.engine == "elasticsearch" else (
            "DeliveryToAmazonOpenSearchService")
        self._prefix = "ES" if config.engine == "elasticsearch" else "OS"
        self._client: Any = None

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return f"{rng.randrange(10**56):056d}"

    def _opensearch(self) -> Any:
        if self._client is None:
            from opensearchpy import AsyncHttpConnection, AsyncOpenSearch

            cfg = self.config
            kwargs: dict[str, Any] = {}
            auth = cfg.auth
            if isinstance(auth, BasicAuth):
                kwargs["http_auth"] = (auth.user, auth.password.get_secret_value())
            elif isinstance(auth, SigV4Auth):
                import boto3
                from opensearchpy import AWSV4SignerAsyncAuth

                session = boto3.session.Session(
                    aws_access_key_id=auth.access_key_id,
                    aws_secret_access_key=auth.secret_access_key.get_secret_value() if auth.secret_access_key else None,
                    aws_session_token=auth.session_token.get_secret_value() if auth.session_token else None,
                    region_name=auth.region,
                )
                kwargs["http_auth"] = AWSV4SignerAsyncAuth(session.get_credentials(), auth.region, auth.service)
            if cfg.endpoint.startswith("https://"):
                kwargs.update(use_ssl=True, verify_certs=cfg.tls_verify, ssl_show_warn=False)
                if cfg.ca_file:
                    kwargs["ca_certs"] = cfg.ca_file
            # The delivery runner owns retries: the client must not retry by itself.
            self._client = AsyncOpenSearch(
                hosts=[cfg.endpoint], connection_class=AsyncHttpConnection, timeout=cfg.request_timeout_secs,
                max_retries=0, retry_on_timeout=False, maxsize=8, **kwargs,
            )
        return self._client

    async def deliver(self, batch: Batch) -> DeliveryResult:
        cfg = self.config
        index = cfg.index_name(batch.oldest_arrival_ms)
        positions = batch.indices if batch.indices is not None else range(len(batch.records))
        head: dict[str, Any] = {"_index": index}
        if cfg.type_name:
            head["_type"] = cfg.type_name
        parts: list[bytes] = []
        ids: list[str | None] = []
        sent: list[int] = []  # the batch positions of the documents in the request
        failures: dict[int, RecordFailure] = {}
        with_ids = cfg.document_id == "firehose_default"
        for i, (pos, record) in enumerate(zip(positions, batch.records, strict=True)):
            doc_id = f"{batch.key}.{pos}" if with_ids else None
            doc = _single_line(record)
            if doc is None:
                failures[i] = RecordFailure(False, "400", "mapper_parsing_exception: the record is not a JSON object",
                                            {"esDocumentId": doc_id, "esIndexName": index, "esTypeName": cfg.type_name})
                continue
            parts.append(orjson.dumps({"index": {**head, "_id": doc_id} if with_ids else head}))
            parts.append(doc)
            ids.append(doc_id)
            sent.append(i)
        if not parts:
            return DeliveryResult(failures)
        body = b"\n".join(parts) + b"\n"
        try:
            response = await self._opensearch().bulk(body=body)
        except Exception as exc:
            code, message = self._request_error(exc)
            failure = RecordFailure(True, code, message)
            failures.update((i, failure) for i in sent)
            return DeliveryResult(failures)
        if not response.get("errors"):
            return DeliveryResult(failures)
        items = response.get("items") or []
        for k, i in enumerate(sent):
            item = items[k] if k < len(items) else {}
            f = _item_failure(item, ids[k], index, cfg.type_name)
            if f is not None:
                failures[i] = f
        return DeliveryResult(failures)

    def _request_error(self, exc: Exception) -> tuple[str, str]:
        from opensearchpy import exceptions as ex

        p = self._prefix
        if isinstance(exc, ex.ConnectionTimeout):
            return f"{p}.RequestTimeout", str(exc)[:1000]
        if isinstance(exc, ex.ConnectionError):
            kind, message = connection_error(getattr(exc, "info", None) or exc)
            return {"reset": f"{p}.ConnectionReset", "ssl": f"{p}.SSLHandshake"}.get(kind, f"{p}.ConnectionFailed"), message
        if isinstance(exc, ex.TransportError) and isinstance(exc.status_code, int):
            status = exc.status_code
            code = {401: f"{p}.AccessDenied", 403: f"{p}.AccessDenied", 404: f"{p}.ResourceNotFound",
                    413: f"{p}.PayloadTooLarge", 429: f"{p}.TooManyRequests"}.get(status, f"{p}.ServerError")
            return code, f"{status}: {exc.error}: {str(exc.info)[:1000]}"
        return f"{p}.ConnectionFailed", f"{type(exc).__name__}: {exc}"[:1000]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _single_line(record: bytes) -> bytes | None:
    """The record as one line of the bulk body: as it is when it is one line (the cluster parses
    it), re-serialised when it spans lines, None when it cannot be a document."""
    line = record.rstrip(b"\r\n")
    if b"\n" not in line and b"\r" not in line:
        return line if line.lstrip()[:1] == b"{" else None
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps(doc) if isinstance(doc, dict) else None
