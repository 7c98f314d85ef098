"""Destination conformance suite: every destination runs the same delivery, outage, crash and
replay, and shutdown cases through the daemon subprocess. Later destinations join ``KINDS``.

Every record carries a unique id; the checks are that every acknowledged id is delivered, and for
the exactly-once kinds that no id (acknowledged or not) is delivered twice. Object stores are
read back object by object; an HTTP endpoint as a receiver that keeps the records of each
request id (the last copy of a retried request), which is what deduplicating by request id gives.
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

from firehose.transforms.compression import get_codec
from support import (
    CONNECTION_LOST,
    CheckedThread,
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

KINDS = ["local", "s3", "http_endpoint", "opensearch", "opensearch_no_id", "splunk"]
OBJECT_STORES = ("local", "s3")
ID_RE = re.compile(rb"id-(\d+)-(\d+);")


@dataclass
class Target:
    """One destination under test: how to configure it, read it back and break it."""

    kind: str
    tmp: Path
    moto: MotoServer | None = None
    bucket: str = ""
    server: Any = None  # the protocol server of a destination that is not an object store

    @property
    def object_store(self) -> bool:
        return self.kind in OBJECT_STORES

    @property
    def exactly_once(self) -> bool:
        """False where a retry of a request whose answer was lost duplicates (no document ids)."""
        return self.kind not in ("opensearch_no_id", "splunk")

    @property
    def json_records(self) -> bool:
        return self.kind.startswith("opensearch")  # documents must be JSON objects

    def buffering(self, buffering: dict[str, int]) -> dict[str, int]:
        """The buffering hints within this destination's ranges (Splunk's are 1-5 MiB, 0-60 s)."""
        if self.kind != "splunk":
            return buffering
        return {"size_mib": min(buffering["size_mib"], 5), "interval_secs": min(buffering["interval_secs"], 60)}

    def stream_extra(self) -> dict[str, Any]:
        """What the stream needs besides its destination: a backup, for the kinds that require one."""
        return {} if self.object_store else {"backup": {"path": str(self.tmp / "backup")}}

    def found(self, compression: str = "none") -> Counter[tuple[int, int]]:
        """The ids delivered, counted (a destination that is not an object store keeps them decoded)."""
        return ids_in(self.objects(), compression if self.object_store else "none")

    def destination(self, compression: str = "none", **extra: Any) -> dict[str, Any]:
        if self.kind == "splunk":  # raw: each line an event
            return {"type": "splunk", "hec_endpoint": self.server.endpoint, "hec_endpoint_type": "raw",
                    "hec_token": self.server.token, "ack_poll_interval_ms": 100, "retry_duration_secs": 7200,
                    "request_timeout_secs": 10}
        if self.kind.startswith("opensearch"):
            return {"type": "opensearch", "endpoint": self.server.endpoint, "index": "conf",
                    "document_id": "no_document_id" if self.kind == "opensearch_no_id" else "firehose_default",
                    "retry_duration_secs": 7200, "request_timeout_secs": 10}
        if self.kind == "http_endpoint":
            return {"type": "http_endpoint", "url": self.server.endpoint + "/ingest", "access_key": "k",
                    "content_encoding": "gzip" if compression == "gzip" else "none",
                    "retry_duration_secs": 7200, "request_timeout_secs": 10, **extra}
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
        if self.kind.startswith("opensearch"):
            return self.server.documents()  # type: ignore[no-any-return]
        if self.kind == "splunk":
            return {str(i): event for i, event in enumerate(self.server.events())}
        if self.kind == "http_endpoint":
            with self.server.lock:
                return {rid: b"".join(self.server.requests[rid]) for rid in self.server.order}
        if self.kind == "local":
            return local_objects(self.tmp / "out")
        assert self.moto is not None
        return s3_objects(self.moto.client(), self.bucket)

    def break_destination(self) -> None:
        if not self.object_store:
            self.server.stop()
        elif self.kind == "local":
            shutil.rmtree(self.tmp / "out", ignore_errors=True)
            (self.tmp / "out").write_text("not a directory")  # every write now fails
        else:
            assert self.moto is not None
            self.moto.stop()

    def repair_destination(self) -> None:
        if not self.object_store:
            self.server.start()
        elif self.kind == "local":
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
    if request.param == "http_endpoint":
        from fakes.http_endpoint import HttpEndpointServer

        server = HttpEndpointServer(access_key="k").start()
        try:
            yield Target("http_endpoint", tmp_path, server=server)
        finally:
            server.stop()
        return
    if request.param == "splunk":
        from fakes.splunk import SplunkHecServer

        hec = SplunkHecServer().start()
        try:
            yield Target("splunk", tmp_path, server=hec)
        finally:
            hec.stop()
        return
    if request.param.startswith("opensearch"):
        from fakes.opensearch import OpenSearchServer

        cluster = OpenSearchServer().start()
        try:
            yield Target(request.param, tmp_path, server=cluster)
        finally:
            cluster.stop()
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
    """Sends PutRecordBatch calls with unique ids from a thread; remembers what was acknowledged.

    A failed check in the thread, or a lost connection the test did not announce with
    :meth:`expect_disconnect`, is raised again by :meth:`stop`."""

    def __init__(self, port: int, stream: str, run: int, batch: int = 200, pad: int = 150, pause: float = 0.0,
                 json: bool = False) -> None:
        self.port, self.stream, self.run, self.batch, self.pad = port, stream, run, batch, pad
        self.json = json
        self.pause = pause
        self.acked: set[tuple[int, int]] = set()
        self.sent: set[tuple[int, int]] = set()
        self.next = 0
        self._stop = threading.Event()
        self._killed = threading.Event()
        self._thread = CheckedThread(self._loop, name=f"loader-{run}")

    def records(self, n: int) -> tuple[list[tuple[int, int]], list[bytes]]:
        ids = [(self.run, self.next + i) for i in range(n)]
        self.next += n
        if self.json:
            return ids, [b'{"id": "id-%d-%d;", "pad": "' % i + b"p" * self.pad + b'"}\n' for i in ids]
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
            except CONNECTION_LOST:
                if self._killed.is_set():
                    return  # the daemon was killed on purpose
                raise
            if self.pause:
                time.sleep(self.pause)

    def start(self) -> Loader:
        self._thread.start()
        return self

    def expect_disconnect(self) -> None:
        """The daemon is about to be killed: from now on a lost connection ends the loop quietly."""
        self._killed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)  # raises what failed in the thread


def make_daemon(target: Target, compression: str = "none", **stream_extra: Any) -> Daemon:
    if "buffering" in stream_extra:
        stream_extra["buffering"] = target.buffering(stream_extra["buffering"])
    stream = stream_config("conf", target.destination(compression), **target.stream_extra(), **stream_extra)
    return Daemon(target.tmp, daemon_config(target.tmp, [stream]))


def assert_exactly_once(target: Target, acked: set[tuple[int, int]], compression: str = "none") -> None:
    found = target.found(compression)
    twice = {k: v for k, v in found.items() if v > 1}
    assert not twice or not target.exactly_once, f"records delivered more than once: {sorted(twice)[:10]}"
    missing = acked - set(found)
    assert not missing, f"{len(missing)} acknowledged records were not delivered, e.g. {sorted(missing)[:10]}"


# --------------------------------------------------------------------------- delivery
def _compressions(kind: str) -> list[str]:
    """What each kind compresses with: object stores all of Firehose's codecs, HTTP endpoints gzip."""
    if kind in ("local", "s3"):
        return ["none", "gzip", "snappy"]
    return ["none", "gzip"] if kind == "http_endpoint" else ["none"]


