"""A handler that always raises."""

from __future__ import annotations

from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Raise ``ValueError("cannot transform <n> records")``."""
    raise ValueError(f"cannot transform {len(event['records'])} records")
