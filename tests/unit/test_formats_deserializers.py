"""Deserializer rules: OpenX and Hive SerDe coercions, key matching, mappings, dots, concatenated
objects, NaN and Infinity."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from unit.formats_support import MALFORMED_DATA, converter, lines, rows_of


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
