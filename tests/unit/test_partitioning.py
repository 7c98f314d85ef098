"""Dynamic partitioning in one StreamRuntime, with an injected clock: partition keys from a jq
query, a buffer per partition, the active-partition guard, the memory budget, replay after a
crash and the retry window of a failing prefix."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from firehose.clock import ManualClock
from firehose.config import load_config_text
from firehose.interfaces import Batch, DeliveryResult
from firehose.stream import StreamRuntime
from support import abandon, crash_after_upload, runtime_from_yaml, settle


def make_runtime(
    tmp: Path,
    *,
    query: str = "{c: .c}",
    prefix: str = "c=!{partitionKeyFromQuery:c}/",
    size_mib: int = 1,
    interval: int = 60,
    dp: str = "",
    clock: ManualClock | None = None,
    seed: int = 1,
    delivery: str = "",
    deaggregate: bool = False,
) -> StreamRuntime:
    deagg = "\n      - {type: record_deaggregation, format: json}" if deaggregate else ""
    text = f"""
streams:
  - name: s
    buffering: {{size_mib: {size_mib}, interval_secs: {interval}}}
    dynamic_partitioning: {{enabled: true{dp}}}
    {delivery}
    processing:
      - {{type: metadata_extraction, query: '{query}'}}{deagg}
      - {{type: append_delimiter}}
    destination:
      type: local
      path: {tmp / 'out'}
      prefix: "{prefix}"
      error_output_prefix: "err/!{{firehose:error-output-type}}/"
