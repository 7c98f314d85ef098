"""The Iceberg destination as a user runs it: a daemon, boto3's PutRecordBatch, tables made
beforehand with pyiceberg, and the results read back with pyiceberg scans and with DuckDB over
the data files.

* The embedded catalog (SQLite in data_dir, local warehouse): rows inserted by name,
  case-insensitively, on a day-partitioned table; records that do not fit archived as
  iceberg-failed error records in the backup; DescribeDeliveryStream.
* A PostgreSQL catalog with the warehouse on a moto S3 server: a Lambda routes records to two
  tables by otfMetadata, and updates and deletes by key.
* A metadata_extraction query routes records (no Lambda, no dynamic partitioning).
* The Glue Data Catalog and the warehouse on a moto server: operations from a jq query, keys from
  the table's identifier fields.
* Cluster mode: two daemons on NATS JetStream commit to one table on a PostgreSQL catalog, one
  is killed; every acknowledged record once.
* kill -9 while commits are under way, inserts and updates: every acknowledged record is in the
  table once, at its last acknowledged version.
"""

from __future__ import annotations

import base64
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from support import (
    Daemon,
    MotoServer,
    NatsServer,
    daemon_config,
    fresh_postgres_catalog_uri,
    local_objects,
    stream_config,
    wait_for,
)


def _catalog(props: dict[str, str]) -> Any:
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **props)


def _embedded(tmp_path: Path) -> dict[str, str]:
    """The catalog a stream without ``catalog:`` uses (data_dir/iceberg)."""
    root = tmp_path / "data" / "iceberg"
    (root / "warehouse").mkdir(parents=True, exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": (root / "warehouse").as_uri()}


def _clicks_table(catalog: Any, name: str = "web.clicks") -> Any:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import DayTransform
    from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

    ns = name.split(".")[0]
    if (ns,) not in catalog.list_namespaces():
        catalog.create_namespace(ns)
    schema = Schema(NestedField(1, "event_id", StringType(), required=True), NestedField(2, "n", LongType()),
                    NestedField(3, "ts", TimestamptzType()), NestedField(4, "page", StringType()))
    return catalog.create_table(name, schema, partition_spec=PartitionSpec(
        PartitionField(3, 1000, DayTransform(), "ts_day")))


def _rows(catalog: Any, name: str) -> list[dict[str, Any]]:
    return catalog.load_table(name).scan().to_arrow().to_pylist()


def _data_files(catalog: Any, name: str) -> list[str]:
    files = catalog.load_table(name).inspect.files().column("file_path").to_pylist()
    return [f.removeprefix("file://") for f in files]


def _put(d: Daemon, stream: str, docs: list[Any]) -> None:
    client = d.firehose()
    for i in range(0, len(docs), 500):
        part = docs[i:i + 500]
        resp = client.put_record_batch(DeliveryStreamName=stream, Records=[
            {"Data": d if isinstance(d, bytes) else orjson.dumps(d)} for d in part])
        assert resp["FailedPutCount"] == 0


def _error_records(backup: Path) -> list[dict[str, Any]]:
    out = []
    for key, body in local_objects(backup).items():
        if key.startswith("iceberg-failed/"):
            out += [orjson.loads(line) for line in body.splitlines()]
    return out


def test_records_are_inserted_by_name_and_those_that_do_not_fit_are_archived(tmp_path: Path) -> None:
    catalog = _catalog(_embedded(tmp_path))
    _clicks_table(catalog)
    backup = tmp_path / "backup"
    stream = stream_config("clicks", {"type": "iceberg", "destination_tables": [{"database": "web", "table": "clicks"}]},
                           backup={"path": str(backup)})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        good = [{"Event_ID": f"e{i}", "N": i, "ts": f"2026-12-0{1 + i % 3}T10:00:00Z", "page": "/p", "extra": 1}
                for i in range(300)]
        bad = [{"event_id": "x1", "n": "not a number"}, {"n": 5, "page": "/no-id"}, b"not json"]
        _put(d, "clicks", good[:150] + bad + good[150:])
        wait_for(lambda: len(_rows(catalog, "web.clicks")) >= 300, 60, "300 rows in web.clicks")
        wait_for(lambda: len(_error_records(backup)) >= 3, 30, "3 iceberg-failed error records")
        time.sleep(1.5)
        rows = _rows(catalog, "web.clicks")
        assert sorted(r["event_id"] for r in rows) == sorted(f"e{i}" for i in range(300))
        assert {r["n"] for r in rows} == set(range(300)) and {r["page"] for r in rows} == {"/p"}
        assert {r["ts"].day for r in rows} == {1, 2, 3}
        # DuckDB over the data files (Parquet, one directory per day partition).
        files = _data_files(catalog, "web.clicks")
        assert len(files) >= 3 and all("ts_day=" in f for f in files)
        count, distinct = duckdb.sql(f"select count(*), count(distinct event_id) from read_parquet({files!r})").fetchall()[0]
        assert (count, distinct) == (300, 300)
        errors = {base64.b64decode(e["rawData"]): e for e in _error_records(backup)}
        assert set(errors) == {orjson.dumps(b) if not isinstance(b, bytes) else b for b in bad}
        assert {e["errorCode"] for e in errors.values()} == {"Iceberg.SchemaMismatch",
                                                              "Iceberg.MissingColumnWithinRecord"}
        assert all(e["attemptsMade"] >= 1 and "arrivalTimestamp" in e for e in errors.values())
        snapshots = catalog.load_table("web.clicks").metadata.snapshots
        assert all(s.summary.additional_properties.get("firehose.stream") == "clicks" for s in snapshots)
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="clicks")["DeliveryStreamDescription"]
        iceberg = desc["Destinations"][0]["IcebergDestinationDescription"]
        assert iceberg["DestinationTableConfigurationList"] == [
            {"DestinationDatabaseName": "web", "DestinationTableName": "clicks"}]
        assert iceberg["S3BackupMode"] == "FailedDataOnly"
    finally:
        assert d.stop() == 0


