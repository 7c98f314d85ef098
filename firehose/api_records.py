"""Batches of base64 records parsed and decoded in one pass: PutRecordBatch bodies, and the
Firehose HTTP delivery requests the ``firehose_http`` source receives.

A PutRecordBatch body is some 500 base64 strings in JSON. Parsing it with orjson and then
decoding each string made the request's records three times over (the JSON strings, the
decoded bytes, the list), and pybase64 releases the GIL in every call: 500 times a request,
each a chance for a delivery or fsync thread to take the GIL from the event loop, which then
waits to get it back. msgspec decodes a typed body straight from the request's bytes, base64
members included, into one ``bytes`` per record, without releasing the GIL.

Only a body of exactly the expected shape takes this way. Anything else (a member of another
type, a missing or an unknown member, a string that is not strict base64, a body that is not
JSON) returns
``None`` and the request goes the general way, where orjson parses it and the per-member checks
answer with Firehose's own error for whatever is wrong. msgspec's base64 is as strict as
``pybase64.b64decode(s, validate=True)``: padding required, no whitespace, no URL-safe alphabet
(tests/unit/test_api_records.py checks the two agree on a randomised corpus).
"""

from __future__ import annotations

from typing import Any

import msgspec


# Members outside the shape send the body the general way: msgspec skips an unknown member's
# value without checking it (invalid UTF-8 in it would pass), and the general way rejects it.
class _Record(msgspec.Struct, forbid_unknown_fields=True):
    Data: bytes


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    DeliveryStreamName: str
    Records: list[_Record]


class _DeliveryRecord(msgspec.Struct, forbid_unknown_fields=True):
    data: bytes


class _Delivery(msgspec.Struct, forbid_unknown_fields=True):
    requestId: str  # noqa: N815 - the wire's names
    timestamp: int
    records: list[_DeliveryRecord]


class DecodedRecords(list[bytes]):
    """A PutRecordBatch's ``Records`` already decoded from base64, in order."""


_BATCH = msgspec.json.Decoder(_Batch)
_DELIVERY = msgspec.json.Decoder(_Delivery)


def decode_batch(body: bytes) -> dict[str, Any] | None:
    """The body as the general way's document would be, with ``Records`` a
    :class:`DecodedRecords`; ``None`` when the body is not exactly a PutRecordBatch's shape."""
    try:
        batch = _BATCH.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    return {"DeliveryStreamName": batch.DeliveryStreamName,
            "Records": DecodedRecords([r.Data for r in batch.Records])}


def decode_delivery(body: bytes) -> tuple[str, int, list[bytes]] | None:
    """A Firehose HTTP delivery request's ``requestId``, ``timestamp`` and records; ``None`` when
    the body is not exactly that shape (the caller's general way then answers what is wrong)."""
    try:
        delivery = _DELIVERY.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    return delivery.requestId, delivery.timestamp, [r.data for r in delivery.records]
