"""Firehose's control plane on one daemon (``api.control_plane: true``): streams created, updated
and deleted through the API, beside the YAML-defined ones.

API-defined streams are kept in ``data_dir/api-streams.yaml`` in the YAML model (``streams:``, as
a config file writes them; a user can read them, and ``firehose export-config`` prints them with
the rest), with the request members each destination was made from (``requests:``, so that an
UpdateDestination merges into them) and the streams being deleted. The file is replaced
atomically and fsynced before a call is answered, so a stream survives restarts and ``kill -9``.

* ``CreateDeliveryStream`` answers at once; the stream is ``CREATING`` until its runtime has
  started, then ``ACTIVE``. A name a YAML stream or an API stream has is ``ResourceInUseException``.
* ``UpdateDestination`` needs the current ``VersionId`` (another is
  ``ConcurrentModificationException``); the stream restarts on the new destination and its
  VersionId moves on.
* ``DeleteDeliveryStream`` marks the stream ``DELETING`` (durably), stops taking records, seals
  what is buffered and delivers everything acknowledged, retrying for as long as the destination
  needs (a restart resumes it), and only then removes the spool, the state and the entry.
  ``AllowForceDelete`` is accepted: in Firehose it concerns KMS grants, never data.
* YAML-defined streams are read-only here: ``InvalidArgumentException`` says where they are defined.
* Firehose's control-plane quotas apply: 5 Create/Update/Delete calls a second and 5,000 streams;
  past them, ``LimitExceededException``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog
import yaml

from firehose.config import ConfigError, StreamConfig, load_config_text
from firehose.control_shapes import ShapeError, apply_s3_defaults, destination_update, stream_from_create
from firehose.names import STREAM_NAME_RE, disk_name
from firehose.quotas import TokenBucket

if TYPE_CHECKING:
    from firehose.daemon import Daemon

__all__ = ["API_STREAMS_FILE", "ControlError", "ControlPlane", "check_tags", "encryption_calls", "encryption_of",
           "encryption_value", "stale_version"]

log = structlog.get_logger()

API_STREAMS_FILE = "api-streams.yaml"
#: Firehose's control-plane quota: 5 CreateDeliveryStream/UpdateDestination/DeleteDeliveryStream
#: calls a second (reference §1.6), and 5,000 delivery streams; past either, LimitExceededException.
CONTROL_CALLS_PER_SEC = 5
MAX_STREAMS = 5000
#: A control-plane request is turned into YAML and validated: bounded well below the body limit.
MAX_REQUEST_BYTES = 256 * 1024
#: How long a deletion keeps delivering before it tries again (it never gives up on acknowledged records).
DRAIN_ROUND_SECS = 300.0


class ControlError(Exception):
    """A control-plane call refused with Firehose's error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ControlPlane:
    """The API-defined streams of one daemon. Runs on the daemon's event loop."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.path = os.path.join(daemon.config.data_dir, API_STREAMS_FILE)
        self.docs: dict[str, dict[str, Any]] = {}  # name -> the stream's YAML model
        self.requests: dict[str, dict[str, Any]] = {}  # name -> its destination's request members
        self.deleting: set[str] = set()
        self.creating: dict[str, StreamConfig] = {}
        self.shadowed: dict[str, dict[str, Any]] = {}  # entries a YAML stream's name hides (kept in the file)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls = TokenBucket(CONTROL_CALLS_PER_SEC, time.monotonic())
        self.settled = True  # every API stream is known (cluster mode: once its bucket has been read)

    def _rate(self) -> None:
        """LimitExceededException past the control-plane quota (the call is not made)."""
        self._calls.refill(time.monotonic())
        if self._calls.tokens < 1:
            raise ControlError("LimitExceededException", "Rate exceeded")
        self._calls.tokens -= 1

    # ------------------------------------------------------------------ the file
    def _validate(self, doc: dict[str, Any], source: str) -> StreamConfig:
        # api.control_plane_s3 is applied here, not stored: a change in the config applies to
        # every API stream at the next start, and its secret stays out of api-streams.yaml.
        doc = apply_s3_defaults(doc, self.daemon.config.api.control_plane_s3)
        top: dict[str, Any] = {"data_dir": self.daemon.config.data_dir, "streams": [doc]}
        if self.daemon.config.cluster is not None:  # what cluster mode refuses is refused
            top["cluster"] = self.daemon.config.cluster.model_dump(mode="json")
        text = yaml.safe_dump(top, sort_keys=False)
        try:
            return load_config_text(text, source, env={}).streams[0]
        except ConfigError as exc:
            # "source:line: streams[0].destination.bucket: message" -> "destination.bucket: message"
            problems = [e.split(": ", 1)[-1].removeprefix("streams[0].") for e in exc.errors]
            raise ControlError("InvalidArgumentException", "; ".join(problems)) from None

    def load(self) -> list[StreamConfig]:
        """The API-defined streams in the file that validate. One that does not (a stricter
        release, a changed ``control_plane_s3``) is logged and counted as failed, its entry kept;
        one whose name a YAML stream now has is left out, its entry kept too: the YAML one runs."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        out = []
        yaml_names = {s.name for s in self.daemon.config.streams}
        self.requests = dict(doc.get("requests") or {})
        self.deleting = set(doc.get("deleting") or [])
        for stream in doc.get("streams") or []:
            name = stream.get("name") if isinstance(stream, dict) else None
            if not isinstance(name, str):
                log.error("api_stream_invalid", file=self.path, error="an entry without a name")
                continue
            if name in yaml_names:
                log.error("api_stream_shadowed", stream=name, file=self.path)
                self.shadowed[name] = stream
                continue
            self.docs[name] = stream
            try:
                out.append(self._validate(stream, self.path))
            except ControlError as exc:
                self.daemon.failed_streams[name] = "its entry in api-streams.yaml no longer validates; see the log"
                log.error("api_stream_invalid", stream=name, file=self.path, error=exc.message)
        self.deleting &= set(self.docs)
        return out

    def _save(self) -> None:
        doc = {"streams": [*self.docs.values(), *self.shadowed.values()], "requests": self.requests,
               "deleting": sorted(self.deleting)}
        text = ("# Streams created through the Firehose API (api.control_plane). Written by the daemon;\n"
                "# `firehose export-config` prints them with the YAML-defined ones.\n"
                + yaml.safe_dump(doc, sort_keys=False))
        tmp = self.path + ".tmp"
        # Owner-only: a destination's password, HEC token or access key is in it.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # a tmp file left by a crash keeps its old mode otherwise
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        """Start the API-defined streams; resume the deletions a restart interrupted."""
        for cfg in await asyncio.to_thread(self.load):
            try:
                self.daemon.streams[cfg.name] = await self.daemon._start_stream(cfg)
            except Exception as exc:
                self.daemon.failed_streams[cfg.name] = "failed to start; see the log"
                log.error("stream_start_failed", stream=cfg.name, reason=f"{type(exc).__name__}: {exc}")
        for name in sorted(self.deleting):
            self._spawn(self._drain_and_remove(name))

    async def find(self, name: str) -> None:
        """Make sure a stream created elsewhere is known here (cluster mode); one daemon knows all."""

    async def refresh(self) -> None:
        """Make sure every stream created elsewhere is known here (cluster mode)."""

    def status(self, name: str) -> str:
        if name in self.creating:
            return "CREATING"
        return "DELETING" if name in self.deleting and name in self.docs else "ACTIVE"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def read_only(self, name: str) -> None:
        """InvalidArgumentException for a YAML-defined stream."""
        if name not in self.docs and name in {s.name for s in self.daemon.config.streams}:
            where = self.daemon.config_path or "the daemon's built-in default config"
            raise ControlError("InvalidArgumentException",
                               f"Delivery stream {name} is defined in {where}; change it there (the API manages "
                               "only the streams it created)")

    # ------------------------------------------------------------------ calls
    def _named(self, doc: dict[str, Any]) -> str:
        """The stream a call on an existing stream names, once the call is admitted and the stream
        is not a YAML one."""
        self._admit(doc)
        name = doc.get("DeliveryStreamName")
        if not isinstance(name, str):
            raise ControlError("ValidationException", "DeliveryStreamName is required")
        self.read_only(name)
        return name

    def _not_found(self, name: str) -> ControlError:
        return ControlError("ResourceNotFoundException",
                            f"Firehose {name} under account {self.daemon.config.api.account_id} not found.")

    def _admit(self, doc: dict[str, Any]) -> None:
        """What every mutating call checks first: the daemon is serving, the request is of a
        reasonable size (it is turned into YAML and validated), and the call quota."""
        if not self.daemon.ready:
            raise ControlError("ServiceUnavailableException", "Slow down.")
        if len(orjson.dumps(doc)) > MAX_REQUEST_BYTES:
            raise ControlError("InvalidArgumentException", f"the request is over {MAX_REQUEST_BYTES} bytes")
        self._rate()

    async def create(self, doc: dict[str, Any], *, limited: bool = False) -> str:
        """CreateDeliveryStream; returns the new stream's name. ``limited``: the caller's key is
        limited to some actions or streams (firehose/access.py); such a key may create only what
        stays within S3 (no Kinesis source, Lambda function, or database, HTTP, Splunk or
        OpenSearch destination: those reach wherever the daemon's own network and credentials can)."""
        stream, tags, request, name = self._parse_create(doc, limited)
        async with self.daemon._reload_lock, self._lock:  # a reload cannot add the same name meanwhile
            self._check_free(name)
            cfg = await asyncio.to_thread(self._validate, stream, "CreateDeliveryStream")
            self.docs[name], self.requests[name] = stream, request
            self.creating[name] = cfg
            try:
                await asyncio.to_thread(self._save)
                encryption = doc.get("DeliveryStreamEncryptionConfigurationInput")
                if tags or encryption is not None:
                    self.daemon.state.version_for(cfg)  # the state entry the tags live in
                if tags:
                    self.daemon.state.update_tags(name, lambda current: {**current, **tags})
                if encryption is not None:
                    self.daemon.state.set_field(name, "encryption", encryption_of(encryption))
            except BaseException:
                del self.docs[name], self.requests[name], self.creating[name]
                self.daemon.state.restore(name, None)
                await asyncio.to_thread(self._save)
                raise
        self._spawn(self._start(name, cfg))
        log.info("api_stream_created", stream=name)
        return name

    def _parse_create(self, doc: dict[str, Any], limited: bool) -> tuple[dict[str, Any], dict[str, str],
                                                                          dict[str, Any], str]:
        """A CreateDeliveryStream admitted and mapped: (the stream's YAML model, tags, the
        request members of its destination, its name)."""
        self._admit(doc)
        try:
            stream, tags, request = stream_from_create(doc, self.daemon.config.api.region)
        except ShapeError as exc:
            raise ControlError("InvalidArgumentException", str(exc)) from None
        return stream, tags, request, self._check_new(stream, tags, limited)

    def _check_new(self, stream: dict[str, Any], tags: dict[str, str], limited: bool) -> str:
        if limited and (stream.get("sources") or stream["destination"].get("type") != "s3"
                        or any(p.get("type") == "lambda" for p in stream.get("processing") or [])):
            raise ControlError("AccessDeniedException", "a key limited to some actions or streams may create only "
                               "streams that stay within S3; this one needs a key without limits")
        name = stream["name"]
        if len(self.daemon.streams) + len(self.creating) >= MAX_STREAMS:
            raise ControlError("LimitExceededException", f"You have already consumed your firehose quota of "
                               f"{MAX_STREAMS} hoses")
        if not isinstance(name, str) or not STREAM_NAME_RE.fullmatch(name):
            raise ControlError("ValidationException", "1 validation error detected: Value at 'deliveryStreamName' "
                               "failed to satisfy constraint: Member must satisfy regular expression pattern: "
                               "[a-zA-Z0-9_.-]+")
        check_tags(tags)
        return name

    def _check_free(self, name: str) -> None:
        """ResourceInUseException for a name a stream has, or a former one left its spool or state under."""
        account = self.daemon.config.api.account_id
        if name in self.daemon.streams or name in self.docs or name in self.creating or \
                name in self.shadowed or name in {s.name for s in self.daemon.config.streams}:
            raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {account} already exists")
        if os.path.exists(os.path.join(self.daemon.config.data_dir, "spool", disk_name(name))) or \
                self.daemon.state.load(name):
            raise ControlError("ResourceInUseException", f"Firehose {name} under accountId {account}: a former "
                               "stream of that name left its spool or state in the data_dir")

    async def _start(self, name: str, cfg: StreamConfig) -> None:
        try:
            self.daemon.streams[name] = await self.daemon._start_stream(cfg)
        except Exception as exc:
            self.daemon.failed_streams[name] = "failed to start; see the log"
            log.error("stream_start_failed", stream=name, reason=f"{type(exc).__name__}: {exc}")
        finally:
            self.creating.pop(name, None)

    async def update_destination(self, doc: dict[str, Any]) -> None:
        name = self._named(doc)
        async with self.daemon._reload_lock, self._lock:
            if name in self.creating or name in self.deleting:
                raise ControlError("ResourceInUseException", f"Firehose {name} is {self.status(name)}")
            rt = self.daemon.streams.get(name)
            if name not in self.docs or rt is None:
                raise self._not_found(name)
            if str(doc.get("CurrentDeliveryStreamVersionId")) != str(rt.version):
                raise stale_version(name, rt.version, doc.get("CurrentDeliveryStreamVersionId"))
            stream, request = self._new_destination(name, doc, self.docs[name], self.requests.get(name, {}))
            cfg = await asyncio.to_thread(self._validate, stream, "UpdateDestination")
            previous, old_cfg = (self.docs[name], self.requests.get(name, {})), rt.config
            self.docs[name], self.requests[name] = stream, request
            await asyncio.to_thread(self._save)
            snapshot = self.daemon.state.snapshot(name)
            try:
                await self.daemon._switch(name, cfg, float(self.daemon.config.shutdown_timeout_secs))
            except Exception as exc:
                # Back to what ran before, under its VersionId; the caller learns why.
                self.docs[name], self.requests[name] = previous
                await asyncio.to_thread(self._save)
                self.daemon.state.restore(name, snapshot)
                await self.daemon._roll_back([name], {name: old_cfg}, {name: snapshot},
                                             float(self.daemon.config.shutdown_timeout_secs))
                raise ControlError("InvalidArgumentException",
                                   f"the stream did not start on the new destination ({type(exc).__name__}: {exc}); "
                                   "it runs its previous one") from None
        log.info("api_stream_updated", stream=name, version=self.daemon.streams[name].version)

    def _new_destination(self, name: str, doc: dict[str, Any], current: dict[str, Any],
                         request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """An UpdateDestination's stream model and request members, from the stream's ``current``
        model and the ``request`` members its destination was made from."""
        if doc.get("DestinationId", "destinationId-000000000001") != "destinationId-000000000001":
            raise ControlError("InvalidArgumentException", f"Destination {doc.get('DestinationId')!r} not found")
        try:
            stream, request = destination_update(name, request, doc, self.daemon.config.api.region)
        except ShapeError as exc:
            raise ControlError("InvalidArgumentException", str(exc)) from None
        if current.get("sources"):
            stream["sources"] = current["sources"]  # the source is not the destination's to change
        return stream, request

    async def delete(self, doc: dict[str, Any]) -> None:
        name = self._named(doc)
        async with self.daemon._reload_lock, self._lock:
            if name in self.deleting:
                return  # a repeated delete is accepted, as Firehose accepts it
            if name in self.creating:
                raise ControlError("ResourceInUseException", f"Firehose {name} is CREATING")
            if name not in self.docs:
                raise self._not_found(name)
            self.deleting.add(name)
            await asyncio.to_thread(self._save)
        self._spawn(self._drain_and_remove(name))
        log.info("api_stream_deleting", stream=name)

    async def _drain_and_remove(self, name: str) -> None:
        """Deliver everything acknowledged, however long the destination takes, then remove it
        all. A failure on the way (a stream that will not start again, a disk error) is logged
        and the whole step tried again, with a growing pause; a restart resumes it too."""
        pause = 1.0
        while True:
            try:
                await self._drain_once(name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("api_stream_delete_failed", stream=name, error=f"{type(exc).__name__}: {exc}",
                          retry_in_secs=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 60.0)

    async def _drain_once(self, name: str) -> None:
        rt = self.daemon.streams.get(name)
        while rt is not None:
            clean = await rt.stop(DRAIN_ROUND_SECS)
            if clean:
                break
            log.warning("api_stream_delete_waiting", stream=name, reason="batches not delivered yet; retrying")
            self.daemon.streams.pop(name, None)
            rt = await self.daemon._start_stream(rt.config)
            self.daemon.streams[name] = rt
            rt._accepting = False
        self.daemon.streams.pop(name, None)
        self.daemon.failed_streams.pop(name, None)
        data_dir = self.daemon.config.data_dir
        await asyncio.to_thread(shutil.rmtree, os.path.join(data_dir, "spool", disk_name(name)), True)
        self.daemon.state.restore(name, None)
        async with self._lock:
            self.docs.pop(name, None)
            self.requests.pop(name, None)
            self.deleting.discard(name)
            await asyncio.to_thread(self._save)
        log.info("api_stream_deleted", stream=name, at=time.time())

    async def encryption(self, doc: dict[str, Any], start: bool) -> None:
        """Start/StopDeliveryStreamEncryption: recorded and shown in DeliveryStreamEncryptionConfiguration.
        The daemon does not encrypt its spool itself (use an encrypted disk); these calls exist so
        that tools that manage them work."""
        name = self._named(doc)
        if name not in self.docs or name in self.deleting or name not in self.daemon.streams:
            raise self._not_found(name)
        value = encryption_value(doc, start)
        async with self._lock:
            calls = encryption_calls((self.daemon.state.load(name) or {}).get("encryption_calls"), time.time())
            await asyncio.to_thread(self.daemon.state.set_fields, name, {"encryption": value,
                                                                        "encryption_calls": calls})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)



def stale_version(name: str, current: Any, given: Any) -> ControlError:
    """UpdateDestination's ConcurrentModificationException for a VersionId that is not the current one."""
    return ControlError("ConcurrentModificationException", f"Cannot update firehose: {name} since the current "
                        f"version id: {current} and the specified version id: {given} do not match")


def encryption_value(doc: dict[str, Any], start: bool) -> dict[str, Any]:
    """DeliveryStreamEncryptionConfiguration after Start (with its input) or StopDeliveryStreamEncryption."""
    return encryption_of(doc.get("DeliveryStreamEncryptionConfigurationInput")) if start else {"Status": "DISABLED"}


def encryption_of(given: Any) -> dict[str, Any]:
    """DeliveryStreamEncryptionConfiguration for a DeliveryStreamEncryptionConfigurationInput."""
    given = given if isinstance(given, dict) else {}
    key_type = given.get("KeyType", "AWS_OWNED_CMK")
    if key_type not in ("AWS_OWNED_CMK", "CUSTOMER_MANAGED_CMK"):
        raise ControlError("ValidationException", f"KeyType {key_type!r} must be AWS_OWNED_CMK or CUSTOMER_MANAGED_CMK")
    if key_type == "CUSTOMER_MANAGED_CMK" and not isinstance(given.get("KeyARN"), str):
        raise ControlError("InvalidArgumentException", "KeyARN is required with CUSTOMER_MANAGED_CMK")
    out = {"Status": "ENABLED", "KeyType": key_type}
    if isinstance(given.get("KeyARN"), str):
        out["KeyARN"] = given["KeyARN"]
    return out


#: Firehose's quota on StartDeliveryStreamEncryption and StopDeliveryStreamEncryption: 25 calls a
#: delivery stream in 24 hours, together.
ENCRYPTION_CALLS_PER_DAY = 25


def encryption_calls(previous: Any, now: float) -> list[float]:
    """The times of the stream's encryption calls in the last 24 hours with this one added;
    LimitExceededException when it would be the 26th."""
    recent = [t for t in (previous if isinstance(previous, list) else []) if isinstance(t, (int, float))
              and now - t < 86400]
    if len(recent) >= ENCRYPTION_CALLS_PER_DAY:
        raise ControlError("LimitExceededException", f"StartDeliveryStreamEncryption and StopDeliveryStreamEncryption "
                           f"may be called {ENCRYPTION_CALLS_PER_DAY} times per delivery stream in 24 hours")
    return [*recent, now]


def check_tags(tags: dict[str, str]) -> None:
    """TagDeliveryStream's rules for the Tags of a create (reference §1.5)."""
    if len(tags) > 50:
        raise ControlError("LimitExceededException", "a delivery stream has at most 50 tags")
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or key.startswith("aws:") or not _TAG_KEY_RE.fullmatch(key):
            raise ControlError("InvalidArgumentException", f"tag key {key[:128]!r} is not valid")
        if len(value) > 256:
            raise ControlError("InvalidArgumentException", f"the value of tag {key!r} is over 256 characters")


_TAG_KEY_RE = re.compile(r"[\w\s.:/=+\-@%]*")

