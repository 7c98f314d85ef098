"""Daemon configuration: YAML -> strict, frozen, typed models.

Unknown and duplicate keys are rejected; ``${ENV}`` references are expanded (for secrets); every
error names the file, the line and the field, e.g.
``firehose.yaml:7: streams[0].buffering.size_mib: must be between 1 and 128, got 512``.
Validation happens entirely before anything starts; a config class never does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from firehose.interfaces import BufferingLimits
from firehose.registry import UnknownTypeError, destination_config_class
from firehose.yamlload import Path, YamlError, format_path, load_yaml

STREAM_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
DEFAULT_CONFIG_NAME = "<embedded default config>"


class ConfigError(ValueError):
    """An invalid config. ``errors`` lists every problem, each ``file:line: field: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AuthConfig(_Model):
    """``mode: sigv4`` verifies AWS Signature Version 4 on every API request against
    ``credentials`` (access key id -> secret; use ``${ENV}`` for secrets). ``none`` accepts any."""

    mode: Literal["none", "sigv4"] = "none"
    credentials: dict[str, str] = {}

    @field_validator("credentials")
    @classmethod
    def _creds(cls, v: dict[str, str]) -> dict[str, str]:
        for key, secret in v.items():
            if not key or not secret:
                raise ValueError("every access key id needs a non-empty secret")
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.mode == "sigv4" and not self.credentials:
            raise ValueError("mode sigv4 needs at least one entry in credentials")


class HealthConfig(_Model):
    """``GET /healthz``: a stream whose destination has failed for longer than
    ``degraded_after_secs`` makes the daemon ``degraded`` (still HTTP 200)."""

    degraded_after_secs: int = Field(default=300, ge=1, le=86400)


class ApiConfig(_Model):
    listen: str = "127.0.0.1:4573"
    region: str = "us-east-1"
    account_id: str = "000000000000"
    auth: AuthConfig = AuthConfig()
    health: HealthConfig = HealthConfig()

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


class BufferingConfig(_Model):
    size_mib: int | None = None
    interval_secs: int | None = None


class SpoolConfig(_Model):
    fsync: Literal["always", "interval", "never"] = "always"
    fsync_interval_ms: int = Field(default=200, ge=1, le=60_000)
    max_size_mib: int = Field(default=1024, ge=1)
    segment_size_mib: int = Field(default=64, ge=1, le=1024)


class DeliveryConfig(_Model):
    """How the delivery runner treats this stream's destination."""

    max_in_flight: int = Field(default=2, ge=1, le=64)
    retry_initial_backoff_ms: int = Field(default=500, ge=1)
    retry_max_backoff_ms: int = Field(default=30_000, ge=1)


class DynamicPartitioningConfig(_Model):
    """Firehose's DynamicPartitioningConfiguration, without its fixed limits: the active-partition
    cap is a configurable guard, and ``memory_budget_mib`` bounds what open partition buffers hold
    in memory (beyond it, buffers are kept on disk or flushed early)."""

    enabled: bool = False
    max_active_partitions: int = Field(default=500, ge=1)
    retry_duration_secs: int = Field(default=300, ge=0, le=7200)
    memory_budget_mib: int = Field(default=64, ge=1)


class StreamConfig(_Model):
    name: str
    buffering: BufferingConfig = BufferingConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    processing: list[Any] = []
    backup: Any = None
    format: Any = None
    dynamic_partitioning: DynamicPartitioningConfig | None = None
    sources: list[Any] = []  # besides the Firehose API, which every DirectPut stream has
    destination: Any

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
            return str(getattr(source, "stream_type", "DirectPut"))
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
        # destination updates); a changed source still restarts the stream on reload.
        del doc["sources"]
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class DaemonConfig(_Model):
    api: ApiConfig = ApiConfig()
    data_dir: str = "./var/firehose"
    shutdown_timeout_secs: int = Field(default=30, ge=1, le=3600)
    streams: list[StreamConfig] = []
    source: str = Field(default=DEFAULT_CONFIG_NAME, exclude=True)

    def stream(self, name: str) -> StreamConfig | None:
        for s in self.streams:
            if s.name == name:
                return s
        return None


