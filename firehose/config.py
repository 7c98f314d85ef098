"""Daemon configuration: YAML -> strict, frozen, typed models.

Unknown and duplicate keys are rejected; ``${ENV}`` references are expanded (for secrets); every
error names the file, the line and the field, e.g.
``firehose.yaml:7: streams[0].buffering.size_mib: must be between 1 and 128, got 512``.
Validation happens entirely before anything starts; a config class never does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from firehose.access import AuthConfig
from firehose.cluster import ClusterConfig, cluster_problems
from firehose.config_errors import _collect, _line_for
from firehose.control_shapes import S3Defaults
from firehose.interfaces import (
    BufferingLimits,
    DestinationConfig,
    ObjectStoreDestinationConfig,
    ProcessorConfig,
    SourceConfig,
    ValidatedConfig,
)
from firehose.models import StrictModel
from firehose.names import STREAM_NAME_RE
from firehose.quotas import QuotasConfig
from firehose.registry import PluginError, UnknownTypeError, destination_config_class
from firehose.tls import TlsConfig
from firehose.yamlload import Path, YamlError, format_path, load_yaml

_Config = TypeVar("_Config", bound=ValidatedConfig)

DEFAULT_CONFIG_NAME = "<embedded default config>"


class ConfigError(ValueError):
    """An invalid config. ``errors`` lists every problem, each ``file:line: field: message``;
    ``checks`` are the :class:`RuntimeCheck` items of the parts that were valid, so
    ``firehose validate`` can run them too and report every problem in one pass."""

    def __init__(self, errors: list[str], *, checks: Sequence[RuntimeCheck] = ()) -> None:
        self.errors = errors
        self.checks = tuple(checks)
        super().__init__("\n".join(errors))


@dataclass(frozen=True)
class RuntimeCheck:
    """A check config loading defers because it needs I/O or runs user code (see
    :func:`firehose.config_checks.run_checks`): ``handler`` imports a local Lambda handler (``target`` is its
    ``module:attr``), ``schema`` compiles a ``format:`` schema given inline or as an Avro file
    (``target`` is the :class:`~firehose.transforms.formats.FormatConfig`). ``where`` is
    ``file:line: field`` of the key to blame."""

    kind: Literal["handler", "schema"]
    stream: str
    file: str
    where: str
    target: Any


class HealthConfig(StrictModel):
    """``GET /healthz``: a stream whose destination has failed for longer than
    ``degraded_after_secs`` makes the daemon ``degraded`` (still HTTP 200)."""

    degraded_after_secs: int = Field(
        default=300, ge=1, le=86400,
        description="Seconds a stream's destination may keep failing before `GET /healthz` reports the "
        "daemon `degraded` (still HTTP 200).",
    )


class ApiLimitsConfig(StrictModel):
    """Bounds on the API's connections: open connections, deadlines for
    a request's headers and body and for an idle kept-alive connection, and the body bytes being
    read at once across every request (and from requests not yet authenticated)."""

    max_connections: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="Open API connections at most; past it a new connection is answered HTTP 503 and closed "
        "before anything is read.",
    )
    header_timeout_secs: float = Field(
        default=10, gt=0, le=3600,
        description="Seconds a request's headers may take to arrive, from the connection's start (or, on a "
        "kept-alive connection, from the next request's first byte); then the connection is closed.",
    )
    body_timeout_secs: float = Field(
        default=30, gt=0, le=3600,
        description="Seconds a request's whole body may take to arrive; then it is answered HTTP 408 "
        "RequestTimeoutException.",
    )
    idle_timeout_secs: float = Field(
        default=60, gt=0, le=3600,
        description="Seconds a kept-alive connection may stay idle between requests.",
    )
    max_inflight_body_mib: int = Field(
        default=256, ge=16, le=1 << 20,
        description="MiB of request bodies being read at once, across every request; a request past it is "
        "answered 503 ServiceUnavailableException (SDKs retry).",
    )
    max_unauthenticated_body_mib: int = Field(
        default=32, ge=16, le=1 << 20,
        description="MiB of bodies being read at once from requests not yet authenticated (their signature "
        "is checked once the body is in); at most `max_inflight_body_mib` in effect.",
    )


class ApiConfig(StrictModel):
    """The Firehose API the daemon serves (``PutRecord``, ``PutRecordBatch``, ...), with
    ``GET /healthz`` and ``GET /metrics`` on the same address."""

    listen: str = Field(
        default="127.0.0.1:4573",
        description="`HOST:PORT` the API listens on (`0.0.0.0:4573` for every interface); clients set it as "
        "their endpoint URL (`http://HOST:PORT`).",
    )
    region: str = Field(
        default="us-east-1",
        description="The region in every ARN the API shows (Firehose: the `<region>` of "
        "`arn:aws:firehose:<region>:<account>:deliverystream/<name>`) and the default region of Kinesis sources and remote Lambda functions.",
    )
    account_id: str = Field(
        default="000000000000",
        description="The 12-digit account id in every ARN the API shows (Firehose: the `<account>` of "
        "DeliveryStreamARN).",
    )
    auth: AuthConfig = Field(default=AuthConfig(), description="How API requests are authenticated.")
    health: HealthConfig = Field(default=HealthConfig(), description="`GET /healthz` settings.")
    limits: ApiLimitsConfig = Field(
        default=ApiLimitsConfig(),
        description="Bounds on the API's connections and request bodies.",
    )
    control_plane: bool = Field(
        default=False, description="Serve CreateDeliveryStream, UpdateDestination and DeleteDeliveryStream: streams "
        "made through the API, kept in `data_dir/api-streams.yaml` beside the YAML-defined ones (firehose/control.py); "
        "in cluster mode, in the JetStream bucket `FH_API_STREAMS`, shared by every daemon.")
    control_plane_s3: S3Defaults | None = Field(
        default=None, description="How streams created through the API reach S3; unset: the standard AWS "
        "configuration (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, profiles, the credential chain).")
    tls: TlsConfig | None = Field(
        default=None, description="Serve HTTPS with this certificate (reloaded on SIGHUP); unset: HTTP.")
    operator_tokens: list[str] = Field(
        default=[],
        description="Bearer tokens (`Authorization: Bearer <token>`, at least 16 characters each) that may "
        "read `/healthz?detail=1` and `/metrics` when `auth.mode` is `sigv4`, for browsers and Prometheus, "
        "which cannot sign requests; a valid SigV4 signature works too.",
    )

    @field_validator("operator_tokens")
    @classmethod
    def _tokens(cls, v: list[str]) -> list[str]:
        if any(len(t) < 16 for t in v):
            raise ValueError("each operator token must be at least 16 characters")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT, got {v!r}")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9-]{1,32}", v):
            raise ValueError(f"must be a region name such as us-east-1, got {v!r}")
        return v

    @field_validator("account_id")
    @classmethod
    def _account(cls, v: str) -> str:
        if not re.fullmatch(r"\d{12}", v):
            raise ValueError(f"must be 12 digits, got {v!r}")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class BufferingConfig(StrictModel):
    """Firehose's BufferingHints: a batch is delivered once its records reach ``size_mib`` or
    ``interval_secs`` after its first record, whichever comes first. The ranges and defaults are
    the destination's (see the table below)."""

    size_mib: int | None = Field(
        default=None,
        description="MiB of records that fill a batch; unset: the destination's default (Firehose: "
        "BufferingHints.SizeInMBs). With format conversion 128 by default and at least 64.",
    )
    interval_secs: int | None = Field(
        default=None,
        description="Seconds after its first record a batch is delivered even if not full; unset: the "
        "destination's default (Firehose: BufferingHints.IntervalInSeconds). 0 delivers at once.",
    )


