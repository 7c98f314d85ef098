"""Avro: a schema from an .avsc file, and the schema derived from Hive columns."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pytest

from firehose.transforms.formats import Converter, FormatConfig, SchemaError
from unit.formats_support import MALFORMED_DATA, _naive, converter, lines


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
