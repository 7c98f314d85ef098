"""Partition keys, prefixes and planted symlinks never put a file outside the local destination's
path: a key value is one path segment there (escaped reversibly), literal prefixes that climb are
refused by validate, and directories are walked without following links."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import orjson
import pytest
import yaml

from support import Daemon, daemon_config, stream_config, wait_for

HOSTILE = ["/x/evil", "../../x", "../../../../../../x/evil", "..", ".", "a\\b", "%2e%2e", "ok", "new\nline",
           "tab\there", "ünï/cødé"]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name}


def _everything_outside(tmp: Path, inside: list[Path]) -> list[Path]:
    """Every file under ``tmp`` that is not under one of ``inside`` (nor the daemon's own)."""
    allowed = [p.resolve() for p in inside] + [(tmp / "data").resolve()]
    out = []
    for p in tmp.rglob("*"):
        if p.is_file() and p.name not in ("firehose.yaml", "daemon.log"):
            rp = p.resolve()
            if not any(rp.is_relative_to(a) for a in allowed):
                out.append(p)
    return out


@pytest.mark.parametrize("source", ["jq", "lambda"])
def test_hostile_partition_keys_stay_inside_the_destination(tmp_path: Path, source: str) -> None:
    root = tmp_path / "a" / "b" / "out"
    if source == "jq":
        processing = [{"type": "metadata_extraction", "query": "{k: .k}"}, {"type": "append_delimiter"}]
        ref = "partitionKeyFromQuery"
    else:
        processing = [{"type": "lambda", "function": "handlers.partition_key:handler", "buffer_interval_secs": 0},
                      {"type": "append_delimiter"}]
        ref = "partitionKeyFromLambda"
    stream = stream_config("p", {"type": "local", "path": str(root), "prefix": f"data/k=!{{{ref}:k}}/",
                                 "error_output_prefix": "errors/!{firehose:error-output-type}/"},
                           dynamic_partitioning={"enabled": True}, processing=processing)
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": orjson.dumps({"k": k, "i": i})} for i, k in enumerate(HOSTILE)])
        wait_for(lambda: sum(len(v.splitlines()) for v in _files(root).values()) >= len(HOSTILE), 60,
                 "every record delivered")
    finally:
        assert d.stop() == 0
    assert _everything_outside(tmp_path, [root]) == []
    by_key: dict[str, list[int]] = {}
    for path, data in _files(root).items():
        rel = path.relative_to(root).parts
        assert rel[0] == "data" and rel[1].startswith("k="), rel
        for line in data.splitlines():
            by_key.setdefault(urllib.parse.unquote(rel[1][2:]), []).append(orjson.loads(line)["i"])
    # Each value is one directory, and decodes back to itself ("." and ".." are written %2E).
    assert by_key == {k: [i] for i, k in enumerate(HOSTILE)}


def test_a_symlink_planted_inside_the_root_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "data").mkdir(parents=True)
    (root / "data" / "k=ok").symlink_to(elsewhere)
    stream = stream_config("p", {"type": "local", "path": str(root), "prefix": "data/k=!{partitionKeyFromQuery:k}/",
                                 "error_output_prefix": "errors/!{firehose:error-output-type}/"},
                           dynamic_partitioning={"enabled": True},
                           processing=[{"type": "metadata_extraction", "query": "{k: .k}"}])
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record(DeliveryStreamName="p", Record={"Data": b'{"k": "ok"}'})
        wait_for(lambda: any(e.get("event") == "delivery_retry_scheduled" for e in d.events()), 60,
                 "the write through the link refused")
    finally:
        d.stop()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("field", "value"), [("prefix", "../../escape/"), ("error_output_prefix", "/abs/"),
                                              ("prefix", "a/./b/"), ("prefix", "/etc/")])
def test_validate_refuses_local_prefixes_that_leave_the_path(tmp_path: Path, field: str, value: str) -> None:
    dest = {"type": "local", "path": str(tmp_path / "out"), field: value}
    if field == "error_output_prefix":
        dest["prefix"] = "ok/"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(daemon_config(tmp_path, [stream_config("s", dest)])))
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2, res.stdout
    assert f"streams[0].destination.{field}" in res.stderr or "streams[0].destination" in res.stderr
    assert "destination's path" in res.stderr


def test_s3_keeps_firehoses_behaviour_for_the_same_prefix(tmp_path: Path) -> None:
    dest = {"type": "s3", "bucket": "my-bucket", "prefix": "../../escape/"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(daemon_config(tmp_path, [stream_config("s", dest)])))
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True,
                         env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    assert res.returncode == 0, res.stderr


def test_a_key_that_cannot_be_one_path_segment_is_archived_as_partitioning_failed(tmp_path: Path) -> None:
    root = tmp_path / "out"
    stream = stream_config("p", {"type": "local", "path": str(root), "prefix": "data/k=!{partitionKeyFromQuery:k}/",
                                 "error_output_prefix": "errors/!{firehose:error-output-type}/"},
                           dynamic_partitioning={"enabled": True},
                           processing=[{"type": "metadata_extraction", "query": "{k: .k}"},
                                       {"type": "append_delimiter"}])
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="p", Records=[
            {"Data": orjson.dumps({"k": "/" * 100})}, {"Data": orjson.dumps({"k": "fine"})}])
        wait_for(lambda: len(_files(root)) >= 2, 60, "both records written")
    finally:
        assert d.stop() == 0
    files = {str(p.relative_to(root)): data for p, data in _files(root).items()}
    failed = [k for k in files if k.startswith("errors/partitioning-failed/")]
    assert len(failed) == 1 and any(k.startswith("data/k=fine/") for k in files), list(files)
    error = orjson.loads(files[failed[0]].splitlines()[0])
    assert error["errorCode"] and "path segment" in error["errorMessage"]