class SpoolConfig(StrictModel):
    """The stream's spool on disk (under ``<data_dir>/spool``): records are written there before
    they are acknowledged and stay until delivered."""

    fsync: Literal["always", "interval", "never"] = Field(
        default="always",
        description="When the spool is fsynced: `always` before every acknowledgement (nothing acknowledged "
        "is lost in a power failure); `interval` every `fsync_interval_ms` (a power failure can lose what "
        "arrived since); `never` leaves it to the OS.",
    )
    fsync_interval_ms: int = Field(
        default=200, ge=1, le=60_000,
        description="Milliseconds between fsyncs with `fsync: interval`.",
    )
    max_size_mib: int = Field(
        default=1024, ge=1,
        description="MiB the spool may hold; at the cap, ingest answers HTTP 503 ServiceUnavailableException "
        "and sources stop reading (back-pressure: nothing is dropped).",
    )
    segment_size_mib: int = Field(
        default=64, ge=1, le=1024,
        description="MiB of one spool segment file; a segment is deleted once everything in it is delivered.",
    )


class DeliveryConfig(StrictModel):
    """How the delivery runner treats this stream's destination."""

    max_in_flight: int = Field(
        default=2, ge=1, le=64,
        description="Batches being delivered at once; memory holds the open buffer plus `max_in_flight + 1` "
        "batches.",
    )
    retry_initial_backoff_ms: int = Field(
        default=500, ge=1,
        description="Milliseconds before the first retry of a failed delivery; each further retry doubles it "
        "(with jitter), up to `retry_max_backoff_ms`.",
    )
    retry_max_backoff_ms: int = Field(
        default=30_000, ge=1,
        description="Milliseconds between retries at most. s3 and local deliveries are retried without "
        "limit; the other destinations until their `retry_duration_secs` runs out.",
    )