def test_records_are_archived_once_the_retry_window_passes_with_the_catalog_down(tmp_path: Path) -> None:
    from support import free_port

    backup = tmp_path / "backup"
    down = f"postgresql+psycopg://u:p@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    stream = stream_config("down", {"type": "iceberg", "retry_duration_secs": 2,
                                    "catalog": {"type": "sql", "uri": down, "warehouse": (tmp_path / "wh").as_uri()},
                                    "destination_tables": [{"database": "web", "table": "t"}]},
                           backup={"path": str(backup)}, delivery={"retry_initial_backoff_ms": 100,
                                                                   "retry_max_backoff_ms": 500})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        _put(d, "down", [{"id": i} for i in range(20)])
        wait_for(lambda: len(_error_records(backup)) >= 20, 60, "20 iceberg-failed records")
        errors = _error_records(backup)
        assert sorted(orjson.loads(base64.b64decode(e["rawData"]))["id"] for e in errors) == list(range(20))
        assert {e["errorCode"] for e in errors} == {"Iceberg.CatalogFailure"}
        assert all(e["attemptsMade"] >= 2 and "u:p@" not in e["errorMessage"] for e in errors)
        assert any(e.get("event") == "delivery_retry_expired" for e in d.events())
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_a_lambda_routes_to_tables_and_updates_and_deletes_by_key_on_postgres_and_s3(
        tmp_path: Path, postgres: Any, moto: MotoServer) -> None:
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType

    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    props = {"type": "sql", "uri": fresh_postgres_catalog_uri(postgres),
             "warehouse": f"s3://{bucket}/warehouse", "s3.endpoint": moto.endpoint, "s3.region": "us-east-1",
             "s3.access-key-id": "testing", "s3.secret-access-key": "testing"}
    catalog = _catalog(props)
    catalog.create_namespace("lake")
    catalog.create_table("lake.users", Schema(NestedField(1, "id", LongType(), required=True),
                                              NestedField(2, "name", StringType()), NestedField(3, "kind", StringType())))
    catalog.create_table("lake.events", Schema(NestedField(1, "id", LongType()), NestedField(2, "what", StringType())))
    backup = tmp_path / "backup"
    stream = stream_config(
        "cdc", {"type": "iceberg", "catalog": props,
                "destination_tables": [{"database": "lake", "table": "users", "unique_keys": ["id"]}]},
        processing=[{"type": "lambda", "function": "handlers.iceberg_route:handler", "buffer_interval_secs": 0}],
        backup={"path": str(backup)})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        _put(d, "cdc", [{"kind": "users", "id": i, "name": f"user{i}"} for i in range(1, 6)]
             + [{"kind": "events", "id": i, "what": "signup"} for i in range(1, 6)])
        wait_for(lambda: len(_rows(catalog, "lake.users")) == 5 and len(_rows(catalog, "lake.events")) == 5,
                 60, "5 users and 5 events")
        _put(d, "cdc", [{"kind": "users", "op": "update", "id": 2, "name": "renamed"},
                        {"kind": "users", "op": "delete", "id": 3},
                        {"kind": "users", "op": "update", "id": 9, "name": "upserted"},
                        {"kind": "users", "op": "insert", "id": 4, "name": "again"},
                        {"kind": "users", "op": "delete", "id": 4},
                        {"kind": "events", "op": "delete", "id": 1},  # events has no unique keys
                        {"kind": "nosuch", "id": 1}])
        wait_for(lambda: len(_error_records(backup)) >= 2, 60, "2 iceberg-failed records")
        time.sleep(1.5)
        users = {r["id"]: r["name"] for r in _rows(catalog, "lake.users")}
        assert users == {1: "user1", 2: "renamed", 5: "user5", 9: "upserted"}
        assert len(_rows(catalog, "lake.events")) == 5
        codes = sorted(e["errorCode"] for e in _error_records(backup))
        assert codes == ["Iceberg.InvalidUniqueKeys", "Iceberg.NoSuchTable"]
        files = catalog.load_table("lake.users").inspect.files().column("file_path").to_pylist()
        assert files and all(f.startswith(f"s3://{bucket}/warehouse/") for f in files)
        listed = moto.client().list_objects_v2(Bucket=bucket, Prefix="warehouse/")["Contents"]
        assert any(o["Key"].endswith(".parquet") for o in listed)
    finally:
        assert d.stop() == 0


