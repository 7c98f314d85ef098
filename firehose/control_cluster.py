"""The control plane in cluster mode: API-defined streams live in JetStream, not on one daemon's disk.

Each API stream is one entry of the JetStream key-value bucket ``FH_API_STREAMS`` (replicated as
the cluster's ``jetstream.replicas``): the stream's YAML model (as ``api-streams.yaml`` holds it
on one node), the request members its destination was made from, and, while it is being
deleted, the deletion's progress. Every daemon reads the bucket every second and runs what it
finds beside its YAML streams (``Cluster.apply``), so a stream created through any daemon is
served by all of them, and survives any of them.

* ``CreateDeliveryStream`` is a create-if-absent write: two daemons creating one name at once,
  one wins and the other answers ``ResourceInUseException``.
* ``UpdateDestination`` moves the shared VersionId on with a revision-checked write (in
  ``FH_STREAMS``) that fails when another update came first (``ConcurrentModificationException``),
  then writes the new destination; every daemon restarts its partitions on it.
* ``DeleteDeliveryStream`` marks the entry deleting. Every member stops taking records for it and
  records that it has (``stopped``), once its requests under way are stored. When every live
  member has stopped, the owner of each partition waits until everything acknowledged in it is
  delivered (or archived) and records the partition ``drained``. When every partition is drained
  the entry is removed; every daemon then drops the stream, and the daemon that removed the entry
  deletes the stream's JetStream logs and its state once no member runs it any more. A member
  that dies meanwhile stops being a member when its heartbeat lapses; its partitions are taken
  over and drained by the others. A daemon that starts while a stream is being deleted never
  takes records for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from firehose.config import StreamConfig
from firehose.control import DRAIN_ROUND_SECS, ControlError, ControlPlane, encryption_of
from firehose.control_shapes import ShapeError, destination_update
from firehose.registry import one_line

if TYPE_CHECKING:
    from firehose.daemon import Daemon

__all__ = ["API_STREAMS_BUCKET", "ClusterControlPlane", "read_api_streams"]

log = structlog.get_logger()

API_STREAMS_BUCKET = "FH_API_STREAMS"
SYNC_SECS = 1.0
#: How long the daemon that removed a stream's entry waits for every member to drop the stream
#: before it deletes the stream's JetStream logs anyway (a member that kept it has lost its leases).
CLEANUP_WAIT_SECS = 120.0


def entry_key(name: str) -> str:
    """The bucket key of a stream: its name in hex (a name may hold '.' runs a key may not)."""
    return name.encode().hex()


class ClusterControlPlane(ControlPlane):
    """The API-defined streams of a cluster, shared through ``FH_API_STREAMS``."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon)
        self.path = f"the cluster's JetStream bucket {API_STREAMS_BUCKET}"
        self.settled = False  # the bucket has been read once: until then an unknown name may be an API stream
        self.kv: Any = None
        self.revisions: dict[str, int] = {}  # name -> the revision of its entry as last read
        self.entries: dict[str, dict[str, Any]] = {}
        self.configs: dict[str, StreamConfig] = {}  # the API streams that validate, as this daemon runs them
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drains: set[tuple[str, int]] = set()  # partitions being sealed and delivered for a deletion

    # ------------------------------------------------------------------ the bucket
    def load(self) -> list[StreamConfig]:
        return []  # nothing on disk: the bucket is read by the sync loop

    async def _bucket(self) -> Any:
        cluster = self.daemon.cluster
        while self.kv is None:
            if cluster is not None and cluster.js is not None:
                self.kv = await cluster.js.create_key_value(bucket=API_STREAMS_BUCKET, history=1,
                                                            replicas=cluster.config.jetstream.replicas)
                break
            await asyncio.sleep(0.2)
        return self.kv

    async def _read(self, name: str) -> tuple[dict[str, Any] | None, int]:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await (await self._bucket()).get(entry_key(name))
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, 0
        return orjson.loads(entry.value), int(entry.revision)

    async def _read_all(self) -> dict[str, tuple[dict[str, Any], int]]:
        from nats.js.errors import NoKeysError

        kv = await self._bucket()
        try:
            keys = list(await kv.keys())
        except NoKeysError:
            return {}
        out = {}
        for key in keys:
            try:
                name = bytes.fromhex(key).decode()
            except ValueError:
                continue
            doc, revision = await self._read(name)
            if doc is not None:
                out[name] = (doc, revision)
        return out

    async def _write(self, name: str, doc: dict[str, Any], revision: int) -> int | None:
        """Revision-checked (0: create if absent); None when another write came first."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = await self._bucket()
        try:
            if revision == 0:
                return int(await kv.create(entry_key(name), orjson.dumps(doc)))
            return int(await kv.update(entry_key(name), orjson.dumps(doc), last=revision))
        except KeyWrongLastSequenceError:
            return None

    # ------------------------------------------------------------------ start and sync
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sync_loop(), name="control-plane-sync")

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS away: tried again at the next round
                log.warning("api_streams_sync_failed", error=one_line(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), SYNC_SECS)
            except TimeoutError:
                pass
            self._wake.clear()

    async def sync(self) -> None:
        """Read the bucket, run what it holds (beside the YAML streams), and tend deletions."""
        found = await self._read_all()
        yaml_names = {s.name for s in self.daemon.config.streams}
        for name in sorted(set(self.entries) - set(found)):
            for table in (self.entries, self.revisions, self.configs, self.docs, self.requests):
                table.pop(name, None)
            self.deleting.discard(name)
            self.daemon.failed_streams.pop(name, None)
        for name, (entry, revision) in sorted(found.items()):
            if self.revisions.get(name) == revision:
                continue
            self.entries[name], self.revisions[name] = entry, revision
            self.docs[name], self.requests[name] = entry["stream"], entry.get("request") or {}
            if entry.get("deleting"):
                self.deleting.add(name)
            if name in yaml_names:
                log.error("api_stream_shadowed", stream=name, file=self.path)
                self.configs.pop(name, None)
                continue
            try:
                self.configs[name] = await asyncio.to_thread(self._validate, entry["stream"], self.path)
                self.daemon.failed_streams.pop(name, None)
            except ControlError as exc:
                self.configs.pop(name, None)
                self.daemon.failed_streams[name] = "its entry no longer validates on this daemon; see the log"
                log.error("api_stream_invalid", stream=name, file=self.path, error=exc.message)
        await self._apply()
        self.settled = True
        for name in sorted(n for n in self.deleting if n in self.entries):
            await self._tend_deletion(name)

    async def find(self, name: str) -> None:
        """A name this daemon does not run yet may have been created through another daemon a
        moment ago: read the bucket now rather than at the next round."""
        if name not in self.daemon.streams and name not in self.creating and self.kv is not None:
            entry, _ = await self._read(name)
            if entry is not None:
                await self.sync()

    def stream_configs(self) -> list[StreamConfig]:
        """The API streams this daemon runs, for every ``Cluster.apply`` (a reload's too)."""
        yaml_names = {s.name for s in self.daemon.config.streams}
        return [cfg for name, cfg in sorted(self.configs.items()) if name not in yaml_names]

    async def _apply(self) -> None:
        cluster = self.daemon.cluster
        assert cluster is not None
        from firehose.daemon import _shape

        wanted = {c.name: _shape(c) for c in [*self.daemon.config.streams, *self.stream_configs()]}
        if {n: s.config for n, s in cluster.streams.items()} == wanted:
            return
        async with self.daemon._reload_lock:
            await cluster.apply(list(wanted.values()), float(self.daemon.config.shutdown_timeout_secs))
        for name in list(self.creating):
            if name in cluster.streams:
                del self.creating[name]

    def status(self, name: str) -> str:
        if name in self.creating:
            return "CREATING"
        return "DELETING" if name in self.deleting else "ACTIVE"

    # ------------------------------------------------------------------ calls
    async def create(self, doc: dict[str, Any], *, limited: bool = False) -> str:
        api = self.daemon.config.api
        stream, tags, request, name = self._parse_create(doc, limited)
        state = self.daemon.cluster.state if self.daemon.cluster is not None else None
        if not self.settled or state is None:
            raise ControlError("ServiceUnavailableException", "Slow down.")
        async with self._lock:
            self._check_free_cluster(name)
            cfg = await asyncio.to_thread(self._validate, stream, "CreateDeliveryStream")
            if (await state.read(name)) is not None:
                raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {api.account_id}: a "
                                   "former stream of that name left its state in the cluster")
            entry = {"stream": stream, "request": request, "created": time.time()}
            revision = await self._write(name, entry, 0)
            if revision is None:
                raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {api.account_id} "
                                   "already exists")
            self.creating[name] = cfg
            await state.sync_version(cfg)
            encryption = doc.get("DeliveryStreamEncryptionConfigurationInput")
            if tags:
                await state.amend(name, lambda d: {**d, "tags": {**d.get("tags", {}), **tags}})
            if encryption is not None:
                value = encryption_of(encryption)
                await state.amend(name, lambda d: {**d, "encryption": value})
        self._wake.set()
        log.info("api_stream_created", stream=name)
        return name

    def _check_free_cluster(self, name: str) -> None:
        account = self.daemon.config.api.account_id
        if name in self.daemon.streams or name in self.entries or name in self.creating or \
                name in {s.name for s in self.daemon.config.streams}:
            raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {account} already exists")

    async def update_destination(self, doc: dict[str, Any]) -> None:
        name = self._named(doc)
        state = self.daemon.cluster.state if self.daemon.cluster is not None else None
        assert state is not None
        async with self._lock:
            entry, revision = await self._read(name)
            if entry is None or name not in self.daemon.streams:
                raise self._not_found(name)
            if entry.get("deleting") or name in self.creating:
                raise ControlError("ResourceInUseException",
                                   f"Firehose {name} is {'DELETING' if entry.get('deleting') else 'CREATING'}")
            if doc.get("DestinationId", "destinationId-000000000001") != "destinationId-000000000001":
                raise ControlError("InvalidArgumentException", f"Destination {doc.get('DestinationId')!r} not found")
            try:
                stream, request = destination_update(name, entry.get("request") or {}, doc,
                                                     self.daemon.config.api.region)
            except ShapeError as exc:
                raise ControlError("InvalidArgumentException", str(exc)) from None
            if entry["stream"].get("sources"):
                stream["sources"] = entry["stream"]["sources"]
            cfg = await asyncio.to_thread(self._validate, stream, "UpdateDestination")
            given = str(doc.get("CurrentDeliveryStreamVersionId"))
            # The VersionId moves on first, checked against the caller's: of two updates naming
            # the same version through two daemons, one wins.
            version = await state.bump_version(name, given, cfg.fingerprint())
            if version is None:
                current = (await state.read(name) or {}).get("version")
                raise ControlError("ConcurrentModificationException",
                                   f"Cannot update firehose: {name} since the current version id: {current} "
                                   f"and the specified version id: {given} do not match")
            if await self._write(name, {**entry, "stream": stream, "request": request}, revision) is None:
                raise ControlError("ConcurrentModificationException", f"Cannot update firehose: {name}: another "
                                   "change was made meanwhile")
        await self.sync()  # this daemon runs the new destination before it answers; the others within a second
        log.info("api_stream_updated", stream=name, version=version)

    async def delete(self, doc: dict[str, Any]) -> None:
        name = self._named(doc)
        async with self._lock:
            while True:
                entry, revision = await self._read(name)
                if entry is None:
                    raise self._not_found(name)
                if entry.get("deleting"):
                    return  # a repeated delete is accepted, as Firehose accepts it
                if name in self.creating:
                    raise ControlError("ResourceInUseException", f"Firehose {name} is CREATING")
                marked = {**entry, "deleting": True, "deleting_since": time.time(), "stopped": [], "drained": []}
                if await self._write(name, marked, revision) is not None:
                    break
            self.deleting.add(name)
        self._wake.set()
        log.info("api_stream_deleting", stream=name)

    async def encryption(self, doc: dict[str, Any], start: bool) -> None:
        name = self._named(doc)
        state = self.daemon.cluster.state if self.daemon.cluster is not None else None
        if name not in self.entries or name in self.deleting or name not in self.daemon.streams or state is None:
            raise self._not_found(name)
        value: dict[str, Any] = {"Status": "DISABLED"}
        if start:
            value = encryption_of(doc.get("DeliveryStreamEncryptionConfigurationInput"))
        await state.amend(name, lambda d: {**d, "encryption": value})

    # ------------------------------------------------------------------ deletion
    async def _tend_deletion(self, name: str) -> None:
        """One step of a deletion, as this member can take it (see the module's docstring)."""
        cluster = self.daemon.cluster
        assert cluster is not None
        entry, revision = await self._read(name)
        if entry is None or not entry.get("deleting"):
            return
        stream = cluster.streams.get(name)
        stopped, drained = set(entry.get("stopped") or []), set(entry.get("drained") or [])
        if cluster.node not in stopped:
            if stream is not None and stream.in_flight:
                return  # requests already taken are being stored; next round
            await self._write(name, {**entry, "stopped": sorted(stopped | {cluster.node})}, revision)
            return
        members = await cluster.members_running(name)
        if not members <= stopped:
            return
        partitions = cluster.config.jetstream.partitions
        newly = self._drained_now(name, stream, drained)
        if newly:
            drained |= newly
            revision = await self._write(name, {**entry, "drained": sorted(drained)}, revision) or 0
            if not revision:
                return
            log.info("api_stream_partitions_drained", stream=name, partitions=sorted(newly), node=cluster.node)
        if len(drained) < partitions:
            return
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await (await self._bucket()).delete(entry_key(name), last=revision)
        except KeyWrongLastSequenceError:
            return  # moved on meanwhile; next round
        log.info("api_stream_deleted", stream=name, at=time.time())
        self._spawn(self._clean_up(name))
        self._wake.set()

    def _drained_now(self, name: str, stream: Any, drained: set[int]) -> set[int]:
        """The partitions this daemon owns that hold nothing undelivered now; the others are
        sealed and delivered at once (not at their buffers' interval), to be seen next round."""
        owned = dict(stream.partitions) if stream is not None else {}
        newly = {p for p, rt in owned.items() if p not in drained and _drained(rt.status())}
        for p in sorted(set(owned) - drained - newly):
            if (name, p) not in self._drains:
                self._drains.add((name, p))
                self._spawn(self._drain(name, p))
        return newly

    async def _drain(self, name: str, partition: int) -> None:
        cluster = self.daemon.cluster
        assert cluster is not None
        try:
            clean = await cluster.drain_partition(name, partition, DRAIN_ROUND_SECS)
            if not clean:
                log.warning("api_stream_delete_waiting", stream=name, partition=partition,
                            reason="batches not delivered yet; retrying")
        except Exception as exc:  # noqa: BLE001 - tried again at the next round
            log.error("api_stream_delete_failed", stream=name, partition=partition, error=one_line(exc))
        finally:
            self._drains.discard((name, partition))
            self._wake.set()

    async def _clean_up(self, name: str) -> None:
        """Once no member runs the stream any more, delete its JetStream logs and its state."""
        cluster = self.daemon.cluster
        assert cluster is not None
        deadline = time.monotonic() + CLEANUP_WAIT_SECS
        while time.monotonic() < deadline:
            runs = await cluster.members_running(name)
            if not runs:
                break
            await asyncio.sleep(SYNC_SECS)
        from nats.js.errors import NotFoundError

        from firehose.jslog import jetstream_names

        for partition in range(cluster.config.jetstream.partitions):
            for kind in ("ingest", "processed"):
                try:
                    await cluster.js.delete_stream(jetstream_names(name, partition, kind)[0])
                except NotFoundError:
                    pass
        if cluster.state is not None:
            await cluster.state.forget(name)
        log.info("api_stream_logs_removed", stream=name, partitions=cluster.config.jetstream.partitions)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await super().close()


