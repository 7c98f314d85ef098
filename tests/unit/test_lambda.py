"""Firehose's Lambda contract: the event, response validation, the retry loop and the worker pool."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from firehose.records import Outcome, SourceRecord
from firehose.transforms.lambda_ import (
    LambdaContext,
    LambdaInvocationError,
    LocalFunction,
    build_event,
    invoke_with_retries,
    parse_response,
)
from firehose.transforms.workers import WorkerPool, load_function

T = TypeVar("T")

# The expected codes and messages, written out (not imported from the module under test, or a
# renamed code would still pass). Firehose's CloudWatch Logs codes (reference §11) and its
# Lambda timeout text (reference §4.2):
FUNCTION_ERROR = "Lambda.FunctionError"
JSON_PROCESSING = "Lambda.JsonProcessingException"
MISSING_RECORD_ID = "Lambda.MissingRecordId"
DUPLICATED_RECORD_ID = "Lambda.DuplicatedRecordId"
TIMEOUT_MESSAGE = (
    "Firehose encountered timeout errors when calling AWS Lambda. "
    "The maximum supported function timeout is 5 minutes."
)
# The daemon's own codes, for conditions the reference names no code for (README: Lambda.Timeout):
TIMEOUT = "Lambda.Timeout"
SERVICE_EXCEPTION = "Lambda.ServiceException"
PAYLOAD_TOO_LARGE = "Lambda.PayloadTooLarge"
PROCESSING_FAILED_CODE = "Lambda.ProcessingFailed"
PROCESSING_FAILED_MESSAGE = "The record was marked ProcessingFailed by the function"

STREAM_ARN = "arn:aws:firehose:us-east-2:123456789012:deliverystream/orders"
KDS_ARN = "arn:aws:kinesis:us-east-2:123456789012:stream/src"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def recs(*payloads: bytes, arrival_ms: int = 1664028820148) -> list[SourceRecord]:
    return [SourceRecord(f"id-{i}", p, arrival_ms + i) for i, p in enumerate(payloads)]


def ok_response(
    records: list[SourceRecord], transform: Callable[[bytes], bytes] = lambda d: d
) -> dict[str, Any]:
    return {
        "records": [
            {"recordId": r.record_id, "result": "Ok", "data": b64(transform(r.data))} for r in records
        ]
    }


# ------------------------------------------------------------------------------------------------
# The event
# ------------------------------------------------------------------------------------------------


def test_event_for_direct_put_has_exactly_firehoses_fields() -> None:
    records = [
        SourceRecord("4954698668", b'{"a":1}', 1664028820148),
        SourceRecord("4954698669", b"\x00\xff", 5),
    ]
    event = build_event(records, invocation_id="inv-1", delivery_stream_arn=STREAM_ARN, region="us-east-2")
    assert event == {
        "invocationId": "inv-1",
        "deliveryStreamArn": STREAM_ARN,
        "region": "us-east-2",
        "records": [
            {"recordId": "4954698668", "approximateArrivalTimestamp": 1664028820148, "data": "eyJhIjoxfQ=="},
            {"recordId": "4954698669", "approximateArrivalTimestamp": 5, "data": "AP8="},
        ],
    }
    assert list(event) == ["invocationId", "deliveryStreamArn", "region", "records"]
    assert list(event["records"][0]) == ["recordId", "approximateArrivalTimestamp", "data"]
    assert isinstance(event["records"][0]["approximateArrivalTimestamp"], int)
    # Plain JSON types only: what goes over the wire to Lambda.
    assert json.loads(json.dumps(event)) == event


def test_event_for_kinesis_source_carries_stream_arn_and_record_metadata() -> None:
    meta = {
        "shardId": "shardId-000000000003",
        "partitionKey": "pk",
        "approximateArrivalTimestamp": 1664028820000,
        "sequenceNumber": "49590338271490256608559692538361571095921575989136588898",
        "subsequenceNumber": 0,
    }
    records = [
        SourceRecord("r1", b"x", 1664028820148, kinesis=meta),
        SourceRecord(
            "r2",
            b"y",
            1664028820149,
            kinesis={"shardId": "shardId-000000000001", "partitionKey": "k", "sequenceNumber": "7"},
        ),
    ]
    event = build_event(
        records,
        invocation_id="inv",
        delivery_stream_arn=STREAM_ARN,
        region="us-east-2",
        source_kinesis_stream_arn=KDS_ARN,
    )
    assert list(event) == ["invocationId", "deliveryStreamArn", "sourceKinesisStreamArn", "region", "records"]
    assert event["sourceKinesisStreamArn"] == KDS_ARN
    first, second = event["records"]
    assert list(first) == ["recordId", "approximateArrivalTimestamp", "data", "kinesisRecordMetadata"]
    assert first["kinesisRecordMetadata"] == meta
    assert list(first["kinesisRecordMetadata"]) == list(meta)
    # Missing fields get the record's arrival time and subsequence 0.
    assert second["kinesisRecordMetadata"] == {
        "shardId": "shardId-000000000001",
        "partitionKey": "k",
        "approximateArrivalTimestamp": 1664028820149,
        "sequenceNumber": "7",
        "subsequenceNumber": 0,
    }


def test_event_without_kinesis_metadata_has_no_kinesis_keys() -> None:
    event = build_event(recs(b"a"), invocation_id="i", delivery_stream_arn=STREAM_ARN, region="us-east-2")
    assert "sourceKinesisStreamArn" not in event
    assert "kinesisRecordMetadata" not in event["records"][0]


# ------------------------------------------------------------------------------------------------
# The response
# ------------------------------------------------------------------------------------------------


def test_response_results_map_to_outcomes_in_input_order() -> None:
    records = recs(b"one", b"two", b"three", b"four")
    response = {
        "records": [  # any order: outcomes follow the input
            {"recordId": "id-3", "result": "ProcessingFailed", "data": b64(b"ignored")},
            {"recordId": "id-1", "result": "Dropped", "data": b64(b"")},
            {
                "recordId": "id-0",
                "result": "Ok",
                "data": b64(b"ONE"),
                "metadata": {"partitionKeys": {"customer": "7", "year": "2024"}},
            },
            {"recordId": "id-2", "result": "Ok", "data": b64(b"THREE"), "extra": "ignored", "metadata": {}},
        ]
    }
    outcomes = parse_response(response, records)
    assert [o.source for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[0] == Outcome(0, b"ONE", partition_keys={"customer": "7", "year": "2024"})
    assert outcomes[1] == Outcome(1, b"two", result="Dropped")
    assert outcomes[2] == Outcome(2, b"THREE")
    failed = outcomes[3]
    assert failed.result == "ProcessingFailed"
    assert failed.data == b"four"  # the original bytes, not what the function returned
    assert (failed.error_code, failed.error_message) == (PROCESSING_FAILED_CODE, PROCESSING_FAILED_MESSAGE)
    assert failed.error_output_type == "processing-failed"


def test_otf_metadata_is_kept_for_iceberg_routing_and_unknown_members_dropped() -> None:
    otf = {"destinationDatabaseName": "lake", "destinationTableName": "users", "operation": "update"}
    response = {"records": [
        {"recordId": "id-0", "result": "Ok", "data": b64(b"A"), "metadata": {"otfMetadata": {**otf, "x": "y"}}},
        {"recordId": "id-1", "result": "Ok", "data": b64(b"B"), "metadata": {"partitionKeys": {"k": "v"}}},
    ]}
    first, second = parse_response(response, recs(b"a", b"b"))
    assert (first.otf, first.partition_keys) == (otf, None)
    assert (second.otf, second.partition_keys) == (None, {"k": "v"})


def test_response_may_omit_base64_padding_and_return_empty_data() -> None:
    records = recs(b"a", b"b")
    response = {
        "records": [
            {"recordId": "id-0", "result": "Ok", "data": "YWI"},
            {"recordId": "id-1", "result": "Ok", "data": ""},
        ]
    }
    assert [o.data for o in parse_response(response, records)] == [b"ab", b""]


def test_empty_batch_and_empty_response_are_fine() -> None:
    assert parse_response({"records": []}, []) == []


def _item(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"recordId": "id-0", "result": "Ok", "data": b64(b"x")}
    for key, value in overrides.items():
        if value is _DELETE:
            item.pop(key)
        else:
            item[key] = value
    return item


_DELETE = object()


#: Responses that fail Firehose's checks, each with its code (the worker-side checks are held to
#: the same list in test_lambda_workers.py).
INVALID_RESPONSES = [
    pytest.param([_item()], JSON_PROCESSING, id="array-not-object"),
    pytest.param(None, JSON_PROCESSING, id="null"),
    pytest.param("records", JSON_PROCESSING, id="string"),
    pytest.param({}, JSON_PROCESSING, id="no-records"),
    pytest.param({"records": {"id-0": _item()}}, JSON_PROCESSING, id="records-not-array"),
    pytest.param({"records": ["id-0"]}, JSON_PROCESSING, id="record-not-object"),
    pytest.param({"records": [_item(recordId=_DELETE)]}, JSON_PROCESSING, id="no-record-id"),
    pytest.param({"records": [_item(recordId=0)]}, JSON_PROCESSING, id="numeric-record-id"),
    pytest.param({"records": [_item(result="OK")]}, JSON_PROCESSING, id="result-wrong-case"),
    pytest.param({"records": [_item(result=_DELETE)]}, JSON_PROCESSING, id="no-result"),
    pytest.param({"records": [_item(data=_DELETE)]}, JSON_PROCESSING, id="no-data"),
    pytest.param(
        {"records": [_item(result="Dropped", data=_DELETE)]}, JSON_PROCESSING, id="dropped-no-data"
    ),
    pytest.param({"records": [_item(data=None)]}, JSON_PROCESSING, id="null-data"),
    pytest.param({"records": [_item(data=["eA=="])]}, JSON_PROCESSING, id="data-not-string"),
    pytest.param({"records": [_item(data="not base64!")]}, JSON_PROCESSING, id="bad-base64"),
    pytest.param({"records": [_item(data="eA==\n")]}, JSON_PROCESSING, id="base64-with-newline"),
    pytest.param({"records": [_item(data="e")]}, JSON_PROCESSING, id="base64-impossible-length"),
    pytest.param({"records": [_item(metadata="k=v")]}, JSON_PROCESSING, id="metadata-not-object"),
    pytest.param(
        {"records": [_item(metadata={"partitionKeys": ["a"]})]},
        JSON_PROCESSING,
        id="partition-keys-not-object",
    ),
    pytest.param(
        {"records": [_item(metadata={"partitionKeys": {"year": 2024}})]},
        JSON_PROCESSING,
        id="partition-key-number",
    ),
    pytest.param(
        {"records": [_item(metadata={"partitionKeys": {"k": None}})]},
        JSON_PROCESSING,
        id="partition-key-null",
    ),
    pytest.param({"records": [_item(metadata={"otfMetadata": "t"})]}, JSON_PROCESSING, id="otf-not-object"),
    pytest.param(
        {"records": [_item(metadata={"otfMetadata": {"destinationTableName": 7}})]},
        JSON_PROCESSING,
        id="otf-member-number",
    ),
    pytest.param({"records": [_item(), _item(recordId="id-9")]}, JSON_PROCESSING, id="unknown-record-id"),
    pytest.param({"records": [_item(), _item()]}, DUPLICATED_RECORD_ID, id="duplicate-record-id"),
    pytest.param({"records": []}, MISSING_RECORD_ID, id="missing-record-id"),
]


@pytest.mark.parametrize(("response", "code"), INVALID_RESPONSES)
def test_invalid_responses_fail_the_invocation_with_firehoses_code(response: object, code: str) -> None:
    with pytest.raises(LambdaInvocationError) as info:
        parse_response(response, recs(b"x"))
    assert info.value.code == code
    assert info.value.message
    assert str(info.value).startswith(code + ": ")


def test_missing_record_id_names_the_missing_ids() -> None:
    records = recs(b"a", b"b", b"c")
    with pytest.raises(LambdaInvocationError) as info:
        parse_response({"records": ok_response(records)["records"][:1]}, records)
    assert info.value.code == MISSING_RECORD_ID
    assert "One or more record IDs were not returned" in info.value.message
    assert "'id-1'" in info.value.message and "'id-2'" in info.value.message


def test_metadata_without_partition_keys_is_fine() -> None:
    response = {
        "records": [
            _item(metadata={"other": 1}),
        ]
    }
    assert parse_response(response, recs(b"x"))[0].partition_keys is None
    response = {"records": [_item(metadata=None)]}
    assert parse_response(response, recs(b"x"))[0].partition_keys is None


def test_invocation_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(LambdaInvocationError(TIMEOUT, TIMEOUT_MESSAGE)))
    assert (err.code, err.message) == (TIMEOUT, TIMEOUT_MESSAGE)


# ------------------------------------------------------------------------------------------------
# invoke_with_retries
# ------------------------------------------------------------------------------------------------


class ScriptedInvoker:
    """An in-process invoker: each attempt runs the next step (a callable on the event, or an exception)."""

    name = "arn:aws:lambda:us-east-2:123456789012:function:f:$LATEST"

    def __init__(self, *steps: Callable[[dict[str, Any]], object] | BaseException) -> None:
        self.steps = list(steps)
        self.events: list[dict[str, Any]] = []

    async def invoke(self, event: dict[str, Any]) -> object:
        self.events.append(json.loads(json.dumps(event)))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException):
            raise step
        return step(event)

    async def close(self) -> None:
        pass


def identity(event: dict[str, Any]) -> object:
    return {
        "records": [{"recordId": r["recordId"], "result": "Ok", "data": r["data"]} for r in event["records"]]
    }


def upper(event: dict[str, Any]) -> object:
    return {
        "records": [
            {"recordId": r["recordId"], "result": "Ok", "data": b64(base64.b64decode(r["data"]).upper())}
            for r in event["records"]
        ]
    }


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def invoke(invoker: Any, records: list[SourceRecord], **kwargs: Any) -> list[Outcome]:
    kwargs.setdefault("retries", 3)
    return run(invoke_with_retries(invoker, records, stream_arn=STREAM_ARN, region="us-east-2", **kwargs))


def test_success_first_time() -> None:
    records = recs(b"a", b"b")
    invoker = ScriptedInvoker(upper)
    outcomes = invoke(invoker, records)
    assert outcomes == [Outcome(0, b"A"), Outcome(1, b"B")]
    (event,) = invoker.events
    assert event["deliveryStreamArn"] == STREAM_ARN and event["region"] == "us-east-2"
    assert [r["recordId"] for r in event["records"]] == ["id-0", "id-1"]


def test_each_retry_has_a_new_invocation_id_and_the_same_records() -> None:
    records = recs(b"a", b"b", b"c")
    fail = LambdaInvocationError(FUNCTION_ERROR, "ValueError: boom")
    invoker = ScriptedInvoker(fail, LambdaInvocationError("Lambda.InvokeLimitExceeded", "slow down"), upper)
    outcomes = invoke(invoker, records, retries=3)
    assert [o.data for o in outcomes] == [b"A", b"B", b"C"]
    assert all(o.attempts == 3 for o in outcomes)
    ids = [e["invocationId"] for e in invoker.events]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(len(i) == 36 for i in ids)  # uuids
    assert invoker.events[0]["records"] == invoker.events[1]["records"] == invoker.events[2]["records"]
    assert [list(e) for e in invoker.events] == [
        ["invocationId", "deliveryStreamArn", "region", "records"]
    ] * 3


def test_exhausted_retries_fail_every_record_with_the_last_error_and_original_data() -> None:
    records = recs(b"one", b"two")
    invoker = ScriptedInvoker(
        LambdaInvocationError("Lambda.InvokeLimitExceeded", "throttled"),
        LambdaInvocationError(FUNCTION_ERROR, "ValueError: boom"),
    )
    outcomes = invoke(invoker, records, retries=2, clock=lambda: 1700000000.5)
    assert len(invoker.events) == 3
    for i, outcome in enumerate(outcomes):
        assert outcome.source == i
        assert outcome.result == "ProcessingFailed"
        assert outcome.data == records[i].data
        assert (outcome.error_code, outcome.error_message) == (FUNCTION_ERROR, "ValueError: boom")
        assert outcome.attempts == 3
        assert outcome.error_output_type == "processing-failed"
        assert outcome.meta == {"lambdaArn": invoker.name, "attemptEndingTimestamp": 1700000000500}


def test_zero_retries_means_one_attempt() -> None:
    invoker = ScriptedInvoker(LambdaInvocationError(TIMEOUT, TIMEOUT_MESSAGE))
    outcomes = invoke(invoker, recs(b"a"), retries=0)
    assert len(invoker.events) == 1
    assert outcomes[0].error_code == TIMEOUT and outcomes[0].attempts == 1


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (lambda e: {"records": []}, MISSING_RECORD_ID),
        (lambda e: [identity(e)], JSON_PROCESSING),
        (lambda e: {"records": identity(e)["records"] * 2}, DUPLICATED_RECORD_ID),  # type: ignore[index]
    ],
)
def test_invalid_responses_are_retried_then_fail_with_their_code(
    bad: Callable[[dict[str, Any]], object], code: str
) -> None:
    records = recs(b"a", b"b")
    assert invoke(ScriptedInvoker(bad, identity), records, retries=1) == [
        Outcome(0, b"a", attempts=2),
        Outcome(1, b"b", attempts=2),
    ]
    outcomes = invoke(ScriptedInvoker(bad), records, retries=1)
    assert {(o.error_code, o.attempts) for o in outcomes} == {(code, 2)}


def test_unexpected_invoker_exception_counts_as_service_exception() -> None:
    outcomes = invoke(ScriptedInvoker(RuntimeError("bug")), recs(b"a"), retries=1)
    assert outcomes[0].error_code == SERVICE_EXCEPTION
    assert outcomes[0].error_message == "RuntimeError: bug"


def test_processing_failed_records_carry_attempt_and_error_meta() -> None:
    records = recs(b"good", b"bad")

    def mixed(event: dict[str, Any]) -> object:
        out = identity(event)
        out["records"][1]["result"] = "ProcessingFailed"  # type: ignore[index]
        return out

    outcomes = invoke(ScriptedInvoker(LambdaInvocationError(TIMEOUT, "t"), mixed), records, clock=lambda: 2.0)
    assert outcomes[0] == Outcome(0, b"good", attempts=2)
    assert outcomes[1].error_code == PROCESSING_FAILED_CODE
    assert outcomes[1].data == b"bad" and outcomes[1].attempts == 2
    assert outcomes[1].meta["attemptEndingTimestamp"] == 2000


def test_oversized_batches_are_split_in_halves_until_they_fit() -> None:
    records = [SourceRecord(f"id-{i}", bytes([65 + i]) * 300, 1) for i in range(8)]
    invoker = ScriptedInvoker(upper)
    full = len(
        json.dumps(
            build_event(records, invocation_id="0" * 36, delivery_stream_arn=STREAM_ARN, region="us-east-2"),
            separators=(",", ":"),
        )
    )
    limit = full // 3  # 8 records do not fit, 4 do not, 2 do
    outcomes = invoke(invoker, records, max_payload_bytes=limit)
    assert [len(e["records"]) for e in invoker.events] == [2, 2, 2, 2]
    for event in invoker.events:
        assert len(json.dumps(event, separators=(",", ":"))) <= limit
    assert [o.source for o in outcomes] == list(range(8))
    assert [o.data for o in outcomes] == [r.data.upper() for r in records]


def test_a_single_record_larger_than_the_payload_limit_fails_alone() -> None:
    records = [
        SourceRecord("small-1", b"a", 1),
        SourceRecord("huge", b"x" * 3000, 1),
        SourceRecord("small-2", b"b", 1),
    ]
    invoker = ScriptedInvoker(upper)
    outcomes = invoke(invoker, records, max_payload_bytes=1000)
    assert [o.data for o in outcomes] == [b"A", b"x" * 3000, b"B"]
    assert [o.result for o in outcomes] == ["Ok", "ProcessingFailed", "Ok"]
    assert outcomes[1].error_code == PAYLOAD_TOO_LARGE and outcomes[1].attempts == 0
    assert all(e["records"][0]["recordId"] != "huge" for e in invoker.events)


def test_payload_too_large_from_the_service_splits_instead_of_retrying() -> None:
    records = recs(b"a", b"b", b"c", b"d")

    def picky(event: dict[str, Any]) -> object:
        if len(event["records"]) > 1:
            raise LambdaInvocationError(PAYLOAD_TOO_LARGE, "Request must be smaller than 6291456 bytes")
        return upper(event)

    class Picky(ScriptedInvoker):
        async def invoke(self, event: dict[str, Any]) -> object:
            self.events.append(event)
            return picky(event)

    invoker = Picky(identity)
    outcomes = invoke(invoker, records, retries=3)
    assert [o.data for o in outcomes] == [b"A", b"B", b"C", b"D"]
    assert [len(e["records"]) for e in invoker.events] == [4, 2, 1, 1, 2, 1, 1]


def test_backoff_waits_between_attempts() -> None:
    invoker = ScriptedInvoker(
        LambdaInvocationError(TIMEOUT, "t"), LambdaInvocationError(TIMEOUT, "t"), identity
    )
    started = time.monotonic()
    invoke(invoker, recs(b"a"), retries=2, backoff_secs=0.05)
    assert time.monotonic() - started >= 0.15 - 0.01  # 0.05 + 0.10


def test_no_records_no_invocation() -> None:
    invoker = ScriptedInvoker(identity)
    assert invoke(invoker, []) == []
    assert invoker.events == []


# ------------------------------------------------------------------------------------------------
# Handlers in worker processes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module, so pools started once serve several tests."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def pools(loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, WorkerPool]]:
    """Worker pools by handler, started on first use and closed at the end of the module."""
    started: dict[str, WorkerPool] = {}
    yield started
    for pool in started.values():
        loop.run_until_complete(pool.close())


def pool_for(
    pools: dict[str, WorkerPool],
    loop: asyncio.AbstractEventLoop,
    function: str,
    timeout_secs: float = 10.0,
    processes: int = 1,
) -> WorkerPool:
    key = f"{function}/{timeout_secs}/{processes}"
    if key not in pools:
        pools[key] = WorkerPool(function, processes, timeout_secs)
        loop.run_until_complete(pools[key].start())
    return pools[key]


def context_fields() -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(LambdaContext.create("unit-test"))


def event_for(*payloads: bytes) -> dict[str, Any]:
    return build_event(
        recs(*payloads), invocation_id="inv", delivery_stream_arn=STREAM_ARN, region="us-east-2"
    )


def call(loop: asyncio.AbstractEventLoop, pool: WorkerPool, event: dict[str, Any]) -> object:
    return loop.run_until_complete(pool.call(event, context_fields()))


def worker_pids(pool: WorkerPool) -> set[int | None]:
    return {w.pid for w in pool._workers}


def test_identity_handler_round_trips_a_full_batch(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.identity:handler")
    records = [SourceRecord(str(i), os.urandom(1024), 1) for i in range(500)]
    event = build_event(records, invocation_id="i", delivery_stream_arn=STREAM_ARN, region="us-east-2")
    response = call(loop, pool, event)
    assert [o.data for o in parse_response(response, records)] == [r.data for r in records]


def test_local_function_through_the_retry_loop(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> list[Outcome]:
        function = LocalFunction("handlers.upper:handler", timeout_secs=10)
        try:
            records = [
                SourceRecord("a", b'{"name":"ada","customer":7}', 1),
                SourceRecord("b", b"not json", 2),
            ]
            return await invoke_with_retries(
                function, records, retries=1, stream_arn=STREAM_ARN, region="us-east-2"
            )
        finally:
            await function.close()

    ok, failed = loop.run_until_complete(scenario())
    assert json.loads(ok.data) == {"name": "ADA", "customer": 7}
    assert ok.partition_keys == {"customer": "7"} and ok.attempts == 1
    assert failed.error_code == PROCESSING_FAILED_CODE and failed.data == b"not json"
    assert failed.meta["lambdaArn"] == "handlers.upper:handler"


def test_handler_gets_a_lambda_context(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> list[dict[str, Any]]:
        arn = "arn:aws:lambda:eu-west-1:111122223333:function:enrich:$LATEST"
        function = LocalFunction("handlers.context_echo:handler", timeout_secs=30, name=arn)
        try:
            first = await function.invoke(event_for(b"x"))
            second = await function.invoke(event_for(b"x"))
        finally:
            await function.close()
        responses: list[Any] = [first, second]
        return [json.loads(base64.b64decode(r["records"][0]["data"])) for r in responses]

    first, second = loop.run_until_complete(scenario())
    assert first["function_name"] == "enrich"
    assert first["function_version"] == "$LATEST"
    assert first["invoked_function_arn"] == "arn:aws:lambda:eu-west-1:111122223333:function:enrich:$LATEST"
    assert first["memory_limit_in_mb"] == "128"
    assert first["log_group_name"] == "/aws/lambda/enrich"
    assert "[$LATEST]" in first["log_stream_name"]
    assert 25_000 < first["remaining_ms"] <= 30_000
    assert first["event_keys"] == ["deliveryStreamArn", "invocationId", "region"]
    assert first["aws_request_id"] != second["aws_request_id"]


def test_handler_exception_is_a_function_error(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.raises:handler")
    before = worker_pids(pool)
    with pytest.raises(LambdaInvocationError) as info:
        call(loop, pool, event_for(b"a", b"b"))
    assert info.value.code == FUNCTION_ERROR
    assert info.value.message == "ValueError: cannot transform 2 records"
    assert worker_pids(pool) == before  # the worker survives its handler's exceptions


def test_unserialisable_result_is_a_marshal_error(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.bad_responses:bytes_data")
    with pytest.raises(LambdaInvocationError) as info:
        call(loop, pool, event_for(b"a"))
    assert info.value.code == FUNCTION_ERROR
    assert info.value.message.startswith("Runtime.MarshalError: Unable to marshal response: ")
    assert "bytes is not JSON serializable" in info.value.message


def test_handler_past_the_timeout_is_killed_and_replaced(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=1.0)
    (old_pid,) = worker_pids(pool)
    started = time.monotonic()
    with pytest.raises(LambdaInvocationError) as info:
        call(loop, pool, event_for(b"30"))
    elapsed = time.monotonic() - started
    assert info.value.code == TIMEOUT
    assert info.value.message == TIMEOUT_MESSAGE
    assert 1.0 <= elapsed < 2.0
    assert old_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # gone (and reaped)
    # The pool still works, on a new worker.
    assert call(loop, pool, event_for(b"0")) == identity(event_for(b"0"))
    assert worker_pids(pool) and old_pid not in worker_pids(pool)


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (b"exit", "Runtime exited with error: exit status 3"),
        (b"segv", "Runtime exited with error: signal: segmentation fault"),
    ],
)
def test_crashed_worker_is_a_function_error_and_is_replaced(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool], command: bytes, reason: str
) -> None:
    pool = pool_for(pools, loop, "handlers.crash:on_demand")
    with pytest.raises(LambdaInvocationError) as info:
        call(loop, pool, event_for(command))
    assert info.value.code == FUNCTION_ERROR
    assert info.value.message == f"Runtime.ExitError: {reason}"
    assert call(loop, pool, event_for(b"fine")) == identity(event_for(b"fine"))


def test_sys_exit_in_a_handler_ends_the_runtime(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.crash:sys_exit")
    with pytest.raises(LambdaInvocationError) as info:
        call(loop, pool, event_for(b"a"))
    assert info.value.message == "Runtime.ExitError: Runtime exited with error: exit status 5"


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (
            "handlers.broken_import:handler",
            "cannot load transformation function 'handlers.broken_import:handler': "
            "ModuleNotFoundError: No module named 'firehose_no_such_dependency'",
        ),
        (
            "handlers.identity:no_such_function",
            "cannot load transformation function 'handlers.identity:no_such_function': "
            "AttributeError: ",
        ),
        (
            "no_such_package.transform:handler",
            "cannot load transformation function 'no_such_package.transform:handler': "
            "ModuleNotFoundError: No module named 'no_such_package'",
        ),
    ],
)
def test_import_errors_are_reported_at_start(
    loop: asyncio.AbstractEventLoop, function: str, expected: str
) -> None:
    pool = WorkerPool(function, processes=2, timeout_secs=5)
    with pytest.raises(ValueError) as info:
        loop.run_until_complete(pool.start())
    assert str(info.value).startswith(expected)
    assert pool._workers == set()  # nothing left running
    # Invoking anyway reports Lambda's import error as a function error.
    with pytest.raises(LambdaInvocationError) as call_info:
        call(loop, pool, event_for(b"a"))
    assert call_info.value.code == FUNCTION_ERROR
    assert call_info.value.message.startswith(
        "Runtime.ImportModuleError: cannot load transformation function"
    )
    loop.run_until_complete(pool.close())


def test_load_function_forms() -> None:
    from handlers import identity as module

    assert load_function("handlers.identity:handler") is module.handler
    assert load_function("handlers.identity.handler") is module.handler  # Lambda's "module.function"
    with pytest.raises(ValueError):
        load_function("handler")
    with pytest.raises(TypeError):
        load_function("handlers.upper:json")  # a module, not a callable


def test_at_most_processes_invocations_run_at_once(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=10.0, processes=2)

    async def timed() -> float:
        started = time.monotonic()
        await pool.call(event_for(b"0.6"), context_fields())
        return time.monotonic() - started

    async def scenario() -> tuple[float, list[float]]:
        started = time.monotonic()
        durations = await asyncio.gather(*(timed() for _ in range(4)))
        return time.monotonic() - started, list(durations)

    total, durations = loop.run_until_complete(scenario())
    # Two waves of two: 1.2 s (four at once would take 0.6 s, one at a time 2.4 s).
    assert 1.2 <= total < 2.2
    assert sorted(durations)[2] >= 1.15  # the second wave waited for a free worker
    # Queued time does not count against the timeout: 4 x 0.3 s on one worker (1.2 s in all) with a
    # 0.9 s timeout all succeed.
    quick = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=0.9, processes=1)

    async def queued() -> list[object]:
        return list(
            await asyncio.gather(*(quick.call(event_for(b"0.3"), context_fields()) for _ in range(4)))
        )

    assert len(loop.run_until_complete(queued())) == 4


def test_cancelled_call_kills_its_worker_and_the_pool_recovers(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=10.0)

    async def scenario() -> object:
        task = asyncio.ensure_future(pool.call(event_for(b"30"), context_fields()))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next call must not receive the abandoned invocation's answer.
        return await asyncio.wait_for(pool.call(event_for(b"0"), context_fields()), 5)

    assert loop.run_until_complete(scenario()) == identity(event_for(b"0"))


def test_a_worker_answering_goes_straight_back_to_the_pool_and_every_call_gets_its_own_answer(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    """A worker that answered is handed back to the pool when its answer is settled, before the
    caller resumes; with one worker and many callers at once (some of them cancelled after
    their answer came in) every call still gets exactly its own answer, and no worker is
    killed for it."""
    pool = pool_for(pools, loop, "handlers.identity:handler")
    before = worker_pids(pool)

    async def scenario() -> tuple[list[object], list[dict[str, Any]]]:
        events = [event_for(str(i).encode(), b"x" * (i * 100)) for i in range(30)]
        tasks = [asyncio.ensure_future(pool.call(e, context_fields())) for e in events]
        # Cancel three callers just as their answers may be arriving: a worker released with
        # its answer must not be killed by its caller's cancellation.
        for t in tasks[5:8]:
            loop.call_later(0.01, t.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, events

    results, events = loop.run_until_complete(scenario())
    answered = 0
    for result, event in zip(results, events, strict=True):
        if isinstance(result, asyncio.CancelledError):
            continue
        assert result == identity(event)
        answered += 1
    assert answered >= 27
    if not any(isinstance(r, asyncio.CancelledError) for r in results):
        assert worker_pids(pool) == before
    assert call(loop, pool, event_for(b"after")) == identity(event_for(b"after"))


def test_calls_in_line_are_taken_by_the_worker_in_its_ipc_thread(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    """A worker that answers takes the next call in line at once, in its IPC thread, without a
    turn of the event loop: with one worker and twelve callers, fewer IPC threads are started
    than calls, each call gets its own answer, and the worker is never replaced."""
    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=10.0)
    before = worker_pids(pool)
    submitted = 0
    submit = pool._executor.submit

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal submitted
        submitted += 1
        return submit(*args, **kwargs)

    pool._executor.submit = counting  # type: ignore[method-assign]
    try:
        events = [event_for(b"0.05", str(i).encode()) for i in range(12)]

        async def scenario() -> list[object]:
            return list(await asyncio.gather(*(pool.call(e, context_fields()) for e in events)))

        results = loop.run_until_complete(scenario())
    finally:
        pool._executor.submit = submit  # type: ignore[method-assign]
    assert results == [identity(e) for e in events]
    assert 1 <= submitted < 12
    assert worker_pids(pool) == before


def test_a_call_taken_in_the_ipc_thread_still_times_out_alone(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    """A call the worker took from the line in its IPC thread has the full timeout from its own
    start; when it runs past it, that worker is killed and replaced, and the calls before and
    after it are answered."""
    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=1.0)
    before = worker_pids(pool)
    events = [event_for(b"0.6"), event_for(b"30"), event_for(b"0.6")]

    async def scenario() -> tuple[float, list[object]]:
        started = time.monotonic()
        results = await asyncio.gather(*(pool.call(e, context_fields()) for e in events), return_exceptions=True)
        return time.monotonic() - started, list(results)

    elapsed, results = loop.run_until_complete(scenario())
    assert results[0] == identity(events[0])
    assert isinstance(results[1], LambdaInvocationError) and results[1].code == TIMEOUT
    assert results[2] == identity(events[2])
    assert 2.2 <= elapsed < 5.0  # 0.6 s, then the 1 s timeout, then a new worker and 0.6 s
    assert worker_pids(pool) and not worker_pids(pool) & before


def run_three_calls_cancelling_the_middle_one(
    loop: asyncio.AbstractEventLoop, pool: WorkerPool, first_secs: bytes, last_secs: bytes,
    cancel: Callable[[asyncio.Future[object]], Awaitable[None]],
) -> None:
    """Three calls on a one-worker pool, the middle one (no sleep) cancelled by ``cancel``: the
    other two are answered, and the worker is the same throughout."""
    before = worker_pids(pool)
    events = [event_for(first_secs), event_for(b"0", b"middle"), event_for(last_secs, b"last")]

    async def scenario() -> list[object]:
        tasks = [asyncio.ensure_future(pool.call(e, context_fields())) for e in events]
        await cancel(tasks[1])
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first, middle, last = loop.run_until_complete(scenario())
    assert first == identity(events[0])
    assert isinstance(middle, asyncio.CancelledError)
    assert last == identity(events[2])
    assert worker_pids(pool) == before


def test_a_call_cancelled_in_line_costs_no_worker(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    async def while_waiting(middle: asyncio.Future[object]) -> None:
        await asyncio.sleep(0.2)  # the first call runs for 0.5 s: the middle one is in line
        middle.cancel()

    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=10.0)
    run_three_calls_cancelling_the_middle_one(loop, pool, b"0.5", b"0", while_waiting)


def test_a_call_cancelled_after_its_worker_moved_on_leaves_that_worker_alone(
    loop: asyncio.AbstractEventLoop, pools: dict[str, WorkerPool]
) -> None:
    """A call the worker's thread took from the line, ran and passed on, cancelled before its
    caller resumed: the worker now runs the next call and must not be killed for it."""

    async def before_it_resumes(middle: asyncio.Future[object]) -> None:
        await asyncio.sleep(0.1)

        def hold_the_loop() -> None:
            # Meanwhile the worker answers the first call (0.3 s), runs the middle one and goes
            # on to the last, all in its IPC thread; the middle caller is cancelled before it resumes.
            time.sleep(0.6)
            middle.cancel()

        asyncio.get_running_loop().call_soon(hold_the_loop)

    pool = pool_for(pools, loop, "handlers.sleeps:handler", timeout_secs=10.0)
    run_three_calls_cancelling_the_middle_one(loop, pool, b"0.3", b"0.5", before_it_resumes)


def test_close_is_bounded_and_fails_pending_calls(loop: asyncio.AbstractEventLoop) -> None:
    pool = WorkerPool("handlers.sleeps:handler", processes=1, timeout_secs=60)

    async def scenario() -> tuple[float, list[object]]:
        await pool.start()
        pids = [w.pid for w in pool._workers]
        busy = asyncio.ensure_future(pool.call(event_for(b"30"), context_fields()))
        waiting = asyncio.ensure_future(pool.call(event_for(b"0"), context_fields()))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await pool.close()
        elapsed = time.monotonic() - started
        results = await asyncio.gather(busy, waiting, return_exceptions=True)
        for pid in pids:
            assert pid is not None
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        return elapsed, list(results)

    elapsed, results = loop.run_until_complete(scenario())
    assert elapsed < 3.0
    for result in results:
        assert isinstance(result, LambdaInvocationError) and result.code == SERVICE_EXCEPTION
    with pytest.raises(LambdaInvocationError):
        call(loop, pool, event_for(b"0"))


def test_call_starts_the_pool_when_needed(loop: asyncio.AbstractEventLoop) -> None:
    pool = WorkerPool("handlers.identity:handler")
    try:
        assert call(loop, pool, event_for(b"a")) == identity(event_for(b"a"))
    finally:
        loop.run_until_complete(pool.close())
