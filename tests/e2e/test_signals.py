"""Ctrl-C as a person at a terminal uses it: the first interrupt shuts down gracefully (delivering
within shutdown_timeout_secs), a second one during that shutdown exits at once, and nothing
acknowledged is lost: the next start delivers it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from support import Daemon, daemon_config, local_objects, stream_config, wait_for


def test_a_second_interrupt_exits_at_once_and_the_spool_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the destination's directory should be: every delivery fails")
    out = blocker / "out"
    s = stream_config("s", {"type": "local", "path": str(out)})
    cfg = daemon_config(tmp_path, [s], shutdown_timeout_secs=120)
    daemon = Daemon(tmp_path, cfg).start()
    fh = daemon.firehose()
    records = [f"r{i}\n".encode() for i in range(20)]
    fh.put_record_batch(DeliveryStreamName="s", Records=[{"Data": r} for r in records])
    wait_for(lambda: any(e.get("event") == "delivery_retry_scheduled" for e in daemon.events()), 30,
             "a failing delivery")

    daemon.signal(signal.SIGINT)
    wait_for(lambda: any(e.get("event") == "daemon_stopping" for e in daemon.events()), 30, "a graceful stop")
    started = time.monotonic()
    daemon.signal(signal.SIGINT)
    assert daemon.proc is not None
    try:
        rc = daemon.proc.wait(15)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        raise AssertionError("a second Ctrl-C did not exit at once") from None
    assert rc == 130
    assert time.monotonic() - started < 15  # shutdown_timeout_secs is 120
    assert any(e.get("event") == "daemon_stop_forced" for e in daemon.events())

    blocker.unlink()  # the destination works again
    daemon.start()
    try:
        wait_for(lambda: sorted(b"".join(local_objects(out).values()).splitlines(keepends=True)) == sorted(records),
                 60, "every acknowledged record delivered after the forced exit")
    finally:
        assert daemon.stop() == 0
