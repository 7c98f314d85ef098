"""The daemon: config -> stream runtimes + the API server; signals, reload, systemd notify."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from firehose.api import FirehoseApi
from firehose.cluster import Cluster, ClusterConfig, ClusteredStream, node_name
from firehose.config import ConfigError, DaemonConfig, StreamConfig, load_config
from firehose.control import ControlPlane
from firehose.control_cluster import ClusterControlPlane
from firehose.filelog import lock_directory
from firehose.httpserver import GuardedServer
from firehose.interfaces import BuildContext, ClusterPlacement
from firehose.log import LogBusyError, LogError, LogStore
from firehose.metrics import Metrics
from firehose.names import disk_name, stream_arn
from firehose.quotas import Quota
from firehose.status import StatusSampler
from firehose.stream import StreamRuntime
from firehose.tls import TlsContext
from firehose.tls import reload_all as tls_reload_all

STATE_FORMAT_VERSION = 1
log = structlog.get_logger()


class StreamState:
    """Per-stream facts that outlive a process: VersionId (bumped when the stream's config
    changes), creation time and tags, in ``<data_dir>/streams/<name>.json``."""

    def __init__(self, data_dir: str) -> None:
        self.directory = os.path.join(data_dir, "streams")
        os.makedirs(self.directory, exist_ok=True)
        self._docs: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{disk_name(name)}.json")

    def load(self, name: str) -> dict[str, Any] | None:
        if name in self._docs:
            return self._docs[name]
        try:
            with open(self._path(name), "rb") as f:
                doc: dict[str, Any] = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        version = doc.get("format", 0)
        if version > STATE_FORMAT_VERSION:
            raise ConfigError(
                [f"{self._path(name)}: state format version {version} was written by a newer firehose; "
                 f"this release reads version {STATE_FORMAT_VERSION}"]
            )
        self._docs[name] = doc
        return doc

    def _save(self, name: str, doc: dict[str, Any]) -> None:
        """Write the stream's state atomically. Tag calls run in worker threads, several at once:
        one lock serialises them, and each write has its own temporary name."""
        doc["format"] = STATE_FORMAT_VERSION
        with self._lock:
            tmp = f"{self._path(name)}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
            self._docs[name] = doc

    def version_for(self, stream: StreamConfig) -> int:
        """The stream's VersionId: 1 at first sight, +1 whenever its config fingerprint changes."""
        fp = stream.fingerprint()
        doc = self.load(stream.name)
        now = time.time()
        if doc is None:
            doc = {"version": 1, "fingerprint": fp, "created": now, "updated": now, "tags": {}}
            self._save(stream.name, doc)
        elif doc.get("fingerprint") != fp:
            doc = {**doc, "version": int(doc["version"]) + 1, "fingerprint": fp, "updated": now}
            self._save(stream.name, doc)
        return int(doc["version"])

    def snapshot(self, name: str) -> dict[str, Any] | None:
        """The stream's saved state as it is now, for :meth:`restore` if a reload is rolled back."""
        doc = self.load(name)
        return dict(doc) if doc is not None else None

    def restore(self, name: str, doc: dict[str, Any] | None) -> None:
        """Put back a :meth:`snapshot` (``None``: the stream had no state yet)."""
        if doc is None:
            self._docs.pop(name, None)
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
        else:
            self._save(name, dict(doc))

    def tags(self, name: str) -> dict[str, str]:
        doc = self.load(name) or {}
        return dict(doc.get("tags", {}))

    def set_tags(self, name: str, tags: dict[str, str]) -> None:
        self.set_field(name, "tags", tags)

    def set_field(self, name: str, field: str, value: Any) -> None:
        """One member of the stream's saved state (``encryption``: StartDeliveryStreamEncryption's)."""
        self.set_fields(name, {field: value})

    def set_fields(self, name: str, values: dict[str, Any]) -> None:
        """Members of the stream's saved state, in one write."""
        with self._lock:
            self._save(name, {**(self.load(name) or {}), **values})

    def update_tags(self, name: str, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        """Read, change and write the stream's tags as one step (concurrent Tag/Untag calls)."""
        with self._lock:
            doc = dict(self.load(name) or {})
            doc["tags"] = change(dict(doc.get("tags", {})))
            self._save(name, doc)


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify): a datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))


