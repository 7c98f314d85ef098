"""Tests for firehose.transforms.processors: Firehose's built-in processors on concrete batches."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import pytest

from firehose.kpl import aggregate
from firehose.records import Outcome, SourceRecord, initial_outcomes
from firehose.transforms.processors import (
    MAX_SUB_RECORDS,
    cloudwatch_log_processing,
    decompression,
    kpl_deaggregation,
    record_deaggregation,
)

# Firehose's error output types (reference §4.2, §4.3, §6.3), written out rather than imported.
PROCESSING_FAILED = "processing-failed"
DECOMPRESSION_FAILED = "decompression-failed"


def _batch(*payloads: bytes) -> list[Outcome]:
    return initial_outcomes([SourceRecord(f"id-{i}", p, 0) for i, p in enumerate(payloads)])


FAILED = Outcome(7, b"raw", result="ProcessingFailed", error_code="Earlier.Error", error_message="boom")
DROPPED = Outcome(8, b"", result="Dropped")


def _cwl_envelope(messages: list[str], message_type: str = "DATA_MESSAGE") -> dict[str, Any]:
    return {
        "messageType": message_type,
        "owner": "123456789012",
        "logGroup": "/aws/lambda/app",
        "logStream": "2024/05/01/[$LATEST]abcdef",
        "subscriptionFilters": ["to-firehose"],
        "logEvents": [
            {"id": str(36000000000000000000000000000000000000000 + i), "timestamp": 1714571709000 + i, "message": m}
            for i, m in enumerate(messages)
        ],
    }


def _cwl_payload(messages: list[str], message_type: str = "DATA_MESSAGE") -> bytes:
    """A subscription payload as CloudWatch Logs delivers it: gzip of the JSON envelope."""
    return gzip.compress(json.dumps(_cwl_envelope(messages, message_type)).encode())


@pytest.mark.parametrize(
    "processor",
    [
        kpl_deaggregation,
        lambda o: record_deaggregation(o, "JSON"),
        lambda o: record_deaggregation(o, "DELIMITED", b"\n"),
        decompression,
        cloudwatch_log_processing,
        lambda o: cloudwatch_log_processing(o, data_message_extraction=False),
    ],
)
def test_non_ok_outcomes_pass_through_unchanged(processor: Any) -> None:
    assert processor([FAILED, DROPPED]) == [FAILED, DROPPED]


@pytest.mark.parametrize(
    "processor",
    [
        kpl_deaggregation,
        lambda o: record_deaggregation(o, "JSON"),
        lambda o: record_deaggregation(o, "DELIMITED", b"\n"),
        decompression,
        cloudwatch_log_processing,
    ],
)
def test_empty_batch(processor: Any) -> None:
    assert processor([]) == []


# --- KPL -------------------------------------------------------------------------------------------


def test_kpl_deaggregation_splits_aggregates() -> None:
    agg = aggregate([("pk-1", b"one"), ("pk-2", b"two"), ("pk-1", b"")], ["42", None, "7"])
    batch = _batch(b"plain", agg)
    batch[1] = Outcome(1, agg, meta={"shardId": "shardId-000000000000"})
    out = kpl_deaggregation([*batch, FAILED])
    assert out == [
        Outcome(0, b"plain"),
        Outcome(1, b"one", sub_index=0,
                meta={"shardId": "shardId-000000000000", "partitionKey": "pk-1", "explicitHashKey": "42"}),
        Outcome(1, b"two", sub_index=1,
                meta={"shardId": "shardId-000000000000", "partitionKey": "pk-2", "explicitHashKey": None}),
        Outcome(1, b"", sub_index=2,
                meta={"shardId": "shardId-000000000000", "partitionKey": "pk-1", "explicitHashKey": "7"}),
        FAILED,
    ]
    # The parent's meta dict is not mutated.
    assert batch[1].meta == {"shardId": "shardId-000000000000"}


def test_kpl_deaggregation_fails_corrupt_aggregate_without_dropping_it() -> None:
    agg = bytearray(aggregate([("k", b"v")]))
    agg[-1] ^= 0xFF
    [out] = kpl_deaggregation(_batch(bytes(agg)))
    assert out.result == "ProcessingFailed"
    assert out.error_code == "Kinesis.KplDeaggregationFailed"
    assert out.error_message is not None and "MD5 mismatch" in out.error_message
    assert out.error_output_type == PROCESSING_FAILED
    assert out.data == bytes(agg) and out.source == 0


def test_kpl_deaggregation_index_out_of_range_message() -> None:
    body = b"\x0a\x01k" + b"\x1a\x05\x08\x03\x1a\x01v"  # partition_key_index 3, table of one
    [out] = kpl_deaggregation(_batch(b"\xf3\x89\x9a\xc2" + body + hashlib.md5(body).digest()))
    assert out.error_code == "Kinesis.KplDeaggregationFailed"
    assert out.error_message == (
        "record 0 (at byte 7): partition_key_index 3 out of range (partition_key_table has 1 entries)"
    )


def test_kpl_deaggregation_empty_aggregate_is_dropped() -> None:
    body = b"\x0a\x01k"  # a key table and no records
    [out] = kpl_deaggregation(_batch(b"\xf3\x89\x9a\xc2" + body + hashlib.md5(body).digest()))
    assert out == Outcome(0, b"", result="Dropped")


# --- RecordDeAggregation: JSON --------------------------------------------------------------------


def test_json_concatenated_objects() -> None:
    out = record_deaggregation(_batch(b'{"a":1}{"a":2}{"a":3}'), "JSON")
    assert out == [
        Outcome(0, b'{"a":1}', sub_index=0),
        Outcome(0, b'{"a":2}', sub_index=1),
        Outcome(0, b'{"a":3}', sub_index=2),
    ]


def test_json_whitespace_and_newlines_between_objects_are_removed() -> None:
    data = b' \n{"a": 1}\n\n{ "b" : [1, 2] }\r\n\t{"c":{"d":null}}\n'
    assert [o.data for o in record_deaggregation(_batch(data), "JSON")] == [
        b'{"a": 1}', b'{ "b" : [1, 2] }', b'{"c":{"d":null}}',
    ]


def test_json_keeps_exact_original_bytes() -> None:
    # Escapes, number spellings, key order and non-ASCII text survive as written.
    objs = [
        '{"z":1.50,"a":1E+2,"s":"\\u00e9\\n"}',
        '{"text":"héllo wörld ✓ 😀","n":-0}',
        '{"nested":{"deep":[{"x":"}"},"{"]}}',
    ]
    data = "\n".join(objs).encode()
    out = record_deaggregation(_batch(data), "JSON")
    assert [o.data for o in out] == [o.encode() for o in objs]
    assert [o.sub_index for o in out] == [0, 1, 2]


def test_json_single_object_is_one_sub_record() -> None:
    assert record_deaggregation(_batch(b'{"a":1}\n'), "JSON") == [Outcome(0, b'{"a":1}', sub_index=0)]


def test_json_top_level_array_fails() -> None:
    [out] = record_deaggregation(_batch(b'[{"a":1},{"a":2}]'), "JSON")
    assert out.result == "ProcessingFailed"
    assert out.error_code == "DeAggregation.JsonParsingFailed"
    assert out.error_message == "expected a JSON object at byte offset 0, found an array"
    assert out.data == b'[{"a":1},{"a":2}]'
    assert out.error_output_type == PROCESSING_FAILED


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a":1}{"a":', "invalid JSON at byte offset 12: Expecting value"),
        (b'{"a":1} xyz', "expected a JSON object at byte offset 8, found a value that is not an object"),
        (b'{"a":1}\n42', "expected a JSON object at byte offset 8"),
        (b'{"a":1}\n[1]', "expected a JSON object at byte offset 8, found an array"),
        (b'{"a":1,}', "invalid JSON at byte offset 7"),
        (b'{"a":NaN}', "invalid JSON in the object at byte offset 0: non-standard constant NaN"),
        (b'{"a":"\x00"}', "invalid JSON at byte offset 6: Invalid control character"),
        (b'{"a":"\xff"}', "invalid UTF-8 at byte offset 6"),
        # Offsets are in bytes, not characters: "é" is two bytes, "😀" four.
        ('{"é":"😀"}{"b":'.encode(), "invalid JSON at byte offset 18"),
        ('{"é":1} 😀'.encode(), "expected a JSON object at byte offset 9"),
    ],
)
def test_json_invalid_names_byte_offset(data: bytes, message: str) -> None:
    [out] = record_deaggregation(_batch(data), "JSON")
    assert out.result == "ProcessingFailed"
    assert out.error_code == "DeAggregation.JsonParsingFailed"
    assert out.error_message is not None and out.error_message.startswith(message), out.error_message
    assert out.data == data


def test_json_non_ascii_boundaries() -> None:
    data = '{"k":"ä"}  {"k":"日本"}\n{"k":"😀"}'.encode()
    assert [o.data for o in record_deaggregation(_batch(data), "JSON")] == [
        '{"k":"ä"}'.encode(), '{"k":"日本"}'.encode(), '{"k":"😀"}'.encode(),
    ]


@pytest.mark.parametrize("data", [b"", b" \n\t\r\n"])
def test_json_nothing_to_split_passes_through(data: bytes) -> None:
    assert record_deaggregation(_batch(data), "JSON") == [Outcome(0, data)]


def test_json_cap_of_500_sub_records() -> None:
    at_cap = b"".join(b'{"i":%d}' % i for i in range(MAX_SUB_RECORDS))
    over_cap = at_cap + b'{"i":500}'
    out = record_deaggregation(_batch(at_cap, over_cap), "JSON")
    assert MAX_SUB_RECORDS == 500
    assert len(out) == 501
    assert [o.data for o in out[:500]] == [b'{"i":%d}' % i for i in range(500)]
    assert all(o.source == 0 for o in out[:500])
    assert out[500] == Outcome(1, over_cap)  # whole, unsplit, still Ok


def test_json_mixed_batch_keeps_sources_and_order() -> None:
    out = record_deaggregation(_batch(b'{"a":1}{"a":2}', b"[]", b'{"b":1}'), "JSON")
    assert [(o.source, o.result, o.sub_index) for o in out] == [
        (0, "Ok", 0), (0, "Ok", 1), (1, "ProcessingFailed", None), (2, "Ok", 0),
    ]


def test_json_keeps_other_fields() -> None:
    parent = Outcome(3, b'{"a":1}{"a":2}', partition_keys={"p": "v"}, attempts=2, meta={"m": 1})
    out = record_deaggregation([parent], "JSON")
    assert out == [
        Outcome(3, b'{"a":1}', partition_keys={"p": "v"}, attempts=2, meta={"m": 1}, sub_index=0),
        Outcome(3, b'{"a":2}', partition_keys={"p": "v"}, attempts=2, meta={"m": 1}, sub_index=1),
    ]


# --- RecordDeAggregation: DELIMITED ---------------------------------------------------------------


def test_delimited_split() -> None:
    out = record_deaggregation(_batch(b"a####bb####ccc"), "DELIMITED", b"####")
    assert out == [Outcome(0, b"a", sub_index=0), Outcome(0, b"bb", sub_index=1), Outcome(0, b"ccc", sub_index=2)]


def test_delimited_drops_empty_trailing_piece_only() -> None:
    out = record_deaggregation(_batch(b"a\n\nb\n"), "DELIMITED", b"\n")
    assert [o.data for o in out] == [b"a", b"", b"b"]
    out = record_deaggregation(_batch(b"|x|"), "DELIMITED", b"|")
    assert [o.data for o in out] == [b"", b"x"]


def test_delimited_without_delimiter_in_data_is_one_sub_record() -> None:
    assert record_deaggregation(_batch(b"abc"), "DELIMITED", b",") == [Outcome(0, b"abc", sub_index=0)]


def test_delimited_nothing_to_split_passes_through() -> None:
    assert record_deaggregation(_batch(b""), "DELIMITED", b",") == [Outcome(0, b"")]


def test_delimited_lone_delimiter_is_one_empty_sub_record() -> None:
    assert record_deaggregation(_batch(b","), "DELIMITED", b",") == [Outcome(0, b"", sub_index=0)]


def test_delimited_cap_of_500_sub_records() -> None:
    at_cap = b"x\n" * 500  # the trailing empty piece doesn't count
    over_cap = b"x\n" * 500 + b"y"
    out = record_deaggregation(_batch(at_cap, over_cap), "DELIMITED", b"\n")
    assert len(out) == 501
    assert out[499] == Outcome(0, b"x", sub_index=499)
    assert out[500] == Outcome(1, over_cap)


def test_record_deaggregation_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="non-empty Delimiter"):
        record_deaggregation(_batch(b"a"), "DELIMITED")
    with pytest.raises(ValueError, match="unknown SubRecordType"):
        record_deaggregation(_batch(b"a"), "CSV")


# --- Decompression ---------------------------------------------------------------------------------


def test_decompression_gunzips() -> None:
    payload = _cwl_payload(["hello"])
    out = decompression(_batch(payload, gzip.compress(b"")))
    assert out == [Outcome(0, json.dumps(_cwl_envelope(["hello"])).encode()), Outcome(1, b"")]


def test_decompression_concatenated_members() -> None:
    assert decompression(_batch(gzip.compress(b"ab") + gzip.compress(b"cd"))) == [Outcome(0, b"abcd")]


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b'{"not":"gzip"}', "Not a gzipped file"),
        (gzip.compress(b"hello world")[:-6], "ended before the end-of-stream marker"),
        (gzip.compress(b"hello") + b"junk", "Not a gzipped file"),
        (b"", "record is empty"),
    ],
)
def test_decompression_bad_gzip(data: bytes, detail: str) -> None:
    [out] = decompression(_batch(data))
    assert out.result == "ProcessingFailed"
    assert out.error_code == "Decompression.Failed"
    assert out.error_output_type == DECOMPRESSION_FAILED
    assert out.error_message is not None and detail in out.error_message
    assert out.data == data  # original compressed bytes kept for rawData


def test_decompression_bad_crc() -> None:
    good = bytearray(gzip.compress(b"hello"))
    good[-8] ^= 0xFF  # CRC32 in the trailer
    [out] = decompression(_batch(bytes(good)))
    assert out.error_code == "Decompression.Failed"
    assert out.error_message is not None and "CRC check failed" in out.error_message


def test_decompression_continues_after_a_failure() -> None:
    out = decompression(_batch(b"bad", gzip.compress(b"good"), FAILED.data))
    assert [(o.result, o.data) for o in out] == [
        ("ProcessingFailed", b"bad"), ("Ok", b"good"), ("ProcessingFailed", FAILED.data),
    ]


def test_decompression_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="only 'GZIP'"):
        decompression(_batch(b""), "ZIP")


# --- CloudWatchLogProcessing ---------------------------------------------------------------------


def test_cloudwatch_logs_end_to_end() -> None:
    """Decompression then CloudWatchLogProcessing, as Firehose runs them for a CWL source."""
    messages = ["first line", '{"level":"info","msg":"ünïcode ✓"}', "", "tab\there"]
    batch = _batch(_cwl_payload(messages), _cwl_payload([], "CONTROL_MESSAGE"), _cwl_payload(["only"]))
    out = cloudwatch_log_processing(decompression(batch))
    assert out == [
        Outcome(0, b"first line\n", sub_index=0),
        Outcome(0, '{"level":"info","msg":"ünïcode ✓"}\n'.encode(), sub_index=1),
        Outcome(0, b"\n", sub_index=2),
        Outcome(0, b"tab\there\n", sub_index=3),
        Outcome(1, b"", result="Dropped"),
        Outcome(2, b"only\n", sub_index=0),
    ]


def test_cloudwatch_logs_control_message_is_dropped() -> None:
    control = {
        "messageType": "CONTROL_MESSAGE", "owner": "CloudwatchLogs", "logGroup": "", "logStream": "",
        "subscriptionFilters": [],
        "logEvents": [{"id": "", "timestamp": 1714571709000,
                       "message": "CWL CONTROL MESSAGE: Checking health of destination Firehose."}],
    }
    [out] = cloudwatch_log_processing(_batch(json.dumps(control).encode()))
    assert out == Outcome(0, b"", result="Dropped")


def test_cloudwatch_logs_data_message_without_events_is_dropped() -> None:
    [out] = cloudwatch_log_processing(_batch(json.dumps(_cwl_envelope([])).encode()))
    assert out == Outcome(0, b"", result="Dropped")


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"not json", "not a JSON CloudWatch Logs envelope"),
        (gzip.compress(b"{}"), "not a JSON CloudWatch Logs envelope"),  # Decompression not run
        (b"[1,2]", "is a JSON list, not an object"),
        (b'{"logEvents":[]}', "unknown CloudWatch Logs messageType None"),
        (b'{"messageType":"OTHER","logEvents":[]}', "unknown CloudWatch Logs messageType 'OTHER'"),
        (b'{"messageType":"DATA_MESSAGE"}', "no logEvents list"),
        (b'{"messageType":"DATA_MESSAGE","logEvents":{}}', "no logEvents list"),
        (b'{"messageType":"DATA_MESSAGE","logEvents":[{"message":"a"},{"id":"2"}]}', "logEvents[1]"),
        (b'{"messageType":"DATA_MESSAGE","logEvents":[{"message":5}]}', "logEvents[0] has no string"),
        (b'{"messageType":"DATA_MESSAGE","logEvents":["text"]}', "logEvents[0]"),
    ],
)
def test_cloudwatch_logs_wrong_shape_fails(data: bytes, detail: str) -> None:
    [out] = cloudwatch_log_processing(_batch(data))
    assert out.result == "ProcessingFailed"
    assert out.error_code == "CloudWatchLogs.ProcessingFailed"
    assert out.error_message is not None and detail in out.error_message, out.error_message
    assert out.data == data


def test_cloudwatch_logs_without_extraction_passes_envelope_through() -> None:
    batch = decompression(_batch(_cwl_payload(["a", "b"])))
    assert cloudwatch_log_processing(batch, data_message_extraction=False) == batch


def test_cloudwatch_logs_keeps_source_and_meta() -> None:
    parent = Outcome(4, json.dumps(_cwl_envelope(["x", "y"])).encode(), meta={"k": "v"})
    out = cloudwatch_log_processing([parent])
    assert out == [Outcome(4, b"x\n", sub_index=0, meta={"k": "v"}), Outcome(4, b"y\n", sub_index=1, meta={"k": "v"})]


def test_decompression_failure_is_not_reprocessed_by_cloudwatch_logs() -> None:
    [out] = cloudwatch_log_processing(decompression(_batch(b"garbage")))
    assert out.error_code == "Decompression.Failed"
    assert out.error_output_type == "decompression-failed"
