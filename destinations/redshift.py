"""Amazon Redshift destination (and PostgreSQL-compatible databases): stage in S3, load with COPY.

Flow per batch, as Firehose does it: the records are written to the staging bucket under the S3
destination's key layout (the batch key), a Redshift manifest naming that object is written to
``<prefix>manifests/yyyy/MM/dd/HH/<name>``, then one COPY loads it:

* ``load_method: copy_from_s3`` (Redshift): ``COPY table [(columns)] FROM 's3://...manifest'
  IAM_ROLE ... MANIFEST <copy_options>``; Redshift reads the staged object itself.
* ``load_method: copy_from_stdin`` (PostgreSQL, TimescaleDB, ...): the daemon maps the staged JSON
  objects onto the columns as ``JSON 'auto'`` does and streams them with ``COPY table (columns)
  FROM STDIN``. The bytes streamed are the bytes staged (the batch's records, kept by the spool);
  the COPY streams while the upload runs and commits only once the object and its manifest are
  staged (a failed upload rolls it back).

Guarantee: exactly once. The manifest key derives from the batch key, which is sealed in the spool
before the first attempt; the key is inserted into a bookkeeping table in the same transaction
as the COPY, and a load whose manifest is already there is skipped. A replay after a crash
therefore either finds the load committed (skip) or not (load), never half of it.

Failures: staging errors are the S3 destination's (retried by the delivery runner without
limit, as for S3). A failed COPY (connection loss, bad data, anything) is retried by the runner
with its backoff for ``retry_duration_secs`` from the first COPY attempt (Firehose's
RetryOptions; 0: no retry). Then the manifest is copied to ``<prefix>errors/manifests/...``
(Firehose's layout, for manual backfill) with an error record under
``<prefix>redshift-failed/yyyy/MM/dd/HH/`` naming it, and the batch counts as delivered, so the
stream keeps flowing. The retry window restarts if the daemon restarts.

Driver: psycopg 3 (already a dependency). Redshift speaks the PostgreSQL wire protocol, so one
driver serves both load methods, and psycopg has a C-accelerated ``COPY FROM STDIN`` writer;
``redshift_connector`` has no ``COPY FROM STDIN`` and would add a second driver. For Redshift's
sake, parameters are bound on the client and statements are never prepared (psycopg issue #122),
and the client encoding is set explicitly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import orjson
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from firehose.destinations.objectstore import S3_BUFFERING, join_records
from firehose.destinations.s3 import S3Destination, S3DestinationConfig
from firehose.destinations.sql import (
    BadRecordError,
    CopyOptions,
    Identifier,
    JsonAutoMapper,
    SqlError,
    authorization_sql,
    copy_from_s3_sql,
    copy_from_stdin_sql,
    json_objects,
    manifest_document,
    name_sql,
    parse_copy_options,
    parse_identifier,
    parse_name,
)
from firehose.interfaces import Batch, BufferingLimits, BuildContext, DeliveryResult, Destination
from firehose.models import StrictModel

# Redshift refuses these staging formats: COPY cannot read them (reference §6.4).
_UNREADABLE_BY_COPY = ("snappy", "zip", "hadoop_snappy")
_IAM_ROLE_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_UNSAFE_IN_LITERAL = re.compile(r"['\\\x00-\x1f]")


class ConnectionConfig(StrictModel):
    """Where the database is. ``password`` should come from ``${ENV}``; it is never logged, and it
    may be left out for libpq's other sources (``PGPASSWORD``, ``~/.pgpass``)."""

    host: str = Field(description="The cluster's or server's host name (Firehose: ClusterJDBCURL's host).")
    port: int = Field(
        default=5439, ge=1, le=65535,
        description="The port; 5439 is Redshift's, 5432 PostgreSQL's (Firehose: ClusterJDBCURL's port).",
    )
    database: str = Field(description="The database name (Firehose: ClusterJDBCURL's database).")
    user: str = Field(description="The user name (Firehose: Username).")
    password: SecretStr | None = Field(
        default=None,
        description="The password; write it as `${ENV}`. Unset or empty: libpq's PGPASSWORD or ~/.pgpass "
        "(Firehose: Password).",
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer",
        description="libpq's sslmode: whether and how TLS is used.",
    )
    connect_timeout_secs: int = Field(
        default=10, ge=1, le=300,
        description="Seconds a connection attempt may take.",
    )
    statement_timeout_secs: int = Field(
        default=3600, ge=1, le=86400,
        description="Seconds a statement (a COPY) may run before the database cancels it.",
    )

    @field_validator("host", "database", "user")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v or "\x00" in v:
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    def secrets(self) -> list[str]:
        return [self.password.get_secret_value()] if self.password is not None else []


