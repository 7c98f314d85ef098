"""``firehose import-agent-config``: a Kinesis Agent ``agent.json`` as a firehose config (reference §12.2).

Each Firehose flow (``deliveryStream``) becomes a ``type: file`` source of the stream of that name;
several flows to one delivery stream become several sources of one stream. Its
``dataProcessingOptions`` become the source's ``processing:`` list
(:mod:`firehose.sources.file_options`). Everything else is named in the notes, with why it has no
equivalent and, where one exists in another form, what to use instead; nothing is dropped
silently. The notes are also written as comments at the top of the YAML.

The agent's stream lives in AWS and has a destination there; the YAML gives each stream a local
directory as a placeholder destination, with a comment saying to replace it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from firehose.sources.file_options import from_agent_option

__all__ = ["AGENT_MAX_RECORD_BYTES", "import_agent_config"]

AGENT_MAX_RECORD_BYTES = 1_024_000
"""Kinesis Agent truncates records longer than Firehose's record limit, 1,000 KiB."""

_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")

_CREDENTIALS = ("not needed to read files; destinations that call AWS take access_key_id/secret_access_key "
                "or use boto3's usual credential chain")
_AGENT_CLIENT = "a setting of the agent's HTTP client to the Firehose API, which the file source does not use"
_CLOUDWATCH = "no CloudWatch metrics; the daemon serves Prometheus metrics at /metrics"
_LOGGING = "the daemon logs JSON lines to stderr and serves its metrics at /metrics"

_GLOBAL_NOTES: dict[str, str] = {
    "awsAccessKeyId": _CREDENTIALS,
    "awsSecretAccessKey": _CREDENTIALS,
    "assumeRoleARN": _CREDENTIALS,
    "assumeRoleExternalId": _CREDENTIALS,
    "userDefinedCredentialsProvider.classname": _CREDENTIALS,
    "userDefinedCredentialsProvider.location": _CREDENTIALS,
    "firehose.endpoint": "records go from the file source into the stream directly, not through a Firehose endpoint",
    "kinesis.endpoint": "Kinesis Data Streams flows are not supported",
    "kinesis.region": "Kinesis Data Streams flows are not supported",
    "sts.endpoint": _CREDENTIALS,
    "checkpointFile": ("checkpoints are kept in the stream's spool under data_dir, committed with the records "
                       "they cover, so they survive reboots"),
    "checkpointTimeToLiveDays": "checkpoints live in the stream's spool and need no expiry",
    "maxSendingThreads": _AGENT_CLIENT,
    "maxSendingThreadsPerCore": _AGENT_CLIENT,
    "sendingThreadsKeepAliveMillis": _AGENT_CLIENT,
    "sendingThreadsMaxQueueSize": _AGENT_CLIENT,
    "maxConnections": _AGENT_CLIENT,
    "connectionTimeoutMillis": _AGENT_CLIENT,
    "connectionTTLMillis": _AGENT_CLIENT,
    "socketTimeoutMillis": _AGENT_CLIENT,
    "useTcpKeepAlive": _AGENT_CLIENT,
    "useHttpGzip": _AGENT_CLIENT,
    "shutdownTimeoutMillis": "use the top-level shutdown_timeout_secs (default 30)",
    "log.emitMetrics": _LOGGING,
    "log.emitInternalMetrics": _LOGGING,
    "log.statusReportingPeriodSeconds": _LOGGING,
}

_SEND_BUFFER = ("the agent's send batching; the file source writes records to the stream's spool as it reads "
                "them, and the stream's buffering: (size_mib, interval_secs) decides when objects are delivered")
_AGENT_INTERNAL = "an internal of the agent's tailing and publishing; the file source needs no such setting"

_FLOW_NOTES: dict[str, str] = {
    "maxBufferAgeMillis": _SEND_BUFFER,
    "maxBufferSizeRecords": _SEND_BUFFER,
    "maxBufferSizeBytes": _SEND_BUFFER,
    "publishQueueCapacity": _AGENT_INTERNAL,
    "waitOnFullPublishQueueMillis": _AGENT_INTERNAL,
    "waitOnEmptyPublishQueueMillis": _AGENT_INTERNAL,
    "waitOnFullRetryQueueMillis": _AGENT_INTERNAL,
    "retryInitialBackoffMillis": "delivery retries are the stream's delivery: settings",
    "retryMaxBackoffMillis": "delivery retries are the stream's delivery: settings",
    "minTimeBetweenFilePollsMillis": _AGENT_INTERNAL,
    "maxTimeBetweenFileTrackerRefreshMillis": _AGENT_INTERNAL,
    "aggregatedRecordSizeBytes": ("each record is sent as its own Firehose record (lines are not "
                                  "packed into larger records)"),
    "fileFooterPattern": "the file source reads every file to its end; it has no footer that stops it",
    "partitionKeyOption": "only for Kinesis Data Streams flows",
    "log.emitInternalMetrics": _LOGGING,
}

_FLOW_MAPPED = frozenset({
    "filePattern", "deliveryStream", "kinesisStream", "initialPosition", "multiLineStartPattern",
    "skipHeaderLines", "truncatedRecordTerminator", "dataProcessingOptions",
})

_DESTINATION_COMMENT = ("  # REPLACE: a placeholder. Give the destination the delivery stream has in AWS "
                        "(for example type: s3 with its bucket and prefix).")


