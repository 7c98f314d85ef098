"""Running out of file descriptors is a transient condition, not lost data: under a low
RLIMIT_NOFILE and a crowd of idle connections, puts may be refused with 503, but once the
connections are gone the stream takes records again and its spool was never fenced."""

from __future__ import annotations

import base64
import http.client
import socket
from pathlib import Path

import orjson

from support import Daemon, daemon_config, local_objects, stream_config, wait_for


def _put(conn: http.client.HTTPConnection, n: int) -> int:
    body = orjson.dumps({"DeliveryStreamName": "s", "Records": [
        {"Data": base64.b64encode(orjson.dumps({"n": n, "pad": "x" * 60_000}) + b"\n").decode()}
        for _ in range(1)]})
    conn.request("POST", "/", body=body, headers={"X-Amz-Target": "Firehose_20150804.PutRecordBatch",
                                                 "Content-Type": "application/x-amz-json-1.1"})
    resp = conn.getresponse()
    doc = orjson.loads(resp.read())
    return resp.status if resp.status != 200 or doc.get("FailedPutCount") == 0 else 500


def test_emfile_under_many_idle_connections_does_not_fence_the_spool(tmp_path: Path) -> None:
    s = stream_config("s", {"type": "local", "path": str(tmp_path / "out")},
                      spool={"segment_size_mib": 1, "max_size_mib": 64})
    cfg = daemon_config(tmp_path, [s])
    cfg["api"]["limits"] = {"header_timeout_secs": 120, "idle_timeout_secs": 120}
    d = Daemon(tmp_path, cfg)
    d.command = ["prlimit", "--nofile=200:200", *d.command]
    d.start()
    honest = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    acked: list[int] = []
    try:
        assert _put(honest, -1) == 200  # the honest client's connection is open before the crowd
        acked.append(-1)
        crowd = []
        for _ in range(300):
            try:
                crowd.append(socket.create_connection(("127.0.0.1", d.port), timeout=2))
            except OSError:
                break
        refused = 0
        for n in range(60):  # ~3.6 MB through 1 MiB segments: new segment files are needed
            status = _put(honest, n)
            if status == 200:
                acked.append(n)
            else:
                assert status == 503, status
                refused += 1
        for c in crowd:
            c.close()
        assert refused > 0, "the descriptor limit was never reached: the test proves nothing"
        def recovered() -> bool:
            status = _put(honest, 1000)
            if status == 200:
                acked.append(1000)
            return status == 200
        wait_for(recovered, 30, "puts accepted again once the connections are gone")
        assert d.health()["status"] == "ok"
        assert not any(e.get("event") == "spool_append_failed" and "fenced" in str(e) for e in d.events())
    finally:
        honest.close()
        assert d.stop() == 0
    delivered = [orjson.loads(line)["n"] for v in local_objects(tmp_path / "out").values() for line in v.splitlines()]
    assert sorted(delivered) == sorted(acked)
