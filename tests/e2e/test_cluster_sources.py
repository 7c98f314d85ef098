"""Sources in cluster mode, as an operator runs them: two daemons on a real nats-server.

* A Kinesis source (kinesalite): the shards are spread over the cluster partitions, each read by
  the partition's owner; shards split and merged while records flow and each daemon killed with
  kill -9 in turn: every record delivered exactly once.
* A firehose_http source on each daemon: a sender's retry that reaches the other daemon is
  answered without storing the records again; an id an earlier owner stored but never marked
  (it died in between) is recognised once its partition is taken over.
* File sources stay per host: a single-node daemon tails a file and delivers with its
  http_endpoint destination into the cluster's firehose_http source, exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from e2e.test_cluster import PARTITIONS, _cluster_daemon, _delivered, _fresh, _owned
from integration.test_firehose_http import post
from kinesalite import Producer
from support import Daemon, NatsServer, daemon_config, free_port, local_objects, stream_config, wait_for


def _both_own(a: Daemon, b: Daemon, name: str) -> bool:
    return len(_owned(a, name)) + len(_owned(b, name)) == PARTITIONS and bool(_owned(a, name)) and bool(_owned(b, name))


def _partition_of(kds: str, shard: int) -> int:
    """The cluster partition that reads a shard (firehose.sources.kinesis: a digest of the ARN
    and the shard id)."""
    arn = f"arn:aws:kinesis:us-east-1:000000000000:stream/{kds}"
    digest = hashlib.sha256(f"{arn}\0shardId-{shard:012d}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % PARTITIONS


def test_kinesis_shards_are_read_once_in_the_cluster_through_resharding_and_kill9(
        tmp_path: Path, nats_server: NatsServer, kinesalite: Any) -> None:
    # A stream name whose shards spread: shard 0 splits into 4 and 5, which merge into 6, and
    # each child waits for a parent read in another partition.
    kds = next(n for n in (f"cl-{uuid.uuid4().hex[:8]}" for _ in range(10_000))
               if len({_partition_of(n, s) for s in range(4)}) >= 3
               and _partition_of(n, 4) != _partition_of(n, 0) and _partition_of(n, 6) != _partition_of(n, 5))
    kinesalite.create_stream(kds, 4)
    client = kinesalite.client()
    source = kinesalite.source_config(kds, initial_position="trim_horizon", poll_interval_ms=200,
                                      shard_discovery_interval_secs=1)
    out = tmp_path / "out"
    name = _fresh()
    a = _cluster_daemon(tmp_path, "n1", nats_server, out, name, sources=[source]).start(wait=False)
    b = _cluster_daemon(tmp_path, "n2", nats_server, out, name, sources=[source]).start(wait=False)
    producer = Producer(client, kds)
    try:
        wait_for(lambda: _both_own(a, b, name), 60, "partitions on both daemons")
        producer.start()
        time.sleep(1.5)
        parent = kinesalite.split_first_shard(kds)
        time.sleep(1.0)
        a.kill9()  # mid-flow: its shards' readers move with its partitions
        time.sleep(1.0)
        a.start(wait=False)
        kinesalite.merge_children(kds, parent)
        time.sleep(1.5)
        b.kill9()
        time.sleep(1.0)
        b.start(wait=False)
        time.sleep(1.5)
    finally:
        producer.stop()
    try:
        expected = Counter(producer.acked)
        assert len(expected) == len(producer.acked) > 1000
        wait_for(lambda: len(_delivered(out)) >= len(expected), 120, f"{len(expected)} records delivered")
        time.sleep(2)  # a duplicate would arrive now
        got = Counter((doc["k"], doc["n"]) for doc in map(orjson.loads, _delivered(out)))
        assert got == expected  # every record once: one reader per shard, checkpoints with the records
        for key, body in local_objects(out).items():  # within an object, each key in stream order
            last: dict[str, int] = {}
            for doc in map(orjson.loads, body.splitlines()):
                assert doc["n"] > last.get(doc["k"], -1), f"{key}: {doc['k']} out of order"
                last[doc["k"]] = doc["n"]
        closed = {s["ShardId"] for s in client.list_shards(StreamName=kds)["Shards"]
                  if "EndingSequenceNumber" in s["SequenceNumberRange"]}
        finished = {e["shard_id"] for d in (a, b) for e in d.events() if e.get("event") == "kinesis_shard_finished"}
        assert len(closed) == 3 and finished == closed
        reading = [(e["shard_id"], e["partition"]) for d in (a, b) for e in d.events()
                   if e.get("event") == "kinesis_shard_reading"]
        where = {shard: {p for s, p in reading if s == shard} for shard, _ in reading}
        assert len(where) == 7 and all(len(ps) == 1 for ps in where.values()), where  # one partition per shard
        assert {next(iter(ps)) for ps in where.values()} == {_partition_of(kds, s) for s in range(7)}
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def _http_daemon(tmp_path: Path, node: str, nats: NatsServer, out: Path, name: str, port: int) -> Daemon:
    return _cluster_daemon(tmp_path, node, nats, out, name,
                           sources=[{"type": "firehose_http", "listen": f"127.0.0.1:{port}"}])


def test_firehose_http_request_ids_are_deduplicated_across_the_cluster(tmp_path: Path, nats_server: NatsServer) -> None:
    out = tmp_path / "out"
    name = _fresh()
    ports = free_port(), free_port()
    a = _http_daemon(tmp_path, "n1", nats_server, out, name, ports[0]).start(wait=False)
    b = _http_daemon(tmp_path, "n2", nats_server, out, name, ports[1]).start(wait=False)
    try:
        wait_for(lambda: _both_own(a, b, name), 60, "partitions on both daemons")
        sent: list[bytes] = []
        for i in range(20):
            rid = str(uuid.uuid4())
            records = [b"r%d-%d\n" % (i, j) for j in range(3)]
            assert post(ports[0], rid, records, key="")[0] == 200
            status, doc = post(ports[1], rid, records, key="")  # the retry reached the other daemon
            assert (status, doc["requestId"]) == (200, rid)
            sent += [r.rstrip(b"\n") for r in records]
        wait_for(lambda: len(_delivered(out)) >= len(sent), 30, "the records delivered")
        time.sleep(2)
        assert sorted(_delivered(out)) == sorted(sent)  # each once, though every request came twice
    finally:
        for d in (a, b):
            d.stop()


def test_an_id_stored_by_a_daemon_that_died_before_marking_it_is_recognised_after_takeover(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """The crash window between storing a request's records and marking its id stored: made by
    hand (records and the id's position in partition 0's log, the claim left "claimed"), then a
    daemon takes the partition over: the id is marked stored, and the sender's retry is answered
    200 without a second copy."""
    out = tmp_path / "out"
    name = _fresh()
    rid = str(uuid.uuid4())

    async def die_between() -> None:
        import nats

        from firehose.cluster_ids import CLAIMED, id_fact
        from firehose.jslog import JetStreamLogs
        from firehose.sources.firehose_http import KEY_PREFIX

        nc = await nats.connect(nats_server.url)
        try:
            log = JetStreamLogs(nc, partition=0).log(name, "ingest")
            await log.open()
            await log.append([b"stored-once\n"], int(time.time() * 1000),
                             positions={KEY_PREFIX + rid: int(time.time() * 1000)})
            await log.aclose()
            kv = await nc.jetstream().create_key_value(bucket="FH_SOURCES", history=1)
            await kv.create(id_fact(name, rid), CLAIMED, msg_ttl=600)
        finally:
            await nc.close()

    asyncio.run(die_between())
    port = free_port()
    d = _http_daemon(tmp_path, "n1", nats_server, out, name, port).start(wait=False)
    try:
        wait_for(lambda: len(_owned(d, name)) == PARTITIONS, 60, "the partitions taken over")
        wait_for(lambda: post(port, rid, [b"stored-once\n"], key="")[0] == 200, 30, "the retry answered 200")
        wait_for(lambda: _delivered(out) == [b"stored-once"], 30, "the stored copy delivered")
        time.sleep(2)
        assert _delivered(out) == [b"stored-once"]  # not twice
        other = str(uuid.uuid4())
        assert post(port, other, [b"new\n"], key="")[0] == 200
        wait_for(lambda: sorted(_delivered(out)) == [b"new", b"stored-once"], 30, "a new request delivered")
    finally:
        d.stop()


def test_a_file_tailed_on_a_host_reaches_the_cluster_exactly_once(tmp_path: Path, nats_server: NatsServer) -> None:
    """The per-host pattern docs/cluster.md gives for file sources: a single-node daemon tails
    the file and delivers with http_endpoint into the cluster's firehose_http source."""
    out = tmp_path / "out"
    name = _fresh()
    port = free_port()
    cluster = _http_daemon(tmp_path, "n1", nats_server, out, name, port).start(wait=False)
    host = tmp_path / "host"
    host.mkdir()
    logfile = host / "app.log"
    logfile.write_bytes(b"")
    dest = {"type": "http_endpoint", "url": f"http://127.0.0.1:{port}/", "retry_duration_secs": 7200,
            "request_timeout_secs": 10}
    tail = stream_config("tail", dest, sources=[{"type": "file", "paths": [str(logfile)]}],
                         buffering={"size_mib": 1, "interval_secs": 1},
                         delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 500},
                         backup={"path": str(host / "backup")})
    agent = Daemon(host, daemon_config(host, [tail]))
    try:
        agent.start()
        wait_for(lambda: len(_owned(cluster, name)) == PARTITIONS, 60, "the cluster's partitions owned")
        lines = [b"line-%d" % i for i in range(3000)]
        with open(logfile, "ab") as f:
            for i in range(0, len(lines), 500):
                f.write(b"\n".join(lines[i:i + 500]) + b"\n")
                f.flush()
                time.sleep(0.3)
                if i == 1000:
                    agent.kill9()  # the host's daemon dies mid-file: it resumes from its spool
                    agent.start()
        wait_for(lambda: len(_delivered(out)) >= len(lines), 60, "every line delivered into the cluster")
        time.sleep(2)
        assert sorted(_delivered(out)) == sorted(lines)
    finally:
        agent.stop()
        cluster.stop()
