"""Destination conformance suite: every destination runs the same delivery, outage, crash and
replay, and shutdown cases through the daemon subprocess. Later destinations join ``KINDS``.

Every record carries a unique id; the checks are that every acknowledged id is delivered exactly
once, and no id (acknowledged or not) is delivered twice.
"""

from __future__ import annotations

import http.client
import random
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from support import (
    Daemon,
    MotoServer,
    SlowProxy,
    batch_body,
    daemon_config,
    local_objects,
    s3_objects,
    stream_config,
    wait_for,
)
from transforms.compression import get_codec

KINDS = ["local", "s3"]
ID_RE = re.compile(rb"id-(\d+)-(\d+);")


@dataclass
class Target:
    """One destination under test: how to configure it, read it back and break it."""

    kind: str
    tmp: Path
    moto: MotoServer | None = None
    bucket: str = ""

    def destination(self, compression: str = "none", **extra: Any) -> dict[str, Any]:
        if self.kind == "local":
            return {"type": "local", "path": str(self.tmp / "out"), "compression": compression, **extra}
        assert self.moto is not None
        return {
            "type": "s3",
            "bucket": self.bucket,
            "endpoint_url": self.moto.endpoint,
            "region": "us-east-1",
            "access_key_id": "x",
            "secret_access_key": "x",
            "compression": compression,
            "connect_timeout_secs": 2,
            "read_timeout_secs": 10,
            **extra,
        }

    def objects(self) -> dict[str, bytes]:
        if self.kind == "local":
            return local_objects(self.tmp / "out")
        assert self.moto is not None
        return s3_objects(self.moto.client(), self.bucket)

    def break_destination(self) -> None:
        if self.kind == "local":
            shutil.rmtree(self.tmp / "out", ignore_errors=True)
            (self.tmp / "out").write_text("not a directory")  # every write now fails
        else:
            assert self.moto is not None
            self.moto.stop()

    def repair_destination(self) -> None:
        if self.kind == "local":
            (self.tmp / "out").unlink()
        else:
            assert self.moto is not None
            self.moto.start()
            self.moto.client().create_bucket(Bucket=self.bucket)


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        yield Target("local", tmp_path)
        return
    moto = MotoServer()  # a server of its own: outage tests stop and restart it
    moto.start()
    moto.client().create_bucket(Bucket="conformance")
    try:
        yield Target("s3", tmp_path, moto, "conformance")
    finally:
        moto.stop()


def ids_in(objects: dict[str, bytes], compression: str = "none") -> Counter[tuple[int, int]]:
    codec = get_codec(compression)
    found: Counter[tuple[int, int]] = Counter()
    for body in objects.values():
        for m in ID_RE.finditer(codec.decompress(body)):
            found[(int(m.group(1)), int(m.group(2)))] += 1
    return found


class Loader:
    """Sends PutRecordBatch calls with unique ids from a thread; remembers what was acknowledged."""

    def __init__(self, port: int, stream: str, run: int, batch: int = 200, pad: int = 150, pause: float = 0.0) -> None:
        self.port, self.stream, self.run, self.batch, self.pad = port, stream, run, batch, pad
        self.pause = pause
        self.acked: set[tuple[int, int]] = set()
        self.sent: set[tuple[int, int]] = set()
        self.next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def records(self, n: int) -> tuple[list[tuple[int, int]], list[bytes]]:
        ids = [(self.run, self.next + i) for i in range(n)]
        self.next += n
        return ids, [b"id-%d-%d;" % i + b"p" * self.pad + b"\n" for i in ids]

    def send_once(self, n: int | None = None) -> int:
        ids, recs = self.records(n or self.batch)
        self.sent.update(ids)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/", body=batch_body(self.stream, recs), headers={
                "X-Amz-Target": "Firehose_20150804.PutRecordBatch",
                "Content-Type": "application/x-amz-json-1.1",
            })
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 200:
            doc = orjson.loads(body)
            assert doc["FailedPutCount"] == 0
            assert len(doc["RequestResponses"]) == len(ids)
            self.acked.update(ids)
        return resp.status

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_once()
            except OSError:
                return  # the daemon was killed
            if self.pause:
                time.sleep(self.pause)

    def start(self) -> Loader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def make_daemon(target: Target, compression: str = "none", **stream_extra: Any) -> Daemon:
    stream = stream_config("conf", target.destination(compression), **stream_extra)
    return Daemon(target.tmp, daemon_config(target.tmp, [stream]))


def assert_exactly_once(target: Target, acked: set[tuple[int, int]], compression: str = "none") -> None:
    found = ids_in(target.objects(), compression)
    twice = {k: v for k, v in found.items() if v > 1}
    assert not twice, f"records delivered more than once: {sorted(twice)[:10]}"
    missing = acked - set(found)
    assert not missing, f"{len(missing)} acknowledged records were not delivered, e.g. {sorted(missing)[:10]}"


# --------------------------------------------------------------------------- delivery
@pytest.mark.parametrize("compression", ["none", "gzip", "snappy"])
def test_delivery_by_size_and_by_time(target: Target, compression: str) -> None:
    d = make_daemon(target, compression, buffering={"size_mib": 1, "interval_secs": 2}).start()
    try:
        loader = Loader(d.port, "conf", run=1, batch=500, pad=500)
        for _ in range(10):  # ~2.5 MiB: two size-triggered objects and a time-triggered rest
            assert loader.send_once() == 200
        t0 = time.monotonic()
        wait_for(lambda: loader.acked <= set(ids_in(target.objects(), compression)), 30, "delivery")
        elapsed = time.monotonic() - t0
        objects = target.objects()
        assert len(objects) >= 3
        ext = get_codec(compression).extension
        for key, body in objects.items():
            assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\d{2}/conf-1-\d{4}(-\d{2}){5}-[0-9a-f-]{36}" + re.escape(ext), key)
            assert len(get_codec(compression).decompress(body)) <= 1 << 20  # size_mib honoured
        assert elapsed < 15  # the remainder went out on the 2 s interval, not at shutdown
    finally:
        assert d.stop() == 0
    assert_exactly_once(target, loader.acked, compression)


