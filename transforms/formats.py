"""Record format conversion: JSON records to Parquet, ORC or Avro files (Firehose's DataFormatConversion).

The daemon uses this module in two steps (reference §5):

1. in the processing stage, :meth:`Converter.check` validates records; a record it rejects is
   archived under the error output type ``format-conversion-failed`` with the returned code and
   message;
2. when a buffer is flushed, :meth:`Converter.convert` encodes the records that passed into one
   output file (``Converter.extension`` names its suffix).

**Contract.** ``convert`` succeeds on any list of records that ``check`` accepted one by one, and
a record's values do not depend on the batch it arrives in: both steps run the same code, and every
value goes through the same conversion kernel whichever internal path parsed it. ``convert``
raises :class:`ConversionError` (naming the failed records) when given a record ``check`` rejects.
``Converter`` is thread-safe: ``check`` and ``convert`` may run concurrently from several threads.

Error codes (the ``ErrorCode`` of the archived error document):

=====================================  ==============================================================
``DataFormatConversion.ParseError``    the record is not JSON: a syntax error or invalid UTF-8
``DataFormatConversion.MalformedData`` valid JSON that does not fit the schema: an empty record, a
                                       top-level array or scalar, a value of the wrong JSON type for
                                       its column (e.g. a string for an ``int`` under the Hive SerDe,
                                       an object for a ``string`` under the Hive SerDe), a number
                                       out of range, an unparseable timestamp/date/base64 value, a
                                       null for a required (non-nullable Avro) field
=====================================  ==============================================================

:class:`SchemaError` (a ``ValueError``, raised by ``Converter(...)``) carries one of
``DataFormatConversion.InvalidSchema`` (a type string or Avro schema that cannot be used) and
``DataFormatConversion.EntityNotFound`` (the Glue database or table does not exist), so the daemon
can archive records under those codes if it cannot build a converter. The code names follow
Firehose's ``DataFormatConversion.*`` family; the exact texts AWS writes are not published
(two public emulators that compared against AWS report ``ParseError`` and ``MalformedData``).

**Types.** Glue/Hive type strings map to Arrow as follows; ``timestamp`` is
``timestamp("ms")`` without a time zone and holds UTC wall time, as Hive's ``timestamp`` does
(millisecond precision is what Athena keeps; extra fraction digits are truncated):

==================  ==================  ======================================================
Hive                Arrow               JSON input accepted
==================  ==================  ======================================================
boolean             bool                ``true``/``false`` (OpenX also "true"/"false", any case)
tinyint .. bigint   int8 .. int64       integers (OpenX also numeric strings, incl. ``0x1F``)
float, double       float32, float64    numbers (OpenX also numeric strings)
decimal(p,s)        decimal128(p,s)     numbers (OpenX also strings), rounded half away from
                                        zero to ``s`` digits; more than ``p-s`` integer digits
                                        is an error (Hive would store null; we refuse to lose it)
string              string              strings; numbers/booleans as their JSON text; nested
                                        objects/arrays as JSON text under OpenX only
char(n), varchar(n) string              as string, truncated to ``n`` characters
binary              binary              a base64 string (RFC 4648 with padding)
date                date32              ``yyyy-[M]M-[d]d``
timestamp           timestamp[ms]       see below
array<T>            list<T>             arrays
map<K,V>            map<K,V>            objects (keys converted to ``K``)
struct<a:T,...>     struct              objects
==================  ==================  ======================================================

Timestamps, OpenX SerDe (Firehose's documented formats plus OpenX's offset form):
``yyyy-MM-dd'T'HH:mm:ss[.S{1,9}]`` followed by ``Z`` or a ``±hh[:]mm`` offset (converted to UTC);
``java.sql.Timestamp.valueOf``'s ``yyyy-[M]M-[d]d [H]H:[m]m:[s]s[.S{1,9}]`` (taken as is); an
integer (epoch milliseconds when it has 13 or more characters, as OpenX's
``ParsePrimitiveUtils.parseTimestamp`` decides, else epoch seconds); a decimal number (floating
epoch seconds, truncated to milliseconds as Java's ``(long)(d * 1000)``). Numbers and numeric
strings are the same to OpenX. Hive SerDe: each ``timestamp_formats`` entry in order (Joda-Time
patterns, ``millis`` for epoch milliseconds), then ``Timestamp.valueOf``'s layout. Unlike Java's
lenient calendar, impossible dates (``2024-02-30``) are errors, and years lie in 1..9999.

Key matching: the OpenX SerDe lower-cases every JSON key when ``case_insensitive`` (the default),
including map keys, as OpenX does; ``column_to_json_key_mappings`` and
``convert_dots_in_json_keys_to_underscores`` apply at every nesting level, as in OpenX (a dotted
key is used only when the plain one is absent). The Hive SerDe always matches keys
case-insensitively (map keys are kept). When a key occurs twice (also after lower-casing) the last
one wins. Unknown keys are ignored; missing keys and ``null`` give null. ``NaN``, ``Infinity``
and their kin are read as floating-point numbers (pyarrow's reader accepts them, so the
per-record path does too; Firehose's strict parser would refuse them).

**How it is fast.** The happy path never loops over values in Python: records are joined into
NDJSON and parsed by ``pyarrow.json.read_json`` with an explicit schema (numbers, strings,
structs and lists are read natively; timestamps, dates, decimals and base64 arrive as text or
exact decimals), then converted by Arrow compute kernels and numpy (timestamps by Arrow's
ISO-8601 cast where a layout allows, else RE2 capture groups assembled arithmetically). Unknown
fields are inferred, which shows keys needing a rewrite (other case, dots); those are renamed in
the buffer, which is read again. A column whose values arrive as another JSON type throughout
(OpenX numbers as strings, epoch numbers for a timestamp) switches its reader type. A batch that
still cannot be read (a wrong JSON type, coercions mixed with plain values, concatenated objects
in one record, malformed JSON) is bisected down to the records responsible, which take a
per-record Python path (``orjson``/``json``, then normalisation to canonical JSON whose scalars
are text) ending in the same kernels; a batch with errors everywhere goes to that path whole.
Schemas with a ``map`` always use the per-record path (pyarrow's reader has no maps), and binary
columns decode base64 per value. ``check`` keeps its converted rows in a bounded cache (by record
content) so that ``convert`` of records already checked only assembles and writes them.
``Converter.path_stats`` counts records by path.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import hashlib
import io
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ENTITY_NOT_FOUND",
    "INVALID_SCHEMA",
    "MALFORMED_DATA",
    "PARSE_ERROR",
    "ColumnConfig",
    "ConversionError",
    "Converter",
    "DeserializerConfig",
    "FormatConfig",
    "GlueConfig",
    "OrcOptions",
    "ParquetOptions",
    "SchemaConfig",
    "SchemaError",
    "parse_hive_type",
]

PARSE_ERROR: Final = "DataFormatConversion.ParseError"
MALFORMED_DATA: Final = "DataFormatConversion.MalformedData"
INVALID_SCHEMA: Final = "DataFormatConversion.InvalidSchema"
ENTITY_NOT_FOUND: Final = "DataFormatConversion.EntityNotFound"

#: Default bound of the rows ``check`` keeps for ``convert`` (``Converter.cache_limit_bytes``).
CACHE_LIMIT_BYTES: Final = 256 * 1024 * 1024

# Bisection of a batch the fast reader rejects stops at chunks this small (they go to the
# per-record path), and gives up when every chunk of a level of at least this many failed, or
# when more than one chunk in 64 records failed (about 1.5 % of records bad).
_MIN_BISECT_RECORDS: Final = 32
_DENSE_LEVEL_CHUNKS: Final = 16
# After this many calls in a row that found errors everywhere, only every _RETRY_FAST-th call
# tries the vectorised reader first (a producer whose every record needs the per-record path
# would otherwise pay for the failed attempts on every batch).
_DENSE_STREAK: Final = 3
_RETRY_FAST: Final = 8

# The cache holds at most this many check() results; a convert() whose rows come in more
# separate runs than this is recomputed (gathering tiny pieces costs more than parsing again).
_MAX_CACHE_ENTRIES: Final = 4096
_ENTRY_IDS: Final = 1 << 15  # entry ids are packed into 15 bits of the index values


class SchemaError(ValueError):
    """The schema cannot be used; ``code`` is ``INVALID_SCHEMA`` or ``ENTITY_NOT_FOUND``."""

    def __init__(self, message: str, code: str = INVALID_SCHEMA) -> None:
        super().__init__(message)
        self.code = code


class ConversionError(ValueError):
    """``convert`` was given records that do not convert.

    ``failures`` maps the index of each such record (in the list passed to ``convert``) to its
    ``(error_code, error_message)``, exactly what ``check`` returns for it.
    """

    def __init__(self, failures: dict[int, tuple[str, str]]) -> None:
        first = min(failures)
        code, message = failures[first]
        super().__init__(f"{len(failures)} record(s) do not convert; record {first}: {code}: {message}")
        self.failures = failures


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _lower(value: Any) -> Any:
    # Firehose's API spells enums in upper case (SNAPPY, V1); accept both spellings.
    return value.lower() if isinstance(value, str) else value


class ParquetOptions(_Model):
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


class OrcOptions(_Model):
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


class DeserializerConfig(_Model):
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


class ColumnConfig(_Model):
    """One column: its name and a Glue/Hive type string, parsed here so a typo fails at load."""

    name: str = Field(min_length=1)
    type: str

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        parse_hive_type(value)
        return value


class GlueConfig(_Model):
    """A Glue Data Catalog table whose storage-descriptor columns are the schema (fetched once,
    when the :class:`Converter` is built)."""

    database: str = Field(min_length=1)
    table: str = Field(min_length=1)
    region: str = "us-east-1"
    endpoint_url: str | None = None


class SchemaConfig(_Model):
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


class FormatConfig(_Model):
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


# --------------------------------------------------------------------------------------------
# Glue/Hive type strings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HivePrimitive:
    """A primitive type; ``args`` holds decimal (precision, scale) or char/varchar (length)."""

    name: str
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class HiveArray:
    item: HiveType


@dataclass(frozen=True)
class HiveMap:
    key: HivePrimitive
    value: HiveType


@dataclass(frozen=True)
class HiveStruct:
    fields: tuple[tuple[str, HiveType], ...]


HiveType: TypeAlias = HivePrimitive | HiveArray | HiveMap | HiveStruct

_PRIMITIVES: Final = {
    "boolean": "boolean",
    "tinyint": "tinyint",
    "smallint": "smallint",
    "int": "int",
    "integer": "int",
    "bigint": "bigint",
    "float": "float",
    "double": "double",
    "decimal": "decimal",
    "numeric": "decimal",
    "dec": "decimal",
    "string": "string",
    "char": "char",
    "varchar": "varchar",
    "binary": "binary",
    "date": "date",
    "timestamp": "timestamp",
}
# Known to Hive but not convertible from JSON here (the Hive JSON SerDe rejects uniontype).
_UNSUPPORTED: Final = {"uniontype", "interval_year_month", "interval_day_time", "void", "interval"}


class _TypeParser:
    """Recursive-descent parser for Hive type strings, reporting 0-based character positions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> ValueError:
        where = self.pos if pos is None else pos
        return ValueError(f"{message} at position {where} in {self.text!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.fail(f"expected {char!r} but the type string ended")
        if self.text[self.pos] != char:
            raise self.fail(f"expected {char!r}, found {self.text[self.pos]!r}")
        self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self) -> tuple[str, int]:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] == "_"):
            self.pos += 1
        return self.text[start : self.pos], start

    def integer(self) -> int:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a number")
        return int(self.text[start : self.pos])

    def parse(self) -> HiveType:
        result = self.type_()
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.fail(f"unexpected {self.text[self.pos :]!r} after the type")
        return result

    def type_(self) -> HiveType:
        name, start = self.word()
        if not name:
            if self.pos >= len(self.text):
                raise self.fail("expected a type name but the type string ended")
            raise self.fail(f"expected a type name, found {self.text[self.pos]!r}")
        lname = name.lower()
        if lname == "array":
            self.expect("<")
            item = self.type_()
            self.expect(">")
            return HiveArray(item)
        if lname == "map":
            self.expect("<")
            key_start = self.pos
            self.skip_ws()
            key_start = self.pos
            key = self.type_()
            if not isinstance(key, HivePrimitive):
                raise self.fail("map keys must have a primitive type", key_start)
            self.expect(",")
            value = self.type_()
            self.expect(">")
            return HiveMap(key, value)
        if lname == "struct":
            return self.struct()
        if lname in _UNSUPPORTED:
            raise self.fail(f"unsupported type {name!r}", start)
        if lname not in _PRIMITIVES:
            raise self.fail(f"unknown type {name!r}", start)
        canonical = _PRIMITIVES[lname]
        if canonical == "decimal":
            precision, scale = 10, 0  # Hive's default for a bare DECIMAL
            if self.peek() == "(":
                self.expect("(")
                arg_pos = self.pos
                precision = self.integer()
                if self.peek() == ",":
                    self.expect(",")
                    scale = self.integer()
                self.expect(")")
                if not 1 <= precision <= 38:
                    raise self.fail(f"decimal precision must be 1..38, got {precision}", arg_pos)
                if scale > precision:
                    raise self.fail(f"decimal scale {scale} exceeds precision {precision}", arg_pos)
            return HivePrimitive("decimal", (precision, scale))
        if canonical in ("char", "varchar"):
            limit = 255 if canonical == "char" else 65535
            if self.peek() != "(":
                raise self.fail(f"{canonical} needs a length, e.g. {canonical}(10)")
            self.expect("(")
            arg_pos = self.pos
            length = self.integer()
            self.expect(")")
            if not 1 <= length <= limit:
                raise self.fail(f"{canonical} length must be 1..{limit}, got {length}", arg_pos)
            return HivePrimitive(canonical, (length,))
        return HivePrimitive(canonical)

    def struct(self) -> HiveStruct:
        self.expect("<")
        fields: list[tuple[str, HiveType]] = []
        seen: set[str] = set()
        while True:
            self.skip_ws()
            name_pos = self.pos
            name = self.field_name()
            if name.lower() in seen:
                raise self.fail(f"duplicate struct field {name!r}", name_pos)
            seen.add(name.lower())
            self.expect(":")
            fields.append((name, self.type_()))
            if self.peek() == ">":
                self.expect(">")
                return HiveStruct(tuple(fields))
            self.expect(",")

    def field_name(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == "`":
            end = self.text.find("`", self.pos + 1)
            if end < 0:
                raise self.fail("unterminated backtick-quoted field name")
            name = self.text[self.pos + 1 : end]
            self.pos = end + 1
        else:
            start = self.pos
            while (
                self.pos < len(self.text)
                and self.text[self.pos] not in ":,<>`"
                and not self.text[self.pos].isspace()
            ):
                self.pos += 1
            name = self.text[start : self.pos]
        if not name:
            if self.pos >= len(self.text):
                raise self.fail("expected a struct field name but the type string ended")
            raise self.fail(f"expected a struct field name, found {self.text[self.pos]!r}")
        return name


def parse_hive_type(text: str) -> HiveType:
    """Parse a Glue/Hive type string (``struct<id:bigint,tags:array<string>>``).

    Type names are case-insensitive; struct field names may be backtick-quoted. Raises
    ``ValueError`` naming the problem and its 0-based position, e.g. ``unknown type 'strin' at
    position 25 in 'struct<id:bigint,country:strin>'``.
    """
    return _TypeParser(text).parse()


# --------------------------------------------------------------------------------------------
# Compiled schema: a tree of nodes, each knowing its JSON key, Arrow type and raw (reader) type
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    name: str  # output (Arrow/Avro) field name
    key: str  # the JSON key read for it: folded (lower-cased) and mapped as the deserializer says
    path: str  # for messages: user.items[].sku
    nullable: bool


@dataclass(eq=False)
class _Leaf(_Node):
    kind: str  # bool int float double decimal string binary date timestamp
    bits: int = 64
    precision: int = 0
    scale: int = 0
    length: int | None = None  # char/varchar: values are truncated to this many characters
    unit: str = "ms"  # timestamp unit (Avro timestamp-micros gives "us")
    symbols: tuple[str, ...] | None = None  # Avro enum: the allowed strings
    fixed_size: int | None = None  # Avro fixed: the exact byte length


@dataclass(eq=False)
class _Struct(_Node):
    fields: list[_Node] = field(default_factory=list)


@dataclass(eq=False)
class _List(_Node):
    item: _Node | None = None

    @property
    def element(self) -> _Node:
        assert self.item is not None
        return self.item


@dataclass(eq=False)
class _MapN(_Node):
    key_leaf: _Leaf | None = None
    value: _Node | None = None

    @property
    def keys(self) -> _Leaf:
        assert self.key_leaf is not None
        return self.key_leaf

    @property
    def values(self) -> _Node:
        assert self.value is not None
        return self.value


_INT_BITS: Final = {"tinyint": 8, "smallint": 16, "int": 32, "bigint": 64}


def _leaf_from_hive(prim: HivePrimitive, name: str, key: str, path: str) -> _Leaf:
    if prim.name in _INT_BITS:
        return _Leaf(name, key, path, True, "int", bits=_INT_BITS[prim.name])
    if prim.name == "decimal":
        return _Leaf(name, key, path, True, "decimal", precision=prim.args[0], scale=prim.args[1])
    if prim.name in ("char", "varchar"):
        return _Leaf(name, key, path, True, "string", length=prim.args[0])
    kind = {"boolean": "bool"}.get(prim.name, prim.name)
    return _Leaf(name, key, path, True, kind)


def _final_type(node: _Node) -> pa.DataType:
    """The Arrow type written to the file."""
    if isinstance(node, _Leaf):
        kind = node.kind
        if kind == "bool":
            return pa.bool_()
        if kind == "int":
            return {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}[node.bits]
        if kind == "float":
            return pa.float32()
        if kind == "double":
            return pa.float64()
        if kind == "decimal":
            return pa.decimal128(node.precision, node.scale)
        if kind == "string":
            return pa.string()
        if kind == "binary":
            return pa.binary()
        if kind == "date":
            return pa.date32()
        return pa.timestamp(node.unit)
    if isinstance(node, _Struct):
        return pa.struct([pa.field(c.name, _final_type(c), nullable=c.nullable) for c in node.fields])
    if isinstance(node, _List):
        item = node.element
        return pa.list_(pa.field("item", _final_type(item), nullable=item.nullable))
    assert isinstance(node, _MapN)
    value = node.values
    return pa.map_(_final_type(node.keys), pa.field("value", _final_type(value), nullable=value.nullable))


def _raw_decimal_scale(node: _Leaf) -> int:
    # Numbers are read exactly into decimal128(38, S) and rounded to the column's scale. S keeps
    # one spare integer digit over the column's so that rounding 99.995 up cannot overflow.
    integer_digits = node.precision - node.scale
    return max(node.scale, 37 - integer_digits)


def _slow_type(node: _Node) -> pa.DataType:
    """The type of the canonical JSON the per-record path emits: every scalar as text, maps as
    lists of {k, v}. Field names are the output names."""
    if isinstance(node, _Leaf):
        return pa.string()
    if isinstance(node, _Struct):
        return pa.struct([pa.field(c.name, _slow_type(c)) for c in node.fields])
    if isinstance(node, _List):
        return pa.list_(_slow_type(node.element))
    assert isinstance(node, _MapN)
    return pa.list_(pa.struct([pa.field("k", pa.string()), pa.field("v", _slow_type(node.values))]))


def _has_map(node: _Node) -> bool:
    if isinstance(node, _MapN):
        return True
    if isinstance(node, _Struct):
        return any(_has_map(c) for c in node.fields)
    if isinstance(node, _List):
        return _has_map(node.element)
    return False


def _has_decimal(node: _Node) -> bool:
    if isinstance(node, _Leaf):
        return node.kind == "decimal"
    if isinstance(node, _Struct):
        return any(_has_decimal(c) for c in node.fields)
    if isinstance(node, _List):
        return _has_decimal(node.element)
    assert isinstance(node, _MapN)
    return _has_decimal(node.keys) or _has_decimal(node.values)


def _plain(node: _Node) -> bool:
    """True when the fast reader's value is already the final value (no kernel, no check)."""
    if not node.nullable:
        return False
    if isinstance(node, _Leaf):
        return node.kind in ("bool", "int", "float", "double") or (
            node.kind == "string" and node.length is None and node.symbols is None
        )
    if isinstance(node, _Struct):
        return all(_plain(c) for c in node.fields)
    if isinstance(node, _List):
        return _plain(node.element)
    return False


# --------------------------------------------------------------------------------------------
# Avro: schema derivation and reading .avsc files
# --------------------------------------------------------------------------------------------

_AVRO_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _avro_name(name: str, path: str) -> str:
    if not _AVRO_NAME.match(name):
        raise SchemaError(f"field {path!r}: {name!r} is not a valid Avro name ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def _avro_type(node: _Node, names: dict[str, int]) -> Any:
    if isinstance(node, _Leaf):
        avro: Any
        kind = node.kind
        if kind == "bool":
            avro = "boolean"
        elif kind == "int":
            avro = "long" if node.bits == 64 else "int"
        elif kind == "float":
            avro = "float"
        elif kind == "double":
            avro = "double"
        elif kind == "decimal":
            avro = {
                "type": "bytes",
                "logicalType": "decimal",
                "precision": node.precision,
                "scale": node.scale,
            }
        elif kind == "string":
            avro = "string"
        elif kind == "binary":
            avro = "bytes"
        elif kind == "date":
            avro = {"type": "int", "logicalType": "date"}
        else:
            logical = "timestamp-millis" if node.unit == "ms" else "timestamp-micros"
            avro = {"type": "long", "logicalType": logical}
    elif isinstance(node, _Struct):
        base = "r_" + re.sub(r"[^A-Za-z0-9_]", "_", (node.path or "root").replace("[]", "").replace("{}", ""))
        count = names.get(base, 0)
        names[base] = count + 1
        avro = {
            "type": "record",
            "name": base if count == 0 else f"{base}_{count}",
            "fields": [_avro_field(c, names) for c in node.fields],
        }
    elif isinstance(node, _List):
        avro = {"type": "array", "items": _avro_type(node.element, names)}
    else:
        assert isinstance(node, _MapN)
        if node.keys.kind == "string":
            avro = {"type": "map", "values": _avro_type(node.values, names)}
        else:
            # Avro map keys are strings; a map<int,...> becomes an array of key/value records.
            entry = _Struct("entry", "entry", node.path + "{}", False, [node.keys, node.values])
            avro = {"type": "array", "items": _avro_type(entry, names)}
    return ["null", avro] if node.nullable else avro


def _avro_field(node: _Node, names: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": _avro_name(node.name, node.path), "type": _avro_type(node, names)}
    if node.nullable:
        out["default"] = None
    return out


class _AvroReader:
    """Builds nodes from an Avro schema (a top-level record)."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}
        self.active: set[str] = set()

    def node(self, schema: Any, name: str, path: str) -> _Node:
        nullable = False
        if isinstance(schema, list):
            branches = [b for b in schema if b != "null"]
            if len(branches) != 1 or len(schema) > 2:
                raise SchemaError(
                    f"field {path!r}: only unions of null and one type are supported, got {schema!r}"
                )
            nullable = len(branches) != len(schema)
            schema = branches[0]
        node = self.plain(schema, name, path)
        node.nullable = nullable
        return node

    def plain(self, schema: Any, name: str, path: str) -> _Node:
        if isinstance(schema, str):
            if schema in self.named:
                if schema in self.active:
                    raise SchemaError(f"field {path!r}: recursive type {schema!r} is not supported")
                return self.plain(self.named[schema], name, path)
            schema = {"type": schema}
        if not isinstance(schema, dict) or "type" not in schema:
            raise SchemaError(f"field {path!r}: not an Avro type: {schema!r}")
        typ = schema["type"]
        logical = schema.get("logicalType")
        if isinstance(typ, (dict, list)):
            return self.node(typ, name, path)
        if typ in ("record", "error"):
            full = schema.get("name", "")
            if full:
                self.named[full] = schema
                self.active.add(full)
            fields = []
            seen: set[str] = set()
            for f in schema.get("fields", []):
                fname = f["name"]
                if fname.lower() in seen:
                    raise SchemaError(
                        f"field {path!r}: duplicate field {fname!r} (names are matched case-insensitively)"
                    )
                seen.add(fname.lower())
                fields.append(self.node(f["type"], fname, f"{path}.{fname}" if path else fname))
            self.active.discard(full)
            return _Struct(name, name, path, True, fields)
        if typ == "enum":
            if schema.get("name"):
                self.named[schema["name"]] = schema
            return _Leaf(name, name, path, True, "string", symbols=tuple(schema["symbols"]))
        if typ == "fixed":
            if schema.get("name"):
                self.named[schema["name"]] = schema
            if logical == "decimal":
                return self.decimal(schema, name, path)
            return _Leaf(name, name, path, True, "binary", fixed_size=int(schema["size"]))
        if typ == "array":
            return _List(name, name, path, True, self.node(schema["items"], "item", path + "[]"))
        if typ == "map":
            key = _Leaf("key", "key", path + "{}", False, "string")
            return _MapN(name, name, path, True, key, self.node(schema["values"], "value", path + "{}"))
        if typ == "boolean":
            return _Leaf(name, name, path, True, "bool")
        if typ == "int":
            if logical == "date":
                return _Leaf(name, name, path, True, "date")
            return _Leaf(name, name, path, True, "int", bits=32)
        if typ == "long":
            if logical in ("timestamp-millis", "local-timestamp-millis"):
                return _Leaf(name, name, path, True, "timestamp", unit="ms")
            if logical in ("timestamp-micros", "local-timestamp-micros"):
                return _Leaf(name, name, path, True, "timestamp", unit="us")
            return _Leaf(name, name, path, True, "int", bits=64)
        if typ == "float":
            return _Leaf(name, name, path, True, "float")
        if typ == "double":
            return _Leaf(name, name, path, True, "double")
        if typ == "bytes":
            if logical == "decimal":
                return self.decimal(schema, name, path)
            return _Leaf(name, name, path, True, "binary")
        if typ == "string":
            return _Leaf(name, name, path, True, "string")
        raise SchemaError(f"field {path!r}: unsupported Avro type {typ!r}")

    def decimal(self, schema: dict[str, Any], name: str, path: str) -> _Leaf:
        precision, scale = int(schema.get("precision", 0)), int(schema.get("scale", 0))
        if not 1 <= precision <= 38 or not 0 <= scale <= precision:
            raise SchemaError(f"field {path!r}: decimal({precision},{scale}) is outside Arrow's decimal128")
        return _Leaf(name, name, path, True, "decimal", precision=precision, scale=scale)


# --------------------------------------------------------------------------------------------
# Timestamp and date parsing specs (RE2 patterns with named groups, assembled with numpy)
# --------------------------------------------------------------------------------------------

_MONTHS: Final = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_MONTHS_FULL: Final = [
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
]  # fmt: skip
_DAYS: Final = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS_FULL: Final = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


@dataclass(frozen=True)
class _TsRegex:
    """A timestamp layout: an anchored RE2 pattern whose named groups are date/time fields.

    Groups: y (year), yy (two-digit year), mo (month number), mon/month (month name), d (day),
    H (0-23), k (1-24), K (0-11), h (1-12), ampm, mi, s, f (fraction digits), tz (``Z`` or an
    offset); anything else (day names) is matched and ignored.
    """

    pattern: str
    source: str  # what the user wrote, for messages
    # Arrow's ISO-8601 cast accepts exactly the valid dates/times among this layout's matches
    # (checked by the tests), so it replaces the slower capture-group path when every matched
    # text casts: "" for naive, "UTC" for a layout with a zone. None: no such shortcut.
    cast_zone: str | None = None


@dataclass(frozen=True)
class _TsNumber:
    """An integer epoch: ``rule`` is ``openx`` (13+ characters: millis, else seconds) or ``millis``."""

    rule: str


@dataclass(frozen=True)
class _TsFloat:
    """Floating epoch seconds (OpenX), truncated to milliseconds like Java's ``(long)(d*1000)``."""


_TsSpec: TypeAlias = _TsRegex | _TsNumber | _TsFloat

_FRACTION: Final = r"(?:\.(?P<f>[0-9]{1,9}))?"
_OPENX_ZONED: Final = _TsRegex(
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})T(?P<H>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})"
    + _FRACTION
    + r"(?P<tz>Z|[+-][0-9]{2}:?[0-9]{2})$",
    "yyyy-MM-dd'T'HH:mm:ss[.S]'Z'",
    "UTC",
)
_VALUE_OF: Final = _TsRegex(
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2}) "
    r"(?P<H>[0-9]{1,2}):(?P<mi>[0-9]{1,2}):(?P<s>[0-9]{1,2})" + _FRACTION + "$",
    "yyyy-[M]M-[d]d HH:mm:ss[.S]",
    "",
)
_DATE: Final = _TsRegex(r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2})$", "yyyy-[M]M-[d]d", "")
_OPENX_TIMESTAMPS: Final[tuple[_TsSpec, ...]] = (_OPENX_ZONED, _VALUE_OF, _TsNumber("openx"), _TsFloat())

