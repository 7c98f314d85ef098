"""SIGHUP reloads through the CLI while a producer keeps putting: a reload that cannot be applied
never takes a running stream away, rolls back what it had switched (VersionIds included), and a
later valid reload applies."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import orjson
from botocore.config import Config

from support import Daemon, daemon_config, local_objects, stream_config, wait_for


class Producer:
    """Puts numbered records into each stream from a thread, as an SDK user would (boto3 with its
    standard retries), and records every failure a caller would see."""

    def __init__(self, daemon: Daemon, streams: list[str]) -> None:
        self.client = boto3.client(
            "firehose", endpoint_url=daemon.endpoint, region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x",
            config=Config(retries={"mode": "standard", "max_attempts": 10}),
        )
        self.streams = streams
        self.acked: dict[str, list[int]] = {s: [] for s in streams}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._n = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in self.streams:
                n = self._n
                self._n += 1
                try:
                    self.client.put_record(DeliveryStreamName=s, Record={"Data": orjson.dumps({"n": n}) + b"\n"})
                    self.acked[s].append(n)
                except Exception as exc:  # a producer-visible failure is what the test is about
                    self.failures.append(f"{s} #{n}: {exc}")
            time.sleep(0.02)

    def puts(self) -> int:
        return sum(len(v) for v in self.acked.values())

    @contextmanager
    def running(self) -> Iterator[Producer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(60)


def _version(daemon: Daemon, stream: str) -> str:
    desc = daemon.firehose().describe_delivery_stream(DeliveryStreamName=stream)
    return str(desc["DeliveryStreamDescription"]["VersionId"])


def _delivered(root: Path) -> list[int]:
    out = []
    for data in local_objects(root).values():
        out.extend(orjson.loads(line)["n"] for line in data.splitlines() if line)
    return out


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def _reload(daemon: Daemon, config: dict[str, Any], done_event: str, count_before: int) -> dict[str, Any]:
    daemon.write_config(config)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len(_events(daemon, done_event)) > count_before, 90, done_event)
    return _events(daemon, done_event)[-1]


def test_a_stream_that_fails_to_start_is_rolled_back_with_every_stream_switched_before_it(tmp_path: Path) -> None:
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    a = stream_config("a", {"type": "local", "path": str(out_a)})
    b = stream_config("b", {"type": "local", "path": str(out_b)})
    cfg = daemon_config(tmp_path, [a, b])
    daemon = Daemon(tmp_path, cfg).start()
    busy = socket.socket()  # a port another program holds: validate cannot know, start fails
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert (_version(daemon, "a"), _version(daemon, "b")) == ("1", "1")
        producer = Producer(daemon, ["a", "b"])
        with producer.running():
            wait_for(lambda: producer.puts() >= 20, 30, "the first puts")
            # "a" changes validly and is switched first (streams are applied in name order); "b"
            # gains a source whose port is taken, so its start fails and both are rolled back.
            changed_a = {**a, "buffering": {"size_mib": 1, "interval_secs": 2}}
            port = busy.getsockname()[1]
            # (the buffering change bumps b's VersionId; a source alone would not, as in Firehose)
            broken_b = {**b, "buffering": {"size_mib": 2, "interval_secs": 1},
                        "sources": [{"type": "firehose_http", "listen": f"127.0.0.1:{port}"}]}
            rejected = _reload(daemon, {**cfg, "streams": [changed_a, broken_b]}, "config_reload_rejected", 0)
            assert rejected["stream"] == "b"
            assert "address already in use" in rejected["reason"].lower()
            assert rejected["rolled_back"] == ["a", "b"]
            wait_for(lambda: len(_events(daemon, "stream_rolled_back")) >= 2, 60, "both streams rolled back")
            assert (_version(daemon, "a"), _version(daemon, "b")) == ("1", "1")
            before = producer.puts()
            wait_for(lambda: producer.puts() >= before + 20, 30, "puts after the rejected reload")

            # A later valid reload applies: the port is free now.
            busy.close()
            _reload(daemon, {**cfg, "streams": [changed_a, broken_b]}, "config_reloaded", 0)
            assert (_version(daemon, "a"), _version(daemon, "b")) == ("2", "2")
            before = producer.puts()
            wait_for(lambda: producer.puts() >= before + 20, 30, "puts after the applied reload")
        assert producer.failures == []
        acked = producer.acked
        wait_for(lambda: sorted(_delivered(out_a)) == sorted(acked["a"]), 60, "every record of a delivered")
        wait_for(lambda: sorted(_delivered(out_b)) == sorted(acked["b"]), 60, "every record of b delivered")
    finally:
        busy.close()
        assert daemon.stop() == 0


def test_a_handler_that_does_not_import_is_rejected_before_anything_stops(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lam = {"type": "lambda", "function": "handlers.identity:handler", "buffer_interval_secs": 0}
    s = stream_config("s", {"type": "local", "path": str(out)}, processing=[lam])
    cfg = daemon_config(tmp_path, [s])
    daemon = Daemon(tmp_path, cfg).start()
    try:
        producer = Producer(daemon, ["s"])
        with producer.running():
            wait_for(lambda: producer.puts() >= 10, 30, "the first puts")
            broken = {**s, "processing": [{**lam, "function": "handlers.broken_import:handler"}]}
            rejected = _reload(daemon, {**cfg, "streams": [broken]}, "config_reload_rejected", 0)
            assert any("firehose_no_such_dependency" in e for e in rejected["errors"]), rejected
            # Nothing was stopped: the running stream never restarted.
            assert _events(daemon, "stream_stopped") == []
            assert _version(daemon, "s") == "1"
            before = producer.puts()
            wait_for(lambda: producer.puts() >= before + 10, 30, "puts after the rejected reload")
            # Fixed: the next reload applies.
            fixed = {**s, "processing": [{**lam, "function": "handlers.upper:handler"}]}
            _reload(daemon, {**cfg, "streams": [fixed]}, "config_reloaded", 0)
            assert _version(daemon, "s") == "2"
        assert producer.failures == []
        wait_for(lambda: len(_delivered_any(out)) >= len(producer.acked["s"]), 60, "every record delivered")
    finally:
        assert daemon.stop() == 0


def _delivered_any(root: Path) -> list[bytes]:
    return [line for data in local_objects(root).values() for line in data.splitlines() if line]

