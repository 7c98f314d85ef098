"""The Grafana dashboard (config/grafana/) and the Prometheus alert rules (config/prometheus/)
query only what the daemon really exports: every metric name in every panel's and rule's
expression is checked against a running daemon's GET /metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import yaml

from support import Daemon, daemon_config, stream_config

REPO = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\bfirehose_[A-Za-z0-9_]+")


def _exported(text: str) -> set[str]:
    """Every sample name /metrics can show: the samples present and, from each family's TYPE,
    the names its samples take (a labelled family with no child yet shows only its TYPE)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        total = name if name.endswith("_total") else f"{name}_total"
        names |= {"counter": {total}, "gauge": {name},
                  "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}.get(kind, {name})
    return names


def test_every_panel_and_alert_queries_metrics_the_daemon_exports(tmp_path: Path) -> None:
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream_config("s", {"type": "local", "path": str(tmp_path / "o")})]))
    d.start()
    try:
        d.firehose().put_record(DeliveryStreamName="s", Record={"Data": b"x\n"})
        text = urllib.request.urlopen(f"{d.endpoint}/metrics", timeout=10).read().decode()
    finally:
        d.stop()
    exported = _exported(text)
    dashboard = json.loads((REPO / "config" / "grafana" / "firehose-dashboard.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Ingest", "Processing", "Delivery", "Backlog and freshness", "Partitions", "Sources", "Cluster"]
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(exprs) >= 20 and all(p["targets"] for p in dashboard["panels"] if p["type"] != "row")
    rules = yaml.safe_load((REPO / "config" / "prometheus" / "firehose-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"FirehoseDataNotFresh", "FirehoseDestinationFailing", "FirehoseSpoolNearCap"} <= set(alerts)
    assert all(r["labels"]["severity"] in ("page", "warn") and r["annotations"]["summary"] for r in alerts.values())
    used = {m for e in exprs + [r["expr"] for r in alerts.values()] for m in METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)
    # A name the daemon does not export would be caught: the check is not vacuous.
    assert "firehose_NoSuchMetric_total" not in exported
