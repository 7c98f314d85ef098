"""Firehose's CreateDeliveryStream and UpdateDestination request shapes, mapped onto the YAML model.

The API's shapes (botocore's service model) become the same stream document a user writes in
YAML, which the config loader then validates like any other: one model, one set of checks, one
set of error messages. Every member is either mapped or refused with InvalidArgumentException
naming it; none is dropped without a word. Members that concern AWS's own plumbing and change
nothing here are accepted: ``RoleARN`` (there is no IAM role to assume; the daemon's credentials
are used), CloudWatch logging that is disabled, and encryption that is ``NoEncryption``.

Supported: ``DeliveryStreamType`` ``DirectPut``, and ``KinesisStreamAsSource`` with its
``KinesisStreamSourceConfiguration`` (read from LATEST, as Firehose starts);
``ExtendedS3DestinationConfiguration`` and ``S3DestinationConfiguration`` (bucket, prefixes,
buffering hints, compression, file extension, processing with Lambda, AppendDelimiterToRecord,
MetadataExtraction and RecordDeAggregation, dynamic partitioning);
``RedshiftDestinationConfiguration`` (``jdbc:redshift://`` with COPY from the S3 staging bucket and
the RoleARN as IAM_ROLE, ``jdbc:postgresql://`` with COPY FROM STDIN);
``HttpEndpointDestinationConfiguration``, ``SplunkDestinationConfiguration`` and
``AmazonopensearchserviceDestinationConfiguration`` (a ``ClusterEndpoint``, signed with SigV4 and
the daemon's credentials as Firehose signs with its role), each with its S3 backup
(``S3Configuration``, ``S3BackupMode``), retry options, buffering hints and processing; ``Tags``;
the matching ``...DestinationUpdate`` members of UpdateDestination. Refused by name: the
Elasticsearch, Snowflake, Iceberg and OpenSearch Serverless destinations, MSK sources, data
format conversion, S3 backups of the S3 and Redshift destinations, VPC and Secrets Manager
options, KMS encryption of the destination. S3 endpoints and credentials come from the standard
AWS configuration (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, profiles, the credential chain),
as any AWS SDK finds them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from firehose.models import StrictModel

__all__ = ["S3Defaults", "ShapeError", "apply_s3_defaults", "destination_update", "stream_from_create"]


class S3Defaults(StrictModel):
    """What API-created streams use to reach S3 (their destination bucket, backup or staging)
    instead of the standard AWS configuration; each field left out still comes from it."""

    endpoint_url: str | None = Field(default=None, description="An S3-compatible server's URL.")
    region: str | None = Field(default=None, description="The buckets' region (default: `api.region`).")
    access_key_id: str | None = Field(default=None, description="The access key id.")
    secret_access_key: str | None = Field(default=None, description="The secret access key (write it as `${ENV}`).")


def apply_s3_defaults(stream: dict[str, Any], defaults: S3Defaults | None) -> dict[str, Any]:
    """``stream`` with ``defaults`` filled in wherever it reaches S3."""
    if defaults is None:
        return stream
    values = {k: v for k, v in defaults.model_dump().items() if v is not None}
    out = dict(stream)
    destination = dict(out["destination"])
    if destination.get("type") == "s3":
        destination.update(values)
    if isinstance(destination.get("staging"), dict):
        destination["staging"] = {**destination["staging"], **values}
    out["destination"] = destination
    if isinstance(out.get("backup"), dict) and "bucket" in out["backup"]:
        out["backup"] = {**out["backup"], **values}
    return out


class ShapeError(ValueError):
    """A request member this daemon does not support, or a malformed one (InvalidArgumentException)."""


_DESTINATIONS = ("ExtendedS3DestinationConfiguration", "S3DestinationConfiguration",
                 "RedshiftDestinationConfiguration", "ElasticsearchDestinationConfiguration",
                 "AmazonopensearchserviceDestinationConfiguration", "SplunkDestinationConfiguration",
                 "HttpEndpointDestinationConfiguration", "AmazonOpenSearchServerlessDestinationConfiguration",
                 "SnowflakeDestinationConfiguration", "IcebergDestinationConfiguration")
_CREATE_MEMBERS = {"DeliveryStreamName", "DeliveryStreamType", "Tags", "DeliveryStreamEncryptionConfigurationInput",
                   "KinesisStreamSourceConfiguration", "MSKSourceConfiguration", "DirectPutSourceConfiguration",
                   *_DESTINATIONS}
_S3_MEMBERS = {"RoleARN", "BucketARN", "Prefix", "ErrorOutputPrefix", "BufferingHints", "CompressionFormat",
               "EncryptionConfiguration", "CloudWatchLoggingOptions"}
_EXTENDED_MEMBERS = _S3_MEMBERS | {"ProcessingConfiguration", "S3BackupMode", "DynamicPartitioningConfiguration",
                                   "FileExtension", "DataFormatConversionConfiguration", "S3BackupConfiguration",
                                   "CustomTimeZone"}


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(f"{where} must be a structure")
    return value


def _refuse_unknown(conf: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(conf) - known)
    if extra:
        raise ShapeError(f"{where}.{extra[0]} is not supported by this daemon")


def stream_from_create(doc: dict[str, Any], region: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """The YAML stream document, the tags and the destination request members (kept, so that an
    UpdateDestination can merge into them) of a CreateDeliveryStream request."""
    _refuse_unknown(doc, _CREATE_MEMBERS, "CreateDeliveryStream")
    stype = doc.get("DeliveryStreamType", "DirectPut")
    if stype not in ("DirectPut", "KinesisStreamAsSource"):
        raise ShapeError(f"DeliveryStreamType {stype!r} is not supported by the control plane (DirectPut and "
                         "KinesisStreamAsSource are)")
    if doc.get("MSKSourceConfiguration") is not None:
        raise ShapeError("MSKSourceConfiguration is not supported by this daemon")
    sources = _kinesis_source(doc) if stype == "KinesisStreamAsSource" else []
    if stype == "DirectPut" and doc.get("KinesisStreamSourceConfiguration") is not None:
        raise ShapeError("KinesisStreamSourceConfiguration needs DeliveryStreamType KinesisStreamAsSource")
    given = [d for d in _DESTINATIONS if d in doc]
    if len(given) != 1:
        raise ShapeError("exactly one destination configuration is required" if not given
                         else f"only one destination configuration may be given, not {', '.join(given)}")
    which = given[0]
    conf = _obj(doc[which], which)
    if which == "RedshiftDestinationConfiguration":
        stream = {"name": doc.get("DeliveryStreamName"), **_redshift_stream(conf, which, region)}
    elif which in _REMOTE:
        stream = {"name": doc.get("DeliveryStreamName"), **_remote_stream(conf, which, region)}
    elif which in ("ExtendedS3DestinationConfiguration", "S3DestinationConfiguration"):
        stream = {"name": doc.get("DeliveryStreamName"), **_s3_stream(conf, which, region)}
    else:
        raise ShapeError(f"{which} is not supported by the control plane (the S3, Redshift, HTTP endpoint, "
                         "Splunk and OpenSearch destinations are; others are configured in the YAML file)")
    if sources:
        stream["sources"] = sources
    tags = {}
    for i, tag in enumerate(doc.get("Tags") or []):
        tag = _obj(tag, f"Tags[{i}]")
        if not isinstance(tag.get("Key"), str) or not isinstance(tag.get("Value", ""), str):
            raise ShapeError(f"Tags[{i}] needs a string Key and Value")
        tags[tag["Key"]] = tag.get("Value", "")
    return stream, tags, {which: conf}


def _kinesis_source(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A Kinesis Data Streams source: read from LATEST, as Firehose starts; the Kinesis endpoint
    and credentials come from the standard AWS configuration (``AWS_ENDPOINT_URL_KINESIS``...)."""
    conf = doc.get("KinesisStreamSourceConfiguration")
    if conf is None:
        raise ShapeError("KinesisStreamSourceConfiguration is required with DeliveryStreamType KinesisStreamAsSource")
    conf = _obj(conf, "KinesisStreamSourceConfiguration")
    _refuse_unknown(conf, {"KinesisStreamARN", "RoleARN"}, "KinesisStreamSourceConfiguration")
    if not isinstance(conf.get("KinesisStreamARN"), str):
        raise ShapeError("KinesisStreamSourceConfiguration.KinesisStreamARN is required")
    return [{"type": "kinesis", "stream_arn": conf["KinesisStreamARN"], "initial_position": "latest"}]


