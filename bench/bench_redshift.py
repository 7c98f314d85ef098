#!/usr/bin/env python3
"""Benchmark: clickstream into PostgreSQL through the Redshift destination (``copy_from_stdin``).

Usage::

    python bench/bench_redshift.py                      # 200,000 records, staging none and gzip
    python bench/bench_redshift.py --records 50000 --compression none

What it measures, in one run against one PostgreSQL 15 server (tests/pgserver.py, fsync on) and
one moto S3 server:

1. Bare: every batch file (the records of one ``--batch-mib`` buffer, as the batcher would seal
   them) loaded with a plain ``COPY clicks (...) FROM STDIN`` in its own transaction: orjson per
   record, psycopg's ``write_row``. No staging, no bookkeeping, no daemon.
2. Destination: the same batches through ``RedshiftDestination.deliver`` with ``--in-flight``
   deliveries at once, as the delivery runner sends them: staged to S3 (with the staging
   compression), a manifest written, the JSON 'auto' mapping, COPY FROM STDIN and the bookkeeping
   row in one transaction.

Each pass starts from an empty table; every pass is checked for the exact row count and no
duplicate event ids. The best of ``--repeat`` passes counts. Prints rows/s, MiB/s (record bytes)
and the ratio of each destination pass to the bare one (target >= 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench import DEFAULT_GEN, MIB, Moto, Processes, ensure_dataset, load_dataset  # noqa: E402


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

TARGET_RATIO = 0.7
TABLE = "clicks"
# The clickstream's top-level keys; nested objects and arrays go to jsonb columns.
COLUMNS = [
    ("event_id", "text"), ("event_type", "text"), ("event_time", "timestamptz"), ("received_at_ms", "bigint"),
    ("session_id", "text"), ("sequence", "bigint"), ("user", "jsonb"), ("device", "jsonb"), ("geo", "jsonb"),
    ("page", "jsonb"), ("tags", "jsonb"), ("metrics", "jsonb"), ("referrer", "text"), ("ecommerce", "jsonb"),
    ("experiment", "jsonb"), ("error", "jsonb"),
]


def batches_of(records: list[bytes], batch_bytes: int) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for r in records:
        if cur and size + len(r) > batch_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    if cur:
        out.append(cur)
    return out


def reset_table(pg: Any) -> None:
    cols = ", ".join(f'"{n}" {t}' for n, t in COLUMNS)
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}")
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}_loaded")
    pg.execute(f"CREATE TABLE {TABLE} ({cols})")


def check(pg: Any, expected: int) -> str | None:
    total, distinct = pg.execute(f"SELECT count(*), count(DISTINCT event_id) FROM {TABLE}")[0]
    if total != expected or distinct != expected:
        return f"expected {expected} rows, found {total} ({distinct} distinct)"
    return None


def bare_pass(pg: Any, batches: list[list[bytes]]) -> float:
    """A plain COPY FROM STDIN per batch: what loading these files costs without the destination."""
    import orjson
    import psycopg

    names = [n for n, _t in COLUMNS]
    nested = (dict, list)
    sql = f"COPY {TABLE} ({', '.join(chr(34) + n + chr(34) for n in names)}) FROM STDIN"
    t0 = time.perf_counter()
    with psycopg.connect(**pg.params()) as conn:
        for batch in batches:
            with conn.transaction(), conn.cursor() as cur, cur.copy(sql) as copy:
                for rec in batch:
                    doc = orjson.loads(rec)
                    row = []
                    for n in names:
                        v = doc.get(n)
                        row.append(orjson.dumps(v).decode() if isinstance(v, nested) else v)
                    copy.write_row(row)
    return time.perf_counter() - t0


def destination_pass(pg: Any, moto: Moto, bucket: str, batches: list[list[bytes]], compression: str,
                     in_flight: int) -> float:
    from destinations.redshift import RedshiftDestinationConfig
    from firehose.interfaces import Batch, BuildContext

    params = pg.params()
    cfg = RedshiftDestinationConfig.model_validate({
        "type": "redshift",
        "connection": {"host": params["host"], "port": params["port"], "database": params["dbname"],
                       "user": params["user"], "password": params["password"]},
        "table": TABLE,
        "columns": [f'"{n}"' for n, _t in COLUMNS],
        "load_method": "copy_from_stdin",
        "copy_options": "JSON 'auto' GZIP" if compression == "gzip" else "JSON 'auto'",
        "staging": {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "access_key_id": "x",
                    "secret_access_key": "x", "prefix": f"{compression}/", "compression": compression},
        "bookkeeping_table": f"{TABLE}_loaded",
    })
    dest = cfg.build(BuildContext("bench", 1, "us-east-1", "000000000000", tempfile.gettempdir()))
    rng = random.Random(os.urandom(16))

    async def run() -> float:
        await dest.start()  # as the daemon does at start-up, before any batch
        gate = asyncio.Semaphore(in_flight)

        async def one(i: int, records: list[bytes]) -> None:
            async with gate:
                key = dest.batch_key(datetime.now(UTC), rng)
                result = await dest.deliver(Batch("bench", i, key, records, 0))
                if not result.ok:
                    raise RuntimeError(f"batch {i} failed: {next(iter(result.failures.values()))}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(batches)))
        elapsed = time.perf_counter() - t0
        await dest.close()
        return elapsed

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--gen", type=Path, default=DEFAULT_GEN)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firehose-bench-cache")
    ap.add_argument("--batch-mib", type=int, default=5, help="records per batch file (buffering.size_mib)")
    ap.add_argument("--in-flight", type=int, default=2, help="deliveries at once (delivery.max_in_flight)")
    ap.add_argument("--compression", default="none,gzip", help="staging compressions to run, comma-separated")
    ap.add_argument("--repeat", type=int, default=2, help="passes of each; the best counts")
    args = ap.parse_args(argv)
    _quiet_logs()

    from pgserver import PostgresServer, available

    reason = available()
    if reason is not None:
        raise SystemExit(reason)
    dataset = load_dataset(ensure_dataset(args.gen, args.records, args.cache_dir))
    batches = batches_of(dataset.records, args.batch_mib * MIB)
    n = len(dataset.records)
    print(f"{n:,} records, {dataset.nbytes / MIB:.1f} MiB in {len(batches)} batch files of <= {args.batch_mib} MiB; "
          f"{os.cpu_count()} CPUs", flush=True)

    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-redshift-"))
    pg = PostgresServer(fsync=True)
    best: dict[str, float] = {}
    failures: list[str] = []
    try:
        pg.start()
        moto = Moto(procs, work, sys.executable)
        moto.start()
        moto.create_bucket("staging")
        runs = ["bare"] + [f"destination-{c.strip()}" for c in args.compression.split(",") if c.strip()]
        for attempt in range(args.repeat):
            for name in runs:  # interleaved, so drift on a shared machine hits every variant alike
                reset_table(pg)
                if name == "bare":
                    elapsed = bare_pass(pg, batches)
                else:
                    elapsed = destination_pass(pg, moto, "staging", batches, name.split("-", 1)[1], args.in_flight)
                problem = check(pg, n)
                if problem:
                    failures.append(f"{name}: {problem}")
                print(f"  pass {attempt + 1} {name:<20} {elapsed:6.2f} s  {n / elapsed:>9,.0f} rows/s  "
                      f"{dataset.nbytes / MIB / elapsed:6.1f} MiB/s" + (f"  FAILED: {problem}" if problem else ""),
                      flush=True)
                best[name] = min(best.get(name, float("inf")), elapsed)
    finally:
        procs.stop_all()
        pg.cleanup()

    print("\nBest of each (rows/s, MiB/s of record bytes, ratio to bare COPY FROM STDIN)")
    for name, elapsed in best.items():
        ratio = best["bare"] / elapsed
        verdict = "" if name == "bare" else ("PASS" if ratio >= TARGET_RATIO else "FAIL")
        print(f"  {name:<20} {n / elapsed:>9,.0f} rows/s  {dataset.nbytes / MIB / elapsed:6.1f} MiB/s  "
              f"{ratio:5.2f}  {'>= ' + str(TARGET_RATIO) if name != 'bare' else ''}  {verdict}")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
