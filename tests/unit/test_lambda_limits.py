"""Lambda's response size limit, enforced in the worker before the response crosses the pipe."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from firehose.records import SourceRecord
from firehose.transforms.lambda_ import FUNCTION_ERROR, LambdaContext, LambdaInvocationError, build_event
from firehose.transforms.workers import WorkerPool


def test_a_response_over_6_mb_fails_the_invocation_with_function_error() -> None:
    async def go() -> None:
        pool = WorkerPool("handlers.bad_responses:too_large", 1, 30.0)
        await pool.start()
        try:
            records = [SourceRecord(str(i), f"r{i}".encode(), 1_700_000_000_000) for i in range(3)]
            event = build_event(records, invocation_id="inv", delivery_stream_arn="arn:aws:firehose:us-east-1:"
                                "000000000000:deliverystream/s", region="us-east-1")
            fields = asdict(LambdaContext.create("too-large"))
            try:
                await pool.call(event, fields)
            except LambdaInvocationError as exc:
                assert exc.code == FUNCTION_ERROR == "Lambda.FunctionError"
                assert exc.message.startswith("Function.ResponseSizeTooLarge: ")
                assert "6291556 bytes" in exc.message
            else:
                raise AssertionError("an 8 MB response was accepted")
        finally:
            await pool.close()

    asyncio.run(go())
