"""Timestamps (OpenX and Hive SerDe layouts) and dates."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from unit.formats_support import MALFORMED_DATA, converter, lines, rows_of

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
