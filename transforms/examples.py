"""Example transformation handlers, written to Firehose's Lambda contract, that the example configs
use (config/examples/lambda-transform.yaml). Replace them with your own ``module:function``,
importable from the daemon's working directory or ``PYTHONPATH``; test yours with
:func:`firehose.testing.run_transform` exactly as the tests of these do."""

from __future__ import annotations

import base64
import json
import time
from typing import Any


def enrich(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Add ``processed_at`` (epoch milliseconds) to every JSON object record and end it with a
    newline; a record that is not a JSON object is returned as ``ProcessingFailed`` (the daemon
    archives it under ``processing-failed/`` with Firehose's error record)."""
    now_ms = int(time.time() * 1000)
    out = []
    for record in event["records"]:
        try:
            doc = json.loads(base64.b64decode(record["data"]))
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            out.append({"recordId": record["recordId"], "result": "ProcessingFailed", "data": record["data"]})
            continue
        doc["processed_at"] = now_ms
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        out.append({"recordId": record["recordId"], "result": "Ok", "data": base64.b64encode(data).decode()})
    return {"records": out}


def route_to_iceberg(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Route change records to Iceberg tables (config/examples/iceberg.yaml): a JSON object's
    ``_table`` (``database.table``) and ``_op`` (``insert``, ``update``, ``delete``; default
    insert) become Firehose's ``metadata.otfMetadata`` and are removed from the row; a record
    without ``_table``, or that is not a JSON object, is ``ProcessingFailed``."""
    out = []
    for record in event["records"]:
        try:
            doc = json.loads(base64.b64decode(record["data"]))
        except ValueError:
            doc = None
        table = doc.pop("_table", None) if isinstance(doc, dict) else None
        database, _, name = table.partition(".") if isinstance(table, str) else ("", "", "")
        if not database or not name:
            out.append({"recordId": record["recordId"], "result": "ProcessingFailed", "data": record["data"]})
            continue
        assert isinstance(doc, dict)
        otf = {"destinationDatabaseName": database, "destinationTableName": name,
               "operation": str(doc.pop("_op", "insert"))}
        data = json.dumps(doc, separators=(",", ":")).encode()
        out.append({"recordId": record["recordId"], "result": "Ok", "data": base64.b64encode(data).decode(),
                    "metadata": {"otfMetadata": otf}})
    return {"records": out}
