"""Cluster mode as an operator runs it: daemons sharing a stream through a real nats-server with
JetStream, records put through every daemon, one daemon killed with kill -9 mid-load. Every
acknowledged record is delivered exactly once, nothing is invented, and the dead daemon's
partitions are taken over by the survivor."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from support import Daemon, NatsServer, daemon_config, local_objects, stream_config, wait_for

PARTITIONS = 4


def _cluster_daemon(tmp_path: Path, node: str, nats: NatsServer, out: Path) -> Daemon:
    work = tmp_path / node
    work.mkdir()
    stream = stream_config("clicks", {"type": "local", "path": str(out)},
                           buffering={"size_mib": 1, "interval_secs": 1})
    cfg = daemon_config(work, [stream], cluster={
        "node": node, "lease_ttl_secs": 3,
        "jetstream": {"servers": [nats.url], "replicas": 1, "partitions": PARTITIONS},
    })
    return Daemon(work, cfg)


def _owned(d: Daemon) -> list[int]:
    try:
        return list(d.health()["streams"]["clicks"].get("owned_partitions", []))
    except Exception:  # noqa: BLE001 - the daemon is down
        return []


def _delivered(out: Path) -> list[bytes]:
    return [line for body in local_objects(out).values() for line in body.splitlines() if line]


class Loader:
    """Puts numbered records through several daemons in turn; remembers what was acknowledged."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.clients = [d.firehose() for d in daemons]
        self.acked: set[int] = set()
        self.sent: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            batch = list(range(self.n, self.n + 50))
            self.n += 50
            self.sent.update(batch)
            client = self.clients[(self.n // 50) % len(self.clients)]
            try:
                res = client.put_record_batch(DeliveryStreamName="clicks", Records=[
                    {"Data": orjson.dumps({"i": i}) + b"\n"} for i in batch])
            except Exception:  # noqa: BLE001 - a dead daemon: not acknowledged
                time.sleep(0.05)
                continue
            for i, r in zip(batch, res["RequestResponses"], strict=True):
                if "RecordId" in r and not r.get("ErrorCode"):
                    self.acked.add(i)
            time.sleep(0.01)


def test_a_killed_daemons_partitions_are_taken_over_and_every_acked_record_arrives_once(
        tmp_path: Path, nats_server: NatsServer) -> None:
    out = tmp_path / "out"
    a = _cluster_daemon(tmp_path, "n1", nats_server, out).start()
    b = _cluster_daemon(tmp_path, "n2", nats_server, out).start()
    try:
        wait_for(lambda: len(_owned(a)) + len(_owned(b)) == PARTITIONS and _owned(a) and _owned(b), 30,
                 "the partitions shared by both daemons")
        assert set(_owned(a)).isdisjoint(_owned(b))
        assert a.health()["streams"]["clicks"]["node"] == "n1"
        loader = Loader([a, b])
        loader.thread.start()
        wait_for(lambda: len(loader.acked) >= 1000, 60, "records acknowledged through both daemons")
        had = _owned(a)
        a.kill9()
        wait_for(lambda: len(_owned(b)) == PARTITIONS, 30, "the survivor owning every partition")
        time.sleep(1)
        loader.stop.set()
        loader.thread.join(30)
        acked = set(loader.acked)
        wait_for(lambda: acked <= {orjson.loads(x)["i"] for x in _delivered(out)}, 60,
                 "every acknowledged record delivered")
        lines = [orjson.loads(x)["i"] for x in _delivered(out)]
        assert len(lines) == len(set(lines)), "a record was delivered twice"
        assert set(lines) <= loader.sent, "a record nobody sent"
        taken = {e["partition"] for e in b.events() if e.get("event") == "cluster_partition_taken"}
        assert set(had) <= taken  # the dead daemon's partitions, taken over
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_no_reachable_nats_is_retried_with_a_clear_message_not_a_crash(tmp_path: Path) -> None:
    from support import free_port

    out = tmp_path / "out"
    nowhere = NatsServer(tmp_path / "nats")
    nowhere.port = free_port()  # nothing listens there yet
    d = _cluster_daemon(tmp_path, "n1", nowhere, out).start(wait=False)
    try:
        wait_for(lambda: _answers(d), 30, "the API up while NATS is not")
        assert d.health()["status"] == "unavailable"  # a load balancer sends elsewhere meanwhile
        wait_for(lambda: any(e.get("event") == "cluster_connect_failed" for e in d.events()), 30,
                 "a connection failure reported")
        failed = next(e for e in d.events() if e.get("event") == "cluster_connect_failed")
        assert failed["servers"] == [nowhere.url] and failed["level"] == "error"
        assert "Traceback" not in d.logs()
        status, body = _put(d)
        assert (status, body["__type"]) == (503, "ServiceUnavailableException")
        nowhere.start()  # NATS comes up: the daemon joins without a restart
        wait_for(lambda: len(_owned(d)) == PARTITIONS, 60, "the partitions owned once NATS is up")
        wait_for(lambda: _put(d)[0] == 200, 30, "records taken")
        wait_for(lambda: _delivered(out) == [b"x"], 30, "the record delivered")
    finally:
        d.stop()
        nowhere.stop()


def _put(d: Daemon) -> tuple[int, Any]:
    from support import raw_call

    return raw_call(d.port, "PutRecord", orjson.dumps({"DeliveryStreamName": "clicks", "Record": {"Data": "eA=="}}))


def _answers(d: Daemon) -> bool:
    try:
        d.health()
        return True
    except OSError:
        return False
