"""Drop records whose payload is an even integer, keep the rest."""

from __future__ import annotations

import base64
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """``Dropped`` for payloads like ``b"2"``, ``Ok`` (unchanged) for everything else."""
    out = []
    for record in event["records"]:
        text = base64.b64decode(record["data"]).decode()
        even = text.strip().isdigit() and int(text) % 2 == 0
        out.append(
            {"recordId": record["recordId"], "result": "Dropped" if even else "Ok", "data": record["data"]}
        )
    return {"records": out}
