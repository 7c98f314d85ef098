"""The clickstream data set (bench/clickstream.py, the benchmarks' data) end to end."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from unit.formats_support import converter, duckdb_rows, rows_of

BENCH = Path(__file__).resolve().parents[2] / "bench"
GENERATOR = BENCH / "clickstream.py"  # the project's seeded clickstream generator


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