_JODA_NUMERIC: Final = set("yYuMdHkKhmsS")


def _re2_literal(text: str) -> str:
    return "".join(c if c.isalnum() else "\\" + c if c in r"\.^$|?*+()[]{}-/" else c for c in text)


def _compile_joda(pattern: str) -> _TsRegex:
    """Translate a Joda-Time ``DateTimeFormat`` pattern into a :class:`_TsRegex`.

    Supported letters: y/Y/u (year; yy is a two-digit year, 1950..2049 as Joda's default pivot),
    M/MM (month), MMM/MMMM (month name), d, H, k, K, h, m, s, S (fraction), a (AM/PM), E (day
    name, ignored), Z/ZZ (offset or ``Z``); ``'quoted'`` text and other characters are literals.
    Adjacent numeric fields (``yyyyMMdd``) are read with fixed widths. Anything else (zone names,
    week fields, eras) raises ``ValueError``.
    """
    tokens: list[tuple[str, int] | str] = []  # (letter, count) or a literal
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"timestamp format {pattern!r}: unterminated quote at position {i}")
            tokens.append("'" if end == i + 1 else pattern[i + 1 : end])
            i = end + 1
        elif c.isascii() and c.isalpha():
            j = i
            while j < len(pattern) and pattern[j] == c:
                j += 1
            tokens.append((c, j - i))
            i = j
        else:
            tokens.append(c)
            i += 1
    parts: list[str] = []
    used: set[str] = set()

    def group(name: str, body: str) -> str:
        if name in used:
            raise ValueError(f"timestamp format {pattern!r}: field {name!r} appears twice")
        used.add(name)
        return f"(?P<{name}>{body})"

    for pos, tok in enumerate(tokens):
        if isinstance(tok, str):
            parts.append(_re2_literal(tok))
            continue
        letter, count = tok
        nxt = tokens[pos + 1] if pos + 1 < len(tokens) else None
        fixed = isinstance(nxt, tuple) and nxt[0] in _JODA_NUMERIC and not (nxt[0] == "M" and nxt[1] >= 3)

        def digits(lo: int, hi: int, count: int = count, fixed: bool = fixed) -> str:
            width = max(count, lo)
            return f"[0-9]{{{width}}}" if fixed else f"[0-9]{{{lo},{hi}}}"

        if letter in "yYu":
            parts.append(
                group("yy", "[0-9]{2}")
                if count == 2
                else group("y", digits(4, 4) if count <= 4 else digits(count, count))
            )
        elif letter == "M":
            if count >= 4:
                parts.append(group("month", "(?i:" + "|".join(_MONTHS_FULL) + ")"))
            elif count == 3:
                parts.append(group("mon", "(?i:" + "|".join(_MONTHS) + ")"))
            else:
                parts.append(group("mo", digits(1, 2)))
        elif letter in "dHkKhms":
            parts.append(group({"m": "mi", "s": "s"}.get(letter, letter), digits(1, 2)))
        elif letter == "S":
            parts.append(group("f", f"[0-9]{{{count}}}" if fixed else "[0-9]{1,9}"))
        elif letter == "a":
            parts.append(group("ampm", "(?i:am|pm)"))
        elif letter == "E":
            names = _DAYS_FULL if count >= 4 else _DAYS
            parts.append("(?i:" + "|".join(names) + ")")
        elif letter == "Z" and count <= 2:
            parts.append(group("tz", "Z|[+-][0-9]{2}:?[0-9]{2}"))
        else:
            raise ValueError(
                f"timestamp format {pattern!r}: pattern letter {letter * count!r} is not supported "
                "(supported: y M d H k K h m s S a E Z, quoted text)"
            )
    if "h" in used or "K" in used:
        if "H" in used or "k" in used:
            raise ValueError(f"timestamp format {pattern!r}: mixes 12-hour and 24-hour fields")
    return _TsRegex("^" + "".join(parts) + "$", pattern)