"""
    return runtime_from_yaml(tmp, text, clock=clock, seed=seed)


def files(tmp: Path) -> dict[str, bytes]:
    root = tmp / "out"
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name}


def partition_of(key: str) -> str:
    return key.split("/", 1)[0]


async def flush(rt: StreamRuntime, clock: ManualClock, seconds: float) -> None:
    clock.advance(seconds)
    rt.wake()
    await asyncio.sleep(0.05)


def buffered(rt: StreamRuntime) -> int:
    """Records waiting in partition buffers."""
    assert rt.router is not None
    return rt.router.buffered_records


def held(rt: StreamRuntime) -> int:
    """What open partitions cost against the memory budget: record bytes held, 16 bytes a range
    and 512 a partition."""
    from firehose.stages.router import PARTITION_BYTES, RANGE_BYTES

    assert rt.router is not None and (RANGE_BYTES, PARTITION_BYTES) == (16, 512)
    return rt.router.memory_bytes


def error_docs(objs: dict[str, bytes], kind: str) -> list[dict[str, Any]]:
    return [json.loads(line) for k, v in objs.items() if k.startswith(f"err/{kind}/") for line in v.splitlines()]


def test_records_go_to_their_partitions_prefix_in_arrival_order(tmp_path: Path) -> None:
    clock = ManualClock()
    sent = [orjson.dumps({"c": f"k{i % 4}", "i": i}) for i in range(200)]

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock)
        await rt.start()
        for i in range(0, 200, 20):
            await rt.put(sent[i : i + 20])
        await settle(lambda: buffered(rt) == 200)
        assert rt.status()["open_partitions"] == 4
        assert files(tmp_path) == {}  # nothing due yet: each partition waits for its interval
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 200)
        await rt.stop(5)

    asyncio.run(go())
    objs = files(tmp_path)
    assert sorted(partition_of(k) for k in objs) == ["c=k0", "c=k1", "c=k2", "c=k3"]
    for key, body in objs.items():
        # Firehose's layout after the evaluated prefix (no timestamp expression: the default one).
        assert key.startswith(f"{partition_of(key)}/2024/05/01/12/s-1-2024-05-01-12-20-00-")
        part = partition_of(key)[2:]
        expected = b"".join(r + b"\n" for r in sent if orjson.loads(r)["c"] == part)
        assert body == expected


def test_records_whose_keys_cannot_be_extracted_are_archived_with_their_error(tmp_path: Path) -> None:
    clock = ManualClock()
    good = b'{"c": "x", "n": 1}'
    bad = {
        b"not json": "not a single JSON document",
        b'{"c": null}': "partition key 'c' is null",
        b'{"c": {"deep": 1}}': "partition key 'c' is an object",
        b'{"c": [1]}': "partition key 'c' is an array",
        b'[1, 2]': "Cannot index array",
        b'{"c": 1} {"c": 2}': "not a single JSON document",
    }

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock)
        await rt.start()
        await rt.put([good, *bad])
        await settle(lambda: buffered(rt) == 1)
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 1 and rt.archived_records == len(bad))
        await rt.stop(5)

    asyncio.run(go())
    objs = files(tmp_path)
    assert [v for k, v in objs.items() if k.startswith("c=x/")] == [good + b"\n"]
    docs = error_docs(objs, "partitioning-failed")
    by_raw = {base64.b64decode(d["rawData"]): d for d in docs}
    assert set(by_raw) == set(bad)  # rawData is the record exactly as it arrived
    for raw, fragment in bad.items():
        assert by_raw[raw]["errorCode"] == "DynamicPartitioning.MetadataExtractionFailed"
        assert fragment in by_raw[raw]["errorMessage"]
        assert by_raw[raw]["arrivalTimestamp"] == 1_714_566_000_000


def test_multi_record_payloads_are_split_before_partitioning(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, deaggregate=True)
        await rt.start()
        await rt.put([b'{"c": "a", "n": 1}{"c": "b", "n": 2}\n{"c": "a", "n": 3}', b'{"c": "b", "n": 4}'])
        await settle(lambda: buffered(rt) == 4)
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 4)
        await rt.stop(5)

    asyncio.run(go())
    got = {partition_of(k): v for k, v in files(tmp_path).items()}
    assert got == {"c=a": b'{"c": "a", "n": 1}\n{"c": "a", "n": 3}\n', "c=b": b'{"c": "b", "n": 2}\n{"c": "b", "n": 4}\n'}


def test_numbers_and_booleans_become_text_as_jq_writes_them(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, query="{c: .n, d: .b}",
                          prefix="n=!{partitionKeyFromQuery:c}/b=!{partitionKeyFromQuery:d}/")
        await rt.start()
        await rt.put([b'{"n": 42, "b": true}', b'{"n": 2.5, "b": false}', b'{"n": "42", "b": true}'])
        await settle(lambda: buffered(rt) == 3)
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 3)
        await rt.stop(5)

    asyncio.run(go())
    prefixes = sorted("/".join(k.split("/")[:2]) for k in files(tmp_path))
    # 42 and "42" are one partition, as jq's tostring makes them the same text.
    assert prefixes == ["n=2.5/b=false", "n=42/b=true"]


def test_active_partition_guard_archives_overflow_until_partitions_are_delivered(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, dp=", max_active_partitions: 3")
        await rt.start()
        # Records of one partition share their metadata: a refused partition is refused each time.
        await rt.put([orjson.dumps({"c": c}) for c in "abcde"] + [orjson.dumps({"c": "a", "again": 1}),
                                                                  orjson.dumps({"c": "d", "again": 1})])
        exceeded = rt.metrics.partition_exceeded_records.labels("s")
        await settle(lambda: exceeded._value.get() == 3)
        assert rt.status()["active_partitions"] == 3
        assert rt.metrics.partition_count_exceeded.labels("s")._value.get() == 1
        rt.update_gauges()
        assert rt.metrics.partition_count.labels("s")._value.get() == 3
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 4 and rt.archived_records == 3)
        assert rt.status()["active_partitions"] == 0
        # Delivered partitions are deleted: new ones are admitted again.
        await rt.put([orjson.dumps({"c": c}) for c in "de"])
        await settle(lambda: buffered(rt) == 2)
        assert rt.metrics.partition_count_exceeded.labels("s")._value.get() == 0
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 6)
        await rt.stop(5)

    asyncio.run(go())
    objs = files(tmp_path)
    docs = error_docs(objs, "activePartitionExceeded")
    assert sorted(base64.b64decode(d["rawData"]) for d in docs) == [b'{"c":"d","again":1}', b'{"c":"d"}', b'{"c":"e"}']
    assert {d["errorCode"] for d in docs} == {"DynamicPartitioning.ActivePartitionsLimitExceeded"}
    assert "the limit (dynamic_partitioning.max_active_partitions) is 3" in docs[0]["errorMessage"]
    assert sorted(partition_of(k) for k in objs if not k.startswith("err/")) == ["c=a", "c=b", "c=c", "c=d", "c=e"]
    assert objs[next(k for k in objs if k.startswith("c=a/"))] == b'{"c":"a"}\n{"c":"a","again":1}\n'


def test_each_partition_flushes_on_its_own_size_and_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    big = b"x" * 200_000

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, interval=60)
        await rt.start()
        await rt.put([orjson.dumps({"c": "slow"})])
        await flush(rt, clock, 30)
        for _ in range(6):  # ~1.2 MB for "big": over 1 MiB, so it seals on size alone
            await rt.put([orjson.dumps({"c": "big", "pad": big.decode()})])
        await settle(lambda: rt.delivered_records == 5)
        assert [partition_of(k) for k in files(tmp_path)] == ["c=big"]
        await flush(rt, clock, 30)  # "slow" is 60 s old now, the rest of "big" only 30 s
        await settle(lambda: rt.delivered_records == 6)
        assert sorted(partition_of(k) for k in files(tmp_path)) == ["c=big", "c=slow"]
        await flush(rt, clock, 30)
        await settle(lambda: rt.delivered_records == 7)
        flushes = rt.metrics.partition_flushes
        assert flushes.labels("s", "size")._value.get() == 1
        assert flushes.labels("s", "interval")._value.get() == 2
        await rt.stop(5)

    asyncio.run(go())


def test_memory_budget_keeps_buffers_on_disk_and_flushes_early_without_losing_records(tmp_path: Path) -> None:
    clock = ManualClock()
    n_partitions, n_records = 300, 24_000
    sent = [orjson.dumps({"c": i % n_partitions, "i": i, "pad": "p" * 300}) for i in range(n_records)]
    peaks: list[int] = []

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, size_mib=5, interval=900, dp=", memory_budget_mib: 1")
        await rt.start()
        for i in range(0, n_records, 500):
            await rt.put(sent[i : i + 500])
            await asyncio.sleep(0)
            peaks.append(held(rt))
        await settle(lambda: rt.batcher.cursor >= rt.out.next_seq and rt.out.next_seq > 0, timeout=30)
        peaks.append(held(rt))
        await rt.stop(30)
        assert rt.metrics.partition_spills.labels("s")._value.get() > 0
        assert rt.metrics.partition_flushes.labels("s", "memory")._value.get() > 0

    asyncio.run(go())
    # 8 MB of records went through a 1 MiB budget: never more than the budget (plus the one record
    # that crossed it) was held.
    assert max(peaks) <= (1 << 20) + 400
    seen: list[int] = []
    for key, body in files(tmp_path).items():
        part = int(partition_of(key)[2:])
        docs = [orjson.loads(line) for line in body.splitlines()]
        assert {d["c"] for d in docs} == {part}  # every object holds its own partition only
        ids = [d["i"] for d in docs]
        assert ids == sorted(ids)  # in arrival order
        seen.extend(ids)
    assert sorted(seen) == list(range(n_records))  # each exactly once


def test_a_partition_batch_is_replayed_under_its_sealed_key_after_a_crash(tmp_path: Path) -> None:
    clock = ManualClock()
    delivered: list[str] = []

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, seed=1)
        await rt.start()
        crash_after_upload(rt, delivered)
        await rt.put([b'{"c": "a", "n": 1}', b'{"c": "b", "n": 2}', b'{"c": "a", "n": 3}'])
        await settle(lambda: buffered(rt) == 3)
        await flush(rt, clock, 60)
        await settle(lambda: len(delivered) == 2)
        await abandon(rt)
        rt2 = make_runtime(tmp_path, clock=clock, seed=2)  # another seed: a new key would differ
        await rt2.start()
        assert sorted(p.sealed.key for p in rt2.runner.pending) == sorted(delivered)
        assert rt2.status()["active_partitions"] == 2  # undelivered batches count as active
        await settle(lambda: rt2.status()["pending_batches"] == 0)
        await rt2.stop(5)

    asyncio.run(go())
    objs = files(tmp_path)
    assert sorted(objs) == sorted(delivered)
    assert sorted(objs.values()) == [b'{"c": "a", "n": 1}\n{"c": "a", "n": 3}\n', b'{"c": "b", "n": 2}\n']


def test_a_prefix_that_keeps_failing_is_archived_after_the_retry_duration(tmp_path: Path) -> None:
    clock = ManualClock()
    attempts: list[str] = []
    delivery = "delivery: {retry_initial_backoff_ms: 1, retry_max_backoff_ms: 2}"

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, dp=", retry_duration_secs: 10", delivery=delivery)
        await rt.start()
        assert rt.destination is not None
        real = rt.destination.deliver

        async def refuse_b(batch: Batch) -> DeliveryResult:
            if batch.key.startswith("c=b/"):
                attempts.append(batch.key)
                clock.advance(3)
                return DeliveryResult.all_failed(len(batch.records), retryable=True, code="S3.AccessDenied",
                                                 message="Access Denied")
            return await real(batch)

        rt.destination.deliver = refuse_b  # type: ignore[method-assign]
        await rt.put([b'{"c": "a"}', b'{"c": "b", "n": 1}', b'{"c": "b", "n": 2}'])
        await settle(lambda: buffered(rt) == 3)
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 1 and rt.archived_records == 2)
        await rt.stop(5)

    asyncio.run(go())
    assert 3 <= len(attempts) <= 5  # retried for about 10 s of the stream's clock, then archived
    docs = error_docs(files(tmp_path), "delivery-failed")
    assert sorted(base64.b64decode(d["rawData"]) for d in docs) == [b'{"c": "b", "n": 1}', b'{"c": "b", "n": 2}']
    assert {d["errorCode"] for d in docs} == {"S3.AccessDenied"}


# ---------------------------------------------------------------- configuration rules (reference §6.3)
DP_CONFIG = """\
streams:
  - name: s
    dynamic_partitioning: {enabled: %(enabled)s}
    buffering: {size_mib: 64, interval_secs: %(interval)s}
    processing:
