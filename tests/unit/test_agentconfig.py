"""``firehose import-agent-config``: Kinesis Agent's agent.json as a firehose config, every unmapped
option named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from firehose.agentconfig import import_agent_config

AGENT_JSON: dict[str, Any] = {
    "cloudwatch.emitMetrics": False,
    "firehose.endpoint": "https://firehose.us-east-1.amazonaws.com",
    "awsAccessKeyId": "AKIAIOSFODNN7EXAMPLE",
    "awsSecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "checkpointFile": "/var/run/aws-kinesis-agent/checkpoints",
    "flows": [
        {
            "filePattern": "/var/log/httpd/access_log*",
            "deliveryStream": "web-logs",
            "initialPosition": "START_OF_FILE",
            "maxBufferAgeMillis": 5000,
            "dataProcessingOptions": [
                {"optionName": "LOGTOJSON", "logFormat": "COMBINEDAPACHELOG"},
                {"optionName": "ADDEC2METADATA", "metadataTTL": 600},
            ],
        },
        {
            "filePattern": "/var/log/httpd/error_log*",
            "deliveryStream": "web-logs",
            "multiLineStartPattern": "^\\[",
            "skipHeaderLines": 1,
            "truncatedRecordTerminator": "...\n",
            "aggregatedRecordSizeBytes": 65536,
            "dataProcessingOptions": [
                {"optionName": "SINGLELINE", "parseOptions": ["ESCAPE_NEW_LINE"]},
                {"optionName": "ADDMETADATA", "timestamp": "true", "metadata": {"host": "web-1", "env": "prod"}},
            ],
        },
        {"filePattern": "/var/log/app/events.csv", "deliveryStream": "app-events",
         "fileFooterPattern": "^# end",
         "dataProcessingOptions": [{"optionName": "CSVTOJSON", "customFieldNames": ["ts", "user", "action"],
                                    "delimiter": "\\t"}]},
        {"filePattern": "/var/log/app/audit.log", "kinesisStream": "audit", "partitionKeyOption": "DETERMINISTIC"},
    ],
}

EXPECTED_NOTES = [
    "cloudwatch.emitMetrics: not mapped: no CloudWatch metrics; the daemon serves Prometheus metrics at /metrics",
    "firehose.endpoint: not mapped: records go from the file source into the stream directly, not through a "
    "Firehose endpoint",
    "awsAccessKeyId: not mapped: not needed to read files; destinations that call AWS take "
    "access_key_id/secret_access_key or use boto3's usual credential chain",
    "awsSecretAccessKey: not mapped: not needed to read files; destinations that call AWS take "
    "access_key_id/secret_access_key or use boto3's usual credential chain",
    "checkpointFile: not mapped: checkpoints are kept in the stream's spool under data_dir, committed with the "
    "records they cover, so they survive reboots",
    "flows[0] (web-logs, /var/log/httpd/access_log*).dataProcessingOptions[1]: not mapped: ADDEC2METADATA: EC2 "
    "instance metadata is not looked up; use add_metadata with the values as fixed metadata, or a transform in "
    "the stream's processing: list",
    "flows[0] (web-logs, /var/log/httpd/access_log*).maxBufferAgeMillis: not mapped: the agent's send batching; "
    "the file source writes records to the stream's spool as it reads them, and the stream's buffering: "
    "(size_mib, interval_secs) decides when objects are delivered",
    "flows[1] (web-logs, /var/log/httpd/error_log*).aggregatedRecordSizeBytes: not mapped: each record is sent as "
    "its own Firehose record (lines are not packed into larger records)",
    "flows[2] (app-events, /var/log/app/events.csv).fileFooterPattern: not mapped: the file source reads every "
    "file to its end; it has no footer that stops it",
    "flows[3] (kinesisStream 'audit'): not mapped: Kinesis Data Streams as a destination is not supported; send "
    "to a delivery stream (deliveryStream) instead",
]

EXPECTED_CONFIG = {"streams": [
    {
        "name": "web-logs",
        "sources": [
            {"type": "file", "paths": ["/var/log/httpd/access_log*"], "initial_position": "start_of_file",
             "skip_header_lines": 0, "max_record_bytes": 1024000, "truncated_record_terminator": "\n",
             "processing": [{"type": "log_to_json", "log_format": "combined_apache_log"}]},
            {"type": "file", "paths": ["/var/log/httpd/error_log*"], "initial_position": "end_of_file",
             "multi_line_start_pattern": "^\\[", "skip_header_lines": 1, "max_record_bytes": 1024000,
             "truncated_record_terminator": "...\n",
             "processing": [{"type": "single_line", "escape_new_line": True},
                            {"type": "add_metadata", "timestamp": True, "metadata": {"host": "web-1", "env": "prod"}}]},
        ],
        "destination": {"type": "local", "path": "./var/firehose-out/web-logs"},
    },
    {
        "name": "app-events",
        "sources": [
            {"type": "file", "paths": ["/var/log/app/events.csv"], "initial_position": "end_of_file",
             "skip_header_lines": 0, "max_record_bytes": 1024000, "truncated_record_terminator": "\n",
             "processing": [{"type": "csv_to_json", "field_names": ["ts", "user", "action"], "delimiter": "\t"}]},
        ],
        "destination": {"type": "local", "path": "./var/firehose-out/app-events"},
    },
]}

REPLACE = ("  # REPLACE: a placeholder. Give the destination the delivery stream has in AWS "
           "(for example type: s3 with its bucket and prefix).")


def test_two_flows_to_one_stream_and_every_unmapped_option_named() -> None:
    text, notes = import_agent_config(AGENT_JSON)
    assert notes == EXPECTED_NOTES
    assert yaml.safe_load(text) == EXPECTED_CONFIG
    lines = text.splitlines()
    # The notes head the YAML as comments, in the same order.
    assert lines[0] == "# Converted from a Kinesis Agent agent.json by `firehose import-agent-config`."
    assert lines[1] == "# Not mapped (see each reason):"
    assert lines[2:2 + len(notes)] == [f"#   - {n}" for n in notes]
    assert lines[2 + len(notes)] == "streams:"
    # Each placeholder destination carries a comment saying to replace it.
    assert [lines[i - 1] for i, line in enumerate(lines) if line == "  destination:"] == [REPLACE, REPLACE]
    assert '    truncated_record_terminator: "...\\n"' in lines
    # Secrets are named, never copied.
    assert "wJalrXUtnFEMI" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    assert not any("wJalrXUtnFEMI" in n for n in notes)


def test_loads_as_a_firehose_config() -> None:
    from firehose.config import load_config_text

    text, _ = import_agent_config(AGENT_JSON)
    cfg = load_config_text(text, "agent.yaml", env={})
    assert [s.name for s in cfg.streams] == ["web-logs", "app-events"]


def test_small_configs_and_odd_values() -> None:
    text, notes = import_agent_config({"flows": [{"filePattern": "/tmp/app.log", "deliveryStream": "s"}]})
    assert notes == []
    assert text.splitlines()[:2] == ["# Converted from a Kinesis Agent agent.json by `firehose import-agent-config`.",
                                     "streams:"]
    assert yaml.safe_load(text)["streams"][0]["sources"] == [
        {"type": "file", "paths": ["/tmp/app.log"], "initial_position": "end_of_file", "skip_header_lines": 0,
         "max_record_bytes": 1024000, "truncated_record_terminator": "\n"}]

    text, notes = import_agent_config({"shutdownTimeoutMillis": 5000, "flows": [
        {"filePattern": "/l/${HOST}.log", "deliveryStream": "s", "initialPosition": "LATEST",
         "multiLineStartPattern": "(?<ts>\\d+)", "skipHeaderLines": "two", "bogus": 1,
         "dataProcessingOptions": [{"optionName": "ADDBRACKETS"}]},
        {"filePattern": "/x"}, "flow",
    ]})
    where = "flows[0] (s, /l/${HOST}.log)"
    assert notes == [
        "shutdownTimeoutMillis: not mapped: use the top-level shutdown_timeout_secs (default 30)",
        f"{where}.filePattern: contains ${{...}}, which the config loader expands as an environment variable",
        f"{where}.initialPosition: 'LATEST' is not START_OF_FILE or END_OF_FILE; used end_of_file, Kinesis Agent's default",
        f"{where}.multiLineStartPattern: not mapped: '(?<ts>\\\\d+)' is not a valid Python regular expression "
        "(unknown extension ?<t at position 1); translate it and set multi_line_start_pattern",
        f"{where}.skipHeaderLines: not mapped: 'two' is not a number; used 0",
        f"{where}.dataProcessingOptions[0]: not mapped: ADDBRACKETS: no equivalent option; wrap records in a "
        "transform in the stream's processing: list",
        f"{where}.bogus: not mapped: not a Kinesis Agent flow setting",
        "flows[1]: not mapped: it has no deliveryStream",
        "flows[2]: not mapped: a flow must be an object",
    ]
    assert yaml.safe_load(text)["streams"][0]["sources"] == [
        {"type": "file", "paths": ["/l/${HOST}.log"], "initial_position": "end_of_file", "skip_header_lines": 0,
         "max_record_bytes": 1024000, "truncated_record_terminator": "\n"}]

    text, notes = import_agent_config({"flows": []})
    assert notes == ["flows: no flow could be mapped, so the config has no streams"]
    assert yaml.safe_load(text) == {"streams": []}
    with pytest.raises(ValueError, match="^flows must be a list, got dict$"):
        import_agent_config({"flows": {}})
    with pytest.raises(ValueError, match="^agent.json must be a JSON object, got list$"):
        import_agent_config([])  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "firehose", "import-agent-config", *args],
                          capture_output=True, text=True, cwd=root, timeout=60)


def test_cli(tmp_path: Path) -> None:
    agent = tmp_path / "agent.json"
    agent.write_text(json.dumps(AGENT_JSON))
    out = _cli(str(agent))
    assert out.returncode == 0, out.stderr
    assert out.stdout == import_agent_config(AGENT_JSON)[0]
    assert out.stderr.splitlines() == [f"note: {n}" for n in EXPECTED_NOTES]

    bad = tmp_path / "bad.json"
    bad.write_text('{"flows": [}')
    out = _cli(str(bad))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"{bad}: Expecting value: line 1 column 12 (char 11)\n"

    out = _cli(str(tmp_path / "missing.json"))
    assert (out.returncode, out.stderr) == (2, f"{tmp_path / 'missing.json'}: No such file or directory\n")

    wrong = tmp_path / "wrong.json"
    wrong.write_text("[1]")
    out = _cli(str(wrong))
    assert (out.returncode, out.stderr) == (2, f"{wrong}: agent.json must be a JSON object, got list\n")
