#!/usr/bin/env python3
"""Throughput of record format conversion (firehose.transforms.formats) against bare pyarrow.

Usage::

    python bench/bench_formats.py --records 100000
    python bench/bench_formats.py --records 20000 --repeat 1 --json /tmp/formats.json

The clickstream data set comes from bench/clickstream.py (cached like bench/bench.py caches it)
and is cut into batches of ``--batch-mib`` MiB. For each scenario the converter's work per batch,
``Converter.check`` then ``Converter.convert`` (the daemon's two steps), is timed against the bare
cost of the same output: joining the batch's records, ``pyarrow.json.read_json`` with the file's
Arrow schema as explicit schema, and ``write_table`` with the same codec. Both run in this
process with the same pyarrow thread count. Figures are the best of ``--repeat`` passes; MiB/s
counts input JSON bytes.

Scenarios: Parquet+snappy and ORC+zlib (the ratio target is >= 0.7 of bare); Parquet+snappy with
the checks done in ``--check-slice-mib`` slices (the daemon's processing stage calls ``check`` on
1 MiB batches) and the file converted from those checks' cached rows; Parquet with
keys in other letter case (the key-rewrite path); and the per-record path alone (forced), which
is what records the vectorised reader cannot take go through.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # test servers; firehose itself is the installed package
sys.path.insert(0, str(BENCH_DIR))

import pyarrow as pa  # noqa: E402
import pyarrow.json as pj  # noqa: E402
import pyarrow.orc as orc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench import ensure_dataset  # noqa: E402  (the clickstream data set cache, shared)
from firehose.transforms.formats import Converter, FormatConfig  # noqa: E402

DEFAULT_GEN = BENCH_DIR / "clickstream.py"  # the project's seeded generator

# A realistic Glue table for the clickstream records (nested structs, a list of structs,
# decimals, a timestamp as ISO text, optional fields).
COLUMNS = [
    ("event_id", "string"),
    ("event_type", "string"),
    ("event_time", "timestamp"),
    ("received_at_ms", "bigint"),
    ("session_id", "string"),
    ("sequence", "bigint"),
    ("user", "struct<user_id:bigint,anonymous_id:string,is_logged_in:boolean,segment:string,ltv_usd:double>"),
    (
        "device",
        "struct<type:string,os:string,browser:string,user_agent:string,screen_w:int,screen_h:int,ip:string>",
    ),
    ("geo", "struct<country:string,city:string,lat:double,lon:double,tz_offset_min:smallint>"),
    ("page", "struct<url:string,path:string,title:string,load_time_ms:double>"),
    ("tags", "array<string>"),
    ("metrics", "struct<scroll_depth:double,dwell_ms:bigint,clicks:int>"),
    ("referrer", "string"),
    (
        "ecommerce",
        "struct<currency:string,items:array<struct<sku:string,qty:int,price:decimal(10,2),category:string>>,"
        "total:decimal(12,2),coupon:string>",
    ),
    ("experiment", "struct<id:string,variant:string>"),
    ("error", "struct<code:int,message:string>"),
]

# Keys spelled in other letter case for the key-rewrite scenario (the schema stays lower case).
RECASED = [b"event_type", b"user_id", b"segment", b"browser", b"country", b"clicks", b"variant"]

MIB = 1024 * 1024


def recase(record: bytes) -> bytes:
    """The record with some keys in title case (``User_Id``), as a camel-case producer sends."""
    for key in RECASED:
        record = record.replace(b'"' + key + b'":', b'"' + key.title() + b'":')
    return record


def batches_of(records: list[bytes], batch_bytes: int) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for record in records:
        current.append(record)
        size += len(record)
        if size >= batch_bytes:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def make_converter(kind: str, codec: str) -> Converter:
    spec: dict[str, Any] = {"type": kind, "schema": {"columns": [{"name": n, "type": t} for n, t in COLUMNS]}}
    spec[kind] = {"compression": codec}
    return Converter(FormatConfig.model_validate(spec))


def best_of(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def converter_run(
    conv: Converter, batches: list[list[bytes]], check_slice_bytes: int | None
) -> Callable[[], None]:
    def run() -> None:
        conv.clear_cache()
        for batch in batches:
            if check_slice_bytes is None:
                verdicts = conv.check(batch)
            else:
                verdicts = []
                for part in batches_of(batch, check_slice_bytes):
                    verdicts.extend(conv.check(part))
            if any(v is not None for v in verdicts):
                raise SystemExit(f"unexpected conversion failures: {[v for v in verdicts if v][:3]}")
            conv.convert(batch)

    return run


def bare_run(conv: Converter, batches: list[list[bytes]], kind: str, codec: str) -> Callable[[], None]:
    options = pj.ParseOptions(explicit_schema=conv.arrow_schema, unexpected_field_behavior="ignore")

    def run() -> None:
        for batch in batches:
            table = pj.read_json(pa.BufferReader(b"".join(batch)), parse_options=options)
            sink = io.BytesIO()
            if kind == "parquet":
                pq.write_table(table, sink, compression=codec)
            else:
                orc.write_table(table, sink, compression=codec)

    return run


def scenario(
    name: str,
    kind: str,
    codec: str,
    batches: list[list[bytes]],
    repeat: int,
    *,
    check_slice_bytes: int | None = None,
    per_record: bool = False,
    bare: bool = True,
) -> dict[str, Any]:
    conv = make_converter(kind, codec)
    if per_record:
        conv._fast_enabled = False  # every record through the per-record path
    n = sum(len(b) for b in batches)
    nbytes = sum(len(r) for b in batches for r in b)
    converter_run(conv, batches[:1], check_slice_bytes)()  # warm up allocations and caches
    seconds = best_of(repeat, converter_run(conv, batches, check_slice_bytes))
    slices = (
        batches
        if check_slice_bytes is None
        else [p for b in batches for p in batches_of(b, check_slice_bytes)]
    )
    check_only = best_of(repeat, lambda: [conv.check(p) for p in slices])
    convert_only = best_of(repeat, lambda: [conv.convert(b) for b in batches])  # rows cached by check
    result: dict[str, Any] = {
        "scenario": name,
        "records": n,
        "mib": nbytes / MIB,
        "batches": len(batches),
        "seconds": seconds,
        "records_per_s": n / seconds,
        "mib_per_s": nbytes / MIB / seconds,
        "check_mib_per_s": nbytes / MIB / check_only,
        "convert_cached_mib_per_s": nbytes / MIB / convert_only,
        "path_stats": dict(conv.path_stats),
    }
    if bare:
        run = bare_run(conv, batches, kind, codec)
        run()
        bare_seconds = best_of(repeat, run)
        result.update(
            bare_seconds=bare_seconds,
            bare_records_per_s=n / bare_seconds,
            bare_mib_per_s=nbytes / MIB / bare_seconds,
            ratio=bare_seconds / seconds,
        )
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000, help="records in the data set (~1 KiB each)")
    ap.add_argument(
        "--gen", type=Path, default=DEFAULT_GEN, help="data generator, run as --n N --seed 42 --out FILE"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firehose-bench-cache")
    ap.add_argument("--batch-mib", type=float, default=64.0, help="MiB of records per converted file")
    ap.add_argument("--repeat", type=int, default=3, help="passes per measurement; the fastest counts")
    ap.add_argument(
        "--check-slice-mib",
        type=float,
        default=1.0,
        help="check() batch size of the sliced scenario (the daemon: 1)",
    )
    ap.add_argument(
        "--per-record-records", type=int, default=20_000, help="records for the per-record-path figure"
    )
    ap.add_argument("--threads", type=int, default=0, help="pyarrow CPU threads (0: pyarrow's default)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    if args.threads:
        pa.set_cpu_count(args.threads)
    data = ensure_dataset(args.gen, args.records, args.cache_dir).read_bytes()
    records = data.splitlines(keepends=True)
    batches = batches_of(records, int(args.batch_mib * MIB))
    recased = [[recase(r) for r in batch] for batch in batches]
    per_record = batches_of(records[: args.per_record_records], int(args.batch_mib * MIB))
    print(
        f"{len(records)} records, {len(data) / MIB:.1f} MiB, "
        f"{len(batches)} batch(es) of <= {args.batch_mib:g} MiB; "
        f"pyarrow {pa.__version__}, {pa.cpu_count()} CPU threads",
        flush=True,
    )
    results = [
        scenario("parquet+snappy", "parquet", "snappy", batches, args.repeat),
        scenario("orc+zlib", "orc", "zlib", batches, args.repeat),
        scenario(
            f"parquet+snappy, check in {args.check_slice_mib:g} MiB slices",
            "parquet",
            "snappy",
            batches,
            args.repeat,
            check_slice_bytes=int(args.check_slice_mib * MIB),
        ),
        scenario("parquet+snappy, keys in other case", "parquet", "snappy", recased, args.repeat),
        scenario(
            "parquet+snappy, per-record path only",
            "parquet",
            "snappy",
            per_record,
            1,
            per_record=True,
            bare=False,
        ),
    ]
    header = (
        f"{'scenario':<40} {'records/s':>10} {'MiB/s':>7} {'check':>7} {'convert':>8} "
        f"{'bare rec/s':>10} {'bare MiB/s':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        bare = (
            f"{r['bare_records_per_s']:>10.0f} {r['bare_mib_per_s']:>10.1f} {r['ratio']:>6.2f}"
            if "ratio" in r
            else f"{'':>10} {'':>10} {'':>6}"
        )
        print(
            f"{r['scenario']:<40} {r['records_per_s']:>10.0f} {r['mib_per_s']:>7.1f} "
            f"{r['check_mib_per_s']:>7.1f} "
            f"{r['convert_cached_mib_per_s']:>8.1f} {bare}"
        )
    print("\ncheck / convert: MiB/s of Converter.check alone and of Converter.convert of checked records.")
    print("ratio: bare time / (check + convert) time; the target is >= 0.7 for the first two rows.")
    for r in results:
        print(f"  {r['scenario']}: {r['path_stats']}")
    if args.json:
        args.json.write_text(
            json.dumps({"pyarrow": pa.__version__, "threads": pa.cpu_count(), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
