"""The daemon's own invocations of a local function build the event and check the response in the
worker process (``WorkerPool.invoke_records``). That path is held to the in-daemon one: the same
handler, records and response give the same outcomes, codes and messages, attempt counts and
splits, whichever path ran."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from firehose.records import Outcome, SourceBatch, SourceRecord
from firehose.transforms.lambda_ import LocalFunction, build_event, invoke_with_retries
from handlers import kinesis_metadata, scripted, upper
from unit.test_lambda import INVALID_RESPONSES, STREAM_ARN, ScriptedInvoker, b64

KDS_ARN = "arn:aws:kinesis:us-east-2:123456789012:stream/src"
NAME = ScriptedInvoker.name  # both paths write the same lambdaArn into failed records


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def functions(loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, LocalFunction]]:
    started: dict[str, LocalFunction] = {}
    yield started
    for function in started.values():
        loop.run_until_complete(function.close())


def local(functions: dict[str, LocalFunction], spec: str) -> LocalFunction:
    if spec not in functions:
        functions[spec] = LocalFunction(spec, timeout_secs=20, name=NAME)
    return functions[spec]


def view(outcomes: list[Outcome]) -> list[tuple[Any, ...]]:
    """Everything an outcome says, but the attempt's end time."""
    return [(o.source, o.data, o.result, o.error_code, o.error_message, o.error_output_type, o.attempts,
             o.partition_keys, o.otf, {k: v for k, v in o.meta.items() if k != "attemptEndingTimestamp"})
            for o in outcomes]


def both_paths(loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction], spec: str,
               handler: Any, records: list[SourceRecord], **kwargs: Any) -> tuple[list[Any], list[Any], Any]:
    """(outcomes through the worker, outcomes with the response checked in this process, the
    in-process invoker, which kept every event it was sent)."""
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("stream_arn", STREAM_ARN)
    kwargs.setdefault("region", "us-east-2")
    # What Lambda's runtime hands back: the handler's result through JSON.
    in_process = ScriptedInvoker(lambda event: json.loads(json.dumps(handler(event, None))))
    worker = loop.run_until_complete(invoke_with_retries(local(functions, spec), records, **kwargs))
    daemon = loop.run_until_complete(invoke_with_retries(in_process, records, **kwargs))
    return view(worker), view(daemon), in_process


def scripted_records(response: object, *more: bytes) -> list[SourceRecord]:
    script = json.dumps({"response": response}).encode()
    return [SourceRecord(f"id-{i}", data, 1664028820148 + i) for i, data in enumerate([script, *more])]


@pytest.mark.parametrize(("response", "code"), INVALID_RESPONSES)
def test_every_invalid_response_fails_the_same_way_in_the_worker(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction], response: object, code: str
) -> None:
    worker, daemon, _ = both_paths(loop, functions, "handlers.scripted:handler", scripted.handler,
                                   scripted_records(response))
    assert worker == daemon
    assert worker[0][3] == code


