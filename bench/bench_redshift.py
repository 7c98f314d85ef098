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
   row in one transaction. The target (>= 0.7 of bare) applies here.
3. Daemon (for scale; ``--skip-daemon`` skips it): the whole daemon, loaded over HTTP by
   bench.py's loader with pre-encoded PutRecordBatch bodies, until the last row is committed
   (includes the final partial buffer's 1 s wait).

Each pass starts from an empty table after a checkpoint; every pass is checked for the exact row
count and no duplicate event ids. Rounds interleave the variants, so drift on a shared machine
hits each alike; the best of each counts, and the median of the per-round ratios is printed
beside it. Prints rows/s and MiB/s (record bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench import (  # noqa: E402
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MIB,
    STREAM,
    DaemonRun,
    Moto,
    Processes,
    Settings,
    add_dataset_args,
    batches_of,
    dataset_from_args,
    encode_bodies,
    run_loader,
    wait_delivered,
    write_bodies,
)


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


def reset_table(pg: Any) -> None:
    """An empty table, and a checkpoint now, so no pass pays for the previous one's writes."""
    cols = ", ".join(f'"{n}" {t}' for n, t in COLUMNS)
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}")
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}_loaded")
    pg.execute(f"CREATE TABLE {TABLE} ({cols})")
    pg.execute("CHECKPOINT")


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


def destination_config(pg: Any, moto: Moto, bucket: str, compression: str, password: str) -> dict[str, Any]:
    params = pg.params()
    return {
        "type": "redshift",
        "connection": {"host": params["host"], "port": params["port"], "database": params["dbname"],
                       "user": params["user"], "password": password},
        "table": TABLE,
        "columns": [f'"{n}"' for n, _t in COLUMNS],
        "load_method": "copy_from_stdin",
        "copy_options": "JSON 'auto' GZIP" if compression == "gzip" else "JSON 'auto'",
        "staging": {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "access_key_id": "x",
                    "secret_access_key": "x", "prefix": f"{compression}/", "compression": compression},
        "bookkeeping_table": f"{TABLE}_loaded",
    }


def destination_pass(pg: Any, moto: Moto, bucket: str, batches: list[list[bytes]], compression: str,
                     in_flight: int) -> float:
    from firehose.destinations.redshift import RedshiftDestinationConfig
    from firehose.interfaces import Batch, BuildContext

    raw = destination_config(pg, moto, bucket, compression, pg.params()["password"])
    cfg = RedshiftDestinationConfig.model_validate(raw)
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


def daemon_pass(procs: Processes, work: Path, pg: Any, moto: Moto, bodies_path: Path, n: int, compression: str,
                in_flight: int, batch_mib: int) -> float:
    """The whole daemon: PutRecordBatch over HTTP (bench.py's loader), spool, batching, this
    destination. Seconds from the first request to the last row committed."""
    os.environ[PASSWORD_ENV] = pg.params()["password"]
    dest = destination_config(pg, moto, "staging", compression, "${" + PASSWORD_ENV + "}")
    dest["staging"]["prefix"] = f"daemon-{compression}/"
    settings = Settings(connections=8, buffer_mib=batch_mib, interval_secs=1, max_in_flight=in_flight,
                        shutdown_timeout_secs=10, delivery_timeout=600, load_timeout=600)
    daemon = DaemonRun(procs, work / f"daemon-{compression}-{time.monotonic_ns()}", settings, dest, spool_max_mib=4096)
    daemon.start()
    try:
        t0 = time.time()
        run_loader(procs, settings, bodies_path, daemon, daemon.workdir / "loader.json")
        done = wait_delivered(daemon, n, settings.delivery_timeout)
        if done.done_at is None:
            raise RuntimeError(f"not every record was delivered:\n{daemon.log_tail()}")
        return done.done_at - t0
    finally:
        daemon.stop()


