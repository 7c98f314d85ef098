"""Randomised agreement between the vectorised reader and the per-record path."""

from __future__ import annotations

from typing import Any

import pytest

from unit.formats_support import _render, converter

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
