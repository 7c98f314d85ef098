"""kinesalite (npm), a Kinesis Data Streams implementation on LevelDB, for tests and benchmarks.

Installed from ``tests/kinesalite/package-lock.json`` by ``npm ci`` (``scripts/test.sh`` runs it
when ``node_modules`` is missing, and so does ``start()``); without node the tests skip.
``Kinesalite`` runs one server on a free port with its LevelDB in a temporary directory, stream
state changes (create, split, merge) taking no time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from aws_kinesis_agg.aggregator import RecordAggregator

from support import free_port, terminate

PACKAGE_DIR = Path(__file__).resolve().parent / "kinesalite"
CLI = PACKAGE_DIR / "node_modules" / "kinesalite" / "cli.js"
CREDENTIALS = {"aws_access_key_id": "AKIDKINESALITE", "aws_secret_access_key": "kinesalite-secret"}


def available() -> str | None:
    """None when a server can be started here, else why not (only a missing node)."""
    if shutil.which("node") is None:
        return "node is not installed (kinesalite, the Kinesis implementation these tests use, runs on it)"
    return None


def ensure_installed() -> None:
    """``npm ci`` from the lockfile when kinesalite is missing (scripts/test.sh does it first)."""
    if CLI.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"kinesalite is not installed and npm is missing: run `npm ci` in {PACKAGE_DIR}")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PACKAGE_DIR,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not CLI.exists():
        raise RuntimeError(f"`npm ci` in {PACKAGE_DIR} failed:\n{done.stdout}{done.stderr}")


class Kinesalite:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="firehose-kinesalite-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ensure_installed()
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen(
            ["node", str(CLI), "--port", str(self.port), "--path", str(self.dir / "db"),
             "--createStreamMs", "0", "--deleteStreamMs", "0", "--updateStreamMs", "0", "--shardLimit", "200"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_streams()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kinesalite did not start: {(self.dir / 'server.log').read_text()}") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "kinesis", endpoint_url=self.endpoint, region_name="us-east-1",
            config=Config(retries={"max_attempts": 10, "mode": "standard"}, read_timeout=60), **CREDENTIALS,
        )

    def source_config(self, stream: str, **extra: Any) -> dict[str, Any]:
        """A ``sources:`` entry reading ``stream`` from this server."""
        return {"type": "kinesis", "stream_name": stream, "endpoint_url": self.endpoint, "region": "us-east-1",
                "access_key_id": CREDENTIALS["aws_access_key_id"],
                "secret_access_key": CREDENTIALS["aws_secret_access_key"], **extra}

    def create_stream(self, name: str, shards: int) -> None:
        c = self.client()
        c.create_stream(StreamName=name, ShardCount=shards)
        self.wait_active(name)

    def wait_active(self, name: str, timeout: float = 30) -> None:
        c = self.client()
        deadline = time.monotonic() + timeout
        while c.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name} did not become ACTIVE")
            time.sleep(0.05)

    def split_first_shard(self, name: str) -> str:
        """Split the first open shard of ``name`` at the middle of its hash range; its id."""
        c = self.client()
        first = open_shards(c, name)[0]
        lo, hi = int(first["HashKeyRange"]["StartingHashKey"]), int(first["HashKeyRange"]["EndingHashKey"])
        c.split_shard(StreamName=name, ShardToSplit=first["ShardId"], NewStartingHashKey=str((lo + hi) // 2))
        self.wait_active(name)
        return str(first["ShardId"])

    def merge_children(self, name: str, parent: str) -> None:
        """Merge the two shards a split of ``parent`` made."""
        c = self.client()
        children = sorted((s for s in open_shards(c, name) if s.get("ParentShardId") == parent),
                          key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
        c.merge_shards(StreamName=name, ShardToMerge=children[0]["ShardId"], AdjacentShardToMerge=children[1]["ShardId"])
        self.wait_active(name)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Producer:
    """Puts records from a thread, one partition key after another so each key's order is the
    order of its puts: ten keys, every round alternating plain PutRecords with one KPL aggregate
    per key (five user records each). ``acked`` holds ``(key, n)`` of every acknowledged record."""

    def __init__(self, client: Any, stream: str, keys: int = 10) -> None:
        self.client, self.stream, self.keys = client, stream, keys
        self.acked: list[tuple[str, int]] = []
        self.next = dict.fromkeys((f"key-{i}" for i in range(keys)), 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    def _doc(self, key: str) -> bytes:
        n = self.next[key]
        self.next[key] = n + 1
        return orjson.dumps({"k": key, "n": n, "pad": "x" * 100}) + b"\n"

    def _round(self, aggregated: bool) -> None:
        records = []
        for key in self.next:
            if aggregated:
                agg = RecordAggregator()
                for _ in range(5):
                    agg.add_user_record(key, self._doc(key))
                pk, _, data = agg.clear_and_get().get_contents()
                records.append({"PartitionKey": pk, "Data": data})
            else:
                records.append({"PartitionKey": key, "Data": self._doc(key)})
        resp = self.client.put_records(StreamName=self.stream, Records=records)
        assert resp["FailedRecordCount"] == 0, resp  # a gap would break the per-key order checked
        for r in records:
            data = r["Data"]
            if aggregated:
                from firehose.kpl import deaggregate

                docs = [orjson.loads(u.data) for u in deaggregate(data) or []]
            else:
                docs = [orjson.loads(data)]
            self.acked.extend((d["k"], d["n"]) for d in docs)

    def _loop(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                self._round(aggregated=i % 2 == 1)
                i += 1
                time.sleep(0.02)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def open_shards(client: Any, stream: str) -> list[dict[str, Any]]:
    shards = client.list_shards(StreamName=stream)["Shards"]
    return [s for s in shards if "EndingSequenceNumber" not in s["SequenceNumberRange"]]
