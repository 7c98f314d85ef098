#!/usr/bin/env python3
"""Throughput of dynamic partitioning: the clickstream data partitioned by a jq query.

Usage::

    python bench/bench_partitioning.py --records 100000
    python bench/bench_partitioning.py --partitions 1,500 --repeat 1

Each run drives one stream in this process, the daemon's own StreamRuntime (spool with fsync,
processing stage with the metadata_extraction processor, per-partition buffers, the local
destination writing and fsyncing objects): four producers put the records in 500-record batches
(PutRecordBatch's limit), then the stream is stopped, which seals every open partition and
delivers it. The time counts from the first put to the last object written. Buffering is 5 MiB /
900 s, so partitions are sealed by size, by the memory budget, or at the end.

The query is ``{k: (.user.user_id % N | tostring)}``: N distinct values for N partitions, and
the baseline is the same pipeline and query with N = 1 (a single partition value), in the same
run. jq's own rate is the compiled query alone over the same records, in the same 1 MiB batches
the processing stage uses. The target is >= 0.7 of the single-partition rate at 500 partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # test servers; firehose itself is the installed package
sys.path.insert(0, str(BENCH_DIR))

from bench import add_dataset_args, dataset_from_args, in_process_runtime, in_process_setup  # noqa: E402

MIB = 1 << 20
BATCH_RECORDS = 500
PRODUCERS = 4


def query(n: int) -> str:
    return f"{{k: (.user.user_id % {n} | tostring)}}"


#: The common case (issue 20): field picks only, looked up without libjq (transforms/jqpaths.py);
#: the same query in parentheses is not path-only, so it runs through libjq.
PATH_QUERY = "{segment: .user.segment, device: .device.type}"
PATH_QUERY_JQ = "{segment: (.user.segment), device: (.device.type)}"
PATH_PREFIX = "segment=!{partitionKeyFromQuery:segment}/device=!{partitionKeyFromQuery:device}/"


def stream_yaml(out: Path, n: int, budget_mib: int, in_flight: int, *, jq_query: str | None = None,
                prefix: str = "k=!{partitionKeyFromQuery:k}/", partitioned: bool = True) -> str:
    if not partitioned:  # the same stream without dynamic partitioning (and so without the query)
        return f"""
streams:
  - name: bench
    buffering: {{size_mib: 5, interval_secs: 900}}
    delivery: {{max_in_flight: {in_flight}}}
    processing:
      - {{type: append_delimiter}}
    destination: {{type: local, path: {out}}}
"""
    return f"""
streams:
  - name: bench
    buffering: {{size_mib: 5, interval_secs: 900}}
    dynamic_partitioning: {{enabled: true, max_active_partitions: {max(500, n)}, memory_budget_mib: {budget_mib}}}
    delivery: {{max_in_flight: {in_flight}}}
    processing:
      - {{type: metadata_extraction, query: '{jq_query or query(n)}'}}
      - {{type: append_delimiter}}
    destination:
      type: local
      path: {out}
      prefix: "{prefix}"
      error_output_prefix: "errors/!{{firehose:error-output-type}}/"
