#!/usr/bin/env python3
"""Chaos run of cluster mode: daemons and NATS servers kill -9ed and restarted under load.

Usage::

    python scripts/cluster_chaos.py --seconds 120 --daemons 3 --nats 3 --kill-every 10 --kill-nats

Starts ``--nats`` nats-servers with JetStream in one cluster (replicas: min(3, servers),
``sync_interval: always``), ``--daemons`` daemons in cluster mode on one stream (local
destination), and a loader that puts numbered records through every daemon in turn. Every
``--kill-every`` seconds it kill -9s a random daemon (and, with ``--kill-nats``, every other time
a random NATS server instead), and restarts it a few seconds later. At the end it waits for
every acknowledged record and prints: records acknowledged, delivered, delivered twice (must be
0), delivered but never sent (must be 0), missing (must be 0), and the kills. Exit 0 when all
three are 0. The short variant of this run, in CI, is tests/e2e/test_cluster_chaos.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import orjson  # noqa: E402

from support import Daemon, daemon_config, local_objects, nats_cluster, stream_config  # noqa: E402

STREAM = "chaos"


class Loader(threading.Thread):
    def __init__(self, daemons: list[Daemon]) -> None:
        super().__init__(daemon=True)
        self.daemons = daemons
        self.clients = [d.firehose(retry=False) for d in daemons]  # a retry could store a request twice
        self.acked: set[int] = set()
        self.sent: set[int] = set()
        self.refused = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop_flag.is_set():
            client = self.clients[n // 100 % len(self.daemons)]
            batch = list(range(n, n + 100))
            n += 100
            self.sent.update(batch)
            try:
                res = client.put_record_batch(DeliveryStreamName=STREAM, Records=[
                    {"Data": orjson.dumps({"i": i}) + b"\n"} for i in batch])
            except Exception:  # noqa: BLE001 - a daemon that is down
                self.refused += len(batch)
                time.sleep(0.02)
                continue
            for i, r in zip(batch, res["RequestResponses"], strict=True):
                if not r.get("ErrorCode"):
                    self.acked.add(i)
                else:
                    self.refused += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--daemons", type=int, default=3)
    ap.add_argument("--nats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=10)
    ap.add_argument("--kill-nats", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="firehose-chaos-"))
    servers = nats_cluster(work / "nats", args.nats) if args.nats > 1 else nats_cluster(work / "nats", 1)
    if args.nats == 1:
        servers[0].cluster_port = None
    for s in servers:
        s.start()
    out = work / "out"
    daemons = []
    for k in range(args.daemons):
        d_work = work / f"d{k + 1}"
        d_work.mkdir()
        stream = stream_config(STREAM, {"type": "local", "path": str(out)}, buffering={"size_mib": 1, "interval_secs": 1})
        cfg = daemon_config(d_work, [stream], cluster={
            "node": f"d{k + 1}", "lease_ttl_secs": 3,
            "jetstream": {"servers": [s.url for s in servers], "replicas": min(3, len(servers)),
                          "partitions": args.partitions}})
        daemons.append(Daemon(d_work, cfg).start(wait=False))
    kills: list[str] = []
    loader = Loader(daemons)
    try:
        time.sleep(5)
        loader.start()
        deadline = time.monotonic() + args.seconds
        turn = 0
        while time.monotonic() < deadline:
            time.sleep(args.kill_every)
            turn += 1
            if args.kill_nats and turn % 2 == 0:
                server = rng.choice(servers)
                server.kill9()
                kills.append(f"nats {server.name}")
                time.sleep(rng.uniform(1, 4))
                server.start()
            else:
                d = rng.choice(daemons)
                d.kill9()
                kills.append(f"daemon {d.workdir.name}")
                time.sleep(rng.uniform(1, 4))
                d.start(wait=False)
            print(f"[{time.strftime('%H:%M:%S')}] {kills[-1]} killed and restarted; acked so far {len(loader.acked)}",
                  flush=True)
        loader.stop_flag.set()
        loader.join(60)
        acked = set(loader.acked)
        print(f"load done: {len(acked)} acknowledged, {loader.refused} refused (503 or down); waiting for delivery",
              flush=True)
        until = time.monotonic() + 300
        delivered: list[int] = []
        while time.monotonic() < until:
            delivered = [orjson.loads(x)["i"] for body in local_objects(out).values()
                         for x in body.splitlines() if x]
            if acked <= set(delivered):
                break
            time.sleep(1)
        twice = len(delivered) - len(set(delivered))
        invented = len(set(delivered) - loader.sent)
        missing = len(acked - set(delivered))
        print(f"acknowledged {len(acked)}; delivered {len(set(delivered))} distinct ({len(delivered)} lines); "
              f"twice {twice}; never sent {invented}; missing {missing}; kills {len(kills)}: {', '.join(kills)}")
        return 0 if twice == invented == missing == 0 else 1
    finally:
        for d in daemons:
            d.stop()
        for s in servers:
            s.stop()


if __name__ == "__main__":
    raise SystemExit(main())
