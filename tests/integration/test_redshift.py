"""The Redshift destination end to end with ``load_method: copy_from_stdin``: the daemon as a
subprocess, staging in a real moto S3 server, loads into a real PostgreSQL 15 server."""

from __future__ import annotations

import gzip
import random
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from pgserver import PASSWORD, PostgresServer
from support import (
    CONNECTION_LOST,
    CheckedThread,
    Daemon,
    MotoServer,
    batch_body,
    daemon_config,
    raw_call,
    s3_objects,
    stream_config,
    wait_for,
)

PASSWORD_ENV = "FIREHOSE_TEST_PG_PASSWORD"


def redshift_dest(moto: MotoServer, bucket: str, pg: PostgresServer, table: str, **extra: Any) -> dict[str, Any]:
    staging = {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint, "region": "us-east-1",
               "access_key_id": "x", "secret_access_key": "x", "prefix": "firehose/", "compression": "gzip",
               "connect_timeout_secs": 2, "read_timeout_secs": 10}
    staging.update(extra.pop("staging", {}))
    return {
        "type": "redshift",
        "connection": {"host": "127.0.0.1", "port": pg.port, "database": "postgres", "user": "postgres",
                       "password": "${" + PASSWORD_ENV + "}", "connect_timeout_secs": 2},
        "table": table,
        "load_method": "copy_from_stdin",
        "copy_options": "JSON 'auto' GZIP",
        "staging": staging,
        "bookkeeping_table": f"{table}_loaded",
        **extra,
    }


