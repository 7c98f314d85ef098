"""The firehose_http source: Firehose HTTP deliveries into a stream, checked by hand-made requests
and end to end, one daemon's http_endpoint destination delivering into another daemon's source
while the receiver is killed and restarted."""

from __future__ import annotations

import gzip
import http.client
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pybase64

from integration.test_conformance import ID_RE, Loader
from support import Daemon, daemon_config, free_port, local_objects, stream_config, stream_idle, wait_for


def receiver(tmp: Path, port: int) -> Daemon:
    source = {"type": "firehose_http", "listen": f"127.0.0.1:{port}", "access_keys": ["${RECEIVER_KEY}"]}
    stream = stream_config("in", {"type": "local", "path": str(tmp / "out")}, sources=[source],
                           buffering={"size_mib": 1, "interval_secs": 1})
    return Daemon(tmp, daemon_config(tmp, [stream]), env={"RECEIVER_KEY": "k1"})


def post(port: int, rid: str, records: list[bytes], key: str = "k1", body_rid: str | None = None,
         gzipped: bool = False) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps({"requestId": body_rid or rid, "timestamp": int(time.time() * 1000),
                         "records": [{"data": pybase64.b64encode(r).decode()} for r in records]})
    headers = {"X-Amz-Firehose-Protocol-Version": "1.0", "X-Amz-Firehose-Request-Id": rid,
               "X-Amz-Firehose-Access-Key": key, "Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/any/path", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def delivered(tmp: Path) -> bytes:
    return b"".join(body for _, body in sorted(local_objects(tmp / "out").items()))


def test_requests_are_checked_answered_and_deduplicated(tmp_path: Path) -> None:
    port = free_port()
    d = receiver(tmp_path, port).start()
    try:
        rid = str(uuid.uuid4())
        status, doc = post(port, rid, [b"a;", b"b;"], gzipped=True)
        assert status == 200 and doc["requestId"] == rid and isinstance(doc["timestamp"], int)
        assert post(port, rid, [b"a;", b"b;"])[0] == 200  # a retry: answered, not stored again
        status, doc = post(port, str(uuid.uuid4()), [b"x;"], key="wrong")
        assert status == 401 and doc["errorMessage"]
        status, doc = post(port, str(uuid.uuid4()), [b"x;"], body_rid="another")
        assert status == 400 and "requestId" in doc["errorMessage"]
        wait_for(lambda: delivered(tmp_path) == b"a;b;", 20, "one copy of the request")
    finally:
        assert d.stop() == 0
    d.start()  # the request id survives a restart: it is in the spool with its records
    try:
        assert post(port, rid, [b"a;", b"b;"])[0] == 200
        # A later request's delivery, with nothing left buffered or in flight, proves the retry
        # had its turn: stored again, its copy would be in the spool ahead of "c;".
        assert post(port, str(uuid.uuid4()), [b"c;"])[0] == 200
        wait_for(lambda: b"c;" in delivered(tmp_path) and stream_idle(d.port, "in"), 20, "the later request")
        assert delivered(tmp_path) == b"a;b;c;"
    finally:
        assert d.stop() == 0


def test_http_endpoint_into_firehose_http_exactly_once_across_receiver_kills(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "receiver").mkdir()
    (tmp_path / "sender").mkdir()
    recv = receiver(tmp_path / "receiver", port)
    dest = {"type": "http_endpoint", "url": f"http://127.0.0.1:{port}/", "access_key": "k1",
            "content_encoding": "gzip", "retry_duration_secs": 7200, "request_timeout_secs": 10}
    stream = stream_config("out", dest, buffering={"size_mib": 1, "interval_secs": 1},
                           delivery={"max_in_flight": 3, "retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 500},
                           backup={"path": str(tmp_path / "sender" / "backup")})
    sender = Daemon(tmp_path / "sender", daemon_config(tmp_path / "sender", [stream])).start()
    rng = random.Random(11)
    try:
        recv.start()
        loader = Loader(sender.port, "out", run=1, batch=200, pause=0.01).start()
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 2.0))
            recv.kill9()
            time.sleep(rng.uniform(0.2, 1.0))
            recv.start()
        time.sleep(1.0)
        loader.stop()
        assert loader.acked
        found: Counter[tuple[int, int]] = Counter()

        def all_arrived() -> bool:
            found.clear()
            for m in ID_RE.finditer(delivered(tmp_path / "receiver")):
                found[(int(m.group(1)), int(m.group(2)))] += 1
            return loader.acked <= set(found)

        wait_for(all_arrived, 90, "every acknowledged record at the receiver")
    finally:
        assert sender.stop() == 0
        recv.stop()
    assert max(found.values()) == 1, [k for k, v in found.items() if v > 1][:10]
    assert set(found) <= loader.sent
    retried = [e for e in sender.events() if e.get("event") == "delivery_retry_scheduled"]
    assert retried, "no delivery was interrupted by a kill"


def test_the_source_closes_slowloris_connections_and_keeps_serving(tmp_path: Path) -> None:
    import socket

    port = free_port()
    d = receiver(tmp_path, port).start()
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the headers
        started = time.monotonic()
        assert slow.recv(1) == b""  # closed by the source's header deadline (10 s)
        assert time.monotonic() - started < 25
        slow.close()
        status, _doc = post(port, str(uuid.uuid4()), [b"after\n"])
        assert status == 200
    finally:
        assert d.stop() == 0
