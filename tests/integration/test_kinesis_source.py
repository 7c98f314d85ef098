"""The Kinesis Data Streams source through the daemon subprocess, against kinesalite: plain and
KPL-aggregated records, shards split and merged while records flow, kill -9 and restarts, the
Lambda event's kinesisRecordMetadata, Direct PUT refused, DescribeDeliveryStream, SIGHUP reload."""

from __future__ import annotations

import base64
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aws_kinesis_agg.aggregator import RecordAggregator
from botocore.exceptions import ClientError

from kinesalite import Producer
from support import Daemon, daemon_config, local_objects, stream_config, stream_idle, wait_for


def delivered_lines(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Each delivered object's JSON lines, objects in key (time) order."""
    return {k: [orjson.loads(line) for line in v.splitlines() if line]
            for k, v in sorted(local_objects(root).items()) if "failed" not in k}


def source_stream(kinesalite: Any, tmp: Path, name: str, kds: str, **extra: Any) -> dict[str, Any]:
    source = kinesalite.source_config(kds, initial_position="trim_horizon", poll_interval_ms=200,
                                      shard_discovery_interval_secs=1, **extra.pop("source", {}))
    return stream_config(name, {"type": "local", "path": str(tmp / "out")}, sources=[source], **extra)


@pytest.mark.slow
def test_split_merge_and_kill9_deliver_every_record_exactly_once_in_key_order(tmp_path: Path, kinesalite: Any) -> None:
    kds = f"flow-{uuid.uuid4().hex[:8]}"
    kinesalite.create_stream(kds, 2)
    client = kinesalite.client()
    d = Daemon(tmp_path, daemon_config(tmp_path, [source_stream(kinesalite, tmp_path, "from-kds", kds)]))
    d.start()
    producer = Producer(client, kds).start()
    try:
        time.sleep(1.5)
        parent = kinesalite.split_first_shard(kds)
        time.sleep(1.0)
        d.kill9()  # mid-flow, children possibly half read
        d.start()
        time.sleep(1.0)
        kinesalite.merge_children(kds, parent)
        time.sleep(1.0)
        d.kill9()
        d.start()
        time.sleep(1.0)
    finally:
        producer.stop()
    try:
        expected = Counter(producer.acked)
        assert len(expected) == len(producer.acked) > 1000

        def all_delivered() -> bool:
            return sum(len(v) for v in delivered_lines(tmp_path / "out").values()) >= len(expected)

        wait_for(all_delivered, 90, f"{len(expected)} records delivered")
    finally:
        assert d.stop() == 0
    objects = delivered_lines(tmp_path / "out")
    got = Counter((doc["k"], doc["n"]) for docs in objects.values() for doc in docs)
    assert got == expected  # every record, exactly once (no duplicate across the two kill -9s)
    for key, docs in objects.items():
        last: dict[str, int] = {}
        for doc in docs:
            assert doc["n"] > last.get(doc["k"], -1), f"{key}: {doc['k']} out of order"
            last[doc["k"]] = doc["n"]
    shards = {s["ShardId"] for s in client.list_shards(StreamName=kds)["Shards"]}
    assert len(shards) == 5  # 2 roots, 2 split children, 1 merged child: all were read
    events = d.events()
    finished = {e["shard_id"] for e in events if e["event"] == "kinesis_shard_finished"}
    closed = {s["ShardId"] for s in client.list_shards(StreamName=kds)["Shards"]
              if "EndingSequenceNumber" in s["SequenceNumberRange"]}
    assert finished and finished <= closed and len(closed) == 3
    restarts = [e["shards_checkpointed"] for e in events if e["event"] == "kinesis_source_started"]
    assert len(restarts) == 3 and restarts[0] == 0 and min(restarts[1:]) >= 2  # resumed from checkpoints
    print(f"{len(expected)} records in {len(objects)} objects; checkpoints at restart {restarts}")


def test_lambda_sees_kinesis_record_metadata_direct_put_is_refused_and_describe_shows_the_source(
    tmp_path: Path, kinesalite: Any
) -> None:
    kds = f"meta-{uuid.uuid4().hex[:8]}"
    kinesalite.create_stream(kds, 1)
    client = kinesalite.client()
    processing = [{"type": "lambda", "function": "handlers.kinesis_metadata:handler", "buffer_interval_secs": 0}]
    stream = source_stream(kinesalite, tmp_path, "from-kds", kds, processing=processing)
    direct = stream_config("direct", {"type": "local", "path": str(tmp_path / "direct")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream, direct]))  # handlers/ is on PYTHONPATH (conftest)
    d.start()
    try:
        agg = RecordAggregator()
        agg.add_user_record("alpha", b"a0")
        agg.add_user_record("beta", b"b1")
        pk, _, data = agg.clear_and_get().get_contents()
        plain = client.put_record(StreamName=kds, PartitionKey="gamma", Data=b"g")
        packed = client.put_record(StreamName=kds, PartitionKey=pk, Data=data)

        def lines() -> list[dict[str, Any]]:
            return [doc for docs in delivered_lines(tmp_path / "out").values() for doc in docs]

        # An aggregate whose MD5 does not match skips the Lambda and is archived whole.
        damaged = data[:-1] + bytes([data[-1] ^ 1])
        client.put_record(StreamName=kds, PartitionKey=pk, Data=damaged)
        wait_for(lambda: len(lines()) >= 3, 30, "three transformed records")

        def errors() -> list[dict[str, Any]]:
            return [orjson.loads(line) for k, v in local_objects(tmp_path / "out").items()
                    if "processing-failed" in k for line in v.splitlines() if line]

        wait_for(lambda: len(errors()) >= 1, 30, "the damaged aggregate archived")
        (err,) = errors()
        assert err["errorCode"] == "Kinesis.KplDeaggregationFailed" and "MD5" in err["errorMessage"]
        assert base64.b64decode(err["rawData"]) == damaged
        docs = lines()
        assert [d["data"] for d in docs] == ["g", "a0", "b1"]
        meta = [d["kinesisRecordMetadata"] for d in docs]
        assert [(m["partitionKey"], m["sequenceNumber"], m["subsequenceNumber"]) for m in meta] == [
            ("gamma", plain["SequenceNumber"], 0), ("alpha", packed["SequenceNumber"], 0),
            ("beta", packed["SequenceNumber"], 1)]
        assert {m["shardId"] for m in meta} == {"shardId-000000000000"}
        assert all(isinstance(m["approximateArrivalTimestamp"], int) for m in meta)
        arn = f"arn:aws:kinesis:us-east-1:000000000000:stream/{kds}"
        assert {doc["sourceKinesisStreamArn"] for doc in docs} == {arn}

        fh = d.firehose()
        for call in (lambda: fh.put_record(DeliveryStreamName="from-kds", Record={"Data": b"x"}),
                     lambda: fh.put_record_batch(DeliveryStreamName="from-kds", Records=[{"Data": b"x"}])):
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.response["Error"] == {
                "Code": "InvalidArgumentException",
                "Message": "This operation is not permitted on KinesisStreamAsSource delivery stream type."}
        fh.put_record(DeliveryStreamName="direct", Record={"Data": b"x"})  # other streams unaffected
        desc = fh.describe_delivery_stream(DeliveryStreamName="from-kds")["DeliveryStreamDescription"]
        assert desc["DeliveryStreamType"] == "KinesisStreamAsSource"
        source = desc["Source"]["KinesisStreamSourceDescription"]
        assert source["KinesisStreamARN"] == arn and source["RoleARN"].startswith("arn:aws:iam::000000000000:")
        assert abs(source["DeliveryStartTimestamp"].timestamp() - time.time()) < 120
        assert fh.list_delivery_streams(DeliveryStreamType="KinesisStreamAsSource")["DeliveryStreamNames"] == [
            "from-kds"]
        assert fh.list_delivery_streams(DeliveryStreamType="DirectPut")["DeliveryStreamNames"] == ["direct"]

        # SIGHUP with a changed source restarts the stream from its checkpoint: nothing twice.
        cfg = dict(d.config)
        cfg["streams"] = [source_stream(kinesalite, tmp_path, "from-kds", kds, processing=processing,
                                        source={"max_records_per_call": 500}), direct]
        d.write_config(cfg)
        d.signal(signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "config_reloaded" for e in d.events()), 30, "the reload")
        client.put_record(StreamName=kds, PartitionKey="delta", Data=b"d")
        # A re-read from an older checkpoint would come before "d" on the shard, so once "d" is
        # delivered and nothing is buffered or in flight, a re-read would have been delivered too.
        wait_for(lambda: "d" in [doc["data"] for doc in lines()] and stream_idle(d.port, "from-kds"), 30,
                 "the record put after the reload")
        assert [doc["data"] for doc in lines()] == ["g", "a0", "b1", "d"]
        assert len(errors()) == 1  # nor was the damaged aggregate read again
    finally:
        assert d.stop() == 0
    assert os.path.isdir(tmp_path / "data")


