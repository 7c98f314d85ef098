"""The Iceberg destination against real catalogs (SQLite, PostgreSQL) and real tables:

* the crash window between a table commit and the spool's record of it, made certain in process:
  the next runtime replays the batch, finds its snapshot, and commits nothing twice;
* two daemons' destinations and a third writer committing to one table at once (PostgreSQL
  catalog): conflicts are rebuilt and retried, every row lands once;
* partition specs (identity, hour, day, bucket, truncate), checked file by file against
  pyiceberg's own transforms, and updates and deletes on a bucket-partitioned table;
* how far back the replay check looks, and what snapshot expiry by another writer does to it;
* a REST catalog (the protocol, in front of a real SQL catalog) with a token, and one that never
  answers (bounded).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from firehose.destinations.iceberg import BATCH_ID_PROPERTY, IcebergDestination, IcebergDestinationConfig
from firehose.interfaces import Batch, BuildContext
from support import abandon, fresh_postgres_catalog_uri, runtime_from_yaml, settle


def _sqlite(tmp: Path) -> dict[str, str]:
    (tmp / "wh").mkdir(parents=True, exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{tmp / 'cat.db'}", "warehouse": (tmp / "wh").as_uri()}


def _catalog(props: dict[str, str]) -> Any:
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **props)


def _table(catalog: Any, name: str, spec: Any = None, *, key_required: bool = True) -> Any:
    from pyiceberg.partitioning import PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

    ns = name.split(".")[0]
    if (ns,) not in catalog.list_namespaces():
        catalog.create_namespace(ns)
    schema = Schema(NestedField(1, "id", LongType(), required=key_required), NestedField(2, "s", StringType()),
                    NestedField(3, "ts", TimestamptzType()))
    return catalog.create_table(name, schema, partition_spec=spec or PartitionSpec())


def _destination(props: dict[str, str], tmp: Path, tables: list[dict[str, Any]], stream: str = "s") -> IcebergDestination:
    cfg = IcebergDestinationConfig.model_validate({"type": "iceberg", "catalog": props, "destination_tables": tables})
    return cfg.build(BuildContext(stream, 1, "us-east-1", "000000000000", str(tmp)))


def _batch(d: IcebergDestination, docs: list[dict[str, Any]], meta: list[Any] | None = None, n: int = 1) -> Batch:
    now = datetime.now(UTC)
    return Batch("s", n, d.batch_key(now, random.Random()), [orjson.dumps(x) for x in docs],
                 int(now.timestamp() * 1000), meta=meta)


def test_a_replay_after_a_crash_between_the_commit_and_its_record_finds_the_snapshot(tmp_path: Path) -> None:
    props = _sqlite(tmp_path)
    catalog = _catalog(props)
    _table(catalog, "web.t")
    text = (f"streams:\n  - name: s\n    buffering: {{size_mib: 1, interval_secs: 900}}\n"
            f"    destination: {{type: iceberg, catalog: {orjson.dumps(props).decode()}, "
            f"destination_tables: [{{database: web, table: t}}]}}\n"
            f"    backup: {{path: {tmp_path / 'backup'}}}\n")

    async def body() -> None:
        first = runtime_from_yaml(tmp_path, text)
        await first.start()
        committed_to_log = asyncio.Event()

        async def never(*args: Any, **kwargs: Any) -> None:  # the process dies before this lands
            committed_to_log.set()
            await asyncio.Event().wait()

        first.out.commit = never
        await first.put([orjson.dumps({"id": i, "s": "x"}) for i in range(10)])
        await first.batcher.seal_all(float("inf"))
        await asyncio.wait_for(committed_to_log.wait(), 30)  # the table has the commit now
        assert len(_catalog(props).load_table("web.t").scan().to_arrow()) == 10
        await abandon(first)  # kill -9
        second = runtime_from_yaml(tmp_path, text, seed=2)
        await second.start()
        assert len(second.recovery.pending) == 1  # the batch, replayed
        await settle(lambda: second.delivered_records >= 10, 30)
        assert await second.stop(10)

    asyncio.run(body())
    table = _catalog(props).load_table("web.t")
    assert sorted(r["id"] for r in table.scan().to_arrow().to_pylist()) == list(range(10))
    assert len(table.metadata.snapshots) == 1


@pytest.mark.slow
def test_concurrent_writers_conflict_and_every_row_lands_once(tmp_path: Path, postgres: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    props = {"type": "sql", "uri": fresh_postgres_catalog_uri(postgres),
             "warehouse": (tmp_path / "wh").as_uri()}
    (tmp_path / "wh").mkdir()
    catalog = _catalog(props)
    _table(catalog, "web.t")
    daemons = [_destination(props, tmp_path / f"d{i}", [{"database": "web", "table": "t"}], stream=f"s{i}")
               for i in range(2)]
    failures: list[Any] = []

    def run(i: int) -> None:
        d = daemons[i]
        for b in range(15):
            batch = _batch(d, [{"id": i * 10_000 + b * 100 + r} for r in range(100)], n=b)
            result = asyncio.run(d.deliver(batch))
            failures.append(result.failures)

    def other_writer() -> None:  # a third writer, pyiceberg directly
        for b in range(15):
            table = _catalog(props).load_table("web.t")
            for _ in range(20):
                try:
                    table.append(pa.table({"id": pa.array([900_000 + b], pa.int64()), "s": ["other"],
                                           "ts": pa.array([None], pa.timestamp("us", tz="UTC"))},
                                          schema=table.schema().as_arrow()))
                    break
                except Exception:  # CommitFailedException: reload and try again
                    table = _catalog(props).load_table("web.t")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)] + [threading.Thread(target=other_writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not f for f in failures)
    raced = [r for r in caplog.records if "concurrent update" in r.getMessage()]
    assert raced or sum(d.commit_conflicts for d in daemons)  # they did race, and commits were retried
    ids = [r["id"] for r in catalog.load_table("web.t").scan().to_arrow().to_pylist()]
    assert len(ids) == len(set(ids)) == 2 * 15 * 100 + 15


@pytest.mark.parametrize("transform", ["identity", "hour", "day", "bucket", "truncate"])
def test_the_tables_partition_spec_is_honoured_file_by_file(tmp_path: Path, transform: str) -> None:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import (
        BucketTransform,
        DayTransform,
        HourTransform,
        IdentityTransform,
        TruncateTransform,
    )

    source, tr = {"identity": (2, IdentityTransform()), "hour": (3, HourTransform()), "day": (3, DayTransform()),
                  "bucket": (1, BucketTransform(4)), "truncate": (2, TruncateTransform(3))}[transform]
    props = _sqlite(tmp_path)
    catalog = _catalog(props)
    table = _table(catalog, "web.t", PartitionSpec(PartitionField(source, 1000, tr, "p")))
    d = _destination(props, tmp_path, [{"database": "web", "table": "t", "unique_keys": ["id"]}])
    docs = [{"id": i, "s": f"k{i % 5}x", "ts": f"2026-12-0{1 + i % 2}T{i % 4:02d}:30:00Z"} for i in range(60)]
    assert asyncio.run(d.deliver(_batch(d, docs))).ok
    # Updates and deletes by key rewrite files partition by partition.
    changes = [{"id": 3, "s": "k3x", "ts": "2026-12-02T03:30:00Z"}, {"id": 4}, {"id": 61, "s": "new", "ts": None}]
    meta = [{"otf": {"operation": op}} for op in ("update", "delete", "update")]
    assert asyncio.run(d.deliver(_batch(d, changes, meta, n=2))).ok
    table = catalog.load_table("web.t")
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["id"] for r in rows) == sorted([*set(range(60)) - {4}, 61])
    field = table.schema().find_field(source)
    fn = tr.transform(field.field_type)
    files = table.inspect.files().to_pylist()
    assert len({tuple(f["partition"].values()) for f in files}) > 1
    for f in files:
        want = f["partition"]["p"]
        if isinstance(want, date):  # inspect shows a day partition as a date, the transform as days
            want = (want - date(1970, 1, 1)).days
        data = pq.read_table(f["file_path"].removeprefix("file://")).column(field.name).to_pylist()
        got = {fn(_iceberg_value(v, field.field_type)) for v in data}
        assert got == {want}, (f["file_path"], got, want)


def _iceberg_value(v: Any, t: Any) -> Any:
    """A value read from Parquet as pyiceberg's transforms take it (timestamps: micros)."""
    from pyiceberg.types import TimestamptzType

    if v is not None and isinstance(t, TimestamptzType):
        return int(v.timestamp() * 1_000_000)
    return v


