"""``firehose redrive``: send archived error records back into a stream, once.

Reads Firehose error records (``processing-failed``, ``format-conversion-failed``,
``partitioning-failed``, ``delivery-failed`` and the destinations' ``*-failed`` types) from a
backup directory or an ``s3://bucket/prefix``, keeps those matching the filters, and sends their
``rawData`` through the daemon's PutRecordBatch.

**Once.** Every request carries ``X-Firehose-Redrive-Id``: a digest of the target stream, the
archive object and the positions of the records in it, so the same selection always makes the
same ids. The daemon records the id in the same spool frame as the records (the position
``redrive/<id>``) and answers a request whose id it already holds with success, storing nothing.
So a second run, or a run after a crash between the daemon's answer and the ledger's write, sends
nothing twice. The ledger (``--ledger``, default ``.firehose-redrive-<stream>.json`` in the
current directory) only lets a resumed run skip the requests already answered. The daemon keeps
the last ``REMEMBERED_IDS`` ids. A different selection of the same records (other filters) makes
other ids.

Records of a destination-failed type were already transformed: sent into a stream that runs a
Lambda, they are transformed again. The command warns when it sees that.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REDRIVE_HEADER = "X-Firehose-Redrive-Id"
REDRIVE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
POSITION_PREFIX = "redrive/"
REMEMBERED_IDS = 10_000  # ids ride in the spool's positions: ~60 bytes each in every checkpoint
MAX_RECORDS, MAX_BYTES = 500, 4 << 20
PROCESSING_TYPES = ("processing-failed", "format-conversion-failed", "partitioning-failed")


# ---------------------------------------------------------------------------- the daemon's side
def redrive_positions(positions: dict[str, Any], redrive_id: str, now_ms: int) -> dict[str, Any] | None:
    """The positions to write with a redriven request's records, or None when the daemon already
    holds ``redrive_id`` (answer success, store nothing). The oldest ids are forgotten beyond
    ``REMEMBERED_IDS``."""
    key = POSITION_PREFIX + redrive_id
    if positions.get(key) is not None:
        return None
    out: dict[str, Any] = {key: now_ms}
    held = [(v, k) for k, v in positions.items() if k.startswith(POSITION_PREFIX) and v is not None]
    if len(held) >= REMEMBERED_IDS:
        held.sort()
        out.update({k: None for _, k in held[: len(held) - REMEMBERED_IDS + 1]})
    return out


# ---------------------------------------------------------------------------- reading archives
@dataclass
class ErrorRecord:
    source: str  # the archive object (path or key)
    index: int  # its place in the object
    error_type: str
    doc: dict[str, Any]

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.doc["rawData"])


def _decode(name: str, body: bytes) -> bytes:
    from firehose.registry import CODECS, load

    get_codec = load(CODECS)
    if body[:2] == b"\x1f\x8b":
        return bytes(get_codec("gzip").decompress(body))
    if body[:4] == b"PK\x03\x04":
        return bytes(get_codec("zip").decompress(body))
    if body[:10] == b"\xff\x06\x00\x00sNaPpY":
        return bytes(get_codec("snappy").decompress(body))
    if name.endswith(".snappy"):
        return bytes(get_codec("hadoop_snappy").decompress(body))
    return body


def _type_of(name: str) -> str:
    """The error-output type, from the archive key (Firehose's layout names it in the path)."""
    found = re.findall(r"(?:^|/)([a-z]+(?:-[a-z]+)*-failed)(?:/|$)", name)
    return found[-1] if found else "unknown"


def _objects(origin: str) -> Iterator[tuple[str, bytes]]:
    """(name, body) of every archive object under a directory or an s3://bucket/prefix, in name order."""
    if origin.startswith("s3://"):
        import boto3

        bucket, _, prefix = origin[5:].partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or None)
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for key in sorted(keys):
            yield key, s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return
    root = Path(origin)
    if not root.is_dir():
        raise RedriveError(f"{origin}: not a directory nor an s3:// URL")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        yield str(path.relative_to(root)), path.read_bytes()


