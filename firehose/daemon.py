"""The daemon: config -> stream runtimes + the API server; signals, reload, systemd notify."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from firehose.api import FirehoseApi
from firehose.config import ConfigError, DaemonConfig, StreamConfig, load_config
from firehose.metrics import Metrics
from firehose.stream import StreamRuntime

STATE_FORMAT_VERSION = 1
log = structlog.get_logger()


class StreamState:
    """Per-stream facts that outlive a process: VersionId (bumped when the stream's config
    changes), creation time and tags, in ``<data_dir>/streams/<name>.json``."""

    def __init__(self, data_dir: str) -> None:
        self.directory = os.path.join(data_dir, "streams")
        os.makedirs(self.directory, exist_ok=True)
        self._docs: dict[str, dict[str, Any]] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.json")

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
        doc["format"] = STATE_FORMAT_VERSION
        tmp = self._path(name) + ".tmp"
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

    def tags(self, name: str) -> dict[str, str]:
        doc = self.load(name) or {}
        return dict(doc.get("tags", {}))

    def set_tags(self, name: str, tags: dict[str, str]) -> None:
        doc = dict(self.load(name) or {})
        doc["tags"] = tags
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
        self.streams: dict[str, StreamRuntime] = {}
        self.state = StreamState(config.data_dir)
        self.api = FirehoseApi(self)
        self.ready = False
        # Streams being restarted by a reload: ingest answers 503 (retryable) rather than
        # ResourceNotFoundException while the new runtime recovers the same spool.
        self.reloading: set[str] = set()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ streams
    async def _start_stream(self, cfg: StreamConfig) -> StreamRuntime:
        version = self.state.version_for(cfg)
        rt = StreamRuntime(
            cfg,
            data_dir=self.config.data_dir,
            version=version,
            region=self.config.api.region,
            account_id=self.config.api.account_id,
            metrics=self.metrics,
        )
        await rt.start()
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
        backup = {"backup": cfg.backup} if getattr(cfg.destination, "requires_backup", False) else {}
        dest = cfg.destination.describe(cfg.buffering, api.account_id, **backup)
        extended = dest.get("ExtendedS3DestinationDescription")
        if extended is not None:
            procs = [p.describe() for p in cfg.processing if hasattr(p, "describe")]
            extended["ProcessingConfiguration"] = {"Enabled": bool(procs), "Processors": procs}
            dp = cfg.dynamic_partitioning
            extended["DynamicPartitioningConfiguration"] = {
                "Enabled": cfg.partitioned,
                **({"RetryOptions": {"DurationInSeconds": dp.retry_duration_secs}} if dp is not None else {}),
            }
        return {
            "DeliveryStreamName": name,
            "DeliveryStreamARN": f"arn:aws:firehose:{api.region}:{api.account_id}:deliverystream/{name}",
            "DeliveryStreamStatus": "ACTIVE",
            "DeliveryStreamType": self.stream_type(name),
            "VersionId": str(rt.version),
            "CreateTimestamp": round(float(doc.get("created", time.time())), 3),
            "LastUpdateTimestamp": round(float(doc.get("updated", time.time())), 3),
            "DeliveryStreamEncryptionConfiguration": {"Status": "DISABLED"},
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
        for cfg in self.config.streams:
            self.streams[cfg.name] = await self._start_stream(cfg)
        self._runner = web.AppRunner(self.api.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        api = self.config.api
        site = web.TCPSite(self._runner, api.host, api.port, reuse_address=True, backlog=1024)
        await site.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)
        self.ready = True
        log.info("daemon_started", listen=api.listen, streams=sorted(self.streams), data_dir=self.config.data_dir)
        sd_notify("READY=1\nSTATUS=serving")
        await self._stop.wait()
        return await self.shutdown()

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

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        log.info("daemon_stopping", timeout_secs=self.config.shutdown_timeout_secs)
        self.ready = False
        for rt in self.streams.values():
            rt._accepting = False
        timeout = float(self.config.shutdown_timeout_secs)
        results = await asyncio.gather(*(rt.stop(timeout) for rt in self.streams.values()), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        clean = all(r is True for r in results)
        log.info("daemon_stopped", clean=clean)
        return 0

    async def reload(self) -> None:
        """SIGHUP: re-read the config; an invalid file is rejected whole and the old one keeps
        running. Added streams start, removed streams stop (their spool stays on disk), changed
        streams restart on the new config with their spooled records."""
        async with self._reload_lock:
            sd_notify("RELOADING=1")
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                log.error("config_reload_rejected", errors=exc.errors)
                sd_notify("READY=1\nSTATUS=reload rejected; old config running")
                return
            if new.api != self.config.api or new.data_dir != self.config.data_dir:
                log.warning("config_reload_restart_required", fields=["api", "data_dir"])
            old_streams = {s.name: s for s in self.config.streams}
            new_streams = {s.name: s for s in new.streams}
            timeout = float(new.shutdown_timeout_secs)
            for name in sorted(set(old_streams) - set(new_streams)):
                rt = self.streams.pop(name)
                await rt.stop(timeout)
                log.info("stream_removed", stream=name)
            for name, cfg in sorted(new_streams.items()):
                if name in old_streams and old_streams[name] == cfg:
                    continue
                if name in self.streams:
                    self.reloading.add(name)
                    rt = self.streams.pop(name)
                    await rt.stop(timeout)
                try:
                    self.streams[name] = await self._start_stream(cfg)
                except Exception as exc:  # keep the other streams; this one stays down, its spool intact
                    log.exception("stream_start_failed", stream=name, error=str(exc))
                finally:
                    self.reloading.discard(name)
                log.info("stream_configured", stream=name, version=self.streams[name].version)
            self.config = new.model_copy(update={"api": self.config.api, "data_dir": self.config.data_dir})
            log.info("config_reloaded", streams=sorted(self.streams))
            sd_notify("READY=1\nSTATUS=serving")