class DynamicPartitioningConfig(StrictModel):
    """Firehose's DynamicPartitioningConfiguration, without its fixed limits: the active-partition
    cap is a configurable guard, and ``memory_budget_mib`` bounds what open partition buffers hold
    in memory (beyond it, buffers are kept on disk or flushed early)."""

    enabled: bool = Field(
        default=False,
        description="Records go to prefixes built from their own keys, `!{partitionKeyFromQuery:k}` and "
        "`!{partitionKeyFromLambda:k}` in the destination's `prefix` (Firehose: "
        "DynamicPartitioningConfiguration.Enabled).",
    )
    max_active_partitions: int = Field(
        default=500, ge=1,
        description="Partitions (open buffers plus undelivered batches) at most; records of further "
        "partitions are archived as `activePartitionExceeded`. A guard, not Firehose's fixed 500.",
    )
    retry_duration_secs: int = Field(
        default=300, ge=0, le=7200,
        description="Seconds a failing prefix is retried before its records are archived as "
        "`delivery-failed` (Firehose: DynamicPartitioningConfiguration.RetryOptions.DurationInSeconds).",
    )
    memory_budget_mib: int = Field(
        default=64, ge=1,
        description="MiB open partition buffers may hold in memory; past it the largest are kept on disk "
        "only, and if that is not enough the fullest are delivered early.",
    )