class Daemon:
    def __init__(self, config: DaemonConfig, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.streams: dict[str, Any] = {}  # StreamRuntime, or ClusteredStream in cluster mode
        self.quotas: dict[str, Quota] = {}  # streams with a quotas: block (the API takes from them)
        self._api_tls: TlsContext | None = None
        self.control: ControlPlane | None = None
        if config.api.control_plane:
            # Cluster mode: API-defined streams live in JetStream (firehose/control_cluster.py).
            self.control = ClusterControlPlane(self) if config.cluster is not None else ControlPlane(self)
        self.cluster: Cluster | None = None
        self.state = StreamState(config.data_dir)
        self.api = FirehoseApi(self)
        self.status_sampler = StatusSampler(self)  # the rates and charts of /status.json
        self.ready = False
        # Streams being restarted by a reload: ingest answers 503 (retryable) rather than
        # ResourceNotFoundException while the new runtime recovers the same spool.
        self.reloading: set[str] = set()
        # Streams that could not start (a damaged spool): name -> a short reason without paths.
        self.failed_streams: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: GuardedServer | None = None

    # ------------------------------------------------------------------ streams
    async def _start_stream(self, cfg: StreamConfig, logs: LogStore | None = None,
                            placement: ClusterPlacement | None = None) -> StreamRuntime:
        """Start a stream's runtime (on ``logs``: a cluster partition's; default the local spool).
        If the start fails, what it had opened (spool files, worker processes, clients) is closed
        again before the error propagates, so the same spool can be opened by another runtime at
        once (a reload rolling back)."""
        version = self.state.version_for(cfg)
        rt = StreamRuntime(
            cfg,
            data_dir=self.config.data_dir,
            version=version,
            region=self.config.api.region,
            account_id=self.config.api.account_id,
            metrics=self.metrics,
            logs=logs,
            placement=placement,
        )
        try:
            await rt.start()
        except BaseException:
            try:
                await rt.stop(0.0)
            except Exception as cleanup:  # the start's own error is the one that matters
                log.warning("stream_start_cleanup_failed", stream=cfg.name, error=_one_line(cleanup))
            raise
        return rt

    def stream_type(self, name: str) -> str:
        rt = self.streams.get(name)
        return rt.config.stream_type if rt is not None else "DirectPut"

    def stream_status(self) -> dict[str, Any]:
        return {name: rt.status() for name, rt in self.streams.items()}

    def describe(self, name: str) -> dict[str, Any]:
        rt = self.streams[name]
        cfg = rt.config
        doc = self.state.load(name) or {}
        api = self.config.api
        # Destinations with an S3 backup (OpenSearch, Splunk, HTTP endpoint) describe it too.
        backup = {"backup": cfg.backup} if cfg.destination.requires_backup else {}
        dest = cfg.destination.describe(cfg.buffering, api.account_id, **backup)
        extended = dest.get("ExtendedS3DestinationDescription")
        if extended is not None:
            procs = [p.describe() for p in cfg.processing]
            extended["ProcessingConfiguration"] = {"Enabled": bool(procs), "Processors": procs}
            dp = cfg.dynamic_partitioning
            extended["DynamicPartitioningConfiguration"] = {
                "Enabled": cfg.partitioned,
                **({"RetryOptions": {"DurationInSeconds": dp.retry_duration_secs}} if dp is not None else {}),
            }
        return {
            "DeliveryStreamName": name,
            "DeliveryStreamARN": stream_arn(api.region, api.account_id, name),
            "DeliveryStreamStatus": "ACTIVE",
            "DeliveryStreamType": self.stream_type(name),
            "VersionId": str(rt.version),
            "CreateTimestamp": round(float(doc.get("created", time.time())), 3),
            "LastUpdateTimestamp": round(float(doc.get("updated", time.time())), 3),
            "DeliveryStreamEncryptionConfiguration": doc.get("encryption") or {"Status": "DISABLED"},
            "Source": self._describe_source(rt),
            "Destinations": [{"DestinationId": "destinationId-000000000001", **dest}],
            "HasMoreDestinations": False,
        }

    @staticmethod
    def _describe_source(rt: StreamRuntime) -> dict[str, Any]:
        source: dict[str, Any] = {}
        for s in rt.sources:
            source.update(s.describe())
        return source or {"DirectPutSourceDescription": {"ThroughputHintInMBs": 5}}

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # One daemon per data_dir: a second one would write the same spools and state beside it.
        # Raises LogBusyError (the CLI's one-line "cannot start") naming the holder's pid.
        self._dir_lock, _ = await asyncio.to_thread(lock_directory, self.config.data_dir, "the data_dir")
        try:
            return await self._serve(loop)
        finally:
            os.close(self._dir_lock)  # the lock drops with it

    def _set_quotas(self, config: DaemonConfig) -> None:
        """Token buckets for the streams with a ``quotas:`` block; a stream whose quotas did not
        change keeps its buckets (and what they hold)."""
        quotas: dict[str, Quota] = {}
        for cfg in config.streams:
            if cfg.quotas is None:
                continue
            current = self.quotas.get(cfg.name)
            quotas[cfg.name] = current if current is not None and current.config == cfg.quotas else Quota(cfg.quotas)
        self.quotas = quotas

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> int:
        self._set_quotas(self.config)
        if self.config.cluster is not None:
            self._join_cluster(self.config.cluster)
        for cfg in self.config.streams if self.config.cluster is None else ():
            try:
                self.streams[cfg.name] = await self._start_stream(cfg)
            except LogBusyError as exc:
                self.failed_streams[cfg.name] = "spool in use by another process; see the log"
                log.error("stream_start_failed", stream=cfg.name, reason=_one_line(exc))
            except LogError as exc:
                # A damaged spool stops only its own stream: the others run, /healthz names it,
                # and producers get 503 for it until an operator runs `firehose spool salvage`.
                self.failed_streams[cfg.name] = "spool damaged; see the log and `firehose spool check`"
                log.error("stream_start_failed", stream=cfg.name, reason=_one_line(exc))
        if self.control is not None:
            await self.control.start()
        api = self.config.api
        self._api_tls = TlsContext(api.tls) if api.tls is not None else None
        self._server = GuardedServer(self.api.app, api.host, api.port, self.api.limits, name=api.listen,
                                     ssl_context=self._api_tls.context if self._api_tls else None)
        await self._server.start()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)
        self.ready = True
        # Modules, configs and clients loaded at start live as long as the daemon: out of the
        # collector's way (see firehose.cli.tune_gc).
        gc.collect()
        gc.freeze()
        self.status_sampler.start()
        log.info("daemon_started", listen=api.listen, streams=sorted(self.streams), data_dir=self.config.data_dir)
        sd_notify("READY=1\nSTATUS=serving")
        await self._stop.wait()
        return await self.shutdown()

    def _join_cluster(self, config: ClusterConfig) -> None:
        """Cluster mode: every stream answers through a ClusteredStream whose partitions this
        daemon runs while it holds their leases (firehose/cluster.py)."""
        for cfg in self.config.streams:
            self.streams[cfg.name] = ClusteredStream(_shape(cfg), self.state.version_for(cfg), node_name(config),
                                                     self.metrics)
        self.cluster = Cluster(config, self.streams, self._start_stream, source_context=self._source_context,
                               metrics=self.metrics)
        self.cluster.on_state = self._use_state  # VersionId and tags shared through JetStream
        if not self.cluster.api_url:
            api = self.config.api
            host = socket.gethostname() if api.host in ("0.0.0.0", "::", "") else api.host
            scheme = "https" if api.tls is not None else "http"
            self.cluster.api_url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{api.port}"
        self.cluster.start()

    def _source_context(self, cfg: StreamConfig, placement: ClusterPlacement) -> BuildContext:
        """What a source that runs once per daemon in cluster mode is built with."""
        return BuildContext(cfg.name, self.state.version_for(cfg), self.config.api.region, self.config.api.account_id,
                            self.config.data_dir, structlog.get_logger().bind(stream=cfg.name), cluster=placement)

    def _use_state(self, state: Any) -> None:
        self.state = state

    def _interrupt(self) -> None:
        """Ctrl-C: the first stops as SIGTERM does (flush within shutdown_timeout_secs); a second
        one during that shutdown exits at once. Nothing acknowledged is lost either way: it is in
        the fsynced spool and is delivered at the next start."""
        if not self._stop.is_set():
            self._stop.set()
            return
        log.warning("daemon_stop_forced", reason="second interrupt during shutdown; the spool keeps what was not delivered")
        sys.stdout.flush()
        os._exit(130)

    def _schedule_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # a failed reload must not go unnoticed, nor leave systemd waiting
            log.exception("config_reload_failed", error=str(exc))
            sd_notify("READY=1\nSTATUS=reload failed; see the log")

    async def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        log.info("daemon_stopping", timeout_secs=self.config.shutdown_timeout_secs)
        self.ready = False
        await self.status_sampler.stop()
        if self.control is not None:
            await self.control.close()  # a deletion under way resumes at the next start
        for rt in self.streams.values():
            rt._accepting = False
        timeout = float(self.config.shutdown_timeout_secs)
        if self.cluster is not None:
            await self.cluster.stop(timeout)  # stops the partitions, then gives their leases up
        results = await asyncio.gather(*(rt.stop(timeout) for rt in self.streams.values()), return_exceptions=True)
        if self._server is not None:
            await self._server.close()
        clean = all(r is True for r in results)
        log.info("daemon_stopped", clean=clean)
        return 0

    async def reload(self) -> None:
        """SIGHUP: re-read the config and apply it without ever losing a running stream.

        An invalid file is rejected whole and the old config keeps running. Everything that can be
        checked without stopping anything is checked first (the file itself, Lambda handlers
        import). Then added streams start and changed streams restart on the new config, one at a
        time; if one fails to start, it is restarted on its previous config, every stream already
        switched by this reload is switched back, every VersionId is restored, and
        ``config_reload_rejected`` names the stream and the reason. Streams removed from the file
        stop (their spool stays on disk) only once everything else has been applied."""
        async with self._reload_lock:
            sd_notify("RELOADING=1")
            try:
                new = await self._load_reload()
            except ConfigError as exc:
                log.error("config_reload_rejected", errors=exc.errors)
                sd_notify("READY=1\nSTATUS=reload rejected; old config running")
                return
            self._apply_live_api(new)
            if self.cluster is not None:
                await self._reload_cluster(new)
                return
            old_streams = {s.name: s for s in self.config.streams}
            new_streams = {s.name: s for s in new.streams}
            timeout = float(new.shutdown_timeout_secs)
            # Streams that failed to start (a damaged spool, since salvaged) are tried again too.
            changed = [name for name, cfg in sorted(new_streams.items())
                       if _differs(old_streams.get(name), cfg) or name in self.failed_streams]
            saved = {name: self.state.snapshot(name) for name in changed}
            switched: list[str] = []
            for name in changed:
                try:
                    await self._switch(name, new_streams[name], timeout)
                    switched.append(name)
                except Exception as exc:
                    log.error("config_reload_rejected", stream=name, reason=_one_line(exc),
                              rolled_back=[*switched, name])
                    await self._roll_back([*switched, name], old_streams, saved, timeout)
                    sd_notify("READY=1\nSTATUS=reload rejected; old config running")
                    return
                log.info("stream_configured", stream=name, version=self.streams[name].version)
            for name in sorted(set(old_streams) - set(new_streams)):
                self.failed_streams.pop(name, None)
                rt = self.streams.pop(name, None)
                if rt is not None:
                    await rt.stop(timeout)
                log.info("stream_removed", stream=name)
            self.config = new.model_copy(update={"api": self.config.api, "data_dir": self.config.data_dir})
            self._set_quotas(new)
            log.info("config_reloaded", streams=sorted(self.streams))
            sd_notify("READY=1\nSTATUS=serving")

    async def _load_reload(self) -> DaemonConfig:
        """The config file as a reload would apply it; ConfigError for whatever makes it refused."""
        new = await asyncio.to_thread(load_config, self.config_path)
        problems = await asyncio.to_thread(_precheck, new, self.config)
        if problems:
            raise ConfigError(problems)
        if (self.cluster is None) != (new.cluster is None):
            raise ConfigError(["cluster: moving between cluster mode and the local spool needs a restart"])
        if self.control is not None:
            clash = sorted({s.name for s in new.streams} & set(self.control.docs))
            if clash:
                raise ConfigError([f"streams: {', '.join(clash)} was created through the API ({self.control.path}); "
                                   "a YAML stream cannot take its name"])
        return new

    def _apply_live_api(self, new: DaemonConfig) -> None:
        """Certificates are read again from their files (renewed in place, or api.tls moved to
        other files) and credentials apply at once; anything else about the API needs a restart."""
        tls_reload_all()
        if self._api_tls is not None and new.api.tls is not None and new.api.tls != self._api_tls.cfg:
            self._api_tls.reload(new.api.tls)
        old_api = self.config.api
        same_tls = (new.api.tls is None) == (old_api.tls is None)
        self.config = self.config.model_copy(update={"api": old_api.model_copy(update={
            "auth": new.api.auth, "tls": new.api.tls if same_tls else old_api.tls})})
        if new.api != self.config.api or new.data_dir != self.config.data_dir:
            log.warning("config_reload_restart_required", fields=["api", "data_dir"])

    async def _reload_cluster(self, new: DaemonConfig) -> None:
        """Cluster mode: apply the streams on this daemon's partitions (Cluster.apply). The other
        daemons keep their config until they are reloaded too (docs/cluster.md)."""
        assert self.cluster is not None
        if new.cluster != self.config.cluster:
            log.warning("config_reload_restart_required", fields=["cluster"])
        api_streams = self.control.stream_configs() if isinstance(self.control, ClusterControlPlane) else []
        await self.cluster.apply([_shape(c) for c in [*new.streams, *api_streams]], float(new.shutdown_timeout_secs))
        self._set_quotas(new)
        self.config = new.model_copy(update={"api": self.config.api, "data_dir": self.config.data_dir,
                                             "cluster": self.config.cluster})
        log.info("config_reloaded", streams=sorted(self.streams))
        sd_notify("READY=1\nSTATUS=serving")

    async def _switch(self, name: str, cfg: StreamConfig, timeout: float) -> None:
        """Stop the stream's runtime (if any) and start it on ``cfg``. While it restarts, ingest
        answers 503 (retried by every SDK) rather than ResourceNotFoundException."""
        self.reloading.add(name)
        try:
            old = self.streams.pop(name, None)
            if old is not None:
                await old.stop(timeout)
            self.streams[name] = await self._start_stream(cfg)
            self.failed_streams.pop(name, None)
        finally:
            self.reloading.discard(name)

    async def _roll_back(self, names: list[str], previous: dict[str, StreamConfig],
                         saved: dict[str, dict[str, Any] | None], timeout: float) -> None:
        """Put ``names`` back as they were before this reload: streams that were added are
        stopped, changed ones run their previous config again under their previous VersionId."""
        for name in reversed(names):
            self.reloading.add(name)
            try:
                rt = self.streams.pop(name, None)
                if rt is not None:
                    await rt.stop(timeout)
                self.state.restore(name, saved.get(name))
                cfg = previous.get(name)
                if cfg is not None:
                    self.streams[name] = await self._start_stream(cfg)
                    log.info("stream_rolled_back", stream=name, version=self.streams[name].version)
            except Exception as exc:  # the previous config no longer starts either: say so loudly
                log.error("stream_start_failed", stream=name, reason=_one_line(exc))
            finally:
                self.reloading.discard(name)


def _shape(cfg: StreamConfig) -> StreamConfig:
    """The stream's config as its runtime sees it: without its quotas, which the API applies."""
    return cfg.model_copy(update={"quotas": None}) if cfg.quotas is not None else cfg


def _differs(old: StreamConfig | None, new: StreamConfig) -> bool:
    """Whether a reload must (re)start the stream: a quota change alone does not."""
    return old is None or _shape(old) != _shape(new)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _precheck(new: DaemonConfig, old: DaemonConfig) -> list[str]:
    """Problems with the streams a reload would add or change, found without stopping anything:
    Lambda handlers that do not import (checked in a subprocess, as ``firehose validate`` does)."""
    from firehose.config_checks import check_handlers

    previous = {s.name: s for s in old.streams}
    changed = [s for s in new.streams if _differs(previous.get(s.name), s)]
    if not changed:
        return []
    return check_handlers(new.model_copy(update={"streams": changed}))
