"""The contracts between the core and its plugins: buffering limits, batches, destinations, sources.

Exception-free delivery results: a destination never raises for a record it could not deliver;
it says, per record, whether the failure is worth retrying. The delivery runner (one place) owns
backoff, the retry window and the backup route.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, Self, runtime_checkable

import structlog

from firehose.packed import records_nbytes
from firehose.records import Outcome, SourceRecord

#: How long a destination's :meth:`Destination.preflight` may take before the stream gives up on
#: it (and logs that it did not answer). Start never waits for it.
PREFLIGHT_TIMEOUT_SECS = 15.0


@dataclass(frozen=True)
class BufferingLimits:
    """A destination's buffering hint ranges and defaults (Firehose's, reference §3)."""

    min_size_mib: int
    max_size_mib: int
    default_size_mib: int
    min_interval_secs: int
    max_interval_secs: int
    default_interval_secs: int


@dataclass(frozen=True)
class RecordFailure:
    """Why one record was not delivered. ``retryable=False`` (e.g. an OpenSearch mapping error):
    the runner archives it at once instead of retrying. ``fields`` are extra members of its error
    record (``esDocumentId``, ``EventId``, ...), written beside Firehose's common ones."""

    retryable: bool
    error_code: str
    error_message: str
    fields: dict[str, Any] | None = None


@dataclass
class DeliveryResult:
    """Per-record outcome of one delivery attempt. ``failures`` maps a record's index in the
    batch to why it failed; every index not in it was delivered."""

    failures: dict[int, RecordFailure] = field(default_factory=dict)

    @classmethod
    def delivered(cls) -> DeliveryResult:
        return cls({})

    @classmethod
    def all_failed(cls, count: int, *, retryable: bool, code: str, message: str) -> DeliveryResult:
        failure = RecordFailure(retryable, code, message)
        return cls({i: failure for i in range(count)})

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Batch:
    """A sealed batch handed to a destination.

    ``key`` is the identity decided once at seal time (for S3-like destinations, the full object
    key). Re-sending a batch after a crash uses the same key, so an idempotent destination
    overwrites rather than duplicates. ``records`` are the record bytes in arrival order.
    """

    stream: str
    batch_id: int
    key: str
    records: Sequence[bytes]
    oldest_arrival_ms: int
    attempt: int = 1
    meta: Sequence[Any] | None = None
    delimiter: bytes | None = None  # AppendDelimiterToRecord: written after every record
    archive: bool = False  # error records or source copies: written as they are, never converted
    # On a retry, each record's position in the sealed batch (None: records are the whole batch),
    # so per-record identities (document ids, event ids) stay the same on every attempt.
    indices: Sequence[int] | None = None

    @property
    def size_bytes(self) -> int:
        return records_nbytes(self.records)