class StreamConfig(StrictModel):
    """One delivery stream: where its records come from, what is done to them and where they are
    delivered."""

    name: str = Field(
        description="The stream's name, `[a-zA-Z0-9_.-]{1,64}`, unique in the file (Firehose: "
        "DeliveryStreamName).",
    )
    buffering: BufferingConfig = Field(
        default=BufferingConfig(),
        description="When a batch is delivered (Firehose: BufferingHints).",
    )
    spool: SpoolConfig = Field(default=SpoolConfig(), description="The stream's spool on disk.")
    delivery: DeliveryConfig = Field(
        default=DeliveryConfig(),
        description="Concurrency and retry backoff of deliveries.",
    )
    processing: list[Any] = Field(
        default=[],
        description="Processors, each chosen by its `type`; they run in Firehose's fixed order whatever "
        "their order here (Firehose: ProcessingConfiguration.Processors).",
    )
    backup: Any = Field(
        default=None,
        description="Where failed records (with `mode: all`, every record) are archived; required for "
        "opensearch, splunk and http_endpoint (Firehose: S3BackupMode and S3BackupConfiguration or "
        "S3Configuration).",
    )
    format: Any = Field(
        default=None,
        description="Record format conversion of JSON records to Parquet, ORC or Avro (Firehose: "
        "DataFormatConversionConfiguration); s3 and local destinations only.",
    )
    dynamic_partitioning: DynamicPartitioningConfig | None = Field(
        default=None,
        description="Firehose's dynamic partitioning (DynamicPartitioningConfiguration); unset: off.",
    )
    quotas: QuotasConfig | None = Field(
        default=None, description="Throughput quotas of PutRecord and PutRecordBatch (Firehose's Direct PUT "
        "limits); over one, a request is answered 503 \"Slow down.\" whole. Unset: none.")
    sources: list[Any] = Field(
        default=[],
        description="Where records come from besides the Firehose API, which every DirectPut stream has; a "
        "`kinesis` source must be the only one and turns Direct PUT off (Firehose: DeliveryStreamType).",
    )
    destination: Any = Field(
        description="Where batches are delivered, chosen by its `type` (Firehose: the stream's destination "
        "configuration).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not STREAM_NAME_RE.fullmatch(v):
            raise ValueError(f"must match [a-zA-Z0-9_.-]{{1,64}} (Firehose's stream name rule), got {v!r}")
        return v

    @property
    def stream_type(self) -> str:
        """Firehose's DeliveryStreamType: what the stream's sources make it."""
        for source in self.sources:
            return str(source.stream_type)
        return "DirectPut"

    @property
    def partitioned(self) -> bool:
        return self.dynamic_partitioning is not None and self.dynamic_partitioning.enabled

    @property
    def size_bytes(self) -> int:
        assert self.buffering.size_mib is not None
        return self.buffering.size_mib << 20

    @property
    def interval_secs(self) -> int:
        assert self.buffering.interval_secs is not None
        return self.buffering.interval_secs

    def fingerprint(self) -> str:
        """A stable digest of everything that shapes the stream's output; a change bumps VersionId."""
        import hashlib

        import orjson

        doc = self.model_dump(mode="json")
        if doc.get("dynamic_partitioning") is None:
            del doc["dynamic_partitioning"]  # absent: the digest of configs written before it existed
        # Where records come from does not shape the output (Firehose bumps VersionId only for
        # destination updates); a changed source still restarts the stream on reload, a changed
        # quota does not.
        del doc["sources"]
        del doc["quotas"]  # nor how fast they may come
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class DaemonConfig(StrictModel):
    """The config file: the API the daemon serves, where it keeps its state, and its streams."""

    api: ApiConfig = Field(default=ApiConfig(), description="The Firehose API the daemon serves.")
    data_dir: str = Field(
        default="./var/firehose",
        description="Directory of the daemon's state: spools in `<data_dir>/spool`, each stream's VersionId "
        "and tags in `<data_dir>/streams`. Relative paths are from the working directory.",
    )
    shutdown_timeout_secs: int = Field(
        default=30, ge=1, le=3600,
        description="Seconds SIGTERM waits for open buffers to be delivered; what is left stays in the spool "
        "for the next start.",
    )
    streams: list[StreamConfig] = Field(default=[], description="The delivery streams.")
    cluster: ClusterConfig | None = Field(
        default=None,
        description="Cluster mode: every stream's log in NATS JetStream, shared by several daemons "
        "(docs/cluster.md). Absent: the local spool.",
    )
    source: str = Field(
        default=DEFAULT_CONFIG_NAME, exclude=True,
        description="Not a config key: the file the config was read from, set by the loader.",
    )
    # What parse_config deferred (see RuntimeCheck); None for a config not read from a file.
    _checks: tuple[RuntimeCheck, ...] | None = PrivateAttr(default=None)

    def stream(self, name: str) -> StreamConfig | None:
        for s in self.streams:
            if s.name == name:
                return s
        return None


def parse_config(data: Any, file: str, lines: Mapping[Path, int] | None = None) -> DaemonConfig:
    """Validate already-loaded config data. Raises :class:`ConfigError` listing every problem.

    One problem does not hide another: the top level and each stream are validated separately,
    and within a stream the destination, sources, processors, backup and format are each
    checked even when a sibling is invalid. Only checks that span fields (buffering limits of
    the destination, format and partitioning rules) wait for the fields they read.
    """
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{file}:1: the top level must be a mapping (api, data_dir, streams, ...)"])
    errors: list[str] = []
    checks: list[RuntimeCheck] = []
    raw_streams = data.get("streams", [])
    # A streams value that is not a list is reported by the top-level pass (pydantic's message).
    top = {k: v for k, v in data.items() if k != "streams" or not isinstance(raw_streams, list)}
    cfg: DaemonConfig | None = None
    try:
        cfg = DaemonConfig.model_validate({**top, "source": file})
    except ValidationError as exc:
        _collect(exc, (), file, lines, errors)
    streams: list[StreamConfig] = []
    index: dict[str, int] = {}
    for i, raw in enumerate(raw_streams if isinstance(raw_streams, list) else []):
        at = _At(("streams", i), file, lines, errors, checks)
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str):
            if name in index:
                at.error(at.base + ("name",), f"duplicate stream name {name!r} (also streams[{index[name]}])")
            index.setdefault(name, i)
        resolved = _resolve_stream(raw, at)
        if resolved is not None:
            streams.append(resolved)
        if data.get("cluster") is not None:
            for path, message in cluster_problems(raw):
                at.error(at.base + path, message)
    if errors or cfg is None:
        raise ConfigError(errors, checks=checks)
    out = cfg.model_copy(update={"streams": streams})
    out._checks = tuple(checks)
    return out


