"""The partition router on its own: a record's partition, admission and the active-partition
guard, the active counts of open buffers and undelivered batches, and the memory budget."""

from __future__ import annotations

from pathlib import Path

import structlog

from firehose.clock import ManualClock
from firehose.config import load_config_text
from firehose.interfaces import BuildContext
from firehose.metrics import Metrics
from firehose.spool import SealedBatch
from firehose.stages.common import StageContext
from firehose.stages.router import PARTITION_BYTES, RANGE_BYTES, PartitionRouter

Q = "partitionKeyFromQuery:c"


def make(tmp: Path, dp: str = "", clock: ManualClock | None = None) -> tuple[PartitionRouter, Metrics]:
    text = f"""
streams:
  - name: s
    dynamic_partitioning: {{enabled: true{dp}}}
    processing:
      - {{type: metadata_extraction, query: '{{c: .c}}'}}
    destination: {{type: local, path: {tmp / 'out'}, prefix: "c=!{{{Q}}}/",
                   error_output_prefix: "err/!{{firehose:error-output-type}}/"}}
"""
    config = load_config_text(text, "t.yaml", {}).streams[0]
    destination = config.destination.build(BuildContext("s", 1, "us-east-1", "000000000000", str(tmp)))
    metrics = Metrics()
    ctx = StageContext("s", clock or ManualClock(), metrics, structlog.get_logger())
    return PartitionRouter.for_stream(ctx, config, destination), metrics


def test_a_records_partition_is_its_values_for_the_prefixes_keys(tmp_path: Path) -> None:
    router, _ = make(tmp_path)
    assert router.partitioning and router.refs == (Q,)
    assert router.partition_of({"pk": {Q: "a"}}) == ("a",)
    assert router.partition_of({"pk": {"c": "old"}}) == ("old",)  # recorded before keys were namespaced
    assert router.partition_of({"pk": {"partitionKeyFromLambda:c": "x"}}) is None
    assert router.partition_of({"pk": {}}) is None
    assert router.partition_of(None) is None


def test_admission_opens_a_buffer_and_reports_why_a_record_cannot_be_partitioned(tmp_path: Path) -> None:
    clock = ManualClock()
    router, metrics = make(tmp_path, clock=clock)
    assert router.admit(("a",), 1000) is None
    assert router.admit(("a",), 1000) is None  # open already
    assert (router.open_partitions, router.active_partitions) == (1, 1)
    missing = router.admit(None, 1000)
    assert missing is not None
    assert (missing["t"], missing["c"], missing["ts"], missing["e"]) == (
        "partitioning-failed", "DynamicPartitioning.PartitionKeyMissing", 1000, clock.now_ms())
    assert Q in missing["m"]
    too_long = router.admit(("x" * 600,), 1000)  # the evaluated prefix would pass 512 characters
    assert too_long is not None and too_long["c"] == "DynamicPartitioning.PrefixEvaluationFailed"
    assert router.open_partitions == 1
    assert metrics.partition_exceeded_records.labels("s")._value.get() == 0


def test_the_guard_counts_open_buffers_and_undelivered_batches(tmp_path: Path) -> None:
    router, metrics = make(tmp_path, dp=", max_active_partitions: 2")
    assert router.admit(("a",), 0) is None and router.admit(("b",), 0) is None
    err = router.admit(("c",), 0)
    assert err is not None and err["t"] == "activePartitionExceeded"
    assert err["c"] == "DynamicPartitioning.ActivePartitionsLimitExceeded"
    assert "the limit (dynamic_partitioning.max_active_partitions) is 2" in err["m"]
    assert metrics.partition_count_exceeded.labels("s")._value.get() == 1
    assert metrics.partition_exceeded_records.labels("s")._value.get() == 1
    # "a" is sealed: its buffer is gone, its batch still counts until it is delivered.
    router.add(("a",), 0, b"r", 0)
    router.count_batch(("a",))
    router.close(("a",))
    assert (router.open_partitions, router.active_partitions) == (1, 2)
    assert router.admit(("c",), 0) is not None
    router.release(("a",))  # delivered
    assert router.active_partitions == 1
    assert router.admit(("c",), 0) is None
    assert metrics.partition_count_exceeded.labels("s")._value.get() == 0
    # A record of a sealed partition opens a new buffer for it.
    router.add(("a",), 1, b"r", 0)
    assert router.open() == [("b",), ("c",), ("a",)]


