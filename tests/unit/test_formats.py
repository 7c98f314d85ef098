"""Record format conversion (firehose.transforms.formats): JSON records to Parquet, ORC and Avro.

Files are read back with readers independent of the writer where one exists (DuckDB for
Parquet, fastavro for Avro) and compared value by value with what the input says.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from firehose.transforms.formats import (
    ConversionError,
    Converter,
    FormatConfig,
    SchemaError,
    parse_hive_type,
)

BENCH = Path(__file__).resolve().parents[2] / "bench"
GENERATOR = BENCH / "clickstream.py"  # the project's seeded clickstream generator
UTC = dt.UTC

# Firehose's format-conversion error codes (its CloudWatch Logs error codes for data format
# conversion), written out rather than imported from the module under test.
PARSE_ERROR = "DataFormatConversion.ParseError"
MALFORMED_DATA = "DataFormatConversion.MalformedData"
ENTITY_NOT_FOUND = "DataFormatConversion.EntityNotFound"


def converter(columns: list[tuple[str, str]], kind: str = "parquet", **extra: Any) -> Converter:
    spec: dict[str, Any] = {"type": kind, "schema": {"columns": [{"name": n, "type": t} for n, t in columns]}}
    spec.update(extra)
    return Converter(FormatConfig.model_validate(spec))


def rows_of(conv: Converter, blob: bytes) -> list[dict[str, Any]]:
    """Read a converted file back with the format's own reader (threads off: pyarrow 26 can abort
    at interpreter exit after a threaded read of nested Parquet columns)."""
    if conv.extension == ".parquet":
        return pq.read_table(io.BytesIO(blob), use_threads=False).to_pylist()  # type: ignore[no-any-return]
    if conv.extension == ".orc":
        return orc.ORCFile(io.BytesIO(blob)).read().to_pylist()  # type: ignore[no-any-return]
    return [_naive(r) for r in fastavro.reader(io.BytesIO(blob))]


def _naive(value: Any) -> Any:
    # fastavro returns timestamp-millis as aware UTC datetimes; the Arrow side is naive UTC.
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, dict):
        return {k: _naive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_naive(v) for v in value]
    return value


def duckdb_rows(blob: bytes, tmp_path: Path) -> list[dict[str, Any]]:
    import duckdb
    path = tmp_path / "independent.parquet"
    path.write_bytes(blob)
    con = duckdb.connect()
    try:
        cur = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def lines(*docs: Any) -> list[bytes]:
    return [json.dumps(d).encode() + b"\n" for d in docs]


# ---------------------------------------------------------------------------------------------
# Every type, through every format
# ---------------------------------------------------------------------------------------------

ALL_TYPES = [
    ("b", "boolean"),
    ("i8", "tinyint"),
    ("i16", "smallint"),
    ("i32", "int"),
    ("i64", "bigint"),
    ("f32", "float"),
    ("f64", "double"),
    ("dec", "decimal(10,2)"),
    ("s", "string"),
    ("c", "char(3)"),
    ("vc", "varchar(4)"),
    ("bin", "binary"),
    ("d", "date"),
    ("ts", "timestamp"),
    ("arr", "array<int>"),
    ("m", "map<string,bigint>"),
    ("mi", "map<int,string>"),
    ("st", "struct<id:bigint,tags:array<string>,geo:struct<lat:double,lon:double>,attrs:map<string,string>>"),
    ("deep", "array<struct<k:string,v:array<decimal(5,1)>>>"),
]

ALL_INPUT = [
    {
        "b": True,
        "i8": -128,
        "i16": 32767,
        "i32": -2147483648,
        "i64": 9223372036854775807,
        "f32": 1.5,
        "f64": 2.718281828459045,
        "dec": 12345678.125,
        "s": "héllo ☃",
        "c": "abcdef",
        "vc": "wxyz-long",
        "bin": base64.b64encode(b"\x00\xffbytes").decode(),
        "d": "2024-02-29",
        "ts": "2017-02-07T15:13:01.39256Z",
        "arr": [1, None, 3],
        "m": {"a": 1, "b": None},
        "mi": {"7": "seven"},
        "st": {"id": 1, "tags": ["x", "y"], "geo": {"lat": 52.5, "lon": 13.4}, "attrs": {"k": "v"}},
        "deep": [{"k": "p", "v": [1.25, -1.25, None]}, {"k": "q", "v": []}],
    },
    {"s": None, "arr": [], "st": {"id": 2}, "ts": 1518033528123, "d": "1999-1-2", "dec": "-0.005"},
    {},
]

ALL_EXPECTED = [
    {
        "b": True,
        "i8": -128,
        "i16": 32767,
        "i32": -2147483648,
        "i64": 9223372036854775807,
        "f32": 1.5,
        "f64": 2.718281828459045,
        "dec": Decimal("12345678.13"),  # half away from zero, like Hive's HALF_UP
        "s": "héllo ☃",
        "c": "abc",
        "vc": "wxyz",
        "bin": b"\x00\xffbytes",
        "d": dt.date(2024, 2, 29),
        "ts": dt.datetime(2017, 2, 7, 15, 13, 1, 392000),
        "arr": [1, None, 3],
        "m": {"a": 1, "b": None},
        "mi": {7: "seven"},
        "st": {"id": 1, "tags": ["x", "y"], "geo": {"lat": 52.5, "lon": 13.4}, "attrs": {"k": "v"}},
        "deep": [{"k": "p", "v": [Decimal("1.3"), Decimal("-1.3"), None]}, {"k": "q", "v": []}],
    },
    {
        **{k: None for k, _ in ALL_TYPES},
        "arr": [],
        "st": {"id": 2, "tags": None, "geo": None, "attrs": None},
        "ts": dt.datetime(2018, 2, 7, 19, 58, 48, 123000),
        "d": dt.date(1999, 1, 2),
        "dec": Decimal("-0.01"),
    },
    {k: None for k, _ in ALL_TYPES},
]


def _maps_as_dicts(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """pyarrow returns maps as lists of pairs; the expectations use dicts."""

    def fix(value: Any, typ: pa.DataType) -> Any:
        if value is None:
            return None
        if pa.types.is_map(typ):
            return {k: fix(v, typ.item_type) for k, v in value}
        if pa.types.is_struct(typ):
            return {
                typ.field(i).name: fix(value[typ.field(i).name], typ.field(i).type)
                for i in range(typ.num_fields)
            }
        if pa.types.is_list(typ):
            return [fix(v, typ.value_type) for v in value]
        return value

    return {f.name: fix(row[f.name], f.type) for f in schema}


@pytest.mark.parametrize("kind", ["parquet", "orc", "avro"])
def test_every_type_round_trips(kind: str, tmp_path: Path) -> None:
    conv = converter(ALL_TYPES, kind)
    records = lines(*ALL_INPUT)
    assert conv.check(records) == [None, None, None]
    blob = conv.convert(records)
    got = rows_of(conv, blob)
    if kind == "avro":
        # Avro maps are dicts already; a map<int,...> is an array of key/value records.
        for row in got:
            if row["mi"] is not None:
                row["mi"] = {e["key"]: e["value"] for e in row["mi"]}
    else:
        got = [_maps_as_dicts(r, conv.arrow_schema) for r in got]
    assert got == ALL_EXPECTED
    if kind == "parquet":
        independent = duckdb_rows(blob, tmp_path)
        for row in independent:  # DuckDB reads maps as dicts and structs as dicts already
            assert set(row) == {n for n, _ in ALL_TYPES}
        assert independent == ALL_EXPECTED


def test_arrow_schema_maps_hive_types() -> None:
    schema = converter(ALL_TYPES).arrow_schema
    assert schema.field("b").type == pa.bool_()
    assert [schema.field(n).type for n in ("i8", "i16", "i32", "i64")] == [
        pa.int8(),
        pa.int16(),
        pa.int32(),
        pa.int64(),
    ]
    assert schema.field("f32").type == pa.float32() and schema.field("f64").type == pa.float64()
    assert schema.field("dec").type == pa.decimal128(10, 2)
    assert schema.field("c").type == pa.string() and schema.field("bin").type == pa.binary()
    assert schema.field("d").type == pa.date32() and schema.field("ts").type == pa.timestamp("ms")
    assert schema.field("m").type == pa.map_(pa.string(), pa.int64())
    assert schema.field("st").type.field("geo").type == pa.struct(
        [("lat", pa.float64()), ("lon", pa.float64())]
    )


# ---------------------------------------------------------------------------------------------
# Timestamps and dates
# ---------------------------------------------------------------------------------------------

OPENX_TIMESTAMPS = [
    ("2017-02-07T15:13:01.39256Z", dt.datetime(2017, 2, 7, 15, 13, 1, 392000)),
    ("2017-02-07T15:13:01Z", dt.datetime(2017, 2, 7, 15, 13, 1)),
    ("2017-02-07T15:13:01.123456789Z", dt.datetime(2017, 2, 7, 15, 13, 1, 123000)),
    ("2017-02-07T15:13:01+02:00", dt.datetime(2017, 2, 7, 13, 13, 1)),
    ("2017-02-07T15:13:01-0130", dt.datetime(2017, 2, 7, 16, 43, 1)),
    ("2017-02-07 15:13:01.14", dt.datetime(2017, 2, 7, 15, 13, 1, 140000)),
    ("2017-2-7 5:13:01", dt.datetime(2017, 2, 7, 5, 13, 1)),
    (1518033528, dt.datetime(2018, 2, 7, 19, 58, 48)),
    ("1518033528", dt.datetime(2018, 2, 7, 19, 58, 48)),
    (1518033528123, dt.datetime(2018, 2, 7, 19, 58, 48, 123000)),
    (1518033528.123, dt.datetime(2018, 2, 7, 19, 58, 48, 123000)),
    ("1518033528.5", dt.datetime(2018, 2, 7, 19, 58, 48, 500000)),
    (0, dt.datetime(1970, 1, 1)),
    (-86400, dt.datetime(1969, 12, 31)),
    ("1969-12-31 23:59:59.9995", dt.datetime(1969, 12, 31, 23, 59, 59, 999000)),
]


@pytest.mark.parametrize(("value", "expected"), OPENX_TIMESTAMPS)
def test_openx_timestamp_formats(value: Any, expected: dt.datetime) -> None:
    conv = converter([("ts", "timestamp")])
    records = lines({"ts": value})
    assert conv.check(records) == [None]
    assert rows_of(conv, conv.convert(records)) == [{"ts": expected}]


@pytest.mark.parametrize(
    "value",
    [
        "2017-02-07T15:13:01",
        "2024-02-30 00:00:00",
        "2017-02-07 24:00:00",
        "yesterday",
        "0000-01-01 00:00:00",
        True,
        {"a": 1},
        "2017-02-07 15:13:01Z",
        1e20,
    ],
)
def test_openx_timestamp_rejections(value: Any) -> None:
    conv = converter([("ts", "timestamp")])
    [verdict] = conv.check(lines({"ts": value}))
    assert verdict is not None and verdict[0] == MALFORMED_DATA and "'ts'" in verdict[1]


def test_hive_timestamp_formats_and_default() -> None:
    conv = converter(
        [("ts", "timestamp")],
        deserializer={
            "type": "hive_json",
            "timestamp_formats": [
                "dd/MMM/yyyy:HH:mm:ss Z",
                "yyyyMMddHHmmss",
                "EEE, d MMM yyyy hh:mm:ss a",
                "millis",
            ],
        },
    )
    cases = [
        ("07/Feb/2017:15:13:01 +0100", dt.datetime(2017, 2, 7, 14, 13, 1)),
        ("20170207151301", dt.datetime(2017, 2, 7, 15, 13, 1)),
        ("Tue, 7 Feb 2017 03:13:01 PM", dt.datetime(2017, 2, 7, 15, 13, 1)),
        ("Tue, 7 Feb 2017 12:00:00 AM", dt.datetime(2017, 2, 7, 0, 0, 0)),
        (1486480381000, dt.datetime(2017, 2, 7, 15, 13, 1)),
        ("1486480381000", dt.datetime(2017, 2, 7, 15, 13, 1)),
        ("2017-02-07 15:13:01.5", dt.datetime(2017, 2, 7, 15, 13, 1, 500000)),  # Timestamp.valueOf
    ]
    records = lines(*[{"ts": v} for v, _ in cases])
    assert conv.check(records) == [None] * len(cases)
    assert [r["ts"] for r in rows_of(conv, conv.convert(records))] == [e for _, e in cases]
    # Without a matching format, ISO 'T...Z' is not Timestamp.valueOf's: rejected, as in Firehose.
    plain = converter([("ts", "timestamp")], deserializer={"type": "hive_json"})
    [verdict] = plain.check(lines({"ts": "2017-02-07T15:13:01Z"}))
    assert verdict is not None and verdict[0] == MALFORMED_DATA


def test_dates() -> None:
    conv = converter([("d", "date")])
    good = lines({"d": "2024-02-29"}, {"d": "0001-01-01"}, {"d": "9999-12-31"}, {"d": "2024-1-5"})
    assert conv.check(good) == [None] * 4
    assert [r["d"] for r in rows_of(conv, conv.convert(good))] == [
        dt.date(2024, 2, 29),
        dt.date(1, 1, 1),
        dt.date(9999, 12, 31),
        dt.date(2024, 1, 5),
    ]
    bad = conv.check(
        lines({"d": "2023-02-29"}, {"d": "2024-13-01"}, {"d": 20240101}, {"d": "2024-01-01T00:00:00Z"})
    )
    assert all(v is not None and v[0] == MALFORMED_DATA for v in bad)


# ---------------------------------------------------------------------------------------------
# Deserializer rules
# ---------------------------------------------------------------------------------------------


def test_openx_coerces_strings_and_stringifies_nested_json() -> None:
    conv = converter(
        [("n", "int"), ("x", "double"), ("dec", "decimal(5,2)"), ("flag", "boolean"), ("s", "string")]
    )
    records = lines(
        {"n": "123", "x": "1.5e3", "dec": "3.14159", "flag": "TRUE", "s": {"Inner": [1, 2.5, True, None]}},
        {"n": "0x1F", "x": 7, "dec": 2, "flag": "false", "s": 12.5},
        {"s": False},
    )
    assert conv.check(records) == [None, None, None]
    assert rows_of(conv, conv.convert(records)) == [
        {"n": 123, "x": 1500.0, "dec": Decimal("3.14"), "flag": True, "s": '{"inner":[1,2.5,true,null]}'},
        {"n": 31, "x": 7.0, "dec": Decimal("2.00"), "flag": False, "s": "12.5"},
        {"n": None, "x": None, "dec": None, "flag": None, "s": "false"},
    ]


def test_hive_rejects_numeric_strings_and_nested_json_for_strings() -> None:
    conv = converter([("n", "int"), ("s", "string")], deserializer={"type": "hive_json"})
    verdicts = conv.check(lines({"n": "123"}, {"s": {"inner": 1}}, {"n": 123, "s": 45}, {"N": 1, "S": "ok"}))
    assert verdicts[0] is not None and verdicts[0][0] == MALFORMED_DATA and "'n'" in verdicts[0][1]
    assert verdicts[1] is not None and verdicts[1][0] == MALFORMED_DATA and "'s'" in verdicts[1][1]
    assert verdicts[2:] == [None, None]
    assert rows_of(conv, conv.convert(lines({"n": 123, "s": 45}, {"N": 1, "S": "ok"}))) == [
        {"n": 123, "s": "45"},
        {"n": 1, "s": "ok"},
    ]


def test_missing_and_unknown_fields() -> None:
    conv = converter([("a", "bigint"), ("b", "struct<x:int,y:string>"), ("c", "array<string>")])
    records = lines(
        {"a": 1, "zzz": {"deep": [1, "mixed", {"types": None}]}, "b": {"y": "v", "other": 9}}, {"zzz": 5}
    )
    assert conv.check(records) == [None, None]
    assert rows_of(conv, conv.convert(records)) == [
        {"a": 1, "b": {"x": None, "y": "v"}, "c": None},
        {"a": None, "b": None, "c": None},
    ]


def test_case_insensitive_key_matching() -> None:
    columns = [("event_id", "string"), ("user", "struct<id:bigint,country:string>"), ("Mixed", "int")]
    records = lines(
        {"EVENT_ID": "e1", "User": {"ID": 7, "Country": "DE"}, "mixed": 1},
        {"event_id": "e2", "user": {"id": 8, "country": "FR"}, "MIXED": 2},
    )
    conv = converter(columns)
    assert conv.arrow_schema.names == ["event_id", "user", "Mixed"]
    assert conv.check(records) == [None, None]
    assert rows_of(conv, conv.convert(records)) == [
        {"event_id": "e1", "user": {"id": 7, "country": "DE"}, "Mixed": 1},
        {"event_id": "e2", "user": {"id": 8, "country": "FR"}, "Mixed": 2},
    ]
    exact = converter(columns, deserializer={"type": "openx_json", "case_insensitive": False})
    assert rows_of(exact, exact.convert(records)) == [
        {"event_id": None, "user": None, "Mixed": None},
        {"event_id": "e2", "user": {"id": 8, "country": "FR"}, "Mixed": None},
    ]


def test_case_variants_in_a_large_batch_take_the_key_rewrite() -> None:
    conv = converter([("eventtype", "string"), ("user", "struct<userid:bigint>")])
    docs = [{"eventType": f"t{i}", "User": {"userId": i}, "Extra": i} for i in range(3000)]
    docs[1500] = {"eventtype": "lower", "user": {"userid": -1}}
    got = rows_of(conv, conv.convert(lines(*docs)))
    assert got[0] == {"eventtype": "t0", "user": {"userid": 0}}
    assert got[1500] == {"eventtype": "lower", "user": {"userid": -1}}
    assert got[2999] == {"eventtype": "t2999", "user": {"userid": 2999}}


def test_duplicate_keys_last_wins() -> None:
    conv = converter([("a", "int")])
    records = [b'{"a": 1, "a": 2}', b'{"a": 1, "A": 3}', b'{"A": 1, "a": null}']
    assert conv.check(records) == [None, None, None]
    assert [r["a"] for r in rows_of(conv, conv.convert(records))] == [2, 3, None]


def test_column_to_json_key_mappings() -> None:
    conv = converter(
        [("ts", "timestamp"), ("user", "struct<ts:bigint,name:string>")],
        deserializer={"column_to_json_key_mappings": {"ts": "timestamp", "name": "UserName"}},
    )
    records = lines({"timestamp": 0, "ts": 99, "user": {"timestamp": 5, "username": "ann"}})
    assert rows_of(conv, conv.convert(records)) == [
        {"ts": dt.datetime(1970, 1, 1), "user": {"ts": 5, "name": "ann"}}
    ]


def test_dots_in_keys_to_underscores() -> None:
    columns = [("a_b", "int"), ("s", "struct<c_d:string>")]
    records = lines({"a.b": 1, "s": {"c.d": "x"}}, {"a_b": 2, "a.b": 3})
    conv = converter(columns, deserializer={"convert_dots_in_json_keys_to_underscores": True})
    assert rows_of(conv, conv.convert(records)) == [{"a_b": 1, "s": {"c_d": "x"}}, {"a_b": 2, "s": None}]
    off = converter(columns)
    assert rows_of(off, off.convert(records)) == [{"a_b": None, "s": {"c_d": None}}, {"a_b": 2, "s": None}]


def test_concatenated_objects_become_rows_and_arrays_are_refused() -> None:
    conv = converter([("a", "int")])
    records = [b'{"a":1}{"a":2}\n', b'{"a":3} {"a":4}', b'[{"a":5}]', b'{"a":6}\n']
    verdicts = conv.check(records)
    assert verdicts[0] is None and verdicts[1] is None and verdicts[3] is None
    assert verdicts[2] is not None and verdicts[2][0] == MALFORMED_DATA and "array" in verdicts[2][1]
    good = [records[0], records[1], records[3]]
    assert [r["a"] for r in rows_of(conv, conv.convert(good))] == [1, 2, 3, 4, 6]


def test_openx_reads_an_empty_array_for_a_struct_as_null() -> None:
    conv = converter([("s", "struct<a:int>")])
    assert conv.check(lines({"s": []}, {"s": [1]})) == [
        None,
        (MALFORMED_DATA, "column 's': expected a JSON object, got JSON array '[1]'"),
    ]


def test_nan_and_infinity_literals_are_read_the_same_on_every_path() -> None:
    conv = converter([("x", "double"), ("s", "string")])
    records = [b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": Inf, "s": "Infinity and NaN"}', b'{"x": 1}']
    bad = b'{"x": "nope"}'
    alone = [rows_of(conv, conv.convert([r]))[0] for r in records]
    together = rows_of(conv, conv.convert(records))
    assert str(alone) == str(together)  # NaN != NaN, so compare the rendering
    assert str(together[2]) == "{'x': inf, 's': 'Infinity and NaN'}"
    assert conv.check([*records, bad])[:4] == [None] * 4


# ---------------------------------------------------------------------------------------------
# Isolating bad records
# ---------------------------------------------------------------------------------------------


def test_check_isolates_exactly_the_bad_records() -> None:
    columns = [
        ("id", "bigint"),
        ("name", "string"),
        ("small", "tinyint"),
        ("d", "date"),
        ("bin", "binary"),
        ("dec", "decimal(4,2)"),
        ("s", "struct<x:int>"),
    ]
    conv = converter(columns)
    records = lines(*[{"id": i, "name": f"n{i}", "small": i % 100, "d": "2024-05-01"} for i in range(500)])
    bad: dict[int, tuple[str, str]] = {
        3: (PARSE_ERROR, "malformed JSON"),
        40: (MALFORMED_DATA, "array"),
        77: (MALFORMED_DATA, "JSON number"),
        150: (MALFORMED_DATA, "empty"),
        151: (MALFORMED_DATA, "'small'"),
        200: (MALFORMED_DATA, "'d'"),
        201: (PARSE_ERROR, "UTF-8"),
        333: (MALFORMED_DATA, "'bin'"),
        334: (MALFORMED_DATA, "'dec'"),
        335: (MALFORMED_DATA, "'s'"),
        336: (MALFORMED_DATA, "'id'"),
        499: (PARSE_ERROR, "malformed JSON"),
    }
    records[3] = b'{"id": 3, "name": }\n'
    records[40] = b'[{"id": 40}]\n'
    records[77] = b"77\n"
    records[150] = b"  \n"
    records[151] = b'{"id": 151, "small": 300}\n'
    records[200] = b'{"id": 200, "d": "2024-02-30"}\n'
    records[201] = b'{"id": 201, "name": "\xff\xfe"}\n'
    records[333] = b'{"id": 333, "bin": "not base64!"}\n'
    records[334] = b'{"id": 334, "dec": 100.5}\n'
    records[335] = b'{"id": 335, "s": "a string where a struct belongs"}\n'
    records[336] = b'{"id": 1.5}\n'
    records[499] = b'{"id": 499\n'
    verdicts = conv.check(records)
    failed = {i: v for i, v in enumerate(verdicts) if v is not None}
    assert sorted(failed) == sorted(bad)
    for i, (code, fragment) in bad.items():
        assert failed[i][0] == code, (i, failed[i])
        assert fragment in failed[i][1], (i, failed[i])
    good = [r for i, r in enumerate(records) if i not in bad]
    got = rows_of(conv, conv.convert(good))
    assert [r["id"] for r in got] == [i for i in range(500) if i not in bad]
    with pytest.raises(ConversionError) as info:
        conv.convert(records)
    assert info.value.failures == failed


def test_hive_isolates_a_string_in_an_int_column_and_a_struct_in_a_string_column() -> None:
    conv = converter([("n", "int"), ("s", "string")], deserializer={"type": "hive_json"})
    records = lines(*[{"n": i, "s": str(i)} for i in range(300)])
    records[17] = b'{"n": "17", "s": "x"}'
    records[250] = b'{"n": 250, "s": {"nested": true}}'
    verdicts = conv.check(records)
    assert [i for i, v in enumerate(verdicts) if v is not None] == [17, 250]


# ---------------------------------------------------------------------------------------------
# Paths agree: a record converts the same alone, in a batch, and on the per-record path
# ---------------------------------------------------------------------------------------------

MIXED_COLUMNS = [
    ("i", "int"),
    ("x", "double"),
    ("f", "float"),
    ("dec", "decimal(12,4)"),
    ("ts", "timestamp"),
    ("d", "date"),
    ("s", "string"),
    ("b", "boolean"),
    ("l", "array<struct<k:string,n:bigint>>"),
]
MIXED_RECORDS = [
    b'{"i": 1, "x": 0.1, "f": 0.1, "dec": 1.00005, "ts": "2024-05-01T10:00:00.5Z", "d": "2024-05-01", '
    b'"s": "a", "b": true}',
    b'{"i": "2", "x": "2.5", "f": "1e-3", "dec": "99999999.99995", "ts": 1714557600, "s": 7, "b": "True"}',
    b'{"i": -3, "x": 1e300, "dec": -0.00005, "ts": "2024-5-1 1:2:3.456789", "l": [{"k": "K", "n": 5}, null]}',
    b'{"I": 4, "X": 4, "TS": 1714557600123.9, "L": [{"K": "a"}]}',
    b'{"i": 5, "dec": 12345678.12345678, "ts": "1714557600123", "s": {"Nested": [1.50, "x"]}}',
    b'{"i": 6, "dec": "123456789.0"}',
    b'{"i": 7, "x": 123456789012345678901234567890}',
    b'{"i": 8, "ts": "2024-05-01T10:00:00+05:30", "s": "\\u00e9\\ud83d\\ude00"}',
]


def _render(conv: Converter, records: list[bytes]) -> list[str]:
    return [repr(r) for r in rows_of(conv, conv.convert(records))]


def test_fast_and_per_record_paths_agree() -> None:
    fast = converter(MIXED_COLUMNS)
    verdicts = fast.check(MIXED_RECORDS)
    assert verdicts[5] is not None and "decimal(12,4)" in verdicts[5][1]
    good = [r for r, v in zip(MIXED_RECORDS, verdicts, strict=True) if v is None]
    batch = _render(fast, good)
    fast.clear_cache()
    alone = [_render(fast, [r])[0] for r in good]
    slow = converter(MIXED_COLUMNS)
    slow._fast_enabled = False  # every record through the per-record path
    assert slow.check(MIXED_RECORDS) == verdicts
    assert batch == alone == _render(slow, good)
    repeated = [r for r in good for _ in range(200)]
    fast.clear_cache()
    assert _render(fast, repeated) == [row for row in batch for _ in range(200)]


def test_whole_batches_of_numbers_as_strings_and_epoch_timestamps_stay_consistent() -> None:
    conv = converter([("n", "bigint"), ("ts", "timestamp")])
    as_strings = lines(*[{"n": str(i), "ts": 1714557600000 + i} for i in range(2000)])
    as_numbers = lines(*[{"n": i, "ts": "2024-05-01T10:00:00Z"} for i in range(2000)])
    first = rows_of(conv, conv.convert(as_strings))
    assert first[1999] == {"n": 1999, "ts": dt.datetime(2024, 5, 1, 10, 0, 1, 999000)}
    second = rows_of(conv, conv.convert(as_numbers))
    assert second[5] == {"n": 5, "ts": dt.datetime(2024, 5, 1, 10, 0)}
    mixed = [as_strings[0], as_numbers[1], as_strings[2], as_numbers[3]]
    assert rows_of(conv, conv.convert(mixed)) == [first[0], second[1], first[2], second[3]]


def test_cached_rows_follow_the_records_of_convert() -> None:
    conv = converter([("n", "bigint")])
    batch_a = lines(*[{"n": i} for i in range(100)])
    batch_b = [b'{"n": 1000}{"n": 1001}', *lines(*[{"n": 2000 + i} for i in range(50)])]
    assert conv.check(batch_a) == [None] * 100
    assert conv.check(batch_b) == [None] * 51
    mixed = batch_b[:3] + batch_a[10:20] + [batch_a[5]] + batch_b[3:]
    expected = [1000, 1001, 2000, 2001, *range(10, 20), 5, *range(2002, 2050)]
    assert [r["n"] for r in rows_of(conv, conv.convert(mixed))] == expected
    unknown = [*batch_a[:3], b'{"n": 77777}']
    assert [r["n"] for r in rows_of(conv, conv.convert(unknown))] == [0, 1, 2, 77777]


def test_concurrent_checks_and_converts() -> None:
    conv = converter([("n", "bigint"), ("ts", "timestamp")])
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for round_ in range(5):
                records = lines(*[{"n": offset + round_ * 1000 + i, "ts": i} for i in range(300)])
                assert conv.check(records) == [None] * 300
                got = rows_of(conv, conv.convert(records))
                assert [r["n"] for r in got] == [offset + round_ * 1000 + i for i in range(300)]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 100_000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------------------------
# Schemas: type strings, Avro files, Glue
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("struct<id:bigint,country:strin>", "unknown type 'strin' at position 25"),
        ("array<int", "expected '>' but the type string ended at position 9"),
        ("map<array<int>,int>", "map keys must have a primitive type at position 4"),
        ("decimal(40,2)", "decimal precision must be 1..38, got 40 at position 8"),
        ("decimal(5,6)", "decimal scale 6 exceeds precision 5 at position 8"),
        ("varchar", "varchar needs a length"),
        ("char(300)", "char length must be 1..255, got 300 at position 5"),
        ("struct<a:int,A:string>", "duplicate struct field 'A' at position 13"),
        ("uniontype<int,string>", "unsupported type 'uniontype' at position 0"),
        ("int x", "unexpected 'x' after the type at position 4"),
        ("struct<a int>", "expected ':', found 'i' at position 9"),
        ("", "expected a type name but the type string ended at position 0"),
    ],
)
def test_bad_type_strings_give_precise_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_hive_type(text)
    with pytest.raises(ValidationError, match="at position"):
        FormatConfig.model_validate({"type": "orc", "schema": {"columns": [{"name": "c", "type": text}]}})


def test_type_strings_are_case_insensitive_and_allow_spaces_and_backticks() -> None:
    conv = converter([("c", "STRUCT< a : ARRAY<INT> , `b c`:Decimal(10, 2), e:INTEGER >")])
    assert conv.arrow_schema.field("c").type == pa.struct(
        [("a", pa.list_(pa.int32())), ("b c", pa.decimal128(10, 2)), ("e", pa.int32())]
    )


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="needs a 'schema'"):
        FormatConfig.model_validate({"type": "parquet"})
    with pytest.raises(ValidationError, match="exactly one"):
        FormatConfig.model_validate({"type": "parquet", "schema": {}})
    with pytest.raises(ValidationError, match="hive_json"):
        FormatConfig.model_validate(
            {
                "type": "orc",
                "schema": {"columns": [{"name": "a", "type": "int"}]},
                "deserializer": {"type": "hive_json", "case_insensitive": False},
            }
        )
    with pytest.raises(ValidationError, match="timestamp_formats applies to hive_json only"):
        FormatConfig.model_validate(
            {
                "type": "orc",
                "schema": {"columns": [{"name": "a", "type": "int"}]},
                "deserializer": {"timestamp_formats": ["yyyy"]},
            }
        )
    with pytest.raises(ValidationError, match="pattern letter 'zzz' is not supported"):
        FormatConfig.model_validate(
            {
                "type": "orc",
                "schema": {"columns": [{"name": "a", "type": "int"}]},
                "deserializer": {"type": "hive_json", "timestamp_formats": ["yyyy zzz"]},
            }
        )
    with pytest.raises(ValidationError, match="rejects dots in column names"):
        FormatConfig.model_validate(
            {
                "type": "orc",
                "schema": {"columns": [{"name": "a.b", "type": "int"}]},
                "deserializer": {"type": "hive_json"},
            }
        )
    with pytest.raises(ValidationError):
        FormatConfig.model_validate(
            {
                "type": "parquet",
                "schema": {"columns": [{"name": "a", "type": "int"}]},
                "parquet": {"block_size_mib": 16},
            }
        )
    with pytest.raises(ValidationError, match="extra"):
        FormatConfig.model_validate(
            {"type": "parquet", "schema": {"columns": [{"name": "a", "type": "int"}]}, "x": 1}
        )
    cfg = FormatConfig.model_validate(
        {
            "type": "parquet",
            "schema": {"columns": [{"name": "a", "type": "int"}]},
            "parquet": {"compression": "GZIP", "writer_version": "V2"},
            "orc": {"compression": "ZLIB"},
        }
    )
    assert (cfg.parquet.compression, cfg.parquet.writer_version, cfg.orc.compression) == (
        "gzip",
        "v2",
        "zlib",
    )
    with pytest.raises(SchemaError, match="no top-level column 'nope'"):
        converter([("a", "int")], "orc", orc={"bloom_filter_columns": ["nope"]})
    with pytest.raises(SchemaError, match="both read the JSON key 'x'"):
        converter([("a", "int"), ("x", "int")], deserializer={"column_to_json_key_mappings": {"a": "X"}})
    with pytest.raises(ValueError, match="needs no conversion"):
        Converter(FormatConfig())


def test_avro_schema_file_drives_the_file_and_the_checks(tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
            {
                "name": "at",
                "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
                "default": None,
            },
            {
                "name": "amount",
                "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}],
            },
            {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 2}},
            {"name": "attrs", "type": ["null", {"type": "map", "values": "int"}]},
            {
                "name": "items",
                "type": {
                    "type": "array",
                    "items": {
                        "type": "record",
                        "name": "Item",
                        "fields": [
                            {"name": "sku", "type": "string"},
                            {"name": "day", "type": ["null", {"type": "int", "logicalType": "date"}]},
                        ],
                    },
                },
            },
        ],
    }
    path = tmp_path / "event.avsc"
    path.write_text(json.dumps(schema))
    conv = Converter(FormatConfig.model_validate({"type": "avro", "schema": {"avro_schema": str(path)}}))
    assert conv.arrow_schema.field("id").nullable is False
    assert conv.arrow_schema.field("at").type == pa.timestamp("ms")
    good = {
        "id": 1,
        "kind": "B",
        "at": "2024-05-01T00:00:00Z",
        "amount": "12.345",
        "tag": base64.b64encode(b"ok").decode(),
        "attrs": {"X": 1},
        "items": [{"sku": "s1", "day": "2024-05-02"}],
    }
    records = lines(
        good,
        {**good, "kind": "C"},
        {**good, "id": None},
        {**good, "tag": base64.b64encode(b"long").decode()},
        {**good, "items": [{"day": "2024-05-02"}]},
        {**good, "items": [None]},
    )
    verdicts = conv.check(records)
    assert verdicts[0] is None
    assert all(v is not None and v[0] == MALFORMED_DATA for v in verdicts[1:]), verdicts
    assert "enum" in verdicts[1][1] and "'id'" in verdicts[2][1] and "fixed" in verdicts[3][1]  # type: ignore[index]
    assert "'items[].sku'" in verdicts[4][1] and "items[]" in verdicts[5][1]  # type: ignore[index]
    blob = conv.convert(records[:1])
    reader = fastavro.reader(io.BytesIO(blob))
    writer_schema: dict[str, Any] = reader.writer_schema  # type: ignore[assignment]
    assert writer_schema["name"] == "Event"
    assert [_naive(r) for r in reader] == [
        {
            "id": 1,
            "kind": "B",
            "at": dt.datetime(2024, 5, 1),
            "amount": Decimal("12.35"),
            "tag": b"ok",
            "attrs": {"x": 1},
            "items": [{"sku": "s1", "day": dt.date(2024, 5, 2)}],
        }
    ]
    as_parquet = Converter(
        FormatConfig.model_validate({"type": "parquet", "schema": {"avro_schema": str(path)}})
    )
    assert as_parquet.arrow_schema == conv.arrow_schema
    with pytest.raises(SchemaError, match="only unions of null and one type"):
        path.write_text(
            json.dumps({"type": "record", "name": "R", "fields": [{"name": "u", "type": ["int", "string"]}]})
        )
        Converter(FormatConfig.model_validate({"type": "avro", "schema": {"avro_schema": str(path)}}))


def test_derived_avro_schema_uses_nullable_unions_and_logical_types() -> None:
    conv = converter(
        [("ts", "timestamp"), ("d", "date"), ("dec", "decimal(7,3)"), ("s", "struct<a:int>")], "avro"
    )
    blob = conv.convert(lines({"ts": 0, "d": "1970-01-02", "dec": 1.5, "s": {"a": 1}}))
    reader = fastavro.reader(io.BytesIO(blob))
    writer_schema: dict[str, Any] = reader.writer_schema  # type: ignore[assignment]
    fields: dict[str, Any] = {f["name"]: f["type"] for f in writer_schema["fields"]}
    assert fields["ts"] == ["null", {"type": "long", "logicalType": "timestamp-millis"}]
    assert fields["d"] == ["null", {"type": "int", "logicalType": "date"}]
    assert fields["dec"] == ["null", {"type": "bytes", "logicalType": "decimal", "precision": 7, "scale": 3}]
    assert fields["s"][0] == "null" and fields["s"][1]["type"] == "record"
    assert [_naive(r) for r in reader] == [
        {"ts": dt.datetime(1970, 1, 1), "d": dt.date(1970, 1, 2), "dec": Decimal("1.500"), "s": {"a": 1}}
    ]


def test_glue_table_schema(moto: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    glue = boto3.client(
        "glue",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    database = f"clicks_{uuid.uuid4().hex[:8]}"
    glue.create_database(DatabaseInput={"Name": database})
    glue.create_table(
        DatabaseName=database,
        TableInput={
            "Name": "events",
            "StorageDescriptor": {
                "Columns": [
                    {"Name": "id", "Type": "bigint"},
                    {"Name": "user", "Type": "struct<name:string,age:int>"},
                ]
            },
        },
    )
    spec = {
        "type": "parquet",
        "schema": {"glue": {"database": database, "table": "events", "endpoint_url": moto.endpoint}},
    }
    conv = Converter(FormatConfig.model_validate(spec))
    assert conv.arrow_schema == pa.schema(
        [("id", pa.int64()), ("user", pa.struct([("name", pa.string()), ("age", pa.int32())]))]
    )
    assert rows_of(conv, conv.convert(lines({"id": 1, "user": {"name": "a", "age": 3}}))) == [
        {"id": 1, "user": {"name": "a", "age": 3}}
    ]
    spec["schema"]["glue"]["table"] = "missing"  # type: ignore[index]
    with pytest.raises(SchemaError) as info:
        Converter(FormatConfig.model_validate(spec))
    assert info.value.code == ENTITY_NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Writer options, fingerprint
# ---------------------------------------------------------------------------------------------


def test_parquet_options_reach_the_file() -> None:
    records = lines(*[{"a": i % 3, "s": "x" * (i % 5)} for i in range(5000)])
    for codec, expected in [
        ("snappy", "SNAPPY"),
        ("gzip", "GZIP"),
        ("zstd", "ZSTD"),
        ("uncompressed", "UNCOMPRESSED"),
    ]:
        conv = converter(
            [("a", "int"), ("s", "string")], parquet={"compression": codec, "enable_dictionary": False}
        )
        meta = pq.ParquetFile(io.BytesIO(conv.convert(records))).metadata
        column = meta.row_group(0).column(0)
        assert column.compression == expected
        assert "RLE_DICTIONARY" not in column.encodings and "PLAIN_DICTIONARY" not in column.encodings
    v2 = converter([("a", "int")], parquet={"writer_version": "v2"})
    assert pq.read_table(io.BytesIO(v2.convert(records)), use_threads=False).num_rows == 5000


def test_orc_options_reach_the_file() -> None:
    records = lines(*[{"a": i, "s": f"v{i}", "n": {"x": i}} for i in range(3000)])
    for codec in ("zlib", "snappy", "zstd", "none"):
        conv = converter(
            [("n", "struct<x:int>"), ("a", "int"), ("s", "string")],
            "orc",
            orc={"compression": codec, "bloom_filter_columns": ["s"], "row_index_stride": 1000},
        )
        file = orc.ORCFile(io.BytesIO(conv.convert(records)))
        assert file.compression == ("UNCOMPRESSED" if codec == "none" else codec.upper())
        assert file.nrows == 3000
    plain = converter([("n", "struct<x:int>"), ("a", "int"), ("s", "string")], "orc")
    bloom = converter(
        [("n", "struct<x:int>"), ("a", "int"), ("s", "string")], "orc", orc={"bloom_filter_columns": ["S"]}
    )
    assert len(bloom.convert(records)) > len(plain.convert(records))  # the bloom filter streams take room


def test_fingerprint_is_stable_and_tracks_schema_and_options() -> None:
    base = converter([("a", "int")])
    assert base.fingerprint == converter([("a", "int")]).fingerprint
    assert base.fingerprint == converter([("a", "int")], deserializer={"case_insensitive": False}).fingerprint
    others = {
        converter([("a", "bigint")]).fingerprint,
        converter([("a", "int")], parquet={"compression": "gzip"}).fingerprint,
        converter([("a", "int")], "orc").fingerprint,
        converter([("a", "int")], "avro").fingerprint,
    }
    assert base.fingerprint not in others and len(others) == 4
    assert (base.extension, converter([("a", "int")], "orc").extension) == (".parquet", ".orc")


def test_empty_input_writes_an_empty_file() -> None:
    conv = converter([("a", "int")])
    assert conv.check([]) == []
    assert pq.read_table(io.BytesIO(conv.convert([])), use_threads=False).num_rows == 0


# ---------------------------------------------------------------------------------------------
# The clickstream data set (bench/clickstream.py, the benchmarks' data)
# ---------------------------------------------------------------------------------------------

def _from_bench(module: str) -> Any:
    """A module of the repository's bench/ folder (not a package: imported by its own name)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(BENCH))


