"""A handler that answers whatever its first record tells it to: that record's data is the JSON
``{"response": ...}`` to return, so a test can put any response, valid or not, through a worker."""

from __future__ import annotations

import base64
import json
from typing import Any


def handler(event: dict[str, Any], context: Any) -> Any:
    return json.loads(base64.b64decode(event["records"][0]["data"]))["response"]
