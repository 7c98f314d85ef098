"""Dynamic partitioning through the daemon subprocess: S3 prefixes from jq and Lambda keys,
kill -9 under load, turning partitioning on by reload, and 5,000 partitions with a backlog far
larger than the memory budget."""

from __future__ import annotations

import http.client
import os
import random
import signal
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psutil

from support import (
    CONNECTION_LOST,
    CheckedThread,
    Daemon,
    MotoServer,
    SlowProxy,
    daemon_config,
    local_objects,
    raw_call,
    s3_objects,
    stream_config,
    stream_status,
    wait_for,
)

ERRORS = "errors/!{firehose:error-output-type}/"


def put_batch(port: int, stream: str, docs: list[dict[str, Any]]) -> bool:
    """One PutRecordBatch; True when every record was acknowledged."""
    import base64

    body = orjson.dumps({"DeliveryStreamName": stream,
                         "Records": [{"Data": base64.b64encode(orjson.dumps(d)).decode()} for d in docs]})
    status, doc = raw_call(port, "PutRecordBatch", body)
    return status == 200 and doc["FailedPutCount"] == 0


def lines_by_key(objects: dict[str, bytes]) -> dict[str, list[dict[str, Any]]]:
    return {k: [orjson.loads(line) for line in v.splitlines() if line] for k, v in objects.items()}


class JsonLoader:
    """Sends PutRecordBatch calls of JSON records with unique ids from a thread. A failed call,
    or a lost connection not announced by :meth:`expect_disconnect`, is raised by :meth:`stop`."""

    def __init__(self, port: int, stream: str, run: int, keys: int, batch: int) -> None:
        self.port, self.stream, self.run, self.keys, self.batch = port, stream, run, keys, batch
        self.acked: set[str] = set()
        self.next = 0
        self._stop = threading.Event()
        self._killed = threading.Event()
        self._thread = CheckedThread(self._loop, name=f"json-loader-{run}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            docs = [{"id": f"{self.run}-{self.next + i}", "customer": {"id": (self.next + i) % self.keys},
                     "pad": "x" * 200} for i in range(self.batch)]
            self.next += self.batch
            try:
                if put_batch(self.port, self.stream, docs):
                    self.acked.update(d["id"] for d in docs)
            except CONNECTION_LOST:
                if self._killed.is_set():
                    return  # the daemon was killed on purpose
                raise

    def start(self) -> JsonLoader:
        self._thread.start()
        return self

    def expect_disconnect(self) -> None:
        """The daemon is about to be killed: from now on a lost connection ends the loop quietly."""
        self._killed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)  # raises what failed in the thread


def test_kill9_under_load_keeps_every_record_in_its_partition_exactly_once(tmp_path: Path, moto: MotoServer,
                                                                             bucket: str) -> None:
    # Slow uploads make kills land between seal and commit, so replays rewrite sealed keys.
    proxy = SlowProxy(moto.port, delay=0.05)
    dest = {"type": "s3", "bucket": bucket, "endpoint_url": proxy.endpoint, "region": "us-east-1",
            "access_key_id": "x", "secret_access_key": "x",
            "prefix": "data/customer_id=!{partitionKeyFromQuery:customer_id}/!{timestamp:yyyy/MM/dd}/",
            "error_output_prefix": ERRORS}
    stream = stream_config(
        "dp", dest, buffering={"size_mib": 1, "interval_secs": 1},
        dynamic_partitioning={"enabled": True},
        processing=[{"type": "metadata_extraction", "query": "{customer_id: .customer.id}"},
                    {"type": "append_delimiter"}],
        delivery={"max_in_flight": 4, "retry_initial_backoff_ms": 50, "retry_max_backoff_ms": 500},
    )
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream]))
    rng = random.Random(11)
    acked: set[str] = set()
    try:
        for run in range(3):
            d.start()
            loader = JsonLoader(d.port, "dp", run, keys=40, batch=rng.choice([100, 300])).start()
            time.sleep(rng.uniform(1.0, 2.5))  # load for a random while: the kill lands anywhere
            loader.expect_disconnect()
            d.kill9()
            loader.stop()
            assert loader.acked, "no acknowledgement before the kill"
            acked |= loader.acked
        d.start()

        def delivered() -> Counter[str]:
            docs = lines_by_key(s3_objects(moto.client(), bucket, "data/"))
            return Counter(doc["id"] for lines in docs.values() for doc in lines)

        wait_for(lambda: acked <= set(delivered()), 120, "every acknowledged record")
    finally:
        assert d.stop() == 0
        proxy.close()
    objects = lines_by_key(s3_objects(moto.client(), bucket, "data/"))
    found = Counter(doc["id"] for lines in objects.values() for doc in lines)
    assert max(found.values()) == 1, [k for k, v in found.items() if v > 1][:10]
    for key, docs in objects.items():
        customer = int(key.split("/")[1].removeprefix("customer_id="))
        assert {doc["customer"]["id"] for doc in docs} == {customer}, key
        for run in {doc["id"].split("-")[0] for doc in docs}:  # each producer's order is kept
            seq = [int(doc["id"].split("-")[1]) for doc in docs if doc["id"].startswith(run + "-")]
            assert seq == sorted(seq), key
    recovered = [e for e in d.events() if e.get("event") == "stream_recovered"]
    assert len(recovered) == 4
    assert not s3_objects(moto.client(), bucket, "errors/")


