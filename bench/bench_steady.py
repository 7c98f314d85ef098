#!/usr/bin/env python3
"""Benchmark: acknowledged ingest against the bare cost, taken in turns, and latency at a fixed load.

Usage::

    python bench/bench_steady.py                      # 200,000 records, 3 rounds, 20 s loads
    python bench/bench_steady.py --rounds 5 --duration 30 --identity-mib 50

Three parts, on bench.py's data set, loader and daemon set-up (local destination, snappy, spool
fsync always, 8 connections):

1. **Ingest against bare, in turns.** The bare ``decode+fsync`` pass (one process, no daemon: the
   daemon's decoder, then ``write`` + ``fsync`` per body) and a fresh daemon's acknowledged ingest
   of the same bodies at full speed, alternated ``--rounds`` times. This VM's fsync latency swings
   the bare figure by 3x between runs, so each round's ratio is taken against its own bare pass,
   and the medians are compared.
2. **Latency at half load.** The loader offers half the median acknowledged rate of part 1 as a
   fixed, open-loop load (each body is due at a fixed time; its latency counts from then, so a
   daemon that falls behind cannot hide it) for ``--duration`` seconds: p50/p99/p99.9 from the due
   time, and whether delivery kept up (records delivered per second over the second half of the
   load, against records offered per second).
3. **The identity Lambda at a fixed load.** The same at ``--identity-mib`` MiB/s (default 50) with
   bench.py's identity handler in two worker processes (buffer 1 MiB, no interval).
4. **Maximum sustained rate, no processing and the identity Lambda.** Fixed loads from
   ``--sustain-start`` MiB/s, a quarter higher each step, until one is not kept up with (a 503,
   acknowledged or delivered more than 5% under the offered rate over the load's second half, or
   records left undelivered); the gap to the last rate kept up with is then halved twice. The
   identity stream's figure against the unprocessed one's is the issue's "maximum sustained
   rate" ratio.

Speed is measured here, never asserted in tests; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench import (  # noqa: E402
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MIB,
    PROCESSING,
    STREAM,
    DaemonRun,
    Processes,
    Settings,
    add_dataset_args,
    bare_run,
    dataset_from_args,
    encode_bodies,
    run_loader,
    stream_status,
    wait_delivered,
    write_bodies,
)


class DeliverySampler(threading.Thread):
    """Polls the daemon's delivered_records during a load: (wall time, delivered) pairs."""

    def __init__(self, port: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append((time.time(), int(stream_status(self.port).get("delivered_records", 0))))
            except (OSError, ValueError):
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def rate_between(self, t0: float, t1: float) -> float | None:
        inside = [(t, n) for t, n in self.samples if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def daemon_for(procs: Processes, settings: Settings, work: Path, processing: list[dict[str, Any]] | None) -> DaemonRun:
    destination = {"type": "local", "path": str(work / "out"), "compression": "snappy"}
    return DaemonRun(procs, work, settings, destination, 8192, processing=processing)


def full_speed(procs: Processes, settings: Settings, base: Path, bodies_path: Path, tag: str) -> dict[str, Any]:
    work = base / tag
    daemon = daemon_for(procs, settings, work, None)
    try:
        daemon.start()
        load = run_loader(procs, settings, bodies_path, daemon, work / "loader.json")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return load


def fixed_load(procs: Processes, settings: Settings, base: Path, bodies_path: Path, tag: str, rate_mib: float,
               duration: float, processing: list[dict[str, Any]] | None) -> dict[str, Any]:
    work = base / tag
    daemon = daemon_for(procs, settings, work, processing)
    try:
        daemon.start()
        sampler = DeliverySampler(daemon.port)
        sampler.start()
        try:
            load = run_loader(procs, settings, bodies_path, daemon, work / "loader.json",
                              target_bytes=int(rate_mib * MIB * duration), rate_mib=rate_mib)
            wait = wait_delivered(daemon, load["records"], settings.delivery_timeout)
        finally:
            sampler.stop()
    finally:
        daemon.stop()
        if os.environ.get("KEEP_LOG"):
            shutil.copy(daemon.log_path, os.environ["KEEP_LOG"])
        shutil.rmtree(work, ignore_errors=True)
    offered_rps = load["records"] / max(1e-9, duration)
    middle = load["t_start"] + (load["t_end"] - load["t_start"]) / 2
    delivered_rps = sampler.rate_between(middle, load["t_end"])
    return {
        "offered_mib_per_s": rate_mib,
        "acked_mib_per_s": load["bytes"] / MIB / load["seconds"],
        "records": load["records"],
        "latency_from_due_ms": load["latency_with_retries_ms"],
        "round_trip_ms": load["latency_ms"],
        "throttled_503": load["throttled_503"],
        "delivered_fraction_second_half": (delivered_rps / offered_rps) if delivered_rps is not None else None,
        "lag_after_last_ack_s": (wait.done_at - load["t_end"]) if wait.done_at else None,
        "all_delivered": wait.done_at is not None,
    }


def kept_up(res: dict[str, Any]) -> bool:
    """A fixed load the stream sustained: everything acknowledged on time (no 503, acked within 5%
    of offered), delivery within 5% of the offered rate over the load's second half, and every
    record delivered at the end."""
    frac = res["delivered_fraction_second_half"]
    return (res["all_delivered"] and res["throttled_503"] == 0 and frac is not None and frac >= 0.95
            and res["acked_mib_per_s"] >= 0.95 * res["offered_mib_per_s"])


def max_sustained(procs: Processes, settings: Settings, base: Path, bodies_path: Path, tag: str,
                  processing: list[dict[str, Any]] | None, start_mib: float, duration: float) -> dict[str, Any]:
    """The highest fixed load the stream keeps up with (:func:`kept_up`): rates rise by a quarter
    from ``start_mib`` until one is not kept up with, then the gap to the last one kept is halved
    twice."""
    steps: list[dict[str, Any]] = []

    def attempt(rate: float) -> bool:
        res = fixed_load(procs, settings, base, bodies_path, f"{tag}-{len(steps)}", rate, duration, processing)
        ok = kept_up(res)
        steps.append({"rate_mib_per_s": rate, "kept_up": ok, **res})
        frac = res["delivered_fraction_second_half"]
        print(f"  {tag} at {rate:6.1f} MiB/s: acked {res['acked_mib_per_s']:6.1f}, delivered/offered "
              f"{'n/a' if frac is None else f'{frac:.2f}'}, 503s {res['throttled_503']}, "
              f"{'kept up' if ok else 'fell behind'}", flush=True)
        return ok

    best, worst, rate = 0.0, 0.0, start_mib
    while rate < 4096:
        if not attempt(rate):
            worst = rate
            break
        best, rate = rate, rate * 1.25
    for _ in range(2):
        if not (best and worst):
            break
        middle = (best + worst) / 2
        if attempt(middle):
            best = middle
        else:
            worst = middle
    return {"max_sustained_mib_per_s": best, "first_not_kept_mib_per_s": worst, "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    add_dataset_args(ap)
    ap.add_argument("--rounds", type=int, default=3, help="bare/daemon turns in part 1")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of each fixed load")
    ap.add_argument("--identity-mib", type=float, default=50.0, help="the identity Lambda's fixed load, MiB/s")
    ap.add_argument("--half-mib", type=float, default=0.0,
                    help="part 2's load in MiB/s (default: half part 1's median acknowledged rate)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: turns,half,identity,sustained")
    ap.add_argument("--sustain-start", type=float, default=40.0,
                    help="part 4's first fixed load, MiB/s (raised by a quarter each step)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    dataset = dataset_from_args(args)
    settings = Settings(connections=8, buffer_mib=5, interval_secs=1, max_in_flight=2, shutdown_timeout_secs=5,
                        delivery_timeout=300, load_timeout=600)
    procs = Processes()
    base = Path(tempfile.mkdtemp(prefix="firehose-steady-"))
    report: dict[str, Any] = {"records": len(dataset.records), "mib": dataset.nbytes / MIB}
    try:
        bodies = encode_bodies(dataset.records, STREAM, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)
        bodies_path = base / "bodies.bin"
        write_bodies(bodies, bodies_path)
        total_mib = sum(b.nbytes for b in bodies) / MIB
        print(f"data set: {len(dataset.records):,} records, {total_mib:.1f} MiB", flush=True)

        half = args.half_mib
        if "turns" not in skip:
            rounds = []
            for r in range(args.rounds):
                bare = total_mib / bare_run("append", bodies, base)
                load = full_speed(procs, settings, base, bodies_path, f"turn-{r}")
                daemon = load["bytes"] / MIB / load["seconds"]
                rounds.append({"bare_mib_per_s": bare, "daemon_mib_per_s": daemon, "ratio": daemon / bare,
                               "p99_ms": load["latency_ms"]["p99"]})
                print(f"round {r + 1}: bare decode+fsync {bare:6.1f} MiB/s, daemon ack {daemon:6.1f} MiB/s, "
                      f"ratio {daemon / bare:.2f}", flush=True)
            med = {k: statistics.median(x[k] for x in rounds) for k in ("bare_mib_per_s", "daemon_mib_per_s", "ratio")}
            report["turns"] = {"rounds": rounds, "median": med}
            print(f"medians: bare {med['bare_mib_per_s']:.1f} MiB/s, daemon {med['daemon_mib_per_s']:.1f} MiB/s; "
                  f"median of the ratios {med['ratio']:.2f} (target >= 0.6); ratio of the medians "
                  f"{med['daemon_mib_per_s'] / med['bare_mib_per_s']:.2f}", flush=True)
            half = half or med["daemon_mib_per_s"] / 2
        parts = []
        if "half" not in skip:
            if not half:
                raise SystemExit("--half-mib is needed when part 1 is skipped")
            parts.append(("half", f"no processing at half load ({half:.0f} MiB/s)", half, None))
        if "identity" not in skip:
            parts.append(("identity", f"identity Lambda at {args.identity_mib:.0f} MiB/s", args.identity_mib,
                          PROCESSING["identity"]))
        for key, label, rate, processing in parts:
            res = fixed_load(procs, settings, base, bodies_path, key, rate, args.duration, processing)
            report[key] = res
            lat, rt = res["latency_from_due_ms"], res["round_trip_ms"]
            frac = res["delivered_fraction_second_half"]
            print(f"{label}: acked {res['acked_mib_per_s']:.1f} MiB/s; ack latency from due p50 {lat['p50']:.1f} ms, "
                  f"p99 {lat['p99']:.1f} ms (target <= 25), max {lat['max']:.1f} ms; round trip p99 {rt['p99']:.1f} ms; "
                  f"delivered/offered over the second half {'n/a' if frac is None else f'{frac:.2f}'} (target >= 0.95); "
                  f"lag after the last ack {res['lag_after_last_ack_s'] or float('nan'):.2f} s; "
                  f"503s {res['throttled_503']}", flush=True)
        if "sustained" not in skip:
            found = {}
            for key, processing in (("none", None), ("identity", PROCESSING["identity"])):
                found[key] = max_sustained(procs, settings, base, bodies_path, f"sustain-{key}", processing,
                                           args.sustain_start, args.duration)
            report["sustained"] = found
            none, ident = (found[k]["max_sustained_mib_per_s"] for k in ("none", "identity"))
            print(f"maximum sustained rate: no processing {none:.1f} MiB/s, identity Lambda {ident:.1f} MiB/s; "
                  f"ratio {ident / none if none else float('nan'):.2f} (target >= 0.6)", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
