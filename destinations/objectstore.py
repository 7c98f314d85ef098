"""What S3 and the local directory share: Firehose's key layout, compression and extension."""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from firehose.interfaces import Batch, BufferingLimits, BuildContext, DeliveryResult, Destination
from firehose.keys import (
    PrefixError,
    check_path_prefix,
    evaluate_prefix,
    object_name,
    random_object_suffix,
    validate_prefixes,
)
from firehose.models import StrictModel
from firehose.packed import PackedRecords
from firehose.transforms.compression import Codec, get_codec

# Firehose's ranges for S3 (reference §3): 1-128 MiB (5), 0-900 s (300).
S3_BUFFERING = BufferingLimits(1, 128, 5, 0, 900, 300)


def join_records(records: Sequence[bytes], delimiter: bytes | None = None) -> bytes | bytearray:
    """An object's uncompressed body: the records verbatim, or each followed by ``delimiter``
    (Firehose's AppendDelimiterToRecord). Every record is terminated, the last one too, not merely
    separated: NDJSON readers expect newline-terminated records, and objects concatenated together
    then keep every record on its own line. Records packed in one buffer are that buffer, uncopied."""
    if isinstance(records, PackedRecords) and not delimiter:
        return records.buffer
    return delimiter.join(records) + delimiter if delimiter and records else b"".join(records)


class ObjectStoreConfig(StrictModel):
    """Fields with Firehose's ExtendedS3 semantics (Prefix, ErrorOutputPrefix, CompressionFormat,
    FileExtension)."""

    requires_backup: ClassVar[bool] = False  # failed records go under error_output_prefix

    BUFFERING: ClassVar[BufferingLimits] = S3_BUFFERING
    # A key names a file on a file system (the local destination): each partition-key value is
    # written as one path segment (keys.path_segment), and prefixes must stay under the root.
    KEYS_ARE_PATHS: ClassVar[bool] = False

    type: str = Field(description="The destination type.")
    prefix: str = Field(
        default="",
        description="Prefix of every object's key, with Firehose's expressions: `!{timestamp:yyyy/MM/dd}`, "
        "`!{firehose:random-string}`, and with dynamic partitioning `!{partitionKeyFromQuery:k}` / "
        "`!{partitionKeyFromLambda:k}`. Without a timestamp expression `yyyy/MM/dd/HH/` (UTC) is appended "
        "(Firehose: Prefix).",
    )
    error_output_prefix: str | None = Field(
        default=None,
        description="Prefix of failed records' objects, with the same expressions plus "
        "`!{firehose:error-output-type}`; required with dynamic partitioning. Unset: "
        "`<prefix><error-output-type>/yyyy/MM/dd/HH/` (Firehose: ErrorOutputPrefix).",
    )
    compression: str = Field(
        default="none",
        description="Object compression: none, gzip (`.gz`), zip (`.zip`), snappy (snappy-java framing, "
        "`.snappy`) or hadoop_snappy (`.snappy`), or Firehose's UNCOMPRESSED, GZIP, ZIP, Snappy, "
        "HADOOP_SNAPPY, in any case; none with format conversion (Firehose: CompressionFormat).",
    )
    file_extension: str = Field(
        default="",
        description="Replaces the extension of delivered objects: empty, or `.` followed by 0-9 a-z ! - _ . "
        "* ' ( ), at most 128 characters (Firehose: FileExtension).",
    )

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str) -> str:
        return get_codec(v).name  # ValueError names the known codecs

    @field_validator("file_extension")
    @classmethod
    def _extension(cls, v: str) -> str:
        import re

        if v and (len(v) > 128 or not re.fullmatch(r"\.[0-9a-z!\-_.*'()]+", v)):
            raise ValueError(
                "must be empty or start with '.' followed by 0-9 a-z ! - _ . * ' ( ) "
                f"(Firehose's FileExtension rule), got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _prefixes(self, info: ValidationInfo) -> ObjectStoreConfig:
        # The stream's dynamic_partitioning.enabled arrives as validation context: it decides
        # which prefix expressions are allowed (reference §6.3).
        dynamic = bool((info.context or {}).get("dynamic_partitioning"))
        try:
            validate_prefixes(self.prefix, self.error_output_prefix or None, dynamic_partitioning=dynamic)
            if self.KEYS_ARE_PATHS:
                check_path_prefix(self.prefix, "Prefix")
                if self.error_output_prefix:
                    check_path_prefix(self.error_output_prefix, "ErrorOutputPrefix")
        except PrefixError as exc:
            raise ValueError(str(exc)) from None
        return self

    def buffering_limits(self) -> BufferingLimits:
        return self.BUFFERING

    @property
    def codec(self) -> Codec:
        return get_codec(self.compression)

    @property
    def extension(self) -> str:
        return self.file_extension or self.codec.extension

    def object_key(
        self, stream: str, version: int, oldest: datetime, rng: random.Random, extension: str | None = None,
        partition_keys: Mapping[str, str] | None = None,
    ) -> str:
        """Firehose's layout: evaluated prefix + ``<stream>-<version>-YYYY-MM-DD-HH-MM-SS-<uuid><ext>``.
        ``extension`` overrides the compression's (``.parquet`` and the like), unless
        ``file_extension`` is set; ``partition_keys`` fill the partition-key expressions."""
        prefix = evaluate_prefix(self.prefix, oldest, rng, partition_keys=partition_keys,
                                 path_segments=self.KEYS_ARE_PATHS)
        ext = self.file_extension or (extension if extension is not None else self.extension)
        return prefix + object_name(stream, version, oldest, random_object_suffix(rng), ext)

    def encode(self, key: str, records: Sequence[bytes], delimiter: bytes | None = None) -> bytes:
        """The object body for a batch: records concatenated verbatim (Firehose adds no
        delimiter unless AppendDelimiterToRecord is on), then compressed. A zip entry is named
        after the object, without extension."""
        name = key.rsplit("/", 1)[-1]
        ext = self.extension
        entry = name[: -len(ext)] if ext and name.endswith(ext) else name
        return self.codec.compress(join_records(records, delimiter), entry)

    def archive_key(self, stream: str, version: int, oldest: datetime, rng: random.Random, error_output_type: str) -> str:
        """Where failed records go: ErrorOutputPrefix, or else ``<prefix><type>/yyyy/MM/dd/HH/``."""
        from firehose.keys import evaluate_error_prefix

        prefix = evaluate_error_prefix(self.prefix, self.error_output_prefix or None, oldest, rng, error_output_type)
        return prefix + object_name(stream, version, oldest, random_object_suffix(rng), self.extension)

    def _s3_description(self, bucket_arn: str, buffering: Any) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "RoleARN": "arn:aws:iam::000000000000:role/firehose",
            "BucketARN": bucket_arn,
            "Prefix": self.prefix,
            "BufferingHints": {"SizeInMBs": buffering.size_mib, "IntervalInSeconds": buffering.interval_secs},
            "CompressionFormat": self.codec.firehose_name,
            "EncryptionConfiguration": {"NoEncryptionConfig": "NoEncryption"},
            "CloudWatchLoggingOptions": {"Enabled": False},
        }
        if self.error_output_prefix:
            desc["ErrorOutputPrefix"] = self.error_output_prefix
        return desc

    def describe_destination(self, bucket_arn: str, buffering: Any, account_id: str) -> dict[str, Any]:
        base = self._s3_description(bucket_arn, buffering)
        base["RoleARN"] = f"arn:aws:iam::{account_id}:role/firehose"
        extended = dict(base)
        extended["S3BackupMode"] = "Disabled"
        if self.file_extension:
            extended["FileExtension"] = self.file_extension
        return {"ExtendedS3DestinationDescription": extended, "S3DestinationDescription": base}


