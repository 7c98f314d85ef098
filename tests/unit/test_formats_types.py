"""Every Hive type through every format (firehose.transforms.formats): values and Arrow types."""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from unit.formats_support import converter, duckdb_rows, lines, rows_of

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
