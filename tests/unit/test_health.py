"""What /healthz says about a stream, read from real StreamRuntimes with an injected clock; and the
destinations' start-up checks (preflight) that need no server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from firehose.api import health_report
from firehose.clock import ManualClock
from firehose.destinations.local import LocalDestinationConfig
from firehose.interfaces import BuildContext
from firehose.stream import health_message
from support import make_runtime, settle

START = "2024-05-01T12:20:00.000Z"  # ManualClock's epoch
RETRY = "{retry_initial_backoff_ms: 5, retry_max_backoff_ms: 20}"


def test_a_failing_destination_shows_its_error_and_since_when_until_a_delivery_succeeds(tmp_path: Path) -> None:
    clock = ManualClock()
    out = tmp_path / "out"
    out.write_text("a file where the destination directory should be")

    async def go() -> None:
        rt = make_runtime(tmp_path / "s", out=out, interval=0, delivery=RETRY, clock=clock)
        await rt.start()
        before = rt.status()
        assert (before["last_delivery_error"], before["failing_since"], before["oldest_pending_age_secs"]) == (
            None, None, 0.0)
        await rt.put([b"a", b"b"])
        await settle(lambda: rt.status()["last_delivery_error"] is not None)
        st = rt.status()
        err = st["last_delivery_error"]
        assert err["code"] == "Local.WriteFailed"
        assert err["destination"] == "destination"
        assert str(tmp_path) not in err["message"] and "<path>" in err["message"]  # the log has the path
        assert err["time"] == START and st["failing_since"] == START
        assert st["pending_batches"] == 1 and st["accepting_records"] is True

        clock.advance(30)
        st = rt.status()
        assert st["oldest_pending_age_secs"] == 30.0
        assert st["failing_since"] == START  # the run started at the first failed attempt
        await settle(lambda: rt.status()["last_delivery_error"]["time"] == "2024-05-01T12:20:30.000Z")
        assert health_report({"s": rt}, ready=True, degraded_after_secs=60)[1]["status"] == "ok"

        clock.advance(31)
        code, body = health_report({"s": rt}, ready=True, degraded_after_secs=60)
        assert (code, body["status"], body["streams"]["s"]["status"]) == (200, "degraded", "degraded")
        assert body["reasons"] == [
            "stream 's': delivery has been failing for 61 s (api.health.degraded_after_secs: 60)"]

        out.unlink()  # the destination comes back
        await settle(lambda: rt.delivered_records == 2)
        st = rt.status()
        assert st["failing_since"] is None and st["oldest_pending_age_secs"] == 0.0
        assert st["last_delivery_error"]["code"] == "Local.WriteFailed"  # kept for the record
        code, body = health_report({"s": rt}, ready=True, degraded_after_secs=60)
        assert (code, body["status"], body["reasons"]) == (200, "ok", [])
        await rt.stop(5)

    asyncio.run(go())


def test_status_is_starting_before_ready_and_unavailable_only_when_no_stream_accepts(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        a = make_runtime(tmp_path / "a", name="a", out=tmp_path / "out-a", interval=0, delivery=RETRY, clock=clock)
        b = make_runtime(tmp_path / "b", name="b", out=tmp_path / "out-b", interval=0, delivery=RETRY, clock=clock)
        await a.start()
        await b.start()
        assert health_report({"a": a, "b": b}, ready=False, degraded_after_secs=300)[:1] == (503,)
        assert health_report({"a": a, "b": b}, ready=False, degraded_after_secs=300)[1]["status"] == "starting"
        assert health_report({"a": a, "b": b}, ready=True, degraded_after_secs=300)[0] == 200
        await a.stop(5)  # a stream that takes no records: the daemon still serves the other
        code, body = health_report({"a": a, "b": b}, ready=True, degraded_after_secs=300)
        assert (code, body["status"]) == (200, "ok")
        assert (body["streams"]["a"]["status"], body["streams"]["b"]["status"]) == ("unavailable", "ok")
        assert body["streams"]["a"]["accepting_records"] is False
        assert body["reasons"] == ["stream 'a': not accepting records (spool at its cap, or stopping)"]
        await b.stop(5)
        code, body = health_report({"a": a, "b": b}, ready=True, degraded_after_secs=300)
        assert (code, body["status"]) == (503, "unavailable")

    asyncio.run(go())
    assert health_report({}, ready=True, degraded_after_secs=300) == (200, {"status": "ok", "reasons": [],
                                                                          "streams": {}})


def test_health_messages_name_no_url_no_path_and_stay_short() -> None:
    msg = ('EndpointConnectionError: Could not connect to the endpoint URL: '
           '"https://h.example:8443/b/k?X-Amz-Signature=abc&token=s3cr3t"')
    assert health_message(msg) == 'EndpointConnectionError: Could not connect to the endpoint URL: "<url>"'
    assert health_message("Not a directory: /var/lib/firehose/out/2024/x.tmp-1") == "Not a directory: <path>"
    assert health_message("[Errno 13] Permission denied: '/srv/out'") == "[Errno 13] Permission denied: '<path>'"
    assert health_message("1/2 of the records and/or more\nfailed") == "1/2 of the records and/or more failed"
    long = health_message("x" * 1000)
    assert len(long) == 256 and long.endswith("...")


def ctx(tmp: Path) -> BuildContext:
    return BuildContext("s", 1, "us-east-1", "000000000000", str(tmp))


def local_preflight(tmp: Path, path: Path) -> str | None:
    dest = LocalDestinationConfig(type="local", path=str(path)).build(ctx(tmp))
    return asyncio.run(dest.preflight())


def test_local_preflight_names_a_path_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert local_preflight(tmp_path, blocker) == f"path '{blocker}' is not a directory"
    assert local_preflight(tmp_path, blocker / "out") == (
        f"path '{blocker / 'out'}' cannot be created: '{blocker}' is not a directory")
    # A directory that exists is written to (and the probe removed); one that does not is not created.
    ready = tmp_path / "ready"
    ready.mkdir()
    assert local_preflight(tmp_path, ready) is None
    assert os.listdir(ready) == []
    assert local_preflight(tmp_path, tmp_path / "later" / "out") is None
    assert not (tmp_path / "later").exists()


def test_a_failed_preflight_is_a_warning_and_the_stream_runs_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("in the way")

    async def go() -> list[dict[str, Any]]:
        with capture_logs() as logs:
            rt = make_runtime(tmp_path / "s", out=out, interval=0, delivery=RETRY, clock=ManualClock())
            await rt.start()
            await settle(lambda: any(e["event"].startswith("destination_preflight") for e in logs))
            await rt.put([b"accepted all the same"])
            assert rt.status()["accepting_records"] is True
            await rt.stop(0.2)
        return logs

    logs = asyncio.run(go())
    (event,) = [e for e in logs if e["event"].startswith("destination_preflight")]
    assert event == {"event": "destination_preflight_failed", "log_level": "warning", "stream": "s",
                     "destination": "local", "role": "destination", "reason": f"path '{out}' is not a directory"}