def _line_for(path: Path, lines: Mapping[Path, int]) -> int | None:
    p = tuple(path)
    while True:
        if p in lines:
            return lines[p]
        if not p:
            return None
        p = p[:-1]


def _describe_error(err: Any) -> str:
    etype = err["type"]
    value = err.get("input")
    if etype == "extra_forbidden":
        return "unknown field"
    if etype == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{msg[0].lower()}{msg[1:]}, got {value!r}"
    return f"{msg[0].lower()}{msg[1:]}, got {value!r}"


def _collect(exc: ValidationError, base: Path, file: str, lines: Mapping[Path, int], out: list[str]) -> None:
    for err in exc.errors():
        path = base + tuple(err["loc"])
        line = _line_for(path, lines)
        where = f"{file}:{line}" if line is not None else file
        out.append(f"{where}: {format_path(path)}: {_describe_error(err)}")


def parse_config(data: Any, file: str, lines: Mapping[Path, int] | None = None) -> DaemonConfig:
    """Validate already-loaded config data. Raises :class:`ConfigError` listing every problem."""
    lines = lines or {}
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{file}:1: the top level must be a mapping (api, data_dir, streams, ...)"])
    try:
        cfg = DaemonConfig.model_validate({**data, "source": file})
    except ValidationError as exc:
        _collect(exc, (), file, lines, errors)
        raise ConfigError(errors) from None

    streams: list[StreamConfig] = []
    seen: dict[str, int] = {}
    for i, stream in enumerate(cfg.streams):
        base: Path = ("streams", i)
        if stream.name in seen:
            line = _line_for(base + ("name",), lines)
            errors.append(
                f"{file}:{line}: streams[{i}].name: duplicate stream name {stream.name!r} "
                f"(also streams[{seen[stream.name]}])"
            )
        seen.setdefault(stream.name, i)
        resolved = _resolve_destination(stream, base, file, lines, errors)
        if resolved is not None:
            resolved = _resolve_sources(resolved, base, file, lines, errors)
        if resolved is not None:
            raw_streams = data.get("streams") if isinstance(data, dict) else None
            raw = raw_streams[i] if isinstance(raw_streams, list) and i < len(raw_streams) else {}
            resolved = _resolve_processing(
                resolved, base, file, lines, errors, raw.get("buffering") if isinstance(raw, dict) else None
            )
        if resolved is not None:
            streams.append(resolved)
    if errors:
        raise ConfigError(errors)
    return cfg.model_copy(update={"streams": streams})


