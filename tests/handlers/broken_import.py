"""A handler module that cannot be imported (its dependency is missing)."""

from __future__ import annotations

import firehose_no_such_dependency  # noqa: F401  (the point of this module)


def handler(event: object, context: object) -> object:
    return event
