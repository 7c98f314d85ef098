"""The control plane in cluster mode: API-defined streams live in JetStream, not on one daemon's disk.

Each API stream is one entry of the JetStream key-value bucket ``FH_API_STREAMS`` (replicated as
the cluster's ``jetstream.replicas``): the stream's YAML model (as ``api-streams.yaml`` holds it
on one node), the request members its destination was made from, and, while it is being
deleted, the deletion's progress. Every daemon reads the bucket every second and runs what it
finds beside its YAML streams (``Cluster.apply``), so a stream created through any daemon is
served by all of them, and survives any of them.

* ``CreateDeliveryStream`` is a create-if-absent write: two daemons creating one name at once,
  one wins and the other answers ``ResourceInUseException``.
* ``UpdateDestination`` checks the caller's VersionId against the entry's and writes the entry
  with the next one in one revision-checked write: of two updates naming the same version
  through two daemons, one wins, the other answers ``ConcurrentModificationException``. Every
  daemon restarts its partitions on the new destination (the one it went through before it
  answers, the others within a second).
* ``DeleteDeliveryStream`` moves the entry to ``deleting``. Every member stops taking records for
  it (and its sources stop reading), and records that it has (``stopped``) once the requests it
  was storing are stored. When every live member that runs the stream has, the owner of each
  partition seals its buffers, delivers everything acknowledged in it (however long the
  destination takes) and records the partition ``drained``. When every partition is drained,
  the entry moves to ``removing``: every daemon drops the stream, and once none runs it any
  more, any daemon deletes the stream's JetStream logs and its state, then the entry (each
  step can be repeated, so a daemon that dies half-way leaves the rest to the others). A member
  that dies meanwhile stops counting when its heartbeat lapses; its partitions are taken over
  and drained by the others. A daemon that starts during a deletion never takes records for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from firehose.cluster_state import bucket_keys
from firehose.config import StreamConfig
from firehose.control import (
    DRAIN_ROUND_SECS,
    ControlError,
    ControlPlane,
    encryption_calls,
    encryption_of,
    encryption_value,
    stale_version,
)
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
        self._sync_lock = asyncio.Lock()
        self._synced_at = 0.0

    # ------------------------------------------------------------------ the bucket
    @property
    def _state(self) -> Any:
        """The cluster's shared stream state (``FH_STREAMS``), once connected; else None."""
        return self.daemon.cluster.state if self.daemon.cluster is not None else None

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
        try:
            doc = orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("stream"), dict):
            # Not written by a daemon (someone with access to NATS): skipped, never a stuck sync.
            log.error("api_stream_invalid", stream=name[:64], file=self.path, error="the entry is not a stream's")
            return None, 0
        return doc, int(entry.revision)

    async def _read_all(self) -> dict[str, tuple[dict[str, Any], int]]:
        cluster = self.daemon.cluster
        assert cluster is not None
        await self._bucket()
        out = {}
        for key in await bucket_keys(cluster.js, API_STREAMS_BUCKET):
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
        """Read the bucket, run what it holds (beside the YAML streams), and tend deletions. One
        at a time (the loop's, a call's), and an entry is never taken back to an older revision."""
        async with self._sync_lock:
            found = await self._read_all()
            for name in sorted(set(self.entries) - set(found)):
                # A listing taken while an entry is rewritten can miss it: asked for by name, it is there.
                entry, revision = await self._read(name)
                if entry is not None:
                    found[name] = (entry, revision)
                    continue
                for table in (self.entries, self.revisions, self.configs, self.docs, self.requests):
                    table.pop(name, None)
                self.deleting.discard(name)
                self.daemon.failed_streams.pop(name, None)
            for name, (entry, revision) in sorted(found.items()):
                if revision > self.revisions.get(name, 0):
                    await self._take(name, entry, revision)
            await self._apply()
            self.settled = True
            self._synced_at = time.monotonic()
            for name in sorted(n for n in self.deleting if n in self.entries):
                await self._tend_deletion(name)

    async def _take(self, name: str, entry: dict[str, Any], revision: int) -> None:
        """A new or changed entry: validated, its state made to match, ready for ``_apply``."""
        from firehose.daemon import _shape

        self.entries[name], self.revisions[name] = entry, revision
        self.docs[name], self.requests[name] = entry["stream"], entry.get("request") or {}
        phase = entry.get("phase", "active")
        if phase != "active":
            self.deleting.add(name)
        else:  # a new stream of a deleted one's name, whose removal this daemon did not see
            self.deleting.discard(name)
        if phase == "removing" or name in {s.name for s in self.daemon.config.streams}:
            if phase != "removing":
                log.error("api_stream_shadowed", stream=name, file=self.path)
            self.configs.pop(name, None)
            return
        try:
            cfg = await asyncio.to_thread(self._validate, entry["stream"], self.path)
        except ControlError as exc:
            self.configs.pop(name, None)
            self.daemon.failed_streams[name] = "its entry no longer validates on this daemon; see the log"
            log.error("api_stream_invalid", stream=name, file=self.path, error=exc.message)
            return
        self.daemon.failed_streams.pop(name, None)
        if phase == "deleting" and cfg.sources:  # a stream being deleted reads nothing more
            cfg = cfg.model_copy(update={"sources": []})
        state = self._state
        if state is not None:  # before it runs, so that the partitions start under this VersionId
            initial = {k: entry[k] for k in ("tags", "encryption") if entry.get(k) is not None}
            await state.ensure(name, int(entry.get("version", 1)), _shape(cfg).fingerprint(), initial)
        self.configs[name] = cfg

    async def find(self, name: str) -> None:
        """A name this daemon does not run yet may have been created through another daemon a
        moment ago: read the bucket now rather than at the next round."""
        if name not in self.daemon.streams and name not in self.creating and self.kv is not None:
            entry, _ = await self._read(name)
            if entry is not None:
                await self.sync()

    async def refresh(self) -> None:
        """ListDeliveryStreams: read the bucket now unless it was read a moment ago."""
        if self.kv is not None and time.monotonic() - self._synced_at > 0.25:
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
        if {n: s.config for n, s in cluster.streams.items()} != wanted:
            async with self.daemon._reload_lock:
                await cluster.apply(list(wanted.values()), float(self.daemon.config.shutdown_timeout_secs))
        for name in list(self.configs):
            stream = cluster.streams.get(name)
            if stream is not None:  # the entry's VersionId (an update that changed nothing moves it on too)
                stream.version = int(self.entries[name].get("version", stream.version))
                self.creating.pop(name, None)

    def status(self, name: str) -> str:
        if name in self.creating:
            return "CREATING"
        return "DELETING" if name in self.deleting else "ACTIVE"

    # ------------------------------------------------------------------ calls
    async def create(self, doc: dict[str, Any], *, limited: bool = False) -> str:
        """One create-if-absent write holds the stream, its VersionId, tags and encryption: two
        daemons creating one name at once, one of them answers ResourceInUseException."""
        api = self.daemon.config.api
        stream, tags, request, name = self._parse_create(doc, limited)
        state = self._state
        if not self.settled or state is None:
            raise ControlError("ServiceUnavailableException", "Slow down.")
        encryption = doc.get("DeliveryStreamEncryptionConfigurationInput")
        async with self._lock:
            self._check_free_cluster(name)
            cfg = await asyncio.to_thread(self._validate, stream, "CreateDeliveryStream")
            if (await state.read(name)) is not None:
                raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {api.account_id} "
                                   "already exists (a stream of that name runs, or left its state in the cluster)")
            entry = {"phase": "active", "stream": stream, "request": request, "created": time.time(), "version": 1,
                     "tags": tags, "encryption": encryption_of(encryption) if encryption is not None else None}
            if await self._write(name, entry, 0) is None:
                raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {api.account_id} "
                                   "already exists")
            self.creating[name] = cfg
        self._wake.set()
        log.info("api_stream_created", stream=name)
        return name

    def _check_free_cluster(self, name: str) -> None:
        account = self.daemon.config.api.account_id
        if name in self.daemon.streams or name in self.entries or name in self.creating or \
                name in {s.name for s in self.daemon.config.streams}:
            raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {account} already exists")

    async def update_destination(self, doc: dict[str, Any]) -> None:
        """The caller's VersionId is checked against the entry's and the entry written with the
        next one in one revision-checked write: of two updates through two daemons, one wins."""
        name = self._named(doc)
        await self.find(name)
        async with self._lock:
            entry, revision = await self._read(name)
            if entry is None or entry.get("phase") == "removing" or name not in self.daemon.streams:
                raise self._not_found(name)
            if entry.get("phase") == "deleting" or name in self.creating:
                raise ControlError("ResourceInUseException", f"Firehose {name} is {self.status(name)}")
            stream, request = self._new_destination(name, doc, entry["stream"], entry.get("request") or {})
            await asyncio.to_thread(self._validate, stream, "UpdateDestination")
            given, current = str(doc.get("CurrentDeliveryStreamVersionId")), int(entry.get("version", 1))
            changed = {**entry, "stream": stream, "request": request, "version": current + 1}
            if given != str(current) or await self._write(name, changed, revision) is None:
                raise stale_version(name, current, given)
        await self.sync()  # this daemon runs the new destination before it answers; the others within a second
        log.info("api_stream_updated", stream=name, version=current + 1)

    async def delete(self, doc: dict[str, Any]) -> None:
        name = self._named(doc)
        async with self._lock:
            while True:
                entry, revision = await self._read(name)
                if entry is None:
                    raise self._not_found(name)
                if entry.get("phase", "active") != "active":
                    return  # a repeated delete is accepted, as Firehose accepts it
                if name in self.creating:
                    raise ControlError("ResourceInUseException", f"Firehose {name} is CREATING")
                marked = {**entry, "phase": "deleting", "deleting_since": time.time(), "stopped": [], "drained": []}
                if await self._write(name, marked, revision) is not None:
                    break
            self.deleting.add(name)
        self._wake.set()
        log.info("api_stream_deleting", stream=name)

    async def encryption(self, doc: dict[str, Any], start: bool) -> None:
        name = self._named(doc)
        state = self._state
        if name not in self.entries or name in self.deleting or name not in self.daemon.streams or state is None:
            raise self._not_found(name)
        value = encryption_value(doc, start)
        now = time.time()
        await state.amend(name, lambda d: {**d, "encryption": value,
                                           "encryption_calls": encryption_calls(d.get("encryption_calls"), now)})

    # ------------------------------------------------------------------ deletion
    async def _tend_deletion(self, name: str) -> None:
        """One step of a deletion, as this member can take it (see the module's docstring)."""
        cluster = self.daemon.cluster
        assert cluster is not None
        entry, revision = await self._read(name)
        phase = (entry or {}).get("phase")
        if entry is None or phase == "removing":
            if entry is not None:
                await self._tend_removal(name, entry, revision)
            return
        if phase != "deleting":
            return
        stream = cluster.streams.get(name)
        stopped, drained = set(entry.get("stopped") or []), set(entry.get("drained") or [])
        if cluster.node not in stopped:
            if stream is not None and (stream.in_flight or stream.config.sources or stream.node_sources):
                return  # requests already taken are being stored, or its sources still stopping; next round
            await self._write(name, {**entry, "stopped": sorted(stopped | {cluster.node})}, revision)
            return
        if not await cluster.members_running(name) <= stopped:
            return
        newly = self._drained_now(name, stream, drained)
        if newly:
            drained |= newly
            revision = await self._write(name, {**entry, "drained": sorted(drained)}, revision) or 0
            if not revision:
                return
            log.info("api_stream_partitions_drained", stream=name, partitions=sorted(newly), node=cluster.node)
        if len(drained) >= cluster.config.jetstream.partitions and \
                await self._write(name, {**entry, "drained": sorted(drained), "phase": "removing",
                                         "removing_since": time.time()}, revision) is not None:
            log.info("api_stream_deleted", stream=name, at=time.time())
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

    async def _tend_removal(self, name: str, entry: dict[str, Any], revision: int) -> None:
        """Every partition drained: once no member runs the stream any more, any daemon deletes its
        JetStream logs and its state, then the entry (each step repeatable, so a daemon that dies
        half-way leaves the rest to the next)."""
        cluster = self.daemon.cluster
        assert cluster is not None
        if name in cluster.streams:
            return  # this daemon has not dropped it yet
        running = await cluster.members_running(name)
        if running and time.time() - float(entry.get("removing_since", 0)) < CLEANUP_WAIT_SECS:
            return
        from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError

        from firehose.jslog import jetstream_names

        for partition in range(cluster.config.jetstream.partitions):
            for kind in ("ingest", "processed"):
                try:
                    await cluster.js.delete_stream(jetstream_names(name, partition, kind)[0])
                except NotFoundError:
                    pass
        if cluster.state is not None:
            await cluster.state.forget(name)
        try:
            await (await self._bucket()).delete(entry_key(name), last=revision)
        except KeyWrongLastSequenceError:
            return
        except APIError as exc:
            if exc.err_code not in (10071, 10164):  # another daemon removed it first
                raise
            return
        log.info("api_stream_logs_removed", stream=name, partitions=cluster.config.jetstream.partitions)
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await super().close()