def test_valid_responses_map_to_the_same_outcomes(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    otf = {"destinationDatabaseName": "lake", "destinationTableName": "users", "operation": "update"}
    response = {"records": [  # any order; unpadded and empty base64; keys, otfMetadata, extra members
        {"recordId": "id-3", "result": "ProcessingFailed", "data": b64(b"ignored")},
        {"recordId": "id-1", "result": "Dropped", "data": ""},
        {"recordId": "id-0", "result": "Ok", "data": "WU",
         "metadata": {"partitionKeys": {"customer": "7"}, "otfMetadata": {**otf, "x": "y"}}},
        {"recordId": "id-2", "result": "Ok", "data": b64(b"three"), "extra": 1, "metadata": {}},
    ]}
    worker, daemon, _ = both_paths(loop, functions, "handlers.scripted:handler", scripted.handler,
                                   scripted_records(response, b"one", b"three", b"four"))
    assert worker == daemon
    assert [w[2] for w in worker] == ["Ok", "Dropped", "Ok", "ProcessingFailed"]
    assert worker[0][1] == b"Y" and worker[0][7] == {"customer": "7"} and worker[0][8] == otf
    assert worker[2][1] == b"three" and worker[3][1] == b"four"


def test_randomised_responses_agree(loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]) -> None:
    """Responses mutated at random from a correct one (order, results, data, metadata, ids):
    whatever the daemon's checks make of each, the worker's make the same."""
    rng = random.Random(20261206)
    agreed_ok = agreed_failed = 0
    for _ in range(150):
        payloads = [os.urandom(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 6))]
        ids = [f"id-{i}" for i in range(len(payloads) + 1)]
        items: list[Any] = []
        for i, rid in enumerate(ids):
            data = b64(payloads[i - 1]) if i else b64(b"script")
            item: dict[str, Any] = {"recordId": rid, "result": rng.choice(["Ok", "Ok", "Dropped", "ProcessingFailed"]),
                                    "data": data}
            roll = rng.random()
            if roll < 0.04:
                item["result"] = rng.choice(["ok", None, 1, "Failed"])
            elif roll < 0.08:
                item["data"] = rng.choice([None, 5, "!!", "e", data.rstrip("="), data + "\n", ""])
            elif roll < 0.12:
                item["metadata"] = rng.choice([{"partitionKeys": {"k": "v"}}, {"partitionKeys": {"k": 1}},
                                               {"otfMetadata": {"operation": "delete"}}, "m", None, {}])
            elif roll < 0.14:
                item["recordId"] = rng.choice(["nope", 7, None])
            items.append(item)
        if rng.random() < 0.1:
            items.append(dict(rng.choice(items)))
        if rng.random() < 0.1 and len(items) > 1:
            items.pop(rng.randrange(len(items)))
        rng.shuffle(items)
        response: Any = {"records": items} if rng.random() > 0.03 else items
        # The script record itself is id-0; its data is what the handler reads, so keep it valid.
        worker, daemon, _ = both_paths(loop, functions, "handlers.scripted:handler", scripted.handler,
                                       scripted_records(response, *payloads))
        assert worker == daemon, response
        if worker[0][2] == "ProcessingFailed" and worker[0][3] != "Lambda.ProcessingFailed":
            agreed_failed += 1
        else:
            agreed_ok += 1
    assert agreed_ok > 20 and agreed_failed > 20  # both kinds of verdict were exercised