def _hive_timestamp_specs(formats: Sequence[str]) -> tuple[_TsSpec, ...]:
    # Hive's TimestampParser tries the configured formats in order, then Timestamp.valueOf.
    specs: list[_TsSpec] = [_TsNumber("millis") if f == "millis" else _compile_joda(f) for f in formats]
    specs.append(_VALUE_OF)
    return tuple(specs)


# --------------------------------------------------------------------------------------------
# Conversion kernels: raw Arrow arrays (what the JSON reader produced) -> final arrays
# --------------------------------------------------------------------------------------------

_US_PER_SECOND: Final = 1_000_000
_US_PER_DAY: Final = 86_400 * _US_PER_SECOND
_DAYS_0001: Final = -719162  # 0001-01-01 relative to 1970-01-01
_DAYS_10000: Final = 2932897  # 10000-01-01
_MIN_US: Final = _DAYS_0001 * _US_PER_DAY
_MAX_US: Final = _DAYS_10000 * _US_PER_DAY - 1

_INT_TEXT: Final = r"^-?[0-9]{1,18}$|^0[xX][0-9a-fA-F]{1,15}$"  # always castable to int64
_FLOAT_TEXT: Final = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_DECIMAL_TEXT: Final = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")

_I64: TypeAlias = "np.ndarray[Any, np.dtype[np.int64]]"
_MASK: TypeAlias = "np.ndarray[Any, np.dtype[np.bool_]]"