"""


async def run_pipeline(records: list[bytes], n: int, scratch: Path, budget_mib: int, in_flight: int,
                       **variant: Any) -> dict[str, Any]:

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    rt = in_process_runtime(stream_yaml(scratch / "out", n, budget_mib, in_flight, **variant), scratch / "data")
    await rt.start()
    batches = [records[i : i + BATCH_RECORDS] for i in range(0, len(records), BATCH_RECORDS)]
    queue = iter(batches)

    async def producer() -> None:
        for batch in queue:
            while not rt.has_room(sum(map(len, batch))):
                await asyncio.sleep(0.01)
            await rt.put(batch)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
    processed = rt.out is not rt.spool  # without a processing stage the batcher reads the spool itself
    while (processed and rt._recorded_upto < rt.spool.next_seq) or rt._cursor < rt.out.next_seq:
        await asyncio.sleep(0.005)
    routed = time.perf_counter()
    clean = await rt.stop(600)
    elapsed = time.perf_counter() - t0
    objects = sum(1 for p in (scratch / "out").rglob("*") if p.is_file())
    flushes = {
        reason: int(rt.metrics.partition_flushes.labels("bench", reason)._value.get())
        for reason in ("size", "interval", "memory", "stop")
    }
    result = {
        "partitions": n,
        "records": len(records),
        "delivered": rt.delivered_records,
        "archived": rt.archived_records,
        "clean": clean,
        "seconds": elapsed,
        "routed_seconds": routed - t0,
        "objects": objects,
        "flushes": flushes,
        "spills": int(rt.metrics.partition_spills.labels("bench")._value.get()),
    }
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def jq_rate(records: list[bytes], n: int) -> float:
    """The compiled query alone over the records, in the processing stage's 1 MiB batches."""
    from firehose.transforms.config import compile_query

    program = compile_query(query(n))
    chunks: list[str] = []
    group: list[bytes] = []
    size = 0
    for r in records:
        group.append(r)
        size += len(r)
        if size >= MIB:
            chunks.append(b"".join(group).decode())
            group, size = [], 0
    if group:
        chunks.append(b"".join(group).decode())
    t0 = time.perf_counter()
    count = 0
    for text in chunks:
        count += len(program.input_text(text).all())
    assert count == len(records)
    return len(records) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000, help="records in the data set (default 100000)")
    ap.add_argument("--partitions", default="10,500,5000", help="distinct partition values to compare with 1")
    ap.add_argument("--repeat", type=int, default=2, help="passes per case; the best counts")
    ap.add_argument("--budget-mib", type=int, default=64, help="dynamic_partitioning.memory_budget_mib")
    ap.add_argument("--max-in-flight", type=int, default=4, help="delivery.max_in_flight (default 4)")
    add_dataset_args(ap)
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--path-only", action="store_true",
                    help=f"compare {PATH_QUERY} (looked up, and through libjq) with no partitioning instead")
    args = ap.parse_args(argv)

    in_process_setup()
    if args.path_only:
        return path_only(args)

    dataset = dataset_from_args(args)
    records = [r.rstrip(b"\n") for r in dataset.records]
    nbytes = sum(map(len, records))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="firehose-bench-dp-"))
    cases = [1] + [int(x) for x in args.partitions.split(",") if x.strip()]
    print(f"data set: {len(records)} records, {nbytes / MIB:.1f} MiB; cpus: {os.cpu_count()}; "
          f"budget {args.budget_mib} MiB; best of {args.repeat}", flush=True)
    figures: dict[str, Any] = {"records": len(records), "mib": nbytes / MIB, "cases": []}
    base_rate = None
    print(f"{'partitions':>10} {'records/s':>10} {'MiB/s':>7} {'ratio':>6} {'jq rec/s':>9} "
          f"{'objects':>7} {'spills':>6}  flushes", flush=True)
    for n in cases:
        best: dict[str, Any] | None = None
        for _ in range(args.repeat):
            r = asyncio.run(run_pipeline(records, n, work / f"p{n}", args.budget_mib, args.max_in_flight))
            if r["delivered"] != len(records):
                raise SystemExit(f"{n} partitions: delivered {r['delivered']} of {len(records)} records: {r}")
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        assert best is not None
        rate = len(records) / best["seconds"]
        if n == 1:
            base_rate = rate
        assert base_rate is not None
        jq = max(jq_rate(records, n) for _ in range(args.repeat))
        best.update({"records_per_s": rate, "mib_per_s": nbytes / MIB / best["seconds"],
                     "ratio_to_single": rate / base_rate, "jq_records_per_s": jq})
        figures["cases"].append(best)
        flushes = ", ".join(f"{k} {v}" for k, v in best["flushes"].items() if v)
        print(f"{n:>10} {rate:>10.0f} {best['mib_per_s']:>7.1f} {rate / base_rate:>6.2f} {jq:>9.0f} "
              f"{best['objects']:>7} {best['spills']:>6}  {flushes}; routed in {best['routed_seconds']:.1f} s "
              f"of {best['seconds']:.1f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process over all runs: {peak:.0f} MiB (the data set itself is {nbytes / MIB:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def path_only(args: argparse.Namespace) -> int:
    """The path-only query end to end against the same stream unpartitioned, rounds interleaved:
    the lookups (transforms/jqpaths.py) and the same query through libjq."""
    import statistics

    dataset = dataset_from_args(args)
    records = [r.rstrip(b"\n") for r in dataset.records]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="firehose-bench-dp-"))
    variants = {"unpartitioned": {"partitioned": False},
                "path-only (lookups)": {"jq_query": PATH_QUERY, "prefix": PATH_PREFIX},
                "path-only (libjq)": {"jq_query": PATH_QUERY_JQ, "prefix": PATH_PREFIX}}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for name, variant in variants.items():
            r = asyncio.run(run_pipeline(records, 1, work / "pp", args.budget_mib, args.max_in_flight, **variant))
            if r["delivered"] != len(records):
                raise SystemExit(f"{name}: delivered {r['delivered']} of {len(records)} records")
            rates[name].append(len(records) / r["seconds"])
    base = rates["unpartitioned"]
    print(f"{len(records)} records; query {PATH_QUERY}; rounds {args.repeat}, best and median of ratios")
    for name, got in rates.items():
        ratios = [g / b for g, b in zip(got, base, strict=True)]
        print(f"{name:>22}: {max(got):>9,.0f} records/s  ratio {max(got) / max(base):.2f} "
              f"(median {statistics.median(ratios):.2f})")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