@pytest.mark.parametrize(
    ("target", "compression"), [(k, c) for k in KINDS for c in _compressions(k)], indirect=["target"]
)
def test_delivery_by_size_and_by_time(target: Target, compression: str) -> None:
    d = make_daemon(target, compression, buffering={"size_mib": 1, "interval_secs": 2}).start()
    try:
        loader = Loader(d.port, "conf", run=1, batch=500, pad=500, json=target.json_records)
        for _ in range(10):  # ~2.5 MiB: two size-triggered objects and a time-triggered rest
            assert loader.send_once() == 200
        t0 = time.monotonic()
        wait_for(lambda: loader.acked <= set(target.found(compression)), 30, "delivery")
        elapsed = time.monotonic() - t0
        objects = target.objects()
        assert len(objects) >= 3
        ext = get_codec(compression).extension
        codec = get_codec(compression if target.object_store else "none")
        for key, body in objects.items():
            if target.object_store:
                assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\d{2}/conf-1-\d{4}(-\d{2}){5}-[0-9a-f-]{36}" + re.escape(ext), key)
            assert len(codec.decompress(body)) <= 1 << 20  # size_mib honoured
        assert elapsed < 15  # the remainder went out on the 2 s interval, not at shutdown
    finally:
        assert d.stop() == 0
    assert_exactly_once(target, loader.acked, compression)


