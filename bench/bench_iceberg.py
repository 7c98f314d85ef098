#!/usr/bin/env python3
"""Benchmark: clickstream into Apache Iceberg tables through the iceberg destination.

Usage::

    python bench/bench_iceberg.py                       # 100,000 records, 5 MiB batches
    python bench/bench_iceberg.py --records 300000 --batch-mib 16 --rounds 3

What it measures, in one run, on a SQL catalog (SQLite) with a local warehouse, for an
unpartitioned table and one partitioned by day(event_time):

1. Bare: the same batches, already converted to Arrow tables in the table's schema (untimed),
   appended with pyiceberg's ``Table.append``, one commit each. What writing these rows costs
   with pyiceberg alone.
2. Destination: the batches as JSON records through ``IcebergDestination.deliver``, as the
   delivery runner sends them (``--in-flight`` at once, its default 2): the conversion (format conversion's kernels), the replay check
   in the table's history, one transaction per batch with the batch's identity in its snapshot
   summary. Commit latency p50/p99 from the same pass.
3. Copy-on-write: a batch of ``--updates`` updates by key against tables of growing size: its
   latency grows with the data files that hold the keys, not with the batch.

Each pass starts from a new table and is checked for the exact row count. Rounds interleave the
variants; the best of each counts, with the median of the per-round ratios beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench import MIB, add_dataset_args, batches_of, dataset_from_args, in_process_setup  # noqa: E402

# The clickstream as a user would declare its table: nested objects as structs, arrays as lists.
COLUMNS: list[tuple[str, Any]] = [
    ("event_id", "string"), ("event_type", "string"), ("event_time", "timestamptz"), ("received_at_ms", "long"),
    ("session_id", "string"), ("sequence", "long"),
    ("user", {"user_id": "long", "anonymous_id": "string", "is_logged_in": "boolean", "segment": "string",
              "ltv_usd": "double"}),
    ("device", {"type": "string", "os": "string", "browser": "string", "user_agent": "string", "screen_w": "long",
                "screen_h": "long", "ip": "string"}),
    ("geo", {"country": "string", "city": "string", "lat": "double", "lon": "double", "tz_offset_min": "long"}),
    ("page", {"url": "string", "path": "string", "title": "string", "load_time_ms": "double"}),
    ("tags", ["string"]),
    ("metrics", {"scroll_depth": "double", "dwell_ms": "long", "clicks": "long"}),
    ("referrer", "string"),
    ("ecommerce", {"currency": "string", "total": "double", "coupon": "string",
                   "items": [{"sku": "string", "qty": "long", "price": "double", "category": "string"}]}),
    ("experiment", {"id": "string", "variant": "string"}),
    ("error", {"code": "long", "message": "string"}),
]


def schema() -> Any:
    from pyiceberg import types as it
    from pyiceberg.schema import Schema

    ids = iter(range(1, 10_000))
    simple = {"string": it.StringType(), "long": it.LongType(), "double": it.DoubleType(),
              "boolean": it.BooleanType(), "timestamptz": it.TimestamptzType()}

    def typ(spec: Any) -> Any:
        if isinstance(spec, str):
            return simple[spec]
        if isinstance(spec, list):
            return it.ListType(next(ids), typ(spec[0]), element_required=False)
        return it.StructType(*[it.NestedField(next(ids), k, typ(v)) for k, v in spec.items()])

    top = [(next(ids), n, t) for n, t in COLUMNS]
    return Schema(*[it.NestedField(i, n, typ(t)) for i, n, t in top])


class Lake:
    """A SQLite catalog and a local warehouse under ``root``; a new table per pass."""

    def __init__(self, root: Path) -> None:
        from pyiceberg.catalog import load_catalog

        (root / "wh").mkdir(parents=True, exist_ok=True)
        self.props = {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": (root / "wh").as_uri()}
        self.catalog = load_catalog("default", **self.props)
        self.catalog.create_namespace("bench")
        self.n = 0

    def table(self, partitioned: bool) -> str:
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.transforms import DayTransform

        self.n += 1
        name = f"bench.t{self.n}"
        spec = PartitionSpec(PartitionField(3, 10_000, DayTransform(), "day")) if partitioned else PartitionSpec()
        self.catalog.create_table(name, schema(), partition_spec=spec)
        return name

    def destination(self, name: str, unique: bool = False) -> Any:
        from firehose.destinations.iceberg import IcebergDestinationConfig
        from firehose.interfaces import BuildContext

        db, table = name.split(".")
        entry: dict[str, Any] = {"database": db, "table": table}
        if unique:
            entry["unique_keys"] = ["event_id"]
        cfg = IcebergDestinationConfig.model_validate({"type": "iceberg", "catalog": self.props,
                                                       "destination_tables": [entry]})
        return cfg.build(BuildContext("bench", 1, "us-east-1", "000000000000", tempfile.gettempdir()))

    def rows(self, name: str) -> int:
        return len(self.catalog.load_table(name).scan(selected_fields=("event_id",)).to_arrow())


def arrow_batches(lake: Lake, batches: list[list[bytes]]) -> list[Any]:
    """The batches as Arrow tables in the table's schema, converted once (for the bare pass)."""
    from firehose.destinations.iceberg import _Route

    name = lake.table(False)
    dest = lake.destination(name)
    table = lake.catalog.load_table(name)
    out = []
    for b in batches:
        route = _Route(*name.split("."), positions=list(range(len(b))), operations=["insert"] * len(b))
        plan = dest._plan(table, _batch(b, 0), route)
        assert not plan.failures, plan.failures
        out.append(plan.rows)
    return out