_UPDATES = {"RedshiftDestinationUpdate": "RedshiftDestinationConfiguration",
            "ExtendedS3DestinationUpdate": "ExtendedS3DestinationConfiguration",
            "S3DestinationUpdate": "S3DestinationConfiguration",
            "HttpEndpointDestinationUpdate": "HttpEndpointDestinationConfiguration",
            "SplunkDestinationUpdate": "SplunkDestinationConfiguration",
            "AmazonopensearchserviceDestinationUpdate": "AmazonopensearchserviceDestinationConfiguration"}


def destination_update(name: str, request: dict[str, Any], doc: dict[str, Any],
                       region: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The YAML stream document and destination request members after UpdateDestination: the
    members the update gives replace those of ``request`` (what the stream was created or last
    updated with), the others stay. The destination keeps its kind (S3 and extended S3 mix)."""
    given = [k for k in doc if k.endswith("DestinationUpdate")]
    if len(given) != 1 or given[0] not in _UPDATES:
        raise ShapeError(f"{(given or ['a destination update'])[0] if len(given) <= 1 else given[1]} is not "
                         "supported by the control plane (one of " + ", ".join(_UPDATES) + " is)")
    which = given[0]
    kind = _UPDATES[which]
    current_kind, current = next(iter(request.items()), (kind, {}))
    s3_kinds = {"ExtendedS3DestinationConfiguration", "S3DestinationConfiguration"}
    if current_kind != kind and not {current_kind, kind} <= s3_kinds:
        raise ShapeError(f"{which} does not apply to this stream's destination ({current_kind})")
    merged = dict(current)
    update = dict(_obj(doc[which], which))
    if "S3Update" in update:  # the backup bucket of the HTTP endpoint, Splunk and OpenSearch destinations
        merged["S3Configuration"] = {**(merged.get("S3Configuration") or {}), **_obj(update.pop("S3Update"), "S3Update")}
    merged.update(update)
    build = _redshift_stream if kind == "RedshiftDestinationConfiguration" else \
        _remote_stream if kind in _REMOTE else _s3_stream
    return {"name": name, **build(merged, kind, region)}, {kind: merged}


def _s3_stream(conf: dict[str, Any], which: str, region: str) -> dict[str, Any]:
    extended = which == "ExtendedS3DestinationConfiguration"
    _refuse_unknown(conf, _EXTENDED_MEMBERS if extended else _S3_MEMBERS, which)
    bucket = conf.get("BucketARN")
    if not isinstance(bucket, str):
        raise ShapeError(f"{which}.BucketARN is required")
    destination: dict[str, Any] = {"type": "s3", "bucket": bucket, "region": region}
    for member, field in (("Prefix", "prefix"), ("ErrorOutputPrefix", "error_output_prefix"),
                          ("CompressionFormat", "compression"), ("FileExtension", "file_extension")):
        if conf.get(member) is not None:
            destination[field] = conf[member]
    _plumbing(conf, which)
    stream: dict[str, Any] = {"destination": destination}
    stream.update(_buffering(conf, which))
    if extended:
        stream.update(_extended(conf, which))
    return stream


def _buffering(conf: dict[str, Any], which: str) -> dict[str, Any]:
    hints = conf.get("BufferingHints")
    if hints is None:
        return {}
    hints = _obj(hints, f"{which}.BufferingHints")
    _refuse_unknown(hints, {"SizeInMBs", "IntervalInSeconds"}, f"{which}.BufferingHints")
    return {"buffering": {k: hints[m] for m, k in (("SizeInMBs", "size_mib"), ("IntervalInSeconds", "interval_secs"))
                          if m in hints}}


def _plumbing(conf: dict[str, Any], which: str) -> None:
    logging = conf.get("CloudWatchLoggingOptions")
    if logging is not None and _obj(logging, f"{which}.CloudWatchLoggingOptions").get("Enabled"):
        raise ShapeError(f"{which}.CloudWatchLoggingOptions.Enabled is not supported: the daemon logs to its "
                         "own log and exports metrics at /metrics")
    encryption = conf.get("EncryptionConfiguration")
    if encryption is not None and _obj(encryption, f"{which}.EncryptionConfiguration").get(
            "NoEncryptionConfig", "NoEncryption") != "NoEncryption" or (
            isinstance(encryption, dict) and "KMSEncryptionConfig" in encryption):
        raise ShapeError(f"{which}.EncryptionConfiguration with KMS is not supported (NoEncryption is)")


def _extended(conf: dict[str, Any], which: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if conf.get("S3BackupMode", "Disabled") != "Disabled" or conf.get("S3BackupConfiguration") is not None:
        raise ShapeError(f"{which}.S3BackupMode Enabled is not supported by the control plane (a backup: block "
                         "in the YAML file is)")
    conversion = conf.get("DataFormatConversionConfiguration")
    if conversion is not None and _obj(conversion, f"{which}.DataFormatConversionConfiguration").get("Enabled", True):
        raise ShapeError(f"{which}.DataFormatConversionConfiguration is not supported by the control plane "
                         "(a format: block in the YAML file is)")
    if conf.get("CustomTimeZone") not in (None, "UTC"):
        raise ShapeError(f"{which}.CustomTimeZone is not supported (prefixes are evaluated in UTC)")
    processing = conf.get("ProcessingConfiguration")
    if processing is not None:
        processing = _obj(processing, f"{which}.ProcessingConfiguration")
        _refuse_unknown(processing, {"Enabled", "Processors"}, f"{which}.ProcessingConfiguration")
        if processing.get("Enabled", False):
            out["processing"] = [_processor(_obj(p, f"{which}.ProcessingConfiguration.Processors[{i}]"), i, which)
                                 for i, p in enumerate(processing.get("Processors") or [])]
    partitioning = conf.get("DynamicPartitioningConfiguration")
    if partitioning is not None:
        partitioning = _obj(partitioning, f"{which}.DynamicPartitioningConfiguration")
        _refuse_unknown(partitioning, {"Enabled", "RetryOptions"}, f"{which}.DynamicPartitioningConfiguration")
        if partitioning.get("Enabled", False):
            dp: dict[str, Any] = {"enabled": True}
            retry = partitioning.get("RetryOptions")
            if isinstance(retry, dict) and "DurationInSeconds" in retry:
                dp["retry_duration_secs"] = retry["DurationInSeconds"]
            out["dynamic_partitioning"] = dp
    return out


# Processor type -> (YAML type, parameter name -> YAML field, how the value is read).
_PROCESSORS: dict[str, tuple[str, dict[str, tuple[str, type]]]] = {
    "Lambda": ("lambda", {"LambdaArn": ("arn", str), "NumberOfRetries": ("retries", int),
                          "BufferSizeInMBs": ("buffer_size_mib", float),
                          "BufferIntervalInSeconds": ("buffer_interval_secs", int)}),
    "AppendDelimiterToRecord": ("append_delimiter", {"Delimiter": ("delimiter", str)}),
    "MetadataExtraction": ("metadata_extraction", {"MetadataExtractionQuery": ("query", str),
                                                   "JsonParsingEngine": ("json_parsing_engine", str)}),
    "RecordDeAggregation": ("record_deaggregation", {"SubRecordType": ("format", str), "Delimiter": ("delimiter", str)}),
}


def _processor(proc: dict[str, Any], i: int, which: str) -> dict[str, Any]:
    where = f"{which}.ProcessingConfiguration.Processors[{i}]"
    kind = proc.get("Type")
    if kind not in _PROCESSORS:
        raise ShapeError(f"{where}.Type {kind!r} is not supported (Lambda, AppendDelimiterToRecord, "
                         "MetadataExtraction and RecordDeAggregation are)")
    yaml_type, params = _PROCESSORS[kind]
    out: dict[str, Any] = {"type": yaml_type}
    for j, param in enumerate(proc.get("Parameters") or []):
        param = _obj(param, f"{where}.Parameters[{j}]")
        name, value = param.get("ParameterName"), param.get("ParameterValue")
        if name not in params or not isinstance(value, str):
            raise ShapeError(f"{where}.Parameters[{j}] {name!r} is not supported for {kind}")
        field, cast = params[name]
        try:
            out[field] = cast(value) if cast is not str else value
        except ValueError:
            raise ShapeError(f"{where}.Parameters[{j}] {name}: {value!r} is not a number") from None
    return out


# --------------------------------------------------------------------------------------------------
# HTTP endpoint, Splunk and OpenSearch: a destination and an S3 backup (S3Configuration)
# --------------------------------------------------------------------------------------------------

_REMOTE_COMMON = {"RoleARN", "BufferingHints", "CloudWatchLoggingOptions", "ProcessingConfiguration", "RetryOptions",
                  "S3BackupMode", "S3Configuration", "SecretsManagerConfiguration"}
_REMOTE: dict[str, set[str]] = {
    "HttpEndpointDestinationConfiguration": _REMOTE_COMMON | {"EndpointConfiguration", "RequestConfiguration"},
    "SplunkDestinationConfiguration": _REMOTE_COMMON | {"HECEndpoint", "HECEndpointType", "HECToken",
                                                        "HECAcknowledgmentTimeoutInSeconds"},
    "AmazonopensearchserviceDestinationConfiguration": _REMOTE_COMMON | {
        "DomainARN", "ClusterEndpoint", "IndexName", "TypeName", "IndexRotationPeriod", "DocumentIdOptions",
        "VpcConfiguration"},
}


def _remote_stream(conf: dict[str, Any], which: str, region: str) -> dict[str, Any]:
    _refuse_unknown(conf, _REMOTE[which], which)
    secrets = conf.get("SecretsManagerConfiguration")
    if isinstance(secrets, dict) and secrets.get("Enabled"):
        raise ShapeError(f"{which}.SecretsManagerConfiguration is not supported (write the secret in the request)")
    if conf.get("VpcConfiguration") is not None:
        raise ShapeError(f"{which}.VpcConfiguration is not supported (the daemon reaches the endpoint directly)")
    _plumbing(conf, which)
    if which == "HttpEndpointDestinationConfiguration":
        destination = _http_endpoint(conf, which)
    elif which == "SplunkDestinationConfiguration":
        destination = {"type": "splunk", "hec_endpoint": conf.get("HECEndpoint"), "hec_token": conf.get("HECToken")}
        for member, field in (("HECEndpointType", "hec_endpoint_type"),
                              ("HECAcknowledgmentTimeoutInSeconds", "hec_ack_timeout_secs")):
            if member in conf:
                destination[field] = conf[member]
    else:
        destination = _opensearch(conf, which, region)
    destination.update(_retry(conf))
    stream: dict[str, Any] = {"destination": destination}
    stream.update(_buffering(conf, which))
    stream.update(_extended({"ProcessingConfiguration": conf["ProcessingConfiguration"]}, which)
                  if conf.get("ProcessingConfiguration") is not None else {})
    backup = conf.get("S3Configuration")
    if backup is None:
        raise ShapeError(f"{which}.S3Configuration is required (where failed records are archived)")
    backup = _obj(backup, f"{which}.S3Configuration")
    _refuse_unknown(backup, _S3_MEMBERS, f"{which}.S3Configuration")
    _plumbing(backup, f"{which}.S3Configuration")
    if not isinstance(backup.get("BucketARN"), str):
        raise ShapeError(f"{which}.S3Configuration.BucketARN is required")
    name = backup["BucketARN"]
    stream["backup"] = {"bucket": name[len("arn:aws:s3:::"):] if name.startswith("arn:aws:s3:::") else name,
                        "region": region, **({"mode": conf["S3BackupMode"]} if "S3BackupMode" in conf else {})}
    for member, field in (("Prefix", "prefix"), ("ErrorOutputPrefix", "error_output_prefix"),
                          ("CompressionFormat", "compression")):
        if backup.get(member) is not None:
            stream["backup"][field] = backup[member]
    return stream


def _http_endpoint(conf: dict[str, Any], which: str) -> dict[str, Any]:
    endpoint = _obj(conf.get("EndpointConfiguration") or {}, f"{which}.EndpointConfiguration")
    _refuse_unknown(endpoint, {"Url", "Name", "AccessKey"}, f"{which}.EndpointConfiguration")
    destination: dict[str, Any] = {"type": "http_endpoint", "url": endpoint.get("Url")}
    if endpoint.get("Name") is not None:
        destination["name"] = endpoint["Name"]
    if endpoint.get("AccessKey") is not None:
        destination["access_key"] = endpoint["AccessKey"]
    request = conf.get("RequestConfiguration")
    if request is not None:
        request = _obj(request, f"{which}.RequestConfiguration")
        _refuse_unknown(request, {"ContentEncoding", "CommonAttributes"}, f"{which}.RequestConfiguration")
        if "ContentEncoding" in request:
            destination["content_encoding"] = request["ContentEncoding"]
        attributes = {}
        for i, attr in enumerate(request.get("CommonAttributes") or []):
            attr = _obj(attr, f"{which}.RequestConfiguration.CommonAttributes[{i}]")
            attributes[attr.get("AttributeName")] = attr.get("AttributeValue")
        if attributes:
            destination["common_attributes"] = attributes
    return destination


def _opensearch(conf: dict[str, Any], which: str, region: str) -> dict[str, Any]:
    if conf.get("ClusterEndpoint") is None:
        raise ShapeError(f"{which}.ClusterEndpoint is required here (a DomainARN cannot be resolved without AWS)")
    destination: dict[str, Any] = {"type": "opensearch", "endpoint": conf["ClusterEndpoint"],
                                   "index": conf.get("IndexName"),
                                   # Firehose signs its requests to the domain with its role: SigV4 here,
                                   # with the daemon's credentials.
                                   "auth": {"type": "sigv4", "region": region, "service": "es"}}
    for member, field in (("TypeName", "type_name"), ("IndexRotationPeriod", "index_rotation")):
        if conf.get(member) is not None:
            destination[field] = conf[member]
    ids = conf.get("DocumentIdOptions")
    if isinstance(ids, dict) and "DefaultDocumentIdFormat" in ids:
        destination["document_id"] = ids["DefaultDocumentIdFormat"]
    return destination


# --------------------------------------------------------------------------------------------------
# Redshift (or a PostgreSQL-compatible database): COPY from an S3 staging bucket
# --------------------------------------------------------------------------------------------------

_REDSHIFT = {"RoleARN", "ClusterJDBCURL", "CopyCommand", "Username", "Password", "RetryOptions", "S3Configuration",
             "ProcessingConfiguration", "S3BackupMode", "S3BackupConfiguration", "CloudWatchLoggingOptions",
             "SecretsManagerConfiguration"}
_JDBC_RE = re.compile(r"^jdbc:(?P<kind>redshift|postgresql)://(?P<host>[^:/?#]+)(?::(?P<port>\d+))?/(?P<db>[^?#/]+)")


def _redshift_stream(conf: dict[str, Any], which: str, region: str) -> dict[str, Any]:
    """``jdbc:redshift://`` loads with Redshift's ``COPY ... FROM 's3://...'`` (the RoleARN as its
    IAM_ROLE); ``jdbc:postgresql://`` with ``COPY ... FROM STDIN``. Either way each batch is staged
    in the S3Configuration bucket first, as Firehose stages it."""
    _redshift_refusals(conf, which)
    url = conf.get("ClusterJDBCURL")
    m = _JDBC_RE.match(url) if isinstance(url, str) else None
    if m is None:
        raise ShapeError(f"{which}.ClusterJDBCURL must be jdbc:redshift://host:port/database (or jdbc:postgresql://)")
    copy = _obj(conf.get("CopyCommand") or {}, f"{which}.CopyCommand")
    _refuse_unknown(copy, {"DataTableName", "DataTableColumns", "CopyOptions"}, f"{which}.CopyCommand")
    redshift = m["kind"] == "redshift"
    connection = {"host": m["host"], "port": int(m["port"] or (5439 if redshift else 5432)), "database": m["db"],
                  "user": conf.get("Username"), **({"password": conf["Password"]} if "Password" in conf else {})}
    destination: dict[str, Any] = {"type": "redshift", "connection": connection, "table": copy.get("DataTableName"),
                                   "load_method": "copy_from_s3" if redshift else "copy_from_stdin"}
    if copy.get("DataTableColumns"):
        destination["columns"] = [c.strip() for c in str(copy["DataTableColumns"]).split(",") if c.strip()]
    if copy.get("CopyOptions"):
        destination["copy_options"] = copy["CopyOptions"]
    if redshift and conf.get("RoleARN"):
        destination["iam_role"] = conf["RoleARN"]
    destination.update(_retry(conf))
    staging = _obj(conf.get("S3Configuration") or {}, f"{which}.S3Configuration")
    _refuse_unknown(staging, _S3_MEMBERS, f"{which}.S3Configuration")
    _plumbing(staging, f"{which}.S3Configuration")
    staged = _s3_stream(staging, "S3DestinationConfiguration", region)
    destination["staging"] = staged["destination"]
    stream: dict[str, Any] = {"destination": destination, **{k: v for k, v in staged.items() if k == "buffering"}}
    if conf.get("ProcessingConfiguration") is not None:
        stream.update(_extended({"ProcessingConfiguration": conf["ProcessingConfiguration"]}, which))
    return stream


def _redshift_refusals(conf: dict[str, Any], which: str) -> None:
    _refuse_unknown(conf, _REDSHIFT, which)
    _plumbing(conf, which)
    secrets = conf.get("SecretsManagerConfiguration")
    if isinstance(secrets, dict) and secrets.get("Enabled"):
        raise ShapeError(f"{which}.SecretsManagerConfiguration is not supported (give Username and Password)")
    if conf.get("S3BackupMode", "Disabled") != "Disabled" or conf.get("S3BackupConfiguration") is not None:
        raise ShapeError(f"{which}.S3BackupMode Enabled is not supported by the control plane")


def _retry(conf: dict[str, Any]) -> dict[str, Any]:
    retry = conf.get("RetryOptions")
    if isinstance(retry, dict) and "DurationInSeconds" in retry:
        return {"retry_duration_secs": retry["DurationInSeconds"]}
    return {}

