"""Helpers shared by the record format conversion tests (tests/unit/test_formats_*.py).

Files are read back with readers independent of the writer where one exists (DuckDB for
Parquet, fastavro for Avro) and compared value by value with what the input says.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pyarrow.orc as orc
import pyarrow.parquet as pq

from firehose.transforms.formats import Converter, FormatConfig

UTC = dt.UTC

# Firehose's format-conversion error codes (its CloudWatch Logs error codes for data format
# conversion), written out rather than imported from the module under test.
PARSE_ERROR = "DataFormatConversion.ParseError"
MALFORMED_DATA = "DataFormatConversion.MalformedData"
ENTITY_NOT_FOUND = "DataFormatConversion.EntityNotFound"


def converter(columns: list[tuple[str, str]], kind: str = "parquet", **extra: Any) -> Converter:
    spec: dict[str, Any] = {"type": kind, "schema": {"columns": [{"name": n, "type": t} for n, t in columns]}}
    spec.update(extra)
    return Converter(FormatConfig.model_validate(spec))


def rows_of(conv: Converter, blob: bytes) -> list[dict[str, Any]]:
    """Read a converted file back with the format's own reader (threads off: pyarrow 26 can abort
    at interpreter exit after a threaded read of nested Parquet columns)."""
    if conv.extension == ".parquet":
        return pq.read_table(io.BytesIO(blob), use_threads=False).to_pylist()  # type: ignore[no-any-return]
    if conv.extension == ".orc":
        return orc.ORCFile(io.BytesIO(blob)).read().to_pylist()  # type: ignore[no-any-return]
    return [_naive(r) for r in fastavro.reader(io.BytesIO(blob))]


def _naive(value: Any) -> Any:
    # fastavro returns timestamp-millis as aware UTC datetimes; the Arrow side is naive UTC.
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, dict):
        return {k: _naive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_naive(v) for v in value]
    return value


def duckdb_rows(blob: bytes, tmp_path: Path) -> list[dict[str, Any]]:
    import duckdb
    path = tmp_path / "independent.parquet"
    path.write_bytes(blob)
    con = duckdb.connect()
    try:
        cur = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def lines(*docs: Any) -> list[bytes]:
    return [json.dumps(d).encode() + b"\n" for d in docs]


def _render(conv: Converter, records: list[bytes]) -> list[str]:
    return [repr(r) for r in rows_of(conv, conv.convert(records))]
