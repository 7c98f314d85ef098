"""Upper-case the ``name`` field of JSON records and partition them by ``customer``."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Decode each record as JSON, upper-case ``name``, re-encode with a trailing newline and
    return ``customer`` (as a string) in ``metadata.partitionKeys``; non-JSON records fail."""
    out = []
    for record in event["records"]:
        try:
            doc = json.loads(base64.b64decode(record["data"]))
        except ValueError:
            out.append({"recordId": record["recordId"], "result": "ProcessingFailed", "data": record["data"]})
            continue
        doc["name"] = str(doc.get("name", "")).upper()
        data = base64.b64encode(json.dumps(doc).encode() + b"\n").decode()
        out.append(
            {
                "recordId": record["recordId"],
                "result": "Ok",
                "data": data,
                "metadata": {"partitionKeys": {"customer": str(doc.get("customer", "none"))}},
            }
        )
    return {"records": out}