%(processing)s
    destination:
      type: s3
      bucket: my-bucket
      prefix: "%(prefix)s"
%(error_prefix)s
"""
QUERY = '      - {type: metadata_extraction, query: "{customer_id: .customer.id}"}'
PREFIX = "data/customer_id=!{partitionKeyFromQuery:customer_id}/!{timestamp:yyyy/MM/dd}/"
ERROR_PREFIX = '      error_output_prefix: "errors/!{firehose:error-output-type}/"'


def dp_errors(**overrides: str) -> list[str]:
    import pytest

    from firehose.config import ConfigError

    values = {"enabled": "true", "interval": "60", "processing": QUERY, "prefix": PREFIX, "error_prefix": ERROR_PREFIX}
    values.update(overrides)
    with pytest.raises(ConfigError) as info:
        load_config_text(DP_CONFIG % values, "f.yaml", {})
    return info.value.errors


def test_a_valid_partitioned_stream_loads_and_compiles_its_query_once() -> None:
    values = {"enabled": "true", "interval": "60", "processing": QUERY, "prefix": PREFIX, "error_prefix": ERROR_PREFIX}
    cfg = load_config_text(DP_CONFIG % values, "f.yaml", {})
    s = cfg.streams[0]
    assert s.partitioned and s.dynamic_partitioning is not None
    assert (s.dynamic_partitioning.max_active_partitions, s.dynamic_partitioning.retry_duration_secs) == (500, 300)
    assert s.processing[0].program is s.processing[0].program


def test_partitioning_config_errors_use_firehoses_rules_and_name_the_line() -> None:
    assert dp_errors(error_prefix="") == [
        "f.yaml:7: streams[0].destination: ErrorOutputPrefix is required when dynamic partitioning is enabled"]
    assert dp_errors(prefix="data/!{timestamp:yyyy}/") == [
        "f.yaml:7: streams[0].destination: When dynamic partitioning is enabled, Prefix must contain at least one "
        "!{partitionKeyFromQuery:...} or !{partitionKeyFromLambda:...} expression"]
    assert dp_errors(enabled="false", processing="      - {type: append_delimiter}") == [
        "f.yaml:7: streams[0].destination: Prefix can only use !{partitionKeyFromQuery:...} and "
        "!{partitionKeyFromLambda:...} expressions when dynamic partitioning is enabled"]
    assert dp_errors(interval="0") == [
        "f.yaml:4: streams[0].buffering.interval_secs: zero buffering is not supported with dynamic "
        "partitioning (Firehose's rule); use 1 or more"]
    assert dp_errors(processing="      - {type: append_delimiter}") == [
        "f.yaml:10: streams[0].destination.prefix: !{partitionKeyFromQuery:customer_id} needs a "
        "metadata_extraction processor in processing: to produce key 'customer_id'"]
    assert dp_errors(prefix="x=!{partitionKeyFromLambda:x}/") == [
        "f.yaml:10: streams[0].destination.prefix: !{partitionKeyFromLambda:x} needs a lambda processor in "
        "processing: to produce key 'x'"]
    (syntax,) = dp_errors(processing='      - {type: metadata_extraction, query: "{customer_id: .customer.id"}')
    assert syntax.startswith("f.yaml:6: streams[0].processing[0].query: is not a valid jq program: jq: error: syntax error")
    assert dp_errors(enabled="false", prefix="data/", error_prefix="") == [
        "f.yaml:5: streams[0].processing: metadata_extraction needs dynamic_partitioning.enabled: true "
        "or an iceberg destination (Firehose's MetadataExtraction exists for them)"]
    (guard,) = dp_errors(enabled="true, max_active_partitions: 0")
    assert guard.startswith("f.yaml:3: streams[0].dynamic_partitioning.max_active_partitions: input should be greater")


def test_a_query_with_no_or_several_results_for_one_record_does_not_shift_the_others() -> None:
    from firehose.records import Outcome
    from firehose.transforms.processors import metadata_extraction

    outs = metadata_extraction(
        [Outcome(0, b'{"c": []}'), Outcome(1, b'{"c": ["x", "y"]}'), Outcome(2, b'{"c": ["z"]}')], "{c: .c[]}")
    assert [(o.result, o.query_keys) for o in outs] == [
        ("ProcessingFailed", None), ("ProcessingFailed", None), ("Ok", {"c": "z"})]
    assert outs[0].error_message == "the query must produce one JSON object of partition keys, got 0 results"


def test_a_partition_reaching_the_size_limit_is_sealed_at_once(tmp_path: Path) -> None:
    clock = ManualClock()

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock, interval=900)
        await rt.start()
        await rt.put([orjson.dumps({"c": "big", "pad": "x" * 1_200_000})])  # one record over 1 MiB
        await settle(lambda: rt.delivered_records == 1)
        await rt.stop(5)

    asyncio.run(go())
    assert [partition_of(k) for k in files(tmp_path)] == ["c=big"]


def seals_failing(tmp: Path, times: int) -> list[int]:
    """Five large records into one partition of a 1 MiB buffer, whose first ``times`` seals fail
    as on a full disk; waits for three delivered and stops. The records' ``i`` as delivered."""
    import errno

    async def go() -> None:
        rt = make_runtime(tmp, clock=ManualClock(), interval=900)
        await rt.start()
        real = rt.out.seal
        failures = [OSError(errno.ENOSPC, "No space left on device")] * times

        async def flaky(batches: Any) -> None:
            if failures:
                raise failures.pop()
            await real(batches)

        rt.out.seal = flaky
        await rt.put([orjson.dumps({"c": "a", "i": i, "pad": "x" * 300_000}) for i in range(5)])
        await settle(lambda: not failures, timeout=10)
        await settle(lambda: rt.delivered_records >= 3, timeout=10)
        await rt.stop(5)

    asyncio.run(go())
    return [orjson.loads(line)["i"] for body in files(tmp).values() for line in body.splitlines()]


