"""The spool form of a record's error (``{"err": {...}}``): one encoder, one decoder, old spools readable."""

from firehose.records import ErrorInfo
from firehose.stages.archiver import error_record_line


def test_encode_uses_the_compact_keys_and_round_trips() -> None:
    info = ErrorInfo("C", "boom", "processing-failed", 2, 100, 200, "arn", {"EventId": "e"}, {"sequenceNumber": "49"})
    doc = info.encode()
    assert doc == {"c": "C", "m": "boom", "t": "processing-failed", "a": 2, "ts": 100, "e": 200, "l": "arn",
                   "x": {"EventId": "e"}, "sequenceNumber": "49"}
    assert ErrorInfo.decode(doc) == info


def test_a_spool_written_before_reads_the_same() -> None:
    legacy = {"c": "C", "m": "boom", "t": "processing-failed", "ts": 100, "e": 200, "l": None}
    assert error_record_line(b"x", legacy) == error_record_line(b"x", ErrorInfo.decode(legacy))
    assert ErrorInfo.decode(legacy).attempts == 1
