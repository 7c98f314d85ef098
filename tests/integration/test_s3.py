"""S3 specifics through a real moto server: throttling and 500s, multipart, object metadata,
every codec read back by an independent reader."""

from __future__ import annotations

import gzip
import io
import time
import zipfile
from pathlib import Path

import pytest
from snappy.snappy_formats import hadoop_stream_decompress

from firehose.transforms.compression import get_codec
from support import Daemon, FaultyS3Proxy, MotoServer, daemon_config, s3_objects, stream_config


def s3_dest(endpoint: str, bucket: str, **extra: object) -> dict[str, object]:
    return {"type": "s3", "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1",
            "access_key_id": "x", "secret_access_key": "x", **extra}


def wait_objects(moto: MotoServer, bucket: str, n: int, timeout: float = 30) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    objs: dict[str, bytes] = {}
    while time.monotonic() < deadline:
        objs = s3_objects(moto.client(), bucket)
        if len(objs) >= n:
            return objs
        time.sleep(0.2)
    raise AssertionError(f"expected {n} objects, found {len(objs)}")


def test_throttling_and_internal_errors_are_retried_and_nothing_duplicates(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    proxy = FaultyS3Proxy(moto.port, [503, 503, 500, None, 503, None, 500, 500, 503])
    stream = stream_config("t", s3_dest(proxy.endpoint, bucket), buffering={"size_mib": 1, "interval_secs": 0},
                           delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 200})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        fh = d.firehose()
        for i in range(4):
            fh.put_record_batch(DeliveryStreamName="t", Records=[{"Data": b"b%d-r%d;" % (i, j)} for j in range(50)])
            time.sleep(0.3)
        objs = wait_objects(moto, bucket, 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = b"".join(s3_objects(moto.client(), bucket).values())
            if all(b"b%d-r%d;" % (i, j) in body for i in range(4) for j in range(50)):
                break
            time.sleep(0.2)
    finally:
        d.stop()
        proxy.close()
    body = b"".join(s3_objects(moto.client(), bucket).values())
    for i in range(4):
        for j in range(50):
            assert body.count(b"b%d-r%d;" % (i, j)) == 1
    assert sorted(proxy.injected) == [500, 500, 500, 503, 503, 503, 503]
    codes = {e["error_code"] for e in d.events() if e.get("event") == "delivery_retry_scheduled"}
    assert codes == {"InternalError"}  # S3's 500 and 503 SlowDown are both transient server errors
    assert objs


def test_large_objects_go_up_as_multipart_uploads(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    stream = stream_config("m", s3_dest(moto.endpoint, bucket, multipart_threshold_mib=5),
                           buffering={"size_mib": 12, "interval_secs": 900})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    payload = [bytes([65 + i % 26]) * 1_000_000 for i in range(12)]
    fh = d.firehose()
    for chunk in payload:
        fh.put_record(DeliveryStreamName="m", Record={"Data": chunk})
    assert d.stop() == 0
    client = moto.client()
    (key,) = s3_objects(client, bucket)
    head = client.head_object(Bucket=bucket, Key=key)
    assert "-" in head["ETag"]  # a multipart ETag: md5-of-md5s "-" part count
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(payload)


@pytest.mark.parametrize(
    ("compression", "ext", "encoding"),
    [("gzip", ".gz", "gzip"), ("zip", ".zip", "zip"), ("snappy", ".snappy", "snappy-java"),
     ("hadoop_snappy", ".snappy", "hadoop-snappy"), ("none", "", None)],
)
def test_each_compression_is_readable_by_an_independent_reader(
    tmp_path: Path, moto: MotoServer, bucket: str, compression: str, ext: str, encoding: str | None
) -> None:
    stream = stream_config("c", s3_dest(moto.endpoint, bucket, prefix="p/", compression=compression),
                           buffering={"size_mib": 1, "interval_secs": 900})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    records = [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (i % 97)) for i in range(3000)]
    d.firehose().put_record_batch(DeliveryStreamName="c", Records=[{"Data": r} for r in records[:500]])
    for i in range(500, 3000, 500):
        d.firehose().put_record_batch(DeliveryStreamName="c", Records=[{"Data": r} for r in records[i:i + 500]])
    assert d.stop() == 0
    client = moto.client()
    objs = s3_objects(client, bucket, "p/")
    assert len(objs) == 1
    key, body = next(iter(objs.items()))
    assert key.startswith("p/") and key.endswith(f"-{key.split('-')[-1]}") and (key.endswith(ext) if ext else "." not in key.rsplit("/", 1)[1])
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "application/octet-stream"
    assert head.get("ContentEncoding") == encoding
    expected = b"".join(records)
    if compression == "gzip":
        assert gzip.decompress(body) == expected
    elif compression == "zip":
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            (name,) = zf.namelist()
            assert zf.read(name) == expected
    elif compression == "hadoop_snappy":
        out = io.BytesIO()
        hadoop_stream_decompress(io.BytesIO(body), out)
        assert out.getvalue() == expected
    elif compression == "snappy":
        assert body[:8] == b"\x82SNAPPY\x00"
        assert get_codec("snappy").decompress(body) == expected  # snappy-java itself: tests/unit/test_compression.py
    else:
        assert body == expected
