"""The opensearch destination through the daemon subprocess and opensearch-py, into a bulk-API
server that behaves like the cluster on the wire (tests/fakes/opensearch.py)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fakes.opensearch import OpenSearchServer
from firehose.destinations.opensearch import OpenSearchDestinationConfig
from support import Daemon, daemon_config, local_objects, stream_config, wait_for

DOC_ID = re.compile(r"\d{56}\.\d+")


@pytest.fixture
def cluster() -> Iterator[OpenSearchServer]:
    server = OpenSearchServer(user="firehose", password="pw").start()
    yield server
    server.stop()


def start(tmp: Path, cluster: OpenSearchServer, env: dict[str, str] | None = None, mode: str = "FailedDocumentsOnly",
          **dest: Any) -> Daemon:
    destination = {"type": "opensearch", "endpoint": cluster.endpoint, "index": "clicks",
                   "auth": {"type": "basic", "user": "firehose", "password": "${OS_PASSWORD}"}, **dest}
    stream = stream_config("os", destination, buffering={"size_mib": 1, "interval_secs": 0},
                           delivery={"retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 200},
                           backup={"path": str(tmp / "backup"), "mode": mode})
    return Daemon(tmp, daemon_config(tmp, [stream]), env={"OS_PASSWORD": "pw", **(env or {})}).start()


def error_docs(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for key, body in sorted(local_objects(tmp / "backup").items())
            if key.startswith(kind + "/") for line in body.splitlines()]


@pytest.mark.parametrize(("rotation", "index"), [
    ("no_rotation", "myindex"), ("one_hour", "myindex-2016-02-25-13"), ("OneDay", "myindex-2016-02-25"),
    ("one_week", "myindex-2016-w08"), ("one_month", "myindex-2016-02"),
])
def test_index_rotation_uses_firehoses_suffixes(rotation: str, index: str) -> None:
    cfg = OpenSearchDestinationConfig.model_validate(
        {"type": "opensearch", "endpoint": "https://x:9200", "index": "myindex", "index_rotation": rotation})
    assert cfg.index_name(1456405200000) == index  # 2016-02-25T13:00:00Z, Firehose's example


def test_documents_are_indexed_with_stable_ids(tmp_path: Path, cluster: OpenSearchServer) -> None:
    d = start(tmp_path, cluster, index_rotation="no_rotation")
    try:
        records = [b'{"n": %d, "page": "/p%d"}' % (i, i) for i in range(50)]
        d.firehose().put_record_batch(DeliveryStreamName="os", Records=[{"Data": r} for r in records])
        wait_for(lambda: len(cluster.documents()) == 50, 20, "indexing")
        docs = cluster.documents()
        assert sorted(docs.values()) == sorted(records)
        assert all(k.startswith("clicks/") and DOC_ID.fullmatch(k.split("/", 1)[1]) for k in docs)
        assert {a["index"]["_index"] for a in cluster.actions} == {"clicks"}
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="os")["DeliveryStreamDescription"]
        os_desc = desc["Destinations"][0]["AmazonopensearchserviceDestinationDescription"]
        assert os_desc["IndexName"] == "clicks" and os_desc["IndexRotationPeriod"] == "NoRotation"
        assert os_desc["DocumentIdOptions"] == {"DefaultDocumentIdFormat": "FIREHOSE_DEFAULT"}
        assert os_desc["S3BackupMode"] == "FailedDocumentsOnly"
        assert os_desc["S3DestinationDescription"]["BucketARN"] == "arn:aws:s3:::local"
        assert "pw" not in d.logs()
    finally:
        assert d.stop() == 0


def test_throttled_items_are_retried_and_mapping_errors_archived(tmp_path: Path, cluster: OpenSearchServer) -> None:
    d = start(tmp_path, cluster, index_rotation="one_day", type_name="_doc")
    try:
        fh = d.firehose()
        fh.put_record(DeliveryStreamName="os", Record={"Data": b'{"n": 1}'})
        wait_for(lambda: len(cluster.documents()) == 1, 20, "the mapping's first document")
        cluster.throttle_items = 2
        batch = [b'{"n": 2}', b'{"n": "two"}', b'{"n": 3}', b"[1, 2]", b'{"n": 4}']
        fh.put_record_batch(DeliveryStreamName="os", Records=[{"Data": r} for r in batch])
        wait_for(lambda: len(error_docs(tmp_path, "AmazonOpenSearchService-failed")) == 2, 20, "archive")
        wait_for(lambda: len(cluster.documents()) == 4, 20, "the throttled documents")
    finally:
        assert d.stop() == 0
    # The two throttled items (the first two of the batch) were sent again under the same ids.
    ids = [a["index"]["_id"] for a in cluster.actions]
    assert len(ids) == 1 + 4 + 2 and ids[5:] == ids[1:3]
    assert {a["index"]["_type"] for a in cluster.actions} == {"_doc"}
    docs = {base64.b64decode(doc["rawData"]): doc for doc in error_docs(tmp_path, "AmazonOpenSearchService-failed")}
    assert set(docs) == {b'{"n": "two"}', b"[1, 2]"}
    assert docs[b'{"n": "two"}']["errorMessage"].startswith("mapper_parsing_exception: failed to parse field [n]")
    # "two" was throttled first, then refused; "[1, 2]" was refused at once: neither retried after.
    assert (docs[b'{"n": "two"}']["attemptsMade"], docs[b"[1, 2]"]["attemptsMade"]) == (2, 1)
    for doc in docs.values():
        assert doc["errorCode"] == "400"
        assert DOC_ID.fullmatch(doc["esDocumentId"]) and doc["esTypeName"] == "_doc"
        assert re.fullmatch(r"clicks-\d{4}-\d{2}-\d{2}", doc["esIndexName"])


def test_all_documents_are_also_backed_up(tmp_path: Path, cluster: OpenSearchServer) -> None:
    d = start(tmp_path, cluster, mode="AllDocuments")
    try:
        records = [b'{"n": %d}' % i for i in range(20)]
        d.firehose().put_record_batch(DeliveryStreamName="os", Records=[{"Data": r} for r in records])
        wait_for(lambda: len(cluster.documents()) == 20, 20, "indexing")
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="os")["DeliveryStreamDescription"]
        assert desc["Destinations"][0]["AmazonopensearchserviceDestinationDescription"]["S3BackupMode"] == "AllDocuments"
    finally:
        assert d.stop() == 0  # the source copies are flushed at shutdown
    backed_up = b"".join(b for k, b in local_objects(tmp_path / "backup").items() if "-failed/" not in k)
    assert backed_up == b"".join(records)


def test_sigv4_and_an_expired_window_as_elasticsearch(tmp_path: Path) -> None:
    with OpenSearchServer(sigv4={"AKIDEXAMPLE": "secret"}) as cluster:
        auth = {"type": "sigv4", "region": "eu-west-1", "access_key_id": "AKIDEXAMPLE",
                "secret_access_key": "${AWS_SECRET}"}
        d = start(tmp_path, cluster, env={"AWS_SECRET": "secret"}, auth=auth, engine="elasticsearch",
                  retry_duration_secs=1)
        try:
            fh = d.firehose()
            fh.put_record(DeliveryStreamName="os", Record={"Data": b'{"signed": true}'})
            wait_for(lambda: len(cluster.documents()) == 1, 20, "a signed bulk request")
            cluster.request_failures = [503] * 1000
            fh.put_record(DeliveryStreamName="os", Record={"Data": b'{"signed": false}'})
            wait_for(lambda: len(error_docs(tmp_path, "elasticsearch-failed")) == 1, 20, "archive after the window")
            desc = fh.describe_delivery_stream(DeliveryStreamName="os")["DeliveryStreamDescription"]
            assert "ElasticsearchDestinationDescription" in desc["Destinations"][0]
        finally:
            assert d.stop() == 0
    (doc,) = error_docs(tmp_path, "elasticsearch-failed")
    assert doc["errorCode"] == "ES.ServerError" and base64.b64decode(doc["rawData"]) == b'{"signed": false}'
    assert doc["attemptsMade"] > 1


def test_config_errors_name_the_field() -> None:
    from firehose.config import ConfigError, load_config_text

    text = """streams:
  - name: s
    buffering: {size_mib: 101}
    destination:
      type: opensearch
      endpoint: https://search:9200
      index: Clicks
      index_rotation: daily
      document_id: random
      auth: {type: digest}
    backup: {path: /tmp/b}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    message = str(info.value)
    for line, field in [(7, "index"), (8, "index_rotation"), (9, "document_id"), (10, "auth")]:
        assert f"f.yaml:{line}: streams[0].destination.{field}" in message
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("      index", "      doc", "      auth")))
    text = text.replace("type: opensearch", "type: opensearch\n      index: clicks")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    assert "streams[0].buffering.size_mib: must be between 1 and 100" in str(info.value)