def test_a_seal_that_fails_mid_frame_does_not_buffer_records_twice(tmp_path: Path) -> None:
    assert sorted(seals_failing(tmp_path, 1)) == [0, 1, 2, 3, 4]


def test_a_batcher_that_keeps_failing_tries_again_without_waiting_for_more_records(tmp_path: Path) -> None:
    """Seals that fail twice in a row (a full disk) after the last record arrived: the batcher
    tries again a second later by itself, and the records are delivered with no further put."""
    assert sorted(seals_failing(tmp_path, 2)) == [0, 1, 2, 3, 4]


def test_a_query_only_stream_extracts_inline_and_a_crash_replays_its_error_records_exactly(tmp_path: Path) -> None:
    """metadata_extraction alone is done by the batcher as it reads the ingest log (no outcome log,
    no processing stage). An archive batch uploaded but not committed before a crash is read back
    from the ingest log and its error records rebuilt: the extraction's error, not a missing key,
    under the same key, and the good records' partition batch likewise."""
    from unittest import mock

    from firehose.stages.inline import InlineExtraction

    clock = ManualClock()
    delivered: list[str] = []
    bad = {b"not json": "not a single JSON document", b'{"c": null}': "partition key 'c' is null"}

    async def go() -> None:
        rt = make_runtime(tmp_path, clock=clock)
        await rt.start()
        assert rt.processing is None and rt.out is rt.spool and rt.inline_query == "{c: .c}"
        crash_after_upload(rt, delivered)
        await rt.put([b'{"c": "a", "n": 1}', *bad])
        await settle(lambda: buffered(rt) == 1)
        await flush(rt, clock, 60)
        await settle(lambda: len(delivered) == 2)  # the partition's batch and the archive batch
        first = files(tmp_path)
        await abandon(rt)
        rt2 = make_runtime(tmp_path, clock=clock, seed=2)
        started: list[Any] = []  # frames the batcher extracts: none, every record is sealed already
        real_start = InlineExtraction.start
        with mock.patch.object(InlineExtraction, "start", lambda self, f: started.append(f) or real_start(self, f)):
            await rt2.start()
            assert sorted(p.sealed.key for p in rt2.runner.pending) == sorted(delivered)
            await settle(lambda: rt2.status()["pending_batches"] == 0)
            await rt2.stop(5)
        assert started == []
        again = files(tmp_path)
        assert sorted(again) == sorted(first) == sorted(delivered)  # overwritten, not duplicated
        for key, body in first.items():
            if key.startswith("c=a/"):
                assert again[key] == body

    asyncio.run(go())
    docs = error_docs(files(tmp_path), "partitioning-failed")
    assert sorted(base64.b64decode(d["rawData"]) for d in docs) == sorted(bad)
    for d in docs:
        assert d["errorCode"] == "DynamicPartitioning.MetadataExtractionFailed"
        assert bad[base64.b64decode(d["rawData"])] in d["errorMessage"]


