"""FormatConfig validation and the configuration errors of building a Converter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from firehose.transforms.formats import Converter, FormatConfig, SchemaError
from unit.formats_support import converter


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