def _resolve_destination(
    stream: StreamConfig, base: Path, file: str, lines: Mapping[Path, int], errors: list[str]
) -> StreamConfig | None:
    raw = stream.destination
    dpath = base + ("destination",)
    dline = _line_for(dpath, lines)
    if not isinstance(raw, dict):
        errors.append(f"{file}:{dline}: {format_path(dpath)}: must be a mapping with a 'type' field")
        return None
    type_name = raw.get("type")
    if not isinstance(type_name, str):
        errors.append(f"{file}:{dline}: {format_path(dpath)}.type: required field is missing")
        return None
    try:
        cls = destination_config_class(type_name)
    except UnknownTypeError as exc:
        line = _line_for(dpath + ("type",), lines)
        errors.append(f"{file}:{line}: {format_path(dpath)}.type: {exc}")
        return None
    try:
        dest: Any = cls.model_validate(raw, context={"dynamic_partitioning": stream.partitioned})  # type: ignore[attr-defined]
    except ValidationError as exc:
        _collect(exc, dpath, file, lines, errors)
        return None
    limits: BufferingLimits = dest.buffering_limits()
    size = stream.buffering.size_mib
    interval = stream.buffering.interval_secs
    ok = True
    bpath = base + ("buffering",)
    if size is None:
        size = limits.default_size_mib
    elif not limits.min_size_mib <= size <= limits.max_size_mib:
        line = _line_for(bpath + ("size_mib",), lines)
        errors.append(
            f"{file}:{line}: {format_path(bpath)}.size_mib: must be between {limits.min_size_mib} and "
            f"{limits.max_size_mib} for a {type_name} destination, got {size}"
        )
        ok = False
    if interval is None:
        interval = limits.default_interval_secs
    elif not limits.min_interval_secs <= interval <= limits.max_interval_secs:
        line = _line_for(bpath + ("interval_secs",), lines)
        errors.append(
            f"{file}:{line}: {format_path(bpath)}.interval_secs: must be between {limits.min_interval_secs} "
            f"and {limits.max_interval_secs} for a {type_name} destination, got {interval}"
        )
        ok = False
    if not ok:
        return None
    return stream.model_copy(
        update={"destination": dest, "buffering": BufferingConfig(size_mib=size, interval_secs=interval)}
    )


def _validate_typed(
    items: list[Any], class_for: Callable[[str], type], path: Path, file: str, lines: Mapping[Path, int],
    errors: list[str],
) -> tuple[list[Any], bool]:
    """Validate a list of ``type:``-keyed items (sources, processors) through their registry
    lookup ``class_for``; returns the config objects and whether every item was valid."""
    ok = True
    out: list[Any] = []
    for j, raw in enumerate(items):
        ipath = path + (j,)
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            errors.append(f"{file}:{_line_for(ipath, lines)}: {format_path(ipath)}: must be a mapping with a 'type' field")
            ok = False
            continue
        try:
            out.append(class_for(raw["type"]).model_validate(raw))  # type: ignore[attr-defined]
        except UnknownTypeError as exc:
            errors.append(f"{file}:{_line_for(ipath + ('type',), lines)}: {format_path(ipath)}.type: {exc}")
            ok = False
        except ValidationError as exc:
            _collect(exc, ipath, file, lines, errors)
            ok = False
    return out, ok


def _resolve_sources(
    stream: StreamConfig, base: Path, file: str, lines: Mapping[Path, int], errors: list[str]
) -> StreamConfig | None:
    """Validate ``sources:`` items through the source registry. A source whose config class says
    ``exclusive`` (Kinesis: Firehose's KinesisStreamAsSource) must be the stream's only one."""
    from firehose.registry import source_config_class

    resolved, ok = _validate_typed(stream.sources, source_config_class, base + ("sources",), file, lines, errors)
    if ok and len(resolved) > 1:
        for j, source in enumerate(resolved):
            if getattr(source, "exclusive", False):
                spath = base + ("sources", j)
                errors.append(
                    f"{file}:{_line_for(spath, lines)}: {format_path(spath)}: a {source.type} source cannot be "
                    f"mixed with other sources (Firehose's {source.stream_type} stream has exactly one source)"
                )
                ok = False
                break
    if not ok:
        return None
    return stream.model_copy(update={"sources": resolved})


