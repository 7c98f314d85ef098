"""Report what the event says about each record's Kinesis origin, as one JSON line per record."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Each record's data becomes ``{"data", "kinesisRecordMetadata", "sourceKinesisStreamArn"}``."""
    out = []
    for r in event["records"]:
        doc = {
            "data": base64.b64decode(r["data"]).decode(),
            "kinesisRecordMetadata": r.get("kinesisRecordMetadata"),
            "sourceKinesisStreamArn": event.get("sourceKinesisStreamArn"),
        }
        out.append({"recordId": r["recordId"], "result": "Ok",
                    "data": base64.b64encode(json.dumps(doc).encode() + b"\n").decode()})
    return {"records": out}