class _At:
    """Where a stream's problems are reported: its path, the file and its line map, and the
    lists that collect errors and deferred checks."""

    def __init__(
        self, base: Path, file: str, lines: Mapping[Path, int], errors: list[str], checks: list[RuntimeCheck]
    ) -> None:
        self.base = base
        self.file = file
        self.lines = lines
        self.errors = errors
        self.checks = checks

    def where(self, path: Path, line_of: Path | None = None) -> str:
        """``file:line: field``; the line is that of ``line_of`` when given (a related key)."""
        line = _line_for(line_of if line_of is not None else path, self.lines)
        return f"{self.file}:{line}: {format_path(path)}" if line is not None else f"{self.file}: {format_path(path)}"

    def error(self, path: Path, message: str, line_of: Path | None = None) -> None:
        self.errors.append(f"{self.where(path, line_of)}: {message}")

    def collect(self, exc: ValidationError, path: Path) -> None:
        _collect(exc, path, self.file, self.lines, self.errors)

    def defer(self, kind: Literal["handler", "schema"], stream: str, path: Path, target: Any) -> None:
        self.checks.append(RuntimeCheck(kind, stream, self.file, self.where(path), target))


def _resolve_stream(raw: Any, at: _At) -> StreamConfig | None:
    """One stream: its own fields, then every typed part; None when anything is invalid."""
    before = len(at.errors)
    shell, broken = _stream_shell(raw, at)
    if shell is None:
        return None
    partitioned = shell.partitioned
    if "dynamic_partitioning" in broken:  # judge the destination's prefix by what was meant
        dp = raw.get("dynamic_partitioning")
        partitioned = isinstance(dp, dict) and dp.get("enabled") is True
    dest = None if "destination" in broken else _resolve_destination(shell, partitioned, at)
    buffering = None
    if dest is not None and "buffering" not in broken:
        buffering = _resolve_buffering(shell, dest, at)
    sources = _resolve_sources(shell, at)
    procs = _resolve_processing(shell, at)
    backup = _resolve_backup(shell, dest, at)
    fmt, buffering = _resolve_format(shell, dest, buffering, raw.get("buffering"), at)
    if len(at.errors) > before or dest is None or buffering is None:
        return None
    stream = shell.model_copy(update={
        "destination": dest, "buffering": buffering, "sources": sources, "processing": procs,
        "backup": backup, "format": fmt,
    })
    if not _check_partitioning(stream, procs, at.base, at.file, at.lines, at.errors):
        return None
    return stream


