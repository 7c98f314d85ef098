"""``GET /status.json``: what an operator reads at a glance, the one source of ``firehose status``
(firehose/statusview.py) and of the status page. Every field is documented in
docs/operations.md ("Status").

A :class:`StatusSampler` on the daemon's loop records, every second, each stream's counters
(records and bytes in and delivered) and its backlog; rates are the change over the last
``RATE_WINDOW_SECS``, and ``?history=1`` adds the last ``HISTORY_SECS`` of samples (every
``HISTORY_STEP_SECS``) for charts. Counts are since the daemon started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from firehose.metrics import LABEL

SAMPLE_SECS = 1.0
RATE_WINDOW_SECS = 10
HISTORY_SECS = 600
HISTORY_STEP_SECS = 5


@dataclass(frozen=True)
class Sample:
    """One stream's counters at one moment."""

    t: float
    in_records: float
    in_bytes: float
    out_records: float
    out_bytes: float
    backlog_records: int
    freshness_secs: float


class StatusSampler:
    """Samples every stream once a second; keeps ``HISTORY_SECS`` of samples per stream."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.samples: dict[str, deque[Sample]] = {}
        self._task: asyncio.Task[None] | None = None
        self.started = time.time()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="status-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECS)

    def _counter(self, name: str, stream: str) -> float:
        value = self.daemon.metrics.registry.get_sample_value(name, {LABEL: stream})
        return float(value or 0.0)

    def sample(self) -> None:
        now = time.time()
        for name, rt in list(self.daemon.streams.items()):
            status = rt.status()
            s = Sample(now, self._counter("firehose_IncomingRecords_total", name),
                       self._counter("firehose_IncomingBytes_total", name),
                       float(status.get("delivered_records") or 0),
                       self._counter("firehose_DeliveryToS3_Bytes_total", name),
                       int(status.get("backlog_records") or 0), float(status.get("oldest_pending_age_secs") or 0.0))
            ring = self.samples.setdefault(name, deque(maxlen=int(HISTORY_SECS / SAMPLE_SECS) + 1))
            ring.append(s)
        for gone in set(self.samples) - set(self.daemon.streams):
            del self.samples[gone]

    def rates(self, name: str) -> dict[str, float]:
        ring = self.samples.get(name)
        if not ring or len(ring) < 2:
            return {"incoming_records_per_sec": 0.0, "incoming_bytes_per_sec": 0.0,
                    "delivered_records_per_sec": 0.0, "delivered_bytes_per_sec": 0.0}
        last = ring[-1]
        first = next((s for s in ring if last.t - s.t <= RATE_WINDOW_SECS), ring[0])
        if first is last:
            first = ring[-2]
        dt = max(1e-6, last.t - first.t)
        return {
            "incoming_records_per_sec": round(max(0.0, last.in_records - first.in_records) / dt, 1),
            "incoming_bytes_per_sec": round(max(0.0, last.in_bytes - first.in_bytes) / dt, 1),
            "delivered_records_per_sec": round(max(0.0, last.out_records - first.out_records) / dt, 1),
            "delivered_bytes_per_sec": round(max(0.0, last.out_bytes - first.out_bytes) / dt, 1),
        }

    def history(self, name: str) -> list[list[float]]:
        """``[t, incoming records/s, delivered records/s, backlog records, freshness secs]`` every
        ``HISTORY_STEP_SECS`` over the last ``HISTORY_SECS``."""
        ring = list(self.samples.get(name, ()))
        out: list[list[float]] = []
        step = int(HISTORY_STEP_SECS / SAMPLE_SECS)
        for i in range(len(ring) - 1, step - 1, -step):
            a, b = ring[i - step], ring[i]
            dt = max(1e-6, b.t - a.t)
            out.append([round(b.t, 3), round((b.in_records - a.in_records) / dt, 1),
                        round((b.out_records - a.out_records) / dt, 1), b.backlog_records, round(b.freshness_secs, 1)])
        out.reverse()
        return out


def status_document(daemon: Any, sampler: StatusSampler, *, history: bool = False) -> dict[str, Any]:
    """The ``/status.json`` body (docs/operations.md, "Status")."""
    registry = daemon.metrics.registry
    totals = _totals(registry)
    archived = totals.get("firehose_ArchivedRecords", [])
    streams: dict[str, Any] = {}
    for name, rt in sorted(daemon.streams.items()):
        st = rt.status()

        def counter(metric: str, _name: str = name) -> int:
            return int(registry.get_sample_value(metric, {LABEL: _name}) or 0)

        doc: dict[str, Any] = {
            "accepting_records": st.get("accepting_records"),
            **sampler.rates(name),
            "incoming_records_total": counter("firehose_IncomingRecords_total"),
            "delivered_records_total": int(st.get("delivered_records") or 0),
            "backlog_records": int(st.get("backlog_records") or 0),
            "backlog_bytes": int(st.get("spool_bytes") or 0),
            "oldest_pending_age_secs": st.get("oldest_pending_age_secs"),
            "data_freshness_secs": st.get("oldest_pending_age_secs"),
            "open_partitions": st.get("open_partitions"),
            "processing": {"ok": counter("firehose_SucceedProcessing_Records_total"),
                           "dropped": counter("firehose_DroppedRecords_total"),
                           "failed": counter("firehose_FailedProcessing_Records_total")},
            "archived_records_by_type": {s.labels["type"]: int(s.value) for s in
                                         sorted(archived, key=lambda s: s.labels["type"])
                                         if s.labels.get(LABEL) == name},
            "throttled_records_total": counter("firehose_ThrottledRecords_total"),
            "last_delivery_error": st.get("last_delivery_error"),
            "failing_since": st.get("failing_since"),
            "failing_for_secs": rt.failing_for_secs(),
        }
        for key in ("node", "owned_partitions", "partition_owners"):
            if key in st:
                doc[key] = st[key]
        if history:
            doc["history"] = sampler.history(name)
        streams[name] = doc
    cluster = getattr(daemon, "cluster", None)
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sampler.started)),
        "ready": bool(daemon.ready),
        "node": cluster.node if cluster is not None else None,
        "cluster_members": list(cluster.members) if cluster is not None else None,
        "cluster_member_urls": dict(cluster.member_urls) if cluster is not None else None,
        "rate_window_secs": RATE_WINDOW_SECS,
        "refused_requests_by_error": {s.labels["error"]: int(s.value) for s in
                                      sorted(totals.get("firehose_RefusedRequests", []), key=lambda s: s.labels["error"])},
        "failed_streams": dict(sorted(daemon.failed_streams.items())),
        "streams": streams,
    }


def _totals(registry: Any) -> dict[str, list[Any]]:
    """The ``_total`` samples of the labelled families the document breaks down, read once."""
    wanted = ("firehose_ArchivedRecords", "firehose_RefusedRequests")
    return {f.name: [s for s in f.samples if s.name.endswith("_total")]
            for f in registry.collect() if f.name in wanted}