HANDLER = '''
import base64, json

def tag_region(event, context):
    out = []
    for r in event["records"]:
        doc = json.loads(base64.b64decode(r["data"]))
        region = "eu" if doc["country"] in ("DE", "FR") else "us"
        out.append({"recordId": r["recordId"], "result": "Ok", "data": r["data"],
                    "metadata": {"partitionKeys": {"region": region}}})
    return {"records": out}
'''


def test_lambda_keys_and_query_keys_build_the_prefix_together(tmp_path: Path) -> None:
    (tmp_path / "dp_handlers.py").write_text(textwrap.dedent(HANDLER))
    dest = {"type": "local", "path": str(tmp_path / "out"), "error_output_prefix": ERRORS,
            "prefix": "region=!{partitionKeyFromLambda:region}/country=!{partitionKeyFromQuery:country}/"}
    stream = stream_config(
        "dp", dest, buffering={"size_mib": 1, "interval_secs": 1}, dynamic_partitioning={"enabled": True},
        processing=[{"type": "lambda", "function": "dp_handlers:tag_region", "buffer_interval_secs": 0},
                    {"type": "metadata_extraction", "query": "{country: .country}"},
                    {"type": "append_delimiter"}],
    )
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream]), env={"PYTHONPATH": str(tmp_path)}).start()
    try:
        desc = d.firehose().describe_delivery_stream(DeliveryStreamName="dp")["DeliveryStreamDescription"]
        ext = desc["Destinations"][0]["ExtendedS3DestinationDescription"]
        assert ext["DynamicPartitioningConfiguration"] == {"Enabled": True, "RetryOptions": {"DurationInSeconds": 300}}
        assert [p["Type"] for p in ext["ProcessingConfiguration"]["Processors"]] == [
            "Lambda", "MetadataExtraction", "AppendDelimiterToRecord"]
        assert ext["ProcessingConfiguration"]["Processors"][1]["Parameters"] == [
            {"ParameterName": "MetadataExtractionQuery", "ParameterValue": "{country: .country}"},
            {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"}]
        docs = [{"n": i, "country": c} for i, c in enumerate(["DE", "US", "FR", "DE", "CA", "US"])]
        assert put_batch(d.port, "dp", docs)
        wait_for(lambda: sum(len(v) for v in lines_by_key(local_objects(tmp_path / "out")).values()) == 6
                 if (tmp_path / "out").exists() else False, 60, "six records")
    finally:
        assert d.stop() == 0
    got = {tuple(k.split("/")[:2]): sorted(doc["n"] for doc in v)
           for k, v in lines_by_key(local_objects(tmp_path / "out")).items()}
    assert got == {
        ("region=eu", "country=DE"): [0, 3],
        ("region=eu", "country=FR"): [2],
        ("region=us", "country=US"): [1, 5],
        ("region=us", "country=CA"): [4],
    }


def test_reload_turns_partitioning_on_without_losing_buffered_records(tmp_path: Path) -> None:
    plain = stream_config("s", {"type": "local", "path": str(tmp_path / "out"), "prefix": "plain/"},
                          buffering={"size_mib": 5, "interval_secs": 300}, processing=[{"type": "append_delimiter"}])
    config = daemon_config(tmp_path, [plain])
    d = Daemon(tmp_path, config).start()
    try:
        assert put_batch(d.port, "s", [{"n": i, "c": i % 3} for i in range(30)])  # buffered for 300 s
        wait_for(lambda: stream_status(d.port, "s")["open_buffer_records"] == 30, 20, "the records in the buffer")
        assert not local_objects(tmp_path / "out")
        partitioned = stream_config(
            "s", {"type": "local", "path": str(tmp_path / "out"), "prefix": "c=!{partitionKeyFromQuery:c}/",
                  "error_output_prefix": ERRORS},
            buffering={"size_mib": 5, "interval_secs": 1}, dynamic_partitioning={"enabled": True},
            processing=[{"type": "metadata_extraction", "query": "{c: .c}"}, {"type": "append_delimiter"}])
        d.write_config({**config, "streams": [partitioned]})
        d.signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reloaded" for e in d.events()), 30, "the reload")
        assert put_batch(d.port, "s", [{"n": 100 + i, "c": i % 3} for i in range(30)])
        wait_for(lambda: len(local_objects(tmp_path / "out")) >= 4, 30, "the partitioned objects")
    finally:
        assert d.stop() == 0
    objects = lines_by_key(local_objects(tmp_path / "out"))
    before = [doc["n"] for k, docs in objects.items() if k.startswith("plain/") for doc in docs]
    assert before == list(range(30))  # sealed under the old config when the stream restarted
    after = {k.split("/")[0]: sorted(doc["n"] for doc in docs) for k, docs in objects.items()
             if not k.startswith("plain/")}
    assert after == {f"c={c}": [100 + i for i in range(30) if i % 3 == c] for c in range(3)}


def test_5000_partitions_and_a_backlog_far_larger_than_the_budget(tmp_path: Path) -> None:
    """A destination outage piles up 160 MiB behind 5,000 partitions with an 8 MiB budget: the
    daemon's memory stays bounded while the backlog waits and drains, and every record arrives
    once, in its partition. FIREHOSE_DP_BACKLOG_MIB and FIREHOSE_DP_BUDGET_MIB scale it up (for
    instance 1024 and 64) outside CI."""
    backlog_mib = int(os.environ.get("FIREHOSE_DP_BACKLOG_MIB", "160"))
    budget_mib = int(os.environ.get("FIREHOSE_DP_BUDGET_MIB", "8"))
    out = tmp_path / "out"
    out.write_text("not a directory: every delivery fails until this file is removed")
    dest = {"type": "local", "path": str(out), "prefix": "k=!{partitionKeyFromQuery:k}/",
            "error_output_prefix": ERRORS}
    stream = stream_config(
        "big", dest, buffering={"size_mib": 5, "interval_secs": 5},
        dynamic_partitioning={"enabled": True, "max_active_partitions": 5000, "memory_budget_mib": budget_mib},
        processing=[{"type": "metadata_extraction", "query": "{k: .k}"}, {"type": "append_delimiter"}],
        delivery={"max_in_flight": 8, "retry_initial_backoff_ms": 200, "retry_max_backoff_ms": 1000},
        spool={"max_size_mib": max(1024, 2 * backlog_mib)},
    )
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    baseline = proc.memory_info().rss
    peak = [baseline]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = CheckedThread(sample, name="rss-sampler")
    sampler.start()
    n, pad = backlog_mib * 1000, "p" * 1000
    try:
        for start in range(0, n, 500):
            docs = [{"i": i, "k": str(i % 5000), "pad": pad} for i in range(start, start + 500)]
            assert put_batch(d.port, "big", docs)
        spool = sum(p.stat().st_size for p in (tmp_path / "data" / "spool" / "big").rglob("*") if p.is_file())
        assert spool > (backlog_mib - 10) << 20  # the backlog is on disk
        loaded = time.monotonic()
        out.unlink()  # the destination is back

        def delivered() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
            conn.close()
            return int(orjson.loads(body)["streams"]["big"]["delivered_records"]) if status == 200 else 0

        wait_for(lambda: delivered() == n, 150 * max(1, backlog_mib // 160), "the backlog to drain")
        drained = time.monotonic() - loaded
    finally:
        sampling.set()
        try:
            sampler.join(5)  # raises what failed in the sampler
        finally:
            assert d.stop() == 0
    growth = (peak[0] - baseline) >> 20
    objects = local_objects(tmp_path / "out")
    print(f"RSS {baseline >> 20} MiB at start, peak {peak[0] >> 20} MiB (+{growth} MiB) for a {backlog_mib} MiB "
          f"backlog and a {budget_mib} MiB budget; "
          f"drained in {drained:.1f} s into {len(objects)} objects")
    # The budget, the spools' fixed read caches and the pending batches; not the backlog
    # (two spool read caches of 64 and 16 MiB, the budget, up to max_in_flight + 1 pending batches)
    assert growth < 100 + 2 * budget_mib, f"RSS grew by {growth} MiB: {backlog_mib} MiB backlog, {budget_mib} MiB budget"
    seen = bytearray(n)
    for key, body in objects.items():
        part = key.split("/")[0].removeprefix("k=")
        for line in body.splitlines():
            doc = orjson.loads(line)
            assert doc["k"] == part
            seen[doc["i"]] += 1
    assert seen == bytearray([1]) * n