class _Errs:
    """Row-level failures found by the kernels: indices into the array being converted and one
    message each. Parents translate indices (a list maps item indices to its own rows)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray[Any, Any], list[str]]] = []

    def add(self, rows: np.ndarray[Any, Any], messages: list[str]) -> None:
        if len(rows):
            self.parts.append((np.asarray(rows, dtype=np.int64), messages))

    def extend(self, other: _Errs, mapping: np.ndarray[Any, Any] | None = None) -> None:
        for rows, messages in other.parts:
            self.parts.append((rows if mapping is None else mapping[rows], messages))

    def first_by_row(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for rows, messages in self.parts:
            for row, message in zip(rows.tolist(), messages, strict=True):
                out.setdefault(row, message)
        return out


def _valid(arr: pa.Array) -> _MASK:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _np_bool(arr: pa.Array) -> _MASK:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _np_int(arr: pa.Array, default: int) -> _I64:
    return np.asarray(arr.fill_null(default).to_numpy(zero_copy_only=False), dtype=np.int64)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _messages(arr: pa.Array, rows: np.ndarray[Any, Any], template: str) -> list[str]:
    values = arr.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []
    return [template.format(value=_show(v)) for v in values]


def _days_from_civil(y: _I64, m: _I64, d: _I64) -> _I64:
    # Howard Hinnant's days_from_civil, vectorised; valid for the years 1..9999 used here.
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _days_in_month(y: _I64, m: _I64) -> _I64:
    lengths = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    return lengths[np.clip(m, 1, 12) - 1] + ((m == 2) & leap)


def _regex_fields(texts: pa.Array, spec: _TsRegex) -> tuple[_MASK, _I64, _MASK]:
    """Match ``texts`` against a layout; return (matched, microseconds since epoch, valid)."""
    n = len(texts)
    st = pc.extract_regex(texts, pattern=spec.pattern)
    matched = _valid(st)
    names = {st.type.field(i).name for i in range(st.type.num_fields)}
    ok = matched.copy()

    def text(name: str) -> pa.Array:
        # Rows that did not match, and optional groups that did not take part, read as null.
        values = st.field(name)
        return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)

    def num(name: str, default: int) -> _I64:
        if name not in names:
            return np.full(n, default, dtype=np.int64)
        return _np_int(pc.cast(text(name), pa.int64()), default)

    if "yy" in names:
        yy = num("yy", 70)
        year = np.where(yy < 50, 2000 + yy, 1900 + yy)  # Joda's two-digit-year pivot around 2000
    else:
        year = num("y", 1970)
    if "mon" in names or "month" in names:
        label = "mon" if "mon" in names else "month"
        table = _MONTHS if label == "mon" else _MONTHS_FULL
        month = _np_int(pc.index_in(pc.utf8_lower(text(label)), value_set=pa.array(table)), -1) + 1
    else:
        month = num("mo", 1)
    day = num("d", 1)
    pm = _np_bool(pc.equal(pc.utf8_lower(text("ampm")), "pm")) if "ampm" in names else np.zeros(n, dtype=bool)
    if "H" in names:
        hour = num("H", 0)
        ok &= hour <= 23
    elif "k" in names:
        raw = num("k", 24)
        ok &= (raw >= 1) & (raw <= 24)
        hour = raw % 24
    elif "K" in names:
        raw = num("K", 0)
        ok &= raw <= 11
        hour = raw + 12 * pm
    elif "h" in names:
        raw = num("h", 12)
        ok &= (raw >= 1) & (raw <= 12)
        hour = raw % 12 + 12 * pm
    else:
        hour = np.zeros(n, dtype=np.int64)
    minute = num("mi", 0)
    second = num("s", 0)
    if "f" in names:
        six = pc.utf8_slice_codeunits(pc.utf8_rpad(text("f"), width=6, padding="0"), 0, 6)
        micros = _np_int(pc.cast(six, pa.int64()), 0)
    else:
        micros = np.zeros(n, dtype=np.int64)
    offset_minutes = np.zeros(n, dtype=np.int64)
    if "tz" in names:
        tz = text("tz")
        tz = pc.if_else(pc.equal(tz, "Z"), pa.scalar(None, pa.string()), tz)
        sign = np.where(_np_bool(pc.starts_with(tz, "-")), -1, 1)
        tz_h = _np_int(pc.cast(pc.utf8_slice_codeunits(tz, 1, 3), pa.int64()), 0)
        tz_m = _np_int(pc.cast(pc.utf8_slice_codeunits(tz, -2), pa.int64()), 0)
        ok &= (tz_h <= 23) & (tz_m <= 59)
        offset_minutes = sign * (tz_h * 60 + tz_m)
    ok &= (year >= 1) & (year <= 9999) & (month >= 1) & (month <= 12) & (day >= 1)
    ok &= day <= _days_in_month(year, month)
    ok &= (minute <= 59) & (second <= 59)
    year = np.where(ok, year, 1970)
    month = np.where(ok, month, 1)
    day = np.where(ok, day, 1)
    days = _days_from_civil(year, month, day)
    us = (days * 86400 + hour * 3600 + minute * 60 + second) * _US_PER_SECOND + micros
    us = us - offset_minutes * 60 * _US_PER_SECOND
    ok &= (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _epoch_number(texts: pa.Array, rule: str) -> tuple[_MASK, _I64, _MASK]:
    # OpenX's ParsePrimitiveUtils.parseTimestamp: integer text of 13+ characters (the length of
    # "1454612111000") is epoch millis, shorter is epoch seconds. Hive's "millis": always millis.
    matched = _np_bool(pc.match_substring_regex(texts, r"^-?[0-9]+$"))
    short = matched & _np_bool(pc.less_equal(pc.utf8_length(texts), 16))  # beyond is out of range anyway
    values = _np_int(pc.cast(pc.if_else(pa.array(short), texts, pa.scalar(None, pa.string())), pa.int64()), 0)
    if rule == "openx":
        millis = _np_bool(pc.greater_equal(pc.utf8_length(texts), 13))
    else:
        millis = np.ones(len(texts), dtype=bool)
    us = np.where(millis, values * 1000, values * _US_PER_SECOND)
    ok = short & (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _epoch_float(texts: pa.Array) -> tuple[_MASK, _I64, _MASK]:
    matched = _np_bool(pc.match_substring_regex(texts, r"^[+-]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"))
    seconds = pc.cast(pc.if_else(pa.array(matched), texts, pa.scalar(None, pa.string())), pa.float64())
    ms_float = np.asarray(pc.multiply(seconds, 1000.0).fill_null(0.0).to_numpy(zero_copy_only=False))
    in_range = np.abs(ms_float) < 4e14
    ms = np.trunc(np.where(in_range, ms_float, 0.0)).astype(np.int64)  # Java's (long) cast truncates
    us = ms * 1000
    ok = matched & in_range & (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _layout(texts: pa.Array, spec: _TsRegex) -> tuple[_I64, _MASK]:
    """Microseconds and acceptance of each text under one layout."""
    if spec.cast_zone is not None:
        matched = _np_bool(pc.match_substring_regex(texts, spec.pattern))
        rows = np.flatnonzero(matched)
        subset = texts if len(rows) == len(texts) else texts.take(pa.array(rows, pa.int64()))
        try:
            cast = pc.cast(subset, pa.timestamp("us", spec.cast_zone or None))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # e.g. 7-9 fraction digits or one-digit fields: the capture path decides
        else:
            us = np.zeros(len(texts), dtype=np.int64)
            us[rows] = _np_int(pc.cast(cast, pa.int64()), 0)
            ok = matched & (us >= _MIN_US) & (us <= _MAX_US)
            return np.where(ok, us, 0), ok
    _, us, ok = _regex_fields(texts, spec)
    return us, ok


def _parse_instants(texts: pa.Array, specs: Sequence[_TsSpec]) -> tuple[_I64, _MASK]:
    """Microseconds since the epoch for each text (first layout that fits wins); the mask marks
    non-null texts no layout accepts."""
    n = len(texts)
    out = np.zeros(n, dtype=np.int64)
    pending = _valid(texts)
    for spec in specs:
        rows = np.flatnonzero(pending)
        if not len(rows):
            break
        sub = texts if len(rows) == n else texts.take(pa.array(rows, pa.int64()))
        if isinstance(spec, _TsRegex):
            us, ok = _layout(sub, spec)
        elif isinstance(spec, _TsNumber):
            _, us, ok = _epoch_number(sub, spec.rule)
        else:
            _, us, ok = _epoch_float(sub)
        done = rows[ok]
        out[done] = us[ok]
        pending[done] = False
    return out, pending


_Converted: TypeAlias = tuple[pa.Array, _Errs]


class _Kernels:
    """Converts raw arrays to final arrays for one compiled schema and deserializer."""

    def __init__(self, timestamp_specs: Sequence[_TsSpec], timestamp_hint: str) -> None:
        self.timestamp_specs = tuple(timestamp_specs)
        self.timestamp_hint = timestamp_hint

    # -- nested --------------------------------------------------------------------------------

    def convert(self, node: _Node, arr: pa.Array, fast: bool) -> _Converted:
        if isinstance(node, _Leaf):
            out, errs = self.leaf(node, arr)
        elif isinstance(node, _Struct):
            out, errs = self.struct(node, arr, fast)
        elif isinstance(node, _List):
            out, errs = self.list_(node, arr, fast)
        else:
            assert isinstance(node, _MapN)
            out, errs = self.map_(node, arr, fast)
        return out, errs

    def children(
        self, node: _Struct, arrays: Sequence[pa.Array], names: Sequence[str], fast: bool
    ) -> tuple[list[pa.Array], _Errs]:
        errs = _Errs()
        index = {name: i for i, name in enumerate(names)}
        length = len(arrays[0]) if arrays else 0
        out: list[pa.Array] = []
        for child in node.fields:
            at = index.get(child.key if fast else child.name)
            raw = arrays[at] if at is not None else pa.nulls(length, _slow_type(child))
            if _plain(child) and raw.type == _final_type(child):
                out.append(raw)
                continue
            converted, child_errs = self.convert(child, raw, fast)
            errs.extend(child_errs)
            out.append(converted)
        return out, errs

    def required(self, node: _Struct, parent_valid: _MASK, children: Sequence[pa.Array], errs: _Errs) -> None:
        for child, arr in zip(node.fields, children, strict=True):
            if not child.nullable and arr.null_count:
                rows = np.flatnonzero(parent_valid & ~_valid(arr))
                errs.add(rows, [f"required field '{child.path}' is missing or null"] * len(rows))

    def struct(self, node: _Struct, arr: pa.Array, fast: bool) -> _Converted:
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        arrays = [arr.field(i) for i in range(arr.type.num_fields)]
        children, errs = self.children(node, arrays, names, fast)
        valid = _valid(arr)
        self.required(node, valid, children, errs)
        mask = None if arr.null_count == 0 else pa.array(~valid)
        fields = [pa.field(c.name, _final_type(c), nullable=c.nullable) for c in node.fields]
        return pa.StructArray.from_arrays(children, fields=fields, mask=mask), errs

    @staticmethod
    def _list_parts(arr: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray[Any, Any]]:
        offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        start, end = int(offsets[0]), int(offsets[-1])
        values = arr.values.slice(start, end - start)
        offsets = offsets - start
        parents = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
        return pa.array(offsets.astype(np.int32), pa.int32()), values, parents

    def list_(self, node: _List, arr: pa.Array, fast: bool) -> _Converted:
        offsets, values, parents = self._list_parts(arr)
        item = node.element
        converted, item_errs = self.convert(item, values, fast)
        errs = _Errs()
        errs.extend(item_errs, parents)
        if not item.nullable and converted.null_count:
            rows = np.unique(parents[~_valid(converted)])
            errs.add(rows, [f"'{item.path}' holds a null item, which the schema does not allow"] * len(rows))
        mask = None if arr.null_count == 0 else arr.is_null()
        out = pa.ListArray.from_arrays(offsets, converted, type=_final_type(node), mask=mask)
        return out, errs

    def map_(self, node: _MapN, arr: pa.Array, fast: bool) -> _Converted:
        offsets, entries, parents = self._list_parts(arr)
        keys, key_errs = self.convert(node.keys, entries.field("k"), fast)
        items, item_errs = self.convert(node.values, entries.field("v"), fast)
        errs = _Errs()
        errs.extend(key_errs, parents)
        errs.extend(item_errs, parents)
        if not node.values.nullable and items.null_count:
            rows = np.unique(parents[~_valid(items)])
            errs.add(
                rows,
                [f"'{node.values.path}' holds a null value, which the schema does not allow"] * len(rows),
            )
        if keys.null_count:
            # Only rows already failed have null keys; a map cannot hold them, so fill any value.
            keys = keys.fill_null(pa.scalar(_placeholder(node.keys), _final_type(node.keys)))
        mask = None if arr.null_count == 0 else arr.is_null()
        out = pa.MapArray.from_arrays(offsets, keys, items, type=_final_type(node), mask=mask)
        return out, errs

    # -- leaves --------------------------------------------------------------------------------

    def leaf(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        kind = node.kind
        typ = arr.type
        if kind == "string":
            out = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
            if node.length is not None:
                out = pc.utf8_slice_codeunits(out, 0, node.length)
            if node.symbols is not None:
                bad = _valid(out) & ~_np_bool(pc.is_in(out, value_set=pa.array(node.symbols, pa.string())))
                rows = np.flatnonzero(bad)
                errs.add(
                    rows,
                    _messages(out, rows, f"column '{node.path}': {{value}} is not one of the enum symbols"),
                )
                out = _null_where(out, bad)
            return out, errs
        if kind == "bool":
            if pa.types.is_boolean(typ):
                return arr, errs
            low = pc.utf8_lower(arr)
            true, false = _np_bool(pc.equal(low, "true")), _np_bool(pc.equal(low, "false"))
            bad = _valid(arr) & ~(true | false)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not a boolean"))
            return pa.array(true, pa.bool_(), mask=~(true | false)), errs
        if kind == "int":
            return self.integer(node, arr)
        if kind in ("float", "double"):
            target = pa.float32() if kind == "float" else pa.float64()
            if pa.types.is_floating(typ) or pa.types.is_integer(typ):
                return (arr if typ == target else pc.cast(arr, target)), errs
            out, bad = _cast_isolating(arr, target, _FLOAT_TEXT)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not a number"))
            return out, errs
        if kind == "decimal":
            return self.decimal(node, arr)
        if kind == "binary":
            return self.binary(node, arr)
        if kind == "date":
            texts = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
            us, ok = _layout(texts, _DATE)
            bad = _valid(texts) & ~ok
            rows = np.flatnonzero(bad)
            errs.add(
                rows, _messages(texts, rows, f"column '{node.path}': {{value}} is not a date (yyyy-MM-dd)")
            )
            days = (us // _US_PER_DAY).astype(np.int32)
            return pa.array(days, pa.date32(), mask=~ok), errs
        assert kind == "timestamp"
        texts = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
        us, bad = _parse_instants(texts, self.timestamp_specs)
        rows = np.flatnonzero(bad)
        errs.add(
            rows,
            _messages(
                texts,
                rows,
                f"column '{node.path}': cannot parse {{value}} as a timestamp ({self.timestamp_hint})",
            ),
        )
        values = us if node.unit == "us" else np.floor_divide(us, 1000)
        return pa.array(values, pa.timestamp(node.unit), mask=~_valid(texts) | bad), errs

    def integer(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        target = _final_type(node)
        typ = arr.type
        if typ == target:
            return arr, errs
        if pa.types.is_integer(typ):
            values, bad = arr, np.zeros(len(arr), dtype=bool)
        else:
            values, bad = _cast_isolating(arr, pa.int64(), _INT_TEXT)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not an integer"))
        if node.bits < 64:
            lo, hi = -(2 ** (node.bits - 1)), 2 ** (node.bits - 1) - 1
            ints = _np_int(values, 0)
            over = _valid(values) & ((ints < lo) | (ints > hi))
            rows = np.flatnonzero(over)
            name = {8: "tinyint", 16: "smallint", 32: "int"}[node.bits]
            errs.add(
                rows, _messages(values, rows, f"column '{node.path}': {{value}} is out of range for {name}")
            )
            bad = bad | over
            values = pa.array(np.where(over, 0, ints), pa.int64(), mask=~_valid(values) | over)
        return pc.cast(values, target), errs

    def decimal(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        raw_scale = _raw_decimal_scale(node)
        wide = pa.decimal128(38, raw_scale)
        target = _final_type(node)
        if pa.types.is_decimal(arr.type):
            exact: pa.Array | None = arr if arr.type == wide else pc.cast(arr, wide)
        else:
            try:
                exact = pc.cast(arr, wide)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                exact = None
        if exact is None:
            # Some text has more digits than decimal128(38, S) holds: Python's decimal does the
            # same exact rounding for the whole array (rare: over-precise input).
            values: list[decimal.Decimal | None] = []
            bad_rows: list[int] = []
            reasons: list[str] = []
            for i, text in enumerate(arr.to_pylist()):
                value, reason = _py_decimal(text, node)
                values.append(value)
                if reason:
                    bad_rows.append(i)
                    reasons.append(f"column '{node.path}': {reason}")
            errs.add(np.array(bad_rows, dtype=np.int64), reasons)
            return pa.array(values, target), errs
        if raw_scale > node.scale:
            exact = pc.round(exact, ndigits=node.scale, round_mode="half_towards_infinity")
        limit = pa.scalar(decimal.Decimal(10) ** (node.precision - node.scale), wide)
        over = _np_bool(pc.greater_equal(pc.abs(exact), limit))
        rows = np.flatnonzero(over)
        shown = arr if not pa.types.is_decimal(arr.type) else None
        if shown is None and len(rows):
            # Show the number as written rather than padded to the reading scale.
            shown = pa.array([format(d.normalize(), "f") for d in arr.take(pa.array(rows)).to_pylist()])
            rows_shown = np.arange(len(rows))
        else:
            rows_shown = rows
        text = f"column '{node.path}': {{value}} does not fit decimal({node.precision},{node.scale})"
        errs.add(rows, _messages(shown, rows_shown, text) if len(rows) else [])
        if len(rows):
            exact = _null_where(exact, over)
        return pc.cast(exact, target), errs

    def binary(self, node: _Leaf, arr: pa.Array) -> _Converted:
        # base64 has no Arrow kernel; decoding per value is the one per-value loop on the fast path.
        errs = _Errs()
        out: list[bytes | None] = []
        bad_rows: list[int] = []
        reasons: list[str] = []
        for i, text in enumerate(arr.to_pylist()):
            if text is None:
                out.append(None)
                continue
            try:
                if not isinstance(text, str):
                    raise binascii.Error("not a string")
                value = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                out.append(None)
                bad_rows.append(i)
                reasons.append(f"column '{node.path}': {_show(text)} is not valid base64")
                continue
            if node.fixed_size is not None and len(value) != node.fixed_size:
                out.append(None)
                bad_rows.append(i)
                reasons.append(
                    f"column '{node.path}': {len(value)} bytes, but the fixed type holds {node.fixed_size}"
                )
                continue
            out.append(value)
        errs.add(np.array(bad_rows, dtype=np.int64), reasons)
        return pa.array(out, pa.binary()), errs


def _null_where(arr: pa.Array, mask: _MASK) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)


def _placeholder(node: _Leaf) -> Any:
    return {"bool": False, "string": "", "binary": b"", "date": 0, "timestamp": 0}.get(node.kind, 0)


def _cast_isolating(arr: pa.Array, target: pa.DataType, gate: str) -> tuple[pa.Array, _MASK]:
    """Cast text to ``target`` with Arrow's parser; on failure find exactly which values fail.

    Values matching ``gate`` always cast; the others are tried one by one (only on this error
    path), so the result is what a whole-array cast gives wherever that cast would succeed.
    """
    try:
        return pc.cast(arr, target), np.zeros(len(arr), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    valid = _valid(arr)
    gated = _np_bool(pc.match_substring_regex(arr, gate)) & valid
    try:
        base = pc.cast(_null_where(arr, ~gated), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        base = pa.nulls(len(arr), target)
        gated = np.zeros(len(arr), dtype=bool)
    values = base.to_pylist()
    bad = np.zeros(len(arr), dtype=bool)
    for i in np.flatnonzero(valid & ~gated).tolist():
        try:
            values[i] = pc.cast(arr.slice(i, 1), target)[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad[i] = True
            values[i] = None
    return pa.array(values, target), bad


def _py_decimal(text: Any, node: _Leaf) -> tuple[decimal.Decimal | None, str]:
    """Exact decimal parsing and HALF_UP rounding, equal to the Arrow path where both apply."""
    if text is None:
        return None, ""
    if not isinstance(text, str) or not _DECIMAL_TEXT.match(text):
        return None, f"{_show(text)} is not a decimal number"
    context = decimal.Context(prec=200, rounding=decimal.ROUND_HALF_UP, Emax=10_000, Emin=-10_000)
    try:
        value = decimal.Decimal(text)
        quantum = decimal.Decimal(1).scaleb(-node.scale)
        if value.adjusted() >= node.precision - node.scale + 1:
            raise decimal.InvalidOperation
        rounded = value.quantize(quantum, context=context)
    except decimal.DecimalException:
        return None, f"{_show(text)} does not fit decimal({node.precision},{node.scale})"
    if abs(rounded) >= decimal.Decimal(10) ** (node.precision - node.scale):
        return None, f"{_show(text)} does not fit decimal({node.precision},{node.scale})"
    return rounded, ""


# --------------------------------------------------------------------------------------------
# The per-record path: parse each record in Python, normalise it to canonical JSON whose keys are
# the output names and whose scalars are text, and let the same kernels convert that text
# --------------------------------------------------------------------------------------------


class _Num(str):
    """A JSON number kept as its source text: decimals stay exact and OpenX's text rules apply."""

    __slots__ = ()


