"""The daemon's collector thresholds (firehose/cli.py: tune_gc): a full collection paused the event
loop for 15-45 ms twice a second under a Lambda load with CPython's defaults (bench/RESULTS.md)."""

from __future__ import annotations

import gc

from firehose.cli import GC_THRESHOLDS, tune_gc


def test_the_daemon_collects_far_less_often_than_cpython_by_default() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 50_000 and GC_THRESHOLDS[2] >= 100
    finally:
        gc.set_threshold(*before)
