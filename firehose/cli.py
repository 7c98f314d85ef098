"""``firehose`` command line: ``run``, ``validate``, ``transform``, ``import-agent-config`` and
``config-schema``.

Every problem is one line on stderr, never a traceback: config problems as
``file:line: field: message``, start failures as ``firehose: cannot start: ...``. Exit status 2
means a problem with what was given (config, arguments, handlers, schemas), 1 a failure of the
system (an OS error at start, an unexpected error), 130 an interrupt.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import textwrap
from typing import Any, NoReturn

from firehose.config import ConfigError, load_config


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _problems(lines: list[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return 2


def _cmd_validate(args: argparse.Namespace) -> int:
    from firehose.config_checks import validate_file

    cfg, problems = validate_file(args.path, handler_timeout_secs=args.import_timeout)
    if problems or cfg is None:
        return _problems(problems)
    print(f"{args.path}: OK ({len(cfg.streams)} stream{'s' if len(cfg.streams) != 1 else ''})")
    return 0


def _cmd_export_config(args: argparse.Namespace) -> int:
    import yaml

    from firehose.control import API_STREAMS_FILE

    try:
        cfg = load_config(args.config)
        if args.config is None:
            from importlib import resources

            raw = yaml.safe_load(resources.files("firehose").joinpath("default.yaml").read_text()) or {}
        else:
            with open(args.config, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}  # as written: ${ENV} references stay references
        api_path = os.path.join(cfg.data_dir, API_STREAMS_FILE)
        api_streams: list[Any] = []
        if cfg.cluster is not None and cfg.api.control_plane:  # they live in the cluster's JetStream
            from firehose.control_cluster import read_api_streams

            api_streams = read_api_streams(cfg.cluster)
        elif os.path.exists(api_path):
            with open(api_path, encoding="utf-8") as f:
                doc = yaml.safe_load(f) or {}
            deleting = set(doc.get("deleting") or [])
            api_streams = [s for s in doc.get("streams") or [] if s.get("name") not in deleting]
    except ConfigError as exc:
        return _problems(exc.errors)
    except (OSError, yaml.YAMLError) as exc:
        print(f"firehose: cannot export the config: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - NATS refused or unreachable: one line, not a traceback
        print(f"firehose: cannot read the API streams from the cluster's JetStream: {_one_line(exc)}",
              file=sys.stderr)
        return 2
    raw["streams"] = [*(raw.get("streams") or []), *api_streams]
    sys.stdout.write(yaml.safe_dump(raw, sort_keys=False))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from firehose import logging as fh_logging
    from firehose.config_checks import validate_file

    try:
        level = fh_logging.parse_level(os.environ.get("FIREHOSE_LOG_LEVEL"))
    except ValueError as exc:
        print(f"firehose: {exc}", file=sys.stderr)
        return 2
    # Everything `validate` finds stops the start, each problem at its line: besides the file,
    # handlers that do not import (tried in a child process: user code), schemas that do not compile.
    cfg, problems = validate_file(args.config)
    if problems or cfg is None:
        return _problems(problems)
    fh_logging.configure(level, args.log_format)
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    tune_gc()
    return _serve(cfg, args.config)


#: The daemon's cyclic garbage collector thresholds (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect cyclic garbage far less often than CPython does by default.

    The daemon allocates a few objects per record (a processing buffer of a thousand records
    lives for tens of milliseconds, so they survive into the oldest generation), and with the
    default thresholds that brought a full collection, 15-45 ms with the event loop stopped,
    about twice a second under a 50 MiB/s load with a Lambda processor: the acknowledgements
    waiting on the loop took the whole pause (p99 75 ms against 20 ms with these thresholds; see
    bench/RESULTS.md). The daemon's own objects form no reference cycles on the record path, so
    collecting less often holds back little memory. What exists once the daemon is up is frozen
    (``gc.freeze``, in :meth:`firehose.daemon.Daemon.run`), so full collections skip it."""
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(cfg: Any, path: str | None) -> int:
    """Run the daemon until it stops; a failure to start is one line on stderr (details, such as
    a traceback of an unexpected error, go to the log as ``daemon_failed``)."""
    import errno

    import structlog

    from firehose.log import LogError

    try:
        return asyncio.run(_run_daemon(cfg, path))
    except ConfigError as exc:
        return _problems(exc.errors)
    except LogError as exc:
        print(f"firehose: cannot start: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            print(f"firehose: cannot start: api.listen {cfg.api.listen}: {os.strerror(exc.errno)}", file=sys.stderr)
        elif exc.filename is not None and exc.strerror:
            print(f"firehose: cannot start: {exc.filename}: {exc.strerror}", file=sys.stderr)
        else:
            print(f"firehose: cannot start: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a handler or a schema that failed at start after all, a bad value
        print(f"firehose: cannot start: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        structlog.get_logger().exception("daemon_failed", error=_one_line(exc))
        print(f"firehose: failed: {type(exc).__name__}: {_one_line(exc)} (the log has the details)",
              file=sys.stderr)
        return 1


async def _run_daemon(cfg: Any, path: str | None) -> int:
    from firehose.daemon import Daemon

    daemon = Daemon(cfg, path)
    try:
        return await daemon.run()
    except Exception:
        if not daemon.ready:
            # Streams that started before the failure stop as at shutdown (their spools flushed
            # and closed) instead of being abandoned mid-start.
            try:
                await daemon.shutdown()
            except Exception as cleanup:
                import structlog

                structlog.get_logger().warning("daemon_start_cleanup_failed", error=_one_line(cleanup))
        raise


def _cmd_transform(args: argparse.Namespace) -> int:
    """Run a stream's processing chain, and its format conversion, over sample records (one per
    input line) and print what would be delivered, dropped and archived, one JSON object per
    line, then a summary."""
    import time

    from firehose import logging as fh_logging
    from firehose.config_checks import check_handlers, check_schemas

    # stdout is the preview: logs (a worker that crashed, ...) go to stderr, warnings and up.
    fh_logging.configure("warning", "auto", sys.stderr)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _problems(exc.errors)
    stream = cfg.stream(args.stream)
    if stream is None:
        names = ", ".join(s.name for s in cfg.streams)
        print(f"{args.config}: no stream named {args.stream!r}; streams: {names}", file=sys.stderr)
        return 2
    one = cfg.model_copy(update={"streams": [stream]})
    problems = check_schemas(one) + check_handlers(one)
    if problems:
        return _problems(problems)
    from firehose.names import stream_arn
    from firehose.records import SourceRecord
    from firehose.registry import CONVERTER, PROCESSING_CHAIN, load

    converter = None
    fmt = stream.format
    try:
        if fmt is not None and fmt.type != "json":
            # The daemon checks every record against the schema in the processing stage (a
            # record that does not convert is archived as format-conversion-failed): so does this.
            converter = load(CONVERTER)(fmt)
    except ValueError as exc:  # SchemaError: a Glue table that cannot be fetched
        print(f"{args.config}: stream {stream.name!r}: format: {_one_line(exc)}", file=sys.stderr)
        return 2
    lines = sys.stdin.buffer.read().splitlines()
    now = time.time_ns() // 1_000_000
    records = [SourceRecord(str(i), line, now) for i, line in enumerate(lines)]
    arn = stream_arn(cfg.api.region, cfg.api.account_id, stream.name)
    chain = load(PROCESSING_CHAIN)(stream.processing, stream_arn=arn, region=cfg.api.region, converter=converter)

    async def go() -> list[Any]:
        await chain.start()
        try:
            return list(await chain.process(records))
        finally:
            await chain.close()

    try:
        outcomes = asyncio.run(go())
    except ValueError as exc:  # the handler did not start after all
        print(f"firehose: {_one_line(exc)}", file=sys.stderr)
        return 2
    _print_outcomes(stream, outcomes, chain.delimiter or b"", now, len(records))
    return 0


def _print_outcomes(stream: Any, outcomes: list[Any], delimiter: bytes, now: int, count: int) -> None:
    import base64

    import orjson

    counts = {"Ok": 0, "Dropped": 0, "ProcessingFailed": 0}
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
        if o.otf:
            doc["otfMetadata"] = o.otf
        if stream.partitioned and o.result == "Ok":
            doc["prefix"] = _partition_prefix(stream, o, now)
        if o.result == "ProcessingFailed":
            doc.update({"errorCode": o.error_code, "errorMessage": o.error_message,
                        "errorOutputType": o.error_output_type})
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    summary = {"records": count, "delivered": counts["Ok"], "dropped": counts["Dropped"],
               "archived": counts["ProcessingFailed"]}
    sys.stdout.write(orjson.dumps({"summary": summary}).decode() + "\n")


def _partition_prefix(stream: Any, o: Any, now_ms: int) -> str:
    """Where a record would go under dynamic partitioning (its error, if it has no partition)."""
    import random
    from datetime import UTC, datetime

    from firehose.keys import PrefixError, evaluate_prefix

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


def _cmd_config_schema(args: argparse.Namespace) -> int:
    """Print the config file's JSON Schema, or with --markdown the reference generated from it."""
    from firehose.configdoc import config_schema, reference_markdown, schema_text

    if args.markdown:
        sys.stdout.write(reference_markdown())
        return 0
    notes: list[str] = []
    text = schema_text(config_schema(plugins=not args.builtin_only, notes=notes))
    sys.stdout.write(text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("firehose")
    except PackageNotFoundError:  # a source tree that is not installed
        from firehose import __version__

        return __version__


def _doc(text: str) -> str:
    return textwrap.dedent(text).strip()


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="firehose", formatter_class=fmt,
        description="A self-hosted delivery stream daemon that speaks Amazon Kinesis Data Firehose's API.",
        epilog=_doc("""
            Exit status: 0 success, 2 a problem with the input (config, arguments, handlers),
            1 a failure of the system, 130 interrupted. Problems are one line each on stderr."""),
    )
    parser.add_argument("--version", action="version", version=f"firehose {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the daemon", formatter_class=fmt,
        description=_doc("""
            Run the daemon: serve the Firehose API and deliver every stream of the config file.
            Reads the config file (or the embedded default: one stream 'default' writing to
            ./var/delivered) and the environment (FIREHOSE_LOG_LEVEL, ${VAR} references).
            Before anything starts, the config is validated and every local Lambda handler is
            imported in a child process; any problem is printed and nothing starts."""),
        epilog=_doc("""
            Prints: logs on stdout, one event per line: JSON, or console lines when stdout is a
            terminal (no colours with NO_COLOR set). Problems that stop the start: one line each on
            stderr, exit 2 (1 for an OS error such as an address in use).
            Environment: FIREHOSE_LOG_LEVEL = debug | info (default) | warning | error.
            Signals: SIGTERM/SIGINT stop (flushing within shutdown_timeout_secs), SIGHUP reloads."""),
    )
    run.add_argument("--config", metavar="FILE", help="config file (default: the embedded default config)")
    run.add_argument("--log-format", choices=["console", "json"], default="auto",
                     help="log format (default: console on a terminal, JSON otherwise)")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser(
        "validate", help="check a config file: every problem, or OK", formatter_class=fmt,
        description=_doc("""
            Check a config file without starting anything: YAML, every field, the rules across
            fields; every local Lambda handler is imported (in one child process, from the
            working directory and PYTHONPATH as `firehose run` imports it, each with a timeout),
            and every jq query and inline or file schema compiled. Remote Lambda functions
            are not invoked, Glue tables not fetched."""),
        epilog=_doc("""
            Prints: "FILE: OK (N streams)" on stdout and exits 0, or every problem, one line
            each as file:line: field: message, on stderr and exits 2."""),
    )
    val.add_argument("path", metavar="FILE", help="the config file")
    val.add_argument("--import-timeout", type=float, default=None, metavar="SECS",
                     help="how long importing one handler may take (default: 30)")
    val.set_defaults(func=_cmd_validate)
    tr = sub.add_parser(
        "transform", help="preview what a stream does to records read from stdin", formatter_class=fmt,
        description=_doc("""
            Run a stream's processing (its processors, its Lambda handler, metadata extraction)
            and its record format conversion check over records read from stdin, one record per
            line, without the daemon: what the daemon would deliver, drop and archive."""),
        epilog=_doc("""
            Prints on stdout one JSON object per outcome: record (the input line's index),
            result (Ok, Dropped, ProcessingFailed), data (or dataBase64), partitionKeys,
            queryKeys, otfMetadata (Iceberg routing), prefix (with dynamic partitioning), and
            for archived records errorCode, errorMessage and errorOutputType
            (processing-failed, format-conversion-failed, ...);
            then {"summary": {records, delivered, dropped, archived}}. Logs go to stderr."""),
    )
    tr.add_argument("--config", required=True, metavar="FILE", help="the config file")
    tr.add_argument("--stream", required=True, metavar="NAME", help="the stream whose processing to run")
    tr.set_defaults(func=_cmd_transform)
    imp = sub.add_parser(
        "import-agent-config", help="print the config equivalent to a Kinesis Agent agent.json",
        formatter_class=fmt,
        description="Translate a Kinesis Agent agent.json (its Firehose flows) into this daemon's config.",
        epilog=_doc("""
            Prints the YAML config on stdout; notes on what could not be carried over go to
            stderr as "note: ..." lines. A file that cannot be read or parsed: one line, exit 2."""),
    )
    imp.add_argument("path", metavar="AGENT_JSON", help="the agent.json file")
    imp.set_defaults(func=_cmd_import_agent_config)
    exp = sub.add_parser(
        "export-config", help="print the whole config as YAML: the file's streams and those made through the API",
        formatter_class=fmt,
        description="Print the config file with the streams created through the API (api.control_plane, kept in "
                    "data_dir/api-streams.yaml, or in cluster mode in the cluster's JetStream) added to its streams: one "
                    "file that recreates them all.",
    )
    exp.add_argument("--config", default=None, metavar="FILE", help="the config file (default: the built-in one)")
    exp.set_defaults(func=_cmd_export_config)
    schema = sub.add_parser(
        "config-schema", help="print the config file's JSON Schema (or, with --markdown, its reference)",
        formatter_class=fmt,
        description=_doc("""
            Print the JSON Schema (draft 2020-12) of the config file, generated from the models
            that validate it: the top level, a stream, and every destination, source and
            processor type, chosen by its `type:` key, with each key's type, default, range and
            description (and the Firehose API name it corresponds to). Destination and source
            types of installed plugins are included unless --builtin-only. Reads nothing else.
            The schema checks each key on its own; `firehose validate` also checks the rules
            across keys (buffering limits, partitioning, format conversion)."""),
        epilog=_doc("""
            Prints the schema as JSON on stdout: keys sorted, the same bytes every run; plugins
            left out (one that does not load) are named on stderr as "note: ..." lines. With
            --markdown it prints the reference docs/config-reference.md instead, built-in types
            only (regenerate it with: firehose config-schema --markdown > docs/config-reference.md).

            Editors: save the schema and point VS Code's YAML extension (redhat.vscode-yaml) at it
            with a first line in the config file (a path relative to the file, or a URL):
              firehose config-schema > firehose.schema.json
              # yaml-language-server: $schema=./firehose.schema.json
            or map files to it in settings.json:
              "yaml.schemas": {"./firehose.schema.json": ["firehose.yaml"]}"""),
    )
    schema.add_argument("--markdown", action="store_true",
                        help="print the Markdown reference (built-in types only) instead of the schema")
    schema.add_argument("--builtin-only", action="store_true",
                        help="leave installed plugins' destination and source types out of the schema")
    schema.set_defaults(func=_cmd_config_schema)
    from firehose.spoolcli import add_parser as add_spool_parser

    add_spool_parser(sub)
    from firehose.statusview import add_parser as add_status_parser

    add_status_parser(sub)
    from firehose.redrive import add_parser as add_redrive_parser

    add_redrive_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`firehose transform ... | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        print(f"firehose {args.command}: failed: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        if os.environ.get("FIREHOSE_LOG_LEVEL", "").lower() == "debug":
            import traceback

            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
