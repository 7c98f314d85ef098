"""SourceBatch, the processing stage's records as columns: it reads as the list of its records."""

from __future__ import annotations

import pytest

from firehose.records import Outcome, SourceBatch, SourceRecord, UnchangedOutcomes, record_datas

KINESIS = {"sequenceNumber": "49", "subsequenceNumber": 1}


def records_of(first: int, datas: list[bytes], arrivals: list[int], kinesis: list[object] | None) -> list[SourceRecord]:
    return [SourceRecord(str(first + i), d, a, kinesis[i] if kinesis is not None else None)  # type: ignore[arg-type]
            for i, (d, a) in enumerate(zip(datas, arrivals, strict=True))]


@pytest.mark.parametrize("kinesis", [None, [None, KINESIS, None, None, KINESIS]])
def test_a_batch_reads_as_the_list_of_its_records(kinesis: list[object] | None) -> None:
    datas, arrivals = [b"a", b"", b"ccc", b"d", b"e"], [10, 10, 11, 12, 12]
    batch = SourceBatch(70, datas, arrivals, kinesis)  # type: ignore[arg-type]
    listed = records_of(70, datas, arrivals, kinesis)
    assert len(batch) == 5 and list(batch) == listed and batch.record_ids == [r.record_id for r in listed]
    assert [batch[i] for i in range(-5, 5)] == listed + listed
    for lo in range(-6, 7):
        for hi in (*range(-6, 7), None):
            part = batch[lo:hi]
            assert isinstance(part, SourceBatch) and list(part) == listed[lo:hi]
            assert part.record_ids == [r.record_id for r in listed[lo:hi]]
    assert record_datas(batch) is datas and record_datas(listed) == datas
    for bad in (5, -6):
        with pytest.raises(IndexError):
            batch[bad]
    with pytest.raises(ValueError, match="in runs"):
        batch[::2]
    assert list(SourceBatch(0, [], [])) == [] and not SourceBatch(0, [], [])


@pytest.mark.parametrize("lambda_first", [True, False])
def test_the_chain_takes_a_batch_and_its_steps_get_a_list(lambda_first: bool) -> None:
    """A chain given a SourceBatch gives the outcomes it gives for the list of its records; a
    function first reads the batch's columns, and every other step (a plugin's too) gets a list."""
    import asyncio
    from typing import Any

    from firehose.config import load_config_text
    from firehose.registry import PROCESSING_CHAIN, load

    fn = "      - {type: lambda, function: 'handlers.upper:handler', workers: 1}\n" if lambda_first else ""
    text = ("streams:\n  - name: a\n    processing:\n" + fn
            + "      - {type: metadata_extraction, query: '{c: .name}'}\n"
            + "    dynamic_partitioning: {enabled: true}\n"
            + "    destination: {type: local, path: o, prefix: '!{partitionKeyFromQuery:c}/', error_output_prefix: e/}\n")
    stream = load_config_text(text, "f.yaml", {}).streams[0]
    chain = load(PROCESSING_CHAIN)(stream.processing, stream_arn="arn", region="us-east-1")
    seen: list[type] = []

    class Spy:
        async def start(self) -> None:
            pass

        async def process(self, outcomes: list[Any], records: Any) -> list[Any]:
            seen.append(type(records))
            return outcomes

        async def close(self) -> None:
            pass

    chain.steps.append(Spy())
    batch = SourceBatch(7, [b'{"name": "ada"}', b"not json", b'{"name": "bo"}'], [1, 1, 2],
                        [None, {"sequenceNumber": "9"}, None])

    def view(outs: list[Any]) -> list[tuple[Any, ...]]:
        return [(o.source, o.data, o.result, o.error_code, o.query_keys) for o in outs]

    async def go() -> tuple[list[Any], list[Any]]:
        await chain.start()
        try:
            return view(await chain.process(batch)), view(await chain.process(list(batch)))
        finally:
            await chain.close()

    from_batch, from_list = asyncio.run(go())
    assert from_batch == from_list and seen == [list, list]
    assert [o[2] for o in from_batch] == ["Ok", "ProcessingFailed", "Ok"]
    assert from_batch[0][4] == {"c": "ADA" if lambda_first else "ada"}


def test_unchanged_outcomes_read_as_the_list_of_ok_outcomes() -> None:
    datas = [b"a", b"", b"c"]
    whole = UnchangedOutcomes(datas, 2)
    listed = [Outcome(i, d, "Ok", attempts=2) for i, d in enumerate(datas)]
    assert len(whole) == 3 and list(whole) == listed and [whole[i] for i in range(-3, 3)] == listed + listed
    assert whole[1:] == listed[1:] and all(o.meta == {} and o.ok for o in whole)
    assert whole == listed and whole == UnchangedOutcomes(list(datas), 2) and whole != listed[:2]
    assert whole != UnchangedOutcomes(datas, 1) and whole != tuple(listed)
    with pytest.raises(IndexError):
        whole[3]


def test_a_function_alone_that_gives_the_buffer_back_whole_answers_compact() -> None:
    """The chain's only step an identity function: its answer is an UnchangedOutcomes of the
    buffer's own bytes (what the processing stage records without looking at each outcome)."""
    import asyncio

    from firehose.config import load_config_text
    from firehose.registry import PROCESSING_CHAIN, load

    text = ("streams:\n  - name: a\n    processing:\n"
            "      - {type: lambda, function: 'handlers.identity:handler', workers: 1}\n"
            "    destination: {type: local, path: o}\n")
    stream = load_config_text(text, "f.yaml", {}).streams[0]
    chain = load(PROCESSING_CHAIN)(stream.processing, stream_arn="arn", region="us-east-1")
    batch = SourceBatch(3, [b'{"a": 1}', b"x", b""], [1, 1, 1])

    async def go() -> object:
        await chain.start()
        try:
            return await chain.process(batch)
        finally:
            await chain.close()

    out = asyncio.run(go())
    assert isinstance(out, UnchangedOutcomes) and out.datas == batch.datas and out.datas is batch.datas
