"""A destination's output format: :class:`FormatConfig` and the pydantic models it holds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from firehose.models import StrictModel
from firehose.transforms.formats.hive import parse_hive_type
from firehose.transforms.formats.timestamps import _compile_joda


def _lower(value: Any) -> Any:
    # Firehose's API spells enums in upper case (SNAPPY, V1); accept both spellings.
    return value.lower() if isinstance(value, str) else value


class ParquetOptions(StrictModel):
    """Firehose's ``ParquetSerDe``. ``block_size_mib`` sets the row-group size (rows are sized
    from the batch's average in-memory row); Hadoop's ``MaxPaddingBytes`` has no pyarrow knob."""

    compression: Literal["snappy", "gzip", "uncompressed", "zstd"] = "snappy"
    block_size_mib: int = Field(default=256, ge=64)
    page_size_kib: int = Field(default=1024, ge=64)
    enable_dictionary: bool = True
    writer_version: Literal["v1", "v2"] = "v1"

    @field_validator("compression", "writer_version", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return _lower(value)


class OrcOptions(StrictModel):
    """Firehose's ``OrcSerDe``. Padding and ``BlockSizeBytes`` (Hadoop block alignment) have no
    pyarrow equivalent and are not offered; ``dictionary_key_threshold`` None keeps pyarrow's."""

    compression: Literal["snappy", "zlib", "none", "zstd"] = "snappy"
    stripe_size_mib: int = Field(default=64, ge=8)
    bloom_filter_columns: list[str] = Field(default_factory=list)
    bloom_filter_false_positive_probability: float = Field(default=0.05, gt=0.0, lt=1.0)
    row_index_stride: int = Field(default=10000, ge=1000)
    dictionary_key_threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("compression", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return _lower(value)


class DeserializerConfig(StrictModel):
    """Firehose's ``OpenXJsonSerDe`` (``openx_json``) or ``HiveJsonSerDe`` (``hive_json``).

    ``case_insensitive``, ``column_to_json_key_mappings`` and
    ``convert_dots_in_json_keys_to_underscores`` belong to OpenX; ``timestamp_formats`` (Joda-Time
    patterns or ``millis``) to Hive. Setting one for the other deserializer is an error, as giving
    both deserializers is in Firehose.
    """

    type: Literal["openx_json", "hive_json"] = "openx_json"
    case_insensitive: bool = True
    column_to_json_key_mappings: dict[str, str] = Field(default_factory=dict)
    convert_dots_in_json_keys_to_underscores: bool = False
    timestamp_formats: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> DeserializerConfig:
        openx_only = (
            "case_insensitive",
            "column_to_json_key_mappings",
            "convert_dots_in_json_keys_to_underscores",
        )
        if self.type == "hive_json":
            given = [k for k in openx_only if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)} apply to openx_json only, not hive_json")
        elif self.timestamp_formats:
            raise ValueError(
                "timestamp_formats applies to hive_json only (OpenX has fixed timestamp formats)"
            )
        for pattern in self.timestamp_formats:
            if pattern != "millis":
                _compile_joda(pattern)  # raises ValueError naming the bad letter
        for column, key in self.column_to_json_key_mappings.items():
            if not column or not key:
                raise ValueError("column_to_json_key_mappings: column names and JSON keys must not be empty")
        return self


class ColumnConfig(StrictModel):
    """One column: its name and a Glue/Hive type string, parsed here so a typo fails at load."""

    name: str = Field(min_length=1)
    type: str

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        parse_hive_type(value)
        return value


class GlueConfig(StrictModel):
    """A Glue Data Catalog table whose storage-descriptor columns are the schema (fetched once,
    when the :class:`Converter` is built)."""

    database: str = Field(min_length=1)
    table: str = Field(min_length=1)
    region: str = "us-east-1"
    endpoint_url: str | None = None


class SchemaConfig(StrictModel):
    """Where the schema comes from: exactly one of ``columns``, ``avro_schema`` (path to an
    ``.avsc`` file) and ``glue``."""

    columns: list[ColumnConfig] | None = None
    avro_schema: str | None = None
    glue: GlueConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SchemaConfig:
        given = [k for k in ("columns", "avro_schema", "glue") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'columns', 'avro_schema', 'glue' (got {given or 'none'})")
        if self.columns is not None:
            if not self.columns:
                raise ValueError("columns must not be empty")
            seen: set[str] = set()
            for col in self.columns:
                if col.name.lower() in seen:
                    raise ValueError(f"duplicate column {col.name!r} (column names are case-insensitive)")
                seen.add(col.name.lower())
        return self


class FormatConfig(StrictModel):
    """A destination's output format. ``schema`` is required for parquet, orc and avro."""

    type: Literal["parquet", "orc", "avro", "json"] = "json"
    schema_: SchemaConfig | None = Field(default=None, alias="schema")
    deserializer: DeserializerConfig = DeserializerConfig()
    parquet: ParquetOptions = ParquetOptions()
    orc: OrcOptions = OrcOptions()

    @model_validator(mode="after")
    def _schema_needed(self) -> FormatConfig:
        if self.type == "json":
            if self.schema_ is not None:
                raise ValueError("schema is only used by the parquet, orc and avro formats")
        elif self.schema_ is None:
            raise ValueError(f"format {self.type!r} needs a 'schema' (columns, avro_schema or glue)")
        if self.deserializer.type == "hive_json" and self.schema_ is not None and self.schema_.columns:
            for col in self.schema_.columns:
                if "." in col.name:
                    raise ValueError(f"column {col.name!r}: the Hive JSON SerDe rejects dots in column names")
        return self
