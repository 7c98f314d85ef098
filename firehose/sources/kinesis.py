"""Kinesis Data Streams as a source: Firehose's ``KinesisStreamAsSource`` (reference §2).

Guarantee: exactly once into the spool. Every shard is read in sequence-number order with
GetRecords; each response's records go into the spool in the same frame as the shard's checkpoint
(sequence number and sub-sequence number of the last user record), so a restart, even after
``kill -9``, resumes right after the last record the spool holds: no gap, no duplicate.

* **Resharding.** A shard made by ``SplitShard`` or ``MergeShards`` is read only once all its
  parents (``ParentShardId``, ``AdjacentParentShardId``) that are still listed have been read to
  their end (GetRecords returned no ``NextShardIterator``), and that end is itself recorded in the
  spool, before any of the child's records. Records of one partition key therefore reach the
  spool, and every object, in the order the stream holds them. New shards are found by re-listing
  when a shard ends and every ``shard_discovery_interval_secs``; a parent no longer listed has
  expired and its children are read as roots.
* **KPL aggregates** are de-aggregated here, before the spool (Firehose de-aggregates records of a
  KDS source before Lambda and before delivery): each user record keeps its partition key and gets
  ``kinesisRecordMetadata`` (``shardId``, ``partitionKey``, ``approximateArrivalTimestamp``,
  ``sequenceNumber``, ``subsequenceNumber``) as its spool metadata, which the processing stage hands
  to a Lambda. An aggregate that does not verify (bad MD5, malformed protobuf) is archived whole as
  ``processing-failed`` with code ``Kinesis.KplDeaggregationFailed``, never delivered as garbage.
* **Start position.** ``trim_horizon``; ``at_timestamp`` (+ ``timestamp``); or ``latest``, which is
  Firehose's ``DeliveryStartTimestamp``: the time the stream first started, recorded in the spool,
  so a shard that had no records yet when the daemon restarted is not skipped past.
* **Errors.** Throttling (``ProvisionedThroughputExceededException``, ``LimitExceededException``),
  an expired iterator, an unreachable endpoint and a deleted stream are retried with exponential
  backoff and full jitter, without limit (Firehose keeps such a stream ACTIVE). A checkpoint the
  stream no longer has (data expired past retention: GetShardIterator answers
  ``InvalidArgumentException``) is logged as ``kinesis_checkpoint_trimmed``, counted in
  ``KinesisCheckpointsTrimmed`` and the shard is read again from ``TRIM_HORIZON``.
* **Back-pressure.** While the spool is at its cap no shard is read; nothing is dropped.
* **Cluster mode** (docs/cluster.md). The source runs in every cluster partition's runtime and
  reads the shards whose digest falls in that partition, so a shard has one reader in the
  cluster, its owner's lease is the shard's lease, and its checkpoints ride in that partition's
  JetStream log with the records they cover, exactly as on one node. A shard read to its end is
  also announced in the cluster's shared facts, so a child shard hashed to another partition
  starts once every listed parent is finished wherever it was read (checked at every discovery
  pass, every few seconds while a child waits).

GetRecords runs at most ``1000 / poll_interval_ms`` times a second per shard when caught up (Firehose:
once a second, sharing the shard's 5 calls/s with other consumers), and back to back, at most 5 a
second, while a shard is behind. boto3 calls run on the source's own worker threads, each with a
connect and read timeout, so a slow endpoint never blocks the event loop or other streams.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from firehose.clock import Clock, SystemClock
from firehose.interfaces import BuildContext, Source, SourceSink
from firehose.kpl import MAGIC, KplError, deaggregate
from firehose.log import LogError, LogFullError
from firehose.models import StrictModel
from firehose.records import PROCESSING_FAILED, ErrorInfo, RecordMeta
from firehose.retry import jittered_backoff

ARN_RE = re.compile(r"^arn:aws[a-z-]*:kinesis:([a-z0-9-]{1,32}):(\d{12}):stream/([a-zA-Z0-9_.-]{1,128})$")
STREAM_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
KPL_DEAGGREGATION_FAILED = "Kinesis.KplDeaggregationFailed"

# At most 5 GetRecords calls a second per shard (Kinesis's limit, shared with other consumers).
MIN_CALL_GAP_SECS = 0.2
# Records of one GetRecords response go into spool frames of at most this many bytes (a 10 MiB
# response is several frames, each with its checkpoint); less when the spool's cap is small.
FRAME_BYTES = 4 << 20

_THROTTLED = {"ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException"}


def _epoch_ms(value: Any, default: int) -> int:
    """ApproximateArrivalTimestamp as epoch milliseconds: epoch seconds as sent (our clients keep
    timestamps raw) or a datetime (an injected client)."""
    if isinstance(value, int | float):
        return int(value * 1000)
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return default


class KinesisSourceConfig(StrictModel):
    """A Kinesis data stream read by the daemon, exactly once into the spool (Firehose:
    KinesisStreamSourceConfiguration). It must be the stream's only source, and the stream takes no
    Direct PUT (Firehose's DeliveryStreamType KinesisStreamAsSource)."""


    stream_type: ClassVar[str] = "KinesisStreamAsSource"
    exclusive: ClassVar[bool] = True  # Firehose: a KinesisStreamAsSource stream has no other source
    cluster_placement: ClassVar[str] = "partition"  # each cluster partition reads its share of the shards

    type: Literal["kinesis"] = Field(description="`kinesis`.")
    stream_arn: str | None = Field(
        default=None,
        description="The data stream's ARN, `arn:aws:kinesis:<region>:<account>:stream/<name>` (Firehose: "
        "KinesisStreamSourceConfiguration.KinesisStreamARN). Give this or `stream_name`.",
    )
    stream_name: str | None = Field(
        default=None, validate_default=True,
        description="The data stream's name, `[a-zA-Z0-9_.-]{1,128}`; with `stream_arn` it must match. Give "
        "this or `stream_arn`.",
    )
    region: str | None = Field(
        default=None,
        description="The data stream's region; unset: the ARN's region, else `api.region`.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="A Kinesis-compatible endpoint URL (such as kinesalite); unset: AWS's endpoint for the "
        "region.",
    )
    access_key_id: str | None = Field(
        default=None,
        description="The access key id; unset: boto3's usual credential chain (environment, profile, "
        "instance role).",
    )
    secret_access_key: str | None = Field(
        default=None,
        description="The secret access key (write it as `${ENV}`).",
    )
    initial_position: Literal["trim_horizon", "latest", "at_timestamp"] = Field(
        default="latest",
        description="Where shards are read from at the stream's first start: `trim_horizon` (the oldest "
        "record kept), `latest` (records from the first start on; Firehose: DeliveryStartTimestamp) or "
        "`at_timestamp` (from `timestamp`) (Kinesis: ShardIteratorType). Later starts resume from the "
        "checkpoints in the spool.",
    )
    timestamp: datetime | str | None = Field(
        default=None, validate_default=True,
        description="With `initial_position: at_timestamp` (and only then): an ISO 8601 time with a time "
        "zone, such as `2024-05-01T00:00:00Z` (Kinesis: Timestamp).",
    )
    poll_interval_ms: int = Field(
        default=1000, ge=200, le=60_000,
        description="Milliseconds between GetRecords calls on a shard that is caught up (Kinesis allows 5 "
        "calls a second per shard, shared with other consumers).",
    )
    max_records_per_call: int = Field(
        default=10_000, ge=1, le=10_000,
        description="Records one GetRecords call returns at most (Kinesis: GetRecords Limit).",
    )
    shard_discovery_interval_secs: int = Field(
        default=30, ge=1, le=3600,
        description="Seconds between ListShards calls looking for new shards (a shard reaching its end also "
        "triggers one).",
    )
    connect_timeout_secs: int = Field(
        default=5, ge=1, le=300,
        description="Seconds to connect to Kinesis before the call fails (and is retried).",
    )
    read_timeout_secs: int = Field(
        default=30, ge=1, le=300,
        description="Seconds to wait for Kinesis's answer before the call fails (and is retried).",
    )
    retry_initial_backoff_ms: int = Field(
        default=200, ge=1,
        description="Milliseconds before retrying a failed or throttled call; doubled on each further "
        "failure (with jitter), up to `retry_max_backoff_ms`. Calls are retried without limit.",
    )
    retry_max_backoff_ms: int = Field(
        default=10_000, ge=1,
        description="Milliseconds between retries of a failing call at most.",
    )

    @field_validator("stream_arn")
    @classmethod
    def _arn(cls, v: str | None) -> str | None:
        if v is not None and not ARN_RE.fullmatch(v):
            raise ValueError(f"must be arn:aws:kinesis:<region>:<12-digit account>:stream/<name>, got {v!r}")
        return v

    @field_validator("stream_name")
    @classmethod
    def _name(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "stream_arn" not in info.data:  # the ARN itself was invalid: reported there
            return v
        arn = info.data["stream_arn"]
        if v is None:
            if arn is None:
                raise ValueError("required field is missing (or give stream_arn)")
            return None
        if not STREAM_NAME_RE.fullmatch(v):
            raise ValueError(f"must match [a-zA-Z0-9_.-]{{1,128}} (a Kinesis stream name), got {v!r}")
        if arn is not None and ARN_RE.fullmatch(arn).group(3) != v:  # type: ignore[union-attr]
            raise ValueError(f"names another stream than stream_arn ({arn!r}), got {v!r}")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9-]{1,32}", v):
            raise ValueError(f"must be a region name such as us-east-1, got {v!r}")
        return v

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, v: datetime | str | None, info: ValidationInfo) -> datetime | None:
        position = info.data.get("initial_position")
        if v is None:
            if position == "at_timestamp":
                raise ValueError("required when initial_position is at_timestamp")
            return None
        if position != "at_timestamp":
            raise ValueError(f"is only used with initial_position: at_timestamp (initial_position is {position})")
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"must be an ISO 8601 time such as 2024-05-01T00:00:00Z, got {v!r}") from None
        if v.tzinfo is None:
            raise ValueError(f"must include a time zone, such as 2024-05-01T00:00:00Z, got {v.isoformat()!r}")
        return v.astimezone(UTC)

    @property
    def name(self) -> str:
        if self.stream_name is not None:
            return self.stream_name
        return ARN_RE.fullmatch(self.stream_arn or "").group(3)  # type: ignore[union-attr]

    def region_for(self, default: str) -> str:
        if self.region is not None:
            return self.region
        if self.stream_arn is not None:
            return ARN_RE.fullmatch(self.stream_arn).group(1)  # type: ignore[union-attr]
        return default

    def arn_for(self, region: str, account_id: str) -> str:
        return self.stream_arn or f"arn:aws:kinesis:{self.region_for(region)}:{account_id}:stream/{self.name}"

    def build(self, ctx: BuildContext, sink: SourceSink) -> KinesisSource:
        return KinesisSource(self, ctx, sink)


