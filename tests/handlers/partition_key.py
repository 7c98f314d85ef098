"""Pass records through and partition them by their ``k`` field, whatever it holds."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = []
    for record in event["records"]:
        doc = json.loads(base64.b64decode(record["data"]))
        out.append({"recordId": record["recordId"], "result": "Ok", "data": record["data"],
                    "metadata": {"partitionKeys": {"k": str(doc["k"])}}})
    return {"records": out}