class _RecordError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# pyarrow's reader (rapidjson) accepts NaN, -NaN, Inf, -Inf, Infinity and -Infinity as numbers;
# the per-record path accepts the same, so a record's fate never depends on which path read it.
_EXACT_DECODER: Final = json.JSONDecoder(parse_int=_Num, parse_float=_Num, parse_constant=_Num)
_PLAIN_DECODER: Final = json.JSONDecoder(parse_constant=_Num)
_NON_FINITE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|(-?)(NaN|Infinity|Inf)(?![A-Za-z0-9_])')


def _spell_non_finite(match: re.Match[str]) -> str:
    if match.group(2) is None:
        return match.group(0)  # a string: left alone
    return "NaN" if match.group(2) == "NaN" else match.group(1) + "Infinity"


_JSON_WS: Final = re.compile(r"[ \t\n\r]*")  # RFC 8259 whitespace, nothing Unicode-wide
_MISSING: Final = object()


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (_Num, int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array"


def _parse_documents(data: bytes, exact: bool) -> list[dict[str, Any]]:
    """The JSON objects in one record (several may be concatenated, as Firehose allows).

    ``exact`` keeps numbers as :class:`_Num` text (needed for decimal columns); otherwise orjson
    parses single-document records and ints/floats are rendered back to text by the normaliser.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, which Jackson (Firehose's parser) skips
    docs: list[Any] = []
    parsed = False
    if not exact:
        try:
            docs = [orjson.loads(data)]
            parsed = True
        except orjson.JSONDecodeError:
            pass  # concatenated objects, or an error the slower decoder describes
    if not parsed:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _RecordError(
                PARSE_ERROR, f"Encountered malformed JSON: invalid UTF-8 at byte {exc.start}"
            ) from None
        try:
            docs = _decode_all(text, exact)
        except ValueError as exc:
            if "NaN" not in text and "Inf" not in text:
                raise _RecordError(PARSE_ERROR, f"Encountered malformed JSON: {exc}") from None
            try:
                docs = _decode_all(_NON_FINITE.sub(_spell_non_finite, text), exact)
            except ValueError:
                raise _RecordError(PARSE_ERROR, f"Encountered malformed JSON: {exc}") from None
        except RecursionError:
            raise _RecordError(PARSE_ERROR, "Encountered malformed JSON: nesting too deep") from None
        if not docs:
            raise _RecordError(
                MALFORMED_DATA, "The record is empty or holds only whitespace; expected a JSON object"
            )
    for doc in docs:
        if isinstance(doc, list):
            raise _RecordError(
                MALFORMED_DATA,
                "A JSON array is not a valid record; send JSON objects (several may be concatenated)",
            )
        if not isinstance(doc, dict):
            raise _RecordError(MALFORMED_DATA, f"The record holds a JSON {_json_kind(doc)}, not an object")
    return docs


def _decode_all(text: str, exact: bool) -> list[Any]:
    decoder = _EXACT_DECODER if exact else _PLAIN_DECODER
    docs = []
    pos = _JSON_WS.match(text).end()  # type: ignore[union-attr]
    while pos < len(text):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    return docs


class _ValueMismatch(Exception):
    pass


class _Normaliser:
    """Maps a parsed JSON object onto the schema following the deserializer's rules.

    Output: nested dicts keyed by output names, lists, ``{"k", "v"}`` entries for maps, and text
    for every scalar, ready for ``orjson.dumps`` and the slow-type reader.
    """

    def __init__(self, openx: bool, fold: bool, dots: bool) -> None:
        self.openx = openx
        self.fold = fold
        self.dots = dots
        # OpenX lower-cases every key it parses, map keys included; the Hive SerDe only matches
        # column names case-insensitively.
        self.fold_map_keys = openx and fold

    def struct(self, node: _Struct, obj: dict[str, Any]) -> dict[str, Any]:
        view = {k.lower(): v for k, v in obj.items()} if self.fold else obj
        dotted: dict[str, Any] | None = None
        out: dict[str, Any] = {}
        for child in node.fields:
            value = view.get(child.key, _MISSING)
            if value is _MISSING and self.dots:
                if dotted is None:
                    dotted = {
                        (k.lower() if self.fold else k).replace(".", "_"): v
                        for k, v in obj.items()
                        if "." in k
                    }
                value = dotted.get(child.key, _MISSING)
            if value is _MISSING or value is None:
                continue
            result = self.value(child, value)
            if result is not None:
                out[child.name] = result
        return out

    def value(self, node: _Node, value: Any) -> Any:
        if isinstance(node, _Leaf):
            return self.leaf(node, value)
        if isinstance(node, _Struct):
            if isinstance(value, dict):
                return self.struct(node, value)
            if self.openx and isinstance(value, list) and not value:
                return None  # OpenX reads [] where an object is expected as null (its issue #113)
            raise self.mismatch(node, "a JSON object", value)
        if isinstance(node, _List):
            if not isinstance(value, list):
                raise self.mismatch(node, "a JSON array", value)
            return [None if v is None else self.value(node.element, v) for v in value]
        assert isinstance(node, _MapN)
        if not isinstance(value, dict):
            raise self.mismatch(node, "a JSON object", value)
        items: dict[str, Any] = {}
        for k, v in value.items():
            items[k.lower() if self.fold_map_keys else k] = v
        return [{"k": k, "v": None if v is None else self.value(node.values, v)} for k, v in items.items()]

    def leaf(self, node: _Leaf, value: Any) -> str:
        kind = _json_kind(value)
        if kind == "number":
            text = (
                value
                if isinstance(value, str)
                else str(value)
                if isinstance(value, int)
                else orjson.dumps(value).decode()
            )
        else:
            text = ""
        target = node.kind
        if target == "string":
            if kind == "string":
                return str(value)
            if kind == "number":
                return str(text)
            if kind == "boolean":
                return "true" if value else "false"
            if self.openx:
                return self.json_text(value)  # OpenX hands nested JSON to string columns as text
            raise self.mismatch(
                node, "a string (the Hive JSON SerDe does not turn nested JSON into text)", value
            )
        if target == "bool":
            if kind == "boolean":
                return "true" if value else "false"
            if kind == "string" and self.openx:
                return str(value)
            raise self.mismatch(node, "a boolean", value)
        if target in ("int", "float", "double", "decimal"):
            if kind == "number":
                return str(text)
            if kind == "string":
                if self.openx:
                    return str(value)
                raise self.mismatch(
                    node, "a number (the Hive JSON SerDe does not read numbers from strings)", value
                )
            raise self.mismatch(node, "a number", value)
        if target == "timestamp":
            if kind in ("number", "string"):
                return str(text) if kind == "number" else str(value)
            raise self.mismatch(node, "a timestamp string or number", value)
        if kind == "string":  # date, binary
            return str(value)
        raise self.mismatch(node, "a string", value)

    def json_text(self, value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, _Num):
            return str.__str__(value)
        if isinstance(value, int):
            return str(value)
        if isinstance(value, (float, str)):
            return orjson.dumps(value).decode()
        if isinstance(value, dict):
            parts = (
                orjson.dumps(k.lower() if self.fold else k).decode() + ":" + self.json_text(v)
                for k, v in value.items()
            )
            return "{" + ",".join(parts) + "}"
        return "[" + ",".join(self.json_text(v) for v in value) + "]"

    @staticmethod
    def mismatch(node: _Node, expected: str, value: Any) -> _ValueMismatch:
        shown = value if not isinstance(value, (dict, list)) else json.dumps(value)
        return _ValueMismatch(
            f"column '{node.path}': expected {expected}, got JSON {_json_kind(value)} {_show(shown)}"
        )


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------

_CHANGED: Final = re.compile(r"Column\((/[^)]*)\) changed from (\w+) to (\w+)")
_NUMERIC_KINDS: Final = ("int", "float", "double", "decimal", "bool")


@dataclass
class _Outcome:
    """Converted rows in record order (failed records have none) and the failures."""

    table: pa.Table
    record_of_row: np.ndarray[Any, np.dtype[np.int64]]
    failures: dict[int, tuple[str, str]]


@dataclass
class _CacheEntry:
    table: pa.Table
    keys: list[bytes]
    nbytes: int


class Converter:
    """Converts JSON records into one Parquet, ORC or Avro file per call (see the module doc).

    Attributes:
        extension: ``.parquet``, ``.orc`` or ``.avro``.
        arrow_schema: the Arrow schema of the written files.
        fingerprint: a stable hash of the schema and the output options (not the deserializer,
            which does not change the file); a change means a new file.
        cache_limit_bytes: the bound of the rows ``check`` keeps for ``convert`` (Arrow bytes).
        path_stats: counters of records read by the vectorised reader and by the per-record
            path, failed vectorised reads and key rewrites.

    Building a converter parses the schema (and, for ``glue``, fetches the table once, with
    bounded timeouts); a problem raises :class:`SchemaError` with a message naming the field.
    ``check`` and ``convert`` are CPU-bound and release the GIL mostly inside pyarrow; call them
    off the event loop.
    """

    def __init__(self, config: FormatConfig) -> None:
        if config.type == "json" or config.schema_ is None:
            raise ValueError("format 'json' needs no conversion; build a Converter for parquet, orc or avro")
        self.config = config
        de = config.deserializer
        self._openx = de.type == "openx_json"
        self._fold = de.case_insensitive if self._openx else True
        self._dots = self._openx and de.convert_dots_in_json_keys_to_underscores
        self._mappings = (
            {self._fold_name(k): self._fold_name(v) for k, v in de.column_to_json_key_mappings.items()}
            if self._openx
            else {}
        )
        avro_text: str | None = None
        if config.schema_.avro_schema is not None:
            avro_text, root = self._from_avro_file(config.schema_.avro_schema)
        else:
            columns = (
                [(c.name, c.type) for c in config.schema_.columns]
                if config.schema_.columns is not None
                else self._glue_columns(config.schema_)
            )
            fields: list[_Node] = []
            for name, type_text in columns:
                try:
                    hive = parse_hive_type(type_text)
                except ValueError as exc:
                    raise SchemaError(f"column {name!r}: {exc}") from None
                fields.append(self._from_hive(hive, name, name))
            root = _Struct("", "", "", False, fields)
        if not self._openx:
            self._no_dots(root)
        self._assign_keys(root)
        self._root = root
        self.arrow_schema = pa.schema(
            [pa.field(c.name, _final_type(c), nullable=c.nullable) for c in root.fields]
        )
        self.extension = {"parquet": ".parquet", "orc": ".orc", "avro": ".avro"}[config.type]
        self._avro_schema: dict[str, Any] | None = None
        if config.type == "avro":
            if avro_text is not None:
                self._avro_schema = json.loads(avro_text)
            else:
                record = _avro_type(root, {})
                record["name"] = "firehose_record"
                self._avro_schema = record
            import fastavro

            try:
                self._avro_parsed = fastavro.parse_schema(self._avro_schema)
            except Exception as exc:  # fastavro raises several exception types for bad schemas
                raise SchemaError(f"Avro schema: {exc}") from None
        self._orc_bloom_ids = self._bloom_ids(config.orc.bloom_filter_columns) if config.type == "orc" else []
        self.fingerprint = self._fingerprint()
        if self._openx:
            specs: tuple[_TsSpec, ...] = _OPENX_TIMESTAMPS
            hint = (
                "accepted: yyyy-MM-dd'T'HH:mm:ss[.S]Z, yyyy-M-d H:mm:ss[.S], "
                "epoch seconds/millis, epoch seconds with fraction"
            )
        else:
            specs = _hive_timestamp_specs(de.timestamp_formats)
            hint = "accepted: " + ", ".join([*de.timestamp_formats, "yyyy-M-d H:m:s[.S]"])
        self._kernels = _Kernels(specs, hint)
        self._normaliser = _Normaliser(self._openx, self._fold, self._dots)
        self._exact_numbers = _has_decimal(root)
        self._fast_enabled = not _has_map(root)
        self._detect = self._fold or self._dots
        self._slow_schema = pa.schema([pa.field(c.name, _slow_type(c)) for c in root.fields])
        self._known_paths: dict[str, _Node] = {}
        self._index_paths(root, "")
        self._overrides: dict[str, str] = {}
        self._variant_patterns: tuple[str, str, str] | None = None
        self._dense_streak = 0
        self._calls = 0
        self._fast_schema_cache: pa.Schema | None = None
        self._lock = threading.Lock()
        self.cache_limit_bytes = CACHE_LIMIT_BYTES
        self._cache: OrderedDict[int, _CacheEntry] = OrderedDict()
        self._cache_index: dict[bytes, int] = {}  # record -> entry << 48 | first row << 16 | rows
        self._cache_bytes = 0
        self._next_entry = 0
        #: Counters for monitoring and benchmarks: records converted by the vectorised reader
        #: and by the per-record path, failed vectorised reads, and key rewrites.
        self.path_stats: dict[str, int] = {
            "fast_records": 0,
            "slow_records": 0,
            "fast_failures": 0,
            "key_rewrites": 0,
        }

    # -- schema ----------------------------------------------------------------------------------

    def _fold_name(self, name: str) -> str:
        return name.lower() if self._fold else name

    def _from_hive(self, hive: HiveType, name: str, path: str) -> _Node:
        if isinstance(hive, HivePrimitive):
            return _leaf_from_hive(hive, name, name, path)
        if isinstance(hive, HiveArray):
            return _List(name, name, path, True, self._from_hive(hive.item, "item", path + "[]"))
        if isinstance(hive, HiveMap):
            key = _leaf_from_hive(hive.key, "key", "key", path + "{}")
            key.nullable = False
            return _MapN(name, name, path, True, key, self._from_hive(hive.value, "value", path + "{}"))
        return _Struct(name, name, path, True, [self._from_hive(t, n, f"{path}.{n}") for n, t in hive.fields])

    def _from_avro_file(self, path_text: str) -> tuple[str, _Struct]:
        try:
            text = Path(path_text).read_text(encoding="utf-8")
            schema = json.loads(text)
        except OSError as exc:
            raise SchemaError(f"avro_schema {path_text!r}: cannot read it: {exc}", ENTITY_NOT_FOUND) from None
        except ValueError as exc:
            raise SchemaError(f"avro_schema {path_text!r}: not JSON: {exc}") from None
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise SchemaError(f"avro_schema {path_text!r}: the top level must be a record")
        node = _AvroReader().node(schema, "", "")
        assert isinstance(node, _Struct)
        node.nullable = False
        return text, node

    def _glue_columns(self, schema: SchemaConfig) -> list[tuple[str, str]]:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        glue = schema.glue
        assert glue is not None
        client = boto3.client(
            "glue",
            region_name=glue.region,
            endpoint_url=glue.endpoint_url,
            config=Config(
                connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}
            ),
        )
        where = f"Glue table {glue.database}.{glue.table} ({glue.region})"
        try:
            table = client.get_table(DatabaseName=glue.database, Name=glue.table)["Table"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            message = exc.response.get("Error", {}).get("Message", str(exc))
            if code == "EntityNotFoundException":
                raise SchemaError(f"{where} not found: {message}", ENTITY_NOT_FOUND) from None
            raise SchemaError(f"{where}: {code}: {message}") from None
        except BotoCoreError as exc:
            raise SchemaError(f"{where}: {exc}") from None
        columns = table.get("StorageDescriptor", {}).get("Columns", [])
        if not columns:
            raise SchemaError(f"{where} has no columns in its storage descriptor")
        return [(c["Name"], c["Type"]) for c in columns]

    def _no_dots(self, node: _Node) -> None:
        if isinstance(node, _Struct):
            for child in node.fields:
                if "." in child.name:
                    raise SchemaError(
                        f"field {child.path!r}: the Hive JSON SerDe rejects dots in column names"
                    )
                self._no_dots(child)
        elif isinstance(node, _List):
            self._no_dots(node.element)
        elif isinstance(node, _MapN):
            self._no_dots(node.values)

    def _assign_keys(self, node: _Node) -> None:
        """Set each struct field's JSON key (folded, mapped) and refuse two fields sharing one."""
        if isinstance(node, _Struct):
            seen: dict[str, str] = {}
            for child in node.fields:
                folded = self._fold_name(child.name)
                child.key = self._mappings.get(folded, folded)
                if child.key in seen:
                    raise SchemaError(
                        f"fields {seen[child.key]!r} and {child.path!r} both read the JSON key {child.key!r}"
                    )
                seen[child.key] = child.path
                self._assign_keys(child)
        elif isinstance(node, _List):
            self._assign_keys(node.element)
        elif isinstance(node, _MapN):
            self._assign_keys(node.values)

    def _index_paths(self, node: _Node, prefix: str) -> None:
        # Paths as pyarrow's JSON reader names them in errors: /user/id, /tags/[], /items/[]/sku.
        if isinstance(node, _Struct):
            for child in node.fields:
                path = f"{prefix}/{child.key}"
                self._known_paths[path] = child
                self._index_paths(child, path)
        elif isinstance(node, _List):
            path = f"{prefix}/[]"
            self._known_paths[path] = node.element
            self._index_paths(node.element, path)

    def _bloom_ids(self, names: list[str]) -> list[int]:
        # ORC numbers columns in pre-order with 0 for the root struct; nested types take ids too.
        def size(t: pa.DataType) -> int:
            return 1 + sum(size(t.field(i).type) for i in range(t.num_fields))

        ids: dict[str, int] = {}
        next_id = 1
        for f in self.arrow_schema:
            ids[f.name.lower()] = next_id
            next_id += size(f.type)
        out = []
        for name in names:
            if name.lower() not in ids:
                raise SchemaError(f"orc.bloom_filter_columns: no top-level column {name!r}")
            out.append(ids[name.lower()])
        return out

    def _fingerprint(self) -> str:
        options: dict[str, Any] = {"type": self.config.type, "schema": str(self.arrow_schema)}
        if self.config.type == "parquet":
            options["parquet"] = self.config.parquet.model_dump()
        elif self.config.type == "orc":
            options["orc"] = self.config.orc.model_dump()
        else:
            options["avro"] = self._avro_schema
        blob = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    # -- public API ------------------------------------------------------------------------------

    def check(self, records: Sequence[bytes]) -> list[tuple[str, str] | None]:
        """Per record: ``None`` when it converts, else ``(error_code, error_message)``.

        A record may hold several concatenated JSON objects (each becomes a row); it fails as a
        whole if any of them fails. The converted rows are cached for :meth:`convert`.
        """
        records = _as_bytes(records)
        outcome = self._process(records)
        self._remember(records, outcome)
        verdicts: list[tuple[str, str] | None] = [None] * len(records)
        for i, failure in outcome.failures.items():
            verdicts[i] = failure
        return verdicts

    def convert(self, records: Sequence[bytes]) -> bytes:
        """The whole output file holding these records' rows, in record order.

        Raises :class:`ConversionError` if any record does not convert (``check`` reports the
        same failures).
        """
        records = _as_bytes(records)
        table = self._from_cache(records)
        if table is None:
            outcome = self._process(records)
            if outcome.failures:
                raise ConversionError(outcome.failures)
            table = outcome.table
        return self._write(table)

    def clear_cache(self) -> None:
        """Forget the rows ``check`` kept for ``convert``."""
        with self._lock:
            self._cache.clear()
            self._cache_index.clear()
            self._cache_bytes = 0

    # -- cache -----------------------------------------------------------------------------------

    def _remember(self, records: list[bytes], outcome: _Outcome) -> None:
        """Keep the converted rows of these records for ``convert`` (keyed by content)."""
        n = len(records)
        table = outcome.table
        if not n or table.nbytes > self.cache_limit_bytes or table.num_rows >= 1 << 32:
            return
        counts = np.bincount(outcome.record_of_row, minlength=n).astype(np.int64)
        starts = np.cumsum(counts) - counts
        keep = counts < 1 << 16  # a record with that many objects is simply not cached
        if outcome.failures:
            keep[np.fromiter(outcome.failures, np.int64, len(outcome.failures))] = False
        with self._lock:
            entry_id = self._next_entry
            self._next_entry = (self._next_entry + 1) % _ENTRY_IDS
            packed = (entry_id << 48) | (starts << 16) | counts
            if keep.all():
                keys = records
                self._cache_index.update(zip(records, packed.tolist(), strict=True))
            else:
                rows = np.flatnonzero(keep).tolist()
                keys = [records[i] for i in rows]
                self._cache_index.update(zip(keys, packed[rows].tolist(), strict=True))
            self._cache[entry_id] = _CacheEntry(table, keys, table.nbytes)
            self._cache_bytes += table.nbytes
            while self._cache and (
                self._cache_bytes > self.cache_limit_bytes or len(self._cache) > _MAX_CACHE_ENTRIES
            ):
                old_id, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
                for key in old.keys:
                    value = self._cache_index.get(key)
                    if value is not None and value >> 48 == old_id:
                        del self._cache_index[key]

    def _from_cache(self, records: list[bytes]) -> pa.Table | None:
        """The rows ``check`` produced for exactly these records, or None if any is unknown."""
        n = len(records)
        if not n:
            return None
        with self._lock:
            packed = np.fromiter(map(self._cache_index.get, records, repeat(-1)), np.int64, n)
            if (packed < 0).any():
                return None
            entry = packed >> 48
            tables = {int(e): self._cache[int(e)].table for e in np.unique(entry)}
        start = (packed >> 16) & 0xFFFFFFFF
        count = packed & 0xFFFF
        # Runs of records whose rows follow each other in one cached table become one slice;
        # records converted in a batch and delivered in the same order give one run per batch.
        cut = np.flatnonzero((entry[1:] != entry[:-1]) | (start[1:] != start[:-1] + count[:-1])) + 1
        bounds = np.concatenate(([0], cut, [n]))
        if len(bounds) - 1 <= _MAX_CACHE_ENTRIES:
            totals = np.concatenate(([0], np.cumsum(count)))
            slices = [
                tables[int(entry[a])].slice(int(start[a]), int(totals[b] - totals[a]))
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
            ]
            return slices[0] if len(slices) == 1 else pa.concat_tables(slices)
        return None

    # -- conversion ------------------------------------------------------------------------------

    def _process(self, records: list[bytes]) -> _Outcome:
        failures: dict[int, tuple[str, str]] = {}
        pieces: list[tuple[np.ndarray[Any, Any], pa.Table]] = []
        slow: list[int] = []
        with self._lock:
            self._calls += 1
            skip = self._dense_streak >= _DENSE_STREAK and self._calls % _RETRY_FAST != 0
        if self._fast_enabled and records and not skip:
            prepared = _Prepared(records)
            slow.extend(np.flatnonzero(~prepared.ok).tolist())
            fast_rows = np.flatnonzero(prepared.ok)
            if len(fast_rows):
                for rows, raw in self._fast_pieces(prepared, fast_rows, slow):
                    table, errs = self._convert_raw(raw, fast=True)
                    for row, message in errs.first_by_row().items():
                        failures.setdefault(int(rows[row]), (MALFORMED_DATA, message))
                    pieces.append((rows, table))
        else:
            slow = list(range(len(records)))
        with self._lock:
            self.path_stats["fast_records"] += len(records) - len(slow)
            self.path_stats["slow_records"] += len(slow)
        if slow:
            slow.sort()
            record_of_row, raw = self._slow_raw(records, slow, failures)
            if raw is not None:
                table, errs = self._convert_raw(raw, fast=False)
                for row, message in errs.first_by_row().items():
                    failures.setdefault(int(record_of_row[row]), (MALFORMED_DATA, message))
                pieces.append((record_of_row, table))
        return self._assemble(pieces, failures)

    def _assemble(
        self, pieces: list[tuple[np.ndarray[Any, Any], pa.Table]], failures: dict[int, tuple[str, str]]
    ) -> _Outcome:
        if not pieces:
            empty = self.arrow_schema.empty_table()
            return _Outcome(empty, np.zeros(0, np.int64), failures)
        owners = np.concatenate([p[0] for p in pieces]).astype(np.int64)
        table = pieces[0][1] if len(pieces) == 1 else pa.concat_tables([p[1] for p in pieces])
        keep = np.ones(len(owners), dtype=bool)
        if failures:
            keep = ~np.isin(owners, np.fromiter(failures, np.int64, len(failures)))
        order = np.argsort(owners, kind="stable")
        in_order = bool(np.all(order == np.arange(len(order))))
        if in_order and keep.all():
            return _Outcome(table, owners, failures)
        order = order[keep[order]]
        return _Outcome(table.take(pa.array(order, pa.int64())), owners[order], failures)

    def _convert_raw(self, raw: pa.Table, fast: bool) -> tuple[pa.Table, _Errs]:
        """Apply the kernels column by column; columns the reader already produced in their
        final form stay as they are (chunked, zero-copy)."""
        errs = _Errs()
        index = {name: i for i, name in enumerate(raw.schema.names)}
        columns: list[pa.ChunkedArray] = []
        for child in self._root.fields:
            at = index.get(child.key if fast else child.name)
            column = (
                raw.column(at)
                if at is not None
                else pa.chunked_array([pa.nulls(raw.num_rows, _slow_type(child))])
            )
            if _plain(child) and column.type == _final_type(child):
                columns.append(column)
                continue
            converted, child_errs = self._kernels.convert(child, column.combine_chunks(), fast)
            errs.extend(child_errs)
            if not child.nullable and converted.null_count:
                rows = np.flatnonzero(~_valid(converted))
                errs.add(rows, [f"required field '{child.path}' is missing or null"] * len(rows))
            columns.append(pa.chunked_array([converted], type=_final_type(child)))
        return pa.Table.from_arrays(columns, schema=self.arrow_schema), errs

    # -- fast path -------------------------------------------------------------------------------

    def _fast_type(self, node: _Node) -> pa.DataType:
        if isinstance(node, _Leaf):
            override = self._overrides.get(node.path)
            if override == "string":
                return pa.string()
            if override == "int64":
                return pa.int64()
            if node.kind in ("bool", "int", "float", "double"):
                return _final_type(node)
            if node.kind == "decimal":
                return pa.decimal128(38, _raw_decimal_scale(node))
            return pa.string()
        if isinstance(node, _Struct):
            return pa.struct([pa.field(c.key, self._fast_type(c)) for c in node.fields])
        assert isinstance(node, _List)
        return pa.list_(self._fast_type(node.element))

    def _fast_schema(self) -> pa.Schema:
        with self._lock:
            if self._fast_schema_cache is None:
                self._fast_schema_cache = pa.schema(
                    [pa.field(c.key, self._fast_type(c)) for c in self._root.fields]
                )
            return self._fast_schema_cache

    def _adapt(self, node: _Node, seen_kind: str, tried: set[tuple[str, str]]) -> bool:
        """Switch a leaf's raw reader type to what the data holds, when the deserializer allows
        that JSON type (OpenX numbers as strings, epoch numbers for timestamps)."""
        if not isinstance(node, _Leaf):
            return False
        if node.kind == "timestamp":
            wanted = {"number": "int64", "string": ""}.get(seen_kind)
        elif node.kind in _NUMERIC_KINDS and self._openx:
            wanted = {"string": "string", "number": "", "boolean": ""}.get(seen_kind)
        else:
            wanted = None
        if wanted is None or (node.path, wanted) in tried:
            return False
        with self._lock:
            if self._overrides.get(node.path, "") == wanted:
                return False
            if wanted:
                self._overrides[node.path] = wanted
            else:
                self._overrides.pop(node.path, None)
            self._fast_schema_cache = None
        tried.add((node.path, wanted))
        return True

    def _variants(self, fields: Iterator[pa.Field] | pa.Schema, node: _Struct, out: set[str]) -> None:
        """Collect JSON keys that are another spelling (case, dots) of an expected key."""
        expected = {c.key: c for c in node.fields}
        for f in fields:
            child = expected.get(f.name)
            if child is None:
                folded = f.name.lower() if self._fold else f.name
                if self._dots:
                    folded = folded.replace(".", "_")
                child = expected.get(folded)
                if child is None:
                    continue
                out.add(f.name)  # and look inside it too, so one rewrite fixes every level
            typ = f.type
            while isinstance(child, _List) and pa.types.is_list(typ):
                child, typ = child.element, typ.value_type
            if isinstance(child, _Struct) and pa.types.is_struct(typ):
                self._variants((typ.field(i) for i in range(typ.num_fields)), child, out)

    def _rewrite(self, buf: Any, variants: set[str]) -> Any:
        """``buf`` with every key in ``variants`` renamed to its folded spelling.

        A string followed by a colon is always a key in valid JSON, so replacing '"Key":' by
        '"key":' renames exactly keys (at any depth, which is what folding means). Spellings this
        misses (a space before the colon, escapes) are still there when the result is re-read,
        and those records take the per-record path.
        """
        text = _text_view(buf)
        for name in sorted(variants):
            folded = name.lower() if self._fold else name
            if self._dots:
                folded = folded.replace(".", "_")
            pattern = orjson.dumps(name) + b":"
            text = pc.replace_substring(text, pattern.decode(), (orjson.dumps(folded) + b":").decode())
        offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + 2]
        return text.buffers()[2].slice(int(offsets[0]), int(offsets[1] - offsets[0]))

    def _maybe_variant(self, buf: Any) -> bool:
        """Could a key in ``buf`` need rewriting? Used when unknown fields could not be inferred.

        Counts the keys that equal an expected key once folded (any case; ``.`` for ``_`` when
        dots are converted) against the keys that are spelled exactly: a difference means some
        key needs rewriting. Keys with escapes are not compared and count as suspect.
        """
        if self._variant_patterns is None:
            keys = sorted({p.rsplit("/", 1)[1] for p in self._known_paths if not p.endswith("/[]")})

            def spelled(key: str) -> str:
                text = _re2_literal(key)
                return text.replace("_", "[._]") if self._dots else text

            folded = "(?i:" if self._fold else "(?:"
            self._variant_patterns = (
                '"' + folded + "|".join(spelled(k) for k in keys) + ')"[ \t\n\r]*:',
                '"(?:' + "|".join(_re2_literal(k) for k in keys) + ')"[ \t\n\r]*:',
                r'"(?:[^"\\]|\\.)*\\(?:[^"\\]|\\.)*"[ \t\n\r]*:',
            )
        text = _text_view(buf)
        loose, exact, escaped = (pc.count_substring_regex(text, p)[0].as_py() for p in self._variant_patterns)
        return bool(loose != exact or escaped)

    def _attempt(self, buf: Any, n: int) -> pa.Table | None:
        """Read ``n`` prepared records with pyarrow; None when they need the per-record path."""
        tried: set[tuple[str, str]] = set()
        mode = "infer" if self._detect else "ignore"
        rewrites = 0
        for _ in range(4 * len(self._known_paths) + 8):
            options = pj.ParseOptions(explicit_schema=self._fast_schema(), unexpected_field_behavior=mode)
            try:
                table = pj.read_json(
                    pa.BufferReader(buf), read_options=_read_options(len(buf)), parse_options=options
                )
            except pa.ArrowException as exc:
                match = _CHANGED.search(str(exc))
                if match is not None and match.group(1) in self._known_paths:
                    if self._adapt(self._known_paths[match.group(1)], match.group(3), tried):
                        continue
                    return None
                if mode == "infer":
                    # Possibly an unknown field whose type varies: read without inferring.
                    mode = "ignore"
                    continue
                return None
            if table.num_rows != n:
                return None  # concatenated objects (or a stray value) in some record
            if mode == "infer":
                variants: set[str] = set()
                self._variants(table.schema, self._root, variants)
                if not variants:
                    return table
                if rewrites == 2:
                    return None
                rewrites += 1
                with self._lock:
                    self.path_stats["key_rewrites"] += 1
                buf = self._rewrite(buf, variants)
                continue
            if self._detect and self._maybe_variant(buf):
                return None
            return table
        return None

    def _fast_pieces(
        self, prepared: _Prepared, rows: np.ndarray[Any, Any], slow: list[int]
    ) -> Iterator[tuple[np.ndarray[Any, Any], pa.Table]]:
        """Read the records by halving failing chunks until each failure is pinned to a few
        records (which go to ``slow``); yields (record indices, raw table) pieces."""
        level: list[np.ndarray[Any, Any]] = [rows]
        first = True
        while level:
            failed = []
            for chunk in level:
                data = prepared.buffer if first else prepared.subset(chunk)
                table = self._attempt(data, len(chunk))
                if table is None:
                    with self._lock:
                        self.path_stats["fast_failures"] += 1
                    failed.append(chunk)
                else:
                    yield chunk, table
            first = False
            if not failed:
                if self._dense_streak:
                    with self._lock:
                        self._dense_streak = 0
                return
            if (len(failed) == len(level) and len(level) >= _DENSE_LEVEL_CHUNKS) or len(failed) * 64 > len(
                rows
            ):
                # Errors everywhere: most records end on the per-record path anyway, and every
                # further level would parse the failing data once more.
                for chunk in failed:
                    slow.extend(chunk.tolist())
                with self._lock:
                    self._dense_streak += 1
                return
            level = []
            for chunk in failed:
                if len(chunk) <= _MIN_BISECT_RECORDS:
                    slow.extend(chunk.tolist())
                else:
                    half = len(chunk) // 2
                    level += [chunk[:half], chunk[half:]]

    # -- per-record path -------------------------------------------------------------------------

    def _slow_raw(
        self, records: list[bytes], indices: list[int], failures: dict[int, tuple[str, str]]
    ) -> tuple[np.ndarray[Any, Any], pa.Table | None]:
        lines: list[bytes] = []
        owners: list[int] = []
        for i in indices:
            try:
                docs = _parse_documents(records[i], self._exact_numbers)
                out = [orjson.dumps(self._normaliser.struct(self._root, doc)) for doc in docs]
            except _RecordError as exc:
                failures[i] = (exc.code, exc.message)
                continue
            except _ValueMismatch as exc:
                failures[i] = (MALFORMED_DATA, str(exc))
                continue
            except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate escape in a string
                failures[i] = (MALFORMED_DATA, f"a string is not valid Unicode: {exc}")
                continue
            lines.extend(out)
            owners.extend([i] * len(out))
        if not lines:
            return np.zeros(0, np.int64), None
        options = pj.ParseOptions(explicit_schema=self._slow_schema, unexpected_field_behavior="ignore")
        data = b"\n".join(lines)
        try:
            table = pj.read_json(
                pa.BufferReader(data), read_options=_read_options(len(data)), parse_options=options
            )
        except pa.ArrowException:
            # The canonical JSON always fits the text schema; should pyarrow still refuse a
            # line, find it rather than fail the batch.
            tables: list[pa.Table] = []
            kept: list[int] = []
            for line, owner in zip(lines, owners, strict=True):
                try:
                    part = pj.read_json(pa.BufferReader(line), parse_options=options)
                except pa.ArrowException as exc:
                    failures[owner] = (MALFORMED_DATA, f"the record could not be read: {exc}")
                    continue
                tables.append(part)
                kept.append(owner)
            # A record whose other object failed fails whole: drop its good rows too.
            rows = [i for i, owner in enumerate(kept) if owner not in failures]
            if not rows:
                return np.zeros(0, np.int64), None
            table = pa.concat_tables([tables[i] for i in rows])
            owners = [kept[i] for i in rows]
        return np.array(owners, dtype=np.int64), table

    # -- writers ---------------------------------------------------------------------------------

    def _write(self, table: pa.Table) -> bytes:
        sink = io.BytesIO()
        kind = self.config.type
        if kind == "parquet":
            import pyarrow.parquet as pq

            opts = self.config.parquet
            row_bytes = max(1, table.nbytes // max(1, table.num_rows))
            pq.write_table(
                table,
                sink,
                compression="none" if opts.compression == "uncompressed" else opts.compression,
                row_group_size=max(1024, opts.block_size_mib * 1024 * 1024 // row_bytes),
                data_page_size=opts.page_size_kib * 1024,
                use_dictionary=opts.enable_dictionary,
                data_page_version="1.0" if opts.writer_version == "v1" else "2.0",
            )
        elif kind == "orc":
            import pyarrow.orc as po

            orc = self.config.orc
            po.write_table(
                table,
                sink,
                compression="uncompressed" if orc.compression == "none" else orc.compression,
                stripe_size=orc.stripe_size_mib * 1024 * 1024,
                row_index_stride=orc.row_index_stride,
                bloom_filter_columns=self._orc_bloom_ids or None,
                bloom_filter_fpp=orc.bloom_filter_false_positive_probability,
                dictionary_key_size_threshold=orc.dictionary_key_threshold or 0.0,
            )
        else:
            import fastavro

            fastavro.writer(sink, self._avro_parsed, _avro_rows(table, self._root), codec="snappy")
        return sink.getvalue()


def _text_view(buf: Any) -> pa.Array:
    """A one-element large_string array over ``buf`` (bytes or a pa.Buffer), without a copy."""
    data = pa.py_buffer(buf) if isinstance(buf, bytes) else buf
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, data])


