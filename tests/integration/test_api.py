"""The Firehose API as clients see it: boto3 and the AWS CLI against the daemon subprocess."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from botocore.exceptions import ClientError, ParamValidationError

from support import Daemon, batch_body, daemon_config, local_objects, raw_call, stream_config, wait_for


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("api")
    streams = [
        stream_config("alpha", {"type": "local", "path": str(tmp / "out-alpha"), "compression": "gzip"},
                      buffering={"size_mib": 1, "interval_secs": 1}),
        stream_config("beta", {"type": "local", "path": str(tmp / "out-beta"), "prefix": "b/"}),
        stream_config("tiny", {"type": "local", "path": str(tmp / "out-tiny")},
                      spool={"max_size_mib": 1}, buffering={"size_mib": 1, "interval_secs": 900}),
    ]
    d = Daemon(tmp, daemon_config(tmp, streams)).start()
    yield d
    d.stop()


def test_put_record_and_batch_with_boto3(daemon: Daemon) -> None:
    fh = daemon.firehose()
    r = fh.put_record(DeliveryStreamName="alpha", Record={"Data": b"one\n"})
    assert r["Encrypted"] is False and len(r["RecordId"]) > 8
    rb = fh.put_record_batch(DeliveryStreamName="alpha", Records=[{"Data": b"r%d\n" % i} for i in range(500)])
    assert rb["FailedPutCount"] == 0
    ids = [x["RecordId"] for x in rb["RequestResponses"]]
    assert len(ids) == 500 and len(set(ids + [r["RecordId"]])) == 501
    assert rb["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]


def test_empty_record_is_accepted(daemon: Daemon) -> None:
    assert daemon.firehose().put_record(DeliveryStreamName="beta", Record={"Data": b""})["RecordId"]


def test_list_and_describe(daemon: Daemon) -> None:
    fh = daemon.firehose()
    assert fh.list_delivery_streams()["DeliveryStreamNames"] == ["alpha", "beta", "tiny"]
    page = fh.list_delivery_streams(Limit=1, ExclusiveStartDeliveryStreamName="alpha")
    assert page["DeliveryStreamNames"] == ["beta"] and page["HasMoreDeliveryStreams"] is True
    d = fh.describe_delivery_stream(DeliveryStreamName="alpha")["DeliveryStreamDescription"]
    assert d["DeliveryStreamARN"] == "arn:aws:firehose:us-east-1:000000000000:deliverystream/alpha"
    assert d["DeliveryStreamStatus"] == "ACTIVE" and d["VersionId"] == "1"
    assert d["DeliveryStreamType"] == "DirectPut"
    dest = d["Destinations"][0]
    assert dest["DestinationId"] == "destinationId-000000000001"
    ext = dest["ExtendedS3DestinationDescription"]
    assert ext["BucketARN"] == "arn:aws:s3:::local"
    assert ext["CompressionFormat"] == "GZIP"
    assert ext["BufferingHints"] == {"SizeInMBs": 1, "IntervalInSeconds": 1}
    assert dest["S3DestinationDescription"]["Prefix"] == ""
    assert d["CreateTimestamp"].year >= 2024


def test_records_are_delivered_gzip_with_firehose_key_layout(daemon: Daemon) -> None:
    import gzip
    import re
    import time

    fh = daemon.firehose()
    fh.put_record_batch(DeliveryStreamName="alpha", Records=[{"Data": b"k%d\n" % i} for i in range(10)])
    deadline = time.monotonic() + 20
    got: list[bytes] = []
    while time.monotonic() < deadline:
        objs = local_objects(daemon.workdir / "out-alpha")
        got = b"".join(gzip.decompress(v) for v in objs.values()).split(b"\n")
        if all(b"k%d" % i in got for i in range(10)):
            break
        time.sleep(0.2)
    assert all(b"k%d" % i in got for i in range(10))
    for key in objs:
        assert re.fullmatch(
            r"\d{4}/\d{2}/\d{2}/\d{2}/alpha-1-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-[0-9a-f-]{36}\.gz", key
        ), key


BAD_PUT_RECORD_BODIES = [
    (b"{not json", "SerializationException"),
    (b'{"DeliveryStreamName":"alpha","Record":{"Data":"@@@notbase64"}}', "SerializationException"),
    (b'{"DeliveryStreamName":"alpha","Record":{"Data":12}}', "SerializationException"),
    (b'{"DeliveryStreamName":5,"Record":{"Data":""}}', "SerializationException"),
    (b'{"DeliveryStreamName":"alpha"}', "ValidationException"),
    (b'{"Record":{"Data":""}}', "ValidationException"),
    (b'{"DeliveryStreamName":"bad name","Record":{"Data":""}}', "ValidationException"),
    (b'{"DeliveryStreamName":"nope","Record":{"Data":""}}', "ResourceNotFoundException"),
]


@pytest.mark.parametrize(("body", "code"), BAD_PUT_RECORD_BODIES)
def test_put_record_bad_input(daemon: Daemon, body: bytes, code: str) -> None:
    status, doc = raw_call(daemon.port, "PutRecord", body)
    assert status == 400
    assert doc["__type"] == code and doc["message"]


def test_oversized_record_and_batch_limits(daemon: Daemon) -> None:
    big = b"x" * 1_024_001
    status, doc = raw_call(daemon.port, "PutRecordBatch", batch_body("alpha", [b"ok", big]))
    assert (status, doc["__type"]) == (400, "ValidationException")
    assert "records.2.member.data" in doc["message"] and "1024000" in doc["message"]
    exact = b"x" * 1_024_000
    status, doc = raw_call(daemon.port, "PutRecordBatch", batch_body("beta", [exact]))
    assert status == 200 and doc["FailedPutCount"] == 0
    status, doc = raw_call(daemon.port, "PutRecordBatch", batch_body("alpha", [b"r"] * 501))
    assert (status, doc["__type"]) == (400, "ValidationException")
    status, doc = raw_call(daemon.port, "PutRecordBatch", batch_body("alpha", [b"y" * 1_000_000] * 5))
    assert (status, doc) == (400, {"__type": "InvalidArgumentException", "message": "Records size exceeds 4 MB limit"})


def test_unknown_target(daemon: Daemon) -> None:
    status, doc = raw_call(daemon.port, "Frobnicate", b"{}")
    assert (status, doc["__type"]) == (400, "UnknownOperationException")


def test_errors_parse_cleanly_in_botocore(daemon: Daemon) -> None:
    fh = daemon.firehose()
    with pytest.raises(ClientError) as info:
        fh.put_record(DeliveryStreamName="nope", Record={"Data": b"x"})
    err = info.value.response["Error"]
    assert err["Code"] == "ResourceNotFoundException"
    assert err["Message"] == "Firehose nope under account 000000000000 not found."
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as info:
        fh.put_record_batch(DeliveryStreamName="alpha", Records=[{"Data": b"r"}] * 501)
    assert info.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ParamValidationError):  # botocore checks `required` itself
        fh.put_record_batch(DeliveryStreamName="alpha", Records=[])


def test_spool_cap_answers_503_for_the_whole_request_and_other_streams_keep_working(daemon: Daemon) -> None:
    fh = daemon.firehose()
    accepted = 0
    status, doc = 200, {}
    for _ in range(10):  # 1 MiB cap, 900 s interval: the spool fills
        status, doc = raw_call(daemon.port, "PutRecordBatch", batch_body("tiny", [b"z" * 100_000] * 3))
        if status != 200:
            break
        accepted += 1
    assert status == 503
    assert doc == {"__type": "ServiceUnavailableException", "message": "Slow down."}
    assert 1 <= accepted < 10
    with pytest.raises(ClientError) as info:
        fh.put_record(DeliveryStreamName="tiny", Record={"Data": b"x" * 400_000})
    assert info.value.response["Error"]["Code"] == "ServiceUnavailableException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert fh.put_record(DeliveryStreamName="beta", Record={"Data": b"still fine"})["RecordId"]


def test_daemon_survives_bad_requests_and_keeps_delivering(daemon: Daemon) -> None:
    # Sends its own bad requests (it must not rely on other tests having sent them first).
    bad = [("PutRecord", body) for body, _ in BAD_PUT_RECORD_BODIES] + [
        ("PutRecordBatch", batch_body("beta", [b"ok", b"x" * 1_024_001])),
        ("PutRecordBatch", batch_body("beta", [b"r"] * 501)),
        ("PutRecordBatch", b'{"DeliveryStreamName":"beta","Records":{"Data":"eA=="}}'),
        ("PutRecordBatch", b"\xff\xfe not even text"),
        ("Frobnicate", b"{}"),
    ]
    for target, body in bad:
        status, doc = raw_call(daemon.port, target, body)
        assert status == 400 and doc["__type"] and doc["message"], (target, body[:60], status, doc)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.firehose().list_delivery_streams()["DeliveryStreamNames"] == ["alpha", "beta", "tiny"]
    marker = b"after-the-bad-requests-%d\n" % os.getpid()
    daemon.firehose().put_record(DeliveryStreamName="beta", Record={"Data": marker})
    wait_for(lambda: any(marker in body for body in local_objects(daemon.workdir / "out-beta").values()), 20,
             "a good record sent after the bad requests to be delivered")


def test_tags_round_trip(daemon: Daemon) -> None:
    fh = daemon.firehose()
    fh.tag_delivery_stream(DeliveryStreamName="beta", Tags=[{"Key": "team", "Value": "data"}, {"Key": "env", "Value": "x"}])
    fh.untag_delivery_stream(DeliveryStreamName="beta", TagKeys=["env"])
    assert fh.list_tags_for_delivery_stream(DeliveryStreamName="beta")["Tags"] == [{"Key": "team", "Value": "data"}]


def _aws(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_PAGER": ""}
    cmd = [sys.executable, "-m", "awscli", "firehose", *args, "--endpoint-url", daemon.endpoint, "--output", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_aws_cli(daemon: Daemon, tmp_path: Path) -> None:
    res = _aws(daemon, "list-delivery-streams")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["DeliveryStreamNames"] == ["alpha", "beta", "tiny"]
    # AWS CLI v1 takes blob arguments as base64 text.
    data = base64.b64encode(b"from the cli\n").decode()
    res = _aws(daemon, "put-record", "--delivery-stream-name", "beta", "--record", f"Data={data}")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["RecordId"]
    records = tmp_path / "records.json"
    records.write_text(orjson.dumps([{"Data": base64.b64encode(b"c%d\n" % i).decode()} for i in range(3)]).decode())
    res = _aws(daemon, "put-record-batch", "--delivery-stream-name", "beta", "--records", f"file://{records}")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["FailedPutCount"] == 0 and len(out["RequestResponses"]) == 3
    res = _aws(daemon, "describe-delivery-stream", "--delivery-stream-name", "beta")
    assert json.loads(res.stdout)["DeliveryStreamDescription"]["DeliveryStreamName"] == "beta"
    res = _aws(daemon, "describe-delivery-stream", "--delivery-stream-name", "missing")
    assert res.returncode != 0 and "ResourceNotFoundException" in res.stderr