def test_buffers_are_due_oldest_first_and_counted(tmp_path: Path) -> None:
    router, _ = make(tmp_path)
    for seq, (part, arrival) in enumerate([(("a",), 1000), (("b",), 2000), (("a",), 3000), (("c",), 4000)]):
        if router.buffer(part) is None:
            assert router.admit(part, arrival) is None
        router.add(part, seq, b"xy", arrival)
    assert router.buffered_records == 4 and router.oldest_ms() == 1000
    assert router.due(now_ms=2500, interval_ms=500) == [("a",), ("b",)]
    assert router.due(now_ms=2500, interval_ms=2000) == []
    buf = router.buffer(("a",))
    assert buf is not None and buf.records == [b"xy", b"xy"] and list(buf.ranges) == [(0, 1), (2, 3)]
    # Record bytes plus the bookkeeping of three partitions and four ranges.
    assert router.memory_bytes == 8 + RANGE_BYTES * 2 * 4 + PARTITION_BYTES * 3


def test_over_the_budget_the_largest_buffers_spill_first(tmp_path: Path) -> None:
    router, metrics = make(tmp_path, dp=", memory_budget_mib: 1")
    budget = 1 << 20
    sizes = {("big",): 500_000, ("mid",): 400_000, ("small",): 200_000}
    for seq, (part, size) in enumerate(sizes.items()):
        assert router.admit(part, 0) is None
        router.add(part, seq, b"x" * size, 0)
    assert router.over_budget()
    assert router.relieve() == []  # bookkeeping is small: nothing to seal early
    spilled = [p for p in sizes if router.buffer(p).spilled]  # type: ignore[union-attr]
    assert spilled == [("big",), ("mid",)]  # down to half the budget, largest first
    assert not router.over_budget() and router.memory_bytes <= budget // 2
    assert metrics.partition_spills.labels("s")._value.get() == 2
    # A spilled buffer keeps its ranges (its batch is read back from the log), not its bytes.
    big = router.buffer(("big",))
    assert big is not None and big.records == [] and big.count == 1 and list(big.ranges) == [(0, 1)]
    router.add(("big",), 3, b"y" * 10, 0)
    assert big.records == [] and big.nbytes == 500_010


def test_when_bookkeeping_alone_is_over_half_the_budget_the_most_scattered_partitions_are_named(
    tmp_path: Path,
) -> None:
    router, _ = make(tmp_path, dp=", memory_budget_mib: 1, max_active_partitions: 5000")
    budget = 1 << 20
    # 1,200 partitions of one record each: over 600 KiB of bookkeeping, over half the budget.
    for i in range(1200):
        part = (f"p{i}",)
        assert router.admit(part, 0) is None
        router.add(part, 2 * i, b"r", 0)
    router.add(("p7",), 5000, b"r", 0)  # p7's records are in two ranges now
    book = router.memory_bytes - 1201  # all but the record bytes
    flush = router.relieve()
    assert flush[0] == ("p7",) and not any(router.buffer(p).spilled for p in flush)  # type: ignore[union-attr]
    # Sealed early until bookkeeping is down to a quarter of the budget.
    costs = [RANGE_BYTES * (4 if p == ("p7",) else 2) + PARTITION_BYTES for p in flush]
    assert book - sum(costs) <= budget // 4 < book - sum(costs[:-1])


def test_the_error_of_a_record_archived_by_routing_is_rebuilt_from_its_metadata(tmp_path: Path) -> None:
    clock = ManualClock()
    router, _ = make(tmp_path, clock=clock)
    sealed = SealedBatch(1, "err/x", [(0, 2)], 1_000, {"sink": "archive", "type": "activePartitionExceeded"})
    assert router.routing_error({"pk": {}}, sealed, b"{}")["c"] == "DynamicPartitioning.PartitionKeyMissing"
    # A record whose keys evaluate was archived by the guard.
    guard = router.routing_error({"pk": {Q: "a"}}, sealed, b"{}")
    assert (guard["c"], guard["ts"], guard["e"]) == ("DynamicPartitioning.ActivePartitionsLimitExceeded", 1_000,
                                                      clock.now_ms())


def test_without_partitioning_only_recovered_batches_are_counted(tmp_path: Path) -> None:
    ctx = StageContext("s", ManualClock(), Metrics(), structlog.get_logger())
    router = PartitionRouter(ctx, None, None)
    assert not router.partitioning and router.oldest_ms() is None and router.due(0, 0) == []
    router.count_batch(("a",))  # a partition's batch sealed before partitioning was turned off
    assert router.active_partitions == 1
    sealed = SealedBatch(1, "k", [(0, 1)], 5, {"type": "partitioning-failed"})
    err = router.routing_error(None, sealed, b"{}")
    assert (err["t"], err["c"], err["ts"]) == ("partitioning-failed", "DynamicPartitioning.Failed", 5)
    router.release(("a",))
    assert router.active_partitions == 0
