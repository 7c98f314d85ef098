"""Report the Lambda context the handler received, as JSON in every record's data."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Each record's data becomes the JSON of the context's attributes and the event's top-level keys."""
    info = {
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "event_keys": sorted(k for k in event if k != "records"),
        "invocation_id": event["invocationId"],
    }
    data = base64.b64encode(json.dumps(info).encode()).decode()
    return {"records": [{"recordId": r["recordId"], "result": "Ok", "data": data} for r in event["records"]]}
