"""Records read back from the spool packed in one buffer (firehose/packed.py): they read as the
list of records they replace, an object store's body is the buffer itself, and a short file is an
error, never a short record."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import numpy as np
import pytest

from firehose.destinations.objectstore import join_records
from firehose.destinations.s3 import S3DestinationConfig
from firehose.interfaces import Batch
from firehose.packed import PackedRecords, read_packed, records_nbytes
from firehose.spool import Spool, SpoolError


def run(coro):
    return asyncio.run(coro)


def _spool_with(tmp_path: Path, records: list[bytes], per_frame: int, *, cached: set[int] = frozenset()) -> Spool:
    """A spool holding ``records`` in frames of ``per_frame``; only the frames starting at a seq
    in ``cached`` stay in the frame cache."""
    sp = Spool(str(tmp_path), cache_bytes=64 << 20)
    sp.open()
    for i in range(0, len(records), per_frame):
        sp.append_records(records[i : i + per_frame], 1000 + i)
    for first in range(0, len(records), per_frame):
        if first not in cached:
            sp.release_cache(first)
    return sp


def test_planned_reads_are_packed_and_read_as_the_records_they_hold(tmp_path: Path) -> None:
    """Random ranges over frames partly on disk and partly in the cache, records of 0 to 3,000
    bytes: every way of reading a record agrees with the list of records it stands for."""
    rng = random.Random(20)
    records = [os.urandom(rng.choice((0, 1, rng.randint(2, 3000)))) for _ in range(400)]

    async def go() -> None:
        sp = _spool_with(tmp_path, records, 37, cached={37, 148, 259})
        await sp.wait_durable()
        for _ in range(40):
            cuts = sorted(rng.sample(range(401), 6))
            ranges = [(cuts[k], cuts[k + 1]) for k in range(0, 6, 2) if cuts[k] < cuts[k + 1]]
            want = [r for s, e in ranges for r in records[s:e]]
            got = sp.read_planned(sp.plan_records(ranges))
            assert isinstance(got, PackedRecords)
            assert len(got) == len(want)
            assert got == want and list(got) == want
            assert bytes(got.buffer) == b"".join(want)
            assert got.nbytes == records_nbytes(want) == records_nbytes(got)
            if want:
                k = rng.randrange(len(want))
                assert got[k] == want[k] and got[-1] == want[-1] and got[-len(want)] == want[0]
                assert got[k : k + 5] == want[k : k + 5] and got[::-3] == want[::-3]
                assert all(type(r) is bytes for r in (got[k], next(iter(got))))
            with pytest.raises(IndexError):
                got[len(want)]
            with pytest.raises(IndexError):
                got[-len(want) - 1]
        await sp.aclose()

    run(go())


def test_an_empty_plan_is_no_records(tmp_path: Path) -> None:
    got = read_packed([], lambda *a: [], str(tmp_path))
    assert len(got) == 0 and got == [] and got.nbytes == 0 and list(got) == []


def test_a_segment_shorter_than_its_index_is_an_error_not_a_short_record(tmp_path: Path) -> None:
    """The length table says where the records end; a file cut short under the reader (damage,
    a disk gone read-only and truncated) must fail the read rather than deliver less."""
    records = [b"r%04d" % i + b"x" * 500 for i in range(50)]

    async def go() -> None:
        sp = _spool_with(tmp_path, records, 50)
        await sp.wait_durable()
        plan = sp.plan_records([(0, 50)])
        sp.read_planned(plan)  # the length table is read (and kept) while the file is whole
        segment = sp._segments[max(sp._segments)].path
        os.truncate(segment, os.path.getsize(segment) - 300)
        with pytest.raises(SpoolError, match="do not read back"):
            sp.read_planned(plan)
        await sp.aclose()

    run(go())


def test_an_object_body_is_the_packed_buffer_itself_and_encodes_as_the_list_does() -> None:
    rng = random.Random(7)
    records = [rng.randbytes(rng.randint(0, 2000)) for _ in range(300)]
    packed = PackedRecords.of(records)
    assert join_records(packed) is packed.buffer
    assert join_records(packed, b"\n") == join_records(records, b"\n")
    for codec in ("UNCOMPRESSED", "GZIP", "Snappy", "HADOOP_SNAPPY", "ZIP"):
        cfg = S3DestinationConfig(type="s3", bucket="bucket", compression=codec)
        body_list, body_packed = cfg.encode("k/o", records), cfg.encode("k/o", packed)
        assert cfg.codec.decompress(body_packed) == b"".join(records), codec
        if codec != "GZIP" and codec != "ZIP":  # both carry a timestamp
            assert body_packed == body_list, codec
    batch = Batch("s", 1, "k", packed, 0)
    assert batch.size_bytes == sum(map(len, records))


def test_packed_records_compare_and_refuse_offsets_that_do_not_cover_the_buffer() -> None:
    packed = PackedRecords.of([b"a", b"", b"bc"])
    assert packed == [b"a", b"", b"bc"] and packed == (b"a", b"", b"bc") and packed == PackedRecords.of([b"a", b"", b"bc"])
    assert packed != [b"a", b"bc"] and packed != [b"a", b"", b"bd"] and packed != PackedRecords.of([b"a", b"bc"])
    assert (packed == "abc") is False
    assert repr(packed) == "PackedRecords(3 records, 3 bytes)"
    with pytest.raises(TypeError):
        hash(packed)
    for offsets in ([1, 3], [0, 2], []):
        with pytest.raises(ValueError):
            PackedRecords(bytearray(b"abc"), np.array(offsets, dtype=np.int64))