def start_daemon(tmp: Path, dest: dict[str, Any], **stream_extra: Any) -> Daemon:
    stream_extra.setdefault("delivery", {"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 500})
    stream = stream_config("rs", dest, **stream_extra)
    return Daemon(tmp, daemon_config(tmp, [stream]), env={PASSWORD_ENV: PASSWORD}).start()


def table_name() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def put(d: Daemon, records: list[bytes]) -> None:
    status, doc = raw_call(d.port, "PutRecordBatch", batch_body("rs", records))
    assert status == 200 and doc["FailedPutCount"] == 0, doc


def test_records_load_once_with_staged_files_manifests_and_bookkeeping(
    tmp_path: Path, moto: MotoServer, bucket: str, postgres: PostgresServer
) -> None:
    table = table_name()
    postgres.execute(f'CREATE TABLE {table} (event_id text PRIMARY KEY, "user" jsonb, page text, n bigint, '
                     "ok boolean, missing text)")
    dest = redshift_dest(moto, bucket, postgres, table, columns=["event_id", '"user"', "Page", "n", "ok", "missing"])
    d = start_daemon(tmp_path, dest)
    try:
        records = [orjson.dumps({"event_id": f"e{i}", "user": {"id": i, "tags": ["a"]}, "PAGE": f"/p/{i}",
                                 "n": i, "ok": i % 2 == 0, "ignored": "x"}) + b"\n" for i in range(300)]
        put(d, records[:150])
        put(d, records[150:])
        wait_for(lambda: postgres.execute(f"SELECT count(*) FROM {table}")[0][0] == 300, 30, "300 rows")
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="rs")["DeliveryStreamDescription"]
    finally:
        assert d.stop() == 0
    rows = postgres.execute(f'SELECT event_id, "user", page, n, ok, missing FROM {table} ORDER BY n')
    assert rows[7] == ("e7", {"id": 7, "tags": ["a"]}, "/p/7", 7, False, None)  # keys match columns in any case
    assert [r[0] for r in rows] == [f"e{i}" for i in range(300)]

    objects = s3_objects(moto.client(), bucket)
    data = {k: v for k, v in objects.items() if not k.startswith("firehose/manifests/")}
    manifests = {k: orjson.loads(v) for k, v in objects.items() if k.startswith("firehose/manifests/")}
    assert data and len(manifests) == len(data)
    assert all(k.startswith("firehose/20") and k.endswith(".gz") for k in data)
    assert b"".join(gzip.decompress(data[k]) for k in sorted(data)) == b"".join(records)
    for key, doc in manifests.items():
        (entry,) = doc["entries"]
        assert entry["mandatory"] is True
        staged = entry["url"].removeprefix(f"s3://{bucket}/")
        assert staged in data
        assert key == "firehose/manifests/" + staged.removeprefix("firehose/").removesuffix(".gz")
    loaded = postgres.execute(f"SELECT manifest, row_count FROM {table}_loaded")
    assert sorted(m for m, _ in loaded) == sorted(manifests)
    assert sum(n for _, n in loaded) == 300

    rs = desc["Destinations"][0]["RedshiftDestinationDescription"]
    assert rs["ClusterJDBCURL"] == f"jdbc:postgresql://127.0.0.1:{postgres.port}/postgres"
    assert rs["CopyCommand"] == {"DataTableName": table, "DataTableColumns": 'event_id,"user",Page,n,ok,missing',
                                 "CopyOptions": "JSON 'auto' GZIP"}
    assert rs["Username"] == "postgres" and rs["RetryOptions"] == {"DurationInSeconds": 3600}
    assert rs["S3DestinationDescription"]["BucketARN"] == f"arn:aws:s3:::{bucket}"
    assert rs["S3DestinationDescription"]["CompressionFormat"] == "GZIP"
    assert PASSWORD not in d.logs() and PASSWORD not in d.config_path.read_text()


def test_database_outage_is_retried_and_every_row_arrives_once(
    tmp_path: Path, moto: MotoServer, bucket: str, postgres: PostgresServer
) -> None:
    table = table_name()
    postgres.execute(f"CREATE TABLE {table} (id text, n int)")
    d = start_daemon(tmp_path, redshift_dest(moto, bucket, postgres, table, retry_duration_secs=600))
    try:
        put(d, [b'{"id":"before-%d","n":%d}' % (i, i) for i in range(50)])
        wait_for(lambda: postgres.execute(f"SELECT count(*) FROM {table}")[0][0] == 50, 30, "rows before the outage")
        postgres.stop()
        try:
            for run in range(3):
                put(d, [b'{"id":"during-%d-%d","n":%d}' % (run, i, i) for i in range(50)])
                time.sleep(0.5)
            wait_for(lambda: sum(e.get("error_code") == "Redshift.ConnectionFailed"
                                 for e in d.events() if e.get("event") == "delivery_retry_scheduled") >= 3,
                     30, "retries while the database is down")
        finally:
            postgres.start()
        wait_for(lambda: postgres.execute(f"SELECT count(*) FROM {table}")[0][0] >= 200, 60, "rows after the outage")
    finally:
        assert d.stop() == 0
    ids = [r[0] for r in postgres.execute(f"SELECT id FROM {table}")]
    assert len(ids) == len(set(ids)) == 200
    assert not any(k.startswith("firehose/errors/") for k in s3_objects(moto.client(), bucket))


def test_rejected_batch_is_archived_with_an_error_record_and_the_stream_keeps_flowing(
    tmp_path: Path, moto: MotoServer, bucket: str, postgres: PostgresServer
) -> None:
    table = table_name()
    postgres.execute(f"CREATE TABLE {table} (id text, n int)")
    d = start_daemon(tmp_path, redshift_dest(moto, bucket, postgres, table, retry_duration_secs=2))
    try:
        put(d, [b'{"id":"good-a-%d","n":%d}' % (i, i) for i in range(20)])
        wait_for(lambda: postgres.execute(f"SELECT count(*) FROM {table}")[0][0] == 20, 30, "the first batch")
        bad = [b'{"id":"bad-%d","n":%d}' % (i, i) for i in range(10)] + [b'{"id":"bad-x","n":"not a number"}']
        put(d, bad)
        wait_for(lambda: any(e.get("event") == "redshift_manifest_archived" for e in d.events()), 30, "archiving")
        put(d, [b'{"id":"good-b-%d","n":%d}' % (i, i) for i in range(20)])
        wait_for(lambda: postgres.execute(f"SELECT count(*) FROM {table}")[0][0] == 40, 30, "the batch after")
    finally:
        assert d.stop() == 0
    assert not postgres.execute(f"SELECT id FROM {table} WHERE id LIKE 'bad-%'")  # COPY is all or nothing
    retries = [e for e in d.events() if e.get("event") == "delivery_retry_scheduled"]
    assert retries and {e["error_code"] for e in retries} == {"Redshift.DataLoadFailed"}
    assert "not a number" in retries[0]["error_message"]

    objects = s3_objects(moto.client(), bucket)
    (failed_key,) = [k for k in objects if k.startswith("firehose/errors/manifests/")]
    entries = orjson.loads(objects[failed_key])["entries"]
    staged = entries[0]["url"].removeprefix(f"s3://{bucket}/")
    assert gzip.decompress(objects[staged]) == b"".join(bad)
    assert failed_key.removeprefix("firehose/errors/manifests/") == staged.removeprefix("firehose/").removesuffix(".gz")
    (record_key,) = [k for k in objects if k.startswith("firehose/redshift-failed/")]
    record = orjson.loads(gzip.decompress(objects[record_key]))
    assert record["errorCode"] == "Redshift.DataLoadFailed"
    assert record["manifest"] == f"s3://{bucket}/{failed_key}"
    assert record["dataFiles"] == [entries[0]["url"]] and record["records"] == 11
    assert record["attemptsMade"] >= 2
    loaded = {m for (m,) in postgres.execute(f"SELECT manifest FROM {table}_loaded")}
    assert len(loaded) == 2 and all(not m.startswith("firehose/errors/") for m in loaded)


class Loader:
    """PutRecordBatch calls with unique ids from a thread; remembers what was acknowledged. A
    failure in the thread, or a lost connection not announced by :meth:`expect_disconnect`, is
    raised by :meth:`stop`."""

    def __init__(self, port: int, run: int, batch: int) -> None:
        self.port, self.run, self.batch = port, run, batch
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self._stop = threading.Event()
        self._killed = threading.Event()
        self._thread = CheckedThread(self._loop, name=f"loader-{run}")
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            ids = [f"r{self.run}-{n + i}" for i in range(self.batch)]
            n += self.batch
            self.sent.update(ids)
            try:
                status, doc = raw_call(self.port, "PutRecordBatch",
                                       batch_body("rs", [b'{"id":"%s","pad":"%s"}' % (i.encode(), b"p" * 200)
                                                         for i in ids]))
            except CONNECTION_LOST:
                if self._killed.is_set():
                    return  # the daemon was killed on purpose
                raise
            if status == 200 and doc.get("FailedPutCount") == 0:
                self.acked.update(ids)
            time.sleep(0.02)

    def expect_disconnect(self) -> None:
        """The daemon is about to be killed: from now on a lost connection ends the loop quietly."""
        self._killed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)  # raises what failed in the thread