def error_records(origin: str, *, source_stream: str | None = None) -> Iterator[ErrorRecord]:
    for name, body in _objects(origin):
        base = name.rsplit("/", 1)[-1]
        if source_stream is not None and not base.startswith(source_stream + "-"):
            continue
        try:
            text = _decode(name, body)
        except ValueError as exc:
            print(f"firehose redrive: {name}: skipped: not a readable archive object: {exc}", file=sys.stderr)
            continue
        for i, line in enumerate(text.splitlines()):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("rawData"), str):
                yield ErrorRecord(name, i, _type_of(name), doc)


def _when(value: str) -> int:
    """--since/--until: ISO 8601 (UTC unless it says otherwise) or epoch milliseconds."""
    if value.isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {value!r} (ISO 8601 or epoch ms)") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def selected(args: argparse.Namespace) -> Iterator[ErrorRecord]:
    for rec in error_records(args.source, source_stream=args.source_stream):
        ended = rec.doc.get("attemptEndingTimestamp")
        if args.error_type and rec.error_type not in args.error_type:
            continue
        if args.since is not None and not (isinstance(ended, int) and ended >= args.since):
            continue
        if args.until is not None and not (isinstance(ended, int) and ended < args.until):
            continue
        yield rec


def batches(records: Iterator[ErrorRecord], target: str) -> Iterator[tuple[str, list[ErrorRecord]]]:
    """Requests of at most 500 records and 4 MiB, never across archive objects, each with its id."""
    batch: list[ErrorRecord] = []
    size = 0

    def ident(b: list[ErrorRecord]) -> str:
        where = f"{target}\0{b[0].source}\0" + ",".join(str(r.index) for r in b)
        return hashlib.sha256(where.encode()).hexdigest()[:40]

    for rec in records:
        n = len(rec.data)
        if batch and (len(batch) >= MAX_RECORDS or size + n > MAX_BYTES or batch[0].source != rec.source):
            yield ident(batch), batch
            batch, size = [], 0
        batch.append(rec)
        size += n
    if batch:
        yield ident(batch), batch