CLICKSTREAM_COLUMNS: list[tuple[str, str]] = list(_from_bench("bench_formats").COLUMNS)  # its Glue table


def _expected_click(doc: dict[str, Any]) -> dict[str, Any]:
    def dec(x: float | None) -> Decimal | None:
        return None if x is None else Decimal(repr(x)).quantize(Decimal("0.01"))

    def struct(value: dict[str, Any] | None, names: list[str]) -> dict[str, Any] | None:
        return None if value is None else {n: value.get(n) for n in names}

    eco = doc.get("ecommerce")
    if eco is not None:
        eco = {
            "currency": eco["currency"],
            "items": [{**item, "price": dec(item["price"])} for item in eco["items"]],
            "total": dec(eco["total"]),
            "coupon": eco["coupon"],
        }
    return {
        "event_id": doc["event_id"],
        "event_type": doc["event_type"],
        "event_time": dt.datetime.strptime(doc["event_time"], "%Y-%m-%dT%H:%M:%S.%fZ"),
        "received_at_ms": doc["received_at_ms"],
        "session_id": doc["session_id"],
        "sequence": doc["sequence"],
        "user": doc["user"],
        "device": doc["device"],
        "geo": doc["geo"],
        "page": doc["page"],
        "tags": doc["tags"],
        "metrics": doc["metrics"],
        "referrer": doc.get("referrer"),
        "ecommerce": eco,
        "experiment": struct(doc.get("experiment"), ["id", "variant"]),
        "error": struct(doc.get("error"), ["code", "message"]),
    }