class CopyCredentials(StrictModel):
    """An access key pair COPY presents to S3 (Redshift's ACCESS_KEY_ID / SECRET_ACCESS_KEY /
    SESSION_TOKEN), for clusters without an IAM role."""

    access_key_id: str = Field(
        description="The access key id COPY presents to S3: 16-128 capital letters and digits (Redshift: "
        "ACCESS_KEY_ID).",
    )
    secret_access_key: SecretStr = Field(
        description="The secret access key; write it as `${ENV}` (Redshift: SECRET_ACCESS_KEY).",
    )
    session_token: SecretStr | None = Field(
        default=None,
        description="A session token, for temporary credentials (Redshift: SESSION_TOKEN).",
    )

    @field_validator("access_key_id")
    @classmethod
    def _key_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Z0-9]{16,128}", v):
            raise ValueError("must be an AWS access key id (16-128 capital letters and digits)")
        return v

    @field_validator("secret_access_key", "session_token")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and (not v.get_secret_value() or _UNSAFE_IN_LITERAL.search(v.get_secret_value())):
            raise ValueError("must be non-empty, without quotes, backslashes or control characters")
        return v

    def secrets(self) -> list[str]:
        out = [self.secret_access_key.get_secret_value()]
        if self.session_token is not None:
            out.append(self.session_token.get_secret_value())
        return out