# ---------------------------------------------------------------------------- the command
class RedriveError(Exception):
    """One line for the CLI."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("redrive", help="send archived error records back into a stream, once",
                       description="Send the rawData of archived error records back into a stream through the "
                                   "daemon's API, once (docs/operations.md, \"Redrive\").")
    p.add_argument("--from", dest="source", required=True, help="a backup directory or s3://bucket/prefix")
    p.add_argument("--stream", required=True, help="the stream the records go to")
    p.add_argument("--source-stream", default=None, help="only records archived by this stream")
    p.add_argument("--endpoint", default="http://127.0.0.1:4573", help="the daemon's API address")
    p.add_argument("--error-type", action="append", default=None,
                   help="only this error-output type (processing-failed, delivery-failed, ...); repeatable")
    p.add_argument("--since", type=_when, default=None, help="attemptEndingTimestamp at or after (ISO 8601 or epoch ms)")
    p.add_argument("--until", type=_when, default=None, help="attemptEndingTimestamp before (ISO 8601 or epoch ms)")
    p.add_argument("--rate", type=float, default=None, help="records per second at most")
    p.add_argument("--ledger", default=None, help="where progress is kept (default .firehose-redrive-<stream>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the selected records as NDJSON; send nothing")
    p.set_defaults(func=cmd_redrive)


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    client = boto3.client("firehose", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                          aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "redrive"),
                          aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "redrive"),
                          config=Config(retries={"max_attempts": 10, "mode": "standard"}))
    return client


def _send(client: Any, stream: str, ident: str, batch: list[ErrorRecord]) -> None:
    """One PutRecordBatch with the redrive id (signed with the request), retried until stored."""
    def add_id(request: Any, **_: Any) -> None:
        request.headers[REDRIVE_HEADER] = ident

    client.meta.events.register_first("before-sign.firehose.PutRecordBatch", add_id, unique_id="redrive-id")
    try:
        for attempt in range(30):
            resp = client.put_record_batch(DeliveryStreamName=stream, Records=[{"Data": r.data} for r in batch])
            if resp["FailedPutCount"] == 0:
                return
            time.sleep(min(5.0, 0.2 * 2 ** attempt))
        raise RedriveError(f"the daemon kept refusing a request ({resp['RequestResponses'][0].get('ErrorCode')})")
    finally:
        client.meta.events.unregister("before-sign.firehose.PutRecordBatch", unique_id="redrive-id")


def cmd_redrive(args: argparse.Namespace) -> int:
    try:
        if args.dry_run:
            for rec in selected(args):
                print(json.dumps({"source": rec.source, "errorType": rec.error_type,
                                  "errorCode": rec.doc.get("errorCode"), "data": rec.doc["rawData"]}))
            return 0
        return _run(args)
    except RedriveError as exc:
        print(f"firehose redrive: {exc}", file=sys.stderr)
        return 1


def _read_ledger(path: Path) -> set[str]:
    """The ids already answered; an unreadable ledger is started afresh (the daemon still
    refuses the ids it holds, so nothing is sent twice)."""
    if not path.exists():
        return set()
    try:
        return set(json.loads(path.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"firehose redrive: warning: {path}: unreadable ledger ({exc}); starting afresh", file=sys.stderr)
        return set()


def _write_ledger(path: Path, stream: str, done: set[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"stream": stream, "done": sorted(done)}))
    os.replace(tmp, path)  # whole or not at all, even if the run is killed mid-write


def _run(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    ledger_path = Path(args.ledger or f".firehose-redrive-{args.stream}.json")
    done = _read_ledger(ledger_path)
    todo = list(batches(selected(args), args.stream))
    client = _client(args.endpoint)
    try:
        desc = client.describe_delivery_stream(DeliveryStreamName=args.stream)["DeliveryStreamDescription"]
    except (ClientError, BotoCoreError) as exc:
        raise RedriveError(f"cannot reach stream {args.stream!r} at {args.endpoint}: {exc}") from None
    transformed = {r.error_type for _, b in todo for r in b} - set(PROCESSING_TYPES)
    if transformed and "ProcessingConfiguration" in json.dumps(desc):
        print(f"firehose redrive: warning: {', '.join(sorted(transformed))} records were already transformed; "
              f"stream {args.stream!r} runs processing and will transform them again", file=sys.stderr)
    total = sum(len(b) for _, b in todo)
    total_bytes = sum(len(r.data) for _, b in todo for r in b)
    sent = 0
    started = time.monotonic()
    with Progress(TextColumn("[bold]redrive"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} records"),
                  TextColumn("{task.fields[mib]:.1f}/{task.fields[total_mib]:.1f} MiB"), TimeRemainingColumn(),
                  transient=not sys.stderr.isatty(), console=None) as progress:
        task = progress.add_task("redrive", total=total, mib=0.0, total_mib=total_bytes / (1 << 20))
        nbytes = 0
        paced = 0  # records sent by this run (the rate applies to them, not to skipped ones)
        for ident, batch in todo:
            if ident not in done:
                try:
                    _send(client, args.stream, ident, batch)
                except (ClientError, BotoCoreError) as exc:
                    raise RedriveError(f"sending to {args.stream!r}: {exc}") from None
                done.add(ident)
                _write_ledger(ledger_path, args.stream, done)
                paced += len(batch)
            sent += len(batch)
            nbytes += sum(len(r.data) for r in batch)
            progress.update(task, completed=sent, mib=nbytes / (1 << 20))
            if args.rate:
                ahead = paced / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    print(f"redrive: {total:,} records in {len(todo):,} requests to {args.stream}")
    return 0
