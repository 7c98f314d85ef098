"""``GET /status.json`` and ``firehose status`` as an operator uses them: a daemon under load
(a Lambda failing some records, so some are archived), the live view run in a pseudo-terminal
and read as a person reads it, ``--once`` and ``--json`` for scripts, and a clear line when the
daemon cannot be read."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pexpect

from support import Daemon, daemon_config, free_port, stream_config, wait_for


class Load:
    """Puts batches of 50 records (every tenth one "bad", which the Lambda fails) until stopped."""

    def __init__(self, d: Daemon, name: str) -> None:
        self.client = d.firehose()
        self.name = name
        self.acked = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            records = [{"Data": (b"bad-%d\n" if (n + i) % 10 == 0 else b"ok-%d\n") % (n + i)} for i in range(50)]
            n += 50
            res = self.client.put_record_batch(DeliveryStreamName=self.name, Records=records)
            self.acked += 50 - res["FailedPutCount"]
            time.sleep(0.02)


def _loaded_daemon(tmp_path: Path, name: str) -> tuple[Daemon, Load]:
    """A daemon whose stream runs a Lambda failing every "bad" record, under load."""
    stream = stream_config(name, {"type": "local", "path": str(tmp_path / "out")},
                           buffering={"size_mib": 1, "interval_secs": 1},
                           processing=[{"type": "lambda", "function": "handlers.fail_some:handler",
                                        "buffer_interval_secs": 0, "workers": 1}],
                           backup={"path": str(tmp_path / "backup")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    load = Load(d, name)
    load.thread.start()
    return d, load


def _status(d: Daemon) -> dict[str, Any]:
    with urllib.request.urlopen(f"{d.endpoint}/status.json?history=1", timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def _screen_rows(text: str, name: str) -> list[list[str]]:
    """The table rows of stream ``name`` in a rendered view: its cells, stripped."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        if len(cells) > 3 and cells[1] == name:
            rows.append(cells[1:-1])
    return rows


def test_status_json_and_the_live_view_show_a_daemon_under_load(tmp_path: Path) -> None:
    name = "clicks"
    d, load = _loaded_daemon(tmp_path, name)
    try:
        wait_for(lambda: _status(d)["streams"][name]["archived_records_by_type"].get("processing-failed", 0) > 0
                 and _status(d)["streams"][name]["incoming_records_per_sec"] > 0, 60, "records flowing and archived")
        doc = _status(d)
        s = doc["streams"][name]
        assert doc["ready"] is True and doc["node"] is None and doc["rate_window_secs"] == 10
        assert s["incoming_records_total"] <= load.acked + 50 and s["incoming_records_total"] > 0
        assert s["delivered_records_total"] > 0 and s["delivered_records_per_sec"] >= 0
        assert s["processing"]["ok"] > 0 and s["processing"]["failed"] > 0
        assert s["backlog_records"] >= 0 and s["backlog_bytes"] > 0 and s["last_delivery_error"] is None
        wait_for(lambda: len(_status(d)["streams"][name]["history"]) >= 2, 30, "a few seconds of history")
        history = _status(d)["streams"][name]["history"]
        assert all(len(h) == 5 for h in history) and max(h[1] for h in history) > 0  # incoming records/s

        # The live view, in a terminal, read as a person reads it.
        view = pexpect.spawn(sys.executable, ["-m", "firehose", "status", "--endpoint", d.endpoint,
                                              "--interval", "0.5"],
                             dimensions=(40, 230), env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin"},
                             encoding="utf-8", timeout=30)
        try:
            view.expect("processing-failed")
            time.sleep(2)  # a few refreshes
            view.expect(pexpect.TIMEOUT, timeout=1)
            screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", view.before or "")
            rows = _screen_rows(screen, name)
            assert rows, screen[-3000:]
            last = rows[-1]
            assert float(last[1].replace(",", "")) > 0, last  # in rec/s
            assert last[-1] == "ok" and "processing-failed" in last[-3], last
            view.kill(signal.SIGINT)  # Ctrl-C
            view.expect(pexpect.EOF, timeout=30)
        finally:
            view.close(force=True)
        assert view.exitstatus == 0

        once = subprocess.run([sys.executable, "-m", "firehose", "status", "--once", "--endpoint", d.endpoint],
                              capture_output=True, text=True, timeout=60)
        assert once.returncode == 0 and _screen_rows(once.stdout, name), once.stdout + once.stderr
        as_json = subprocess.run([sys.executable, "-m", "firehose", "status", "--json", "--endpoint", d.endpoint],
                                 capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)["streams"][name]["incoming_records_total"] > 0
    finally:
        load.stop.set()
        load.thread.join(30)
        d.stop()
    gone = subprocess.run([sys.executable, "-m", "firehose", "status", "--once", "--endpoint",
                           f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and gone.stdout == ""
    assert re.fullmatch(r"firehose status: cannot read http://127\.0\.0\.1:\d+/status\.json: .*\n", gone.stderr)


def test_status_json_needs_an_operator_token_when_auth_is_on(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, [stream_config("s", {"type": "local", "path": str(tmp_path / "out")})])
    cfg["api"] = {**cfg.get("api", {}), "auth": {"mode": "sigv4", "credentials": {"AKIDSTATUS": "status-secret"}},
                  "operator_tokens": ["${OPS}"]}
    d = Daemon(tmp_path, cfg, env={"OPS": "op-token-status-0001"}).start()
    try:
        denied = subprocess.run([sys.executable, "-m", "firehose", "status", "--json", "--endpoint", d.endpoint],
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1
        assert "HTTP 403: An operator token or a signed request is needed for the status." in denied.stderr
        ok = subprocess.run([sys.executable, "-m", "firehose", "status", "--json", "--endpoint", d.endpoint],
                            capture_output=True, text=True, timeout=60, env={"FIREHOSE_OPERATOR_TOKEN": "op-token-status-0001",
                                                                             "PATH": "/usr/bin:/bin"})
        assert ok.returncode == 0 and "s" in json.loads(ok.stdout)["streams"], ok.stderr
    finally:
        d.stop()


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    import shutil

    from support import unavailable

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        unavailable("chromium (Debian's chromium package) is not installed")
    return subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=8000", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_status_page_renders_the_figures_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads GET /status against a daemon under load: the rendered page shows
    the stream's rates, its archived records and charts drawn from the history."""
    name = "clicks"
    d, load = _loaded_daemon(tmp_path, name)
    try:
        wait_for(lambda: len(_status(d)["streams"][name]["history"]) >= 3
                 and _status(d)["streams"][name]["archived_records_by_type"], 60, "history and archived records")
        page = urllib.request.urlopen(f"{d.endpoint}/status", timeout=10)
        assert page.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        assert not re.search(r"""(src|href)=["']?https?:""", page.read().decode())  # no external assets
        dom = _chromium("--dump-dom", f"{d.endpoint}/status").stdout
        figures = dict(re.findall(r'data-k="([a-z-]+)">([^<]*)<', dom))
        assert f'data-stream="{name}"' in dom, dom[:2000]
        assert float(figures["in-rps"].replace(",", "")) > 0, figures
        assert "processing-failed" in figures["archived"] and figures["state"] == "ok", figures
        assert int(figures["delivered-total"].replace(",", "")) > 0
        assert len(re.findall(r'<path d="M[0-9.]+,[0-9.]+ L', dom)) >= 3  # the charts are drawn
        shot = tmp_path / "status.png"
        _chromium("--window-size=1280,900", f"--screenshot={shot}", f"{d.endpoint}/status")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        load.stop.set()
        load.thread.join(30)
        d.stop()
