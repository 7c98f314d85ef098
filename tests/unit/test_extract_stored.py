"""Partition keys of a frame the extraction worker reads from the spool file itself
(``extract_stored``): the same metadata as from the records sent, a file that does not hold the
frame refused, and then the frame extracted in the daemon instead, with nothing lost."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from firehose.clock import ManualClock
from firehose.filelog import FileLog
from firehose.log import FrameFile, LogError
from firehose.records import ErrorInfo, RecordMeta
from firehose.stages.inline import extract_frame, extract_stored
from support import settle
from unit.test_partitioning import files, flush, run_on, started_with_worker

QUERY = "{c: .c}"
SHAPES = [lambda i: orjson.dumps({"c": f"k{i % 5}", "i": i}), lambda i: b"not json",
          lambda i: orjson.dumps({"c": None}), lambda i: orjson.dumps({"c": i, "n": 1.5}),
          lambda i: orjson.dumps({"c": [i]}), lambda i: b'{"c": "x"} {"c": "y"}', lambda i: b"",
          lambda i: b'{"c": "\\u00e9t\\u00e9", "c": "last"}', lambda i: orjson.dumps({"c": "k1", "pad": "x" * i})]


def corpus(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.choice(SHAPES)(i) for i in range(n)]


def check_groups(records: list[bytes], out: Any) -> None:
    """``picked``/``sizes`` say what ``codes`` says: each code's records in order and their bytes."""
    assert len(out.picked) == len(out.sizes) == len(out.distinct)
    for code, (picked, size) in enumerate(zip(out.picked, out.sizes, strict=True)):
        assert picked == [i for i, c in enumerate(out.codes) if c == code]
        assert size == sum(len(records[i]) for i in picked)


def test_a_stored_frame_gives_the_metadata_its_records_give(tmp_path: Path) -> None:
    """Frames of a randomised corpus, with and without a source's per-record metadata (a failed
    record keeps its error), extracted from the spool file and from the records: equal."""
    failed = RecordMeta.failed(ErrorInfo("Source.Failed", "bad", "processing-failed", 1, 5, 6))
    kinesis = RecordMeta.from_kinesis({"sequenceNumber": "49", "subsequenceNumber": 0})

    async def go() -> None:
        log = FileLog(str(tmp_path / "spool"))
        await log.open()
        frames = []
        for f in range(12):
            records = corpus(f, 1 + f * 23)
            meta = [random.Random(f).choice([None, failed, kinesis]) for _ in records] if f % 3 == 1 else None
            first = await log.append(records, 1000 + f, meta=meta)
            frames.append((first, records, meta, 1000 + f))
        for first, records, meta, arrival in frames:
            where = log.frame_file(first + len(records) - 1)
            assert where is not None and where.first_seq == first
            stored = extract_stored(QUERY, where, 77)
            assert stored == extract_frame(QUERY, records, meta, arrival, 77)
            check_groups(records, stored)
            if meta is not None:
                assert all(stored.expand()[i] == failed for i, m in enumerate(meta) if m is failed)
        await log.aclose()

    asyncio.run(go())


def test_a_file_that_does_not_hold_the_frame_is_refused(tmp_path: Path) -> None:
    """Another frame at the offset, a file cut short, a file gone: an error, never keys of other
    records."""
    async def go() -> tuple[FrameFile, FrameFile]:
        log = FileLog(str(tmp_path / "spool"))
        await log.open()
        await log.append(corpus(1, 50), 1)
        await log.append(corpus(2, 50), 2)
        one, two = log.frame_file(0), log.frame_file(50)
        assert one is not None and two is not None
        await log.aclose()
        return one, two

    one, two = asyncio.run(go())
    with pytest.raises(LogError, match="not that of record 50"):
        extract_stored(QUERY, two._replace(offset=one.offset, length=one.length), 1)
    with open(two.path, "r+b") as f:
        f.truncate(two.offset + two.length - 1)
    with pytest.raises(LogError, match="cut short"):
        extract_stored(QUERY, two, 1)
    os.unlink(two.path)
    with pytest.raises(FileNotFoundError):
        extract_stored(QUERY, one, 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stored_frame_the_worker_cannot_read_is_extracted_in_the_daemon(tmp_path: Path, loop: str) -> None:
    """The worker answers an error for a frame it cannot read (here: its file is not there): the
    daemon extracts that frame itself, the worker stays and takes the next frames, and every record
    of the stream is delivered once to its partition."""
    clock = ManualClock()
    sent = [orjson.dumps({"c": f"k{i % 4}", "i": i}) for i in range(1200)]

    async def go() -> None:
        rt, inline = await started_with_worker(tmp_path, clock)
        await rt.put(sent[:200])
        await settle(lambda: inline.worker_ready, timeout=60)
        pid, before = inline.worker_pid, inline.pooled_frames
        records = sent[200:400]
        gone = FrameFile(str(tmp_path / "no-such-segment"), 0, 10, 0, len(records))
        metas = await inline.finish(inline.start(gone), records, None, 5)
        assert metas == extract_frame(QUERY, records, None, 5, clock.now_ms())
        assert inline.pooled_frames == before and inline.worker_pid == pid
        for i in range(200, 1200, 200):
            await rt.put(sent[i : i + 200])
        await settle(lambda: rt.router.buffered_records == 1200, timeout=30)
        assert inline.pooled_frames > before and inline.worker_pid == pid  # read by the worker
        await flush(rt, clock, 60)
        await settle(lambda: rt.delivered_records == 1200)
        await rt.stop(5)

    run_on(loop, go())
    objs = files(tmp_path)
    for k in range(4):
        part = sorted(line for key, v in objs.items() if key.startswith(f"c=k{k}/") for line in v.splitlines())
        assert part == sorted(r for r in sent if orjson.loads(r)["c"] == f"k{k}")
