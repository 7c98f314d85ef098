"""RemoteFunction and Firehose's retry loop against a Lambda Invoke API endpoint, through boto3."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from firehose.records import Outcome, SourceRecord
from firehose.transforms.lambda_ import LambdaInvocationError, invoke_with_retries
from firehose.transforms.lambda_remote import RemoteFunction
from handlers import bad_responses, identity, raises, sleeps, upper
from lambda_server import LambdaServer, running

STREAM_ARN = "arn:aws:firehose:us-east-1:123456789012:deliverystream/orders"

# The expected codes and messages, written out (not imported from the module under test).
# Firehose's CloudWatch Logs codes (reference §11) and its Lambda timeout text (reference §4.2):
FUNCTION_ERROR = "Lambda.FunctionError"
INVOKE_LIMIT_EXCEEDED = "Lambda.InvokeLimitExceeded"
JSON_PROCESSING = "Lambda.JsonProcessingException"
RESOURCE_NOT_FOUND = "Lambda.ResourceNotFound"
TIMEOUT_MESSAGE = (
    "Firehose encountered timeout errors when calling AWS Lambda. "
    "The maximum supported function timeout is 5 minutes."
)
# The daemon's own codes for conditions the reference names no code for:
TIMEOUT = "Lambda.Timeout"
SERVICE_EXCEPTION = "Lambda.ServiceException"
PAYLOAD_TOO_LARGE = "Lambda.PayloadTooLarge"


@pytest.fixture(scope="module")
def server() -> Iterator[LambdaServer]:
    yield from running(
        {
            "identity": identity.handler,
            "upper": upper.handler,
            "raises": raises.handler,
            "sleeps": sleeps.handler,
            "not-a-dict": bad_responses.not_a_dict,
            "bytes-data": bad_responses.bytes_data,
        }
    )


@pytest.fixture(autouse=True)
def _reset(server: LambdaServer) -> None:
    # The server is shared by the module: an earlier test's handler may still be running (the
    # read-timeout test abandons a 3 s call); reset() drops it, as it was recorded when it arrived.
    server.reset()


def session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")


def remote(server: LambdaServer, function: str, **kwargs: Any) -> RemoteFunction:
    return RemoteFunction(
        function, region="us-east-1", endpoint_url=server.endpoint, session=session(), **kwargs
    )


def records(*payloads: bytes) -> list[SourceRecord]:
    return [
        SourceRecord(f"4954698668313554428650745793632167567570019247115678515{i}", p, 1700000000000 + i)
        for i, p in enumerate(payloads)
    ]


def transform(function: RemoteFunction, batch: list[SourceRecord], **kwargs: Any) -> list[Outcome]:
    async def scenario() -> list[Outcome]:
        try:
            return await invoke_with_retries(
                function, batch, stream_arn=STREAM_ARN, region="us-east-1", **kwargs
            )
        finally:
            await function.close()

    kwargs.setdefault("retries", 3)
    return asyncio.run(scenario())


def invoke_once(function: RemoteFunction, event: dict[str, Any]) -> object:
    async def scenario() -> object:
        try:
            return await function.invoke(event)
        finally:
            await function.close()

    return asyncio.run(scenario())


def error_of(function: RemoteFunction, event: dict[str, Any]) -> LambdaInvocationError:
    with pytest.raises(LambdaInvocationError) as info:
        invoke_once(function, event)
    return info.value


EVENT = {
    "invocationId": "i",
    "deliveryStreamArn": STREAM_ARN,
    "region": "us-east-1",
    "records": [{"recordId": "r1", "approximateArrivalTimestamp": 1, "data": "YQ=="}],
}


# ------------------------------------------------------------------------------------------------
# The emulated endpoint speaks Lambda's wire protocol (checked with a plain boto3 client)
# ------------------------------------------------------------------------------------------------


def client(server: LambdaServer) -> Any:
    return session().client(
        "lambda",
        endpoint_url=server.endpoint,
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def test_server_success_shape(server: LambdaServer) -> None:
    response = client(server).invoke(FunctionName="identity", Payload=json.dumps(EVENT).encode())
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    assert json.loads(response["Payload"].read()) == identity.handler(EVENT, None)


def test_server_function_error_shape(server: LambdaServer) -> None:
    response = client(server).invoke(FunctionName=server.arn("raises"), Payload=json.dumps(EVENT).encode())
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    body = json.loads(response["Payload"].read())
    assert body["errorMessage"] == "cannot transform 1 records"
    assert body["errorType"] == "ValueError"
    assert isinstance(body["stackTrace"], list) and body["stackTrace"]
    assert body["requestId"] == response["ResponseMetadata"]["RequestId"]


def test_server_errors_as_botocore_sees_them(server: LambdaServer) -> None:
    lam = client(server)
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as not_found:
        lam.invoke(FunctionName="nope", Payload=b"{}")
    assert not_found.value.response["Error"]["Message"] == (
        "Function not found: arn:aws:lambda:us-east-1:123456789012:function:nope"
    )
    assert not_found.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    server.throttle(1)
    with pytest.raises(lam.exceptions.TooManyRequestsException) as throttled:
        lam.invoke(FunctionName="identity", Payload=b"{}")
    assert throttled.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    with pytest.raises(ClientError) as too_large:
        lam.invoke(FunctionName="identity", Payload=json.dumps({"x": "a" * 6_300_000}).encode())
    assert too_large.value.response["Error"]["Code"] == "RequestEntityTooLargeException"
    assert too_large.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName="identity", Payload=b"not json")


def test_server_resolves_every_name_form(server: LambdaServer) -> None:
    lam = client(server)
    for name in [
        "identity",
        "identity:$LATEST",
        "123456789012:function:identity",
        server.arn("identity"),
        server.arn("identity") + ":$LATEST",
    ]:
        assert lam.invoke(FunctionName=name, Payload=json.dumps(EVENT).encode())["StatusCode"] == 200, name
    assert lam.invoke(FunctionName="identity", Qualifier="$LATEST", Payload=b"{}")["StatusCode"] == 200
    with pytest.raises(lam.exceptions.ResourceNotFoundException, match="function:identity:v2"):
        lam.invoke(FunctionName="identity", Qualifier="v2", Payload=b"{}")
    assert lam.invoke(FunctionName="identity", InvocationType="DryRun", Payload=b"{}")["StatusCode"] == 204


# ------------------------------------------------------------------------------------------------
# RemoteFunction
# ------------------------------------------------------------------------------------------------


def test_remote_transform_succeeds(server: LambdaServer) -> None:
    batch = records(b'{"name":"ada","customer":1}', b'{"name":"bob","customer":2}')
    outcomes = transform(remote(server, server.arn("upper")), batch)
    assert [json.loads(o.data)["name"] for o in outcomes] == ["ADA", "BOB"]
    assert [o.partition_keys for o in outcomes] == [{"customer": "1"}, {"customer": "2"}]
    assert [o.attempts for o in outcomes] == [1, 1]
    (invocation,) = server.invocations
    assert invocation.event["deliveryStreamArn"] == STREAM_ARN
    assert [r["recordId"] for r in invocation.event["records"]] == [r.record_id for r in batch]
    assert base64.b64decode(invocation.event["records"][0]["data"]) == batch[0].data


def test_function_error_is_retried_with_new_invocation_ids_then_fails(server: LambdaServer) -> None:
    batch = records(b"a", b"b")
    function = remote(server, "raises")
    outcomes = transform(function, batch, retries=2)
    assert len(server.invocations) == 3  # botocore's own retries are off: one request per attempt
    assert len({i.event["invocationId"] for i in server.invocations}) == 3
    assert all(i.event["records"] == server.invocations[0].event["records"] for i in server.invocations)
    for outcome, record in zip(outcomes, batch, strict=True):
        assert outcome.result == "ProcessingFailed"
        assert outcome.error_code == FUNCTION_ERROR
        assert outcome.error_message == "ValueError: cannot transform 2 records"
        assert outcome.attempts == 3
        assert outcome.data == record.data
        assert outcome.meta["lambdaArn"] == "raises"


def test_throttling_is_invoke_limit_exceeded_and_retried(server: LambdaServer) -> None:
    server.throttle(2)
    outcomes = transform(remote(server, "identity"), records(b"a"), retries=3)
    assert outcomes == [Outcome(0, b"a", attempts=3)]
    assert len(server.invocations) == 1  # the two throttled requests never reached the function

    server.throttle(10)
    (failed,) = transform(remote(server, "identity"), records(b"a"), retries=1)
    assert failed.error_code == INVOKE_LIMIT_EXCEEDED and failed.attempts == 2
    assert "TooManyRequestsException: Rate Exceeded." in (failed.error_message or "")


def test_unknown_function_is_resource_not_found(server: LambdaServer) -> None:
    error = error_of(remote(server, "arn:aws:lambda:us-east-1:123456789012:function:missing"), EVENT)
    assert error.code == RESOURCE_NOT_FOUND
    assert "Function not found: arn:aws:lambda:us-east-1:123456789012:function:missing" in error.message


def test_oversized_request_is_split_on_413(server: LambdaServer) -> None:
    # 4 records of 1.7 MB each: 9+ MB of base64, which the endpoint refuses whole.
    batch = records(*(bytes([65 + i]) * 1_700_000 for i in range(4)))
    outcomes = transform(remote(server, "identity"), batch, max_payload_bytes=50_000_000)
    assert [o.data for o in outcomes] == [r.data for r in batch]
    assert [len(i.event["records"]) for i in server.invocations] == [2, 2]  # 4 -> 413 -> halves


def test_oversized_request_alone_is_payload_too_large(server: LambdaServer) -> None:
    event = {
        **EVENT,
        "records": [{"recordId": "r", "approximateArrivalTimestamp": 1, "data": "A" * 6_400_000}],
    }
    error = error_of(remote(server, "identity"), event)
    assert error.code == PAYLOAD_TOO_LARGE
    assert "RequestEntityTooLargeException: Request must be smaller than 6291456 bytes" in error.message


def test_payload_limit_splits_before_sending(server: LambdaServer) -> None:
    batch = records(*(bytes([65 + i]) * 1_700_000 for i in range(4)))
    outcomes = transform(remote(server, "identity"), batch)  # default 6 MB limit
    assert [o.result for o in outcomes] == ["Ok"] * 4
    assert [len(i.event["records"]) for i in server.invocations] == [2, 2]


def test_read_timeout_is_lambda_timeout(server: LambdaServer) -> None:
    started = time.monotonic()
    error = error_of(
        remote(server, "sleeps", timeout_secs=1.0),
        {
            **EVENT,
            "records": [
                {"recordId": "r", "approximateArrivalTimestamp": 1, "data": base64.b64encode(b"3").decode()}
            ],
        },
    )
    assert (error.code, error.message) == (TIMEOUT, TIMEOUT_MESSAGE)
    assert time.monotonic() - started < 2.5


def test_connection_refused_is_service_exception() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    function = RemoteFunction(
        "identity",
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{port}",
        session=session(),
        connect_timeout_secs=1,
    )
    error = error_of(function, EVENT)
    assert error.code == SERVICE_EXCEPTION
    assert "EndpointConnectionError" in error.message


def test_invalid_responses_are_json_processing_exceptions(server: LambdaServer) -> None:
    (outcome,) = transform(remote(server, "not-a-dict"), records(b"a"), retries=0)
    assert outcome.error_code == JSON_PROCESSING


def test_marshal_error_is_a_function_error(server: LambdaServer) -> None:
    error = error_of(remote(server, "bytes-data"), EVENT)
    assert error.code == FUNCTION_ERROR
    assert error.message.startswith("Runtime.MarshalError: Unable to marshal response:")


def test_function_timeout_on_the_service_is_a_function_error(server: LambdaServer) -> None:
    server.add_function("slow", sleeps.handler, timeout_secs=0.5)
    error = error_of(
        remote(server, "slow"),
        {
            **EVENT,
            "records": [
                {"recordId": "r", "approximateArrivalTimestamp": 1, "data": base64.b64encode(b"2").decode()}
            ],
        },
    )
    assert error.code == FUNCTION_ERROR
    assert "Task timed out after 0.50 seconds" in error.message


def test_qualifier_and_region_from_arn(server: LambdaServer) -> None:
    function = RemoteFunction(
        server.arn("identity"), endpoint_url=server.endpoint, session=session(), qualifier="$LATEST"
    )
    assert function.region == "us-east-1"
    assert invoke_once(function, EVENT) == identity.handler(EVENT, None)
    unknown_version = RemoteFunction(
        "identity", region="us-east-1", endpoint_url=server.endpoint, session=session(), qualifier="7"
    )
    assert error_of(unknown_version, EVENT).code == RESOURCE_NOT_FOUND


def test_concurrent_invocations(server: LambdaServer) -> None:
    function = remote(server, "identity")

    async def scenario() -> list[list[Outcome]]:
        try:
            return list(
                await asyncio.gather(
                    *(
                        invoke_with_retries(
                            function,
                            records(str(i).encode()),
                            retries=0,
                            stream_arn=STREAM_ARN,
                            region="us-east-1",
                        )
                        for i in range(20)
                    )
                )
            )
        finally:
            await function.close()

    results = asyncio.run(scenario())
    assert [r[0].data for r in results] == [str(i).encode() for i in range(20)]
    assert len(server.invocations) == 20
