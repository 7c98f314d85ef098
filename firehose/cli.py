"""``firehose`` command line: ``run`` and ``validate``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from firehose.config import ConfigError, load_config


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{args.path}: OK ({len(cfg.streams)} stream{'s' if len(cfg.streams) != 1 else ''})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from firehose import logging as fh_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    fh_logging.configure(os.environ.get("FIREHOSE_LOG_LEVEL", "info"))
    from firehose.daemon import Daemon
    from firehose.spool import SpoolError

    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(Daemon(cfg, args.config).run())
    except SpoolError as exc:
        print(f"firehose: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"firehose: cannot start: {exc}", file=sys.stderr)
        return 1


def _cmd_transform(args: argparse.Namespace) -> int:
    """Run a stream's processing chain over sample records (one per input line) and print what
    would be delivered, dropped and archived, one JSON object per line, then a summary."""
    import base64
    import time

    import orjson

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    stream = cfg.stream(args.stream)
    if stream is None:
        names = ", ".join(s.name for s in cfg.streams)
        print(f"{args.config}: no stream named {args.stream!r}; streams: {names}", file=sys.stderr)
        return 2
    from firehose.registry import PROCESSING_CHAIN, load
    from firehose.transforms.records import SourceRecord

    lines = sys.stdin.buffer.read().splitlines()
    now = time.time_ns() // 1_000_000
    records = [SourceRecord(str(i), line, now) for i, line in enumerate(lines)]
    arn = f"arn:aws:firehose:{cfg.api.region}:{cfg.api.account_id}:deliverystream/{stream.name}"
    chain = load(PROCESSING_CHAIN)(stream.processing, stream_arn=arn, region=cfg.api.region)

    async def go() -> list:
        await chain.start()
        try:
            return list(await chain.process(records))
        finally:
            await chain.close()

    outcomes = asyncio.run(go())
    counts = {"Ok": 0, "Dropped": 0, "ProcessingFailed": 0}
    delimiter = chain.delimiter or b""
    for o in outcomes:
        counts[o.result] += 1
        doc: dict[str, object] = {"record": o.source, "result": o.result}
        data = o.data + (delimiter if o.result == "Ok" else b"")
        try:
            doc["data"] = data.decode("utf-8")
        except UnicodeDecodeError:
            doc["dataBase64"] = base64.b64encode(data).decode()
        if o.partition_keys:
            doc["partitionKeys"] = o.partition_keys
        if o.query_keys:
            doc["queryKeys"] = o.query_keys
        if stream.partitioned and o.result == "Ok":
            doc["prefix"] = _partition_prefix(stream, o, now)
        if o.result == "ProcessingFailed":
            doc.update({"errorCode": o.error_code, "errorMessage": o.error_message,
                        "errorOutputType": o.error_output_type})
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    summary = {"records": len(records), "delivered": counts["Ok"], "dropped": counts["Dropped"],
               "archived": counts["ProcessingFailed"]}
    sys.stdout.write(orjson.dumps({"summary": summary}).decode() + "\n")
    return 0


def _partition_prefix(stream: Any, o: Any, now_ms: int) -> str:
    """Where a record would go under dynamic partitioning (its error, if it has no partition)."""
    import random
    from datetime import UTC, datetime

    from firehose.destinations.keys import PrefixError, evaluate_prefix

    keys = {f"partitionKeyFromQuery:{k}": v for k, v in (o.query_keys or {}).items()}
    keys.update({f"partitionKeyFromLambda:{k}": v for k, v in (o.partition_keys or {}).items()})
    try:
        when = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        return evaluate_prefix(stream.destination.prefix, when, random.Random(0), partition_keys=keys)
    except PrefixError as exc:
        return f"partitioning-failed: {exc}"


def _cmd_import_agent_config(args: argparse.Namespace) -> int:
    """Print the firehose config equivalent to a Kinesis Agent agent.json; notes go to stderr."""
    import json

    from firehose.agentconfig import import_agent_config

    try:
        with open(args.path, encoding="utf-8") as f:
            text, notes = import_agent_config(json.load(f))
    except OSError as exc:
        print(f"{args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firehose", description="A self-hosted Firehose-compatible delivery stream daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help="config file (default: the embedded default config)")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate", help="check a config file; exit 0 or print errors and exit 2")
    val.add_argument("path")
    val.set_defaults(func=_cmd_validate)
    tr = sub.add_parser("transform", help="run a stream's processing chain on records read from stdin")
    tr.add_argument("--config", required=True)
    tr.add_argument("--stream", required=True)
    tr.set_defaults(func=_cmd_transform)
    imp = sub.add_parser("import-agent-config", help="print the config equivalent to a Kinesis Agent agent.json")
    imp.add_argument("path")
    imp.set_defaults(func=_cmd_import_agent_config)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
