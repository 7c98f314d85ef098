"""Firehose's request limits on the API, as botocore's service model states them (tag keys 1-128
characters, values up to 256, 50 tags, ListTagsForDeliveryStream's Limit 1-50), bodies over the
size limit (413, read no further), and a client that goes away mid-body (one line at info)."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from support import Daemon, daemon_config, raw_call, stream_config, wait_for


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("limits")
    d = Daemon(tmp, daemon_config(tmp, [stream_config("s", {"type": "local", "path": str(tmp / "out")})])).start()
    yield d
    d.stop()


def _call(d: Daemon, op: str, doc: dict[str, object]) -> tuple[int, dict[str, object]]:
    return raw_call(d.port, op, orjson.dumps(doc))


@pytest.mark.parametrize(("tags", "where", "constraint"), [
    ([{"Key": "k" * 10_000, "Value": "v"}], "tags.1.member.key", "Member must have length less than or equal to 128"),
    ([{"Key": "k", "Value": "v" * 100_000}], "tags.1.member.value", "Member must have length less than or equal to 256"),
    ([{"Key": "", "Value": "v"}], "tags.1.member.key", "Member must have length greater than or equal to 1"),
    ([{"Key": "aws:owner", "Value": "v"}], "tags.1.member.key", "Member must satisfy regular expression pattern"),
    ([{"Key": "a\nb", "Value": "v"}], "tags.1.member.key", "Member must satisfy regular expression pattern"),
    ([{"Key": "k", "Value": "<script>"}], "tags.1.member.value", "Member must satisfy regular expression pattern"),
    ([{"Key": f"k{i}", "Value": "v"} for i in range(51)], "tags", "Member must have length less than or equal to 50"),
])
def test_tags_are_validated_as_firehose_does(daemon: Daemon, tags: list[dict[str, str]], where: str,
                                             constraint: str) -> None:
    status, doc = _call(daemon, "TagDeliveryStream", {"DeliveryStreamName": "s", "Tags": tags})
    assert (status, doc["__type"]) == (400, "ValidationException"), doc
    message = str(doc["message"])
    assert f"at '{where}' failed to satisfy constraint: {constraint}" in message
    assert len(message) < 400  # a 100 KB value is not echoed back


def test_unicode_letters_and_the_allowed_punctuation_are_accepted(daemon: Daemon) -> None:
    tags = [{"Key": "équipe:coût/zone=1+2-3@4%5_6.7", "Value": "Zürich 東京"}]
    status, _doc = _call(daemon, "TagDeliveryStream", {"DeliveryStreamName": "s", "Tags": tags})
    assert status == 200
    status, doc = _call(daemon, "ListTagsForDeliveryStream", {"DeliveryStreamName": "s"})
    assert status == 200 and tags[0] in doc["Tags"]  # type: ignore[operator]


@pytest.mark.parametrize(("limit", "constraint"), [
    (-1, "Member must have value greater than or equal to 1"),
    (0, "Member must have value greater than or equal to 1"),
    (51, "Member must have value less than or equal to 50"),
])
def test_list_tags_limit_is_validated(daemon: Daemon, limit: int, constraint: str) -> None:
    status, doc = _call(daemon, "ListTagsForDeliveryStream", {"DeliveryStreamName": "s", "Limit": limit})
    assert (status, doc["__type"]) == (400, "ValidationException"), doc
    assert constraint in str(doc["message"])


def test_untag_keys_are_validated(daemon: Daemon) -> None:
    status, doc = _call(daemon, "UntagDeliveryStream", {"DeliveryStreamName": "s", "TagKeys": ["k" * 129]})
    assert (status, doc["__type"]) == (400, "ValidationException"), doc


def test_an_oversized_body_gets_413_before_it_is_sent(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Firehose_20150804.PutRecordBatch\r\n"
                  b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 104857600\r\n\r\n")
        started = time.monotonic()
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert time.monotonic() - started < 5


def test_a_client_leaving_mid_body_is_one_line_at_info(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Firehose_20150804.PutRecordBatch\r\n"
                  b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 5000\r\n\r\n" + b"{" * 100)
        time.sleep(0.2)
    wait_for(lambda: any(e.get("event") == "http_client_disconnected" for e in daemon.events()), 10,
             "the disconnect logged")
    event = next(e for e in daemon.events() if e.get("event") == "http_client_disconnected")
    assert event["level"] == "info"
    assert "Traceback" not in daemon.logs()
    assert all(line.startswith("{") for line in daemon.logs().splitlines() if line.strip())


def test_the_daemon_keeps_serving(daemon: Daemon, tmp_path: Path) -> None:
    status, doc = _call(daemon, "PutRecord", {"DeliveryStreamName": "s", "Record": {"Data": "aGVsbG8K"}})
    assert status == 200 and doc["RecordId"]


def test_streams_named_dot_and_dot_dot_are_ordinary_streams(tmp_path: Path) -> None:
    streams = [stream_config(name, {"type": "local", "path": str(tmp_path / f"out-{i}")})
               for i, name in enumerate([".", "..", "a"])]
    d = Daemon(tmp_path, daemon_config(tmp_path, streams)).start()
    try:
        for name in (".", "..", "a"):
            status, _doc = _call(d, "PutRecord", {"DeliveryStreamName": name, "Record": {"Data": "aGVsbG8K"}})
            assert status == 200
    finally:
        assert d.stop() == 0
    spool_root = tmp_path / "data" / "spool"
    # Each stream has its own directory inside spool/: none is spool/ itself or data_dir.
    assert sorted(p.name for p in spool_root.iterdir()) == ["%2E", "%2E%2E", "a"]
    assert not list(spool_root.glob("seg-*")) and not list((tmp_path / "data").glob("seg-*"))
    for i in range(3):
        assert (tmp_path / f"out-{i}").exists()


def test_malformed_http_is_a_client_error_not_an_error_of_the_daemon(daemon: Daemon) -> None:
    for junk in (b"GARBAGE\r\n\r\n", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            s.sendall(junk)
            assert s.recv(4096).split(b" ")[1:2] == [b"400"], junk
    status, doc = _call(daemon, "PutRecord", {"DeliveryStreamName": "s", "Record": {"Data": "aGVsbG8K"}})
    assert status == 200
    errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
    assert errors == [] and "Traceback" not in daemon.logs()


def test_a_body_sent_in_http_chunks_is_read_whole(daemon: Daemon) -> None:
    """Transfer-Encoding: chunked, the body cut into many chunks across several writes (as
    streaming clients send it): every chunk is part of the one body, and the records are stored."""
    records = [{"Data": base64.b64encode(f"chunked-{i:04d}\n".encode() * 40).decode()} for i in range(300)]
    body = orjson.dumps({"DeliveryStreamName": "s", "Records": records})
    pieces = [body[i : i + 997] for i in range(0, len(body), 997)]
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
            b"X-Amz-Target: Firehose_20150804.PutRecordBatch\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(head)
        for n, piece in enumerate(pieces):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if n % 25 == 0:
                time.sleep(0.01)  # so the daemon reads the body in several goes
        s.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            got = s.recv(65536)
            if not got:
                break
            answer += got
    status = int(answer.split(b" ")[1])
    doc = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert status == 200 and doc["FailedPutCount"] == 0 and len(doc["RequestResponses"]) == 300, answer[:300]
    wait_for(lambda: _stored(daemon.workdir / "out").count(b"chunked-0299\n") == 40, 30, "the records delivered")
    stored = _stored(daemon.workdir / "out")
    assert all(stored.count(f"chunked-{i:04d}\n".encode()) == 40 for i in range(300))


def _stored(out: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file())


def test_requests_without_a_body_are_answered_one_after_another(daemon: Daemon) -> None:
    """aiohttp hands every request without a body the same empty stream: reading it must end
    the body each time, not only the first (a reader that took its chunk-end marker for more to
    come spun on the event loop forever)."""
    for length in (b"Content-Length: 0\r\n", b"", b"Content-Length: 0\r\nContent-Encoding: gzip\r\n") * 2:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
                      b"X-Amz-Target: Firehose_20150804.PutRecordBatch\r\n" + length + b"\r\n")
            answer = s.recv(4096)
        assert answer.split(b" ")[1:2] == [b"400"], answer
        assert b"ValidationException" in answer or b"SerializationException" in answer, answer
