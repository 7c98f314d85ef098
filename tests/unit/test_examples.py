"""The example handler the shipped configs use, tested the way users test theirs."""

from __future__ import annotations

from firehose.testing import run_transform


def test_enrich_adds_processed_at_and_fails_what_is_not_an_object() -> None:
    run = run_transform("firehose.transforms.examples:enrich", [{"user": 1}, b"[1, 2]", b"not json"])
    [ok] = run.ok
    doc = ok.json()
    assert doc["user"] == 1 and isinstance(doc["processed_at"], int) and doc["processed_at"] > 1_600_000_000_000
    assert ok.data.endswith(b"\n")
    assert len(run.failed) == 2 and run.dropped == []


def test_route_to_iceberg_moves_the_routing_fields_into_otf_metadata() -> None:
    run = run_transform("firehose.transforms.examples:route_to_iceberg", [
        {"_table": "crm.customers", "_op": "update", "customer_id": 7},
        {"_table": "crm.orders", "order_id": 1},
        {"customer_id": 8}, b"not json"])
    first, second = run.ok
    assert first.json() == {"customer_id": 7} and second.json() == {"order_id": 1}
    assert first.otf_metadata == {"destinationDatabaseName": "crm", "destinationTableName": "customers",
                                  "operation": "update"}
    assert second.otf_metadata == {"destinationDatabaseName": "crm", "destinationTableName": "orders",
                                   "operation": "insert"}
    assert len(run.failed) == 2
