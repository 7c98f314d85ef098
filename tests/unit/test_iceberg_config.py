"""The iceberg destination's config as a user writes it: every problem in one run as
``file:line: field: message``, the embedded default catalog, DescribeDeliveryStream without
secrets, and how a record's metadata routes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from firehose.config import ConfigError, load_config_text
from firehose.destinations.iceberg import IcebergDestinationConfig, _otf


def _load(dest: str, extra: str = "    backup: {path: /tmp/b}\n") -> object:
    text = f"streams:\n  - name: s\n    destination:\n{dest}{extra}"
    return load_config_text(text, "f.yaml", {"PW": "hunter2-secret"})


def _errors(dest: str, extra: str = "    backup: {path: /tmp/b}\n") -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(dest, extra)
    return info.value.errors


def test_a_minimal_stream_uses_the_embedded_catalog_in_data_dir(tmp_path: Path) -> None:
    cfg = _load("      type: iceberg\n      destination_tables: [{database: web, table: clicks}]\n")
    dest = cfg.streams[0].destination  # type: ignore[attr-defined]
    props = dest.catalog_properties(str(tmp_path))
    assert props == {"type": "sql", "uri": f"sqlite:///{tmp_path / 'iceberg' / 'catalog.db'}",
                     "warehouse": (tmp_path / "iceberg" / "warehouse").as_uri()}
    assert (cfg.streams[0].buffering.size_mib, cfg.streams[0].buffering.interval_secs) == (5, 300)  # type: ignore[attr-defined]


def test_every_problem_is_reported_with_its_line() -> None:
    errors = _errors(
        "      type: iceberg\n"
        "      catalog: {type: hive, uri: thrift://x}\n"
        "      destination_tables:\n"
        "        - {database: web, table: clicks, unique_keys: []}\n"
        "        - {database: 'we b', table: x}\n"
        "      retry_duration_secs: 9000\n", extra="")
    text = "\n".join(errors)
    assert "f.yaml:5: streams[0].destination.catalog: " in text and "type must be one of sql, rest, glue" in text
    assert "f.yaml:7: streams[0].destination.destination_tables[0].unique_keys:" in text
    assert "f.yaml:8: streams[0].destination.destination_tables[1].database:" in text
    assert "f.yaml:9: streams[0].destination.retry_duration_secs:" in text


def test_failed_records_need_the_streams_backup() -> None:
    (error,) = _errors("      type: iceberg\n", extra="")
    assert error.startswith("f.yaml:") and "backup" in error


def test_sql_catalogs_need_a_uri_and_postgres_goes_through_psycopg3() -> None:
    (missing,) = _errors("      type: iceberg\n      catalog: {type: sql}\n")
    assert "a sql catalog needs uri" in missing
    (driver,) = _errors("      type: iceberg\n      catalog: {type: sql, uri: 'postgresql://u@h/db'}\n")
    assert "postgresql+psycopg://" in driver
    (twice,) = _errors("      type: iceberg\n      destination_tables: [{database: a, table: b}, {database: A, table: B}]\n")
    assert "a.b is listed twice" in twice.lower()


def test_metadata_extraction_routes_iceberg_records_without_dynamic_partitioning() -> None:
    cfg = _load("      type: iceberg\n",
                "    processing:\n      - {type: metadata_extraction, query: '{destinationTableName: .t}'}\n"
                "    backup: {path: /tmp/b}\n")
    assert cfg.streams[0].processing  # type: ignore[attr-defined]


def test_describe_shows_firehoses_shape_without_catalog_secrets() -> None:
    cfg = _load("      type: iceberg\n"
                "      catalog: {type: rest, uri: 'http://cat', credential: '${PW}', s3.secret-access-key: '${PW}', "
                "s3.endpoint: 'http://s3'}\n"
                "      destination_tables: [{database: web, table: clicks, unique_keys: [id]}]\n"
                "      append_only: true\n")
    stream = cfg.streams[0]  # type: ignore[attr-defined]
    dest = stream.destination
    assert isinstance(dest, IcebergDestinationConfig)
    assert dest.catalog["credential"] == "hunter2-secret"  # ${ENV} read
    desc = dest.describe(stream.buffering, "000000000000")["IcebergDestinationDescription"]
    assert "hunter2" not in repr(desc)
    assert desc["DestinationTableConfigurationList"] == [
        {"DestinationDatabaseName": "web", "DestinationTableName": "clicks", "UniqueKeys": ["id"]}]
    assert desc["AppendOnly"] is True and desc["RetryOptions"] == {"DurationInSeconds": 300}


@pytest.mark.parametrize(("meta", "want"), [
    (None, {}),
    ({"otf": {"destinationDatabaseName": "a", "destinationTableName": "b", "operation": "delete"}},
     {"destinationDatabaseName": "a", "destinationTableName": "b", "operation": "delete"}),
    # The Lambda's otfMetadata first; what it leaves out from the query's keys (Firehose's order).
    ({"otf": {"destinationTableName": "lam"},
      "pk": {"partitionKeyFromQuery:destinationTableName": "jq", "partitionKeyFromQuery:destinationDatabaseName": "d",
             "partitionKeyFromLambda:operation": "delete"}},
     {"destinationDatabaseName": "d", "destinationTableName": "lam"}),
    ({"pk": {"partitionKeyFromQuery:operation": "update"}}, {"operation": "update"}),
    ({"otf": {"destinationTableName": ""}, "kinesis": {"x": 1}}, {}),
])
def test_a_records_route_comes_from_lambda_metadata_then_query_keys(meta: object, want: dict[str, str]) -> None:
    assert _otf(meta) == want


def test_cluster_mode_needs_a_catalog_every_daemon_shares() -> None:
    text = ("cluster: {jetstream: {servers: ['nats://127.0.0.1:4222']}}\n"
            "streams:\n  - name: s\n    destination: {type: iceberg}\n    backup: {path: /tmp/b}\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    (error,) = info.value.errors
    assert error.startswith("f.yaml:4: streams[0].destination.catalog: the embedded catalog is in each daemon's")
    shared = text.replace("{type: iceberg}", "{type: iceberg, catalog: {type: rest, uri: 'http://cat'}}")
    assert load_config_text(shared, "f.yaml", {}).streams[0].destination.type == "iceberg"  # type: ignore[attr-defined]
