"""Prometheus metrics under Firehose's CloudWatch names.

A CloudWatch metric ``DeliveryToS3.Records`` becomes ``firehose_DeliveryToS3_Records_total``
(counters) with the ``DeliveryStreamName`` label, so dashboards written for CloudWatch map one to
one. Gauges keep the plain name (``firehose_DeliveryToS3_DataFreshness``).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABEL = "DeliveryStreamName"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"firehose_{name}", doc, [LABEL], registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"firehose_{name}", doc, [LABEL], registry=r)

        self.incoming_records = counter("IncomingRecords", "Records accepted (IncomingRecords)")
        self.incoming_bytes = counter("IncomingBytes", "Record bytes accepted (IncomingBytes)")
        self.incoming_put_requests = counter("IncomingPutRequests", "Accepted PutRecord/PutRecordBatch calls")
        self.throttled_records = counter("ThrottledRecords", "Records refused with ServiceUnavailableException")
        self.refused_requests = Counter(
            "firehose_RefusedRequests_total", "API requests answered with an error, by Firehose error type",
            ["error"], registry=r)
        self.delivery_records = counter("DeliveryToS3_Records", "Records delivered (DeliveryToS3.Records)")
        self.delivery_bytes = counter("DeliveryToS3_Bytes", "Record bytes delivered (DeliveryToS3.Bytes)")
        self.delivery_objects = counter("DeliveryToS3_ObjectCount", "Objects written")
        self.delivery_attempts = counter("DeliveryToS3_Attempts", "Delivery attempts")
        self.delivery_failures = counter("DeliveryToS3_Failures", "Delivery attempts that failed")
        self.delivery_retries = counter("DeliveryToS3_Retries", "Delivery attempts scheduled for retry")
        self.delivery_success = gauge("DeliveryToS3_Success", "1 if the last delivery attempt succeeded, else 0")
        self.data_freshness = gauge(
            "DeliveryToS3_DataFreshness", "Age in seconds of the oldest record not yet delivered"
        )
        self.succeed_processing_records = counter(
            "SucceedProcessing_Records", "Records a transform returned Ok (SucceedProcessing.Records)")
        self.succeed_processing_bytes = counter("SucceedProcessing_Bytes", "Bytes of Ok transform output")
        self.failed_processing_records = counter("FailedProcessing_Records", "Records a transform failed")
        self.dropped_records = counter("DroppedRecords", "Records a transform dropped on purpose")
        self.execute_processing_seconds = counter(
            "ExecuteProcessing_Duration_seconds", "Time spent in the processing chain (ExecuteProcessing.Duration)")
        self.execute_processing_calls = counter("ExecuteProcessing_Calls", "Processing chain runs")
        self.archived_records = counter(
            "BackupToS3_Records", "Failed records archived with their error (BackupToS3.Records)")
        self.archived_by_type = Counter(
            "firehose_ArchivedRecords_total", "Failed records archived, by error-output type (processing-failed, "
            "delivery-failed, ...)", [LABEL, "type"], registry=r)
        # Dynamic partitioning (Firehose: PartitionCount, PartitionCountExceeded, JQProcessing.Duration).
        self.partition_count = gauge("PartitionCount", "Active partitions: open buffers plus undelivered batches")
        self.partition_count_exceeded = gauge(
            "PartitionCountExceeded", "1 while records are archived for exceeding max_active_partitions")
        self.partition_exceeded_records = counter(
            "PartitionCountExceeded_Records", "Records archived as activePartitionExceeded")
        self.partition_flushes = Counter(
            "firehose_PartitionFlushes_total", "Partition buffers sealed, by reason (size, interval, memory, stop)",
            [LABEL, "reason"], registry=r)
        self.partition_spills = counter(
            "PartitionSpills", "Partition buffers whose records were dropped from memory and read back from the spool")
        # Kinesis Data Streams source (Firehose: DataReadFromKinesisStream.*, KinesisMillisBehindLatest,
        # Throttled*); the last two are this daemon's own.
        self.kinesis_read_records = counter(
            "DataReadFromKinesisStream_Records", "Kinesis records read (before KPL de-aggregation)")
        self.kinesis_read_bytes = counter("DataReadFromKinesisStream_Bytes", "Kinesis record bytes read")
        self.kinesis_millis_behind = gauge(
            "KinesisMillisBehindLatest", "How far the most lagging shard is behind the stream's tip, in ms")
        self.kinesis_throttled_get_records = counter("ThrottledGetRecords", "GetRecords calls throttled")
        self.kinesis_throttled_get_shard_iterator = counter(
            "ThrottledGetShardIterator", "GetShardIterator calls throttled")
        self.kinesis_throttled_describe_stream = counter(
            "ThrottledDescribeStream", "ListShards calls throttled (Firehose's ThrottledDescribeStream)")
        self.kinesis_checkpoints_trimmed = counter(
            "KinesisCheckpointsTrimmed",
            "Shard checkpoints the stream no longer held (expired past retention); reading resumed at TRIM_HORIZON")
        self.kinesis_kpl_failed = counter(
            "KinesisKplDeaggregationFailed", "KPL aggregates that did not verify, archived as processing-failed")
        # Log file sources (this daemon's own names).
        self.file_records = counter("FileSourceRecords", "Records read from files")
        self.file_bytes = counter("FileSourceBytes", "Bytes of records read from files")
        self.file_errors = Counter("firehose_FileSourceErrors_total",
                                   "Files that could not be opened or read, by reason", [LABEL, "reason"], registry=r)
        self.file_unconverted = counter(
            "FileSourceUnconverted", "Records a processing option could not convert, sent as read")
        self.file_truncated = counter("FileSourceTruncated", "Records cut at max_record_bytes")
        self.file_files = gauge("FileSourceFiles", "Files being followed")
        self.spool_bytes = gauge("SpoolBytes", "Bytes held in the stream's spool")
        self.spool_max_bytes = gauge("SpoolMaxBytes", "The spool's cap (spool.max_size_mib); at it, ingest answers 503")
        self.backlog_records = gauge("BacklogRecords", "Acknowledged records not yet delivered")

        # Cluster mode (docs/cluster.md).
        self.cluster_lease_moves = Counter(
            "firehose_ClusterLeaseMoves_total", "Partitions this daemon took or gave up, by kind (taken, released, "
            "lost, reopened)", [LABEL, "kind"], registry=r)
        self.cluster_owned_partitions = gauge("ClusterOwnedPartitions", "Partitions of the stream this daemon runs")
        self.jetstream_publish_seconds = Histogram(
            "firehose_JetStreamPublish_seconds", "Time from publishing a log message to JetStream's acknowledgement",
            [LABEL], registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
        self.jetstream_pending_bytes = gauge(
            "JetStreamPendingBytes", "Log bytes published or queued and not yet acknowledged by JetStream")

        self._destinations: dict[str, DestinationMetrics] = {}
        # What the stages' state gauges (backlog, spool size, DataFreshness ...) are read from when
        # the metrics are rendered: an age grows while nothing moves (a destination down), and
        # the work itself pays nothing for gauges nobody reads.
        self._refreshers: list[Callable[[], None]] = []

    def destination(self, prefix: str) -> DestinationMetrics:
        """A destination's own Firehose names (``DeliveryToSplunk.Records``, ...), made on first use."""
        found = self._destinations.get(prefix)
        if found is None:
            found = self._destinations[prefix] = DestinationMetrics(prefix, self.registry)
        return found

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` (it sets gauges) before each :meth:`render`."""
        if refresh not in self._refreshers:
            self._refreshers.append(refresh)

    def remove_refresher(self, refresh: Callable[[], None]) -> None:
        if refresh in self._refreshers:
            self._refreshers.remove(refresh)

    def render(self) -> bytes:
        for refresh in list(self._refreshers):
            try:
                refresh()
            except Exception as exc:  # one stream's gauges must not take every metric away
                structlog.get_logger().warning("metrics_refresh_failed", error=f"{type(exc).__name__}: {exc}")
        return generate_latest(self.registry)


class DestinationMetrics:
    """``<prefix>.Records``, ``.Bytes``, ``.Success`` and ``.DataFreshness`` for a destination that
    is not S3 (``DeliveryToAmazonOpenSearchService``, ``DeliveryToSplunk``, ``DeliveryToHttpEndpoint``),
    beside the ``DeliveryToS3`` names every stream has."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        self.records = Counter(f"firehose_{prefix}_Records", f"Records delivered ({prefix}.Records)", [LABEL],
                               registry=registry)
        self.bytes = Counter(f"firehose_{prefix}_Bytes", f"Record bytes delivered ({prefix}.Bytes)", [LABEL],
                             registry=registry)
        self.success = Gauge(f"firehose_{prefix}_Success", "1 if the last delivery attempt succeeded, else 0",
                             [LABEL], registry=registry)
        self.freshness = Gauge(f"firehose_{prefix}_DataFreshness",
                               "Age in seconds of the oldest record not yet delivered", [LABEL], registry=registry)

    def attempt(self, stream: str, records: int, nbytes: int, ok: bool) -> None:
        if records:
            self.records.labels(stream).inc(records)
            self.bytes.labels(stream).inc(nbytes)
        self.success.labels(stream).set(1 if ok else 0)
