"""Per-stream quotas through boto3: over its quota a stream answers 503 "Slow down." for the whole
request (nothing of it stored, ThrottledRecords counted), an SDK that retries gets everything in, and a SIGHUP that changes only quotas neither restarts the stream nor bumps its
VersionId."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import boto3
import orjson
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from support import Daemon, daemon_config, local_objects, stream_config, validate_config, wait_for


def throttled(daemon: Daemon, stream: str) -> float:
    body = daemon.metrics_text()
    m = re.search(rf'^firehose_ThrottledRecords_total{{DeliveryStreamName="{stream}"}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def delivered(root: Path) -> list[int]:
    return sorted(orjson.loads(line)["n"] for data in local_objects(root).values() for line in data.splitlines())


def burst(client: object, stream: str, first: int, count: int) -> tuple[list[int], list[ClientError]]:
    """``count`` PutRecord calls as fast as one client can send them: what was acknowledged, and
    what was refused."""
    acked, refused = [], []
    for n in range(first, first + count):
        try:
            client.put_record(DeliveryStreamName=stream, Record={"Data": orjson.dumps({"n": n}) + b"\n"})  # type: ignore[attr-defined]
            acked.append(n)
        except ClientError as exc:
            refused.append(exc)
    return acked, refused


def test_a_stream_over_its_quota_answers_slow_down_whole_and_a_reload_changes_it_in_place(tmp_path: Path) -> None:
    out_q, out_free = tmp_path / "q", tmp_path / "free"
    q = stream_config("q", {"type": "local", "path": str(out_q)}, quotas={"requests_per_sec": 5})
    free = stream_config("free", {"type": "local", "path": str(out_free)})
    cfg = daemon_config(tmp_path, [q, free])
    daemon = Daemon(tmp_path, cfg).start()
    try:
        once = boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1",
                            aws_access_key_id="x", aws_secret_access_key="x",
                            config=Config(retries={"total_max_attempts": 1}))  # every 503 shows
        t0 = time.monotonic()
        acked, refused = burst(once, "q", 0, 40)
        elapsed = time.monotonic() - t0
        assert refused, "40 requests at once against 5 a second: some must be refused"
        assert len(acked) <= 5 + 5 * elapsed + 1
        for exc in refused:
            assert exc.response["Error"]["Code"] == "ServiceUnavailableException"
            assert exc.response["Error"]["Message"] == "Slow down."
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert throttled(daemon, "q") == len(refused)

        # Batches are admitted or refused whole.
        batch_refused = 0
        for i in range(10):
            records = [{"Data": orjson.dumps({"n": 1000 + 10 * i + k}) + b"\n"} for k in range(10)]
            try:
                resp = once.put_record_batch(DeliveryStreamName="q", Records=records)
                assert resp["FailedPutCount"] == 0
                acked += [1000 + 10 * i + k for k in range(10)]
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "ServiceUnavailableException"
                batch_refused += 1
        assert batch_refused > 0

        # Another stream has no quota; an SDK that retries 503s gets everything in (botocore's
        # legacy mode: its standard mode also stops when its own retry quota runs out).
        free_acked, free_refused = burst(once, "free", 0, 40)
        assert free_refused == [] and len(free_acked) == 40
        retrying = boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1",
                                aws_access_key_id="x", aws_secret_access_key="x",
                                config=Config(retries={"mode": "legacy", "max_attempts": 20}))
        more, more_refused = burst(retrying, "q", 2000, 15)
        assert more_refused == [] and len(more) == 15
        acked += more

        # A reload that changes only the quota: no restart, same VersionId, the new quota applies.
        version = once.describe_delivery_stream(DeliveryStreamName="q")["DeliveryStreamDescription"]["VersionId"]
        configured = len([e for e in daemon.events() if e.get("event") == "stream_configured"])
        daemon.write_config({**cfg, "streams": [{**q, "quotas": {"records_per_sec": 100_000}}, free]})
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reloaded" for e in daemon.events()), 60, "the reload")
        assert len([e for e in daemon.events() if e.get("event") == "stream_configured"]) == configured
        assert once.describe_delivery_stream(
            DeliveryStreamName="q")["DeliveryStreamDescription"]["VersionId"] == version
        after, after_refused = burst(once, "q", 3000, 40)
        assert after_refused == [] and len(after) == 40
        acked += after

        # Every acknowledged record once, nothing of a refused request.
        wait_for(lambda: delivered(out_q) == sorted(acked), 60, "every acknowledged record of q")
        wait_for(lambda: delivered(out_free) == sorted(free_acked), 60, "every record of free")
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("quotas", [{"records_per_sec": 0}, {"mib_per_sec": "fast"}, {"bytes": 1}])
def test_invalid_quotas_are_reported_at_their_line(tmp_path: Path, quotas: dict[str, object]) -> None:
    s = stream_config("q", {"type": "local", "path": str(tmp_path / "out")}, quotas=quotas)
    path, status, text = validate_config(tmp_path, daemon_config(tmp_path, [s]))
    assert status != 0
    assert re.search(rf"{re.escape(str(path))}:\d+: streams\[0\]\.quotas\.", text), text