class SharedFacts(Protocol):
    """Cluster mode: small facts every daemon of the cluster sees (a JetStream key-value bucket).
    Writes are revision-checked: ``create`` and ``update`` fail rather than overwrite a fact
    another daemon wrote meanwhile. Keys are ``[A-Za-z0-9_=.-]``; a value is small."""

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and its revision, or None."""

    async def create(self, key: str, value: bytes, *, ttl_secs: float | None = None) -> int | None:
        """Write ``key`` only if it holds nothing; its revision, or None when it exists."""

    async def update(self, key: str, value: bytes, revision: int, *, ttl_secs: float | None = None) -> int | None:
        """Write ``key`` only if it is still at ``revision``; the new revision, or None."""

    async def put(self, key: str, value: bytes) -> None:
        """Write ``key`` whatever it holds."""


@dataclass(frozen=True)
class ClusterPlacement:
    """Cluster mode (firehose/cluster.py): where a source runs. A source whose config says
    ``cluster_placement = "partition"`` runs in each cluster partition's runtime (``partition``
    of ``partitions``) and reads its share; one that says ``"node"`` runs once per daemon
    (``partition`` None) and writes into any partition this daemon owns; such a source may have
    ``async tend_partition(sink, *, opened)``, called with each partition runtime this daemon
    owns when it takes it (``opened``) and at every lease round."""

    node: str
    partitions: int
    facts: SharedFacts
    partition: int | None = None
    lease_ttl_secs: float = 10.0  # how long a dead daemon's partitions wait for a new owner


@dataclass(frozen=True)
class BuildContext:
    """What a destination config needs to build its runtime object."""

    stream_name: str
    version: int
    region: str
    account_id: str
    data_dir: str
    log: Any = field(default_factory=lambda: structlog.get_logger())
    cluster: ClusterPlacement | None = None  # cluster mode: where this runtime sits


class Destination(abc.ABC):
    """A delivery target. Implementations are built by their config class's ``build()``.

    Contract:
    * ``batch_key`` decides a batch's identity; the runner records it in the spool before the
      first ``deliver`` and reuses it for every retry and every replay after a crash.
    * ``deliver`` sends one batch (or, on a retry, the subset of its records that failed) and
      returns per-record outcomes; it raises only on programming errors. It may take as long as
      the destination needs to acknowledge (several deliveries run concurrently per stream), but
      every network call inside it has a timeout.
    * Each destination documents its guarantee (S3 and local: exactly-once objects, since a
      replay overwrites the same key).
    * ``retry_duration_secs`` (Firehose's RetryOptions) bounds how long the runner retries a
      batch after its first failed attempt; then its undelivered records, and at once any record
      reported ``retryable=False``, are archived as ``error_output_type`` (``splunk-failed``,
      ...). None (the default): retried without limit, as for S3.
    """

    retry_duration_secs: float | None = None
    error_output_type: str | None = None
    #: Whether ``deliver`` needs each record's metadata (``Batch.meta``: what processing
    #: recorded, e.g. a Lambda's ``otfMetadata``); read back from the log with the records.
    reads_record_metadata: bool = False
    #: Whether batches must reach ``deliver`` in the order they were sealed (their operations
    #: depend on each other: Iceberg's updates and deletes). The runner then calls ``deliver``
    #: for a batch's first attempt only after the batch sealed before it has entered its own
    #: ``deliver``; the destination orders its work by what it does before its first ``await``.
    #: A retry may still land after later batches.
    ordered_delivery: bool = False
    #: Firehose's CloudWatch prefix for this destination (``DeliveryToSplunk``), besides DeliveryToS3.
    metrics_prefix: str | None = None

    async def start(self) -> None:
        """Open connections; must not fail when the destination is down (delivery retries)."""
        return None

    async def preflight(self) -> str | None:
        """Check, once after ``start`` and in the background, that the destination looks usable:
        the bucket exists, credentials are found and accepted, the directory is writable.

        Returns None when it does (or when the destination has nothing to check), else a short
        reason for an operator (``"bucket 'logs' does not exist"``, ``"no credentials found"``),
        which the stream logs as ``destination_preflight_failed``. It never raises for a problem
        of the destination and never blocks delivery: records are accepted and retried as usual.
        Every network call in it has a short timeout of its own; the stream also cancels it after
        :data:`PREFLIGHT_TIMEOUT_SECS`."""
        return None

    @abc.abstractmethod
    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        """The identity of a new batch whose oldest record arrived at ``oldest_arrival`` (UTC)."""

    @abc.abstractmethod
    async def deliver(self, batch: Batch) -> DeliveryResult:
        """Send the batch; see the class docstring."""

    async def close(self) -> None:
        """Release connections. Called after the last ``deliver`` returned."""
        return None


@runtime_checkable
class PartitionedKeys(Protocol):
    """Capability of a destination whose Prefix can use dynamic partition keys (S3, local): its
    ``batch_key`` takes the partition's key values too. The config loader allows dynamic
    partitioning only for such destinations."""

    def batch_key(
        self, oldest_arrival: datetime, rng: random.Random, partition_keys: Mapping[str, str] | None = None
    ) -> str:
        """The identity of a new batch of the partition ``partition_keys`` (None: unpartitioned)."""
        ...


@runtime_checkable
class Archive(Protocol):
    """Capability of a destination that can hold failed records (S3, local, Redshift's staging
    bucket): the key of an archive object in Firehose's error-output layout. A stream's archive
    is its ``backup:`` destination, else its destination (the config loader insists on a backup
    for a destination without it)."""

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        """The key of an archive object of ``error_output_type`` (``processing-failed``, ...)."""
        ...


@runtime_checkable
class FormatEncoder(Protocol):
    """Capability of a destination that writes columnar files (record format conversion)."""

    def set_converter(self, converter: Any) -> None:
        """Write batches with ``converter`` instead of as concatenated records."""
        ...


def partitioned_keys(destination: Destination) -> PartitionedKeys:
    """``destination`` as one whose batch keys take partition keys (TypeError if it is not)."""
    if not isinstance(destination, PartitionedKeys):
        raise TypeError(f"{type(destination).__name__} cannot key batches by partition")
    return destination


def format_encoder(destination: Destination | None) -> FormatEncoder:
    """``destination`` as one that writes converted formats (TypeError if it cannot)."""
    if not isinstance(destination, FormatEncoder):
        raise TypeError(f"{type(destination).__name__} cannot write converted record formats")
    return destination


def archive_of(destination: Destination) -> Archive:
    """``destination`` as an archive of failed records (TypeError if it cannot hold them)."""
    if not isinstance(destination, Archive):
        raise TypeError(f"{type(destination).__name__} cannot archive failed records (no archive_key)")
    return destination


class SourceSink(Protocol):
    """What a source writes into: its stream's durable spool (a :class:`StreamRuntime`)."""

    metrics: Any  # the daemon's :class:`firehose.metrics.Metrics`

    @property
    def accepting(self) -> bool:
        """False once the stream is stopping: a source stops reading."""

    @property
    def positions(self) -> dict[str, Any]:
        """The source positions committed in the spool (what a restart resumes from)."""

    @property
    def max_size_bytes(self) -> int:
        """The spool's cap (``spool.max_size_mib``)."""

    def has_room(self, nbytes: int) -> bool:
        """Whether the spool cap allows ``nbytes`` more; when not, a source waits (back-pressure)."""

    async def put(
        self,
        records: list[bytes],
        arrival_ms: int | None = None,
        *,
        nbytes: int | None = None,
        meta: list[Any] | None = None,
        positions: dict[str, Any] | None = None,
    ) -> int:
        """Append ``records`` (with per-record ``meta``) and ``positions`` in one spool frame and
        return once it is fsynced. Raises ``SpoolFullError`` (nothing written) at the cap."""


class Source(abc.ABC):
    """Feeds a stream. Built by its config class's ``build()``; started after its stream
    recovered its spool and stopped before the stream stops.

    Contract: a source advances its position (a file offset, a shard checkpoint) only in the
    same spool frame as the records it covers (``SourceSink.put(positions=...)``), and treats the
    position as acknowledged only once ``put`` returned. A restart, even after ``kill -9``,
    resumes from ``SourceSink.positions``: no gap, no duplicate. When the spool is full a source
    stops reading (back-pressure); it never drops a record. Every blocking call has a timeout, so
    ``stop`` returns promptly.
    """

    #: Firehose's DeliveryStreamType for a stream fed by this source.
    stream_type: str = "DirectPut"

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin reading in the background; must not fail when the upstream is down (it retries)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop reading; what was acknowledged is in the spool."""

    def describe(self) -> dict[str, Any]:
        """The member of DescribeDeliveryStream's ``Source`` this source fills."""
        return {}


class ValidatedConfig(Protocol):
    """A plugin's config class: a pydantic model, validated from its YAML mapping."""

    @classmethod
    def model_validate(cls, obj: Any, *, context: Any = None) -> Self:
        """Validate (and freeze) one ``type:``-keyed mapping; raises pydantic's ``ValidationError``."""
        ...


class DestinationConfig(ValidatedConfig, Protocol):
    """What the core calls on a destination's config object (checked for a plugin's class by the
    registry)."""

    @property
    def type(self) -> str:
        """The destination's ``type:``."""
        ...

    @property
    def requires_backup(self) -> bool:
        """Whether it archives failed records only to the stream's ``backup:``, which it then
        requires (a class attribute; OpenSearch, Splunk and HTTP endpoints: True)."""
        ...

    def buffering_limits(self) -> BufferingLimits:
        """Firehose's buffering hint ranges and defaults for this destination."""
        ...

    def build(self, ctx: BuildContext) -> Destination:
        """The runtime destination of one stream version."""
        ...

    def describe(self, buffering: Any, account_id: str, **backup: Any) -> dict[str, Any]:
        """DescribeDeliveryStream's destination description; ``backup=`` (the stream's backup
        config) is passed only when ``requires_backup``."""
        ...


@runtime_checkable
class ObjectStoreDestinationConfig(Protocol):
    """A destination config with Firehose's ExtendedS3 object layout (``s3``, ``local``, and plugins
    that subclass them): what format conversion and dynamic partitioning need."""

    prefix: str
    error_output_prefix: str | None
    compression: str


class SourceConfig(ValidatedConfig, Protocol):
    """What the core calls on a source's config object (checked for a plugin's class by the
    registry)."""

    @property
    def type(self) -> str:
        """The source's ``type:``."""
        ...

    @property
    def stream_type(self) -> str:
        """Firehose's DeliveryStreamType of a stream this source feeds (a class attribute:
        ``DirectPut``, or ``KinesisStreamAsSource``)."""
        ...

    @property
    def exclusive(self) -> bool:
        """Whether it must be the stream's only source (a class attribute; Kinesis: True)."""
        ...

    # Optional class attribute ``cluster_placement``: "partition" or "node" (see
    # :class:`ClusterPlacement`); without it, the source is refused in cluster mode.

    def build(self, ctx: BuildContext, sink: SourceSink) -> Source:
        """The runtime source, writing into ``sink``."""
        ...


@dataclass(frozen=True)
class ProcessorContext:
    """What a processor is built with: the stream it serves (as its Lambda event names it)."""

    stream_arn: str
    region: str
    source_kinesis_stream_arn: str | None = None  # a stream fed by a Kinesis data stream


class Processor(Protocol):
    """One step of a stream's processing chain, built from its config. The chain runs its steps
    in Firehose's fixed order; each takes the outcomes so far (one per record still in play, each
    naming its source record) and returns the next ones. It never raises for a bad record: it
    marks it ProcessingFailed (with Firehose's error code) or Dropped."""

    async def start(self) -> None:
        """Before the first buffer (start worker processes, open clients)."""
        ...

    async def process(self, outcomes: list[Outcome], records: list[SourceRecord]) -> list[Outcome]:
        """The outcomes after this step, for one processing buffer of ``records``."""
        ...

    async def close(self) -> None:
        """After the last buffer."""
        ...


class ProcessingChain(Protocol):
    """A stream's processors in Firehose's order, as the processing stage drives them (the
    built-in is firehose/transforms/chain.py)."""

    @property
    def enabled(self) -> bool:
        """Whether records pass through any step (``append_delimiter`` alone is none)."""
        ...

    @property
    def buffer_size_bytes(self) -> int: ...
    @property
    def buffer_interval_secs(self) -> int: ...
    @property
    def concurrency(self) -> int:
        """Processing buffers in the chain at once."""
        ...

    @property
    def lambda_arn(self) -> str | None: ...
    @property
    def delimiter(self) -> bytes | None:
        """What ``append_delimiter`` writes after each record (None: nothing)."""
        ...

    @property
    def converter(self) -> Any:
        """The record format converter (None: JSON as it is)."""
        ...

    async def start(self) -> None: ...
    async def process(self, records: Sequence[SourceRecord]) -> Sequence[Outcome]:
        """The outcomes of one processing buffer (``records``: a list, or the stage's
        :class:`~firehose.records.SourceBatch`; each :class:`Processor` gets a list): a list, or
        an :class:`~firehose.records.UnchangedOutcomes` when a function gave it back whole."""
        ...

    async def close(self) -> None: ...


class ProcessorConfig(ValidatedConfig, Protocol):
    """What the core calls on a processor's config object (checked for a plugin's class by the
    registry)."""

    @property
    def type(self) -> str:
        """The processor's ``type:``."""
        ...

    def build(self, ctx: ProcessorContext) -> Processor | None:
        """The processing step; None for a processor applied elsewhere (``append_delimiter``
        applies when objects are written)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The processor as a member of Firehose's ``ProcessingConfiguration.Processors``."""
        ...
