"""Schemas from a Glue Data Catalog table (against moto)."""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pytest

from firehose.transforms.formats import Converter, FormatConfig, SchemaError, resolve_schema
from unit.formats_support import ENTITY_NOT_FOUND, lines, rows_of


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
    # Fetched once, the table's columns build converters without any further Glue call.
    schema = FormatConfig.model_validate(spec).schema_
    assert schema is not None
    resolved = resolve_schema(schema)
    assert resolved.columns == (("id", "bigint"), ("user", "struct<name:string,age:int>"))
    spec["schema"]["glue"]["table"] = "missing"  # type: ignore[index]
    with pytest.raises(SchemaError) as info:
        Converter(FormatConfig.model_validate(spec))
    assert info.value.code == ENTITY_NOT_FOUND
    assert Converter(FormatConfig.model_validate(spec), resolved).arrow_schema == conv.arrow_schema