def test_a_stream_with_another_processor_or_a_source_backup_keeps_the_processing_stage(tmp_path: Path) -> None:
    """Inline extraction only where nothing must be recorded: de-aggregation before the query
    keeps the outcome log."""
    async def go() -> None:
        rt = make_runtime(tmp_path, deaggregate=True)
        await rt.start()
        assert rt.inline_query is None and rt.processing is not None and rt.out is not rt.spool
        await rt.stop(5)

    asyncio.run(go())


async def started_with_worker(tmp: Path, clock: ManualClock) -> tuple[StreamRuntime, Any]:
    """A started query-only stream and its inline extraction, which may use a worker process
    (skipped on a one-core machine, where extraction stays in the daemon: the other tests)."""
    import pytest

    rt = make_runtime(tmp, clock=clock)
    await rt.start()
    inline = rt.router.inline
    assert inline is not None
    if not inline.processes:
        await rt.stop(5)
        pytest.skip("one core: partition keys are extracted in the daemon, with no worker process")
    return rt, inline


async def worker_in_use(tmp: Path, clock: ManualClock, first: list[bytes]) -> tuple[StreamRuntime, Any, int]:
    """A started query-only stream whose worker process is up and extracted ``first``; its pid."""
    rt, inline = await started_with_worker(tmp, clock)
    await rt.put(first)
    await settle(lambda: inline.worker_ready, timeout=60)
    await settle(lambda: buffered(rt) == len(first))
    pid = inline.worker_pid
    assert pid is not None
    return rt, inline, pid


