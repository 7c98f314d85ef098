"""The fuzz run of scripts/fuzz.py, capped for CI (about 100 s on a 2-core machine): mutated API
requests against a daemon without and with SigV4, then damaged spool frames, with a fixed seed.
Any violation fails the test with the fuzzer's summary and the first violating inputs (each
reproducible with ``scripts/fuzz.py --seed 20261206 --replay RUN:INDEX``).

The full run (120,000 inputs) is ``build/dev-venv/bin/python scripts/fuzz.py --requests 90000
--frames 30000 --seed 1 --auth``; see bench/README.md, "Fuzzing". These tests fail while the
daemon has the bugs that run found (a concurrent TagDeliveryStream/UntagDeliveryStream answers
500; a signed header that is not UTF-8 answers 500; salvage trusts frames found inside record
data; a repeated valid RECORDS frame breaks the spool's index): that is what they are for."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261206


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("firehose_fuzz", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


fuzz = _load()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in memory when the machine has /dev/shm (spool fsyncs cost nothing
    there, so the budget goes to inputs), else the test's tmp_path."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="firehose-fuzz-", dir="/dev/shm"))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


def _report(api: list, frames: object | None) -> str:
    lines: list[str] = []
    fuzz.summarize(api, frames, 0.0, out=lines.append, show=8)
    return "\n".join(lines)


def test_fuzzed_api_requests_get_firehose_answers_and_only_acknowledged_records_are_delivered(scratch: Path) -> None:
    result = fuzz.run_api(SEED, 40_000, scratch, max_seconds=45)
    assert result.requests >= 5_000, _report([result], None)
    assert result.stats.violation_count == 0, _report([result], None)


def test_fuzzed_signed_requests_are_answered_and_never_accepted_when_the_signature_does_not_cover_them(scratch: Path) -> None:
    result = fuzz.run_api(SEED, 20_000, scratch, auth=True, max_seconds=30)
    assert result.requests >= 3_000, _report([result], None)
    assert result.stats.violation_count == 0, _report([result], None)


def test_damaged_spool_frames_refuse_to_open_or_keep_every_acknowledged_record(scratch: Path) -> None:
    result = fuzz.run_frames(SEED, 20_000, scratch, max_seconds=30)
    assert result.cases >= 2_000, _report([], result)
    assert result.violation_count == 0, _report([], result)


def test_the_checks_themselves_catch_a_500_loss_duplication_and_unacknowledged_delivery(tmp_path: Path) -> None:
    """The fuzzer's own checks, on made-up answers and a made-up destination."""
    req = fuzz.Req("api", 0, "PutRecord", headers=[(b"Host", b"x")], clean=False, wellformed=False)
    stats = fuzz.Stats()
    fuzz._check_response(req, fuzz.Resp(500, {"content-type": ["application/x-amz-json-1.1"]},
                                        b'{"__type":"InternalFailure","message":"x"}', "HTTP/1.1", True), stats)
    fuzz._check_response(req, fuzz.Resp(503, {}, b"busy", "HTTP/1.1", True), stats)
    fuzz._check_response(req, fuzz.Resp(400, {"content-type": ["application/x-amz-json-1.1"]}, b'{"message":"x"}',
                                        "HTTP/1.1", True), stats)
    assert stats.violation_count == 3, stats.violations

    a, b, c, d = (f"{n:032x}" for n in (1, 2, 3, 4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "obj").write_bytes(f"<FZ{a}>x\n<FZ{a}>x\n<FZ{c}>\n<FZ{d}>\n".encode())
    result = fuzz.ApiResult("api", 1, 1.0, fuzz.Stats())
    result.stats.acked.update({a: 1, b: 1})
    result.stats.unacked.add(c)
    result.stats.indeterminate[d] = 1
    fuzz._check_delivery(result, out)
    kinds = "\n".join(result.stats.violations)
    assert f"marker {a} acknowledged 1x, delivered 2x" in kinds
    assert f"marker {b} acknowledged 1x, never delivered" in kinds
    assert f"marker {c} delivered 1x but never acknowledged (refused)" in kinds
    assert d not in kinds  # the client cut that request short: once is allowed
    assert result.stats.violation_count == 3
