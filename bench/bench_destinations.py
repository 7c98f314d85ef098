#!/usr/bin/env python3
"""Throughput of the OpenSearch, Splunk and HTTP endpoint destinations against their test servers.

Usage::

    python bench/bench_destinations.py --records 50000
    python bench/bench_destinations.py --cases opensearch,splunk --repeat 1

Each run drives one stream in this process, the daemon's own StreamRuntime (spool with fsync,
batcher, delivery runner, the destination's real client) against the protocol server of
tests/fakes (the same servers the tests use), run in a process of its own so that it has the
second core. Four producers put the clickstream records (~1 KiB each) in 500-record batches,
then the stream is stopped, which seals the open buffer and delivers it; the time counts from the
first put to the last record acknowledged (for Splunk: acknowledged by the indexer, after ack
polling). The server's own count is checked against the records sent.

Buffering: 5 MiB batches (Splunk's maximum), interval 1 s, four deliveries in flight. Splunk uses
the raw endpoint (the records are newline-terminated JSON, not HEC event envelopes). Target:
>= 20 MiB/s each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # test servers; firehose itself is the installed package
sys.path.insert(0, str(BENCH_DIR))

from bench import add_dataset_args, dataset_from_args, free_port, in_process_runtime, in_process_setup  # noqa: E402

MIB = 1 << 20
BATCH_RECORDS = 500
PRODUCERS = 4
TARGET_MIB_S = 20.0

CASES: dict[str, tuple[str, str]] = {  # name -> (server kind, destination YAML flow mapping)
    "http_endpoint": ("http_endpoint", "{{type: http_endpoint, url: '{url}/ingest', access_key: k}}"),
    "http_endpoint_gzip": ("http_endpoint",
                           "{{type: http_endpoint, url: '{url}/ingest', access_key: k, content_encoding: gzip}}"),
    "opensearch": ("opensearch", "{{type: opensearch, endpoint: '{url}', index: clicks, index_rotation: one_day}}"),
    "splunk": ("splunk", "{{type: splunk, hec_endpoint: '{url}', hec_endpoint_type: raw, "
                         "hec_token: 00000000-0000-0000-0000-000000000001, ack_poll_interval_ms: 100}}"),
}


class Server:
    """A tests/fakes server in a subprocess."""

    def __init__(self, kind: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "fakes", kind, str(self.port)], cwd=REPO_ROOT / "tests",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the {kind} test server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/__fake/stats", timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def run_case(case: str, records: list[bytes], scratch: Path) -> dict[str, Any]:

    kind, template = CASES[case]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    server = Server(kind)
    try:
        text = f"""
streams:
  - name: bench
    buffering: {{size_mib: 5, interval_secs: 1}}
    delivery: {{max_in_flight: 4}}
    destination: {template.format(url=server.url)}
    backup: {{path: {scratch / 'backup'}}}
"""
        rt = in_process_runtime(text, scratch / "data")
        await rt.start()
        queue = iter([records[i : i + BATCH_RECORDS] for i in range(0, len(records), BATCH_RECORDS)])

        async def producer() -> None:
            for batch in queue:
                while not rt.has_room(sum(map(len, batch))):
                    await asyncio.sleep(0.01)
                await rt.put(batch)

        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
        while rt._cursor < rt.out.next_seq:  # stop() seals what the batcher has read, no more
            await asyncio.sleep(0.005)
        clean = await rt.stop(600)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stats = await asyncio.to_thread(server.stats)
    finally:
        server.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"case": case, "records": len(records), "delivered": rt.delivered_records, "archived": rt.archived_records,
            "clean": clean, "seconds": elapsed, "daemon_cpu_seconds": cpu, "server": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50_000, help="records in the data set (default 50000)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=2, help="passes per case; the best counts")
    add_dataset_args(ap)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    in_process_setup()
    dataset = dataset_from_args(args)
    records = dataset.records  # newline-terminated, as Splunk's raw endpoint needs
    nbytes = sum(map(len, records))
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-dest-"))
    print(f"data set: {len(records)} records, {nbytes / MIB:.1f} MiB (avg {nbytes // len(records)} B); "
          f"cpus: {os.cpu_count()}; best of {args.repeat}", flush=True)
    print(f"{'destination':<20} {'records/s':>10} {'MiB/s':>7} {'requests':>8} {'daemon CPU s':>12}  target", flush=True)
    figures: list[dict[str, Any]] = []
    failed = False
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        best: dict[str, Any] | None = None
        for _ in range(args.repeat):
            r = asyncio.run(run_case(case, records, work / case))
            if r["delivered"] != len(records) or r["server"].get("records") != len(records):
                raise SystemExit(f"{case}: delivered {r['delivered']}, the server has {r['server']} of {len(records)}")
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        assert best is not None
        rate, mibs = len(records) / best["seconds"], nbytes / MIB / best["seconds"]
        best.update({"records_per_s": rate, "mib_per_s": mibs})
        figures.append(best)
        ok = mibs >= TARGET_MIB_S
        failed = failed or not ok
        print(f"{case:<20} {rate:>10.0f} {mibs:>7.1f} {best['server'].get('requests', 0):>8} "
              f"{best['daemon_cpu_seconds']:>12.2f}  {'PASS' if ok else 'FAIL'} (>= {TARGET_MIB_S:.0f} MiB/s)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
