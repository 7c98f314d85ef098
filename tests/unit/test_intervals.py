"""IntervalSet, the spool's record bookkeeping: ranges added one at a time or a batch at once give
the same set as plain integers would."""

from __future__ import annotations

import random

from firehose.intervals import IntervalSet


def as_ranges(values: set[int]) -> list[tuple[int, int]]:
    """The maximal runs of ``values`` as half-open ranges."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


def random_ranges(rng: random.Random, n: int, span: int) -> list[tuple[int, int]]:
    ranges = []
    for _ in range(n):
        start = rng.randrange(span)
        ranges.append((start, start + rng.choice([0, 1, 1, 1, 2, 5, 40])))  # empty ones too
    rng.shuffle(ranges)
    return ranges


def test_batches_of_scattered_fragments_merge_like_integers() -> None:
    rng = random.Random(7)
    for _ in range(300):
        reference: set[int] = set()
        one_by_one, batched = IntervalSet(), IntervalSet()
        span = rng.choice([50, 400, 5000])
        for _ in range(rng.randrange(1, 8)):
            batch = random_ranges(rng, rng.choice([1, 3, 8, 30, 300]), span)
            for start, end in batch:
                reference.update(range(start, end))
                one_by_one.add(start, end)
            batched.add_many(batch)
            assert list(batched.ranges()) == as_ranges(reference) == list(one_by_one.ranges())
            assert len(batched) == len(reference) == len(one_by_one)
            below = rng.randrange(span)
            batched.discard_below(below)
            assert len(batched) == len({v for v in reference if v >= below})
            batched = IntervalSet(batched.ranges())
            batched.add_many(as_ranges(reference))


def test_add_many_joins_neighbours_on_both_sides() -> None:
    s = IntervalSet([(0, 10), (20, 30), (40, 50)])
    s.add_many([(10, 12), (18, 20), (30, 31), (32, 33), (34, 35), (36, 37), (38, 40), (60, 61), (5, 6)])
    assert list(s.ranges()) == [(0, 12), (18, 31), (32, 33), (34, 35), (36, 37), (38, 50), (60, 61)]
    assert s.covers(38, 50) and not s.covers(31, 33) and 32 in s and 33 not in s


def test_a_batch_given_as_ranges_merges_into_a_fragmented_set_like_integers() -> None:
    """The numpy merge (batches of many ranges, as a sealed batch's Ranges) against plain integers,
    on sets fragmented the way dynamic partitioning leaves them: interleaved single records."""
    from firehose.intervals import Ranges

    rng = random.Random(11)
    for _ in range(60):
        reference: set[int] = set()
        s = IntervalSet()
        partitions = rng.choice([2, 7, 40])
        span = rng.choice([300, 3000])
        for _ in range(rng.randrange(2, 10)):
            p = rng.randrange(partitions)
            lo = rng.randrange(span)
            batch = [(v, v + rng.choice([0, 1, 1, 2])) for v in range(lo, lo + rng.randrange(1, 400))
                     if v % partitions == p]
            rng.shuffle(batch)
            for start, end in batch:
                reference.update(range(start, end))
            s.add_many(Ranges(batch))
            assert list(s.ranges()) == as_ranges(reference)


def test_a_union_of_sets_holds_what_any_of_them_holds() -> None:
    rng = random.Random(20261207)
    for _ in range(200):
        sets, values = [], set()
        for _k in range(rng.choice([0, 1, 2, 3])):
            s = IntervalSet()
            for start, end in random_ranges(rng, rng.randrange(0, 60), 300):
                s.add(start, end)
                values.update(range(start, end))
            sets.append(s)
        union = IntervalSet.union(*sets)
        assert list(union.ranges()) == as_ranges(values)
    assert list(IntervalSet.union(IntervalSet([(0, 2)]), IntervalSet([(2, 4)])).ranges()) == [(0, 4)]  # touching


def test_a_union_is_a_copy_and_knows_its_last_end() -> None:
    source = IntervalSet([(5, 9)])
    union = IntervalSet.union(source, IntervalSet())
    source.add(20, 30)
    source.discard_below(7)
    assert list(union.ranges()) == [(5, 9)] and union.last_end() == 9 and union
    assert not IntervalSet.union() and IntervalSet().last_end() == 0
