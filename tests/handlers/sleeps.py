"""A handler that sleeps for the number of seconds given as the first record's payload, then echoes."""

from __future__ import annotations

import base64
import time
from typing import Any

from handlers import identity


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Sleep ``float(first payload)`` seconds (0 when not a number), then behave like identity."""
    try:
        seconds = float(base64.b64decode(event["records"][0]["data"]))
    except (ValueError, IndexError):
        seconds = 0.0
    time.sleep(seconds)
    return identity.handler(event, context)
