"""Config classes for a stream's ``processing:`` list and its ``backup:`` block.

Processors take Firehose's names and parameters. Whatever their order in the list, they run in
Firehose's fixed order (reference §4.1): KPL de-aggregation, JSON/delimited de-aggregation,
decompression, CloudWatch Logs message extraction, the Lambda function, then metadata extraction
(dynamic partitioning's jq query, on what the Lambda returned);
``append_delimiter`` applies at output, when objects are written. Each config's ``build`` gives
its step of the processing chain (firehose/transforms/chain.py).
"""

from __future__ import annotations

import base64
import functools
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from firehose.interfaces import Processor, ProcessorContext
from firehose.models import StrictModel


def _processor(kind: str, **params: Any) -> dict[str, Any]:
    """A Firehose ``Processor`` as DescribeDeliveryStream shows it (parameter values are strings)."""
    return {"Type": kind, "Parameters": [{"ParameterName": k, "ParameterValue": str(v)} for k, v in params.items()]}


class LambdaProcessorConfig(StrictModel):
    """A Firehose Lambda processor: a Python callable run in worker processes the daemon owns
    (``function: pkg.module:handler``), or a real Lambda function invoked through boto3 (``arn:``)."""

    type: Literal["lambda"] = Field(description="`lambda` (Firehose: Processor Type Lambda).")
    function: str | None = Field(
        default=None,
        description="A local handler, `package.module:callable` (or Lambda's `module.callable`), called as "
        "`(event, context)` in worker processes the daemon owns and imported from the working directory and "
        "`PYTHONPATH`. Give this or `arn`.",
    )
    arn: str | None = Field(
        default=None,
        description="A Lambda function invoked through the Lambda Invoke API: its name or ARN, optionally "
        "qualified (Firehose: LambdaArn). Give this or `function`.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="With `arn`: a Lambda-compatible endpoint URL instead of AWS's.",
    )
    region: str | None = Field(
        default=None,
        description="With `arn`: the Lambda region; unset: the ARN's region, else `api.region`.",
    )
    buffer_size_mib: float = Field(
        default=1.0, ge=0.2, le=3.0,
        description="MiB of records sent in one invocation at most (Firehose: BufferSizeInMBs).",
    )
    buffer_interval_secs: int = Field(
        default=60, ge=0, le=900,
        description="Seconds records wait to fill an invocation before it is sent anyway (Firehose: "
        "BufferIntervalInSeconds).",
    )
    retries: int = Field(
        default=3, ge=0, le=300,
        description="Retries of a failed invocation, each with a new invocationId; then its records are "
        "archived as `processing-failed` (Firehose: NumberOfRetries).",
    )
    timeout_secs: int = Field(
        default=300, ge=1, le=900,
        description="Seconds an invocation may run; past it the worker process is killed (or the remote call "
        "abandoned) and the invocation fails with `Lambda.Timeout` (Firehose: the function's timeout).",
    )
    workers: int = Field(
        default=1, ge=1, le=64,
        description="Worker processes running a local `function` (invocations in parallel).",
    )
    worker_nice: int = Field(
        default=10, ge=0, le=19,
        description="How much lower the CPU priority of the `function` worker processes is than the daemon's "
        "(`nice`): on a machine short of cores, acknowledgements of incoming records go before "
        "transformation work, which catches up when the load eases. 0: the same priority.",
    )

    @field_validator("function")
    @classmethod
    def _function(cls, v: str | None) -> str | None:
        # The forms the workers import (workers.load_function): "pkg.module:attr" (attr may be
        # dotted) and Lambda's own handler setting, "module.function". Whether it imports is
        # checked by `firehose validate` and at start, in a child process (it runs user code).
        if v is None:
            return v
        module, sep, attr = v.partition(":")
        if not sep:
            module, _, attr = v.rpartition(".")
        parts = [*module.split("."), *attr.split(".")]
        if not module or not attr or ":" in attr or not all(p.isidentifier() for p in parts):
            raise ValueError(f"must be 'module:callable' (or Lambda's 'module.callable'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> LambdaProcessorConfig:
        if (self.function is None) == (self.arn is None):
            raise ValueError("give exactly one of 'function' (module:callable) or 'arn'")
        return self

    @property
    def lambda_arn(self) -> str:
        """The ``lambdaArn`` written into error records: the ARN, or the ``function:`` value."""
        return self.arn or self.function or ""

    def build(self, ctx: ProcessorContext) -> Processor:
        from firehose.transforms.chain import LambdaStep

        return LambdaStep(self, ctx)

    def describe(self) -> dict[str, Any]:
        return _processor("Lambda", LambdaArn=self.lambda_arn, NumberOfRetries=self.retries,
                          BufferSizeInMBs=self.buffer_size_mib, BufferIntervalInSeconds=self.buffer_interval_secs)


class AppendDelimiterConfig(StrictModel):
    """Firehose's AppendDelimiterToRecord: a delimiter after every record, when objects are written."""

    type: Literal["append_delimiter"] = Field(
        description="`append_delimiter` (Firehose: Processor Type AppendDelimiterToRecord).",
    )
    delimiter: str = Field(
        default="\n",
        description="What is written after each record; not empty (Firehose: Delimiter).",
    )

    @field_validator("delimiter")
    @classmethod
    def _delim(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v

    def build(self, ctx: ProcessorContext) -> None:
        """No processing step: the delimiter is written with the records, when objects are written."""
        return None

    def describe(self) -> dict[str, Any]:
        return _processor("AppendDelimiterToRecord", Delimiter=self.delimiter.encode("unicode_escape").decode())


class RecordDeaggregationConfig(StrictModel):
    """Firehose's RecordDeAggregation: splits records that hold several (KPL aggregates, JSON
    objects one after another, or delimited records) before anything else runs."""

    type: Literal["record_deaggregation"] = Field(
        description="`record_deaggregation` (Firehose: Processor Type RecordDeAggregation).",
    )
    format: Literal["kpl", "json", "delimited", "KPL", "JSON", "DELIMITED"] = Field(
        default="json",
        description="How a record is split: `kpl` (Kinesis Producer Library aggregates), `json` (concatenated "
        "JSON objects) or `delimited` (on `delimiter`) (Firehose: SubRecordType).",
    )
    delimiter: str | None = Field(
        default=None,
        description="With `format: delimited`: the delimiter, as text (or give `delimiter_base64`).",
    )
    delimiter_base64: str | None = Field(
        default=None,
        description="With `format: delimited`: the delimiter, base64-encoded (Firehose: Delimiter, which is "
        "base64 in the API).",
    )

    @model_validator(mode="after")
    def _delimiter(self) -> RecordDeaggregationConfig:
        if self.format.lower() == "delimited" and not self.delimiter_bytes:
            raise ValueError("format: delimited needs 'delimiter' (or 'delimiter_base64')")
        if self.delimiter_base64 is not None:
            try:
                base64.b64decode(self.delimiter_base64, validate=True)
            except ValueError:
                raise ValueError(f"delimiter_base64 is not valid base64: {self.delimiter_base64!r}") from None
        return self

    @property
    def delimiter_bytes(self) -> bytes:
        if self.delimiter_base64:
            return base64.b64decode(self.delimiter_base64)
        return (self.delimiter or "").encode()

    def build(self, ctx: ProcessorContext) -> Processor:
        from firehose.transforms import processors
        from firehose.transforms.chain import ThreadStep

        if self.format.lower() == "kpl":
            return ThreadStep(processors.kpl_deaggregation)
        kind, delimiter = self.format.upper(), self.delimiter_bytes
        return ThreadStep(lambda outs: processors.record_deaggregation(outs, kind, delimiter))

    def describe(self) -> dict[str, Any]:
        params: dict[str, Any] = {"SubRecordType": self.format.upper()}
        if self.format.lower() == "delimited":
            params["Delimiter"] = base64.b64encode(self.delimiter_bytes).decode()
        return _processor("RecordDeAggregation", **params)


class DecompressionConfig(StrictModel):
    """Firehose's Decompression: gunzips records (CloudWatch Logs subscription payloads)."""

    type: Literal["decompression"] = Field(
        description="`decompression` (Firehose: Processor Type Decompression).",
    )
    compression_format: Literal["gzip", "GZIP"] = Field(
        default="gzip",
        description="The records' compression; gzip only (Firehose: CompressionFormat).",
    )

    def build(self, ctx: ProcessorContext) -> Processor:
        from firehose.transforms import processors
        from firehose.transforms.chain import ThreadStep

        return ThreadStep(processors.decompression)

    def describe(self) -> dict[str, Any]:
        return _processor("Decompression", CompressionFormat="GZIP")


class CloudWatchLogProcessingConfig(StrictModel):
    """Firehose's CloudWatchLogProcessing: one record per log event of a CloudWatch Logs
    subscription payload; needs a ``decompression`` processor."""

    type: Literal["cloudwatch_log_processing"] = Field(
        description="`cloudwatch_log_processing` (Firehose: Processor Type CloudWatchLogProcessing).",
    )
    data_message_extraction: bool = Field(
        default=True,
        description="Each log event's `message` becomes a record, control messages are dropped (Firehose: "
        "DataMessageExtraction).",
    )

    def build(self, ctx: ProcessorContext) -> Processor:
        from firehose.transforms import processors
        from firehose.transforms.chain import ThreadStep

        extract = self.data_message_extraction
        return ThreadStep(lambda outs: processors.cloudwatch_log_processing(outs, extract))

    def describe(self) -> dict[str, Any]:
        return _processor("CloudWatchLogProcessing", DataMessageExtraction=str(self.data_message_extraction).lower())


class MetadataExtractionConfig(StrictModel):
    """Firehose's MetadataExtraction: a jq query whose output object gives a record's partition
    keys (``!{partitionKeyFromQuery:<key>}``), for dynamic partitioning. The query is compiled
    here, once, so a syntax error is a config error naming the field."""

    type: Literal["metadata_extraction"] = Field(
        description="`metadata_extraction` (Firehose: Processor Type MetadataExtraction).",
    )
    query: str = Field(
        description="A jq program whose output object gives the record's partition keys, such as "
        "`{customer_id: .customer.id}` (Firehose: MetadataExtractionQuery).",
    )
    json_parsing_engine: Literal["JQ-1.6"] = Field(
        default="JQ-1.6",
        description="The query language; Firehose's only one (Firehose: JsonParsingEngine).",
    )

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a jq expression such as '{customer_id: .customer.id}'")
        try:
            compile_query(v)
        except ValueError as exc:
            raise ValueError(f"is not a valid jq program: {str(exc).splitlines()[0]}") from None
        return v

    @property
    def program(self) -> Any:
        return compile_query(self.query)

    def build(self, ctx: ProcessorContext) -> Processor:
        from firehose.transforms import processors
        from firehose.transforms.chain import ThreadStep

        query = self.query
        return ThreadStep(lambda outs: processors.metadata_extraction(outs, query))

    def describe(self) -> dict[str, Any]:
        return _processor("MetadataExtraction", MetadataExtractionQuery=self.query,
                          JsonParsingEngine=self.json_parsing_engine)


@functools.lru_cache(maxsize=64)
def compile_query(query: str) -> Any:
    """A compiled jq program (cached: reloads and the config check reuse it)."""
    import jq

    return jq.compile(query)


def check_processing(processors: list[Any]) -> None:
    """Cross-processor rules (Firehose's): at most one Lambda; CloudWatch Logs extraction needs
    decompression; each built-in at most once."""
    seen: dict[str, int] = {}
    for p in processors:
        seen[p.type] = seen.get(p.type, 0) + 1
    if seen.get("lambda", 0) > 1:
        raise ValueError("only one lambda processor is allowed per stream (as in Firehose)")
    for name, n in seen.items():
        if n > 1 and name != "lambda":
            raise ValueError(f"processor {name!r} appears {n} times; give it once")
    if "cloudwatch_log_processing" in seen and "decompression" not in seen:
        raise ValueError("cloudwatch_log_processing needs a decompression processor (as in Firehose)")


BACKUP_MODES = {
    "failed_only": "failed_only",
    "all": "all",
    # Firehose's spellings, per destination
    "Disabled": "failed_only",
    "Enabled": "all",
    "FailedDocumentsOnly": "failed_only",
    "AllDocuments": "all",
    "FailedEventsOnly": "failed_only",
    "AllEvents": "all",
    "FailedDataOnly": "failed_only",
    "AllData": "all",
}


class BackupConfig(StrictModel):
    """Where failed records (and with ``mode: all`` every source record) are archived: a local
    directory (``path``) or an S3 bucket, with Firehose's prefix semantics."""

    path: str | None = Field(
        default=None,
        description="A local directory to archive into, with the `local` destination's layout. Give this or "
        "`bucket`.",
    )
    bucket: str | None = Field(
        default=None,
        description="An S3 bucket (name or `arn:aws:s3:::name`) to archive into, with the `s3` destination's "
        "layout (Firehose: S3BackupConfiguration.BucketARN). Give this or `path`.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="With `bucket`: an S3-compatible endpoint URL instead of AWS's.",
    )
    region: str = Field(default="us-east-1", description="With `bucket`: the bucket's region.")
    access_key_id: str | None = Field(
        default=None,
        description="With `bucket`: the access key id; unset: boto3's usual credential chain.",
    )
    secret_access_key: str | None = Field(
        default=None,
        description="With `bucket`: the secret access key (write it as `${ENV}`).",
    )
    prefix: str = Field(
        default="",
        description="Prefix of the archived objects' keys, with Firehose's expressions (Firehose: "
        "S3BackupConfiguration.Prefix).",
    )
    error_output_prefix: str | None = Field(
        default=None,
        description="Prefix of failed records' objects; `!{firehose:error-output-type}` names the failure. "
        "Unset: `<prefix><error-output-type>/yyyy/MM/dd/HH/` (Firehose: ErrorOutputPrefix).",
    )
    compression: str = Field(
        default="none",
        description="Compression of the archived objects: none, gzip, zip, snappy or hadoop_snappy, or "
        "Firehose's UNCOMPRESSED, GZIP, ZIP, Snappy, HADOOP_SNAPPY, in any case (Firehose: CompressionFormat).",
    )
    mode: str = Field(
        default="failed_only",
        description="`failed_only` archives failed records; `all` every record as well. Firehose's spellings "
        "are accepted: Disabled, FailedDocumentsOnly, FailedEventsOnly, FailedDataOnly; Enabled, AllDocuments, "
        "AllEvents, AllData (Firehose: S3BackupMode).",
    )

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in BACKUP_MODES:
            raise ValueError(f"must be failed_only or all (or Firehose's spellings {', '.join(list(BACKUP_MODES)[2:])}), got {v!r}")
        return BACKUP_MODES[v]

    @model_validator(mode="after")
    def _target(self) -> BackupConfig:
        if (self.path is None) == (self.bucket is None):
            raise ValueError("give exactly one of 'path' (a local directory) or 'bucket'")
        return self

    def destination_dict(self) -> dict[str, Any]:
        """The equivalent destination config (same validation, same key layout)."""
        common = {"prefix": self.prefix, "error_output_prefix": self.error_output_prefix, "compression": self.compression}
        if self.path is not None:
            return {"type": "local", "path": self.path, **common}
        return {
            "type": "s3", "bucket": self.bucket, "endpoint_url": self.endpoint_url, "region": self.region,
            "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key, **common,
        }