def test_records_are_concatenated_verbatim_in_arrival_order(target: Target) -> None:
    d = make_daemon(target, buffering={"size_mib": 1, "interval_secs": 1}).start()
    try:
        fh = d.firehose()
        fh.put_record_batch(DeliveryStreamName="conf", Records=[{"Data": b"abc"}] * 3)
        wait_for(lambda: len(target.objects()) == 1, 20, "one object")
        assert list(target.objects().values()) == [b"abcabcabc"]
    finally:
        d.stop()


# --------------------------------------------------------------------------- outage
def test_outage_is_retried_until_the_destination_returns(target: Target) -> None:
    d = make_daemon(
        target, buffering={"size_mib": 1, "interval_secs": 1},
        delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 1000},
    ).start()
    try:
        loader = Loader(d.port, "conf", run=2)
        assert loader.send_once() == 200
        wait_for(lambda: loader.acked <= set(ids_in(target.objects())), 20, "delivery before the outage")
        before = target.objects()
        target.break_destination()
        for _ in range(5):
            assert loader.send_once() == 200  # ingest keeps acknowledging during the outage
        wait_for(lambda: any(e.get("event") == "delivery_retry_scheduled" for e in d.events()), 30, "retries")
        time.sleep(2)
        target.repair_destination()
        wait_for(lambda: loader.acked <= set(ids_in({**before, **target.objects()})), 60, "delivery after repair")
        retries = [e for e in d.events() if e.get("event") == "delivery_retry_scheduled"]
        assert len(retries) >= 2
        assert all(e["error_code"] for e in retries)
    finally:
        assert d.stop() == 0
    found = ids_in({**before, **target.objects()})
    assert loader.acked <= set(found) and max(found.values()) == 1


def test_shutdown_during_outage_keeps_records_for_the_next_start(target: Target) -> None:
    d = make_daemon(
        target, buffering={"size_mib": 1, "interval_secs": 900},
        delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 500},
    )
    d.config["shutdown_timeout_secs"] = 3
    d.write_config(d.config)
    d.start()
    loader = Loader(d.port, "conf", run=3)
    for _ in range(3):
        assert loader.send_once() == 200
    target.break_destination()
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 15  # bounded by shutdown_timeout_secs
    target.repair_destination()
    d.start()
    try:
        wait_for(lambda: loader.acked <= set(ids_in(target.objects())), 60, "delivery after restart")
    finally:
        d.stop()
    assert_exactly_once(target, loader.acked)


def test_sigterm_flushes_open_buffers(target: Target) -> None:
    d = make_daemon(target, "gzip", buffering={"size_mib": 64, "interval_secs": 900}).start()
    loader = Loader(d.port, "conf", run=4)
    for _ in range(3):
        assert loader.send_once() == 200
    assert target.objects() == {}
    assert d.stop() == 0
    assert_exactly_once(target, loader.acked, "gzip")
    events = [e["event"] for e in d.events()]
    assert "daemon_stopped" in events and events.index("batch_delivered") < events.index("daemon_stopped")


# --------------------------------------------------------------------------- crash and replay
CRASHES = {"local": 12, "s3": 8}


def test_kill9_under_load_loses_and_duplicates_nothing(target: Target) -> None:
    proxy = None
    extra: dict[str, Any] = {}
    if target.kind == "s3":
        # Slow uploads make kills land between seal and commit, so replays overwrite sealed keys.
        assert target.moto is not None
        proxy = SlowProxy(target.moto.port, delay=0.1)
        extra = {"endpoint_url": proxy.endpoint}
    stream = stream_config(
        "conf", {**target.destination(), **extra}, buffering={"size_mib": 1, "interval_secs": 1},
        delivery={"max_in_flight": 3, "retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 500},
    )
    d = Daemon(target.tmp, daemon_config(target.tmp, [stream]))
    rng = random.Random(7)
    acked: set[tuple[int, int]] = set()
    sent: set[tuple[int, int]] = set()
    kills = CRASHES[target.kind]
    for run in range(kills):
        d.start()
        loader = Loader(
            d.port, "conf", run=100 + run, batch=rng.choice([50, 200, 500]), pause=0.02 if proxy else 0.0
        ).start()
        time.sleep(rng.uniform(0.4, 2.0))
        d.kill9()
        loader.stop()
        acked |= loader.acked
        sent |= loader.sent
        assert loader.acked, "the loader got no acknowledgement before the kill"
    d.start()
    try:
        wait_for(lambda: acked <= set(ids_in(target.objects())), 120, "every acknowledged record")
    finally:
        assert d.stop() == 0
    found = ids_in(target.objects())
    assert acked <= set(found)
    assert max(found.values()) == 1
    assert set(found) <= sent  # nothing invented
    recovered = [e for e in d.events() if e.get("event") == "stream_recovered"]
    assert len(recovered) == kills + 1
    assert any(e["unsealed_records"] for e in recovered)
    if proxy is not None:
        proxy.close()
        assert any(e["pending_batches"] for e in recovered), "no kill landed mid-upload"