def _stream_shell(raw: Any, at: _At) -> tuple[StreamConfig | None, set[str]]:
    """The stream's own fields. When some are invalid (reported here), they are replaced by
    their defaults so the stream's other parts can still be checked; ``broken`` names them."""
    try:
        return StreamConfig.model_validate(raw), set()
    except ValidationError as exc:
        at.collect(exc, at.base)
        broken = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
    if not isinstance(raw, dict):
        return None, broken
    patched = {k: v for k, v in raw.items() if k not in broken}
    if "name" in broken:
        patched["name"] = "invalid-name"
    if "destination" in broken:
        patched["destination"] = None
    try:
        return StreamConfig.model_validate(patched), broken
    except ValidationError:
        return None, broken


def _resolve_destination(stream: StreamConfig, partitioned: bool, at: _At) -> DestinationConfig | None:
    raw = stream.destination
    dpath = at.base + ("destination",)
    if not isinstance(raw, dict):
        at.error(dpath, "must be a mapping with a 'type' field")
        return None
    type_name = raw.get("type")
    if not isinstance(type_name, str):
        at.error(dpath + ("type",), "required field is missing", line_of=dpath)
        return None
    try:
        cls = destination_config_class(type_name)
    except (UnknownTypeError, PluginError) as exc:
        at.error(dpath + ("type",), str(exc))
        return None
    try:
        return cls.model_validate(raw, context={"dynamic_partitioning": partitioned})
    except ValidationError as exc:
        at.collect(exc, dpath)
        return None


def _resolve_buffering(stream: StreamConfig, dest: Any, at: _At) -> BufferingConfig | None:
    """The stream's buffering hints, defaulted and bounded by its destination's limits."""
    limits: BufferingLimits = dest.buffering_limits()
    size = stream.buffering.size_mib
    interval = stream.buffering.interval_secs
    bpath = at.base + ("buffering",)
    ok = True
    if size is None:
        size = limits.default_size_mib
    elif not limits.min_size_mib <= size <= limits.max_size_mib:
        at.error(bpath + ("size_mib",), f"must be between {limits.min_size_mib} and {limits.max_size_mib} "
                 f"for a {dest.type} destination, got {size}")
        ok = False
    if interval is None:
        interval = limits.default_interval_secs
    elif not limits.min_interval_secs <= interval <= limits.max_interval_secs:
        at.error(bpath + ("interval_secs",), f"must be between {limits.min_interval_secs} and "
                 f"{limits.max_interval_secs} for a {dest.type} destination, got {interval}")
        ok = False
    return BufferingConfig(size_mib=size, interval_secs=interval) if ok else None


def _validate_typed(
    items: list[Any], class_for: Callable[[str], type[_Config]], path: Path, file: str, lines: Mapping[Path, int],
    errors: list[str], positions: list[int] | None = None,
) -> tuple[list[_Config], bool]:
    """Validate a list of ``type:``-keyed items (sources, processors) through their registry
    lookup ``class_for``; returns the config objects and whether every item was valid. The
    position of each object in ``items`` is appended to ``positions`` when given."""
    ok = True
    out: list[_Config] = []
    for j, raw in enumerate(items):
        ipath = path + (j,)
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            errors.append(f"{file}:{_line_for(ipath, lines)}: {format_path(ipath)}: must be a mapping with a 'type' field")
            ok = False
            continue
        try:
            out.append(class_for(raw["type"]).model_validate(raw))
            if positions is not None:
                positions.append(j)
        except (UnknownTypeError, PluginError) as exc:
            errors.append(f"{file}:{_line_for(ipath + ('type',), lines)}: {format_path(ipath)}.type: {exc}")
            ok = False
        except ValidationError as exc:
            _collect(exc, ipath, file, lines, errors)
            ok = False
    return out, ok