def run_on(loop: str, coro: Any) -> None:
    """Run ``coro`` on asyncio's own loop or on uvloop (the daemon's, where installed)."""
    if loop == "uvloop":
        import pytest

        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")
        uvloop.run(coro)
    else:
        asyncio.run(coro)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_large_frames_are_extracted_in_a_worker_process_with_the_same_results(tmp_path: Path, loop: str) -> None:
    """A frame of at least POOL_MIN_RECORDS records is extracted in the worker process (once it is
    up); the worker runs the same function, so the metadata equals the daemon's own on a corpus
    of good and bad records, and what is delivered and archived is the same."""
    import random

    from firehose.stages.inline import POOL_MIN_RECORDS, extract_frame

    rng = random.Random(5)
    shapes = [lambda i: orjson.dumps({"c": f"k{i % 5}", "i": i}), lambda i: b"not json",
              lambda i: orjson.dumps({"c": None}), lambda i: orjson.dumps({"c": i, "n": 1.5}),
              lambda i: orjson.dumps({"c": [i]}), lambda i: orjson.dumps([i]), lambda i: b'{"c": "x"} {"c": "y"}',
              lambda i: orjson.dumps({"c": True}), lambda i: b'{"c": "\\u00e9t\\u00e9", "c": "last"}']
    corpus = [rng.choice(shapes)(i) for i in range(400)]
    clock = ManualClock()

    async def go() -> None:
        rt, inline = await started_with_worker(tmp_path, clock)
        await inline.frame_metas(corpus[:POOL_MIN_RECORDS], None, 1)  # starts the worker
        await settle(lambda: inline.worker_ready, timeout=60)
        here = extract_frame("{c: .c}", corpus, None, 7, 9).expand()
        before = inline.pooled_frames
        there = (await inline.frame_metas(corpus, None, 7)).expand()
        assert inline.pooled_frames == before + 1
        assert [m if m is None or "err" not in m else {**m, "err": {**m["err"], "e": 9}} for m in there] == here
        for i in range(0, 400, 200):
            await rt.put(corpus[i : i + 200])
        await settle(lambda: inline.pooled_frames >= 3)
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records + rt.archived_records == 400)
        await rt.stop(5)
        assert inline.worker_pid is None  # stopped with the stream

    run_on(loop, go())
    metas = extract_frame("{c: .c}", corpus, None, 7, 9).expand()
    ok = [r for r, m in zip(corpus, metas, strict=True) if m is not None and "pk" in m]
    assert all(orjson.loads(r)["c"] is not None for r in ok if r.startswith(b'{"c":'))
    assert b"not json" not in ok and b'{"c":null}' not in ok and len(ok) < len(corpus)
    objs = files(tmp_path)
    delivered = [line for k, v in objs.items() if k.startswith("c=") for line in v.splitlines()]
    assert sorted(delivered) == sorted(ok)
    assert len(error_docs(objs, "partitioning-failed")) == len(corpus) - len(ok)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_killed_extraction_worker_is_replaced_and_no_record_is_lost(tmp_path: Path, loop: str) -> None:
    """kill -9 of the worker process while frames are extracted: the frames it had are extracted
    in the daemon instead, a new worker takes over later frames, and every record is delivered."""
    import os
    import signal

    clock = ManualClock()
    sent = [orjson.dumps({"c": f"k{i % 3}", "i": i}) for i in range(2000)]

    async def go() -> None:
        rt, inline, first = await worker_in_use(tmp_path, clock, sent[:200])
        os.kill(first, signal.SIGKILL)
        for i in range(200, 800, 200):
            await rt.put(sent[i : i + 200])
        await settle(lambda: buffered(rt) == 800, timeout=30)
        await asyncio.sleep(1.1)  # the pause before another worker is started
        await rt.put(sent[800:1000])  # extracted here while the next worker starts
        await settle(lambda: buffered(rt) == 1000, timeout=30)
        await settle(lambda: inline.worker_pid not in (None, first) and inline.worker_ready, timeout=60)
        before = inline.pooled_frames
        for i in range(1000, 2000, 200):
            await rt.put(sent[i : i + 200])
        await settle(lambda: buffered(rt) == 2000, timeout=30)
        assert inline.pooled_frames > before  # the new worker took frames again
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 2000)
        await rt.stop(5)

    run_on(loop, go())
    objs = files(tmp_path)
    delivered = sorted(line for v in objs.values() for line in v.splitlines())
    assert delivered == sorted(sent)