def _drained(status: dict[str, Any]) -> bool:
    return not (status.get("backlog_records") or status.get("pending_batches") or status.get("open_buffer_records"))


def read_api_streams(cluster: Any, timeout: float | None = None) -> list[dict[str, Any]]:
    """The API streams in the cluster's bucket, for ``firehose export-config`` (those being
    deleted left out). Raises ConnectionError when NATS does not answer within ``timeout``
    (default: three connection attempts' worth)."""
    timeout = timeout if timeout is not None else 3 * float(cluster.jetstream.connect_timeout_secs) + 2

    async def read() -> list[dict[str, Any]]:
        import nats
        from nats.js.errors import BucketNotFoundError, KeyNotFoundError

        async def quiet(_exc: Exception) -> None:  # nats-py would print each failed attempt's traceback
            return None

        js_cfg = cluster.jetstream
        kwargs: dict[str, Any] = {"servers": js_cfg.servers, "connect_timeout": js_cfg.connect_timeout_secs,
                                  "max_reconnect_attempts": 0, "allow_reconnect": False, "error_cb": quiet}
        if js_cfg.credentials:
            kwargs["user_credentials"] = js_cfg.credentials
        nc = await nats.connect(**kwargs)
        try:
            try:
                kv = await nc.jetstream().key_value(API_STREAMS_BUCKET)
                keys = await bucket_keys(nc.jetstream(), API_STREAMS_BUCKET)
            except BucketNotFoundError:
                return []
            out = []
            for key in keys:
                try:
                    entry = orjson.loads((await kv.get(key)).value or b"{}")
                except KeyNotFoundError:
                    continue  # deleted
                if isinstance(entry, dict) and entry.get("phase", "active") == "active" \
                        and isinstance(entry.get("stream"), dict):
                    out.append(entry["stream"])
            return sorted(out, key=lambda s: str(s.get("name")))
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(read(), timeout))
    except TimeoutError:
        raise ConnectionError(f"no NATS server of {', '.join(cluster.jetstream.servers)} answered within "
                              f"{timeout:g} s") from None