def _resolve_processing(
    stream: StreamConfig, base: Path, file: str, lines: Mapping[Path, int], errors: list[str],
    raw_buffering: Any = None,
) -> StreamConfig | None:
    """Validate ``processing:`` items through the processor registry and ``backup:``."""
    from firehose.registry import BACKUP_CONFIG, PROCESSING_CHECK, load, processor_config_class

    procs, ok = _validate_typed(
        stream.processing, processor_config_class, base + ("processing",), file, lines, errors
    )
    if ok and procs:
        try:
            load(PROCESSING_CHECK)(procs)
        except ValueError as exc:
            errors.append(f"{file}:{_line_for(base + ('processing',), lines)}: {format_path(base + ('processing',))}: {exc}")
            ok = False
    backup = None
    if stream.backup is not None:
        bpath = base + ("backup",)
        try:
            backup = load(BACKUP_CONFIG).model_validate(stream.backup)
            dest = backup.destination_dict()
            destination_config_class(dest["type"]).model_validate(dest)  # type: ignore[attr-defined]
        except ValidationError as exc:
            _collect(exc, bpath, file, lines, errors)
            ok = False
    elif getattr(stream.destination, "requires_backup", False):
        # Firehose's S3Configuration of OpenSearch, Splunk and HTTP endpoints: failed records go there.
        errors.append(f"{file}:{_line_for(base + ('destination',), lines)}: {format_path(base + ('backup',))}: "
                      f"required for a {stream.destination.type} destination (where its failed records are archived)")
        ok = False
    fmt = None
    if stream.format is not None:
        from firehose.registry import FORMAT_CONFIG

        fpath = base + ("format",)
        try:
            fmt = load(FORMAT_CONFIG).model_validate(stream.format)
        except ValidationError as exc:
            _collect(exc, fpath, file, lines, errors)
            ok = False
        if fmt is not None and fmt.type != "json":
            dest = stream.destination
            where = f"{file}:{_line_for(fpath, lines)}: {format_path(fpath)}"
            if getattr(dest, "type", None) not in ("s3", "local"):
                errors.append(f"{where}: format conversion needs an s3 or local destination")
                ok = False
            elif dest.compression != "none":
                errors.append(
                    f"{where}: format conversion compresses inside the file; set "
                    f"{format_path(base + ('destination', 'compression'))} to none (Firehose requires UNCOMPRESSED), "
                    f"got {dest.compression!r}"
                )
                ok = False
            raw_size = (raw_buffering or {}).get("size_mib") if isinstance(raw_buffering, dict) else None
            if raw_size is None:
                stream = stream.model_copy(update={"buffering": BufferingConfig(
                    size_mib=128, interval_secs=stream.buffering.interval_secs)})
            elif raw_size < 64:
                line = _line_for(base + ("buffering", "size_mib"), lines)
                errors.append(
                    f"{file}:{line}: {format_path(base + ('buffering', 'size_mib'))}: must be at least 64 when "
                    f"format conversion is enabled (Firehose's rule), got {raw_size}"
                )
                ok = False
    if ok:
        ok = _check_partitioning(stream, procs, base, file, lines, errors)
    if not ok:
        return None
    return stream.model_copy(update={"processing": procs, "backup": backup, "format": fmt})


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
        if "metadata_extraction" in types:
            return error(base + ("processing",), "metadata_extraction needs dynamic_partitioning.enabled: true "
                         "(Firehose's MetadataExtraction exists for dynamic partitioning)")
        return True
    prefix = getattr(stream.destination, "prefix", None)
    if not isinstance(prefix, str) or not hasattr(stream.destination, "object_key"):
        return error(dpath, "dynamic partitioning needs an s3 or local destination "
                     f"(got {getattr(stream.destination, 'type', '?')!r})")
    if stream.interval_secs == 0:
        return error(base + ("buffering", "interval_secs"),
                     "zero buffering is not supported with dynamic partitioning (Firehose's rule); use 1 or more")
    from firehose.destinations.keys import partition_key_refs

    ok = True
    for ref in partition_key_refs(prefix):
        namespace, _, key = ref.partition(":")
        needs = "metadata_extraction" if namespace == "partitionKeyFromQuery" else "lambda"
        if needs not in types:
            ok = error(base + ("destination", "prefix"),
                       f"!{{{ref}}} needs a {needs} processor in processing: to produce key {key!r}")
    return ok


def load_config_text(text: str, file: str, env: Mapping[str, str] | None = None) -> DaemonConfig:
    try:
        data, lines = load_yaml(text, file, env)
    except YamlError as exc:
        raise ConfigError([str(exc)]) from None
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
