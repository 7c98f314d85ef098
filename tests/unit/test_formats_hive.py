"""Glue/Hive type strings: precise errors, case, spaces and backticks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from firehose.transforms.formats import FormatConfig, parse_hive_type
from unit.formats_support import converter


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
