"""The Kinesis source's config rules, and its reading logic against a scripted in-memory Kinesis
(faults on demand: throttling, expired iterators, an unreachable endpoint, trimmed checkpoints)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from pydantic import BaseModel

from firehose import registry
from firehose.config import ConfigError, load_config_text
from firehose.interfaces import BuildContext
from firehose.kpl import aggregate
from firehose.metrics import Metrics
from firehose.sources.kinesis import KinesisSource, KinesisSourceConfig
from firehose.spool import SpoolFullError

# ---------------------------------------------------------------------------------------------- config


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    return info.value.errors


def stream_with(source: str) -> str:
    return (
        "streams:\n"
        "  - name: from-kds\n"
        "    sources:\n"
        f"{source}"
        "    destination: {type: local, path: /x}\n"
    )


KINESIS = "      - type: kinesis\n        stream_name: clickstream\n"


def test_a_kinesis_source_makes_a_kinesis_stream_as_source_stream() -> None:
    cfg = load_config_text(stream_with(KINESIS + "        initial_position: trim_horizon\n"), "f.yaml", {})
    s = cfg.streams[0]
    (src,) = s.sources
    assert isinstance(src, KinesisSourceConfig)
    assert (s.stream_type, src.name, src.initial_position, src.poll_interval_ms) == (
        "KinesisStreamAsSource", "clickstream", "trim_horizon", 1000)
    assert load_config_text(stream_with("      []\n").replace("sources:\n      []", "sources: []"), "f.yaml",
                            {}).streams[0].stream_type == "DirectPut"


def test_stream_arn_gives_the_name_and_region() -> None:
    arn = "arn:aws:kinesis:eu-west-1:123456789012:stream/clicks"
    cfg = load_config_text(stream_with(f"      - type: kinesis\n        stream_arn: {arn}\n"), "f.yaml", {})
    src = cfg.streams[0].sources[0]
    assert (src.name, src.region_for("us-east-1"), src.arn_for("us-east-1", "000000000000")) == (
        "clicks", "eu-west-1", arn)


def test_sources_do_not_change_the_version_fingerprint() -> None:
    plain = load_config_text(stream_with("      []\n").replace("sources:\n      []", "sources: []"), "f.yaml", {})
    kds = load_config_text(stream_with(KINESIS), "f.yaml", {})
    assert plain.streams[0].fingerprint() == kds.streams[0].fingerprint()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (KINESIS + "        stream_nme: x\n", "f.yaml:6: streams[0].sources[0].stream_nme: unknown field"),
        ("      - type: kinesis\n        region: us-east-1\n",
         "f.yaml:4: streams[0].sources[0].stream_name: required field is missing (or give stream_arn)"),
        (KINESIS + "        initial_position: at_timestamp\n",
         "f.yaml:4: streams[0].sources[0].timestamp: required when initial_position is at_timestamp"),
        (KINESIS + "        timestamp: 2024-05-01T00:00:00Z\n",
         "f.yaml:6: streams[0].sources[0].timestamp: is only used with initial_position: at_timestamp "
         "(initial_position is latest)"),
        (KINESIS + "        initial_position: at_timestamp\n        timestamp: '2024-05-01T00:00:00'\n",
         "f.yaml:7: streams[0].sources[0].timestamp: must include a time zone, such as 2024-05-01T00:00:00Z, "
         "got '2024-05-01T00:00:00'"),
        (KINESIS + "        max_records_per_call: 20000\n",
         "f.yaml:6: streams[0].sources[0].max_records_per_call: input should be less than or equal to 10000, "
         "got 20000"),
        ("      - type: kinesis\n        stream_arn: arn:aws:kinesis:us-east-1:1:stream/x\n",
         "f.yaml:5: streams[0].sources[0].stream_arn: must be arn:aws:kinesis:<region>:<12-digit account>:"
         "stream/<name>, got 'arn:aws:kinesis:us-east-1:1:stream/x'"),
        (KINESIS + "        endpoint_url: localhost:4567\n",
         "f.yaml:6: streams[0].sources[0].endpoint_url: must be an http:// or https:// URL, got 'localhost:4567'"),
        ("      - type: kinesys\n        stream_name: x\n",
         "f.yaml:4: streams[0].sources[0].type: unknown type 'kinesys'; known: file, firehose_http, kinesis"),
        (KINESIS + KINESIS,
         "f.yaml:4: streams[0].sources[0]: a kinesis source cannot be mixed with other sources "
         "(Firehose's KinesisStreamAsSource stream has exactly one source)"),
    ],
)
def test_source_config_errors_name_file_line_and_field(source: str, expected: str) -> None:
    assert config_errors(stream_with(source)) == [expected]


class OtherSourceConfig(BaseModel):
    """A stand-in for another source type (a file tailer, say)."""

    stream_type: ClassVar[str] = "DirectPut"
    exclusive: ClassVar[bool] = False
    type: Literal["tail"]
    path: str


def test_a_kinesis_source_cannot_be_mixed_with_another_source_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN_SOURCES, "tail", f"{__name__}:OtherSourceConfig")
    errs = config_errors(stream_with("      - {type: tail, path: /var/log/x}\n" + KINESIS))
    assert errs == ["f.yaml:5: streams[0].sources[1]: a kinesis source cannot be mixed with other sources "
                    "(Firehose's KinesisStreamAsSource stream has exactly one source)"]


# ---------------------------------------------------------------------------------------------- reading


def client_error(code: str, op: str, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message or code}}, op)


class FakeKinesis:
    """An in-memory Kinesis stream with the consumer API's semantics. ``faults[op]`` lists
    exceptions raised by the next calls of ``op``, in order."""

    def __init__(self) -> None:
        self.shards: dict[str, dict[str, Any]] = {}
        self.faults: dict[str, list[Exception]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._seq = 1000
        self.trimmed_before: int | None = None  # sequence numbers below this are past retention

    def add_shard(self, shard_id: str, parent: str | None = None, adjacent: str | None = None) -> None:
        self.shards[shard_id] = {"records": [], "closed": False, "parent": parent, "adjacent": adjacent}

    def put(self, shard_id: str, data: bytes, pk: str = "k") -> str:
        self._seq += 1
        rec = {"SequenceNumber": str(self._seq), "Data": data, "PartitionKey": pk,
               "ApproximateArrivalTimestamp": datetime.fromtimestamp(1_700_000_000 + self._seq, tz=UTC)}
        self.shards[shard_id]["records"].append(rec)
        return str(self._seq)

    def _fault(self, op: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((op, kwargs))
        pending = self.faults.get(op)
        if pending:
            raise pending.pop(0)

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        self._fault("list_shards", kwargs)
        out = []
        for sid, s in self.shards.items():
            item: dict[str, Any] = {"ShardId": sid}
            if s["parent"]:
                item["ParentShardId"] = s["parent"]
            if s["adjacent"]:
                item["AdjacentParentShardId"] = s["adjacent"]
            out.append(item)
        return {"Shards": out}

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        self._fault("get_shard_iterator", kwargs)
        sid, kind = kwargs["ShardId"], kwargs["ShardIteratorType"]
        records = self.shards[sid]["records"]
        seqs = [int(r["SequenceNumber"]) for r in records]
        if kind == "TRIM_HORIZON":
            index = 0 if self.trimmed_before is None else sum(1 for s in seqs if s < self.trimmed_before)
        elif kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            seq = int(kwargs["StartingSequenceNumber"])
            if self.trimmed_before is not None and seq < self.trimmed_before:
                raise client_error("InvalidArgumentException", "GetShardIterator",
                                   f"StartingSequenceNumber {seq} used in GetShardIterator is no longer valid")
            index = seqs.index(seq) + (kind == "AFTER_SEQUENCE_NUMBER")
        elif kind == "AT_TIMESTAMP":
            ts = kwargs["Timestamp"]
            index = next((i for i, r in enumerate(records) if r["ApproximateArrivalTimestamp"] >= ts), len(records))
        else:
            index = len(records)
        return {"ShardIterator": f"{sid}|{index}"}

    def get_records(self, **kwargs: Any) -> dict[str, Any]:
        self._fault("get_records", kwargs)
        sid, _, index = kwargs["ShardIterator"].partition("|")
        shard = self.shards[sid]
        records = shard["records"][int(index) : int(index) + kwargs["Limit"]]
        end = int(index) + len(records)
        resp: dict[str, Any] = {"Records": records, "MillisBehindLatest": 0 if end == len(shard["records"]) else 1}
        if not (shard["closed"] and end == len(shard["records"])):
            resp["NextShardIterator"] = f"{sid}|{end}"
        return resp


class FakeSink:
    """What a StreamRuntime offers a source, recording every frame."""

    def __init__(self, positions: dict[str, Any] | None = None) -> None:
        self.metrics = Metrics()
        self.max_size_bytes = 1 << 30
        self.accepting = True
        self.positions: dict[str, Any] = dict(positions or {})
        self.room = True
        self.frame_limit: int | None = None  # the spool is full once it holds this many frames
        self.refusals = 0  # has_room calls answered False
        self.frames: list[tuple[list[bytes], list[Any] | None, dict[str, Any] | None]] = []

    def _full(self) -> bool:
        return not self.room or (self.frame_limit is not None and len(self.frames) >= self.frame_limit)

    def has_room(self, nbytes: int) -> bool:
        if not self._full() and nbytes <= self.max_size_bytes:
            return True
        self.refusals += 1
        return False

    async def put(self, records: list[bytes], arrival_ms: int | None = None, *, nbytes: int | None = None,
                  meta: list[Any] | None = None, positions: dict[str, Any] | None = None) -> int:
        if self._full():
            raise SpoolFullError("full")
        self.frames.append((list(records), meta, positions))
        self.positions.update(positions or {})
        return 0

    @property
    def records(self) -> list[bytes]:
        return [r for recs, _, _ in self.frames for r in recs]

    @property
    def metas(self) -> list[Any]:
        return [m for _, metas, _ in self.frames for m in (metas or [])]


def make_source(kinesis: FakeKinesis, sink: FakeSink, **extra: Any) -> KinesisSource:
    cfg = KinesisSourceConfig.model_validate({
        "type": "kinesis", "stream_name": "s", "initial_position": "trim_horizon", "poll_interval_ms": 200,
        "retry_initial_backoff_ms": 1, "retry_max_backoff_ms": 2, **extra})
    ctx = BuildContext("fh", 1, "us-east-1", "000000000000", "/nonexistent")
    return KinesisSource(cfg, ctx, sink, rng=random.Random(1), client=kinesis)  # type: ignore[arg-type]


async def run_until(source: KinesisSource, done: Any, timeout: float = 10.0) -> None:
    await source.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)
    finally:
        await source.stop()


def metric(sink: FakeSink, name: str) -> float:
    value = sink.metrics.registry.get_sample_value(name, {"DeliveryStreamName": "fh"})
    return value or 0.0


def test_kpl_aggregates_are_deaggregated_with_kinesis_metadata_and_checkpoint() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    plain = k.put("shardId-0", b"plain", "p")
    agg = k.put("shardId-0", aggregate([("a", b"u0"), ("b", b"u1"), ("a", b"u2")]), "a")
    sink = FakeSink()
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 4))
    assert sink.records == [b"plain", b"u0", b"u1", b"u2"]
    meta = [m["kinesis"] for m in sink.metas]
    assert [(m["partitionKey"], m["sequenceNumber"], m["subsequenceNumber"]) for m in meta] == [
        ("p", plain, 0), ("a", agg, 0), ("b", agg, 1), ("a", agg, 2)]
    assert meta[1]["shardId"] == "shardId-0"
    assert meta[1]["approximateArrivalTimestamp"] == (1_700_000_000 + int(agg)) * 1000
    assert sink.positions["kinesis/s/shardId-0"] == {"seq": agg, "sub": 2, "whole": True}
    assert metric(sink, "firehose_DataReadFromKinesisStream_Records_total") == 2


def test_a_damaged_aggregate_is_kept_whole_with_its_error() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    good = aggregate([("a", b"u0")])
    k.put("shardId-0", good[:-1] + bytes([good[-1] ^ 1]), "a")  # MD5 trailer off by one bit
    sink = FakeSink()
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 1))
    (meta,) = sink.metas
    assert meta["err"]["c"] == "Kinesis.KplDeaggregationFailed" and meta["err"]["t"] == "processing-failed"
    assert "MD5" in meta["err"]["m"]
    assert metric(sink, "firehose_KinesisKplDeaggregationFailed_total") == 1


def test_throttling_expiry_and_an_unreachable_endpoint_are_retried_without_loss() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    for i in range(5):
        k.put("shardId-0", f"r{i}".encode())
    k.faults = {
        "list_shards": [EndpointConnectionError(endpoint_url="http://kinesis")],
        "get_shard_iterator": [client_error("ProvisionedThroughputExceededException", "GetShardIterator")],
        "get_records": [client_error("ProvisionedThroughputExceededException", "GetRecords"),
                        client_error("ExpiredIteratorException", "GetRecords")],
    }
    sink = FakeSink()
    asyncio.run(run_until(make_source(k, sink, max_records_per_call=2), lambda: len(sink.records) == 5))
    assert sink.records == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert metric(sink, "firehose_ThrottledGetRecords_total") == 1
    assert metric(sink, "firehose_ThrottledGetShardIterator_total") == 1


def test_children_are_read_only_after_their_parents_are_finished() -> None:
    k = FakeKinesis()
    for sid in ("shardId-0", "shardId-1"):
        k.add_shard(sid)
    k.put("shardId-0", b"p0-a")
    k.put("shardId-1", b"p1-a")
    k.shards["shardId-0"]["closed"] = True
    k.add_shard("shardId-2", parent="shardId-0")  # a split of shard 0 ...
    k.put("shardId-2", b"c2")
    k.shards["shardId-2"]["closed"] = True
    k.shards["shardId-1"]["closed"] = True
    k.add_shard("shardId-3", parent="shardId-2", adjacent="shardId-1")  # ... merged with shard 1
    k.put("shardId-3", b"c3")
    sink = FakeSink()
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 4))
    order = sink.records
    assert order.index(b"p0-a") < order.index(b"c2") < order.index(b"c3")
    assert order.index(b"p1-a") < order.index(b"c3")
    # A parent's end is recorded before any of its children's records.
    done_at = {next(iter(p)): i for i, (_, _, p) in enumerate(sink.frames) if p and "done" in next(iter(p.values()))}
    first_of = {r: i for i, (recs, _, _) in enumerate(sink.frames) for r in recs}
    assert done_at["kinesis/s/shardId-0"] < first_of[b"c2"] and done_at["kinesis/s/shardId-2"] < first_of[b"c3"]
    assert done_at["kinesis/s/shardId-1"] < first_of[b"c3"]


def test_a_partly_spooled_aggregate_resumes_at_the_next_user_record() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    seq = k.put("shardId-0", aggregate([("a", b"u0"), ("a", b"u1"), ("a", b"u2")]))
    k.put("shardId-0", b"after")
    sink = FakeSink({"kinesis/s/shardId-0": {"seq": seq, "sub": 1, "whole": False}})
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 2))
    assert sink.records == [b"u2", b"after"]
    assert ("get_shard_iterator", {"StreamName": "s", "ShardId": "shardId-0", "ShardIteratorType": "AT_SEQUENCE_NUMBER",
                                   "StartingSequenceNumber": seq}) in k.calls


def test_a_trimmed_checkpoint_is_reported_and_reading_skips_to_trim_horizon() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    old = k.put("shardId-0", b"expired")
    kept = k.put("shardId-0", b"kept")
    k.trimmed_before = int(kept)
    sink = FakeSink({"kinesis/s/shardId-0": {"seq": old, "sub": 0, "whole": True}})
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 1))
    assert sink.records == [b"kept"]
    assert metric(sink, "firehose_KinesisCheckpointsTrimmed_total") == 1


def test_a_full_spool_stops_reading_and_nothing_is_dropped() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    k.put("shardId-0", b"r0")
    sink = FakeSink()
    sink.frame_limit = 1  # the start position is recorded, then the spool is full

    async def scenario() -> None:
        source = make_source(k, sink)
        await source.start()
        try:
            for _ in range(500):  # refused twice: the reader got no room, waited, and asked again
                if sink.refusals >= 2:
                    break
                await asyncio.sleep(0.01)
            assert sink.refusals >= 2, "the reader never asked for room"
            assert [(recs, list(pos or {})) for recs, _, pos in sink.frames] == [([], ["kinesis/s"])]
            assert [c[0] for c in k.calls if c[0] == "get_shard_iterator"]  # it got as far as the shard
            assert not [c for c in k.calls if c[0] == "get_records"]
            sink.frame_limit = None
            for _ in range(500):
                if sink.records:
                    break
                await asyncio.sleep(0.01)
        finally:
            await source.stop()

    asyncio.run(scenario())
    assert sink.records == [b"r0"]


def test_latest_records_its_start_time_once_and_reads_from_it() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    k.put("shardId-0", b"before")
    sink = FakeSink({"kinesis/s": {"start_ms": (1_700_000_000 + 1002) * 1000}})  # after "before"
    k.put("shardId-0", b"after")
    asyncio.run(run_until(make_source(k, sink, initial_position="latest"), lambda: len(sink.records) == 1))
    assert sink.records == [b"after"]
    assert not [f for f in sink.frames if f[2] and "kinesis/s" in f[2]]  # not recorded again


def test_the_canonical_kpl_fast_path_agrees_with_the_general_parser() -> None:
    """De-aggregation dominates the source's CPU, so aggregates laid out the way KPL encoders
    write them take a fast path; on anything it accepts it must answer what the general parser
    does (it declines everything else)."""
    from firehose import kpl

    rng = random.Random(7)
    accepted = 0
    for trial in range(3000):
        n = rng.randint(0, 6)
        records = [(rng.choice(["a", "bb", "ü", "k" * 200]), rng.randbytes(rng.choice([0, 1, 5, 130, 300])))
                   for _ in range(n)]
        ehks = [rng.choice([None, "1", str(2**127)]) for _ in range(n)] if trial % 2 else None
        body = bytearray(kpl.aggregate(records, ehks)[4:-16])
        if trial % 3 and body:  # mutate: flip, drop or insert bytes
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(body))
                op = rng.randrange(3)
                if op == 0:
                    body[i] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del body[i]
                else:
                    body.insert(i, rng.randrange(256))
                if not body:
                    break
        buf = kpl.MAGIC + bytes(body) + b"\0" * 16
        fast = kpl._parse_canonical(buf, 4, len(buf) - 16)
        if fast is None:
            continue
        accepted += 1
        assert fast == kpl._parse_general(buf, 4, len(buf) - 16), (trial, bytes(body).hex())
    assert accepted > 1000


def test_a_small_spool_cap_gets_small_frames_each_with_its_checkpoint() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    k.put("shardId-0", b"p" * 100_000)
    seq = k.put("shardId-0", aggregate([("a", bytes([i]) * 100_000) for i in range(12)]))
    sink = FakeSink()
    sink.max_size_bytes = 1 << 20  # spool.max_size_mib: 1 -- a 4 MiB frame would never fit
    asyncio.run(run_until(make_source(k, sink), lambda: len(sink.records) == 13))
    frames = [f for f in sink.frames if f[0]]
    assert len(frames) > 1 and all(sum(map(len, recs)) <= (1 << 20) // 4 for recs, _, _ in frames)
    # A frame that ends inside the aggregate says so, so a restart resumes at its next user record.
    inside = [p["kinesis/s/shardId-0"] for _, _, p in frames[:-1] if p["kinesis/s/shardId-0"]["seq"] == seq]
    assert inside and not any(p["whole"] for p in inside)
    assert sink.positions["kinesis/s/shardId-0"] == {"seq": seq, "sub": 11, "whole": True}


def test_a_shard_that_expires_while_being_read_is_released_and_counted() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    seq = k.put("shardId-0", b"r0")
    k.add_shard("shardId-1")
    k.put("shardId-1", b"r1")
    sink = FakeSink({"kinesis/s/shardId-0": {"seq": str(int(seq) - 1), "sub": 0, "whole": True}})

    def expire(**kwargs: Any) -> dict[str, Any]:
        del k.shards["shardId-0"]  # gone between ListShards and GetShardIterator
        raise client_error("ResourceNotFoundException", "GetShardIterator", "Shard shardId-0 not found")

    original = k.get_shard_iterator
    k.get_shard_iterator = lambda **kw: expire(**kw) if kw["ShardId"] == "shardId-0" else original(**kw)  # type: ignore[method-assign]
    asyncio.run(run_until(make_source(k, sink),
                          lambda: sink.records == [b"r1"] and sink.positions.get("kinesis/s/shardId-0", 0) is None))
    assert metric(sink, "firehose_KinesisCheckpointsTrimmed_total") == 1


def test_at_timestamp_reads_from_the_configured_time_and_records_it() -> None:
    k = FakeKinesis()
    k.add_shard("shardId-0")
    k.put("shardId-0", b"before")
    k.put("shardId-0", b"after")  # arrived at 1_700_001_002 s
    sink = FakeSink()
    source = make_source(k, sink, initial_position="at_timestamp", timestamp="2023-11-14T22:30:02+00:00")
    asyncio.run(run_until(source, lambda: len(sink.records) == 1))
    assert sink.records == [b"after"]
    assert sink.positions["kinesis/s"] == {"start_ms": 1_700_001_002_000}
    assert source.describe()["KinesisStreamSourceDescription"]["DeliveryStartTimestamp"] == 1_700_001_002.0