def _resolve_sources(stream: StreamConfig, at: _At) -> list[SourceConfig]:
    """Validate ``sources:`` items through the source registry. A source whose config class says
    ``exclusive`` (Kinesis: Firehose's KinesisStreamAsSource) must be the stream's only one."""
    from firehose.registry import source_config_class

    resolved, ok = _validate_typed(stream.sources, source_config_class, at.base + ("sources",), at.file,
                                   at.lines, at.errors)
    if ok and len(resolved) > 1:
        for j, source in enumerate(resolved):
            if source.exclusive:
                at.error(at.base + ("sources", j), f"a {source.type} source cannot be mixed with other sources "
                         f"(Firehose's {source.stream_type} stream has exactly one source)")
                break
    return resolved


def _resolve_processing(stream: StreamConfig, at: _At) -> list[ProcessorConfig]:
    """Validate ``processing:`` items through the processor registry, then the rules across them.
    Each local Lambda handler is recorded for :func:`firehose.config_checks.check_handlers` (importing it runs user code)."""
    from firehose.registry import PROCESSING_CHECK, load, processor_config_class

    ppath = at.base + ("processing",)
    positions: list[int] = []
    procs, ok = _validate_typed(stream.processing, processor_config_class, ppath, at.file, at.lines, at.errors,
                                positions)
    if ok and procs:
        try:
            load(PROCESSING_CHECK)(procs)
        except ValueError as exc:
            at.error(ppath, str(exc))
    for kind, path, target in _deferred(procs, None, at.base, positions):
        at.defer(kind, stream.name, path, target)
    return procs


def _resolve_backup(stream: StreamConfig, dest: Any, at: _At) -> Any:
    from firehose.registry import BACKUP_CONFIG, load

    bpath = at.base + ("backup",)
    if stream.backup is None:
        if dest is not None and dest.requires_backup:
            # Firehose's S3Configuration of OpenSearch, Splunk and HTTP endpoints: failed records go there.
            at.error(bpath, f"required for a {dest.type} destination (where its failed records are archived)",
                     line_of=at.base + ("destination",))
        return None
    try:
        backup = load(BACKUP_CONFIG).model_validate(stream.backup)
        target = backup.destination_dict()
        destination_config_class(target["type"]).model_validate(target)
    except ValidationError as exc:
        at.collect(exc, bpath)
        return None
    return backup


def _resolve_format(
    stream: StreamConfig, dest: Any, buffering: BufferingConfig | None, raw_buffering: Any, at: _At
) -> tuple[Any, BufferingConfig | None]:
    """``format:`` and Firehose's rules for format conversion (a columnar format needs an
    uncompressed object-store destination and buffers of at least 64 MiB, 128 by default). A
    schema given inline or as a file is recorded for :func:`firehose.config_checks.check_schemas`."""
    from firehose.registry import FORMAT_CONFIG, load

    if stream.format is None:
        return None, buffering
    fpath = at.base + ("format",)
    try:
        fmt = load(FORMAT_CONFIG).model_validate(stream.format)
    except ValidationError as exc:
        at.collect(exc, fpath)
        return None, buffering
    if fmt.type == "json":
        return fmt, buffering
    for kind, path, target in _deferred([], fmt, at.base):
        at.defer(kind, stream.name, path, target)
    if dest is not None and not isinstance(dest, ObjectStoreDestinationConfig):
        at.error(fpath, "format conversion needs an s3 or local destination")
    elif dest is not None and dest.compression != "none":
        at.error(fpath, f"format conversion compresses inside the file; set "
                 f"{format_path(at.base + ('destination', 'compression'))} to none (Firehose requires "
                 f"UNCOMPRESSED), got {dest.compression!r}")
    raw_size = raw_buffering.get("size_mib") if isinstance(raw_buffering, dict) else None
    if raw_size is None:
        if buffering is not None:
            buffering = BufferingConfig(size_mib=128, interval_secs=buffering.interval_secs)
    elif type(raw_size) is int and raw_size < 64:
        at.error(at.base + ("buffering", "size_mib"), f"must be at least 64 when format conversion is enabled "
                 f"(Firehose's rule), got {raw_size}")
    return fmt, buffering