class StagingConfig(S3DestinationConfig):
    """Firehose's S3Configuration of a Redshift destination: the S3 destination's fields, with
    Redshift's rules: a plain Prefix, no ErrorOutputPrefix, a compression COPY can read."""

    @field_validator("compression")
    @classmethod
    def _readable(cls, v: str) -> str:
        if v in _UNREADABLE_BY_COPY:
            raise ValueError(f"must be none or gzip for Redshift staging (COPY cannot read {v}), got {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        if "!{" in v:
            raise ValueError(f"Redshift staging Prefix cannot contain expressions (Firehose's rule), got {v!r}")
        if _UNSAFE_IN_LITERAL.search(v):
            raise ValueError(f"cannot contain quotes, backslashes or control characters, got {v!r}")
        return v

    @field_validator("error_output_prefix")
    @classmethod
    def _no_error_prefix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("must not be set for Redshift staging (Firehose's rule: ErrorOutputPrefix must be null)")
        return v

    @field_validator("file_extension")
    @classmethod
    def _no_extension(cls, v: str) -> str:
        if v:
            raise ValueError("is not supported for Redshift staging (Firehose's S3Configuration has no FileExtension)")
        return v


class RedshiftDestinationConfig(StrictModel):
    """Amazon Redshift, or a PostgreSQL-compatible database: each batch is staged in S3 with a
    manifest and loaded with one ``COPY``, exactly once (Firehose: RedshiftDestinationConfiguration).
    See docs/redshift.md."""

    requires_backup: ClassVar[bool] = False  # a backup: is optional

    type: Literal["redshift"] = Field(description="`redshift`.")
    connection: ConnectionConfig = Field(
        description="Where the database is (Firehose: ClusterJDBCURL, Username, Password).",
    )
    table: str = Field(
        description="The table loaded: `name` or `schema.name`, `\"quoted\"` parts for other characters, "
        "at most 512 characters (Firehose: CopyCommand.DataTableName).",
    )
    columns: list[str] | None = Field(
        default=None,
        description="The columns COPY loads; unset: every column (Firehose: "
        "CopyCommand.DataTableColumns).",
    )
    load_method: Literal["copy_from_s3", "copy_from_stdin"] = Field(
        default="copy_from_s3",
        description="`copy_from_s3`: Redshift's `COPY ... FROM 's3://...' MANIFEST`; `copy_from_stdin`: "
        "`COPY ... FROM STDIN`, for PostgreSQL-compatible databases.",
    )
    staging: StagingConfig = Field(
        description="The S3 bucket batches and manifests are staged in (Firehose: S3Configuration).",
    )
    copy_options: str | None = Field(
        default=None, max_length=10240, validate_default=True,
        description="COPY options appended after MANIFEST, such as `JSON 'auto' GZIP`; must say GZIP when "
        "`staging.compression` is gzip (Firehose: CopyCommand.CopyOptions).",
    )
    iam_role: str | None = Field(
        default=None,
        description="The role COPY assumes to read S3: an IAM role ARN, a comma-separated chain, or `default` "
        "(Firehose: RoleARN; Redshift: IAM_ROLE). `copy_from_s3` needs this or `credentials`.",
    )
    credentials: CopyCredentials | None = Field(
        default=None,
        description="Instead of `iam_role`: an access key pair COPY presents to S3.",
    )
    retry_duration_secs: int = Field(
        default=3600, ge=0, le=7200,
        description="Seconds a failing COPY is retried; then its manifest is archived under "
        "`<staging prefix>errors/manifests/` and the stream moves on (Firehose: RetryOptions.DurationInSeconds).",
    )
    bookkeeping_table: str = Field(
        default="firehose_loaded_manifests",
        description="The table recording loaded manifests, in the COPY's transaction (created on first use).",
    )

    @field_validator("table", "bookkeeping_table")
    @classmethod
    def _table(cls, v: str) -> str:
        if len(v) > 512:
            raise ValueError(f"must be at most 512 characters (Firehose's DataTableName), got {len(v)}")
        try:
            parse_name(v)
        except SqlError as exc:
            raise ValueError(f'must be a table name (name or schema.name, "quoted" if need be): {exc}; got {v!r}') from None
        return v

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one column, or be left out to load every column")
        seen: dict[str, str] = {}
        for raw in v:
            try:
                name = parse_identifier(raw).name
            except SqlError as exc:
                raise ValueError(f"column {raw!r} is not a column name: {exc}") from None
            if name in seen:
                raise ValueError(f"column {raw!r} is listed twice (also {seen[name]!r})")
            seen[name] = raw
        if len(",".join(v)) > 10240:
            raise ValueError("must be at most 10240 characters joined with commas (Firehose's DataTableColumns)")
        return v

    @field_validator("copy_options")
    @classmethod
    def _copy_options(cls, v: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("load_method")
        staging = info.data.get("staging")
        options = None
        if v is not None:
            try:
                options = parse_copy_options(v)
                if method == "copy_from_stdin":
                    options.json_auto()
            except SqlError as exc:
                raise ValueError(f"{exc}; got {v!r}") from None
        gzip_staged = staging is not None and staging.compression == "gzip"
        says_gzip = options is not None and options.gzip
        if staging is not None and says_gzip and not gzip_staged:
            raise ValueError(f"says GZIP but staging.compression is {staging.compression!r}; got {v!r}")
        # Left out, copy_from_stdin knows the staged compression; written out, it must be right.
        if gzip_staged and not says_gzip and (method == "copy_from_s3" or options is not None):
            raise ValueError("must include GZIP when staging.compression is gzip (COPY must be told), "
                             f"got {v!r}")
        return v

    @field_validator("iam_role")
    @classmethod
    def _iam_role(cls, v: str | None) -> str | None:
        if v is None or v == "default":
            return v
        if not all(_IAM_ROLE_RE.fullmatch(part) for part in v.split(",")):
            raise ValueError(
                f"must be default or an IAM role ARN (arn:aws:iam::<account>:role/<name>; a chain is "
                f"comma-separated), got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _credentials(self) -> RedshiftDestinationConfig:
        if self.iam_role is not None and self.credentials is not None:
            raise ValueError("set iam_role or credentials, not both")
        if self.load_method == "copy_from_s3" and self.iam_role is None and self.credentials is None:
            raise ValueError(
                "load_method copy_from_s3 needs iam_role or credentials: what Redshift's COPY presents to S3"
            )
        return self

    # --- derived -----------------------------------------------------------------------------------
    def buffering_limits(self) -> BufferingLimits:
        return S3_BUFFERING  # Firehose's Redshift buffering is its S3 staging's (reference §3)

    @property
    def table_name(self) -> tuple[Identifier, ...]:
        return parse_name(self.table)

    @property
    def column_names(self) -> tuple[Identifier, ...]:
        return tuple(parse_identifier(c) for c in self.columns or ())

    @property
    def options(self) -> CopyOptions | None:
        return parse_copy_options(self.copy_options) if self.copy_options is not None else None

    def secrets(self) -> list[str]:
        return self.connection.secrets() + (self.credentials.secrets() if self.credentials else [])

    def authorization(self, *, redacted: bool = False) -> str:
        creds = self.credentials
        if creds is None:
            return authorization_sql(self.iam_role)
        secret = "<redacted>" if redacted else creds.secret_access_key.get_secret_value()
        token = None
        if creds.session_token is not None:
            token = "<redacted>" if redacted else creds.session_token.get_secret_value()
        return authorization_sql(None, creds.access_key_id, secret, token)

    def copy_sql(self, manifest_url: str, *, redacted: bool = False) -> str:
        """The Redshift statement for one manifest (``redacted``: secrets replaced, for display)."""
        return copy_from_s3_sql(
            self.table_name, self.column_names, manifest_url, self.authorization(redacted=redacted), self.options
        )

    def describe(self, buffering: Any, account_id: str) -> dict[str, Any]:
        """Firehose's RedshiftDestinationDescription."""
        c = self.connection
        scheme = "redshift" if self.load_method == "copy_from_s3" else "postgresql"
        staging = self.staging.describe_destination(f"arn:aws:s3:::{self.staging.bucket}", buffering, account_id)
        copy: dict[str, Any] = {"DataTableName": self.table}
        if self.columns:
            copy["DataTableColumns"] = ",".join(self.columns)
        if self.copy_options is not None:
            copy["CopyOptions"] = self.copy_options
        role = self.iam_role if self.iam_role and self.iam_role != "default" else None
        return {
            "RedshiftDestinationDescription": {
                "RoleARN": (role or f"arn:aws:iam::{account_id}:role/firehose").split(",")[0],
                "ClusterJDBCURL": f"jdbc:{scheme}://{c.host}:{c.port}/{c.database}",
                "CopyCommand": copy,
                "Username": c.user,
                "RetryOptions": {"DurationInSeconds": self.retry_duration_secs},
                "S3DestinationDescription": staging["S3DestinationDescription"],
                "S3BackupMode": "Disabled",
                "CloudWatchLoggingOptions": {"Enabled": False},
            }
        }

    def build(self, ctx: BuildContext) -> RedshiftDestination:
        return RedshiftDestination(self, ctx)


# --- keys -------------------------------------------------------------------------------------------


def manifest_key(prefix: str, batch_key: str, *, failed: bool = False) -> str:
    """``<prefix>manifests/yyyy/MM/dd/HH/<object name without extension>`` for a staged object
    ``<prefix>yyyy/MM/dd/HH/<name><ext>``; ``failed``: under ``<prefix>errors/manifests/``.

    Firehose's normal manifest folder is an educated guess (reference §7); the errors folder is
    the observed ``<prefix>errors/manifests/<yyyy>/<MM>/...``."""
    rest = batch_key[len(prefix) :]
    folder, _, name = rest.rpartition("/")
    stem = name.split(".", 1)[0]  # object names have no dot before the extension
    return f"{prefix}{'errors/' if failed else ''}manifests/{folder}/{stem}"


# --- runtime ----------------------------------------------------------------------------------------


class _StagingFailed(Exception):
    """The batch could not be staged while its COPY ran; the COPY was rolled back."""


class LoadError(Exception):
    """A failed COPY with Firehose's error code; the message has secrets removed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# SQLSTATE -> Firehose's Redshift error code (reference §7).
_SQLSTATE_CODES = {
    "28P01": "Redshift.AuthenticationFailed",
    "28000": "Redshift.AuthenticationFailed",
    "3D000": "Redshift.DatabaseNotFound",
    "42P01": "Redshift.TableNotFound",
    "3F000": "Redshift.TableNotFound",
    "42703": "Redshift.ColumnNotFound",
    "42601": "Redshift.SyntaxError",
    "42501": "Redshift.InsufficientPrivilege",
    "25006": "Redshift.ReadOnlyCluster",
    "53100": "Redshift.DiskFull",
}


@dataclass
class _Progress:
    """A batch between its first COPY attempt and its outcome (in memory: a restart starts over)."""

    first_attempt: float
    attempts: int = 0


class _StagingDestination(S3Destination):
    """The staging bucket. Only COPY reads staged objects, so gzip is written with ISA-L's igzip
    at level 1 (on clickstream data about 9 times as fast as zlib's level 6, at 0.24 of the size
    instead of 0.20) rather than the JVM-identical stream an S3 destination writes."""

    def _encode(self, batch: Batch) -> bytes:
        if self.config.compression != "gzip" or (self.converter is not None and not batch.archive):
            return super()._encode(batch)
        from isal import igzip

        return igzip.compress(join_records(batch.records, batch.delimiter), compresslevel=1)


class RedshiftDestination(Destination):
    """See the module docstring for the flow and the guarantee. Loads run in worker threads, one
    connection each (connections are kept for reuse and closed after any error); ``close``
    cancels loads still running, so shutdown is bounded."""

    def __init__(self, config: RedshiftDestinationConfig, ctx: BuildContext, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.ctx = ctx
        self.log = ctx.log
        self.monotonic = monotonic
        self.stage = _StagingDestination(config.staging, ctx)
        plain = config.staging.model_copy(update={"compression": "none"})
        self.plain = S3Destination(plain, ctx)  # manifests are plain JSON
        self._secrets = [s for s in config.secrets() if s]
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._busy: set[Any] = set()
        self._closed = False
        self._bookkeeping_ready = False
        self._load_columns: tuple[Identifier, ...] | None = config.column_names or None
        self._progress: dict[str, _Progress] = {}
        self._staged: set[str] = set()
        # One COPY at a time, as Firehose issues the next COPY when the previous one completes;
        # staging of the next batches goes on meanwhile.
        self._copy_turn = asyncio.Lock()
        self._tasks: set[asyncio.Task[DeliveryResult]] = set()

    async def start(self) -> None:
        # One S3 client for staged objects and manifests, made before the first batch needs it
        # (creating a client costs more than a 5 MiB upload).
        self.plain._client = await asyncio.to_thread(self.stage._s3)

    async def preflight(self) -> str | None:
        """The staging bucket and its credentials (the database is checked by the first load)."""
        problem = await self.stage.preflight()
        return f"staging: {problem}" if problem else None

    # --- keys --------------------------------------------------------------------------------------
    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return self.stage.batch_key(oldest_arrival, rng)

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        """Failed records (processing-failed, ...) go to the staging bucket, as Firehose puts them."""
        return self.stage.archive_key(oldest_arrival, rng, error_output_type)

    def manifest_url(self, key: str) -> str:
        return f"s3://{self.config.staging.bucket}/{key}"

    # --- delivery ----------------------------------------------------------------------------------
    async def deliver(self, batch: Batch) -> DeliveryResult:
        if batch.archive:  # error records and source copies: stored in the staging bucket as they are
            return await self.stage.deliver(batch)
        prefix = self.config.staging.prefix
        manifest = manifest_key(prefix, batch.key)
        staging: asyncio.Task[DeliveryResult] | None = None
        staged_gate: concurrent.futures.Future[bool] | None = None
        if batch.key not in self._staged:
            staging = asyncio.get_running_loop().create_task(self._stage(batch, manifest))
            self._tasks.add(staging)  # the loop holds tasks weakly; a cancelled delivery drops its own
            staging.add_done_callback(self._tasks.discard)
            if self.config.load_method == "copy_from_s3":  # Redshift reads the staged object itself
                staged = await staging
                if not staged.ok:
                    return staged
                self._staged.add(batch.key)
                staging = None
            else:
                # COPY FROM STDIN streams the batch while it is being staged, and commits only
                # once the staged object and its manifest are there.
                gate: concurrent.futures.Future[bool] = concurrent.futures.Future()
                staging.add_done_callback(
                    lambda t: gate.set_result(not t.cancelled() and t.exception() is None and t.result().ok))
                staged_gate = gate
        progress = self._progress.setdefault(batch.key, _Progress(self.monotonic()))
        progress.attempts += 1
        error: LoadError | None = None
        rows: int | None = None
        try:
            async with self._copy_turn:
                rows = await asyncio.to_thread(self._load, batch, manifest, staged_gate)
        except _StagingFailed:
            pass  # rolled back; the staging result below says why
        except LoadError as exc:
            error = exc
        if staging is not None:
            staged = await staging
            if not staged.ok:
                return staged
            self._staged.add(batch.key)
        if error is not None:
            if self.monotonic() - progress.first_attempt < self.config.retry_duration_secs:
                return DeliveryResult.all_failed(len(batch.records), retryable=True, code=error.code,
                                                 message=error.message)
            archived = await self._archive(batch, manifest, error, progress.attempts)
            if not archived.ok:
                return archived
            self.log.warning("redshift_manifest_archived", batch_id=batch.batch_id, key=batch.key,
                             manifest=manifest_key(prefix, batch.key, failed=True), error_code=error.code,
                             error_message=error.message[:300], attempts=progress.attempts)
        elif rows is None:
            self.log.info("redshift_load_skipped", batch_id=batch.batch_id, manifest=manifest,
                          reason="manifest already loaded")
        else:
            self.log.debug("redshift_loaded", batch_id=batch.batch_id, manifest=manifest, rows=rows)
        self._progress.pop(batch.key, None)
        self._staged.discard(batch.key)
        return DeliveryResult.delivered()

    async def _stage(self, batch: Batch, manifest: str) -> DeliveryResult:
        """The staged object and its manifest, uploaded together."""
        body = manifest_document(self.config.staging.bucket, [batch.key])
        uploads = await asyncio.gather(
            self.stage.deliver(batch),
            self.plain.deliver(Batch(batch.stream, batch.batch_id, manifest, [body], batch.oldest_arrival_ms,
                                     archive=True)),
        )
        failed = next((r for r in uploads if not r.ok), None)
        if failed is None:
            return DeliveryResult.delivered()
        return DeliveryResult(dict.fromkeys(range(len(batch.records)), next(iter(failed.failures.values()))))

    async def _archive(self, batch: Batch, manifest: str, exc: LoadError, attempts: int) -> DeliveryResult:
        """Give up on a batch: its manifest under errors/manifests/, and an error record (Firehose's
        fields) naming the batch. Both keys derive from the batch key, so a replay overwrites them."""
        prefix = self.config.staging.prefix
        failed = manifest_key(prefix, batch.key, failed=True)
        body = manifest_document(self.config.staging.bucket, [batch.key])
        result = await self.plain.deliver(Batch(batch.stream, batch.batch_id, failed, [body],
                                                batch.oldest_arrival_ms, archive=True))
        if not result.ok:
            return result
        rest = batch.key[len(prefix) :]
        record_key = f"{prefix}redshift-failed/{rest}"
        doc = {
            "attemptsMade": attempts,
            "arrivalTimestamp": batch.oldest_arrival_ms,
            "errorCode": exc.code,
            "errorMessage": exc.message,
            "attemptEndingTimestamp": int(time.time() * 1000),
            "manifest": self.manifest_url(failed),
            "dataFiles": [self.manifest_url(batch.key)],
            "records": len(batch.records),
        }
        return await self.stage.deliver(Batch(batch.stream, batch.batch_id, record_key, [orjson.dumps(doc) + b"\n"],
                                              batch.oldest_arrival_ms, archive=True))

    # --- loading (worker threads) ----------------------------------------------------------------
    def _load(self, batch: Batch, manifest: str, staged: concurrent.futures.Future[bool] | None) -> int | None:
        """One COPY in one transaction with its bookkeeping row, committed only once ``staged``
        (if given) says the batch is staged. Returns the rows loaded, or None when the manifest was
        loaded before. Raises LoadError, or _StagingFailed after rolling back."""
        import psycopg

        conn = None
        ok = False
        try:
            conn = self._acquire()
            self._ensure_bookkeeping(conn)
            bookkeeping = name_sql(parse_name(self.config.bookkeeping_table))
            try:
                with conn.transaction(), conn.cursor() as cur:
                    if self.config.load_method == "copy_from_s3":
                        # Redshift does not enforce primary keys: serialise loads on the bookkeeping table.
                        cur.execute(f"LOCK TABLE {bookkeeping}")
                    cur.execute(f"SELECT 1 FROM {bookkeeping} WHERE manifest = %s", (manifest,))
                    if cur.fetchone() is not None:
                        ok = True
                        return None
                    rows = self._copy(cur, batch, manifest)
                    cur.execute(
                        f"INSERT INTO {bookkeeping} (manifest, loaded_at, row_count) VALUES (%s, %s, %s)",
                        (manifest, datetime.now(UTC), rows),
                    )
                    if staged is not None and not staged.result():
                        raise _StagingFailed()
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.table_name != parse_name(self.config.bookkeeping_table)[-1].name:
                    raise
                # PostgreSQL: an earlier attempt (a daemon killed mid-load) committed this manifest
                # while this one was loading; the insert waited for it, then met its key.
                ok = True
                return None
            ok = True
            return rows
        except BadRecordError as exc:
            raise LoadError("Redshift.DataLoadFailed", self._scrub(str(exc))) from None
        except psycopg.Error as exc:
            raise LoadError(*self._classify(exc)) from None
        finally:
            if conn is not None:
                self._release(conn, ok)

    def _copy(self, cur: Any, batch: Batch, manifest: str) -> int:
        if self.config.load_method == "copy_from_s3":
            cur.execute(self.config.copy_sql(self.manifest_url(manifest)))
            if cur.rowcount >= 0:
                return int(cur.rowcount)
            cur.execute("SELECT pg_last_copy_count()")
            return int(cur.fetchone()[0])
        columns = self._columns(cur)
        mapper = JsonAutoMapper([c.name for c in columns])
        row = mapper.row
        with cur.copy(copy_from_stdin_sql(self.config.table_name, columns)) as copy:
            write = copy.write_row
            for obj in json_objects(batch.records, batch.delimiter):
                write(row(obj))
        return int(cur.rowcount)

    def _columns(self, cur: Any) -> tuple[Identifier, ...]:
        """The configured columns, or else every column a COPY can write, in table order."""
        if self._load_columns is None:
            cur.execute(
                "SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid = %s::regclass "
                "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' AND a.attidentity = '' "
                "ORDER BY a.attnum",
                (name_sql(self.config.table_name),),
            )
            self._load_columns = tuple(Identifier(r[0]) for r in cur.fetchall())
        return self._load_columns

    def _ensure_bookkeeping(self, conn: Any) -> None:
        with self._lock:
            if self._bookkeeping_ready:
                return
            table = name_sql(parse_name(self.config.bookkeeping_table))
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (manifest VARCHAR(1024) NOT NULL PRIMARY KEY, "
                    "loaded_at TIMESTAMPTZ NOT NULL, row_count BIGINT NOT NULL)"
                )
            self._bookkeeping_ready = True

    def _acquire(self) -> Any:
        import psycopg

        with self._lock:
            if self._closed:
                raise LoadError("Redshift.ConnectionFailed", "the destination is closing")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            c = self.config.connection
            conn = psycopg.connect(
                host=c.host, port=c.port, dbname=c.database, user=c.user,
                password=c.password.get_secret_value() if c.password is not None else None,
                sslmode=c.sslmode, connect_timeout=c.connect_timeout_secs, application_name="firehose",
                client_encoding="utf8", keepalives=1, keepalives_idle=30, keepalives_interval=10,
                keepalives_count=3, prepare_threshold=None, cursor_factory=psycopg.ClientCursor,
            )
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {int(c.statement_timeout_secs) * 1000}")
        with self._lock:
            self._busy.add(conn)
        return conn

    def _release(self, conn: Any, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            keep = reusable and not self._closed and not conn.closed
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()

    async def close(self) -> None:
        """Cancel loads in flight (their transactions roll back; a replay loads them again) and
        close every connection."""
        with self._lock:
            self._closed = True
            busy = list(self._busy)
            idle, self._idle = self._idle, []
        for conn in busy:
            try:
                await asyncio.to_thread(conn.cancel_safe, timeout=5.0)
            except Exception as exc:  # the connection may already be gone
                self.log.debug("redshift_cancel_failed", error=self._scrub(str(exc)))
        for conn in idle:
            conn.close()
        await self.stage.close()
        await self.plain.close()

    # --- errors ------------------------------------------------------------------------------------
    def _scrub(self, message: str) -> str:
        for secret in self._secrets:
            message = message.replace(secret, "<redacted>")
        return message

    def _classify(self, exc: Exception) -> tuple[str, str]:
        import psycopg

        sqlstate = getattr(exc, "sqlstate", None) or ""
        text = self._scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        message = f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
        if sqlstate in _SQLSTATE_CODES:
            return _SQLSTATE_CODES[sqlstate], message
        if sqlstate[:2] in ("22", "23") or "stl_load_errors" in text:
            return "Redshift.DataLoadFailed", message  # data exceptions and constraint violations
        if isinstance(exc, psycopg.OperationalError) or sqlstate[:2] in ("08", "57"):
            return "Redshift.ConnectionFailed", message
        return "InternalError", message


