"""firehose.testing used the way a user tests their own transformation Lambda."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from firehose.testing import TransformResult, TransformRun, make_context, make_event, run_transform
from firehose.transforms.lambda_ import LambdaContext, LambdaInvocationError
from handlers import bad_responses, drop_even, fail_some, identity, raises, upper


def test_json_records_through_a_handler() -> None:
    run = run_transform(upper.handler, [{"name": "ada", "customer": 7}, {"name": "grace", "customer": 9}])

    assert isinstance(run, TransformRun)
    assert [r.json()["name"] for r in run.ok] == ["ADA", "GRACE"]
    assert [r.partition_keys for r in run.ok] == [{"customer": "7"}, {"customer": "9"}]
    assert run.dropped == [] and run.failed == []
    assert run.results[0].text.endswith("\n")


def test_bytes_and_str_records() -> None:
    run = run_transform(identity.handler, [b"\x00\x01raw", "héllo"])
    assert [r.data for r in run.results] == [b"\x00\x01raw", "héllo".encode()]
    assert run.results[1].text == "héllo"


def test_dropped_records_and_their_original_data() -> None:
    run = run_transform(drop_even.handler, ["1", "2", "3", "4"])
    assert [r.text for r in run.ok] == ["1", "3"]
    assert [r.text for r in run.dropped] == ["2", "4"]
    assert [r.result for r in run.results] == ["Ok", "Dropped", "Ok", "Dropped"]


def test_failed_records_keep_their_original_data() -> None:
    run = run_transform(fail_some.handler, [b"fine", b"bad input"])
    assert [r.data for r in run.ok] == [b"ok:fine"]
    (failed,) = run.failed
    assert failed.result == "ProcessingFailed"
    assert (
        failed.data == b"bad input"
    )  # what Firehose writes to the error output, not what the function returned


def test_results_follow_input_order_with_firehose_record_ids() -> None:
    run = run_transform(identity.handler, ["a", "b", "c"])
    ids = [r.record_id for r in run.results]
    assert ids == [rec["recordId"] for rec in run.event["records"]]
    assert len(set(ids)) == 3 and all(i.isdigit() for i in ids)
    assert run.results[0] == TransformResult(ids[0], "Ok", b"a", None)


def test_handler_given_as_a_reference_string() -> None:
    run = run_transform("handlers.upper:handler", [{"name": "x"}])
    assert run.ok[0].json()["name"] == "X"


def test_raw_response_is_what_the_handler_returned() -> None:
    run = run_transform(identity.handler, ["a"])
    assert run.raw_response == {
        "records": [{"recordId": run.results[0].record_id, "result": "Ok", "data": "YQ=="}]
    }


@pytest.mark.parametrize(
    ("handler", "code"),
    [
        (bad_responses.not_a_dict, "Lambda.JsonProcessingException"),
        (bad_responses.no_records, "Lambda.JsonProcessingException"),
        (bad_responses.missing_id, "Lambda.MissingRecordId"),
        (bad_responses.duplicate_id, "Lambda.DuplicatedRecordId"),
        (bad_responses.unknown_id, "Lambda.JsonProcessingException"),
        (bad_responses.bad_result, "Lambda.JsonProcessingException"),
        (bad_responses.bad_base64, "Lambda.JsonProcessingException"),
        (bad_responses.no_data, "Lambda.JsonProcessingException"),
        (bad_responses.numeric_partition_key, "Lambda.JsonProcessingException"),
        (bad_responses.bytes_data, "Lambda.FunctionError"),
    ],
)
def test_contract_violations_raise_firehoses_error_code(handler: Any, code: str) -> None:
    with pytest.raises(LambdaInvocationError) as info:
        run_transform(handler, ["a", "b"])
    assert info.value.code == code


def test_marshal_error_explains_itself() -> None:
    with pytest.raises(
        LambdaInvocationError, match="Runtime.MarshalError: Unable to marshal response: .*bytes"
    ):
        run_transform(bad_responses.bytes_data, ["a"])


def test_nan_in_a_response_is_not_json() -> None:
    def nan(event: dict[str, Any], context: Any) -> Any:
        return {**identity.handler(event, context), "score": float("nan")}

    with pytest.raises(LambdaInvocationError) as info:
        run_transform(nan, ["a"])
    assert info.value.code == "Lambda.JsonProcessingException"


def test_tuples_arrive_as_lists_like_on_lambda() -> None:
    def tuples(event: dict[str, Any], context: Any) -> Any:
        return {"records": tuple(identity.handler(event, context)["records"])}

    assert run_transform(tuples, ["a"]).ok[0].data == b"a"


def test_handler_exceptions_propagate_unchanged() -> None:
    with pytest.raises(ValueError, match="cannot transform 1 records"):
        run_transform(raises.handler, ["a"])


def test_handler_mutating_the_event_is_harmless() -> None:
    def mutating(event: dict[str, Any], context: Any) -> Any:
        for record in event["records"]:
            record["data"] = base64.b64encode(b"changed").decode()
        return identity.handler(event, context)

    run = run_transform(mutating, ["a"])
    assert run.ok[0].data == b"changed"
    assert run.event["records"][0]["data"] == "YQ=="


def test_default_context_looks_like_lambdas() -> None:
    seen: dict[str, Any] = {}

    def spy(event: dict[str, Any], context: Any) -> Any:
        seen["context"] = context
        return identity.handler(event, context)

    run_transform(spy, ["a"])
    context = seen["context"]
    assert isinstance(context, LambdaContext)
    assert context.function_name == "test-function" and context.function_version == "$LATEST"
    assert context.invoked_function_arn == "arn:aws:lambda:us-east-1:000000000000:function:test-function"
    assert context.memory_limit_in_mb == "128"
    assert 0 < context.get_remaining_time_in_millis() <= 60_000


def test_custom_context_and_event_settings() -> None:
    seen: dict[str, Any] = {}

    def spy(event: dict[str, Any], context: Any) -> Any:
        seen.update(event=event, context=context)
        return identity.handler(event, context)

    context = make_context("my-fn", timeout_secs=5, region="eu-west-1", account_id="111122223333")
    run_transform(
        spy,
        ["a"],
        context=context,
        stream_name="clicks",
        region="eu-west-1",
        account_id="111122223333",
        arrival_ms=1700000000000,
    )
    assert seen["context"] is context
    assert (
        seen["event"]["deliveryStreamArn"] == "arn:aws:firehose:eu-west-1:111122223333:deliverystream/clicks"
    )
    assert seen["event"]["region"] == "eu-west-1"
    assert seen["event"]["records"][0]["approximateArrivalTimestamp"] == 1700000000000
    with pytest.raises(TypeError, match="unexpected keyword"):
        run_transform(spy, ["a"], stream="typo")


def test_make_event_for_calling_a_handler_by_hand() -> None:
    before = int(time.time() * 1000)
    event = make_event([b"raw", "text", {"id": 1, "tags": ["a", "b"]}])
    assert list(event) == ["invocationId", "deliveryStreamArn", "region", "records"]
    assert event["deliveryStreamArn"] == "arn:aws:firehose:us-east-1:000000000000:deliverystream/test-stream"
    assert event["region"] == "us-east-1"
    payloads = [base64.b64decode(r["data"]) for r in event["records"]]
    assert payloads == [b"raw", b"text", b'{"id":1,"tags":["a","b"]}']  # compact JSON, no newline
    assert all(r["approximateArrivalTimestamp"] >= before for r in event["records"])
    response = upper.handler(make_event([{"name": "x"}]), make_context())
    assert json.loads(base64.b64decode(response["records"][0]["data"])) == {"name": "X"}


def test_make_event_rejects_other_record_types() -> None:
    with pytest.raises(TypeError, match="bytes, str or dict"):
        make_event([42])  # type: ignore[list-item]