def test_a_metadata_extraction_query_routes_records(tmp_path: Path) -> None:
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'cat.db'}", "warehouse": (tmp_path / "wh").as_uri()}
    (tmp_path / "wh").mkdir()
    catalog = _catalog(props)
    _clicks_table(catalog, "web.a")
    _clicks_table(catalog, "web.b")
    stream = stream_config(
        "q", {"type": "iceberg", "catalog": props},
        processing=[{"type": "metadata_extraction",
                     "query": '{destinationDatabaseName: "web", destinationTableName: .t}'}],
        backup={"path": str(tmp_path / "backup")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        _put(d, "q", [{"t": "ab"[i % 2], "event_id": f"e{i}", "ts": "2026-12-06T00:00:00Z"} for i in range(40)])
        wait_for(lambda: len(_rows(catalog, "web.a")) + len(_rows(catalog, "web.b")) >= 40, 60, "40 rows")
        assert sorted(r["event_id"] for r in _rows(catalog, "web.a")) == sorted(f"e{i}" for i in range(0, 40, 2))
        assert sorted(r["event_id"] for r in _rows(catalog, "web.b")) == sorted(f"e{i}" for i in range(1, 40, 2))
    finally:
        assert d.stop() == 0


def test_a_glue_catalog_with_the_warehouse_in_s3_both_on_moto(tmp_path: Path, moto: MotoServer) -> None:
    """The Glue Data Catalog (moto server's Glue) with the warehouse in its S3: the catalog type
    Firehose itself uses; a jq query names each record's operation, deletes find rows by the
    table's identifier field (no unique_keys in the config)."""
    import boto3
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType

    bucket = f"glue-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    props = {"type": "glue", "glue.endpoint": moto.endpoint, "glue.region": "us-east-1",
             "glue.access-key-id": "x", "glue.secret-access-key": "x", "s3.endpoint": moto.endpoint,
             "s3.region": "us-east-1", "s3.access-key-id": "x", "s3.secret-access-key": "x",
             "warehouse": f"s3://{bucket}/wh"}
    catalog = _catalog(props)
    ns = f"db_{uuid.uuid4().hex[:8]}"
    catalog.create_namespace(ns)
    catalog.create_table(f"{ns}.devices", Schema(NestedField(1, "device_id", LongType(), required=True),
                                                 NestedField(2, "state", StringType()), identifier_field_ids=[1]))
    stream = stream_config(
        "g", {"type": "iceberg", "catalog": props, "destination_tables": [{"database": ns, "table": "devices"}]},
        processing=[{"type": "metadata_extraction", "query": '{operation: (.op // "insert")}'}],
        backup={"path": str(tmp_path / "backup")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        _put(d, "g", [{"device_id": i, "state": "on"} for i in range(10)])
        wait_for(lambda: len(_rows(catalog, f"{ns}.devices")) == 10, 60, "10 devices")
        _put(d, "g", [{"device_id": 1, "op": "delete"}, {"device_id": 2, "state": "off", "op": "update"}])
        wait_for(lambda: len(_rows(catalog, f"{ns}.devices")) == 9, 60, "device 1 deleted")
        time.sleep(1.5)
        states = {r["device_id"]: r["state"] for r in _rows(catalog, f"{ns}.devices")}
        assert states == {**{i: "on" for i in range(10) if i != 1}, 2: "off"}
        table = boto3.client("glue", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x").get_table(DatabaseName=ns, Name="devices")["Table"]
        assert table["Parameters"]["table_type"].upper() == "ICEBERG"
        assert table["Parameters"]["metadata_location"].startswith(f"s3://{bucket}/wh/")
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_kill9_during_commits_leaves_every_acknowledged_record_once_and_in_order(tmp_path: Path) -> None:
    """Inserts, and updates of keys acknowledged earlier, with a commit after every batch and the
    daemon killed four times: no key twice, every acknowledged key at its last acknowledged
    version (an update never overtaken by its insert, a batch never committed twice). The long
    run is scripts/iceberg_chaos.py."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField

    catalog = _catalog(_embedded(tmp_path))
    catalog.create_namespace("web")
    catalog.create_table("web.t", Schema(NestedField(1, "id", LongType(), required=True),
                                         NestedField(2, "version", LongType())))
    stream = stream_config("t", {"type": "iceberg", "destination_tables": [
        {"database": "web", "table": "t", "unique_keys": ["id"]}]},
        buffering={"size_mib": 1, "interval_secs": 0}, backup={"path": str(tmp_path / "backup")},
        processing=[{"type": "metadata_extraction", "query": "{operation: .op}"}])
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    acked: dict[int, int] = {}
    stop = threading.Event()
    rng = random.Random(5)

    def produce() -> None:
        n = 0
        while not stop.is_set():
            docs = []
            for _ in range(50):
                if acked and rng.random() < 0.2:
                    docs.append({"id": rng.choice(list(acked)), "version": 1, "op": "update"})
                else:
                    docs.append({"id": n, "version": 0, "op": "insert"})
                    n += 1
            try:
                resp = d.firehose().put_record_batch(DeliveryStreamName="t", Records=[
                    {"Data": orjson.dumps(doc)} for doc in docs])
            except Exception:  # the daemon is down: not acknowledged
                time.sleep(0.1)
                continue
            for doc, r in zip(docs, resp["RequestResponses"], strict=True):
                if "RecordId" in r:
                    acked[doc["id"]] = max(acked.get(doc["id"], 0), doc["version"])
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for pause in (1.3, 2.1, 1.7, 2.6):
            time.sleep(pause)
            d.kill9()
            d.start()
        time.sleep(1.0)
    finally:
        stop.set()
        producer.join()
    try:
        assert len(acked) > 500

        def versions() -> dict[int, list[int]]:
            out: dict[int, list[int]] = {}
            for r in _rows(catalog, "web.t"):
                out.setdefault(r["id"], []).append(r["version"])
            return out

        def caught_up() -> bool:
            have = versions()
            return all(max(have.get(k, [-1])) >= v for k, v in acked.items())

        wait_for(caught_up, 90, f"{len(acked)} keys at their acknowledged versions")
        time.sleep(2)
        have = versions()
        assert [k for k, v in have.items() if len(v) > 1] == []  # no key twice
        # Each at its last acknowledged version or later (an update stored while its answer died
        # with the daemon lands unacknowledged); an update overtaken by its insert would be older.
        assert {k: v for k, v in acked.items() if have[k][0] < v} == {}
        commits = [(s.summary.additional_properties["firehose.batch-id"], s.summary.operation)
                   for s in catalog.load_table("web.t").metadata.snapshots]
        assert len(commits) == len(set(commits))  # no batch committed twice
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_two_cluster_daemons_commit_to_one_table_once_across_a_kill(
        tmp_path: Path, postgres: Any, nats_server: NatsServer) -> None:
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType

    (tmp_path / "wh").mkdir()
    props = {"type": "sql", "uri": fresh_postgres_catalog_uri(postgres),
             "warehouse": (tmp_path / "wh").as_uri()}
    catalog = _catalog(props)
    catalog.create_namespace("web")
    catalog.create_table("web.t", Schema(NestedField(1, "id", LongType(), required=True),
                                         NestedField(2, "node", StringType())))
    name = f"ice-{uuid.uuid4().hex[:6]}"
    daemons = []
    for node in ("n1", "n2"):
        work = tmp_path / node
        work.mkdir()
        stream = stream_config(name, {"type": "iceberg", "catalog": props,
                                      "destination_tables": [{"database": "web", "table": "t"}]},
                               buffering={"size_mib": 1, "interval_secs": 1}, backup={"path": str(work / "backup")})
        daemons.append(Daemon(work, daemon_config(work, [stream], cluster={
            "node": node, "lease_ttl_secs": 3,
            "jetstream": {"servers": [nats_server.url], "replicas": 1, "partitions": 4}})).start(wait=False))
    acked: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            d = daemons[(n // 50) % 2]
            ids = list(range(n, n + 50))
            n += 50
            try:
                resp = d.firehose().put_record_batch(DeliveryStreamName=name, Records=[
                    {"Data": orjson.dumps({"id": i, "node": d.workdir.name})} for i in ids])
            except Exception:  # that daemon is down or not ready: not acknowledged
                time.sleep(0.1)
                continue
            acked.extend(i for i, r in zip(ids, resp["RequestResponses"], strict=True) if "RecordId" in r)
            time.sleep(0.02)

    try:
        wait_for(lambda: all(_ready(d, name) for d in daemons), 60, "both daemons serving the stream")
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            time.sleep(3)
            daemons[0].kill9()  # its partitions move to n2; its commits in flight are replayed there
            time.sleep(4)
            daemons[0].start(wait=False)
            time.sleep(3)
        finally:
            stop.set()
            producer.join()
        assert len(acked) > 500
        wait_for(lambda: len(_rows(catalog, "web.t")) >= len(acked), 120, f"{len(acked)} rows")
        time.sleep(2)
        ids = [r["id"] for r in _rows(catalog, "web.t")]
        assert len(ids) == len(set(ids)) and set(acked) <= set(ids)
        commits = [(s.summary.additional_properties["firehose.batch-id"], s.summary.operation)
                   for s in catalog.load_table("web.t").metadata.snapshots]
        assert len(commits) == len(set(commits))
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def _ready(d: Daemon, name: str) -> bool:
    try:
        return bool(d.health()["streams"][name].get("owned_partitions"))
    except Exception:  # noqa: BLE001 - not up yet
        return False
