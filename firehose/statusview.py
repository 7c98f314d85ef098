"""``firehose status``: a running daemon's ``GET /status.json`` (firehose/status.py) as a live
terminal view (rich), one snapshot (``--once``), or the JSON itself (``--json``).

The endpoint is ``--endpoint``, else the API address of ``--config``, else
``http://127.0.0.1:4573``. With API auth on, ``--token`` (or ``FIREHOSE_OPERATOR_TOKEN``) is one
of ``api.operator_tokens``. In cluster mode ``--all`` shows every member whose address is given
with ``--endpoint`` (repeat it), or, with ``--all``, every member the first endpoint knows (the
members announce their API URL, ``cluster.advertise_url``): each table says which daemon it
shows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ENDPOINT = "http://127.0.0.1:4573"


def add_parser(sub: Any) -> None:
    st = sub.add_parser(
        "status", help="a live view of a running daemon: rates, backlog, freshness, failures",
        description="A live view of a running daemon's streams, read from its GET /status.json.",
    )
    st.add_argument("--endpoint", action="append", default=None,
                    help=f"the daemon's API address (default: --config's api.listen, else {DEFAULT_ENDPOINT}); "
                         "repeat it to show several daemons of a cluster")
    st.add_argument("--config", default=None, help="take the endpoint from this config file's api.listen")
    st.add_argument("--token", default=None, help="an operator token (default: $FIREHOSE_OPERATOR_TOKEN)")
    st.add_argument("--ca-bundle", default=None,
                    help="with an https endpoint: the CA certificates (PEM) to trust (default: the system's, "
                         "or $SSL_CERT_FILE)")
    st.add_argument("--all", action="store_true",
                    help="cluster mode: every member the (first) endpoint knows, one table each")
    st.add_argument("--once", action="store_true", help="print one snapshot and exit")
    st.add_argument("--json", action="store_true", help="print /status.json and exit")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    st.set_defaults(func=cmd_status)


def _endpoints(args: argparse.Namespace) -> list[str]:
    if args.endpoint:
        return [e.rstrip("/") for e in args.endpoint]
    if args.config:
        from firehose.config import load_config

        api = load_config(args.config).api
        host = api.host if api.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return [f"{'https' if api.tls is not None else 'http'}://{host}:{api.port}"]
    return [DEFAULT_ENDPOINT]


class StatusUnavailable(Exception):
    """The daemon could not be read (one line, for the CLI)."""


def fetch(endpoint: str, token: str | None, timeout: float = 5.0, cafile: str | None = None) -> dict[str, Any]:
    """``GET /status.json``; an https endpoint is verified against ``cafile`` (None: the system's CAs)."""
    import ssl

    request = urllib.request.Request(f"{endpoint}/status.json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=cafile) if endpoint.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310 - an http(s) URL we built
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read()).get("message", "")
        except Exception:  # noqa: BLE001 - the body is not Firehose's error shape
            pass
        raise StatusUnavailable(f"{endpoint}: HTTP {exc.code}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(f"cannot read {endpoint}/status.json: {reason}") from None


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f}"


def _count(n: float) -> str:
    return f"{n:,.0f}" if n >= 10 or n == 0 else f"{n:.1f}"


def render(endpoint: str, doc: dict[str, Any]) -> Any:
    """One daemon's status as rich renderables: a heading, the streams' table, their failures."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    who = f"node {doc['node']} · members {', '.join(doc.get('cluster_members') or [])}" if doc.get("node") else ""
    head = Text.assemble(("firehose ", "bold"), (endpoint, "cyan"), f"  {who}  " if who else "  ",
                         (f"at {doc.get('generated_at')}", "dim"))
    table = Table(expand=False, header_style="bold")
    for col in ("stream", "in rec/s", "in MiB/s", "out rec/s", "out MiB/s", "backlog", "backlog MiB", "oldest s",
                "partitions", "processed ok/drop/fail", "archived", "throttled", "state"):
        table.add_column(col, justify="left" if col in ("stream", "state", "archived") else "right")
    notes: list[Text] = []
    for name, s in doc.get("streams", {}).items():
        table.add_row(*_row(name, s))
        err, failing = s.get("last_delivery_error"), s.get("failing_for_secs")
        if failing is not None and err:
            notes.append(Text(f"{name}: failing for {failing:.0f} s: {err.get('code')}: {err.get('message')}",
                              "red"))
    for name, reason in (doc.get("failed_streams") or {}).items():
        notes.append(Text(f"{name}: not started: {reason}", "red"))
    refused = doc.get("refused_requests_by_error") or {}
    if refused:
        notes.append(Text("refused requests: " + ", ".join(f"{k} {v:,}" for k, v in refused.items()), "dim"))
    return Group(head, table, *notes)


def _row(name: str, s: dict[str, Any]) -> list[Any]:
    """One stream's cells, in the order of the table's columns."""
    from rich.text import Text

    proc = s.get("processing") or {}
    archived = ", ".join(f"{k} {v:,}" for k, v in (s.get("archived_records_by_type") or {}).items()) or "-"
    state = Text("failing", "bold red") if s.get("failing_for_secs") is not None else (
        Text("ok", "green") if s.get("accepting_records") else Text("not accepting", "yellow"))
    return [name, _count(s["incoming_records_per_sec"]), _mib(s["incoming_bytes_per_sec"]),
            _count(s["delivered_records_per_sec"]), _mib(s["delivered_bytes_per_sec"]),
            f"{s['backlog_records']:,}", _mib(s["backlog_bytes"]), f"{s['oldest_pending_age_secs'] or 0:.1f}",
            str(s.get("open_partitions") or 0),
            f"{proc.get('ok', 0):,}/{proc.get('dropped', 0):,}/{proc.get('failed', 0):,}",
            archived, f"{s['throttled_records_total']:,}", state]


def cmd_status(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("FIREHOSE_OPERATOR_TOKEN") or None
    endpoints = _endpoints(args)

    def targets() -> list[str]:
        if not args.all:
            return endpoints
        return list((fetch(endpoints[0], token, cafile=args.ca_bundle).get("cluster_member_urls") or {}).values()) or endpoints

    try:
        if args.json:
            urls = targets()
            docs = [fetch(e, token, cafile=args.ca_bundle) for e in urls]
            print(json.dumps(docs[0] if len(docs) == 1 and not args.all else dict(zip(urls, docs, strict=True)),
                             indent=2))
            return 0
        from rich.console import Console, Group
        from rich.live import Live

        # Not a terminal (a pipe, a file): wide enough that no column is cut.
        console = Console() if sys.stdout.isatty() else Console(width=200)

        def snapshot() -> Any:
            return Group(*(render(e, fetch(e, token, cafile=args.ca_bundle)) for e in targets()))

        if args.once:
            console.print(snapshot())
            return 0
        # Ctrl-C or SIGTERM ends the view between two refreshes, whatever it was doing then.
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with Live(snapshot(), console=console, refresh_per_second=4, screen=False) as live:
            while not stop.wait(max(0.2, args.interval)):
                try:
                    live.update(snapshot())
                except StatusUnavailable as exc:
                    live.update(Group(snapshot_error(str(exc))))
        return 0
    except StatusUnavailable as exc:
        print(f"firehose status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def snapshot_error(message: str) -> Any:
    from rich.text import Text

    return Text(f"{message} (retrying)", "bold red")