def test_format_conversion_error_records_name_the_kinesis_record(tmp_path: Path, kinesalite: Any) -> None:
    kds = f"conv-{uuid.uuid4().hex[:8]}"
    kinesalite.create_stream(kds, 1)
    client = kinesalite.client()
    fmt = {"type": "parquet", "schema": {"columns": [{"name": "n", "type": "bigint"}]}}
    stream = source_stream(kinesalite, tmp_path, "conv", kds, format=fmt,
                           buffering={"size_mib": 64, "interval_secs": 1})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        client.put_record(StreamName=kds, PartitionKey="p", Data=b'{"n": 1}')
        agg = RecordAggregator()
        agg.add_user_record("p", b'{"n": 2}')
        agg.add_user_record("q", b"not json")
        pk, _, data = agg.clear_and_get().get_contents()
        bad = client.put_record(StreamName=kds, PartitionKey=pk, Data=data)["SequenceNumber"]

        def errors() -> list[dict[str, Any]]:
            return [orjson.loads(line) for k, v in local_objects(tmp_path / "out").items()
                    if "format-conversion-failed" in k for line in v.splitlines() if line]

        wait_for(lambda: bool(errors()) and any(k.endswith(".parquet") for k in local_objects(tmp_path / "out")),
                 30, "a parquet file and the failed record")
    finally:
        assert d.stop() == 0
    (err,) = errors()
    assert base64.b64decode(err["rawData"]) == b"not json"
    assert (err["sequenceNumber"], err["subSequenceNumber"]) == (bad, 1)
