"""Isolating bad records, and agreement of the paths: a record converts the same alone, in a batch,
from the cache of ``check`` and on the per-record path, also from several threads."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from firehose.transforms.formats import ConversionError
from unit.formats_support import MALFORMED_DATA, PARSE_ERROR, _render, converter, lines, rows_of


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