def test_a_stuck_extraction_worker_is_killed_and_its_frames_extracted_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that ignores the stop signals systemd and Ctrl-C send the whole group, and one
    that stops answering (SIGSTOP here) is killed after the answer timeout: its frame is extracted
    in the daemon, and a new worker takes later frames."""
    import os
    import signal

    from firehose.stages import inline as inline_mod

    monkeypatch.setattr(inline_mod, "ANSWER_TIMEOUT_SECS", 1.0)
    clock = ManualClock()
    sent = [orjson.dumps({"c": f"k{i % 3}", "i": i}) for i in range(600)]

    async def go() -> None:
        rt, inline, first = await worker_in_use(tmp_path, clock, sent[:200])
        os.kill(first, signal.SIGTERM)  # ignored: the daemon decides when it ends
        await asyncio.sleep(0.3)
        assert inline.worker_pid == first and inline.worker_ready
        os.kill(first, signal.SIGSTOP)
        await rt.put(sent[200:400])
        await settle(lambda: buffered(rt) == 400, timeout=10)  # after the 1 s timeout, extracted here
        assert inline.worker_pid != first
        await asyncio.sleep(1.1)  # the pause before another worker is started
        await rt.put(sent[400:500])  # extracted here while the next worker starts
        await settle(lambda: inline.worker_pid not in (None, first) and inline.worker_ready, timeout=60)
        await settle(lambda: buffered(rt) == 500, timeout=30)
        before = inline.pooled_frames
        await rt.put(sent[500:])
        await settle(lambda: buffered(rt) == 600, timeout=30)
        assert inline.pooled_frames == before + 1
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 600)
        await rt.stop(5)

    asyncio.run(go())
    delivered = sorted(line for v in files(tmp_path).values() for line in v.splitlines())
    assert delivered == sorted(sent)


def test_metadata_a_source_failed_is_kept_beside_extracted_records() -> None:
    """A frame whose source already failed some records (and carries Kinesis metadata on others):
    the failed keep their error, the others get their keys or their own error, in place."""
    from firehose.records import ErrorInfo, RecordMeta
    from firehose.stages.inline import extract_frame

    failed = RecordMeta.failed(ErrorInfo("Source.Failed", "bad", "processing-failed", 1, 5, 6))
    kinesis = RecordMeta.from_kinesis({"sequenceNumber": "49", "subsequenceNumber": 0})
    records = [b"x", b'{"c": "a"}', b"not json", b'{"c": "a"}', b'{"c": 7}']
    source = [failed, None, kinesis, kinesis, failed]
    out = extract_frame("{c: .c}", records, source, 5, 6)
    metas = out.expand()
    assert metas[0] == failed and metas[4] == failed
    assert metas[1] == metas[3] == {"pk": {"partitionKeyFromQuery:c": "a"}}
    err = ErrorInfo.decode(metas[2]["err"])
    assert err.code == "DynamicPartitioning.MetadataExtractionFailed"
    assert err.extra == {"sequenceNumber": "49", "subSequenceNumber": 0}
    assert (out.extracted, out.failed, out.ok_bytes) == (3, 1, 20)


@pytest.mark.parametrize(("query", "dp"), [("{c: .c}", ""), ("{c: .c}", ", memory_budget_mib: 1"),
                                         ("{c: .c, u: .u}", "")])
def test_whole_frames_routed_a_partition_at_a_time_end_as_record_by_record(
    tmp_path: Path, query: str, dp: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame whose records all go to open partitions with room is buffered a partition at a
    time; the objects, their records and their order are those of the record-by-record path, on
    frames that fill buffers mid-frame, open new partitions, carry failed records and (with a
    1 MiB budget) spill. Records of one partition may carry different metadata: numeric keys
    (extracted one by one) and a query key the Prefix does not use."""
    import random

    from firehose.stages import batcher as batcher_mod

    rng = random.Random(8)
    frames = []
    for f in range(40):
        keys = [f"k{n}" for n in range(3 + f // 10)]  # a new partition every ten frames
        frame = [orjson.dumps({"c": rng.choice([*keys, 7, 8]), "u": f"u{rng.randrange(9)}", "f": f, "i": i,
                               "pad": "x" * rng.randint(500, 3000)})
                 for i in range(rng.randint(20, 150))]
        if f % 7 == 3:
            frame[rng.randrange(len(frame))] = b"not json"
        frames.append(frame)
    whole = [0]
    bulk_on = [False]
    route_whole = batcher_mod.Batcher._route_whole

    def counted(self: Any, *args: Any) -> bool:  # off: every frame goes record by record
        done = bulk_on[0] and route_whole(self, *args)
        whole[0] += done
        return done

    monkeypatch.setattr(batcher_mod.Batcher, "_route_whole", counted)

    def run(tmp: Path, bulk: bool) -> list[tuple[str, bytes]]:
        bulk_on[0] = bulk
        clock = ManualClock()

        async def go() -> None:
            rt = make_runtime(tmp, clock=clock, dp=dp, query=query)
            await rt.start()
            for frame in frames:
                await rt.put(frame)
            assert rt.batcher is not None
            await settle(lambda: rt.batcher is not None and rt.batcher.caught_up, timeout=30)
            await flush(rt, clock, 60)
            await settle(lambda: rt.delivered_records + rt.archived_records == sum(map(len, frames)), timeout=30)
            await rt.stop(5)

        asyncio.run(go())
        return sorted((partition_of(k), v) for k, v in files(tmp).items() if not k.startswith("err/"))

    by_record = run(tmp_path / "a", False)
    assert whole[0] == 0
    by_partition = run(tmp_path / "b", True)
    assert whole[0] > 10  # most frames went the whole way
    assert by_partition == by_record
    assert len(by_record) > 8  # buffers were sealed on size, not only at the end


def test_turning_processing_on_after_a_crash_with_partitions_open_delivers_each_record_once(tmp_path: Path) -> None:
    """Killed with partition b still buffering its first record while partition a, sealed by size
    after it, may be pending or delivered; restarted with a processor added. Processing starts at
    b's record and must step over a's: they were delivered (or go out) in a's own batch."""
    base = f"""
streams:
  - name: s
    buffering: {{size_mib: 1, interval_secs: 60}}
    dynamic_partitioning: {{enabled: true}}
    processing:
      - {{type: metadata_extraction, query: '{{c: .c}}'}}%s
    destination:
      type: local
      path: {tmp_path / 'out'}
      prefix: "c=!{{partitionKeyFromQuery:c}}/"
      error_output_prefix: "err/!{{firehose:error-output-type}}/"
"""
    pad = "x" * 1000
    first_b = orjson.dumps({"c": "b", "i": 0})
    a_records = [orjson.dumps({"c": "a", "i": i, "p": pad}) for i in range(1, 1200)]
    last_b = orjson.dumps({"c": "b", "i": 1200})

    async def go() -> None:
        clock = ManualClock()
        rt = runtime_from_yaml(tmp_path, base % "", clock=clock)
        await rt.start()
        await rt.put([first_b])
        for i in range(0, len(a_records), 100):
            await rt.put(a_records[i : i + 100])
        await rt.put([last_b])
        await settle(lambda: rt.spool.sealed.covers(1, 1000) or rt.spool.committed.covers(1, 1000))  # a: sealed by size
        assert 0 not in rt.spool.sealed
        await abandon(rt)
        lambda_step = "\n      - {type: lambda, function: 'handlers.identity:handler', workers: 1}"
        again = runtime_from_yaml(tmp_path, base % lambda_step, clock=clock, seed=2)
        await again.start()
        assert again.processing is not None and again.processing.cursor == 0
        await flush(again, clock, 61)
        assert await again.stop(10)

    asyncio.run(go())
    seen = [int(m) for body in files(tmp_path).values() for m in re.findall(rb'"i":(\d+)', body)]
    assert sorted(seen) == list(range(1201))
