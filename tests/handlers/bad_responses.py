"""Handlers that violate Firehose's response contract, one way each."""

from __future__ import annotations

from typing import Any

from handlers import identity


def _ok(event: dict[str, Any]) -> list[dict[str, Any]]:
    return identity.handler(event, None)["records"]


def not_a_dict(event: dict[str, Any], context: Any) -> Any:
    """A JSON array instead of an object."""
    return _ok(event)


def no_records(event: dict[str, Any], context: Any) -> Any:
    """An object without ``records``."""
    return {"items": _ok(event)}


def missing_id(event: dict[str, Any], context: Any) -> Any:
    """Leaves out the last record."""
    return {"records": _ok(event)[:-1]}


def duplicate_id(event: dict[str, Any], context: Any) -> Any:
    """Returns the first record twice."""
    records = _ok(event)
    return {"records": records + records[:1]}


def unknown_id(event: dict[str, Any], context: Any) -> Any:
    """Adds a record the event never carried."""
    return {"records": [*_ok(event), {"recordId": "not-sent", "result": "Ok", "data": ""}]}


def bad_result(event: dict[str, Any], context: Any) -> Any:
    """``result: "OK"`` (wrong case)."""
    return {"records": [{**r, "result": "OK"} for r in _ok(event)]}


def bad_base64(event: dict[str, Any], context: Any) -> Any:
    """Returns raw text instead of base64."""
    return {"records": [{**r, "data": "not base64!"} for r in _ok(event)]}


def no_data(event: dict[str, Any], context: Any) -> Any:
    """Omits ``data`` on Dropped records (Firehose requires it on every record)."""
    return {"records": [{"recordId": r["recordId"], "result": "Dropped"} for r in event["records"]]}


def numeric_partition_key(event: dict[str, Any], context: Any) -> Any:
    """A partition key whose value is a number, not a string."""
    return {"records": [{**r, "metadata": {"partitionKeys": {"year": 2024}}} for r in _ok(event)]}


def bytes_data(event: dict[str, Any], context: Any) -> Any:
    """Returns ``bytes`` as data: fine in Python, impossible to marshal to JSON on Lambda."""
    return {"records": [{**r, "data": b"raw"} for r in _ok(event)]}


def too_large(event: dict[str, Any], context: Any) -> Any:
    """A well-formed response of about 8 MB: over Lambda's 6 MB response limit."""
    records = _ok(event)
    pad = "A" * (8 << 20)
    return {"records": [{**records[0], "padding": pad}, *records[1:]]}