class ObjectStoreDestination(Destination):
    """What S3 and the local directory share at run time: Firehose's keys, the object body
    (records with compression, or a columnar file with format conversion), and keeping an encoded
    body across retries so an outage does not compress the same batch again (bounded: at most
    ``max_in_flight`` batches are in delivery). Subclasses store bytes and classify errors."""

    def __init__(self, config: ObjectStoreConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self._encoded: dict[str, bytes] = {}
        self.converter: Any = None

    def set_converter(self, converter: Any) -> None:
        """Write batches as columnar files (record format conversion) instead of concatenated records."""
        self.converter = converter

    def batch_key(
        self, oldest_arrival: datetime, rng: random.Random, partition_keys: Mapping[str, str] | None = None
    ) -> str:
        ext = self.converter.extension if self.converter is not None else None
        return self.config.object_key(self.ctx.stream_name, self.ctx.version, oldest_arrival, rng, ext, partition_keys)

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        """The key of an archive object of failed records (Firehose's error-output layout)."""
        return self.config.archive_key(self.ctx.stream_name, self.ctx.version, oldest_arrival, rng, error_output_type)

    def _encode(self, batch: Batch) -> bytes:
        if self.converter is not None and not batch.archive:
            return bytes(self.converter.convert(batch.records))
        return self.config.encode(batch.key, batch.records, batch.delimiter)

    async def deliver(self, batch: Batch) -> DeliveryResult:
        body: list[bytes | None] = [self._encoded.pop(batch.key, None)]
        try:
            # One worker-thread hop for both steps: partitioned streams deliver many small objects.
            await asyncio.to_thread(self._encode_and_store, batch, body)
        except Exception as exc:  # each failure is retryable: the runner backs off and retries
            if body[0] is not None:
                self._encoded[batch.key] = body[0]
            code, message = self._classify(exc)
            return DeliveryResult.all_failed(len(batch.records), retryable=True, code=code, message=message)
        return DeliveryResult.delivered()

    def _encode_and_store(self, batch: Batch, body: list[bytes | None]) -> None:
        data = body[0]
        if data is None:
            data = body[0] = self._encode(batch)
        self._store(batch.key, data)

    @abc.abstractmethod
    def _store(self, key: str, data: bytes) -> None:
        """Write the object under ``key`` (blocking; runs in a worker thread), replacing any."""

    @abc.abstractmethod
    def _classify(self, exc: Exception) -> tuple[str, str]:
        """Firehose-style error code and message for a failed store."""
