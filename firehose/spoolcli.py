"""``firehose spool check`` and ``firehose spool salvage``: what an operator runs when a stream
refuses to start because its spool is damaged (see firehose/spool.py, "Damage")."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from firehose.filelog import held
from firehose.log import LogBusyError
from firehose.spool_format import SpoolError
from firehose.spool_repair import check, salvage


def spool_directories(path: str) -> list[str]:
    """The spool directories under ``path``: ``path`` itself when it holds segments, else every
    directory below it that does (a data_dir, its spool/ directory, a stream's processed/ log)."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("damaged-"))
        if any(f.startswith("seg-") and f.endswith(".log") for f in files):
            found.append(root)
    return found


def _nothing_there(path: str) -> int:
    print(f"firehose: {path}: no spool segments found", file=sys.stderr)
    return 2


def cmd_check(args: argparse.Namespace) -> int:
    dirs = spool_directories(args.path)
    if not dirs:
        return _nothing_there(args.path)
    damaged = refused = 0
    for directory in dirs:
        try:
            reports = check(directory)
        except SpoolError as exc:  # a newer format: neither read nor changed; the others are
            print(f"firehose: {exc}", file=sys.stderr)
            refused += 1
            continue
        for rep in reports:
            where = os.path.join(directory, rep.name)
            if not rep.header_ok:
                damaged += 1
                print(f"{where}: not a readable segment (bad or truncated header)")
                continue
            for (offset, length), why in zip(rep.damaged, rep.reasons, strict=True):
                damaged += 1
                state = ("the segment header: its version or a copy of its key (no record is in it)"
                         if why == "damaged segment header"
                         else "below the durable mark: acknowledged records are damaged" if rep.durable_mark > offset
                         else "past the durable mark: an unacknowledged tail, truncated at the next start")
                print(f"{where}: {length} damaged bytes at offset {offset}, {state}")
            for first, end in rep.lost_seqs:
                print(f"{where}: records {first}..{end - 1} ({end - first}) have no valid frame")
    if damaged:
        print(f"{damaged} damaged range(s); `firehose spool salvage {args.path}` keeps every frame that verifies")
    if refused:
        return 2
    if damaged:
        return 1
    print(f"{args.path}: {len(dirs)} spool(s), no damage")
    return 0


def cmd_salvage(args: argparse.Namespace) -> int:
    dirs = spool_directories(args.path)
    if not dirs:
        return _nothing_there(args.path)
    repaired = refused = 0
    for directory in dirs:
        try:
            with held(directory):  # never beside a daemon writing the same spool
                result = salvage(directory)
        except LogBusyError as exc:
            print(f"firehose: {exc}; stop the daemon first", file=sys.stderr)
            return 2
        except SpoolError as exc:  # a newer format: neither read nor changed; the others are
            print(f"firehose: {exc}", file=sys.stderr)
            refused += 1
            continue
        if not result["damaged_segments"]:
            continue
        repaired += 1
        lost = ", ".join(f"{s}..{e - 1}" for s, e in result["lost_ranges"]) or "none"
        print(f"{directory}: kept every frame that verifies; {result['lost_records']} record(s) lost "
              f"(sequence numbers {lost}); damaged bytes and the original segments are in {result['aside']}")
        if result["finished_batches"]:
            print(f"{directory}: batches {', '.join(map(str, result['finished_batches']))} were finished before "
                  "the damage (their records are gone from the spool); their lost COMMIT is written again")
    if not repaired and not refused:
        print(f"{args.path}: no damage; nothing changed")
    return 2 if refused else 0


def add_parser(sub: Any) -> None:
    """Add ``spool check`` and ``spool salvage`` to the CLI's subcommands (``sub``)."""
    sp = sub.add_parser(
        "spool", help="check or salvage a damaged spool (run with the daemon stopped)",
        description="Inspect or repair the spool of a stream that refuses to start because a frame is "
                    "damaged. PATH is a data_dir, its spool/ directory, or one stream's spool directory.",
    )
    ops = sp.add_subparsers(dest="spool_command", required=True)
    chk = ops.add_parser("check", help="report damaged frames; changes nothing",
                         description="Reads every segment and prints one line per damaged range and per run "
                                     "of records left without a valid frame. Exit 0: no damage; 1: damage; "
                                     "2: nothing to check.")
    chk.add_argument("path")
    chk.set_defaults(func=cmd_check)
    sal = ops.add_parser("salvage", help="keep every frame that verifies; set the damaged bytes aside",
                         description="Rewrites each damaged segment with every frame whose CRC verifies, "
                                     "writes the damaged bytes and the original segment to a damaged-<time> "
                                     "directory beside it, marks records with no valid frame as finished and "
                                     "re-seals batches that named them. Prints what was lost. Run it with "
                                     "the daemon stopped.")
    sal.add_argument("path")
    sal.set_defaults(func=cmd_salvage)
