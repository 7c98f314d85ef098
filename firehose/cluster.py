"""Cluster mode: several daemons share the streams through NATS JetStream (docs/cluster.md).

Every daemon of a cluster has the same ``streams:``. Each delivery stream is cut into
``jetstream.partitions`` partitions; a partition's logs (ingest, processed) are JetStream streams
of their own (firehose/jslog.py), and one daemon at a time runs a partition: it holds the
partition's lease, a key in the JetStream key-value bucket ``FH_LEASES`` (value: the node),
renewed with revision-checked writes well within the bucket's TTL. A daemon that stops releases
its leases; one that dies loses them when the TTL runs out, and the others take its partitions
over: they open the partition's logs (which fences any writer still holding them) and re-send
its sealed batches under their keys. Members announce themselves in ``FH_MEMBERS`` (same TTL);
each daemon takes its fair share (all partitions / members, rounded up) and gives up what is
over it, so partitions rebalance when a daemon joins or leaves.

Ingest: a daemon appends a request's records to one of the partitions it owns (the one with the
fewest bytes waiting), so any daemon behind a load balancer answers for every stream. A daemon
that owns none of a stream's partitions (more daemons than partitions, or while the cluster
settles) answers 503 "Slow down.", which every SDK retries.

A daemon's local disk holds nothing that matters in cluster mode: records, batch identities,
processing outcomes and leases are all in JetStream.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from typing import Any

import orjson
import structlog
from pydantic import Field, field_validator

from firehose.cluster_state import SOURCE_FACTS, STREAM_STATE, JetStreamFacts, SharedStreamState, bucket_keys
from firehose.models import StrictModel
from firehose.registry import one_line

log = structlog.get_logger()

NODE_RE = r"^[A-Za-z0-9_-]{1,64}$"
LEASES = "FH_LEASES"
MEMBERS = "FH_MEMBERS"
SEQ_BITS = 48  # a partition's record sequence numbers stay below 2**48; the partition goes above


class JetStreamSettings(StrictModel):
    """Where the cluster's JetStream is, and how each delivery stream is laid out on it."""

    servers: list[str] = Field(
        min_length=1,
        description="NATS server URLs (`nats://host:4222`, or `tls://`); the client fails over among them.",
    )
    replicas: int = Field(
        default=1, ge=1, le=5,
        description="Replicas of every JetStream stream (1 for one NATS server, 3 for a three-server cluster). "
        "An acknowledgement means the records are stored on a quorum of them.",
    )
    partitions: int = Field(
        default=8, ge=1, le=1024,
        description="Partitions per delivery stream: the unit of ownership (one daemon at a time) and of "
        "JetStream leadership (each partition's log has its own Raft leader).",
    )
    credentials: str | None = Field(
        default=None, description="A NATS credentials file (`.creds`), if the servers require one.",
    )
    connect_timeout_secs: float = Field(
        default=5.0, gt=0, le=60, description="Seconds one connection attempt may take; attempts repeat.",
    )

    @field_validator("servers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"must be nats:// or tls:// URLs, got {url!r}")
        return v


class ClusterConfig(StrictModel):
    """Cluster mode: every stream's log is in NATS JetStream, shared by the daemons of the cluster."""

    node: str | None = Field(
        default=None,
        description="This daemon's name in the cluster, unique per daemon (default: the host name).",
        pattern=NODE_RE,
    )
    jetstream: JetStreamSettings = Field(description="The NATS JetStream servers and the layout on them.")
    lease_ttl_secs: int = Field(
        default=10, ge=2, le=300,
        description="How long a dead daemon's partitions stay unowned before the others take them over.",
    )
    advertise_url: str | None = Field(
        default=None,
        description="The URL of this daemon's API as the other members and `firehose status --all` reach it "
        "(default: `http://<api host>:<port>`, with the host name when the API listens on every interface).",
    )

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v.rstrip("/") if v else v


def cluster_problems(raw_stream: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """What a stream's config may not hold in cluster mode: (path within the stream, message)."""
    if not isinstance(raw_stream, dict):
        return []
    from firehose.registry import destination_config_class, source_config_class

    out: list[tuple[tuple[str | int, ...], str]] = []
    sources = raw_stream.get("sources")
    for i, source in enumerate(sources if isinstance(sources, list) else []):
        kind = source.get("type") if isinstance(source, dict) else None
        if not isinstance(kind, str):
            continue
        try:
            cls = source_config_class(kind)
        except Exception:  # noqa: BLE001 - an unknown type is reported by the stream's own check
            continue
        if getattr(cls, "cluster_placement", None) in ("partition", "node"):
            continue
        if kind == "file":
            out.append((("sources", i, "type"), "file sources stay per host: run a single-node daemon on each host "
                        "that tails the files and delivers with an http_endpoint destination into a firehose_http "
                        "source of this cluster (docs/cluster.md)"))
        else:
            out.append((("sources", i, "type"), f"a {kind} source does not say how it runs in cluster mode "
                        "(its config class has no cluster_placement)"))
    dest: Any = raw_stream.get("destination")
    try:  # a destination config class's own cluster_problem(raw) (Iceberg's embedded catalog)
        check = getattr(destination_config_class(str(dest.get("type"))), "cluster_problem", None)
        problem = check(dest) if callable(check) else None
    except Exception:  # noqa: BLE001 - not a mapping, or an unknown type: the stream's own check says so
        problem = None
    if problem is not None:
        out.append((("destination", *problem[0]), problem[1]))
    if "spool" in raw_stream:
        out.append((("spool",), "means nothing in cluster mode: the stream's log is in JetStream (each "
                    "partition's log holds up to 1 GiB); remove it"))
    return out


def node_name(config: ClusterConfig) -> str:
    """This daemon's node name: ``cluster.node``, else the host name (made a valid name)."""
    import re

    return config.node or re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64] or "node"


class ClusteredStream:
    """A delivery stream in cluster mode: the partitions of it this daemon runs, each a
    :class:`firehose.stream.StreamRuntime` on that partition's JetStream logs. It answers the
    API as one stream does."""

    def __init__(self, config: Any, version: int, node: str, metrics: Any = None) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.node = node
        self.metrics = metrics  # the SourceSink's, for the sources that run once per daemon
        self.partitions: dict[int, Any] = {}
        self.members: list[str] = []  # the cluster's live members, as last seen (set by Cluster)
        self.node_sources: list[Any] = []  # sources that run once per daemon (firehose_http)
        self.owners: dict[int, str | None] = {}  # every partition's owner as the leases say (set by Cluster)
        self.max_size_bytes = 1 << 30  # one partition log's cap
        self.record_id_prefix = ""
        self.in_flight = 0  # puts being stored now (a deletion waits for them: firehose/control_cluster.py)
        self.redrive_ids: Any = None  # ClusterIds of `firehose redrive` batches, once the facts are reachable
        self._rr = random.Random()

    def _open(self) -> list[tuple[int, Any]]:
        return [(p, rt) for p, rt in sorted(self.partitions.items()) if rt.can_accept]

    @property
    def sources(self) -> list[Any]:
        """The per-daemon sources and one owned partition's sources (for DescribeDeliveryStream)."""
        parts = [rt.sources for _, rt in sorted(self.partitions.items())]
        return [*self.node_sources, *(parts[0] if parts else [])]

    @property
    def positions(self) -> dict[str, Any]:
        """A per-daemon source keeps no position here: it keeps its state in the cluster's facts."""
        return {}

    @property
    def accepting(self) -> bool:
        return bool(self._open())

    @property
    def can_accept(self) -> bool:
        return bool(self._open())

    @property
    def fenced(self) -> bool:
        return bool(self.partitions) and all(rt.fenced for rt in self.partitions.values())

    def has_room(self, nbytes: int) -> bool:
        return any(rt.has_room(nbytes) for _, rt in self._open())

    async def put(self, records: list[bytes], arrival_ms: int | None = None, *, nbytes: int | None = None,
                  meta: list[Any] | None = None, positions: dict[str, Any] | None = None) -> int:
        """Append to the owned partition with the least waiting; returns the partition and the
        first record's sequence number packed in one int (see :meth:`record_id`)."""
        from firehose.log import LogFullError

        need = nbytes if nbytes is not None else sum(map(len, records))
        choices = [(rt.spool.size_bytes, self._rr.random(), p, rt) for p, rt in self._open() if rt.has_room(need)]
        if not choices:
            raise LogFullError(f"stream {self.name}: this daemon owns no partition with room")
        _, _, partition, rt = min(choices)
        self.in_flight += 1
        try:
            first = await rt.put(records, arrival_ms, nbytes=nbytes, meta=meta, positions=positions)
        finally:
            self.in_flight -= 1
        return (partition << SEQ_BITS) | first

    def record_id(self, packed: int) -> str:
        partition, seq = packed >> SEQ_BITS, packed & ((1 << SEQ_BITS) - 1)
        rt = self.partitions.get(partition)
        prefix = rt.record_id_prefix if rt is not None else "0" * 24
        return f"{prefix}{partition:04x}{seq:012x}"

    def failing_for_secs(self) -> float | None:
        times = [t for rt in self.partitions.values() if (t := rt.failing_for_secs()) is not None]
        return max(times) if times else None

    def status(self) -> dict[str, Any]:
        parts = [rt.status() for rt in self.partitions.values()]
        summed = ("spool_bytes", "backlog_records", "pending_batches", "open_buffer_records", "open_partitions",
                  "active_partitions",
                  "delivered_records", "dropped_records", "archived_records", "backed_up_records")
        doc: dict[str, Any] = {k: sum(int(s.get(k) or 0) for s in parts) for k in summed}
        errors = [s["last_delivery_error"] for s in parts if s.get("last_delivery_error")]
        failing = [s["failing_since"] for s in parts if s.get("failing_since")]
        doc.update({
            "accepting_records": self.can_accept,
            "oldest_pending_age_secs": max((float(s["oldest_pending_age_secs"]) for s in parts), default=0.0),
            "last_delivery_error": errors[0] if errors else None,
            "failing_since": min(failing) if failing else None,
            "spool_failed": next((s["spool_failed"] for s in parts if s.get("spool_failed")), None),
            "node": self.node,
            "owned_partitions": sorted(self.partitions),
            "cluster_members": list(self.members),
            "partition_owners": {str(p): node for p, node in sorted(self.owners.items())},
        })
        return doc

    async def stop(self, timeout: float) -> bool:
        results = await asyncio.gather(*(rt.stop(timeout) for rt in self.partitions.values()),
                                       return_exceptions=True)
        self.partitions.clear()
        return all(r is True for r in results)


class Cluster:
    """This daemon's membership of the cluster: the connection, the leases it holds, and the
    partition runtimes it runs. ``make_runtime(config, logs)`` builds a partition's runtime."""

    def __init__(self, config: ClusterConfig, streams: dict[str, ClusteredStream], make_runtime: Any,
                 *, source_context: Any = None, max_size_bytes: int = 1 << 30, metrics: Any = None) -> None:
        self.config = config
        self.source_context = source_context  # (stream config, placement) -> BuildContext
        self.metrics = metrics
        self.node = node_name(config)
        self.streams = streams
        self.make_runtime = make_runtime
        self.max_size_bytes = max_size_bytes
        self.nc: Any = None
        self.js: Any = None
        self._leases: Any = None
        self._members: Any = None
        self.held: dict[tuple[str, int], int] = {}  # (stream, partition) -> lease revision
        self.members: list[str] = []
        self.api_url = config.advertise_url or ""  # set by the daemon from api.listen when not configured
        self.member_urls: dict[str, str] = {}  # node -> its API, as each member announces it
        self.lease_moves = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.state: SharedStreamState | None = None  # set once connected
        self.on_state: Any = None  # called with it, so the daemon answers from it
        self.max_payload = 8 << 20
        self.facts: JetStreamFacts | None = None  # the sources' shared facts (FH_SOURCES)
        self._unstarted_sources: list[tuple[ClusteredStream, Any]] = [
            (stream, sc) for stream in streams.values() for sc in _node_sources(stream.config)]
        self._lock = asyncio.Lock()  # a lease round and a reload never interleave
        self.draining: set[tuple[str, int]] = set()  # partitions stopped to seal and deliver (drain_partition)

    @property
    def tick_secs(self) -> float:
        return max(0.5, self.config.lease_ttl_secs / 5)

    def start(self) -> None:
        """Connect and take part in the background: the daemon serves (503 for the streams)
        until partitions are owned, and an unreachable NATS is retried, never a crash."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")

    async def _connect(self) -> None:
        import nats

        js_cfg = self.config.jetstream
        attempt = 0
        while not self._stopping:
            attempt += 1
            try:
                # The client retries unreachable servers itself, for ever; every failed attempt
                # (before and after the first connection) is one log line, never a traceback.
                kwargs: dict[str, Any] = {"servers": js_cfg.servers, "connect_timeout": js_cfg.connect_timeout_secs,
                                          "max_reconnect_attempts": -1, "name": f"firehose-{self.node}",
                                          "allow_reconnect": True, "error_cb": self._on_error,
                                          "disconnected_cb": self._on_disconnect, "reconnected_cb": self._on_reconnect}
                if js_cfg.credentials:
                    kwargs["user_credentials"] = js_cfg.credentials
                self.nc = await nats.connect(**kwargs)
                self.js = self.nc.jetstream()
                ttl = float(self.config.lease_ttl_secs)
                self._leases = await self.js.create_key_value(bucket=LEASES, ttl=ttl, history=1,
                                                              replicas=js_cfg.replicas)
                self._members = await self.js.create_key_value(bucket=MEMBERS, ttl=ttl, history=1,
                                                               replicas=js_cfg.replicas)
                state_kv = await self.js.create_key_value(bucket=STREAM_STATE, history=1, replicas=js_cfg.replicas)
                self.facts = JetStreamFacts(self.js, await self.js.create_key_value(
                    bucket=SOURCE_FACTS, history=1, replicas=js_cfg.replicas))
                self.state = SharedStreamState(state_kv, asyncio.get_running_loop())
                for stream in self.streams.values():
                    stream.version = await self.state.sync_version(stream.config)
                if self.on_state is not None:
                    self.on_state(self.state)
                self.max_payload = int(self.nc.max_payload)
                if self.max_payload < (5 << 20):
                    log.warning("cluster_max_payload_small", max_payload=self.max_payload,
                                hint="set max_payload: 8MB on the NATS servers; a larger request is published "
                                     "as an atomic batch of several messages, which is slower")
                log.info("cluster_connected", node=self.node, servers=js_cfg.servers, attempts=attempt)
                return
            except Exception as exc:  # noqa: BLE001 - any failure to reach NATS is retried
                log.error("cluster_connect_failed", node=self.node, servers=js_cfg.servers,
                          error=one_line(exc), attempt=attempt)
                if self.nc is not None:
                    await self.nc.close()
                    self.nc = None
                await asyncio.sleep(min(5.0, 0.5 * attempt))

    async def _on_error(self, exc: Exception) -> None:
        event = "cluster_nats_error" if self.js is not None else "cluster_connect_failed"
        log.error(event, node=self.node, servers=self.config.jetstream.servers,
                  error=one_line(exc))

    async def _on_disconnect(self) -> None:
        if not self._stopping:  # not our own close at shutdown
            log.warning("cluster_disconnected", node=self.node)

    async def _on_reconnect(self) -> None:
        log.info("cluster_reconnected", node=self.node)

    async def _run(self) -> None:
        await self._connect()
        # Renewals run on their own, so a slow takeover or release never lets a lease lapse.
        renewals = asyncio.get_running_loop().create_task(self._renew_loop(), name="cluster-leases")
        try:
            while not self._stopping:
                try:
                    async with self._lock:
                        await self.tick()
                except Exception as exc:  # noqa: BLE001 - one failed round is retried at the next
                    log.warning("cluster_tick_failed", node=self.node, error=one_line(exc))
                await asyncio.sleep(self.tick_secs)
        finally:
            renewals.cancel()
            await asyncio.gather(renewals, return_exceptions=True)

    async def _renew_loop(self) -> None:
        while not self._stopping:
            try:
                # The streams it runs: a stream's fair share counts only the members that know it
                # (during a rolling reload, not every daemon does).
                await self._members.put(self.node, orjson.dumps({"at": time.time(), "streams": sorted(self.streams),
                                                                 "api": self.api_url}))
            except Exception as exc:  # noqa: BLE001 - NATS away: the leases lapse, as they must
                log.warning("cluster_heartbeat_failed", node=self.node, error=one_line(exc))
            for key in list(self.held):
                await self._renew(key)
            await asyncio.sleep(self.tick_secs)

    def _key(self, stream: str, partition: int) -> str:
        from firehose.jslog import jetstream_names

        return jetstream_names(stream, partition, "lease")[1].removeprefix("fh.").replace(".lease", "")

    async def tick(self) -> None:
        """One round: announce this member, renew held leases, give up what is over the fair
        share, take free partitions up to it, and restart partitions whose log failed."""
        knows = await self._member_streams()
        self.members = sorted(knows)
        for stream in self.streams.values():
            self._refresh_stream(stream)
        await self._start_node_sources()
        if self.state is not None:
            await self.state.refresh(sorted(self.streams))
        # The fair share is per stream (so every daemon owns partitions of every stream and
        # answers for it), among the members that run the stream.
        partitions = self.config.jetstream.partitions
        for name in sorted(self.streams):
            fair = math.ceil(partitions / max(1, sum(1 for known in knows.values() if known is None or name in known)))
            mine = sorted((k for k in self.held if k[0] == name), reverse=True)
            for key in mine[: max(0, len(mine) - fair)]:
                await self._release(key, "rebalance")
            for partition in range(partitions):
                if sum(1 for k in self.held if k[0] == name) >= fair:
                    break
                if (name, partition) not in self.held:
                    await self._try_take(name, partition)
        for (name, partition) in list(self.held):
            if (name, partition) in self.draining:
                continue
            rt = self.streams[name].partitions.get(partition)
            if rt is None or rt.fenced:
                await self._restart_partition(name, partition)
            else:
                await self._tend(self.streams[name], rt, opened=False)
        await self._refresh_owners()

    def _refresh_stream(self, stream: ClusteredStream) -> None:
        """What a stream learns from the cluster every round."""
        stream.members = self.members
        stream.max_size_bytes = self.max_size_bytes
        if stream.redrive_ids is None and self.facts is not None:  # redrive batch ids (firehose/cluster_ids.py)
            from firehose.cluster_ids import ClusterIds
            from firehose.redrive import POSITION_PREFIX

            stream.redrive_ids = ClusterIds(self.placement(None), stream.name, prefix=POSITION_PREFIX,
                                            kind="redrive", log=log.bind(stream=stream.name))

    async def _refresh_owners(self) -> None:
        """Every partition's owner as the lease bucket says: the cluster-wide view /healthz shows."""
        from nats.js.errors import KeyNotFoundError

        for name, stream in self.streams.items():
            owners: dict[int, str | None] = {}
            for partition in range(self.config.jetstream.partitions):
                if (name, partition) in self.held:
                    owners[partition] = self.node
                    continue
                try:
                    owners[partition] = ((await self._leases.get(self._key(name, partition))).value or b"").decode()
                except KeyNotFoundError:
                    owners[partition] = None
            stream.owners = owners

    async def apply(self, configs: list[Any], timeout: float) -> None:
        """A reload (SIGHUP): streams gone from the config give their partitions up; new ones are
        taken at the next round; a changed stream's owned partitions stop (sealing and delivering
        within ``timeout``) and start again on the new config from the same JetStream logs, and
        its VersionId moves on once for the whole cluster. A partition that fails to start on the
        new config is tried again at every round (``cluster_partition_start_failed``)."""
        async with self._lock:
            new = {c.name: c for c in configs}
            for name in sorted(set(self.streams) - set(new)):
                await self._remove_stream(name)
            for name, cfg in sorted(new.items()):
                current = self.streams.get(name)
                if current is None or current.config != cfg:
                    await self._configure_stream(current, cfg, timeout)
            if self.facts is not None:
                await self._start_node_sources()

    async def _remove_stream(self, name: str) -> None:
        stream = self.streams[name]
        await self._stop_node_sources(stream)
        self._unstarted_sources = [(s, c) for s, c in self._unstarted_sources if s is not stream]
        for key in sorted(k for k in self.held if k[0] == name):
            await self._release(key, "removed")
        del self.streams[name]
        log.info("stream_removed", stream=name)

    async def _configure_stream(self, current: ClusteredStream | None, cfg: Any, timeout: float) -> None:
        """Add a stream, or restart a changed one's owned partitions on ``cfg``."""
        name = cfg.name
        version = await self.state.sync_version(cfg) if self.state is not None else 1
        if current is None:
            stream = self.streams[name] = ClusteredStream(cfg, version, self.node, self.metrics)
            stream.members = self.members
        else:
            stream = current
            await self._stop_node_sources(stream)
            self._unstarted_sources = [(s, c) for s, c in self._unstarted_sources if s is not stream]
            stream.config, stream.version = cfg, version
            for partition in sorted(stream.partitions):
                rt = stream.partitions.pop(partition, None)  # None: its lease was lost meanwhile
                if rt is not None:
                    await _stop_quietly(rt, timeout, name, partition)
                if (name, partition) in self.held:
                    await self._start_partition(name, partition)
        self._unstarted_sources += [(stream, sc) for sc in _node_sources(cfg)]
        log.info("stream_configured", stream=name, version=version, node=self.node)

    async def _stop_node_sources(self, stream: ClusteredStream) -> None:
        for source in stream.node_sources:
            try:
                await source.stop()
            except Exception as exc:  # noqa: BLE001
                log.warning("cluster_source_stop_failed", node=self.node, stream=stream.name, error=one_line(exc))
        stream.node_sources.clear()

    def placement(self, partition: int | None) -> Any:
        from firehose.interfaces import ClusterPlacement

        assert self.facts is not None
        return ClusterPlacement(self.node, self.config.jetstream.partitions, self.facts, partition,
                                lease_ttl_secs=self.config.lease_ttl_secs)

    async def _start_node_sources(self) -> None:
        """Start the sources that run once per daemon (a port to listen on); one that fails to
        start is tried again at the next round."""
        waiting, self._unstarted_sources = self._unstarted_sources, []
        for stream, source_config in waiting:
            try:
                source = source_config.build(self.source_context(stream.config, self.placement(None)), stream)
                await source.start()
            except Exception as exc:  # noqa: BLE001 - tried again at the next round
                log.error("cluster_source_start_failed", node=self.node, stream=stream.name,
                          source=source_config.type, error=one_line(exc))
                self._unstarted_sources.append((stream, source_config))
                continue
            stream.node_sources.append(source)

    async def _tend(self, stream: ClusteredStream, rt: Any, *, opened: bool) -> None:
        """Let the per-daemon sources see a partition this daemon owns: what an earlier owner
        stored (``opened``), and positions to forget."""
        for source in [*stream.node_sources, stream.redrive_ids]:
            tend = getattr(source, "tend_partition", None)
            if tend is None:
                continue
            try:
                await tend(rt, opened=opened)
            except Exception as exc:  # noqa: BLE001 - tried again at the next round
                log.warning("cluster_source_tend_failed", node=self.node, stream=stream.name, error=one_line(exc))

    async def _try_take(self, name: str, partition: int) -> None:
        """Take a partition whose lease nobody holds, and start it."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        try:
            await self._leases.get(self._key(name, partition))
            return  # held by another member
        except KeyNotFoundError:
            pass
        try:
            revision = await self._leases.create(self._key(name, partition), self.node.encode())
        except KeyWrongLastSequenceError:
            return  # another member took it first
        self.held[(name, partition)] = revision
        self._moved(name, "taken")
        await self._start_partition(name, partition)

    def _moved(self, stream: str, kind: str) -> None:
        self.lease_moves += 1
        if self.metrics is not None:
            self.metrics.cluster_lease_moves.labels(stream, kind).inc()
            owned = sum(1 for name, _ in self.held if name == stream)
            self.metrics.cluster_owned_partitions.labels(stream).set(owned)

    async def _member_streams(self) -> dict[str, set[str] | None]:
        """The live members and the streams each runs (None: unknown, counted as every stream)."""
        from nats.js.errors import KeyNotFoundError

        try:
            nodes = await bucket_keys(self.js, MEMBERS)
        except Exception:  # noqa: BLE001 - NATS away: this round knows only itself
            return {self.node: set(self.streams)}
        out: dict[str, set[str] | None] = {self.node: set(self.streams)}
        urls = {self.node: self.api_url}
        for node in nodes:
            if node == self.node:
                continue
            try:
                doc = orjson.loads((await self._members.get(node)).value or b"")
            except KeyNotFoundError:
                continue  # left (its key deleted) or expired
            try:
                out[node] = set(doc["streams"]) if isinstance(doc, dict) else None
                if isinstance(doc, dict) and isinstance(doc.get("api"), str):
                    urls[node] = doc["api"]
            except Exception:  # noqa: BLE001 - an older daemon's value
                out[node] = None
        self.member_urls = {n: u for n, u in sorted(urls.items()) if n in out and u}
        return out

    async def drain_partition(self, name: str, partition: int, timeout: float) -> bool:
        """Seal and deliver everything in a partition this daemon owns (a stream being deleted):
        its runtime stops, which seals its buffers, and the next round starts it again from the
        log, holding what could not be delivered within ``timeout``. True when all was delivered."""
        async with self._lock:
            stream = self.streams.get(name)
            rt = stream.partitions.pop(partition, None) if stream is not None else None
            if rt is None:
                return False
            self.draining.add((name, partition))
        try:
            return bool(await rt.stop(timeout))
        finally:
            self.draining.discard((name, partition))

    async def members_running(self, name: str) -> set[str]:
        """The live members that run stream ``name`` (one whose streams are unknown counts).
        Raises when the members cannot be read: then nobody may be taken to have stopped."""
        from nats.js.errors import KeyNotFoundError

        out = {self.node} if name in self.streams else set()
        for node in await bucket_keys(self.js, MEMBERS):
            if node == self.node:
                continue
            try:
                doc = orjson.loads((await self._members.get(node)).value or b"")
            except KeyNotFoundError:
                continue  # gone meanwhile
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or name in (doc.get("streams") or [name]):
                out.add(node)
        return out

    async def _renew(self, key: tuple[str, int]) -> None:
        if key not in self.held:
            return
        try:
            self.held[key] = await self._leases.update(self._key(*key), self.node.encode(), last=self.held[key])
        except Exception as exc:  # noqa: BLE001 - lost (expired and taken) or unreachable
            log.warning("cluster_lease_lost", node=self.node, stream=key[0], partition=key[1],
                        error=one_line(exc))
            self.held.pop(key, None)
            self._moved(key[0], "lost")
            rt = self.streams[key[0]].partitions.pop(key[1], None)
            if rt is not None:  # its log is fenced by the new owner; nothing more is written
                await _stop_quietly(rt, 0.0, *key)

    async def _release(self, key: tuple[str, int], reason: str) -> None:
        rt = self.streams[key[0]].partitions.pop(key[1], None)
        if rt is not None:  # seal and deliver what it can; the rest stays sealed for the next owner
            await _stop_quietly(rt, self.config.lease_ttl_secs / 2, *key)
        revision = self.held.pop(key, None)
        if revision is not None:
            try:
                await self._leases.delete(self._key(*key), last=revision)
            except Exception:  # noqa: BLE001 - it expires by its TTL anyway
                pass
        self._moved(key[0], "released")
        log.info("cluster_partition_released", node=self.node, stream=key[0], partition=key[1], reason=reason)

    async def _start_partition(self, name: str, partition: int) -> None:
        from firehose.jslog import JetStreamLogs

        stream = self.streams[name]
        logs = JetStreamLogs(self.nc, partition=partition, replicas=self.config.jetstream.replicas,
                             max_size_bytes=self.max_size_bytes, max_payload=self.max_payload, metrics=self.metrics)
        await logs.refresh(name)
        try:
            rt = await self.make_runtime(stream.config, logs, self.placement(partition))
        except Exception as exc:  # noqa: BLE001 - retried at the next round
            log.error("cluster_partition_start_failed", node=self.node, stream=name, partition=partition,
                      error=one_line(exc))
            return
        stream.partitions[partition] = rt
        await self._tend(stream, rt, opened=True)
        log.info("cluster_partition_taken", node=self.node, stream=name, partition=partition,
                 pending_batches=len(rt.recovery.pending) if rt.recovery is not None else 0)

    async def _restart_partition(self, name: str, partition: int) -> None:
        """A partition whose log failed (a publish timed out during a NATS leader election, say):
        its state is unknown to this writer, so it is opened again from what JetStream stored."""
        rt = self.streams[name].partitions.pop(partition, None)
        if rt is not None:
            await _stop_quietly(rt, 0.0, name, partition)
            self._moved(name, "reopened")
            log.warning("cluster_partition_reopened", node=self.node, stream=name, partition=partition)
        await self._start_partition(name, partition)

    async def stop(self, timeout: float) -> None:
        """Leave: stop the partitions (sealing and delivering within ``timeout``), release the
        leases so the others take over at once, and close the connection."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for stream in self.streams.values():  # first, so what they acknowledged is all in the logs
            await self._stop_node_sources(stream)
        runtimes = [self.streams[name].partitions.pop(p, None) for name, p in self.held]
        await asyncio.gather(*(rt.stop(timeout) for rt in runtimes if rt is not None), return_exceptions=True)
        for key, revision in list(self.held.items()):
            try:
                await self._leases.delete(self._key(*key), last=revision)
            except Exception:  # noqa: BLE001 - it expires by its TTL anyway
                pass
        self.held.clear()
        if self._members is not None:
            try:
                await self._members.delete(self.node)
            except Exception:  # noqa: BLE001
                pass
        if self.nc is not None:
            await self.nc.close()


def _node_sources(config: Any) -> list[Any]:
    """A stream's sources that run once per daemon in cluster mode."""
    return [sc for sc in config.sources if getattr(sc, "cluster_placement", None) == "node"]


async def _stop_quietly(rt: Any, timeout: float, stream: str, partition: int) -> None:
    """Stop a partition's runtime; a failure is logged (its log is what matters, and it is in
    JetStream), never raised into the lease loop."""
    try:
        await rt.stop(timeout)
    except Exception as exc:  # noqa: BLE001
        log.warning("cluster_partition_stop_failed", stream=stream, partition=partition,
                    error=one_line(exc))
