"""The control plane in cluster mode, through boto3: API-defined streams live in JetStream (a real
nats-server), not on one daemon's disk. A stream created through one daemon is served by every
daemon, survives the one that created it being kill -9ed (and a daemon with an empty data_dir
serves it), names are unique cluster-wide, an update moves the shared VersionId on once, and a
delete through any daemon delivers everything acknowledged through every daemon before the
stream, its JetStream logs and its state are gone."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from e2e.test_control_plane import client, code, gone, put, s3_records, status
from support import Daemon, MotoServer, NatsServer, daemon_config, stream_config, wait_for

PARTITIONS = 4


def _daemon(tmp_path: Path, node: str, nats: NatsServer, moto: MotoServer, yaml_streams: list[Any]) -> Daemon:
    work = tmp_path / f"{node}-{uuid.uuid4().hex[:4]}"
    work.mkdir()
    cfg = daemon_config(work, yaml_streams, cluster={
        "node": node, "lease_ttl_secs": 3,
        "jetstream": {"servers": [nats.url], "replicas": 1, "partitions": PARTITIONS}})
    cfg["api"]["control_plane"] = True
    return Daemon(work, cfg, env={"AWS_ENDPOINT_URL_S3": moto.endpoint})


def _create(fh: Any, name: str, bucket: str, prefix: str, **extra: Any) -> Any:
    return fh.create_delivery_stream(
        DeliveryStreamName=name, DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::000000000000:role/firehose", "BucketARN": f"arn:aws:s3:::{bucket}",
            "Prefix": prefix, "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 60}},
        **extra)


def _jetstream_names(nats: NatsServer) -> list[str]:
    import asyncio

    import nats as nats_py

    async def names() -> list[str]:
        nc = await nats_py.connect(nats.url)
        try:
            return [info.config.name for info in await nc.jetstream().streams_info()]
        finally:
            await nc.close()

    return asyncio.run(names())


def test_api_streams_live_in_jetstream_and_every_daemon_serves_them(
        tmp_path: Path, moto: MotoServer, nats_server: NatsServer) -> None:
    bucket = f"api-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    name = f"api-{uuid.uuid4().hex[:6]}"
    yaml_name = f"yaml-{uuid.uuid4().hex[:6]}"
    yaml_stream = stream_config(yaml_name, {"type": "local", "path": str(tmp_path / "yaml-out")})
    a = _daemon(tmp_path, "n1", nats_server, moto, [yaml_stream]).start()
    b = _daemon(tmp_path, "n2", nats_server, moto, [yaml_stream]).start()
    c = None
    try:
        fa, fb = client(a), client(b)
        _create(fa, name, bucket, "v1/", Tags=[{"Key": "team", "Value": "web"}],
                DeliveryStreamEncryptionConfigurationInput={"KeyType": "AWS_OWNED_CMK"})
        # The other daemon knows it at once: listed, and it takes records (503s retried meanwhile).
        assert name in fb.list_delivery_streams(Limit=100)["DeliveryStreamNames"]
        early = put(fb, name, range(10_000, 10_010))
        # One name in the whole cluster: the other daemon refuses it, and a YAML stream's name too.
        assert code(partial(_create, fb, name, bucket, "x/")).startswith("ResourceInUseException")
        assert code(partial(_create, fb, yaml_name, bucket, "x/")).startswith("ResourceInUseException")
        assert code(fb.delete_delivery_stream, DeliveryStreamName=yaml_name).startswith("InvalidArgumentException")
        for fh in (fa, fb):
            wait_for(lambda fh=fh: status(fh, name) == "ACTIVE", 60, "the stream ACTIVE on both daemons")
        assert name in fb.list_delivery_streams(Limit=100)["DeliveryStreamNames"]
        assert fb.list_tags_for_delivery_stream(DeliveryStreamName=name)["Tags"] == [{"Key": "team", "Value": "web"}]

        def encryption(fh: Any) -> dict[str, Any]:
            return dict(fh.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
                        ["DeliveryStreamEncryptionConfiguration"])

        assert encryption(fb) == {"Status": "ENABLED", "KeyType": "AWS_OWNED_CMK"}
        fb.stop_delivery_stream_encryption(DeliveryStreamName=name)
        wait_for(lambda: encryption(fa) == {"Status": "DISABLED"}, 10, "the change seen through the other daemon")
        # Every daemon takes records for it (each owns some of its partitions).
        wait_for(lambda: all(d.health()["streams"][name]["owned_partitions"] for d in (a, b)), 30,
                 "both daemons owning partitions of the API stream")
        first = put(fa, name, range(0, 100)) + put(fb, name, range(100, 200))

        # An update through one daemon moves the shared VersionId on once; the old one is stale
        # everywhere, and the other daemon runs the new destination too.
        fb.update_destination(DeliveryStreamName=name, CurrentDeliveryStreamVersionId="1",
                              DestinationId="destinationId-000000000001",
                              ExtendedS3DestinationUpdate={"Prefix": "v2/",
                                                           "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 1}})
        assert code(fa.update_destination, DeliveryStreamName=name, CurrentDeliveryStreamVersionId="1",
                    DestinationId="destinationId-000000000001",
                    ExtendedS3DestinationUpdate={"Prefix": "v3/"}).startswith("ConcurrentModificationException")

        def prefix_on(fh: Any) -> str:
            desc = fh.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
            return f'{desc["VersionId"]}:{desc["Destinations"][0]["ExtendedS3DestinationDescription"]["Prefix"]}'

        for fh in (fa, fb):
            wait_for(lambda fh=fh: prefix_on(fh) == "2:v2/", 30, "VersionId 2 and the new prefix on both daemons")
        # Records are delivered under the config that sealed their batch: those put before the
        # update under v1/; those put just after may still be (the other daemon's partitions
        # restart on the new destination a moment later, as Firehose's docs warn after an update).
        wait_for(lambda: s3_records(moto, bucket, "v1/") == first + early, 60, "the first records under v1/")
        second = put(fa, name, range(200, 300)) + put(fb, name, range(300, 400))

        def since_update() -> list[int]:
            return sorted(n for n in s3_records(moto, bucket, "v1/") + s3_records(moto, bucket, "v2/")
                          if 200 <= n < 10_000)

        # The daemon it was created through dies; a new one with an empty data_dir serves it.
        a.kill9()
        c = _daemon(tmp_path, "n3", nats_server, moto, [yaml_stream]).start()
        fc = client(c)
        wait_for(lambda: status(fc, name) == "ACTIVE", 60, "the stream on a daemon that never saw its creation")
        assert prefix_on(fc) == "2:v2/"
        wait_for(lambda: c.health()["streams"][name]["owned_partitions"], 30, "the new daemon owning partitions")
        wait_for(lambda: since_update() == second, 60, "records put before the kill, delivered once")

        # export-config reads the API streams from JetStream.
        out = subprocess.run([sys.executable, "-m", "firehose", "export-config", "--config", str(c.config_path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        exported = yaml.safe_load(out.stdout)
        assert [s["name"] for s in exported["streams"]] == [yaml_name, name]
        assert exported["streams"][1]["destination"]["prefix"] == "v2/"

        # Delete with records buffered on both daemons (a 60 s interval now): DELETING, then
        # everything acknowledged is delivered and the stream is gone everywhere.
        fc.update_destination(DeliveryStreamName=name, CurrentDeliveryStreamVersionId="2",
                              DestinationId="destinationId-000000000001",
                              ExtendedS3DestinationUpdate={"BufferingHints": {"SizeInMBs": 128,
                                                                              "IntervalInSeconds": 600}})
        wait_for(lambda: prefix_on(fb).startswith("3:"), 30, "VersionId 3 on the other daemon")
        last = put(fb, name, range(400, 700)) + put(fc, name, range(700, 1000))
        assert since_update() == second  # buffered, not delivered yet
        assert any(js.startswith(f"FH_{name}_") for js in _jetstream_names(nats_server))
        fb.delete_delivery_stream(DeliveryStreamName=name, AllowForceDelete=True)
        assert status(fc, name) in ("DELETING", "ACTIVE")
        wait_for(lambda: status(fc, name) == "DELETING", 10, "DELETING seen through the other daemon")
        assert code(fc.put_record, DeliveryStreamName=name, Record={"Data": b"x"}).startswith(
            "ResourceNotFoundException")
        fb.delete_delivery_stream(DeliveryStreamName=name)  # a repeated delete is accepted
        wait_for(lambda: gone(fb, name) and gone(fc, name), 90, "the stream gone from every daemon")
        assert since_update() == second + last
        assert s3_records(moto, bucket, "v2/")[-len(last):] == last  # after VersionId 3: the new prefix only
        assert name not in fc.list_delivery_streams(Limit=100)["DeliveryStreamNames"]
        # Its JetStream logs and its state go too, and the name is free again.
        wait_for(lambda: not any(js.startswith(f"FH_{name}_") for js in _jetstream_names(nats_server)), 60,
                 "the stream's JetStream logs removed")

        def recreated() -> bool:
            try:
                _create(fc, name, bucket, "again/")
            except Exception as exc:  # noqa: BLE001 - its state not removed yet
                assert "ResourceInUseException" in str(exc), exc
                time.sleep(1)
                return False
            return True

        wait_for(recreated, 30, "the name free again")
        wait_for(lambda: status(fb, name) == "ACTIVE", 60, "the new stream")
        assert fb.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]["VersionId"] == "1"
    finally:
        for d in (a, b, c):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_racing_calls_through_two_daemons_and_a_daemon_killed_during_a_delete(
        tmp_path: Path, moto: MotoServer, nats_server: NatsServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bucket = f"race-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    name = f"race-{uuid.uuid4().hex[:6]}"
    a = _daemon(tmp_path, "r1", nats_server, moto, []).start()
    b = _daemon(tmp_path, "r2", nats_server, moto, []).start()
    try:
        fa, fb = client(a), client(b)

        def outcome(call: Any) -> str:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the loser's error is the point
                return str(getattr(exc, "response", {}).get("Error", {}).get("Code", exc))
            return "ok"

        # Both have read the bucket once (until then a name they do not know answers 503).
        wait_for(lambda: gone(fa, "none") and gone(fb, "none"), 60, "both daemons settled")
        # The same name created through both daemons at once: exactly one create wins.
        with ThreadPoolExecutor(2) as pool:
            results = sorted(pool.map(outcome, [partial(_create, fa, name, bucket, "a/"),
                                                partial(_create, fb, name, bucket, "b/")]))
        assert results == ["ResourceInUseException", "ok"], results
        for fh in (fa, fb):
            wait_for(lambda fh=fh: status(fh, name) == "ACTIVE", 60, "ACTIVE on both daemons")
        # Two updates naming the same VersionId through both daemons at once: one wins.
        update = {"DeliveryStreamName": name, "CurrentDeliveryStreamVersionId": "1",
                  "DestinationId": "destinationId-000000000001"}
        with ThreadPoolExecutor(2) as pool:
            results = sorted(pool.map(outcome, [
                partial(fa.update_destination, **update, ExtendedS3DestinationUpdate={"Prefix": "x/"}),
                partial(fb.update_destination, **update, ExtendedS3DestinationUpdate={"Prefix": "y/"})]))
        assert results == ["ConcurrentModificationException", "ok"], results
        versions = set()
        for fh in (fa, fb):
            wait_for(lambda fh=fh: fh.describe_delivery_stream(DeliveryStreamName=name)
                     ["DeliveryStreamDescription"]["VersionId"] == "2", 30, "VersionId 2 on both daemons")
            desc = fh.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
            versions.add(desc["Destinations"][0]["ExtendedS3DestinationDescription"]["Prefix"])
        assert len(versions) == 1 and versions <= {"x/", "y/"}, versions  # both daemons run the winner

        # Records buffered in both daemons' partitions (60 s interval); the delete goes through a,
        # and b is kill -9ed at once, before it can stop or drain: a takes its partitions over and
        # delivers what b acknowledged before the stream goes.
        wait_for(lambda: all(d.health()["streams"][name]["owned_partitions"] for d in (a, b)), 30,
                 "both daemons owning partitions")
        acked = put(fa, name, range(0, 300)) + put(fb, name, range(300, 600))
        fa.delete_delivery_stream(DeliveryStreamName=name)
        b.kill9()
        wait_for(lambda: gone(fa, name), 120, "the stream gone once b's partitions were drained by a")
        # Under the winner's prefix, or the created one if sealed before a partition restarted.
        assert s3_records(moto, bucket) == acked
        taken = [e for e in a.events() if e.get("event") == "cluster_partition_taken" and e.get("stream") == name]
        assert len(taken) >= PARTITIONS  # its own and b's
        drained = [e for e in a.events() if e.get("event") == "api_stream_partitions_drained"]
        assert sorted(p for e in drained for p in e["partitions"]) == list(range(PARTITIONS))
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_export_config_with_nats_unreachable_is_one_line(tmp_path: Path) -> None:
    from support import free_port

    cfg = daemon_config(tmp_path, [], cluster={"node": "n1", "jetstream": {
        "servers": [f"nats://127.0.0.1:{free_port()}"], "connect_timeout_secs": 1}})
    cfg["api"]["control_plane"] = True
    path = tmp_path / "firehose.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "firehose", "export-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "cannot export the config: no NATS server of nats://127.0.0.1:" in out.stderr


def test_an_entry_not_written_by_a_daemon_is_skipped_not_a_stuck_sync(
        tmp_path: Path, moto: MotoServer, nats_server: NatsServer) -> None:
    """Someone with access to NATS writes junk into FH_API_STREAMS: it is logged and skipped, and
    the API streams beside it are still created and served."""
    import asyncio

    import nats as nats_py

    from firehose.control_cluster import API_STREAMS_BUCKET, entry_key

    bucket = f"junk-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    a = _daemon(tmp_path, "j1", nats_server, moto, []).start()
    try:
        fa = client(a)
        wait_for(lambda: gone(fa, "none"), 60, "the daemon settled")

        async def junk() -> None:
            nc = await nats_py.connect(nats_server.url)
            try:
                kv = await nc.jetstream().key_value(API_STREAMS_BUCKET)
                await kv.put(entry_key("junk-a"), b"not json {")
                await kv.put(entry_key("junk-b"), b'{"stream": 7}')
                await kv.put("zz-not-hex", b"{}")
            finally:
                await nc.close()

        asyncio.run(junk())
        name = f"ok-{uuid.uuid4().hex[:6]}"
        _create(fa, name, bucket, "p/")
        wait_for(lambda: status(fa, name) == "ACTIVE", 60, "the good stream ACTIVE beside the junk")
        assert "junk-a" not in fa.list_delivery_streams(Limit=100)["DeliveryStreamNames"]
        assert any(e.get("event") == "api_stream_invalid" for e in a.events())
        assert not any(e.get("event") == "api_streams_sync_failed" for e in a.events())
    finally:
        a.stop()
