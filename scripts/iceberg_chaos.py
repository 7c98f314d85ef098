#!/usr/bin/env python3
"""Chaos run of the Iceberg destination: the daemon kill -9ed again and again while it commits.

Usage::

    python scripts/iceberg_chaos.py --seconds 180 --kill-every 3 --seed 1

Makes a day-partitioned table in the embedded catalog (SQLite in data_dir, local warehouse),
starts a daemon delivering to it with zero buffering (a commit after every batch, so commits are
always under way), and a loader putting numbered records; every ``--kill-every`` seconds (with
jitter) it kill -9s the daemon and starts it again at once. Every fifth record is an update of
an earlier key (the table has unique keys), so replays of update batches are exercised too.
At the end it waits for every acknowledged record and prints: records acknowledged, rows, keys
twice (must be 0), acknowledged keys missing (must be 0), snapshots committed twice for one
batch (must be 0), kills, and how many replays found their batch already in the table
(``iceberg_commit_found``: a kill that fell between a table commit and the spool's record of
it). Exit 0 when all three must-be-0 figures are 0. The short variant is
tests/e2e/test_iceberg.py (kill -9 during commits) and, for the crash window made certain,
tests/integration/test_iceberg.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import orjson  # noqa: E402

from support import Daemon, daemon_config, stream_config  # noqa: E402

STREAM = "chaos"


def make_table(data_dir: Path) -> Any:
    from pyiceberg.catalog import load_catalog
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import DayTransform
    from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

    root = data_dir / "iceberg"
    (root / "warehouse").mkdir(parents=True, exist_ok=True)
    catalog = load_catalog("default", type="sql", uri=f"sqlite:///{root / 'catalog.db'}",
                           warehouse=(root / "warehouse").as_uri())
    catalog.create_namespace("chaos")
    catalog.create_table("chaos.events", Schema(
        NestedField(1, "id", LongType(), required=True), NestedField(2, "version", LongType()),
        NestedField(3, "ts", TimestamptzType()), NestedField(4, "body", StringType())),
        partition_spec=PartitionSpec(PartitionField(3, 1000, DayTransform(), "day")))
    return catalog


class Loader(threading.Thread):
    """Numbered inserts, and every fifth record an update of an earlier id (version 1)."""

    def __init__(self, daemon: Daemon, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.rng = rng
        self.stop = threading.Event()
        self.acked: dict[int, int] = {}  # id -> the highest version acknowledged
        self.next_id = 0

    def run(self) -> None:
        while not self.stop.is_set():
            docs = []
            for _ in range(100):
                if self.acked and self.rng.random() < 0.2:
                    target = self.rng.choice(list(self.acked))
                    docs.append(({"id": target, "version": 1, "ts": "2026-12-06T00:00:00Z", "body": "u"}, "update"))
                else:
                    docs.append(({"id": self.next_id, "version": 0, "ts": "2026-12-06T00:00:00Z", "body": "i"},
                                 "insert"))
                    self.next_id += 1
            try:
                resp = self.d.firehose().put_record_batch(DeliveryStreamName=STREAM, Records=[
                    {"Data": orjson.dumps({**doc, "op": op})} for doc, op in docs])
            except Exception:  # the daemon is down: these were not acknowledged
                time.sleep(0.05)
                continue
            for (doc, _op), r in zip(docs, resp["RequestResponses"], strict=True):
                if "RecordId" in r:
                    self.acked[doc["id"]] = max(self.acked.get(doc["id"], 0), doc["version"])
            time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--kill-every", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait", type=float, default=300, help="seconds to wait for the last records")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="iceberg-chaos-"))
    catalog = make_table(work / "data")
    stream = stream_config(STREAM, {"type": "iceberg", "destination_tables": [
        {"database": "chaos", "table": "events", "unique_keys": ["id"]}]},
        buffering={"size_mib": 1, "interval_secs": 0}, backup={"path": str(work / "backup")},
        processing=[{"type": "metadata_extraction", "query": '{operation: .op}'}])
    d = Daemon(work, daemon_config(work, [stream])).start()
    loader = Loader(d, rng)
    loader.start()
    kills = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(args.kill_every * rng.uniform(0.5, 1.5))
        d.kill9()
        kills += 1
        d.start()
    loader.stop.set()
    loader.join()
    want = loader.acked
    table = "chaos.events"
    end = time.monotonic() + args.wait
    while time.monotonic() < end:
        rows = catalog.load_table(table).scan().to_arrow().to_pylist()
        have = {r["id"]: r["version"] for r in rows}
        if all(have.get(k, -1) >= v for k, v in want.items()):
            break
        time.sleep(1)
    time.sleep(3)  # a duplicate would land now
    rows = catalog.load_table(table).scan().to_arrow().to_pylist()
    counts = Counter(r["id"] for r in rows)
    versions = {r["id"]: r["version"] for r in rows}
    twice = sum(1 for c in counts.values() if c > 1)
    missing = sum(1 for k, v in want.items() if versions.get(k, -1) < v)
    batches = Counter(s.summary.additional_properties.get("firehose.batch-id") for s in
                      catalog.load_table(table).metadata.snapshots)
    # An update batch is two snapshots (overwrite + append) of one commit: count commits by
    # (batch id, operation).
    ops = Counter((s.summary.additional_properties.get("firehose.batch-id"), s.summary.operation) for s in
                  catalog.load_table(table).metadata.snapshots)
    double = sum(1 for c in ops.values() if c > 1)
    found = sum(1 for e in d.events() if e.get("event") == "iceberg_commit_found")
    d.stop()
    print(f"records acknowledged (distinct keys): {len(want):,}")
    print(f"rows: {len(rows):,}; keys twice: {twice}; acknowledged keys missing or stale: {missing}")
    print(f"commits: {len(batches):,} batches; a batch committed twice: {double}")
    print(f"kills: {kills}; replays that found their batch already committed: {found}")
    stale = [(k, v, versions.get(k)) for k, v in want.items() if versions.get(k, -1) < v][:10]
    if stale:
        print(f"first missing or stale keys (key, acknowledged version, version in the table): {stale}")
    print(f"work dir: {work}")
    return 0 if twice == missing == double == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
