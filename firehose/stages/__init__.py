"""The stages a delivery stream's records pass through after the ingest spool.

Each module owns one part of the stream runtime and says what it calls; they share the small
types in :mod:`firehose.stages.common` and touch a spool only through :class:`firehose.spool.Log`.
:class:`firehose.stream.StreamRuntime` builds and wires them and owns their lifecycle.

* :mod:`~firehose.stages.processing` — the processing stage: the transform chain over processing
  buffers of ingested records; outcomes recorded, in order, before the records join a batch.
* :mod:`~firehose.stages.router` — the partition router: a record's partition, admission, the
  active-partition guard, the memory budget and spills.
* :mod:`~firehose.stages.batcher` — the batcher: records into open buffers (main, archive,
  source backup, partitions), sealed on size, on time and on stop; a seal is durable before
  its batch is delivered.
* :mod:`~firehose.stages.delivery` — the delivery runner: in-flight batches, retries with
  backoff, retry windows, rejected records, commits.
* :mod:`~firehose.stages.archiver` — the archiver: error records to the backup location.
* :mod:`~firehose.stages.health` — what ``/healthz`` says of a stream's destinations, and their
  start-up checks.
* :mod:`~firehose.stages.backlog` — the oldest record not delivered yet (``DataFreshness``,
  ``oldest_pending_age_secs``) and the spool gauges.
"""