def _drained(status: dict[str, Any]) -> bool:
    return not (status.get("backlog_records") or status.get("pending_batches") or status.get("open_buffer_records"))


def read_api_streams(cluster: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The API streams in the cluster's bucket, for ``firehose export-config`` (those being
    deleted left out). Raises on NATS being unreachable within ``timeout``."""

    async def read() -> list[dict[str, Any]]:
        import nats
        from nats.js.errors import BucketNotFoundError, NoKeysError

        js_cfg = cluster.jetstream
        kwargs: dict[str, Any] = {"servers": js_cfg.servers, "connect_timeout": js_cfg.connect_timeout_secs,
                                  "max_reconnect_attempts": 0, "allow_reconnect": False}
        if js_cfg.credentials:
            kwargs["user_credentials"] = js_cfg.credentials
        nc = await nats.connect(**kwargs)
        try:
            try:
                kv = await nc.jetstream().key_value(API_STREAMS_BUCKET)
                keys = list(await kv.keys())
            except (BucketNotFoundError, NoKeysError):
                return []
            out = []
            for key in sorted(keys):
                entry = orjson.loads((await kv.get(key)).value or b"{}")
                if isinstance(entry, dict) and not entry.get("deleting") and isinstance(entry.get("stream"), dict):
                    out.append(entry["stream"])
            return sorted(out, key=lambda s: str(s.get("name")))
        finally:
            await nc.close()

    return asyncio.run(asyncio.wait_for(read(), timeout))
