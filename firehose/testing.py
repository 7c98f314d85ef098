"""Test your Firehose transformation Lambda the way the daemon (and Amazon Kinesis Data Firehose)
runs it: ``from firehose.testing import run_transform``.

This is the name users import; the harness itself lives with the transforms
(``firehose.transforms.testing``, loaded here through the registry, as the core reaches every
plugin-side module). See that module for the whole story: the event it builds, the response
checks, and the errors Firehose would report."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from firehose.registry import HARNESS

if TYPE_CHECKING:  # the names and their types, for editors and type checkers
    from firehose.transforms.testing import (
        TransformResult,
        TransformRun,
        make_context,
        make_event,
        make_records,
        run_transform,
    )
else:
    _harness = importlib.import_module(HARNESS)
    TransformResult = _harness.TransformResult
    TransformRun = _harness.TransformRun
    make_context = _harness.make_context
    make_event = _harness.make_event
    make_records = _harness.make_records
    run_transform = _harness.run_transform

__all__ = ["TransformResult", "TransformRun", "make_context", "make_event", "make_records", "run_transform"]
