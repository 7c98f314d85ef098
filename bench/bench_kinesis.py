#!/usr/bin/env python3
"""Throughput of the Kinesis Data Streams source: a 4-shard stream drained to a local directory.

Usage::

    python bench/bench_kinesis.py                       # 200,000 records, best of 2 rounds
    python bench/bench_kinesis.py --records 20000 --rounds 1

One kinesalite server (tests/kinesalite.py; npm ci in tests/kinesalite first) holds a 4-shard
stream pre-filled with the clickstream data set (~1 KiB records): half put as plain records, half
packed into KPL aggregates of up to 50 KiB (the KPL's default AggregationMaxSize), so the stream
holds ``records / 2`` plain Kinesis records plus the aggregates.

Each round drains the whole stream twice, in turn:

* ``bare``: one thread per shard, boto3 ``GetRecords`` (Limit 10,000) from TRIM_HORIZON until
  the shard is caught up -- the floor any consumer pays on this machine, kinesalite included;
* ``daemon``: the daemon's own StreamRuntime with a ``kinesis`` source (TRIM_HORIZON) and a
  local destination (5 MiB buffers, fsync on): GetRecords, KPL de-aggregation, the spool with
  checkpoints, batching and the object writes, until every user record is in an object.

Figures are user records per second and MiB/s of user record bytes, and the ratio of the daemon's
rate to the bare drain of the same round. kinesalite itself shares the two cores, so both sides
are bounded by how fast it answers GetRecords. The target is a ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench import add_dataset_args, dataset_from_args, in_process_runtime, in_process_setup  # noqa: E402

MIB = 1 << 20
SHARDS = 4
KPL_MAX_BYTES = 51_200  # the KPL's AggregationMaxSize default


def fill(server: Any, stream: str, records: list[bytes]) -> int:
    """Put the first half of ``records`` as plain records and the second half as KPL aggregates;
    returns the number of Kinesis records put."""
    from firehose.kpl import aggregate

    half = len(records) // 2
    puts: list[list[dict[str, Any]]] = []
    batch: list[dict[str, Any]] = []
    size = 0

    def add(entry: dict[str, Any]) -> None:
        nonlocal batch, size
        n = len(entry["Data"]) + len(entry["PartitionKey"])
        if batch and (len(batch) == 500 or size + n > 4 * MIB):
            puts.append(batch)
            batch, size = [], 0
        batch.append(entry)
        size += n

    for i, r in enumerate(records[:half]):
        add({"PartitionKey": f"user-{i % 997}", "Data": r})
    group: list[tuple[str, bytes]] = []
    group_bytes = 0
    for i, r in enumerate(records[half:]):
        if group and group_bytes + len(r) + 32 > KPL_MAX_BYTES:
            add({"PartitionKey": group[0][0], "Data": aggregate(group)})
            group, group_bytes = [], 0
        group.append((f"user-{i % 997}", r))
        group_bytes += len(r) + 32
    if group:
        add({"PartitionKey": group[0][0], "Data": aggregate(group)})
    if batch:
        puts.append(batch)
    total = sum(map(len, puts))
    work = iter(puts)
    lock = threading.Lock()

    def putter() -> None:
        client = server.client()
        while True:
            with lock:
                chunk = next(work, None)
            if chunk is None:
                return
            todo = chunk
            while todo:
                resp = client.put_records(StreamName=stream, Records=todo)
                todo = [e for e, r in zip(todo, resp["Records"], strict=True) if "ErrorCode" in r]

    threads = [threading.Thread(target=putter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total


def bare_drain(server: Any, stream: str) -> tuple[float, int]:
    """GetRecords on every shard (a thread each) until caught up; (seconds, Kinesis records)."""
    client = server.client()
    shard_ids = [s["ShardId"] for s in client.list_shards(StreamName=stream)["Shards"]]
    counts = [0] * len(shard_ids)

    def drain(i: int) -> None:
        c = server.client()
        it = c.get_shard_iterator(StreamName=stream, ShardId=shard_ids[i], ShardIteratorType="TRIM_HORIZON")
        iterator = it["ShardIterator"]
        while iterator:
            resp = c.get_records(ShardIterator=iterator, Limit=10_000)
            counts[i] += len(resp["Records"])
            if not resp["Records"] and resp.get("MillisBehindLatest", 0) == 0:
                return
            iterator = resp.get("NextShardIterator")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(shard_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts)


async def daemon_drain(server: Any, stream: str, user_records: int, scratch: Path) -> dict[str, Any]:
    from firehose.config import parse_config

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    source = server.source_config(stream, initial_position="trim_horizon", poll_interval_ms=1000)
    cfg = parse_config({"streams": [{
        "name": "bench", "buffering": {"size_mib": 5, "interval_secs": 60},
        "sources": [source], "destination": {"type": "local", "path": str(scratch / "out")},
    }]}, "bench")
    rt = in_process_runtime(cfg.streams[0], scratch / "data")
    t0 = time.perf_counter()
    await rt.start()
    while rt.spool.next_seq < user_records or rt._cursor < rt.out.next_seq:  # read, and all in buffers
        await asyncio.sleep(0.005)
    read = time.perf_counter() - t0
    clean = await rt.stop(600)  # seals the open buffer and delivers it
    elapsed = time.perf_counter() - t0
    out = scratch / "out"
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"seconds": elapsed, "read_seconds": read, "delivered": rt.delivered_records, "clean": clean,
              "objects": sum(1 for p in out.rglob("*") if p.is_file()), "bytes": nbytes}
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000, help="records in the data set (default 200000)")
    ap.add_argument("--rounds", type=int, default=2, help="bare + daemon drains per run; the best counts")
    add_dataset_args(ap)
    args = ap.parse_args(argv)

    in_process_setup()
    from kinesalite import Kinesalite, available

    reason = available()
    if reason is not None:
        raise SystemExit(reason)
    dataset = dataset_from_args(args)
    records = dataset.records
    nbytes = dataset.nbytes
    server = Kinesalite()
    server.start()
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-kds-"))
    try:
        stream = "clickstream"
        server.create_stream(stream, SHARDS)
        t0 = time.perf_counter()
        kinesis_records = fill(server, stream, records)
        print(f"data set: {len(records)} records, {nbytes / MIB:.1f} MiB, as {kinesis_records} Kinesis records "
              f"({len(records) // 2} plain, {kinesis_records - len(records) // 2} KPL aggregates) in {SHARDS} "
              f"shards, filled in {time.perf_counter() - t0:.1f} s; cpus: {os.cpu_count()}", flush=True)
        print(f"{'round':>5} {'pass':>7} {'records/s':>10} {'MiB/s':>7} {'seconds':>8} {'ratio':>6}", flush=True)
        best_bare = best_daemon = 0.0
        for rnd in range(1, args.rounds + 1):
            seconds, got = bare_drain(server, stream)
            if got != kinesis_records:
                raise SystemExit(f"bare drain read {got} of {kinesis_records} Kinesis records")
            bare = len(records) / seconds
            print(f"{rnd:>5} {'bare':>7} {bare:>10.0f} {nbytes / MIB / seconds:>7.1f} {seconds:>8.2f}", flush=True)
            r = asyncio.run(daemon_drain(server, stream, len(records), work / f"r{rnd}"))
            if r["delivered"] != len(records) or r["bytes"] != nbytes:
                raise SystemExit(f"daemon delivered {r['delivered']} of {len(records)} records: {r}")
            rate = len(records) / r["seconds"]
            print(f"{rnd:>5} {'daemon':>7} {rate:>10.0f} {nbytes / MIB / r['seconds']:>7.1f} {r['seconds']:>8.2f} "
                  f"{rate / bare:>6.2f}  (all read in {r['read_seconds']:.2f} s; {r['objects']} objects)", flush=True)
            best_bare, best_daemon = max(best_bare, bare), max(best_daemon, rate)
        ratio = best_daemon / best_bare
        print(f"best: bare {best_bare:.0f} records/s, daemon {best_daemon:.0f} records/s "
              f"({nbytes / MIB * best_daemon / len(records):.1f} MiB/s): ratio {ratio:.2f} "
              f"{'>= 0.7 PASS' if ratio >= 0.7 else '< 0.7 FAIL'}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
