"""Cluster mode as an operator runs it: daemons sharing a stream through a real nats-server with
JetStream, records put through every daemon, one daemon killed with kill -9 mid-load. Every
acknowledged record is delivered exactly once, nothing is invented, and the dead daemon's
partitions are taken over by the survivor."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from support import Daemon, NatsServer, daemon_config, local_objects, stream_config, wait_for

PARTITIONS = 4


def _fresh() -> str:
    """A stream name of its own per test: the session's nats-server keeps every test's logs."""
    import uuid

    return f"clicks-{uuid.uuid4().hex[:6]}"


def _cluster_daemon(tmp_path: Path, node: str, nats: NatsServer, out: Path, name: str, **extra: Any) -> Daemon:
    work = tmp_path / node
    work.mkdir()
    destination = {"type": "local", "path": str(out), **extra.pop("destination", {})}
    stream = stream_config(name, destination, buffering={"size_mib": 1, "interval_secs": 1}, **extra)
    cfg = daemon_config(work, [stream], cluster={
        "node": node, "lease_ttl_secs": 3,
        "jetstream": {"servers": [nats.url], "replicas": 1, "partitions": PARTITIONS},
    })
    return Daemon(work, cfg)


def _owned(d: Daemon, name: str) -> list[int]:
    try:
        return list(d.health()["streams"][name].get("owned_partitions", []))
    except Exception:  # noqa: BLE001 - the daemon is down
        return []


def _delivered(out: Path) -> list[bytes]:
    return [line for body in local_objects(out).values() for line in body.splitlines() if line]


def _stop_and_check(loader: Loader, out: Path, timeout: float) -> None:
    """Stop the load, wait for every acknowledged record, and check none arrived twice and none
    that nobody sent."""
    loader.stop.set()
    loader.thread.join(30)
    acked = set(loader.acked)
    wait_for(lambda: acked <= {orjson.loads(x)["i"] for x in _delivered(out)}, timeout,
             "every acknowledged record delivered")
    lines = [orjson.loads(x)["i"] for x in _delivered(out)]
    assert len(lines) == len(set(lines)), "a record was delivered twice"
    assert set(lines) <= loader.sent, "a record nobody sent"


class Loader:
    """Puts numbered records through several daemons in turn; remembers what was acknowledged."""

    def __init__(self, daemons: list[Daemon], name: str, record: Any = None) -> None:
        self.name = name
        self.record = record or (lambda i: {"i": i})
        self.clients = [d.firehose(retry=False) for d in daemons]  # a retry could store a request twice
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
                res = client.put_record_batch(DeliveryStreamName=self.name, Records=[
                    {"Data": orjson.dumps(self.record(i)) + b"\n"} for i in batch])
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
    name = _fresh()
    a = _cluster_daemon(tmp_path, "n1", nats_server, out, name).start()
    b = _cluster_daemon(tmp_path, "n2", nats_server, out, name).start()
    try:
        wait_for(lambda: len(_owned(a, name)) + len(_owned(b, name)) == PARTITIONS and _owned(a, name) and _owned(b, name), 30,
                 "the partitions shared by both daemons")
        assert set(_owned(a, name)).isdisjoint(_owned(b, name))
        # firehose status --all: every member, each table naming its node (members announce their API).
        wait_for(lambda: len(a.health()["streams"][name]["cluster_members"]) == 2, 10, "both members seen")
        view = subprocess.run([sys.executable, "-m", "firehose", "status", "--once", "--all", "--endpoint", a.endpoint],
                              capture_output=True, text=True, timeout=60)
        assert view.returncode == 0, view.stderr
        assert view.stdout.count("node n1 · members n1, n2") == 1 and view.stdout.count("node n2 · members") == 1
        assert a.endpoint in view.stdout and b.endpoint in view.stdout
        # Any daemon shows every partition's owner (the cluster-wide view).
        expected = {**{str(p): "n1" for p in _owned(a, name)}, **{str(p): "n2" for p in _owned(b, name)}}
        wait_for(lambda: all(d.health()["streams"][name]["partition_owners"] == expected for d in (a, b)), 10,
                 "both daemons showing every partition's owner")
        assert a.health()["streams"][name]["node"] == "n1"
        wait_for(lambda: a.health()["streams"][name]["cluster_members"] == ["n1", "n2"], 10, "both members seen")
        # Stream state is shared: a tag set through one daemon is listed by the other.
        a.firehose().tag_delivery_stream(DeliveryStreamName=name, Tags=[{"Key": "team", "Value": "web"}])
        wait_for(lambda: b.firehose().list_tags_for_delivery_stream(DeliveryStreamName=name)["Tags"]
                 == [{"Key": "team", "Value": "web"}], 10, "the tag seen through the other daemon")
        versions = {d.firehose().describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
                    ["VersionId"] for d in (a, b)}
        assert versions == {"1"}
        loader = Loader([a, b], name)
        loader.thread.start()
        wait_for(lambda: len(loader.acked) >= 1000, 60, "records acknowledged through both daemons")
        had = _owned(a, name)
        a.kill9()
        wait_for(lambda: len(_owned(b, name)) == PARTITIONS, 30, "the survivor owning every partition")
        wait_for(lambda: set(b.health()["streams"][name]["partition_owners"].values()) == {"n2"}, 10, "owners shown")
        time.sleep(1)
        _stop_and_check(loader, out, 60)
        taken = {e["partition"] for e in b.events() if e.get("event") == "cluster_partition_taken"}
        assert set(had) <= taken  # the dead daemon's partitions, taken over
        metrics = _metrics(b)
        label = f'DeliveryStreamName="{name}"'
        assert metrics[f'firehose_ClusterLeaseMoves_total{{{label},kind="taken"}}'] >= PARTITIONS
        assert metrics[f"firehose_ClusterOwnedPartitions{{{label}}}"] == PARTITIONS
        assert metrics[f"firehose_JetStreamPublish_seconds_count{{{label}}}"] > 0
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_no_reachable_nats_is_retried_with_a_clear_message_not_a_crash(tmp_path: Path) -> None:
    from support import free_port

    out = tmp_path / "out"
    name = _fresh()
    nowhere = NatsServer(tmp_path / "nats")
    nowhere.port = free_port()  # nothing listens there yet
    d = _cluster_daemon(tmp_path, "n1", nowhere, out, name).start(wait=False)
    try:
        wait_for(lambda: _answers(d), 30, "the API up while NATS is not")
        assert d.health()["status"] == "unavailable"  # a load balancer sends elsewhere meanwhile
        wait_for(lambda: any(e.get("event") == "cluster_connect_failed" for e in d.events()), 30,
                 "a connection failure reported")
        failed = next(e for e in d.events() if e.get("event") == "cluster_connect_failed")
        assert failed["servers"] == [nowhere.url] and failed["level"] == "error"
        assert "Traceback" not in d.logs()
        status, body = _put(d, name)
        assert (status, body["__type"]) == (503, "ServiceUnavailableException")
        nowhere.start()  # NATS comes up: the daemon joins without a restart
        wait_for(lambda: len(_owned(d, name)) == PARTITIONS, 60, "the partitions owned once NATS is up")
        wait_for(lambda: _put(d, name)[0] == 200, 30, "records taken")
        wait_for(lambda: _delivered(out) == [b"x"], 30, "the record delivered")
    finally:
        d.stop()
        nowhere.stop()


def _put(d: Daemon, name: str) -> tuple[int, Any]:
    from support import raw_call

    return raw_call(d.port, "PutRecord", orjson.dumps({"DeliveryStreamName": name, "Record": {"Data": "eA=="}}))


def _answers(d: Daemon) -> bool:
    try:
        d.health()
        return True
    except OSError:
        return False


def test_three_nats_servers_with_replicas_3_survive_a_server_killed_under_load(tmp_path: Path) -> None:
    """replicas: 3 on a three-server JetStream cluster: one NATS server is kill -9ed under load
    and restarted. Publishes that fail while a Raft leader is re-elected are answered 503 (the
    partition is reopened from what JetStream stored). Then two are killed (no quorum): 503
    "Slow down.", until they are back. Every acknowledged record is delivered exactly once."""
    from support import nats_cluster

    servers = nats_cluster(tmp_path / "nats")
    for server in servers:
        server.start()
    out = tmp_path / "out"
    name = _fresh()
    daemons = []
    try:
        for node in ("d1", "d2"):
            work = tmp_path / node
            work.mkdir()
            stream = stream_config(name, {"type": "local", "path": str(out)},
                                   buffering={"size_mib": 1, "interval_secs": 1})
            cfg = daemon_config(work, [stream], cluster={
                "node": node, "lease_ttl_secs": 3,
                "jetstream": {"servers": [s.url for s in servers], "replicas": 3, "partitions": PARTITIONS}})
            daemons.append(Daemon(work, cfg).start(wait=False))
        wait_for(lambda: sum(len(_owned(d, name)) for d in daemons) == PARTITIONS, 90, "every partition owned")
        loader = Loader(daemons, name)
        loader.thread.start()
        wait_for(lambda: len(loader.acked) >= 500, 60, "records acknowledged")
        servers[0].kill9()
        before = len(loader.acked)
        wait_for(lambda: len(loader.acked) >= before + 500, 90, "records acknowledged with a server down")
        servers[0].start()
        wait_for(lambda: len(loader.acked) >= before + 1000, 90, "records acknowledged after its restart")
        # No quorum: two of the three servers down. A request is answered Firehose's 503 "Slow
        # down." (after at most a publish timeout), never left hanging nor answered 200.
        servers[1].kill9()
        servers[2].kill9()
        time.sleep(1)
        from support import raw_call

        loader.sent.add(-1)  # a 503 after a publish timeout may still have been stored
        started = time.monotonic()
        status, body = raw_call(daemons[0].port, "PutRecordBatch", orjson.dumps(
            {"DeliveryStreamName": name, "Records": [{"Data": base64.b64encode(b'{"i": -1}\n').decode()}]}))
        assert (status, body.get("__type"), body.get("message")) == (503, "ServiceUnavailableException", "Slow down.")
        assert time.monotonic() - started < 15
        servers[1].start()
        servers[2].start()
        during = len(loader.acked)
        wait_for(lambda: len(loader.acked) >= during + 500, 120, "records acknowledged once the quorum is back")
        _stop_and_check(loader, out, 120)
        for d in daemons:
            assert "Traceback" not in d.logs()
    finally:
        for d in daemons:
            d.stop()
        for server in servers:
            server.stop()


def _metrics(d: Daemon) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"{d.endpoint}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                        if line and not line.startswith("#"))}


def test_a_lambda_and_dynamic_partitioning_survive_a_takeover_mid_stream(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Records transformed by a Lambda (in each daemon's worker processes) and partitioned by the
    keys it returns: after a kill -9 and a takeover, every acknowledged record is delivered once,
    transformed, under its partition's prefix."""
    out = tmp_path / "out"
    extra = {
        "processing": [{"type": "lambda", "function": "handlers.upper:handler", "workers": 1,
                        "buffer_interval_secs": 1}],
        "dynamic_partitioning": {"enabled": True},
        "destination": {"prefix": "customer=!{partitionKeyFromLambda:customer}/", "error_output_prefix": "errors/"},
    }
    name = _fresh()
    a = _cluster_daemon(tmp_path, "n1", nats_server, out, name, **extra).start(wait=False)
    b = _cluster_daemon(tmp_path, "n2", nats_server, out, name, **extra).start(wait=False)
    try:
        wait_for(lambda: len(_owned(a, name)) + len(_owned(b, name)) == PARTITIONS and _owned(a, name) and _owned(b, name), 60,
                 "the partitions shared by both daemons")
        loader = Loader([a, b], name, record=lambda i: {"i": i, "name": "n", "customer": i % 3})
        loader.thread.start()
        wait_for(lambda: len(loader.acked) >= 600, 60, "records acknowledged")
        a.kill9()
        wait_for(lambda: len(_owned(b, name)) == PARTITIONS, 30, "the survivor owning every partition")
        time.sleep(1)
        loader.stop.set()
        loader.thread.join(30)
        acked = set(loader.acked)

        def delivered() -> list[tuple[str, dict[str, Any]]]:
            return [(key, orjson.loads(line)) for key, body in local_objects(out).items()
                    for line in body.splitlines() if line]

        wait_for(lambda: acked <= {doc["i"] for _, doc in delivered()}, 90, "every acknowledged record delivered")
        docs = delivered()
        seen = [doc["i"] for _, doc in docs]
        assert len(seen) == len(set(seen)), "a record was delivered twice"
        assert set(seen) <= loader.sent
        for key, doc in docs:
            assert key.startswith(f"customer={doc['customer']}/") and doc["name"] == "N", (key, doc)
        assert not [k for k in local_objects(out) if k.startswith("errors/")]
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_a_request_over_the_servers_max_payload_is_stored_as_one_atomic_batch(tmp_path: Path) -> None:
    """NATS servers left at their default 1 MB max_payload: a 4 MB PutRecordBatch and a 1000 KiB
    PutRecord are accepted (the first as one atomic batch of several messages) and delivered
    whole, once."""
    server = NatsServer(tmp_path / "nats", max_payload=None).start()
    out = tmp_path / "out"
    name = _fresh()
    d = _cluster_daemon(tmp_path, "n1", server, out, name).start(wait=False)
    try:
        wait_for(lambda: len(_owned(d, name)) == PARTITIONS, 60, "the partitions owned")
        assert any(e.get("event") == "cluster_max_payload_small" for e in d.events())
        from support import raw_call

        big = [{"Data": base64.b64encode(bytes([c]) * 800_000 + b"\n").decode()} for c in b"abcde"]  # 4 MB in all
        status, body = raw_call(d.port, "PutRecordBatch", orjson.dumps({"DeliveryStreamName": name, "Records": big}))
        assert (status, body["FailedPutCount"]) == (200, 0), body
        one = {"DeliveryStreamName": name, "Record": {"Data": base64.b64encode(b"f" * 1_023_999 + b"\n").decode()}}
        status, body = raw_call(d.port, "PutRecord", orjson.dumps(one))
        assert status == 200, body
        expected = sorted([c * 800_000 for c in (b"a", b"b", b"c", b"d", b"e")] + [b"f" * 1_023_999])
        wait_for(lambda: sorted(_delivered(out)) == expected, 60, "every record delivered once")
    finally:
        d.stop()
        server.stop()


