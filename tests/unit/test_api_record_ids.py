"""PutRecordBatch's RequestResponses: the record ids written in one pass are the ids the stream
hands out (``<prefix><seq as 16 hex digits>``), in order, as valid JSON; and the request ids the API answers with."""

from __future__ import annotations

import uuid

import orjson

from firehose.api import record_ids_json, request_id


def test_record_ids_are_the_prefix_and_sixteen_hex_digits_of_each_sequence_number() -> None:
    prefix = "a1b2c3d4e5f60718293a4b5c"
    for first, count in [(0, 1), (0, 500), (255, 3), (2**40 + 17, 7), (2**63 - 2, 2)]:
        got = orjson.loads("[" + record_ids_json(prefix, first, count) + "]")
        assert got == [{"RecordId": f"{prefix}{seq:016x}"} for seq in range(first, first + count)]
    assert record_ids_json(prefix, 5, 0) == ""


def test_request_ids_are_distinct_version_4_uuids() -> None:
    ids = [request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids[:200]:
        parsed = uuid.UUID(rid)
        assert str(parsed) == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122