PASSWORD_ENV = "FIREHOSE_BENCH_PG_PASSWORD"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    add_dataset_args(ap)
    ap.add_argument("--batch-mib", type=int, default=5, help="records per batch file (buffering.size_mib)")
    ap.add_argument("--in-flight", type=int, default=2, help="deliveries at once (delivery.max_in_flight)")
    ap.add_argument("--compression", default="none,gzip", help="staging compressions to run, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of passes; the best of each counts")
    ap.add_argument("--skip-daemon", action="store_true", help="skip the whole-daemon passes")
    args = ap.parse_args(argv)
    _quiet_logs()

    from pgserver import PostgresServer, available

    reason = available()
    if reason is not None:
        raise SystemExit(reason)
    dataset = dataset_from_args(args)
    batches = batches_of(dataset.records, args.batch_mib * MIB)
    n = len(dataset.records)
    print(f"{n:,} records, {dataset.nbytes / MIB:.1f} MiB in {len(batches)} batch files of <= {args.batch_mib} MiB; "
          f"{os.cpu_count()} CPUs", flush=True)

    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-redshift-"))
    pg = PostgresServer(fsync=True)
    best: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}
    failures: list[str] = []
    try:
        pg.start()
        pg.execute("ALTER SYSTEM SET max_wal_size = '8GB'")  # no checkpoint in the middle of a pass
        pg.execute("SELECT pg_reload_conf()")
        moto = Moto(procs, work, sys.executable)
        moto.start()
        moto.create_bucket("staging")
        compressions = [c.strip() for c in args.compression.split(",") if c.strip()]
        runs = ["bare"] + [f"destination-{c}" for c in compressions]
        if not args.skip_daemon:
            runs += [f"daemon-{c}" for c in compressions]
            bodies_path = work / "bodies.bin"
            write_bodies(encode_bodies(dataset.records, STREAM, MAX_BATCH_RECORDS, MAX_BATCH_BYTES), bodies_path)
        for attempt in range(args.repeat):
            for name in runs:  # interleaved, so drift on a shared machine hits every variant alike
                reset_table(pg)
                kind, _, compression = name.partition("-")
                if kind == "bare":
                    elapsed = bare_pass(pg, batches)
                elif kind == "destination":
                    elapsed = destination_pass(pg, moto, "staging", batches, compression, args.in_flight)
                else:
                    elapsed = daemon_pass(procs, work, pg, moto, bodies_path, n, compression, args.in_flight,
                                          args.batch_mib)
                problem = check(pg, n)
                if problem:
                    failures.append(f"{name}: {problem}")
                print(f"  pass {attempt + 1} {name:<20} {elapsed:6.2f} s  {n / elapsed:>9,.0f} rows/s  "
                      f"{dataset.nbytes / MIB / elapsed:6.1f} MiB/s" + (f"  FAILED: {problem}" if problem else ""),
                      flush=True)
                best[name] = min(best.get(name, float("inf")), elapsed)
                if name == "bare":
                    bare_elapsed = elapsed
                else:
                    ratios.setdefault(name, []).append(bare_elapsed / elapsed)
    finally:
        procs.stop_all()
        pg.cleanup()

    print("\nBest of each: rows/s, MiB/s of record bytes, best/best ratio to bare COPY FROM STDIN, and the "
          "median of the ratios to the bare pass of the same round")
    for name, elapsed in best.items():
        ratio = best["bare"] / elapsed
        paired = statistics.median(ratios[name]) if name in ratios else 1.0
        targeted = name.startswith("destination")
        verdict = ("PASS" if ratio >= TARGET_RATIO else "FAIL") if targeted else ""
        print(f"  {name:<20} {n / elapsed:>9,.0f} rows/s  {dataset.nbytes / MIB / elapsed:6.1f} MiB/s  "
              f"{ratio:5.2f}  median {paired:4.2f}  {'>= ' + str(TARGET_RATIO) if targeted else '      '}  {verdict}")
    print("(the target applies to the destination passes; the daemon passes add HTTP ingest, the spool and "
          "batching, and are shown for scale)")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
