"""Memory does not grow with the backlog: it lives in the spool on disk."""

from __future__ import annotations

import base64
import http.client
import time
from pathlib import Path

import orjson
import psutil

from support import Daemon, daemon_config, local_objects, stream_config


def test_rss_stays_bounded_with_a_large_backlog_and_drains_afterwards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")  # the destination is down for the whole load
    stream = stream_config(
        "big", {"type": "local", "path": str(out)}, buffering={"size_mib": 5, "interval_secs": 1},
        spool={"max_size_mib": 4096, "fsync": "always"},
        delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 1000},
    )
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        record = b"r" * 4000 + b"\n"
        body = orjson.dumps({"DeliveryStreamName": "big",
                             "Records": [{"Data": base64.b64encode(record).decode()}] * 500})
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        headers = {"X-Amz-Target": "Firehose_20150804.PutRecordBatch", "Content-Type": "application/x-amz-json-1.1"}
        peak = 0
        sent = 0
        target = 400 << 20
        while sent < target:
            conn.request("POST", "/", body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
            sent += 500 * len(record)
            peak = max(peak, proc.memory_info().rss)
        conn.close()
        spool_bytes = sum(p.stat().st_size for p in (tmp_path / "data" / "spool" / "big").iterdir())
        assert spool_bytes >= target
        print(f"peak RSS {peak >> 20} MiB with a {spool_bytes >> 20} MiB backlog")
        assert peak < 250 << 20, f"peak RSS {peak >> 20} MiB with a {spool_bytes >> 20} MiB backlog"
        # The destination comes back: everything drains, and the spool frees its space.
        out.unlink()
        deadline = time.monotonic() + 180
        total = 0
        while time.monotonic() < deadline:
            total = sum(len(v) for v in local_objects(out).values())
            if total >= sent:
                break
            time.sleep(0.5)
            peak = max(peak, proc.memory_info().rss)
        assert total == sent
        assert peak < 250 << 20, f"peak RSS {peak >> 20} MiB while draining"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = sum(p.stat().st_size for p in (tmp_path / "data" / "spool" / "big").iterdir())
            if left < 2 << 20:
                break
            time.sleep(0.2)
        assert left < 2 << 20
    finally:
        assert d.stop() == 0
