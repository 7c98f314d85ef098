"""The daemon as operators run it: the CLI, the embedded default, signals, systemd notify."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import Daemon, daemon_config, free_port, local_objects, stream_config, wait_http


def test_run_without_arguments_uses_the_embedded_default(tmp_path: Path) -> None:
    port_busy = socket.socket()
    try:
        port_busy.connect(("127.0.0.1", 4573))
        pytest.skip("port 4573 is in use on this machine; the default config listens there")
    except OSError:
        pass
    finally:
        port_busy.close()
    proc = subprocess.Popen([sys.executable, "-m", "firehose", "run"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http("127.0.0.1", 4573, "/healthz", timeout=30)
        import boto3

        fh = boto3.client("firehose", endpoint_url="http://127.0.0.1:4573", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
        assert fh.list_delivery_streams()["DeliveryStreamNames"] == ["default"]
        fh.put_record(DeliveryStreamName="default", Record={"Data": b"hello default\n"})
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert (tmp_path / "var" / "firehose" / "spool" / "default").is_dir()
    assert list(local_objects(tmp_path / "var" / "delivered").values()) == [b"hello default\n"]


def test_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("streams:\n  - name: a\n    destination: {type: local, path: out, compression: lz4}\n")
    res = subprocess.run([sys.executable, "-m", "firehose", "run", "--config", str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{cfg}:3: streams[0].destination.compression: unknown compression 'lz4'" in res.stderr
    assert not (tmp_path / "var").exists()


def test_sighup_reload_adds_changes_and_removes_streams(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a = stream_config("a", {"type": "local", "path": out, "prefix": "a/"}, buffering={"size_mib": 1, "interval_secs": 900})
    b = stream_config("b", {"type": "local", "path": out, "prefix": "b/"}, buffering={"size_mib": 1, "interval_secs": 900})
    cfg = daemon_config(tmp_path, [a, b])
    d = Daemon(tmp_path, cfg).start()
    try:
        fh = d.firehose()
        fh.put_record(DeliveryStreamName="a", Record={"Data": b"a-before;"})
        fh.put_record(DeliveryStreamName="b", Record={"Data": b"b-before;"})
        # 1. An invalid file is rejected whole; the old config keeps running.
        d.config_path.write_text("streams: [oops\n")
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "config_reload_rejected" for e in d.events()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert fh.list_delivery_streams()["DeliveryStreamNames"] == ["a", "b"]
        # 2. Change a (new prefix), remove b, add c.
        a2 = {**a, "destination": {**a["destination"], "prefix": "a2/"}}
        c = stream_config("c", {"type": "local", "path": out, "prefix": "c/"})
        d.write_config({**cfg, "streams": [a2, c]})
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while fh.list_delivery_streams()["DeliveryStreamNames"] != ["a", "c"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        desc = fh.describe_delivery_stream(DeliveryStreamName="a")["DeliveryStreamDescription"]
        assert desc["VersionId"] == "2"
        assert desc["Destinations"][0]["ExtendedS3DestinationDescription"]["Prefix"] == "a2/"
        fh.put_record(DeliveryStreamName="a", Record={"Data": b"a-after;"})
        fh.put_record(DeliveryStreamName="c", Record={"Data": b"c-new;"})
    finally:
        assert d.stop() == 0
    objs = local_objects(tmp_path / "out")
    by_prefix = {k.split("/")[0]: v for k, v in objs.items()}
    everything = b"".join(objs.values())
    for rec in (b"a-before;", b"b-before;", b"a-after;", b"c-new;"):
        assert everything.count(rec) == 1, rec
    assert b"b-before;" in by_prefix["b"]  # the removed stream flushed on its way out
    assert b"c-new;" in by_prefix["c"]
    # records spooled under version 1 were flushed when a changed; new ones carry version 2
    assert any("/a-2-" in k and b"a-after;" in v for k, v in objs.items())
    assert any("/a-1-" in k and b"a-before;" in v for k, v in objs.items())


def test_version_persists_and_bumps_across_restarts(tmp_path: Path) -> None:
    s = stream_config("v", {"type": "local", "path": str(tmp_path / "out")})
    cfg = daemon_config(tmp_path, [s])
    d = Daemon(tmp_path, cfg).start()
    assert d.firehose().describe_delivery_stream(DeliveryStreamName="v")["DeliveryStreamDescription"]["VersionId"] == "1"
    d.stop()
    d.start()  # same config: same version
    assert d.firehose().describe_delivery_stream(DeliveryStreamName="v")["DeliveryStreamDescription"]["VersionId"] == "1"
    d.stop()
    d.write_config({**cfg, "streams": [{**s, "buffering": {"size_mib": 2, "interval_secs": 1}}]})
    d.start()
    assert d.firehose().describe_delivery_stream(DeliveryStreamName="v")["DeliveryStreamDescription"]["VersionId"] == "2"
    d.stop()


def test_systemd_notify_ready_and_stopping(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    s = stream_config("n", {"type": "local", "path": str(tmp_path / "out")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [s]), env={"NOTIFY_SOCKET": sock_path}).start(wait=False)
    try:
        first = sock.recv(4096).decode()
        assert "READY=1" in first
        wait_http("127.0.0.1", d.port, "/healthz", timeout=10)  # READY is sent only after serving
        d.signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        d.stop()
        sock.close()


def test_metrics_and_healthz(tmp_path: Path) -> None:
    import http.client

    s = stream_config("m", {"type": "local", "path": str(tmp_path / "out")}, buffering={"size_mib": 1, "interval_secs": 0})
    d = Daemon(tmp_path, daemon_config(tmp_path, [s])).start()
    try:
        d.firehose().put_record_batch(DeliveryStreamName="m", Records=[{"Data": b"abc"}] * 4)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            if 'firehose_DeliveryToS3_Records_total{DeliveryStreamName="m"} 4.0' in text:
                break
            time.sleep(0.1)
        assert 'firehose_IncomingRecords_total{DeliveryStreamName="m"} 4.0' in text
        assert 'firehose_IncomingBytes_total{DeliveryStreamName="m"} 12.0' in text
        assert 'firehose_DeliveryToS3_Records_total{DeliveryStreamName="m"} 4.0' in text
    finally:
        d.stop()


def test_systemd_unit_is_type_notify_and_reloads_with_sighup() -> None:
    unit = (Path(__file__).resolve().parents[2] / "config" / "systemd" / "firehose.service").read_text()
    assert "Type=notify" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "firehose run --config /etc/firehose/firehose.yaml" in unit


def test_port_in_use_fails_with_a_clear_message(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        s = stream_config("p", {"type": "local", "path": str(tmp_path / "out")})
        cfg = daemon_config(tmp_path, [s])
        cfg["api"]["listen"] = f"127.0.0.1:{port}"
        d = Daemon(tmp_path, cfg)
        d.start(wait=False)
        assert d.proc is not None
        rc = d.proc.wait(60)
        assert rc != 0
        assert "address already in use" in d.logs().lower()
    finally:
        busy.close()
    _ = free_port, os


def test_custom_prefix_expressions_and_file_extension(tmp_path: Path) -> None:
    import re

    dest = {"type": "local", "path": str(tmp_path / "out"),
            "prefix": "year=!{timestamp:yyyy}/month=!{timestamp:MM}/!{firehose:random-string}/",
            "error_output_prefix": "errors/!{firehose:error-output-type}/", "compression": "gzip",
            "file_extension": ".json.gz"}
    s = stream_config("px", dest, buffering={"size_mib": 1, "interval_secs": 0})
    d = Daemon(tmp_path, daemon_config(tmp_path, [s])).start()
    try:
        d.firehose().put_record(DeliveryStreamName="px", Record={"Data": b'{"a":1}\n'})
        deadline = time.monotonic() + 10
        while not local_objects(tmp_path / "out") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        d.stop()
    (key,) = local_objects(tmp_path / "out")
    assert re.fullmatch(
        r"year=\d{4}/month=\d{2}/[0-9a-z]{11}/px-1-\d{4}(-\d{2}){5}-[0-9a-f-]{36}\.json\.gz", key
    ), key


def test_prefix_rules_are_enforced_at_config_time(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "streams:\n  - name: a\n    destination:\n      type: local\n      path: out\n"
        "      prefix: \"!{firehose:error-output-type}/\"\n"
    )
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{cfg}:3: streams[0].destination:" in res.stderr and "error-output-type" in res.stderr


def test_transform_command_shows_delivered_dropped_and_archived(tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "streams:\n  - name: a\n    processing:\n      - {type: record_deaggregation, format: json}\n"
        "      - {type: append_delimiter}\n    destination: {type: local, path: out}\n"
    )
    res = subprocess.run([sys.executable, "-m", "firehose", "transform", "--config", str(cfg), "--stream", "a"],
                         input=b'{"a":1}{"a":2}\n{"bad":\n', capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r.get("data") for r in rows[:2]] == ['{"a":1}\n', '{"a":2}\n']
    assert rows[2]["result"] == "ProcessingFailed" and rows[2]["errorCode"] == "DeAggregation.JsonParsingFailed"
    assert rows[3] == {"summary": {"records": 2, "delivered": 2, "dropped": 0, "archived": 1}}
    res = subprocess.run([sys.executable, "-m", "firehose", "transform", "--config", str(cfg), "--stream", "zz"],
                         input=b"", capture_output=True, timeout=60)
    assert res.returncode == 2 and b"no stream named 'zz'" in res.stderr


def test_transform_command_shows_each_records_partition(tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "streams:\n  - name: a\n    dynamic_partitioning: {enabled: true}\n    processing:\n"
        "      - {type: metadata_extraction, query: '{customer_id: .customer.id}'}\n"
        "    destination:\n      type: local\n      path: out\n"
        "      prefix: 'customer_id=!{partitionKeyFromQuery:customer_id}/!{timestamp:yyyy}/'\n"
        "      error_output_prefix: 'errors/!{firehose:error-output-type}/'\n"
    )
    res = subprocess.run([sys.executable, "-m", "firehose", "transform", "--config", str(cfg), "--stream", "a"],
                         input=b'{"customer": {"id": 42}}\n{"customer": {}}\n', capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ok, failed, summary = (json.loads(line) for line in res.stdout.splitlines())
    assert ok["queryKeys"] == {"customer_id": "42"}
    assert re.fullmatch(r"customer_id=42/\d{4}/", ok["prefix"])
    assert failed["errorOutputType"] == "partitioning-failed"
    assert failed["errorMessage"] == "partition key 'customer_id' is null (the query found no value)"
    assert summary == {"summary": {"records": 2, "delivered": 1, "dropped": 0, "archived": 1}}


def test_transform_previews_format_conversion_as_the_daemon_archives_it(tmp_path: Path) -> None:
    """A record the schema cannot take is archived by the daemon as format-conversion-failed;
    the preview used to show it as Ok."""
    import json

    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "streams:\n  - name: a\n    format:\n      type: parquet\n"
        "      schema: {columns: [{name: n, type: int}, {name: s, type: string}]}\n"
        "    destination: {type: local, path: out, compression: none}\n"
    )
    res = subprocess.run([sys.executable, "-m", "firehose", "transform", "--config", str(cfg), "--stream", "a"],
                         input=b'{"n": 1, "s": "x"}\n{"n": "many"}\nnot json\n', capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ok, wrong_type, not_json, summary = (json.loads(line) for line in res.stdout.splitlines())
    assert ok == {"record": 0, "result": "Ok", "data": '{"n": 1, "s": "x"}'}
    assert wrong_type["result"] == "ProcessingFailed"
    assert wrong_type["errorOutputType"] == "format-conversion-failed"
    assert wrong_type["errorCode"] == "DataFormatConversion.MalformedData"
    assert "'many'" in wrong_type["errorMessage"]
    assert not_json["errorCode"] == "DataFormatConversion.ParseError"
    assert not_json["errorOutputType"] == "format-conversion-failed"
    assert summary == {"summary": {"records": 3, "delivered": 1, "dropped": 0, "archived": 2}}


def test_transform_output_is_only_json_when_a_handler_runs(tmp_path: Path) -> None:
    """The worker pool logs as it starts; those lines go to stderr, never into the preview."""
    import json

    cfg = tmp_path / "t.yaml"
    cfg.write_text("streams:\n  - name: a\n    processing:\n      - {type: lambda, function: 'handlers.upper:handler'}\n"
                   "    destination: {type: local, path: out}\n")
    res = subprocess.run([sys.executable, "-m", "firehose", "transform", "--config", str(cfg), "--stream", "a"],
                         input=b'{"name": "ada", "customer": 1}\n', capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[0]["result"] == "Ok" and json.loads(rows[0]["data"])["name"] == "ADA"
    assert rows[-1] == {"summary": {"records": 1, "delivered": 1, "dropped": 0, "archived": 0}}
