"""``firehose`` command line: ``run`` and ``validate``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firehose", description="A self-hosted Firehose-compatible delivery stream daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help="config file (default: the embedded default config)")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate", help="check a config file; exit 0 or print errors and exit 2")
    val.add_argument("path")
    val.set_defaults(func=_cmd_validate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
