"""Record format conversion in the daemon: JSON in, Parquet/ORC/Avro files out, bad records
archived as format-conversion-failed, Firehose's config rules enforced."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support import Daemon, daemon_config, local_objects, stream_config

COLUMNS = [
    {"name": "event_id", "type": "string"},
    {"name": "n", "type": "bigint"},
    {"name": "price", "type": "decimal(10,2)"},
    {"name": "user", "type": "struct<id:bigint,country:string>"},
    {"name": "tags", "type": "array<string>"},
]


def run_stream(tmp: Path, fmt: dict[str, Any], records: list[bytes]) -> dict[str, bytes]:
    s = stream_config("f", {"type": "local", "path": str(tmp / "out")},
                      buffering={"size_mib": 64, "interval_secs": 1}, format=fmt)
    d = Daemon(tmp, daemon_config(tmp, [s])).start()
    try:
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="f")["DeliveryStreamDescription"]
        assert desc["Destinations"][0]["ExtendedS3DestinationDescription"]["BufferingHints"]["SizeInMBs"] == 64
        d.firehose().put_record_batch(DeliveryStreamName="f", Records=[{"Data": r} for r in records])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(local_objects(tmp / "out")) < 2:
            time.sleep(0.2)
    finally:
        assert d.stop() == 0
    return local_objects(tmp / "out")


GOOD = [
    {"event_id": "e1", "n": 1, "price": "12.50", "user": {"id": 7, "country": "DE"}, "tags": ["a", "b"]},
    {"EVENT_ID": "e2", "n": 2, "user": {"id": 8, "country": "FR"}, "tags": [], "extra": "ignored"},
]


@pytest.mark.parametrize("kind", ["parquet", "orc", "avro"])
def test_json_is_converted_and_bad_records_are_archived(tmp_path: Path, kind: str) -> None:
    records = [json.dumps(GOOD[0]).encode() + b"\n", b"this is not json\n", json.dumps(GOOD[1]).encode()]
    objs = run_stream(tmp_path, {"type": kind, "schema": {"columns": COLUMNS}}, records)
    files = {k: v for k, v in objs.items() if k.endswith(f".{kind}")}
    assert len(files) == 1, list(objs)
    key, blob = next(iter(files.items()))
    assert re.fullmatch(rf"\d{{4}}/\d{{2}}/\d{{2}}/\d{{2}}/f-1-\d{{4}}(-\d{{2}}){{5}}-[0-9a-f-]{{36}}\.{kind}", key)
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(blob), use_threads=False).to_pylist()
    elif kind == "orc":
        import pyarrow.orc as orc

        rows = orc.ORCFile(io.BytesIO(blob)).read().to_pylist()
    else:
        import fastavro

        rows = list(fastavro.reader(io.BytesIO(blob)))
    assert [r["event_id"] for r in rows] == ["e1", "e2"]
    assert [r["n"] for r in rows] == [1, 2]
    assert str(rows[0]["price"]) == "12.50" and rows[1]["price"] is None
    assert rows[0]["user"] == {"id": 7, "country": "DE"}
    assert rows[0]["tags"] == ["a", "b"] and rows[1]["tags"] == []
    errors = [json.loads(line) for k, v in objs.items() if "format-conversion-failed" in k for line in v.splitlines()]
    assert len(errors) == 1
    assert base64.b64decode(errors[0]["rawData"]) == b"this is not json\n"
    assert errors[0]["ErrorCode"] and errors[0]["ErrorMessage"] and errors[0]["attemptsMade"] == 1


def _validate(tmp: Path, text: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "c.yaml"
    cfg.write_text(text)
    return subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True)


def test_conversion_config_rules(tmp_path: Path) -> None:
    base = ("streams:\n  - name: a\n    format:\n      type: parquet\n      schema: {columns: [{name: a, type: int}]}\n"
            "    destination: {type: local, path: out, compression: COMP}\n")
    res = _validate(tmp_path, base.replace("COMP", "gzip"))
    assert res.returncode == 2 and "set streams[0].destination.compression to none" in res.stderr
    res = _validate(tmp_path, base.replace("COMP", "none").replace("    format:", "    buffering: {size_mib: 5}\n    format:"))
    assert res.returncode == 2 and "streams[0].buffering.size_mib: must be at least 64" in res.stderr
    res = _validate(tmp_path, base.replace("COMP", "none").replace("type: int", "type: strin"))
    assert res.returncode == 2 and "streams[0].format" in res.stderr
    assert _validate(tmp_path, base.replace("COMP", "none")).returncode == 0


def test_a_schema_change_never_mixes_files_and_archives_what_no_longer_fits(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    out.write_text("down")  # batches are sealed under schema A but cannot be delivered yet
    cols_a = [{"name": "event_id", "type": "string"}, {"name": "n", "type": "string"}]
    cols_b = [{"name": "event_id", "type": "string"}, {"name": "n", "type": "bigint"}]

    def cfg(cols: list[dict[str, str]]) -> dict[str, Any]:
        s = stream_config("f", {"type": "local", "path": str(out)}, buffering={"size_mib": 64, "interval_secs": 0},
                          format={"type": "parquet", "schema": {"columns": cols}},
                          delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 200})
        return daemon_config(tmp_path, [s], shutdown_timeout_secs=2)

    d = Daemon(tmp_path, cfg(cols_a)).start()
    d.firehose().put_record_batch(DeliveryStreamName="f", Records=[
        {"Data": b'{"event_id":"e1","n":"5"}'}, {"Data": b'{"event_id":"e2","n":"not a number"}'},
    ])
    deadline = time.monotonic() + 20
    while not any(e.get("event") == "delivery_retry_scheduled" for e in d.events()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert d.stop() == 0
    out.unlink()
    d.write_config({**cfg(cols_b), "api": d.config["api"]})
    d.start()
    try:
        deadline = time.monotonic() + 30
        while len(local_objects(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        assert d.stop() == 0
    objs = local_objects(out)
    (pkey,) = [k for k in objs if k.endswith(".parquet")]
    table = pq.read_table(io.BytesIO(objs[pkey]), use_threads=False)
    assert table.schema.field("n").type == "int64"  # written in the new schema only
    assert table.to_pylist() == [{"event_id": "e1", "n": 5}]
    errors = [json.loads(line) for k, v in objs.items() if "format-conversion-failed" in k for line in v.splitlines()]
    assert [base64.b64decode(e["rawData"]) for e in errors] == [b'{"event_id":"e2","n":"not a number"}']