def test_the_replay_check_sees_past_other_writers_commits_but_not_past_expiry(tmp_path: Path) -> None:
    props = _sqlite(tmp_path)
    catalog = _catalog(props)
    _table(catalog, "web.t")
    d = _destination(props, tmp_path, [{"database": "web", "table": "t"}])
    batch = _batch(d, [{"id": i} for i in range(5)])
    assert asyncio.run(d.deliver(batch)).ok
    ours = catalog.load_table("web.t").current_snapshot().snapshot_id
    for i in range(30):  # another writer commits after us
        t = catalog.load_table("web.t")
        t.append(pa.table({"id": pa.array([100 + i], pa.int64()), "s": ["o"],
                           "ts": pa.array([None], pa.timestamp("us", tz="UTC"))}, schema=t.schema().as_arrow()))
    assert asyncio.run(d.deliver(batch)).ok  # a replay: found 30 snapshots back
    assert len(catalog.load_table("web.t").scan().to_arrow()) == 35
    # Expiring our snapshot takes the evidence with it: the same replay would commit again.
    t = catalog.load_table("web.t")
    t.maintenance.expire_snapshots().by_id(ours).commit()
    t = catalog.load_table("web.t")
    assert all(s.summary.additional_properties.get(BATCH_ID_PROPERTY) != batch.key for s in t.metadata.snapshots)
    assert asyncio.run(d.deliver(batch)).ok
    assert len(catalog.load_table("web.t").scan().to_arrow()) == 40