def test_unchanged_records_come_back_as_the_bytes_sent(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    records = [SourceRecord(str(i), os.urandom(1024), 1) for i in range(500)]
    outcomes = loop.run_until_complete(invoke_with_retries(
        local(functions, "handlers.identity:handler"), records, retries=0, stream_arn=STREAM_ARN,
        region="us-east-2"))
    assert [o.data for o in outcomes] == [r.data for r in records]
    assert all(o.result == "Ok" and o.attempts == 1 for o in outcomes)


def test_transformed_records_with_partition_keys(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    records = [SourceRecord("a", b'{"name":"ada","customer":7}', 1), SourceRecord("b", b"not json", 2)]
    worker, daemon, _ = both_paths(loop, functions, "handlers.upper:handler", upper.handler, records, retries=2)
    assert worker == daemon
    assert json.loads(worker[0][1]) == {"name": "ADA", "customer": 7} and worker[0][7] == {"customer": "7"}
    assert worker[1][2] == "ProcessingFailed" and worker[1][1] == b"not json"


def test_kinesis_source_events_are_built_the_same_in_the_worker(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    kinesis = {"shardId": "shardId-000000000001", "partitionKey": "pk", "sequenceNumber": "4958",
               "approximateArrivalTimestamp": 1664028800000}
    records = [SourceRecord("r0", b"with", 5, kinesis), SourceRecord("r1", b"without", 6)]
    worker, daemon, _ = both_paths(loop, functions, "handlers.kinesis_metadata:handler", kinesis_metadata.handler,
                                   records, source_kinesis_stream_arn=KDS_ARN)
    assert worker == daemon
    doc = json.loads(worker[0][1])
    assert doc["sourceKinesisStreamArn"] == KDS_ARN
    assert doc["kinesisRecordMetadata"]["subsequenceNumber"] == 0


def test_oversized_events_are_measured_and_split_in_the_worker_as_in_the_daemon(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    records = [SourceRecord(f"id-{i}", json.dumps({"name": chr(97 + i) * 300}).encode(), 1) for i in range(8)]
    full = len(json.dumps(build_event(records, invocation_id="0" * 36, delivery_stream_arn=STREAM_ARN,
                                      region="us-east-2"), separators=(",", ":")))
    worker, daemon, in_process = both_paths(loop, functions, "handlers.upper:handler", upper.handler, records,
                                            max_payload_bytes=full // 3)
    assert worker == daemon
    assert [len(e["records"]) for e in in_process.events] == [2, 2, 2, 2]
    assert all(w[2] == "Ok" for w in worker)
    # One record over the limit on its own fails without an invocation, with the size in the message.
    huge = [SourceRecord("small", b'{"name":"x"}', 1), SourceRecord("huge", base64.b64encode(os.urandom(3000)), 1)]
    worker, daemon, _ = both_paths(loop, functions, "handlers.upper:handler", upper.handler, huge,
                                   max_payload_bytes=1000)
    assert worker == daemon
    assert worker[1][2:4] == ("ProcessingFailed", "Lambda.PayloadTooLarge") and worker[1][6] == 0


def test_workers_run_at_a_lower_cpu_priority_than_the_daemon(loop: asyncio.AbstractEventLoop) -> None:
    function = LocalFunction("handlers.identity:handler", timeout_secs=20, processes=2, nice=7)
    try:
        loop.run_until_complete(function.start())
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, w.pid) for w in function.pool._workers] == [min(19, mine + 7)] * 2
    finally:
        loop.run_until_complete(function.close())


def test_a_source_batch_reaches_the_function_as_its_list_of_records_would(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    """The processing stage hands the chain a SourceBatch (its records as columns); the worker gets
    its columns as they are. The event and the outcomes are those of the same records as a list,
    through the worker and in the daemon, also when the event is split in parts (batch slices)."""
    kinesis = {"shardId": "shardId-000000000002", "partitionKey": "pk", "sequenceNumber": "4960"}
    datas = [json.dumps({"name": chr(97 + i) * 300}).encode() for i in range(8)]
    batch = SourceBatch(4000, datas, [1664028820000 + i // 3 for i in range(8)],
                        [kinesis if i % 3 == 1 else None for i in range(8)])
    listed = list(batch)
    assert [r.record_id for r in listed] == [str(4000 + i) for i in range(8)]
    full = len(json.dumps(build_event(listed, invocation_id="0" * 36, delivery_stream_arn=STREAM_ARN,
                                      region="us-east-2"), separators=(",", ":")))
    kwargs: dict[str, Any] = {"retries": 0, "stream_arn": STREAM_ARN, "region": "us-east-2",
                              "source_kinesis_stream_arn": KDS_ARN, "max_payload_bytes": full // 3}
    spec = "handlers.kinesis_metadata:handler"
    from_batch = view(loop.run_until_complete(invoke_with_retries(local(functions, spec), batch, **kwargs)))
    worker, daemon, in_process = both_paths(loop, functions, spec, kinesis_metadata.handler, listed, **kwargs)
    assert from_batch == worker == daemon
    assert [len(e["records"]) for e in in_process.events] == [2, 2, 2, 2]
    docs = [json.loads(o[1]) for o in from_batch]
    assert [d["data"] for d in docs] == [d.decode() for d in datas]
    assert [d["kinesisRecordMetadata"] is not None for d in docs] == [i % 3 == 1 for i in range(8)]


def test_a_batch_given_back_whole_comes_back_compact_with_the_same_outcomes(
    loop: asyncio.AbstractEventLoop, functions: dict[str, LocalFunction]
) -> None:
    """``compact=True`` (the chain, when the function is its only step): records all given back Ok,
    unchanged and without metadata come back as an UnchangedOutcomes, which reads as the list the
    call gives without it; one record changed, dropped or keyed, and it is that list."""
    from firehose.records import UnchangedOutcomes

    records = [SourceRecord(f"id-{i}", json.dumps({"name": "ada", "k": i}).encode(), 5) for i in range(6)]
    numbers = [SourceRecord(f"id-{i}", str(i).encode(), 5) for i in range(6)]
    kwargs: dict[str, Any] = {"retries": 0, "stream_arn": STREAM_ARN, "region": "us-east-2"}

    def call(spec: str, records: list[SourceRecord], compact: bool) -> Any:
        return loop.run_until_complete(invoke_with_retries(local(functions, spec), records, compact=compact, **kwargs))

    whole = call("handlers.identity:handler", records, True)
    assert isinstance(whole, UnchangedOutcomes) and len(whole) == 6
    assert view(list(whole)) == view(call("handlers.identity:handler", records, False))
    assert [o.data for o in whole] == [r.data for r in records] and whole[-1].source == 5
    assert isinstance(call("handlers.drop_even:handler", [numbers[1], numbers[3]], True), UnchangedOutcomes)
    for spec, given in (("handlers.upper:handler", records), ("handlers.drop_even:handler", numbers),
                        ("handlers.partition_key:handler", records)):
        got = call(spec, given, True)
        assert isinstance(got, list) and view(got) == view(call(spec, given, False))