def test_a_rolling_sighup_reload_changes_adds_and_removes_streams_without_losing_a_record(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Both daemons run stream S (objects under v1/) and R. The new config writes S under v2/,
    adds T and drops R; it is given to one daemon and then the other, under load. In between the
    two configs run side by side. Every acknowledged record of S arrives once (under v1/ or
    v2/), T takes records once both know it, R is gone, and S's VersionId moved on once."""
    out = tmp_path / "out"
    s, t, r = _fresh(), _fresh(), _fresh()
    a = _cluster_daemon(tmp_path, "n1", nats_server, out, s, destination={"prefix": "v1/"})
    b = _cluster_daemon(tmp_path, "n2", nats_server, out, s, destination={"prefix": "v1/"})
    for d in (a, b):
        d.write_config({**d.config, "streams": [*d.config["streams"],
                                                stream_config(r, {"type": "local", "path": str(tmp_path / "r")})]})
        d.start(wait=False)
    try:
        wait_for(lambda: len(_owned(a, s)) + len(_owned(b, s)) == PARTITIONS, 60, "S's partitions owned")
        loader = Loader([a, b], s)
        loader.thread.start()
        wait_for(lambda: len(loader.acked) >= 500, 60, "records acknowledged")
        v1 = a.firehose().describe_delivery_stream(DeliveryStreamName=s)["DeliveryStreamDescription"]["VersionId"]
        for n, d in enumerate((a, b)):
            old = d.config["streams"]
            changed = {**old[0], "destination": {**old[0]["destination"], "prefix": "v2/"}}
            added = stream_config(t, {"type": "local", "path": str(tmp_path / "t")},
                                  buffering={"size_mib": 1, "interval_secs": 1})
            d.write_config({**d.config, "streams": [changed, added]})
            d.signal(signal.SIGHUP)
            wait_for(lambda d=d: any(e.get("event") == "config_reloaded" for e in d.events()), 60, "the reload")
            if n == 0:
                time.sleep(2)  # the two configs side by side under load
        wait_for(lambda: _owned(a, t) and _owned(b, t) and len(_owned(a, t)) + len(_owned(b, t)) == PARTITIONS, 60,
                 "T's partitions shared by both daemons")
        assert b.firehose().put_record(DeliveryStreamName=t, Record={"Data": b"t-record\n"})["RecordId"]
        for d in (a, b):
            with pytest.raises(ClientError, match="ResourceNotFoundException"):
                d.firehose().describe_delivery_stream(DeliveryStreamName=r)
        wait_for(lambda: sum(len(_owned(d, s)) for d in (a, b)) == PARTITIONS, 60, "S's partitions owned again")
        time.sleep(1)
        _stop_and_check(loader, out, 60)
        prefixes = {k.split("/")[0] for k in local_objects(out)}
        assert prefixes == {"v1", "v2"}, prefixes
        wait_for(lambda: _delivered(tmp_path / "t") == [b"t-record"], 30, "T's record delivered")
        versions = {d.firehose().describe_delivery_stream(DeliveryStreamName=s)["DeliveryStreamDescription"]["VersionId"]
                    for d in (a, b)}
        assert versions == {str(int(v1) + 1)}
        assert not any(e.get("event") == "config_reload_rejected" for d in (a, b) for e in d.events())
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