def test_a_missing_table_and_a_routed_unknown_table_are_refused_not_retried(tmp_path: Path) -> None:
    props = _sqlite(tmp_path)
    _table(_catalog(props), "web.t")
    d = _destination(props, tmp_path, [{"database": "web", "table": "t"}])
    meta = [None, {"otf": {"destinationDatabaseName": "web", "destinationTableName": "nope"}},
            {"otf": {"destinationDatabaseName": "web", "destinationTableName": "../x"}},
            {"otf": {"operation": "merge"}}]
    result = asyncio.run(d.deliver(_batch(d, [{"id": i} for i in range(4)], meta)))
    assert {i: (f.retryable, f.error_code) for i, f in result.failures.items()} == {
        1: (False, "Iceberg.NoSuchTable"), 2: (False, "Iceberg.InvalidTableName"),
        3: (False, "Iceberg.InvalidOperation")}
    assert asyncio.run(d.preflight()) is None
    gone = _destination(props, tmp_path, [{"database": "web", "table": "absent"}])
    assert asyncio.run(gone.preflight()) == "table web.absent does not exist in the catalog"
    down = _destination({"type": "sql", "uri": f"sqlite:///{tmp_path / 'no' / 'dir' / 'c.db'}",
                         "warehouse": (tmp_path / "wh").as_uri()}, tmp_path, [{"database": "web", "table": "t"}])
    started = time.monotonic()
    result = asyncio.run(down.deliver(_batch(down, [{"id": 1}])))
    assert time.monotonic() - started < 30
    assert [(f.retryable, f.error_code) for f in result.failures.values()] in (
        [(True, "Iceberg.CatalogFailure")], [(False, "Iceberg.NoSuchTable")])


def test_a_batch_the_writer_cannot_plan_is_refused_not_looped_on(tmp_path: Path) -> None:
    props = _sqlite(tmp_path)
    _table(_catalog(props), "web.t")
    d = _destination(props, tmp_path, [{"database": "web", "table": "t"}])

    def broken(*args: Any) -> Any:
        raise ArithmeticError("a value pyarrow cannot cast")

    d._plan = broken  # type: ignore[method-assign]
    result = asyncio.run(d.deliver(_batch(d, [{"id": 1}, {"id": 2}])))
    assert {(f.retryable, f.error_code) for f in result.failures.values()} == {(False, "Iceberg.SchemaMismatch")}
    assert len(result.failures) == 2 and "cannot be written" in result.failures[0].error_message


