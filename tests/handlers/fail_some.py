"""Mark records containing ``bad`` as ProcessingFailed.

The failed records come back with a changed payload, which Firehose ignores.
"""

from __future__ import annotations

import base64
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """``ProcessingFailed`` when the payload contains ``b"bad"``; else ``Ok`` with ``b"ok:"`` prepended."""
    out = []
    for record in event["records"]:
        data = base64.b64decode(record["data"])
        if b"bad" in data:
            out.append({"recordId": record["recordId"], "result": "ProcessingFailed", "data": "Y2hhbmdlZA=="})
        else:
            out.append(
                {
                    "recordId": record["recordId"],
                    "result": "Ok",
                    "data": base64.b64encode(b"ok:" + data).decode(),
                }
            )
    return {"records": out}
