"""Record format conversion: JSON records to Parquet, ORC or Avro files (Firehose's DataFormatConversion).

The daemon uses this package in two steps (reference §5):

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

**Layout.** :mod:`.config` (the pydantic models), :mod:`.errors` (codes, exceptions), :mod:`.hive`
(type strings), :mod:`.schema` (resolving a schema, the only I/O, and compiling it into
:mod:`.nodes`), :mod:`.avro`, :mod:`.timestamps`, :mod:`.arrays` and :mod:`.kernels` (the
vectorised conversion), :mod:`.normalise` (the per-record path), :mod:`.fastpath` (the vectorised
reader) and :mod:`.converter`.
"""

from __future__ import annotations

from firehose.transforms.formats.config import (
    ColumnConfig,
    DeserializerConfig,
    FormatConfig,
    GlueConfig,
    OrcOptions,
    ParquetOptions,
    SchemaConfig,
)
from firehose.transforms.formats.converter import CACHE_LIMIT_BYTES as CACHE_LIMIT_BYTES
from firehose.transforms.formats.converter import Converter
from firehose.transforms.formats.errors import (
    ENTITY_NOT_FOUND,
    INVALID_SCHEMA,
    MALFORMED_DATA,
    PARSE_ERROR,
    ConversionError,
    SchemaError,
)
from firehose.transforms.formats.hive import HiveArray as HiveArray
from firehose.transforms.formats.hive import HiveMap as HiveMap
from firehose.transforms.formats.hive import HivePrimitive as HivePrimitive
from firehose.transforms.formats.hive import HiveStruct as HiveStruct
from firehose.transforms.formats.hive import HiveType as HiveType
from firehose.transforms.formats.hive import parse_hive_type
from firehose.transforms.formats.schema import ResolvedSchema, resolve_schema

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
    "ResolvedSchema",
    "SchemaConfig",
    "SchemaError",
    "parse_hive_type",
    "resolve_schema",
]