def test_records_are_concatenated_verbatim_in_arrival_order(target: Target) -> None:
    d = make_daemon(target, buffering={"size_mib": 1, "interval_secs": 1}).start()
    try:
        fh = d.firehose()
        if target.json_records:  # one document a record, each as it was sent
            fh.put_record_batch(DeliveryStreamName="conf", Records=[{"Data": b'{"v": "abc"}'}] * 3)
            wait_for(lambda: len(target.objects()) == 3, 20, "three documents")
            assert list(target.objects().values()) == [b'{"v": "abc"}'] * 3
            return
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
        loader = Loader(d.port, "conf", run=2, json=target.json_records)
        assert loader.send_once() == 200
        wait_for(lambda: loader.acked <= set(target.found()), 20, "delivery before the outage")
        before = target.objects()
        target.break_destination()
        for _ in range(5):
            assert loader.send_once() == 200  # ingest keeps acknowledging during the outage
        wait_for(lambda: sum(e.get("event") == "delivery_retry_scheduled" for e in d.events()) >= 2, 30,
                 "a second retry during the outage")
        target.repair_destination()
        wait_for(lambda: loader.acked <= set(ids_in({**before, **target.objects()})), 60, "delivery after repair")
        retries = [e for e in d.events() if e.get("event") == "delivery_retry_scheduled"]
        assert len(retries) >= 2
        assert all(e["error_code"] for e in retries)
    finally:
        assert d.stop() == 0
    found = ids_in({**before, **target.objects()})
    assert loader.acked <= set(found) and (max(found.values()) == 1 or not target.exactly_once)


def test_shutdown_during_outage_keeps_records_for_the_next_start(target: Target) -> None:
    d = make_daemon(
        target, buffering={"size_mib": 1, "interval_secs": 900},
        delivery={"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 500},
    )
    d.config["shutdown_timeout_secs"] = 3
    d.write_config(d.config)
    d.start()
    loader = Loader(d.port, "conf", run=3, json=target.json_records)
    for _ in range(3):
        assert loader.send_once() == 200
    target.break_destination()
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 15  # bounded by shutdown_timeout_secs
    target.repair_destination()
    d.start()
    try:
        wait_for(lambda: loader.acked <= set(target.found()), 60, "delivery after restart")
    finally:
        d.stop()
    assert_exactly_once(target, loader.acked)


def test_sigterm_flushes_open_buffers(target: Target) -> None:
    d = make_daemon(target, "gzip", buffering={"size_mib": 64, "interval_secs": 900}).start()
    loader = Loader(d.port, "conf", run=4, json=target.json_records)
    for _ in range(3):
        assert loader.send_once() == 200
    assert target.objects() == {}
    assert d.stop() == 0
    assert_exactly_once(target, loader.acked, "gzip")
    events = [e["event"] for e in d.events()]
    assert "daemon_stopped" in events and events.index("batch_delivered") < events.index("daemon_stopped")


# --------------------------------------------------------------------------- crash and replay
CRASHES = {"local": 12, "s3": 8, "http_endpoint": 6, "opensearch": 6, "opensearch_no_id": 4, "splunk": 4}


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
        **target.stream_extra(),
    )
    d = Daemon(target.tmp, daemon_config(target.tmp, [stream]))
    rng = random.Random(7)
    acked: set[tuple[int, int]] = set()
    sent: set[tuple[int, int]] = set()
    kills = CRASHES[target.kind]
    for run in range(kills):
        d.start()
        loader = Loader(
            d.port, "conf", run=100 + run, batch=rng.choice([50, 200, 500]), pause=0.02 if proxy else 0.0,
            json=target.json_records,
        ).start()
        time.sleep(rng.uniform(0.4, 2.0))  # load for a random while: the kill lands anywhere
        loader.expect_disconnect()
        d.kill9()
        loader.stop()
        acked |= loader.acked
        sent |= loader.sent
        assert loader.acked, "the loader got no acknowledgement before the kill"
    d.start()
    try:
        wait_for(lambda: acked <= set(target.found()), 120, "every acknowledged record")
    finally:
        assert d.stop() == 0
    found = target.found()
    assert acked <= set(found)
    assert max(found.values()) == 1 or not target.exactly_once
    assert set(found) <= sent  # nothing invented
    recovered = [e for e in d.events() if e.get("event") == "stream_recovered"]
    assert len(recovered) == kills + 1
    assert any(e["unsealed_records"] for e in recovered)
    if proxy is not None:
        proxy.close()
        assert any(e["pending_batches"] for e in recovered), "no kill landed mid-upload"