def _as_bytes(records: Sequence[bytes]) -> list[bytes]:
    # Records are dictionary keys of the cache and are stripped, so they must be bytes proper.
    if isinstance(records, list) and set(map(type, records)) <= {bytes}:
        return records
    return [r if type(r) is bytes else bytes(r) for r in records]


def _read_options(size: int) -> pj.ReadOptions:
    # pyarrow parses blocks in parallel; a batch smaller than a block per core (the daemon checks
    # 1 MiB processing batches) gets smaller blocks so every core takes part.
    block = min(1 << 20, max(128 << 10, -(-size // max(1, pa.cpu_count()))))
    return pj.ReadOptions(use_threads=True, block_size=block)


def _avro_rows(table: pa.Table, root: _Struct) -> Iterator[dict[str, Any]]:
    """Rows for fastavro: maps become dicts (or key/value records for non-string keys)."""
    needs_fix = _has_map(root)
    for batch in table.to_batches():
        for row in batch.to_pylist():
            yield _avro_fix(root, row) if needs_fix else row


def _avro_fix(node: _Node, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(node, _Struct):
        return {c.name: _avro_fix(c, value[c.name]) for c in node.fields}
    if isinstance(node, _List):
        return [_avro_fix(node.element, v) for v in value]
    if isinstance(node, _MapN):
        if node.keys.kind == "string":
            return {k: _avro_fix(node.values, v) for k, v in value}
        return [{"key": k, "value": _avro_fix(node.values, v)} for k, v in value]
    return value


class _Prepared:
    """The records as NDJSON for pyarrow, and which records it must not see.

    A record goes to the per-record path unless it is one ``{...}`` line of valid UTF-8: a line
    that starts with ``null`` at a block boundary crashes pyarrow 26's JSON reader, so every line
    it gets must start with ``{``, and a record spanning lines could otherwise split that way.
    The common shape (every record ``{...}\\n``) is checked with numpy on one Arrow copy of the
    data, which then is the buffer pyarrow reads.
    """

    def __init__(self, records: list[bytes]) -> None:
        n = len(records)
        self.records = records
        self.stripped: list[bytes] | None = None
        arr = pa.array(records, pa.large_binary())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
        starts, ends = offsets[:-1], offsets[1:]
        data = arr.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
        ok = (ends - starts) >= 3
        if n and ok.all():
            ok &= (raw[starts] == ord("{")) & (raw[ends - 1] == ord("\n")) & (raw[ends - 2] == ord("}"))
        if (
            n
            and ok.all()
            and int(np.count_nonzero(raw[offsets[0] : offsets[-1]] <= 13)) == n
            and _valid_utf8(arr)
        ):
            # Fast shape: one object per record, each ending in its only newline, no CR or tab.
            self.arrow = arr
            self.ok = ok
            self.buffer: Any = data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            return
        self.arrow = None
        stripped = [r.strip(b" \t\r\n") for r in records]
        self.stripped = stripped
        lengths = np.fromiter(map(len, stripped), dtype=np.int64, count=n)
        buf = b"\n".join(stripped)
        joined = np.frombuffer(buf, dtype=np.uint8)
        ok = lengths > 0
        if len(joined):
            first_at = np.zeros(n, dtype=np.int64)
            first_at[1:] = np.cumsum(lengths[:-1] + 1)
            first = joined[np.minimum(first_at, len(joined) - 1)]
            last = joined[np.clip(first_at + lengths - 1, 0, len(joined) - 1)]
            ok &= (first == ord("{")) & (last == ord("}"))
        if int(np.count_nonzero(joined == ord("\n"))) != n - 1:
            ok &= np.fromiter((b"\n" not in r for r in stripped), dtype=bool, count=n)
        if buf.find(b"\r") >= 0:
            ok &= np.fromiter((b"\r" not in r for r in stripped), dtype=bool, count=n)
        if not _is_utf8_buffer(buf):
            ok &= np.fromiter((_is_utf8(r) for r in stripped), dtype=bool, count=n)
        if not ok.all():
            buf = b"\n".join([r for r, good in zip(stripped, ok.tolist(), strict=True) if good])
        self.ok = ok
        self.buffer = buf

    def subset(self, rows: np.ndarray[Any, Any]) -> Any:
        """NDJSON of the given (accepted) records."""
        if self.arrow is not None:
            part = self.arrow.take(pa.array(rows, pa.int64()))
            offsets = np.frombuffer(part.buffers()[1], dtype=np.int64)[
                part.offset : part.offset + len(rows) + 1
            ]
            return part.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        assert self.stripped is not None
        return b"\n".join([self.stripped[i] for i in rows.tolist()])


def _valid_utf8(arr: pa.Array) -> bool:
    try:
        arr.cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _is_utf8_buffer(buf: bytes) -> bool:
    return _valid_utf8(pa.array([buf], pa.large_binary()))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