@pytest.mark.slow
def test_kill9_during_loads_loses_and_duplicates_nothing(
    tmp_path: Path, moto: MotoServer, bucket: str, postgres: PostgresServer
) -> None:
    table = table_name()
    # Every COPY holds its transaction open a while after loading, so kills land between the COPY
    # and the commit, and replays race the aborted attempt's transaction.
    postgres.execute(f"CREATE TABLE {table} (id text, pad text)")
    postgres.execute(f"CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$")
    postgres.execute(f"CREATE TRIGGER {table}_slow AFTER INSERT ON {table} FOR EACH STATEMENT "
                     f"EXECUTE FUNCTION {table}_slow()")
    dest = redshift_dest(moto, bucket, postgres, table)
    stream = stream_config("rs", dest, buffering={"size_mib": 1, "interval_secs": 1},
                           delivery={"max_in_flight": 3, "retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 300})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream]), env={PASSWORD_ENV: PASSWORD})
    rng = random.Random(11)
    acked: set[str] = set()
    sent: set[str] = set()
    kills = 5
    for run in range(kills):
        d.start()
        loader = Loader(d.port, run, rng.choice([50, 200]))
        time.sleep(rng.uniform(1.0, 2.5))  # load for a random while: the kill lands anywhere
        loader.expect_disconnect()
        d.kill9()
        loader.stop()
        assert loader.acked, "no acknowledgement before the kill"
        acked |= loader.acked
        sent |= loader.sent
    d.start()
    try:
        wait_for(lambda: postgres.execute(f"SELECT count(DISTINCT id) FROM {table}")[0][0] >= len(acked), 90,
                 "every acknowledged record")
    finally:
        assert d.stop() == 0
    counts = dict(postgres.execute(f"SELECT id, count(*) FROM {table} GROUP BY id"))
    assert max(counts.values()) == 1, "a record was loaded twice"
    assert acked <= set(counts), f"{len(acked - set(counts))} acknowledged records are missing"
    assert set(counts) <= sent
    recovered = [e for e in d.events() if e.get("event") == "stream_recovered"]
    assert len(recovered) == kills + 1
    assert any(e["pending_batches"] for e in recovered), "no kill landed between a seal and its commit"
    loaded = postgres.execute(f"SELECT count(*), sum(row_count) FROM {table}_loaded")[0]
    assert loaded[1] == len(counts)


def test_a_replayed_batch_skips_a_load_that_committed_even_while_racing_it(
    moto: MotoServer, bucket: str, postgres: PostgresServer
) -> None:
    """The two ways a replay meets an earlier attempt: that attempt committed before the replay
    looked (skip), or it was still open and committed while the replay loaded (the replay's
    bookkeeping insert waits for it, meets its key, and rolls back its own COPY)."""
    import asyncio

    from firehose.destinations.redshift import RedshiftDestinationConfig, manifest_key
    from firehose.interfaces import Batch, BuildContext

    table = table_name()
    postgres.execute(f"CREATE TABLE {table} (id text)")
    raw = redshift_dest(moto, bucket, postgres, table)
    raw["connection"]["password"] = PASSWORD
    cfg = RedshiftDestinationConfig.model_validate(raw)
    ctx = BuildContext("rs", 1, "us-east-1", "000000000000", "/tmp")
    rng = random.Random(5)
    keys = [cfg.build(ctx).batch_key(datetime.now(UTC), rng) for _ in range(2)]

    async def deliver(key: str, ids: list[str]) -> bool:
        dest = cfg.build(ctx)
        try:
            batch = Batch("rs", 1, key, [b'{"id":"%s"}' % i.encode() for i in ids], 0)
            return (await dest.deliver(batch)).ok
        finally:
            await dest.close()

    assert asyncio.run(deliver(keys[0], ["a1", "a2"]))
    assert asyncio.run(deliver(keys[0], ["a1", "a2"]))  # replay: skipped
    assert sorted(r[0] for r in postgres.execute(f"SELECT id FROM {table}")) == ["a1", "a2"]

    # An earlier attempt holds the manifest's bookkeeping row in an open transaction.
    manifest = manifest_key("firehose/", keys[1])
    with postgres.connect() as other:
        other.execute("BEGIN")
        other.execute(f"INSERT INTO {table} (id) VALUES ('b1')")
        other.execute(f"INSERT INTO {table}_loaded VALUES (%s, now(), 1)", (manifest,))
        result: list[bool] = []
        replay = CheckedThread(lambda: result.append(asyncio.run(deliver(keys[1], ["b1"]))), name="replay")
        replay.start()
        deadline = time.monotonic() + 10
        while not postgres.execute("SELECT 1 FROM pg_locks WHERE NOT granted") and time.monotonic() < deadline:
            time.sleep(0.05)  # until the replay's insert waits on the open transaction's key
        assert postgres.execute("SELECT 1 FROM pg_locks WHERE NOT granted"), "the replay never waited"
        other.execute("COMMIT")
        replay.join(10)  # raises what failed in the replay
    assert result == [True]
    assert sorted(r[0] for r in postgres.execute(f"SELECT id FROM {table}")) == ["a1", "a2", "b1"]


def test_a_copy_is_rolled_back_when_its_batch_cannot_be_staged(
    moto: MotoServer, postgres: PostgresServer
) -> None:
    """COPY FROM STDIN runs while the batch is staged and commits only once it is: with the
    staging bucket missing nothing is loaded, and once it exists the batch loads once."""
    import asyncio

    from firehose.destinations.redshift import RedshiftDestinationConfig
    from firehose.interfaces import Batch, BuildContext

    table = table_name()
    bucket = f"staging-{uuid.uuid4().hex[:12]}"
    postgres.execute(f"CREATE TABLE {table} (id text)")
    raw = redshift_dest(moto, bucket, postgres, table)
    raw["connection"]["password"] = PASSWORD
    cfg = RedshiftDestinationConfig.model_validate(raw)
    dest = cfg.build(BuildContext("rs", 1, "us-east-1", "000000000000", "/tmp"))
    batch = Batch("rs", 1, dest.batch_key(datetime.now(UTC), random.Random(3)), [b'{"id":"x1"}', b'{"id":"x2"}'], 0)

    async def attempts() -> list[Any]:
        await dest.start()
        try:
            first = await dest.deliver(batch)
            assert postgres.execute(f"SELECT count(*) FROM {table}") == [(0,)]
            assert postgres.execute(f"SELECT count(*) FROM {table}_loaded") == [(0,)]
            moto.client().create_bucket(Bucket=bucket)
            return [first, await dest.deliver(batch)]
        finally:
            await dest.close()

    first, second = asyncio.run(attempts())
    failure = next(iter(first.failures.values()))
    assert failure.retryable and failure.error_code == "S3.NoSuchBucket"
    assert second.ok
    assert [r[0] for r in postgres.execute(f"SELECT id FROM {table} ORDER BY id")] == ["x1", "x2"]
    assert len(s3_objects(moto.client(), bucket)) == 2  # the staged object and its manifest