def _check_partitioning(
    stream: StreamConfig, procs: list[Any], base: Path, file: str, lines: Mapping[Path, int], errors: list[str]
) -> bool:
    """Firehose's dynamic-partitioning rules that span fields (the prefix rules are the
    destination's): keys need a source, no zero buffering, MetadataExtraction only with it on."""
    types = {p.type for p in procs}
    dpath = base + ("dynamic_partitioning",)

    def error(path: Path, message: str) -> bool:
        errors.append(f"{file}:{_line_for(path, lines)}: {format_path(path)}: {message}")
        return False

    if not stream.partitioned:
        # A destination that routes records by their metadata (Iceberg) uses the query's keys.
        if "metadata_extraction" in types and not getattr(stream.destination, "routes_by_metadata", False):
            return error(base + ("processing",), "metadata_extraction needs dynamic_partitioning.enabled: true "
                         "or an iceberg destination (Firehose's MetadataExtraction exists for them)")
        return True
    if not isinstance(stream.destination, ObjectStoreDestinationConfig):
        return error(dpath, "dynamic partitioning needs an s3 or local destination "
                     f"(got {stream.destination.type!r})")
    prefix = stream.destination.prefix
    if stream.interval_secs == 0:
        return error(base + ("buffering", "interval_secs"),
                     "zero buffering is not supported with dynamic partitioning (Firehose's rule); use 1 or more")
    from firehose.keys import partition_key_refs

    ok = True
    for ref in partition_key_refs(prefix):
        namespace, _, key = ref.partition(":")
        needs = "metadata_extraction" if namespace == "partitionKeyFromQuery" else "lambda"
        if needs not in types:
            ok = error(base + ("destination", "prefix"),
                       f"!{{{ref}}} needs a {needs} processor in processing: to produce key {key!r}")
    return ok


def _deferred(
    procs: list[Any], fmt: Any, base: Path, positions: list[int] | None = None
) -> list[tuple[Literal["handler", "schema"], Path, Any]]:
    """What a stream leaves to :func:`firehose.config_checks.run_checks`: its local Lambda handlers (at their
    ``function:`` key; ``positions`` are the processors' indexes in the file when some failed)
    and a schema given inline or as an Avro file (a Glue table is fetched when the stream starts,
    never by a check)."""
    out: list[tuple[Literal["handler", "schema"], Path, Any]] = []
    for j, proc in enumerate(procs):
        if proc.type == "lambda" and proc.function:
            at = positions[j] if positions is not None else j
            out.append(("handler", base + ("processing", at, "function"), proc.function))
    schema = fmt.schema_ if fmt is not None else None
    if schema is not None and fmt.type != "json" and schema.glue is None:
        avro = ("avro_schema",) if schema.avro_schema is not None else ()
        out.append(("schema", base + ("format", "schema", *avro), fmt))
    return out


def load_config_text(text: str, file: str, env: Mapping[str, str] | None = None) -> DaemonConfig:
    try:
        data, lines = load_yaml(text, file, env)
    except YamlError as exc:
        raise ConfigError(exc.errors) from None
    return parse_config(data, file, lines)


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Load a config file, or the embedded default when ``path`` is None."""
    if path is None:
        text = resources.files("firehose").joinpath("default.yaml").read_text(encoding="utf-8")
        return load_config_text(text, DEFAULT_CONFIG_NAME, env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    return load_config_text(text, path, env)
