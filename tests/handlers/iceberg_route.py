"""Route each record to the Iceberg table its ``kind`` field names, with the operation its ``op``
field names (Firehose's otfMetadata); the record passes through unchanged."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    out = []
    for record in event["records"]:
        doc = json.loads(base64.b64decode(record["data"]))
        otf = {"destinationDatabaseName": "lake", "destinationTableName": doc["kind"]}
        if "op" in doc:
            otf["operation"] = doc["op"]
        out.append({"recordId": record["recordId"], "result": "Ok", "data": record["data"],
                    "metadata": {"otfMetadata": otf}})
    return {"records": out}