def test_a_rest_catalog_that_never_answers_fails_the_attempt_in_bounded_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyiceberg's REST client sends without a timeout; the destination's is bounded, so a hung
    catalog is a retried failure, not a delivery stuck for ever."""
    import socket

    import firehose.destinations.iceberg as iceberg

    monkeypatch.setattr(iceberg, "NETWORK_TIMEOUT_SECS", 1)
    monkeypatch.setattr(iceberg, "CALL_TIMEOUT_SECS", 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (the kernel does), never answers
    try:
        d = _destination({"type": "rest", "uri": f"http://127.0.0.1:{server.getsockname()[1]}"}, tmp_path,
                         [{"database": "web", "table": "t"}])
        started = time.monotonic()
        result = asyncio.run(d.deliver(_batch(d, [{"id": 1}])))
        assert time.monotonic() - started < 30
        assert [(f.retryable, f.error_code) for f in result.failures.values()] == [(True, "Iceberg.CatalogFailure")]
        assert "Timeout" in result.failures[0].error_message
    finally:
        server.close()


def test_unbounded_properties_get_timeouts_and_set_ones_are_kept() -> None:
    from firehose.destinations.iceberg import with_timeouts

    props = with_timeouts({"type": "sql", "uri": "postgresql+psycopg://u@h/db?sslmode=require"})
    assert props["uri"] == "postgresql+psycopg://u@h/db?sslmode=require&connect_timeout=10"
    assert (props["s3.connect-timeout"], props["s3.request-timeout"]) == ("10", "120")
    kept = with_timeouts({"type": "sql", "uri": "postgresql+psycopg://u@h/db?connect_timeout=3",
                          "s3.request-timeout": "9"})
    assert kept["uri"].endswith("connect_timeout=3") and kept["s3.request-timeout"] == "9"
    rest = with_timeouts({"type": "rest", "uri": "http://cat"})
    assert "type" not in rest and rest["py-catalog-impl"] == "firehose.destinations.iceberg.BoundedRestCatalog"


def test_a_rest_catalog_with_a_token_takes_commits_exactly_once(tmp_path: Path) -> None:
    """The REST catalog protocol (tests/fakes/iceberg_rest.py, over a real SQL catalog) with a
    bearer token: inserts and an update committed through it, a replay found; a wrong token is a
    retried failure that does not show the token."""
    from fakes.iceberg_rest import IcebergRestCatalog

    sql = _sqlite(tmp_path)
    _table(_catalog(sql), "web.t")
    server = IcebergRestCatalog(sql, token="s3cr3t-token").start()
    try:
        props = {"type": "rest", "uri": server.endpoint, "token": "s3cr3t-token"}
        d = _destination(props, tmp_path, [{"database": "web", "table": "t", "unique_keys": ["id"]}])
        batch = _batch(d, [{"id": i, "s": "a"} for i in range(5)])
        assert asyncio.run(d.deliver(batch)).ok
        assert asyncio.run(d.deliver(batch)).ok  # a replay: found through the REST catalog's history
        update = _batch(d, [{"id": 2, "s": "b"}], [{"otf": {"operation": "update"}}], n=2)
        assert asyncio.run(d.deliver(update)).ok
        rows = sorted((r["id"], r["s"]) for r in _catalog(sql).load_table("web.t").scan().to_arrow().to_pylist())
        assert rows == [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (4, "a")]
        assert server.commits == 2 and ("POST", "/v1/namespaces/web/tables/t") in server.requests
        wrong = _destination({**props, "token": "wrong"}, tmp_path / "w", [{"database": "web", "table": "t"}])
        refused = asyncio.run(wrong.deliver(_batch(wrong, [{"id": 9}])))
        assert [(f.retryable, f.error_code) for f in refused.failures.values()] == [(True, "Iceberg.CatalogFailure")]
        assert "s3cr3t" not in repr(refused.failures)
    finally:
        server.stop()