@pytest.fixture(scope="module")
def clickstream() -> list[bytes]:
    return list(_from_bench("clickstream").ndjson_lines(3000, seed=42))


def test_clickstream_generator_is_seeded_and_its_script_writes_what_it_yields(tmp_path: Path) -> None:
    gen = _from_bench("clickstream")
    out = tmp_path / "c.ndjson"
    subprocess.run(  # as the benchmarks run it
        [sys.executable, str(GENERATOR), "--n", "300", "--seed", "7", "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    lines = out.read_bytes().splitlines(keepends=True)
    assert lines == list(gen.ndjson_lines(300, seed=7))
    assert lines != list(gen.ndjson_lines(300, seed=8))
    assert [json.loads(line)["sequence"] for line in lines] == list(range(300))
    # Every optional field is present in some records and absent in others (nulls after conversion).
    docs = [json.loads(line) for line in lines]
    for key in ("referrer", "ecommerce", "experiment"):
        assert 0 < sum(key in d for d in docs) < len(docs), key
    assert 700 < len(out.read_bytes()) / len(lines) < 1300  # ~1 KiB a record, as bench/README.md says


@pytest.mark.parametrize("kind", ["parquet", "orc", "avro"])
def test_clickstream_round_trips(clickstream: list[bytes], kind: str, tmp_path: Path) -> None:
    conv = converter(CLICKSTREAM_COLUMNS, kind)
    assert conv.check(clickstream) == [None] * len(clickstream)
    blob = conv.convert(clickstream)
    expected = [_expected_click(json.loads(r)) for r in clickstream]
    assert rows_of(conv, blob) == expected
    if kind == "parquet":
        assert duckdb_rows(blob, tmp_path) == expected


def test_clickstream_with_bad_records_sprinkled_in(clickstream: list[bytes]) -> None:
    conv = converter(CLICKSTREAM_COLUMNS)
    records = list(clickstream)
    broken = {
        5: b'{"event_id": "x", "geo": {"tz_offset_min": 99999}}\n',
        1000: b"not json\n",
        2222: clickstream[2222].replace(b'"event_time":"', b'"event_time":"x'),
    }
    for i, r in broken.items():
        records[i] = r
    verdicts = conv.check(records)
    assert [i for i, v in enumerate(verdicts) if v is not None] == sorted(broken)
    good = [r for i, r in enumerate(records) if i not in broken]
    got = rows_of(conv, conv.convert(good))
    assert [r["event_id"] for r in got] == [json.loads(r)["event_id"] for r in good]


# ---------------------------------------------------------------------------------------------
# Randomised agreement between the vectorised reader and the per-record path
# ---------------------------------------------------------------------------------------------

FUZZ_COLUMNS = [
    ("i", "int"),
    ("t", "tinyint"),
    ("big", "bigint"),
    ("x", "double"),
    ("f", "float"),
    ("dec", "decimal(9,3)"),
    ("b", "boolean"),
    ("s", "string"),
    ("vc", "varchar(3)"),
    ("d", "date"),
    ("ts", "timestamp"),
    ("bin", "binary"),
    ("arr", "array<int>"),
    ("st", "struct<a:int,b:string>"),
    ("ls", "array<struct<x:double,when:timestamp>>"),
]
FUZZ_VALUES = {
    "int": [
        "1",
        "-5",
        '"7"',
        "1.5",
        '"x"',
        "true",
        "null",
        "[1]",
        '{"a":1}',
        "2147483648",
        '"0x10"',
        "1e3",
        "-0",
        '" 1"',
    ],
    "number": [
        "0.1",
        "1e300",
        "-2.5",
        '"3.25"',
        '"nan"',
        "1",
        "NaN",
        "-Infinity",
        '"abc"',
        "false",
        "12345678901234567890123",
    ],
    "dec": ["1.0005", "-1.0005", '"2.5"', "999999.9995", "1e2", '"1e-2"', "123456789", '"x"', "0.0001", "-0"],
    "bool": ["true", "false", '"TRUE"', '"no"', "1", "null"],
    "string": [
        '"abc"',
        '"\\u00e9\\ud83d\\ude00"',
        "12",
        "1.50",
        "true",
        '{"K":[1,"v"]}',
        "[1,2]",
        '""',
        "null",
        '"ab\\"c"',
    ],
    "date": ['"2024-05-01"', '"2024-5-1"', '"2024-02-30"', "20240501", '"x"', '"0001-01-01"'],
    "ts": [
        '"2024-05-01T10:00:00Z"',
        '"2024-05-01T10:00:00.123456789+01:00"',
        '"2024-5-1 1:2:3"',
        "1714557600",
        "1714557600123",
        "1714557600.5",
        '"1714557600"',
        '"2024-05-01T10:00:00"',
        '"bad"',
        "true",
        '"20240501103000"',
        '"01/May/2024:10:00:00 +0000"',
    ],
    "bin": ['"aGVsbG8="', '"not base64"', '""', "5", '"YQ"'],
    "arr": ["[1,2]", "[]", "[null]", '["1"]', "[1.5]", "5", '{"a":1}'],
    "st": ['{"a":1,"b":"x"}', '{"A":"2"}', "[]", "[1]", '"s"', '{"b":{"c":1}}', "{}"],
    "ls": [
        '[{"x":1,"when":0}]',
        '[{"X":"2","When":"2024-05-01 00:00:00"}]',
        "[null]",
        '[{"x":"bad"}]',
        "[]",
        '[{"when":[]}]',
    ],
}
# Values every deserializer reads without complaint, so most records take the vectorised path.
FUZZ_CLEAN = {
    "int": ["1", "-5", "0"],
    "number": ["0.1", "-2.5", "1"],
    "dec": ["1.0005", "-1.0005", "0.0001", "123456"],
    "bool": ["true", "false"],
    "string": ['"abc"', '"\\u00e9\\ud83d\\ude00"', '""', '"ab\\"c"'],
    "date": ['"2024-05-01"', '"0001-01-01"'],
    "ts": ['"2024-5-1 1:2:3"', '"2024-05-01 10:00:00.123"'],
    "bin": ['"aGVsbG8="', '""'],
    "arr": ["[1,2]", "[]", "[null]"],
    "st": ['{"a":1,"b":"x"}', "{}"],
    "ls": ['[{"x":1,"when":"2024-05-01 10:00:00"}]', "[]", "[null]"],
}
FUZZ_KINDS = {
    "i": "int",
    "t": "int",
    "big": "int",
    "x": "number",
    "f": "number",
    "dec": "dec",
    "b": "bool",
    "s": "string",
    "vc": "string",
    "d": "date",
    "ts": "ts",
    "bin": "bin",
    "arr": "arr",
    "st": "st",
    "ls": "ls",
}
FUZZ_ODD = [
    b"",
    b"   ",
    b"[]",
    b'[{"i":1}]',
    b"null",
    b"17",
    b'"str"',
    b'{"i":1',
    b"{'i':1}",
    b'{"i":1}{"i":2}',
    b'{"i":1} {"i":2}\n',
    b'{"i":1}\n{"i":3}',
    b'\xef\xbb\xbf{"i":4}',
    b'{"i":1,}',
    b'{"s":"\xff"}',
    b'{"i":1}null',
    b'{"i": 5, "i": 6}',
    b'{"I": 5, "i": null}',
    b'\t{"i": 8}\r\n',
    b'{"x": Inf, "s": "NaN"}',
    b'{"x": -NaN}',
]


def _fuzz_records(seed: int, n: int, anomalies: float) -> list[bytes]:
    import random

    rng = random.Random(seed)
    out: list[bytes] = []
    for _ in range(n):
        if rng.random() < anomalies / 4:
            out.append(rng.choice(FUZZ_ODD))
            continue
        parts = []
        pool = FUZZ_VALUES if rng.random() < anomalies else FUZZ_CLEAN
        for name, _ in rng.sample(FUZZ_COLUMNS, rng.randint(0, len(FUZZ_COLUMNS))):
            key = name.upper() if rng.random() < 0.01 else name
            parts.append(f'"{key}":{rng.choice(pool[FUZZ_KINDS[name]])}')
        if rng.random() < 0.1:
            extras = ["1", "null"] if pool is FUZZ_CLEAN else ["1", '"x"', '{"deep":[1]}', "null"]
            parts.append('"extra":' + rng.choice(extras))
        out.append(("{" + ",".join(parts) + "}").encode() + (b"\n" if rng.random() < 0.8 else b""))
    return out


FUZZ_DESERIALIZERS = [
    {"type": "openx_json"},
    {"type": "openx_json", "case_insensitive": False},
    {"type": "hive_json", "timestamp_formats": ["yyyyMMddHHmmss", "dd/MMM/yyyy:HH:mm:ss Z", "millis"]},
]


def _agree(deserializer: dict[str, Any], records: list[bytes]) -> dict[str, int]:
    """Check and convert ``records`` as one batch and, on a reference converter, record by record
    on the per-record path: the verdict codes and the rows must be the same."""
    batch = converter(FUZZ_COLUMNS, deserializer=deserializer)
    reference = converter(FUZZ_COLUMNS, deserializer=deserializer)
    reference._fast_enabled = False
    verdicts = batch.check(records)
    expected = reference.check(records)
    assert [v and v[0] for v in verdicts] == [v and v[0] for v in expected]
    good = [r for r, v in zip(records, verdicts, strict=True) if v is None]
    got = _render(batch, good)
    assert got == _render(reference, good)
    batch.clear_cache()
    # Again uncached and in reverse order (a record of several objects keeps its rows' order).
    assert sorted(_render(batch, list(reversed(good)))) == sorted(got)
    return batch.path_stats


@pytest.mark.parametrize("deserializer", FUZZ_DESERIALIZERS)
def test_paths_agree_on_random_records_with_sparse_anomalies(deserializer: dict[str, Any]) -> None:
    records = _fuzz_records(7, 4000, anomalies=0.004)
    stats = _agree(deserializer, records)
    assert stats["fast_records"] > 3000 and stats["slow_records"] > 20, stats  # both paths took part


@pytest.mark.parametrize("deserializer", FUZZ_DESERIALIZERS)
def test_paths_agree_on_batches_of_one_odd_value(deserializer: dict[str, Any]) -> None:
    # A whole batch with the same odd value lets the vectorised reader adapt (numbers as text,
    # epoch numbers for timestamps) or fail entirely; either way it must agree with the
    # per-record path. One batch per column and value, plus the odd records themselves.
    records: list[bytes] = []
    for name, _ in FUZZ_COLUMNS:
        for value in FUZZ_VALUES[FUZZ_KINDS[name]]:
            records.extend(f'{{"{name}":{value},"i":{k}}}\n'.encode() for k in range(40))
    records.extend(odd + b"\n" for odd in FUZZ_ODD)
    stats = _agree(deserializer, records)
    assert stats["fast_records"] > 1000, stats
