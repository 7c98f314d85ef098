#!/usr/bin/env python3
"""Throughput of the file tailing source: a log file appended with ~1 KiB lines while it is tailed.

Usage::

    python bench/bench_file_source.py --mib 200
    python bench/bench_file_source.py --mib 50 --repeat 1

Each run drives one stream in this process, the daemon's own StreamRuntime: a ``type: file``
source with ``single_line`` (Kinesis Agent's SINGLELINE), the spool with fsync, the batcher and
the local destination writing and fsyncing 5 MiB objects. A writer thread appends the clickstream
records as lines, 1 MiB per write, as fast as it can, starting when the stream starts; the time
runs until the last line is delivered. The baseline is ``cat file > /dev/null``: the same file
read in 1 MiB chunks, in the same run. Target: >= 50 MiB/s of log lines on a 2-core machine.
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
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # test servers; firehose itself is the installed package
sys.path.insert(0, str(BENCH_DIR))

from bench import add_dataset_args, dataset_from_args, in_process_runtime, in_process_setup  # noqa: E402

MIB = 1 << 20


def stream_yaml(scratch: Path) -> str:
    return f"""
streams:
  - name: bench
    buffering: {{size_mib: 5, interval_secs: 1}}
    delivery: {{max_in_flight: 2}}
    sources:
      - type: file
        paths: ["{scratch / 'logs' / 'app.log'}"]
        initial_position: start_of_file
        poll_interval_ms: 10
        processing: [{{type: single_line}}]
    destination: {{type: local, path: {scratch / 'out'}}}
"""


def writer(path: Path, chunks: list[bytes], started: threading.Event) -> None:
    with open(path, "ab", buffering=0) as f:
        started.set()
        for chunk in chunks:
            f.write(chunk)


async def run_pipeline(chunks: list[bytes], lines: int, scratch: Path) -> dict[str, Any]:

    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "logs").mkdir(parents=True)
    (scratch / "logs" / "app.log").touch()
    rt = in_process_runtime(stream_yaml(scratch), scratch / "data")
    started = threading.Event()
    thread = threading.Thread(target=writer, args=(scratch / "logs" / "app.log", chunks, started))
    t0 = time.perf_counter()
    await rt.start()
    thread.start()
    while rt.delivered_records < lines:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    thread.join()
    await rt.stop(60)
    objects = sum(1 for p in (scratch / "out").rglob("*") if p.is_file())
    out_bytes = sum(p.stat().st_size for p in (scratch / "out").rglob("*") if p.is_file())
    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": elapsed, "delivered": rt.delivered_records, "objects": objects, "out_bytes": out_bytes}


def raw_read(path: Path) -> float:
    """``cat file > /dev/null``: seconds to read the file in 1 MiB chunks."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, MIB):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200, help="MiB of log lines to append and tail (default 200)")
    ap.add_argument("--repeat", type=int, default=2, help="passes; the best counts")
    ap.add_argument("--records", type=int, default=100_000, help="clickstream records to cycle through")
    add_dataset_args(ap)
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    in_process_setup()

    dataset = dataset_from_args(args)
    target = args.mib * MIB
    lines: list[bytes] = []
    size = 0
    while size < target:
        for r in dataset.records:
            lines.append(r)
            size += len(r)
            if size >= target:
                break
    chunks: list[bytes] = []
    group: list[bytes] = []
    gsize = 0
    for line in lines:
        group.append(line)
        gsize += len(line)
        if gsize >= MIB:
            chunks.append(b"".join(group))
            group, gsize = [], 0
    if group:
        chunks.append(b"".join(group))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="firehose-bench-file-"))
    print(f"{len(lines)} lines, {size / MIB:.1f} MiB (avg {size / len(lines):.0f} B); cpus: {os.cpu_count()}; "
          f"best of {args.repeat}", flush=True)

    raw_file = work / "raw.log"
    raw_file.write_bytes(b"".join(chunks))
    raw = min(raw_read(raw_file) for _ in range(max(2, args.repeat)))
    raw_file.unlink()
    best = None
    for _ in range(args.repeat):
        r = asyncio.run(run_pipeline(chunks, len(lines), work / "run"))
        if r["delivered"] != len(lines):
            raise SystemExit(f"delivered {r['delivered']} of {len(lines)} lines")
        if best is None or r["seconds"] < best["seconds"]:
            best = r
    assert best is not None
    mibs = size / MIB / best["seconds"]
    print(f"bare read (cat > /dev/null)   {size / MIB / raw:9.1f} MiB/s  {len(lines) / raw:12,.0f} lines/s")
    print(f"tailed and delivered          {mibs:9.1f} MiB/s  {len(lines) / best['seconds']:12,.0f} lines/s  "
          f"({best['objects']} objects, {best['seconds']:.2f} s)")
    print(f"ratio to bare read            {raw / best['seconds']:9.3f}")
    print(f"target >= 50 MiB/s            {'PASS' if mibs >= 50 else 'FAIL'}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