@dataclass
class _Shard:
    """A shard's reading state: the checkpoint (the last user record in the spool)."""

    shard_id: str
    seq: str | None = None
    sub: int = 0
    whole: bool = True  # the record at ``seq`` is entirely in the spool
    done: bool = False  # read to its end (closed shards only)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class _Retry(Exception):
    """A call failed in a way worth retrying after a backoff."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class KinesisSource(Source):
    """Tails one Kinesis data stream into its delivery stream's spool; see the module docstring.

    Runs on the daemon's event loop; only boto3 calls run on its worker threads."""

    stream_type = KinesisSourceConfig.stream_type

    def __init__(
        self,
        config: KinesisSourceConfig,
        ctx: BuildContext,
        sink: SourceSink,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        client: Any = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.stream_name = config.name
        self.region = config.region_for(ctx.region)
        self.arn = config.arn_for(ctx.region, ctx.account_id)
        self.account_id = ctx.account_id
        self.log = ctx.log.bind(source="kinesis", kinesis_stream=self.stream_name)
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"kinesis-{ctx.stream_name}")
        self._shards: dict[str, _Shard] = {}
        self._start_ms: int | None = None
        self._start_recorded = False
        self._frame_bytes = FRAME_BYTES
        self._skip: dict[str, tuple[str, int]] = {}  # shard -> (seq, sub) already in the spool
        self._behind: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.cluster = ctx.cluster  # cluster mode: this partition reads its share of the shards
        self._finished_elsewhere: set[str] = set()  # other partitions' shards read to their end
        self._waiting_elsewhere = False  # a shard of ours waits for one of another partition
        m = sink.metrics
        label = ctx.stream_name
        self._m_records = m.kinesis_read_records.labels(label)
        self._m_bytes = m.kinesis_read_bytes.labels(label)
        self._m_behind = m.kinesis_millis_behind.labels(label)
        self._m_throttled = {
            "get_records": m.kinesis_throttled_get_records.labels(label),
            "get_shard_iterator": m.kinesis_throttled_get_shard_iterator.labels(label),
            "list_shards": m.kinesis_throttled_describe_stream.labels(label),
        }
        self._m_trimmed = m.kinesis_checkpoints_trimmed.labels(label)
        self._m_kpl_failed = m.kinesis_kpl_failed.labels(label)

    # ------------------------------------------------------------------ keys in the spool
    @property
    def _prefix(self) -> str:
        return f"kinesis/{self.stream_name}"

    def _key(self, shard_id: str) -> str:
        return f"{self._prefix}/{shard_id}"

    # ------------------------------------------------------------------ cluster mode
    def _mine(self, shard_id: str) -> bool:
        """Whether this runtime reads the shard: always on one node; in a cluster, when the
        shard's digest falls in this runtime's partition."""
        c = self.cluster
        if c is None or c.partition is None:
            return True
        digest = hashlib.sha256(f"{self.arn}\0{shard_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % c.partitions == c.partition

    def _fact(self, shard_id: str) -> str:
        return "kinesis." + hashlib.sha256(f"{self.arn}\0{shard_id}".encode()).hexdigest()[:40]

    async def _announce_finished(self, shard_id: str) -> None:
        """Cluster mode: tell the other partitions a shard was read to its end (after its end is
        durable in this partition's log; again at every start, so a crash in between is mended)."""
        if self.cluster is None:
            return
        failures = 0
        while not self._stopping:
            try:
                await self.cluster.facts.put(self._fact(shard_id), b"finished")
                return
            except Exception as exc:  # noqa: BLE001 - NATS away: its children wait, nothing is lost
                failures += 1
                delay = self._backoff(failures)
                self.log.warning("kinesis_shard_announce_failed", shard_id=shard_id, error=str(exc)[:300],
                                 retry_in_secs=round(delay, 3))
                await asyncio.sleep(delay)

    async def _finished(self, shard_id: str) -> bool:
        """Whether a parent shard was read to its end: by this runtime, or (cluster mode) by the
        partition it belongs to."""
        if self._mine(shard_id):
            return self._shards.setdefault(shard_id, _Shard(shard_id)).done
        if shard_id not in self._finished_elsewhere and self.cluster is not None:
            found = await self.cluster.facts.get(self._fact(shard_id))
            if found is not None and found[0] == b"finished":
                self._finished_elsewhere.add(shard_id)
        return shard_id in self._finished_elsewhere

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._client is None:
            self._client = await asyncio.get_running_loop().run_in_executor(self._pool, self._make_client)
        positions = self.sink.positions
        for key, pos in positions.items():
            if key.startswith(self._prefix + "/") and isinstance(pos, dict):
                shard_id = key[len(self._prefix) + 1 :]
                self._shards[shard_id] = _Shard(
                    shard_id, pos.get("seq"), int(pos.get("sub", 0)), bool(pos.get("whole", True)),
                    bool(pos.get("done", False)),
                )
        mine = positions.get(self._prefix)
        if isinstance(mine, dict) and isinstance(mine.get("start_ms"), int):
            self._start_ms = mine["start_ms"]
            self._start_recorded = True
        else:
            # The DeliveryStartTimestamp, recorded (by _run, before any shard is read) once:
            # "latest" means records from here on.
            c = self.config
            self._start_ms = int(c.timestamp.timestamp() * 1000) if isinstance(c.timestamp, datetime) else (
                self.clock.now_ms()
            )
        # A frame must fit the spool's cap with room to spare, whatever the cap.
        self._frame_bytes = max(64 << 10, min(FRAME_BYTES, self.sink.max_size_bytes // 8))
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kinesis-{self.stream_name}")
        self.log.info("kinesis_source_started", shards_checkpointed=len(self._shards),
                      initial_position=self.config.initial_position)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in [self._task, *(s.task for s in self._shards.values())] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A call still in a worker thread ends by its own timeout; nobody waits for it.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.log.info("kinesis_source_stopped")

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "KinesisStreamARN": self.arn,
            "RoleARN": f"arn:aws:iam::{self.account_id}:role/firehose",
        }
        if self._start_ms is not None:
            desc["DeliveryStartTimestamp"] = round(self._start_ms / 1000.0, 3)
        return {"KinesisStreamSourceDescription": desc}

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        c = self.config
        cfg = Config(
            connect_timeout=c.connect_timeout_secs,
            read_timeout=c.read_timeout_secs,
            retries={"total_max_attempts": 1},  # retries are ours: backoff without limit
            max_pool_connections=32,
        )
        kwargs: dict[str, Any] = {"region_name": self.region, "config": cfg}
        if c.endpoint_url:
            kwargs["endpoint_url"] = c.endpoint_url
        if c.access_key_id and c.secret_access_key:
            kwargs["aws_access_key_id"] = c.access_key_id
            kwargs["aws_secret_access_key"] = c.secret_access_key
        session = boto3.session.Session()
        # Timestamps as sent (epoch seconds): parsing ApproximateArrivalTimestamp into a tzlocal
        # datetime costs more than the rest of a record's handling. This session is ours alone.
        session._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=lambda value: value)
        return session.client("kinesis", **kwargs)

    # ------------------------------------------------------------------ calls
    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """One Kinesis call on a worker thread. Raises :class:`_Retry` for what is worth retrying
        (throttling, expiry, the endpoint down, the stream gone), ``ClientError`` otherwise."""
        from botocore.exceptions import BotoCoreError, ClientError

        fn = functools.partial(getattr(self._client, op), **kwargs)
        try:
            result: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
            return result
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "")).rpartition("#")[2]
            if code in _THROTTLED:
                self._m_throttled[op].inc()
                raise _Retry(code, str(err.get("Message", ""))) from None
            if code in ("ExpiredIteratorException", "ResourceNotFoundException", "ResourceInUseException",
                        "KMSThrottlingException", "InternalFailure", "ServiceUnavailable") or (
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
            ):
                raise _Retry(code, str(err.get("Message", ""))) from None
            raise
        except BotoCoreError as exc:  # connection refused or reset, timeouts
            raise _Retry(type(exc).__name__, str(exc)) from None

    def _backoff(self, failures: int) -> float:
        c = self.config
        return jittered_backoff(self.rng, failures, c.retry_initial_backoff_ms, c.retry_max_backoff_ms)

    # ------------------------------------------------------------------ shard discovery
    async def _run(self) -> None:
        if not self._start_recorded:
            await self._put_reliably([], [], {self._prefix: {"start_ms": self._start_ms}})
            self._start_recorded = True
        for shard in list(self._shards.values()):
            if shard.done:
                await self._announce_finished(shard.shard_id)
        failures = 0
        while not self._stopping:
            try:
                listed = await self._list_shards()
                failures = 0
                await self._sync(listed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # _Retry, a refused call, or a bug: list again after a pause
                failures += 1
                delay = self._backoff(failures)
                self.log.warning("kinesis_list_shards_failed", error=str(exc)[:300], retry_in_secs=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            pause = float(self.config.shard_discovery_interval_secs)
            if self._waiting_elsewhere:
                pause = min(pause, 2.0)  # a child waits for a parent another partition reads
            try:
                await asyncio.wait_for(self._wake.wait(), pause)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _list_shards(self) -> dict[str, dict[str, Any]]:
        shards: dict[str, dict[str, Any]] = {}
        resp = await self._call("list_shards", StreamName=self.stream_name)
        while True:
            for s in resp.get("Shards", []):
                shards[s["ShardId"]] = s
            token = resp.get("NextToken")
            if not token:
                return shards
            resp = await self._call("list_shards", NextToken=token)

    async def _sync(self, listed: dict[str, dict[str, Any]]) -> None:
        """Start a reader for every listed shard of ours that is not finished and whose listed
        parents are."""
        await self._forget_gone(listed)
        self._waiting_elsewhere = False
        for sid in sorted(listed):
            if not self._mine(sid):
                continue
            shard = self._shards.setdefault(sid, _Shard(sid))
            if shard.done or shard.task is not None:
                continue
            info = listed[sid]
            parents = [p for p in (info.get("ParentShardId"), info.get("AdjacentParentShardId")) if p and p in listed]
            if not all([await self._finished(p) for p in parents]):
                self._waiting_elsewhere |= any(not self._mine(p) for p in parents)
                continue
            self.log.info("kinesis_shard_reading", shard_id=sid, sequence_number=shard.seq)
            shard.task = asyncio.get_running_loop().create_task(self._read(shard), name=f"kinesis-{sid}")

    async def _forget_gone(self, listed: dict[str, dict[str, Any]]) -> None:
        """Drop the shards no longer listed (expired past the stream's retention), and their
        checkpoints."""
        gone = [sid for sid in self._shards
                if sid not in listed and self._shards[sid].task is None and self._mine(sid)]
        for sid in [sid for sid in self._shards if not self._mine(sid)]:
            del self._shards[sid]  # another partition's: only its end matters here
        for sid in gone:
            shard = self._shards.pop(sid)
            if not shard.done:
                # Its unread records expired with it (past the stream's retention).
                self._m_trimmed.inc()
                self.log.error("kinesis_checkpoint_trimmed", shard_id=sid, sequence_number=shard.seq,
                               reason="the shard expired before it was read to its end")
        # Forget their checkpoints in the spool too (the key stays, its value shrinks to null).
        forget = {self._key(sid): None for sid in gone if self.sink.positions.get(self._key(sid)) is not None}
        if forget:
            await self.sink.put([], self.clock.now_ms(), positions=forget)

    # ------------------------------------------------------------------ reading one shard
    async def _read(self, shard: _Shard) -> None:
        failures = 0
        iterator: str | None = None
        # While a shard is behind, its next GetRecords is already on its way while the last
        # response is spooled (responses are still handled one at a time, in order).
        ahead: asyncio.Task[dict[str, Any]] | None = None
        gap = 0.0
        last_at = -1e9  # when the last GetRecords was issued (monotonic)
        try:
            while not self._stopping:
                try:
                    if ahead is not None:
                        call, ahead = ahead, None
                        resp = await call
                    else:
                        if iterator is None:
                            iterator = await self._iterator(shard)
                        await self._wait_for_room()
                        last_at = max(self.clock.monotonic(), last_at + gap)
                        resp = await self._get_records(iterator, last_at)
                except _Retry as exc:
                    gap = 0.0
                    if exc.code == "ExpiredIteratorException":
                        iterator = None  # re-acquired from the checkpoint, at once
                        continue
                    failures += 1
                    delay = self._backoff(failures)
                    self.log.warning("kinesis_read_retry_scheduled", shard_id=shard.shard_id, error_code=exc.code,
                                     error_message=exc.message[:300], retry_in_secs=round(delay, 3))
                    await asyncio.sleep(delay)
                    if exc.code == "ResourceNotFoundException":
                        return  # the shard expired or the stream is gone: discovery decides
                    continue
                failures = 0
                records = resp.get("Records") or []
                behind = resp.get("MillisBehindLatest")
                if isinstance(behind, int):
                    self._behind[shard.shard_id] = behind
                    self._m_behind.set(max(self._behind.values()))
                iterator = resp.get("NextShardIterator")
                gap = MIN_CALL_GAP_SECS if records and behind else self.config.poll_interval_ms / 1000.0
                if iterator is not None and records and behind and self.sink.has_room(self._frame_bytes):
                    last_at = max(self.clock.monotonic(), last_at + gap)
                    ahead = asyncio.get_running_loop().create_task(self._get_records(iterator, last_at))
                if records:
                    await self._ingest(shard, records)
                if iterator is None:  # a closed shard, read to its end: its children may start
                    await self._put_reliably([], [], {self._key(shard.shard_id): {"done": True}})
                    shard.done = True
                    self._behind.pop(shard.shard_id, None)
                    self.log.info("kinesis_shard_finished", shard_id=shard.shard_id)
                    await self._announce_finished(shard.shard_id)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a refused call: the next discovery pass restarts the shard
            self.log.exception("kinesis_shard_reader_failed", shard_id=shard.shard_id, error=str(exc)[:300])
            await asyncio.sleep(1.0)
        finally:
            if ahead is not None:
                ahead.cancel()
            shard.task = None
            self._wake.set()

    async def _get_records(self, iterator: str, at: float) -> dict[str, Any]:
        """GetRecords, issued no earlier than ``at`` (monotonic seconds)."""
        delay = at - self.clock.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await self._call("get_records", ShardIterator=iterator, Limit=self.config.max_records_per_call)

    async def _iterator(self, shard: _Shard) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard.shard_id}
        self._skip.pop(shard.shard_id, None)
        if shard.seq is not None:
            if shard.whole:
                kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=shard.seq)
            else:  # part of an aggregate is in the spool: read it again, skipping what is there
                kwargs.update(ShardIteratorType="AT_SEQUENCE_NUMBER", StartingSequenceNumber=shard.seq)
            try:
                resp = await self._call("get_shard_iterator", **kwargs)
            except _Retry:
                raise
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code != "InvalidArgumentException":
                    raise
                # The checkpoint is older than the stream keeps (trimmed past retention).
                self._m_trimmed.inc()
                self.log.error("kinesis_checkpoint_trimmed", shard_id=shard.shard_id, sequence_number=shard.seq,
                               error_message=str(exc)[:300], resumed_at="TRIM_HORIZON")
                shard.seq, shard.sub, shard.whole = None, 0, True
                return await self._initial_iterator(shard, "TRIM_HORIZON")
            if not shard.whole:
                self._skip[shard.shard_id] = (shard.seq, shard.sub)
            return str(resp["ShardIterator"])
        return await self._initial_iterator(shard, None)

    async def _initial_iterator(self, shard: _Shard, kind: str | None) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard.shard_id}
        if kind is None and self.config.initial_position != "trim_horizon" and self._start_ms is not None:
            kwargs.update(ShardIteratorType="AT_TIMESTAMP",
                          Timestamp=datetime.fromtimestamp(self._start_ms / 1000.0, tz=UTC))
        else:
            kwargs.update(ShardIteratorType="TRIM_HORIZON")
        return str((await self._call("get_shard_iterator", **kwargs))["ShardIterator"])

    async def _wait_for_room(self) -> None:
        paused = False
        while not self.sink.accepting or not self.sink.has_room(self._frame_bytes):
            if not paused:
                self.log.info("kinesis_source_paused", reason="spool full" if self.sink.accepting else "stopping")
                paused = True
            await asyncio.sleep(0.2)
        if paused:
            self.log.info("kinesis_source_resumed")

    # ------------------------------------------------------------------ into the spool
    async def _ingest(self, shard: _Shard, records: list[dict[str, Any]]) -> None:
        """De-aggregate a GetRecords response and append it, in frames of at most FRAME_BYTES,
        each with the checkpoint of its last user record. (The hot loop of the source.)"""
        shard_id = shard.shard_id
        skip = self._skip.pop(shard_id, None)
        now = self.clock.now_ms()
        key = self._key(shard_id)
        datas: list[bytes] = []
        metas: list[Any] = []
        nbytes = 0
        read_bytes = 0
        position: dict[str, Any] = {}
        for r in records:
            seq = r["SequenceNumber"]
            data = r["Data"]
            read_bytes += len(data)
            arrival = _epoch_ms(r.get("ApproximateArrivalTimestamp"), now)
            users = err = None
            if data[:4] == MAGIC:
                try:
                    users = deaggregate(data)
                except KplError as exc:
                    err = str(exc)
            if users is None:
                kinesis = {"shardId": shard_id, "partitionKey": r.get("PartitionKey"),
                           "approximateArrivalTimestamp": arrival, "sequenceNumber": seq, "subsequenceNumber": 0}
                meta = RecordMeta.from_kinesis(kinesis)
                if err is not None:
                    self._m_kpl_failed.inc()
                    self.log.warning("kinesis_kpl_record_invalid", shard_id=shard_id, sequence_number=seq,
                                     error=err[:300])
                    info = ErrorInfo(KPL_DEAGGREGATION_FAILED, err, PROCESSING_FAILED, 1, arrival, now)
                    meta = RecordMeta.failed(info, kinesis)
                datas.append(data)
                metas.append(meta)
                nbytes += len(data)
                position = {"seq": seq, "sub": 0, "whole": True}
            else:
                last = len(users) - 1
                for user in users:
                    sub = user.sub_sequence
                    if skip is not None and seq == skip[0] and sub <= skip[1]:
                        continue
                    datas.append(user.data)
                    metas.append(RecordMeta.from_kinesis({
                        "shardId": shard_id, "partitionKey": user.partition_key,
                        "approximateArrivalTimestamp": arrival, "sequenceNumber": seq, "subsequenceNumber": sub,
                    }))
                    nbytes += len(user.data)
                    if nbytes >= self._frame_bytes and sub != last:
                        await self._put_reliably(datas, metas, {key: {"seq": seq, "sub": sub, "whole": False}}, nbytes)
                        datas, metas, nbytes = [], [], 0
                # An aggregate with no user records still moves the checkpoint.
                position = {"seq": seq, "sub": max(last, 0), "whole": True}
            if nbytes >= self._frame_bytes:
                await self._put_reliably(datas, metas, {key: position}, nbytes)
                datas, metas, nbytes = [], [], 0
        if position and (datas or position.get("seq") != shard.seq):
            await self._put_reliably(datas, metas, {key: position}, nbytes)
        self._m_records.inc(len(records))
        self._m_bytes.inc(read_bytes)

    async def _put_reliably(self, datas: list[bytes], metas: list[Any], positions: dict[str, Any],
                            nbytes: int = 0) -> None:
        """Append records with the checkpoint they reach; wait (never drop) while the spool is full.
        The shard's in-memory checkpoint moves only once the frame is durable."""
        failures = 0
        while True:
            try:
                await self.sink.put(datas, self.clock.now_ms(), nbytes=nbytes,
                                    meta=metas if datas else None, positions=positions)
                break
            except LogFullError:
                await asyncio.sleep(0.2)
            except (LogError, OSError) as exc:
                failures += 1
                delay = self._backoff(failures)
                self.log.error("kinesis_spool_append_failed", error=str(exc)[:300], retry_in_secs=round(delay, 3))
                await asyncio.sleep(delay)
        for key, pos in positions.items():
            shard = self._shards.get(key[len(self._prefix) + 1 :])
            if shard is not None and isinstance(pos, dict) and "seq" in pos:
                shard.seq, shard.sub, shard.whole = pos["seq"], pos["sub"], pos["whole"]