def import_agent_config(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """Kinesis Agent agent.json -> (YAML text of an equivalent firehose config, notes naming every
    option that could not be mapped).

    Raises ``ValueError`` when ``doc`` is not an agent.json at all (not an object, ``flows`` not a
    list). Secrets are never copied into the notes or the YAML, only the names of their keys.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"agent.json must be a JSON object, got {type(doc).__name__}")
    flows = doc.get("flows", [])
    if not isinstance(flows, list):
        raise ValueError(f"flows must be a list, got {type(flows).__name__}")
    notes: list[str] = []
    for key in doc:
        if key == "flows":
            continue
        if key in _GLOBAL_NOTES:
            notes.append(f"{key}: not mapped: {_GLOBAL_NOTES[key]}")
        elif key.startswith("cloudwatch."):
            notes.append(f"{key}: not mapped: {_CLOUDWATCH}")
        else:
            notes.append(f"{key}: not mapped: not a Kinesis Agent setting")

    streams: dict[str, list[dict[str, Any]]] = {}
    for i, flow in enumerate(flows):
        where = f"flows[{i}]"
        if not isinstance(flow, Mapping):
            notes.append(f"{where}: not mapped: a flow must be an object")
            continue
        mapped = _flow(flow, where, notes)
        if mapped is not None:
            name, source = mapped
            streams.setdefault(name, []).append(source)
    if not streams:
        notes.append("flows: no flow could be mapped, so the config has no streams")

    config = {"streams": [
        {"name": name, "sources": sources,
         "destination": {"type": "local", "path": f"./var/firehose-out/{name}"}}
        for name, sources in streams.items()
    ]}
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=1000)
    lines = ["# Converted from a Kinesis Agent agent.json by `firehose import-agent-config`."]
    if notes:
        lines.append("# Not mapped (see each reason):")
        lines.extend(f"#   - {note}" for note in notes)
    for line in body.splitlines():
        if line == "  destination:":
            lines.append(_DESTINATION_COMMENT)
        lines.append(line)
    return "\n".join(lines) + "\n", notes


def _flow(flow: Mapping[str, Any], where: str, notes: list[str]) -> tuple[str, dict[str, Any]] | None:
    """One flow as (stream name, file source), or None (with a note) if it cannot be mapped."""
    stream = flow.get("deliveryStream")
    if flow.get("kinesisStream") is not None:
        notes.append(f"{where} (kinesisStream {flow['kinesisStream']!r}): not mapped: Kinesis Data Streams as a "
                     "destination is not supported; send to a delivery stream (deliveryStream) instead")
        return None
    if not isinstance(stream, str) or not stream:
        notes.append(f"{where}: not mapped: it has no deliveryStream")
        return None
    pattern = flow.get("filePattern")
    if not isinstance(pattern, str) or not pattern:
        notes.append(f"{where} ({stream}): not mapped: it has no filePattern")
        return None
    where = f"{where} ({stream}, {pattern})"
    _env_note(pattern, f"{where}.filePattern", notes)

    position = str(flow.get("initialPosition", "END_OF_FILE"))
    if position not in ("START_OF_FILE", "END_OF_FILE"):
        notes.append(f"{where}.initialPosition: {position!r} is not START_OF_FILE or END_OF_FILE; "
                     "used end_of_file, Kinesis Agent's default")
        position = "END_OF_FILE"
    source: dict[str, Any] = {"type": "file", "paths": [pattern], "initial_position": position.lower()}

    start = flow.get("multiLineStartPattern")
    if start:
        try:
            re.compile(str(start).encode(), re.MULTILINE)  # as the file source compiles it
        except re.error as exc:
            notes.append(f"{where}.multiLineStartPattern: not mapped: {start!r} is not a valid Python regular "
                         f"expression ({exc}); translate it and set multi_line_start_pattern")
        else:
            _env_note(str(start), f"{where}.multiLineStartPattern", notes)
            source["multi_line_start_pattern"] = str(start)

    skip = flow.get("skipHeaderLines", 0)
    try:
        source["skip_header_lines"] = int(skip)
    except (TypeError, ValueError):
        notes.append(f"{where}.skipHeaderLines: not mapped: {skip!r} is not a number; used 0")
        source["skip_header_lines"] = 0
    source["max_record_bytes"] = AGENT_MAX_RECORD_BYTES
    source["truncated_record_terminator"] = str(flow.get("truncatedRecordTerminator", "\n"))

    processing = _processing(flow.get("dataProcessingOptions") or [], f"{where}.dataProcessingOptions", notes)
    if processing:
        source["processing"] = processing

    for key in flow:
        if key in _FLOW_MAPPED:
            continue
        reason = _FLOW_NOTES.get(key, "not a Kinesis Agent flow setting")
        notes.append(f"{where}.{key}: not mapped: {reason}")
    return stream, source


def _processing(options: Any, where: str, notes: list[str]) -> list[dict[str, Any]]:
    """A flow's dataProcessingOptions as the file source's ``processing:`` entries; an option that
    cannot be mapped is left out, with a note."""
    if not isinstance(options, list):
        notes.append(f"{where}: not mapped: must be a list")
        return []
    processing: list[dict[str, Any]] = []
    for j, option in enumerate(options):
        at = f"{where}[{j}]"
        if not isinstance(option, Mapping):
            notes.append(f"{at}: not mapped: must be an object")
            continue
        try:
            converted, option_notes = from_agent_option(option)
        except ValueError as exc:
            notes.append(f"{at}: not mapped: {exc}")
            continue
        notes.extend(f"{at}: {n}" for n in option_notes)
        processing.append(converted)
    return processing


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes strings with control characters (a ``"\\n"`` terminator) double-quoted
    on one line, instead of as a folded scalar spread over several lines."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if any(c < " " for c in value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


_Dumper.add_representer(str, _represent_str)


def _env_note(value: str, where: str, notes: list[str]) -> None:
    if _ENV_REF.search(value):
        notes.append(f"{where}: contains ${{...}}, which the config loader expands as an environment variable")