def _batch(records: list[bytes], i: int, meta: list[Any] | None = None) -> Any:
    from firehose.interfaces import Batch

    now = datetime.now(UTC)
    return Batch("bench", i, f"bench/{i}/{random.getrandbits(64):016x}", records, int(now.timestamp() * 1000),
                 meta=meta)


def bare_pass(lake: Lake, tables: list[Any], partitioned: bool, expected: int) -> float:
    name = lake.table(partitioned)
    table = lake.catalog.load_table(name)
    t0 = time.perf_counter()
    for arrow in tables:
        table.append(arrow)
    elapsed = time.perf_counter() - t0
    assert lake.rows(name) == expected
    return elapsed


def destination_pass(lake: Lake, batches: list[list[bytes]], partitioned: bool, expected: int,
                     in_flight: int) -> tuple[float, list[float]]:
    name = lake.table(partitioned)
    dest = lake.destination(name)

    async def run() -> float:
        gate = asyncio.Semaphore(in_flight)  # the delivery runner's max_in_flight

        async def one(i: int, b: list[bytes]) -> None:
            async with gate:
                result = await dest.deliver(_batch(b, i))
            if not result.ok:
                raise RuntimeError(f"batch {i}: {next(iter(result.failures.values()))}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(batches)))
        return time.perf_counter() - t0

    elapsed = asyncio.run(run())
    assert lake.rows(name) == expected
    return elapsed, list(dest.commit_latency_secs)


def copy_on_write(lake: Lake, records: list[bytes], batch_bytes: int, sizes: list[int], updates: int) -> list[str]:
    """The latency of one batch of ``updates`` updates by key against tables of ``sizes`` rows."""
    import orjson

    lines = []
    for size in sizes:
        name = lake.table(True)
        dest = lake.destination(name, unique=True)
        rows = records[:size]
        for i, b in enumerate(batches_of(rows, batch_bytes)):
            assert asyncio.run(dest.deliver(_batch(b, i))).ok
        sample = random.Random(7).sample(rows, min(updates, len(rows)))
        changed = [orjson.dumps({**orjson.loads(r), "event_type": "updated"}) for r in sample]
        meta = [{"otf": {"operation": "update"}}] * len(changed)
        files = len(lake.catalog.load_table(name).inspect.files())
        t0 = time.perf_counter()
        assert asyncio.run(dest.deliver(_batch(changed, 10_000, meta))).ok
        elapsed = time.perf_counter() - t0
        assert lake.rows(name) == size
        lines.append(f"| {size:,} | {files} | {len(changed)} | {elapsed * 1000:,.0f} ms |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch-mib", type=float, default=5.0, help="records per commit, by size (the buffer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-flight", type=int, default=2, help="batches delivered at once (max_in_flight)")
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--cow-sizes", default="10000,50000,100000", help="table sizes for the copy-on-write figure")
    add_dataset_args(ap)
    args = ap.parse_args()
    in_process_setup()
    import pyiceberg

    data = dataset_from_args(args)
    records = data.records
    batches = batches_of(records, int(args.batch_mib * MIB))
    root = Path(tempfile.mkdtemp(prefix="bench-iceberg-"))
    try:
        lake = Lake(root)
        tables = arrow_batches(lake, batches)
        mib = data.nbytes / MIB
        print(f"pyiceberg {pyiceberg.__version__}; {len(records):,} records, {mib:.1f} MiB, "
              f"{len(batches)} batches of ~{args.batch_mib:g} MiB; SQLite catalog, local warehouse")
        results: dict[str, list[float]] = {}
        latencies: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for partitioned in (False, True):
                kind = "day" if partitioned else "flat"
                results.setdefault(f"bare-{kind}", []).append(bare_pass(lake, tables, partitioned, len(records)))
                elapsed, lat = destination_pass(lake, batches, partitioned, len(records), args.in_flight)
                results.setdefault(f"dest-{kind}", []).append(elapsed)
                latencies.setdefault(kind, []).extend(lat)
            print(f"round {r + 1}: " + ", ".join(f"{k} {len(records) / v[-1]:,.0f} rows/s" for k, v in results.items()))
        print("\n| table | bare rows/s | destination rows/s | ratio (best) | ratio (median of rounds) "
              "| commit p50 | commit p99 |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("flat", "day"):
            bare, dest = results[f"bare-{kind}"], results[f"dest-{kind}"]
            ratios = [b / d for b, d in zip(bare, dest, strict=True)]
            lat = sorted(latencies[kind])
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"| {'unpartitioned' if kind == 'flat' else 'day(event_time)'} | {len(records) / min(bare):,.0f} "
                  f"| {len(records) / min(dest):,.0f} | {min(bare) / min(dest):.2f} | {statistics.median(ratios):.2f} "
                  f"| {statistics.median(lat) * 1000:,.0f} ms | {p99 * 1000:,.0f} ms |")
        sizes = [int(s) for s in args.cow_sizes.split(",") if int(s) <= len(records)]
        print(f"\nCopy-on-write: one batch of {args.updates} updates by event_id, day-partitioned table\n")
        print("| table rows | data files | updates | batch latency |")
        print("|---|---|---|---|")
        for line in copy_on_write(lake, records, int(args.batch_mib * MIB), sizes, args.updates):
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
