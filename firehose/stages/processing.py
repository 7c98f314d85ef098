"""The processing stage: the transform chain over ingested records, outcomes recorded in order.

Owns: the read cursor in the ingest log; processing buffers (Firehose's processing buffer hints:
the chain's ``buffer_size_bytes`` / ``buffer_interval_secs``), several in the chain at once
(``concurrency``, at least 2); recording every buffer's outcomes, strictly in order, as one frame
of the outcome log with the position ``{"raw_end": n}``, durably, and only then committing the
raw records (:meth:`Log.commit_ranges`); the count of dropped records. A restart resumes at
``raw_end``, so no transform runs twice on a record whose outcome is recorded. Records the ingest
log had sealed or finished past that point when the stage started (a partitioned stream seals
out of order, before processing was turned on) are stepped over: their own batches deliver them.
A buffer may span such a range; it knows its records' runs and releases only those.

An outcome frame holds, per output record, None (Ok, no keys), ``{"pk": {...}}`` (Ok with
partition keys, namespaced ``partitionKeyFromQuery:k`` / ``partitionKeyFromLambda:k``),
``{"err": {...}}`` (failed: the compact error record the archiver formats) or, with
``backup: {mode: all}``, ``{"src": 1}`` for the untransformed copy of each source record.

While the outcome log holds half the stream's spool cap the stage stops reading (the batcher is
far behind), so the ingest cap applies back-pressure.

Calls: the chain (``process``; its buffer hints, ``lambda_arn``), the ingest :class:`Log`
(``read_frame``, ``reader_passed``, ``next_seq``, ``min_seq``, ``sealed``, ``committed``,
``commit_ranges``), the outcome
:class:`Log` (``append``, durable on return whatever the stream's fsync policy; ``size_bytes``),
and wakes the batcher once outcomes are recorded.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple

from firehose.config import StreamConfig
from firehose.interfaces import ProcessingChain
from firehose.intervals import IntervalSet, subtract_ranges
from firehose.log import Log, LogError, RecordFrame
from firehose.names import stream_arn
from firehose.records import PROCESSING_FAILED, ErrorInfo, RecordMeta, SourceBatch, UnchangedOutcomes
from firehose.retry import local_failure_pause
from firehose.stages.common import StageContext, log_failure, retry_after

#: One ingested record: (its id in its buffer, data, arrival ms, source metadata), what an
#: outcome's error record is made of.
Item = tuple[int, bytes, int, Any]

#: Finished processing buffers recorded in one outcome frame at most (record bytes in).
GROUP_BYTES = 8 << 20


class _InChain(NamedTuple):
    """A processing buffer handed to the chain: its records, their source metadata (None: none
    has any), their size, and the chain's task."""

    batch: SourceBatch
    metas: list[Any] | None
    nbytes: int
    runs: list[tuple[int, int]]  # the ingest log's record ranges the buffer holds, in order
    task: asyncio.Task[Any]


#: A buffer out of the chain: its records, their source metadata, their size, their outcomes and
#: the ingest record ranges they came from.
_Done = tuple[SourceBatch, list[Any] | None, int, Sequence[Any], list[tuple[int, int]]]


def _item(batch: SourceBatch, metas: list[Any] | None, i: int) -> Item:
    return batch.first_seq + i, batch.datas[i], batch.arrivals[i], metas[i] if metas is not None else None


class OutcomeFrame(NamedTuple):
    """What :func:`outcome_frame` records, and what it counted on the way."""

    records: list[bytes]
    metas: list[Any]
    dropped: int
    failed: int
    ok_bytes: int
    nbytes: int  # of ``records``


def outcome_frame(outcomes: Sequence[Any], batch: SourceBatch, metas: list[Any] | None, *, now_ms: int,
                  lambda_arn: str | None, backup_all: bool, batch_bytes: int | None = None) -> OutcomeFrame:
    """The records and per-record metadata that record ``outcomes`` of the buffer ``batch`` (its
    records' source metadata ``metas``, their size ``batch_bytes`` when the caller has it), and
    how many records were dropped (they leave nothing behind) and failed, and the Ok bytes."""
    records: list[bytes] = []
    out_metas: list[Any] = []
    dropped = failed = ok_bytes = other_bytes = 0
    if batch_bytes is None:
        batch_bytes = sum(map(len, batch.datas)) if backup_all or isinstance(outcomes, UnchangedOutcomes) else 0
    if isinstance(outcomes, UnchangedOutcomes):  # every record of the batch Ok as it came: nothing to look at
        records += outcomes.datas
        ok_bytes = batch_bytes
        out_metas += [None] * len(records)
        outcomes = ()
    for o in outcomes:
        result = o.result
        if result == "Ok":
            records.append(o.data)
            ok_bytes += len(o.data)
            # Most outcomes carry no keys: their metadata is None without a call (once a record).
            out_metas.append(None if o.partition_keys is None and o.query_keys is None and o.otf is None
                             else _ok_meta(o))
        elif result == "Dropped":
            dropped += 1
        else:
            failed += 1
            records.append(o.data)
            other_bytes += len(o.data)
            out_metas.append(outcome_meta(o, _item(batch, metas, o.source), now_ms, lambda_arn))
    if backup_all:
        records += batch.datas
        other_bytes += batch_bytes
        out_metas += [RecordMeta.SOURCE_COPY] * len(batch.datas)
    return OutcomeFrame(records, out_metas, dropped, failed, ok_bytes, ok_bytes + other_bytes)


#: The namespace of a metadata_extraction key in a record's metadata (the Prefix's name for it).
QUERY_KEY = "partitionKeyFromQuery:"


def outcome_meta(o: Any, item: Item, now_ms: int, lambda_arn: str | None) -> dict[str, Any] | None:
    """What an Ok or failed outcome of ``item`` records as its metadata (the module docstring)."""
    return _ok_meta(o) if o.result == "Ok" else RecordMeta.failed(_error(o, item, now_ms, lambda_arn))


def _ok_meta(o: Any) -> dict[str, Any] | None:
    if o.partition_keys is None and o.query_keys is None and o.otf is None:
        return None
    # Namespaced, so a query key and a Lambda key of the same name stay apart.
    pk = {}
    for name, value in (o.query_keys or {}).items():
        pk[QUERY_KEY + name] = value
    for name, value in (o.partition_keys or {}).items():
        pk["partitionKeyFromLambda:" + name] = value
    meta = RecordMeta.keyed(pk)
    if o.otf is not None:
        meta["otf"] = o.otf
    return meta


def _error(o: Any, item: Item, now_ms: int, lambda_arn: str | None) -> ErrorInfo:
    err = ErrorInfo(o.error_code, o.error_message, o.error_output_type, o.attempts, item[2], now_ms, lambda_arn)
    kinesis = RecordMeta.kinesis(item[3])
    if kinesis is not None:  # a KDS source's record
        err.extra["sequenceNumber"] = kinesis.get("sequenceNumber")
        err.extra["subSequenceNumber"] = kinesis.get("subsequenceNumber")
    return err


async def load_chain(config: StreamConfig, *, region: str, account_id: str, converter: Any) -> ProcessingChain:
    """Build and start a stream's processing chain (``transforms/chain.py``, through the registry)."""
    from firehose.registry import PROCESSING_CHAIN, load

    arn = stream_arn(region, account_id, config.name)
    kinesis = [s for s in config.sources if s.stream_type == "KinesisStreamAsSource"]
    chain = load(PROCESSING_CHAIN)(
        config.processing, stream_arn=arn, region=region, converter=converter,
        source_kinesis_stream_arn=kinesis[0].arn_for(region, account_id) if kinesis else None,
    )
    await chain.start()
    return chain


async def load_converter(fmt: Any) -> Any:
    """The record format converter for a stream's ``format:`` (None for JSON, or no format)."""
    if fmt is None or fmt.type == "json":
        return None
    from firehose.registry import CONVERTER, load

    return await asyncio.to_thread(load(CONVERTER), fmt)


async def resume_point(ingest: Log, raw_end: int, *, name: str) -> int:
    """Where processing resumes after a restart: at ``raw_end``, the end of the raw records whose
    outcome is recorded in the outcome log ``name`` (they are committed again: their commit may
    have been lost), or after the leading records the ingest log already sealed or finished
    before processing was turned on (delivered from there, or being delivered: never again)."""
    if raw_end > ingest.next_seq:
        raise LogError(
            f"{name}: outcomes are recorded up to record {raw_end} but the ingest "
            f"spool ends at {ingest.next_seq}; refusing to guess (was the spool replaced?)"
        )
    done = max(raw_end, _first_unbatched(ingest))
    # Not the sealed ones: their batch's own COMMIT finishes them, once delivered. Committed by
    # range now, the spool could delete their segment while the batch still waits to be sent.
    unsealed = subtract_ranges([(ingest.min_seq, done)] if done > ingest.min_seq else [], ingest.sealed.ranges())
    todo = [r for r in unsealed if not ingest.committed.covers(*r)]
    if todo:
        await ingest.commit_ranges(todo)
    return max(done, ingest.min_seq)


def _first_unbatched(ingest: Log) -> int:
    """The first record from ``min_seq`` on that is neither sealed nor committed."""
    seq = ingest.min_seq
    while True:
        nxt = ingest.committed.next_gap(ingest.sealed.next_gap(seq))
        if nxt == seq:
            return seq
        seq = nxt


class _Buffer:
    """The processing buffer being filled, as the columns of the chain's :class:`SourceBatch`,
    with the records' source metadata (None while no record has any) and the runs of the ingest
    log they came from. The batch's record ids are its first record's number plus the position:
    unique within it, and the record's own number unless the buffer spans a stepped-over range."""

    __slots__ = ("arrivals", "datas", "metas", "nbytes", "runs")

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []
        self.datas: list[bytes] = []
        self.arrivals: list[int] = []
        self.metas: list[Any] | None = None
        self.nbytes = 0

    @property
    def first_seq(self) -> int:
        return self.runs[0][0]

    def take(self) -> tuple[SourceBatch, list[Any] | None, int, list[tuple[int, int]]]:
        metas = self.metas
        kinesis = None if metas is None else [None if m is None else RecordMeta.kinesis(m) for m in metas]
        taken = SourceBatch(self.first_seq, self.datas, self.arrivals, kinesis), metas, self.nbytes, self.runs
        self.datas, self.arrivals, self.metas, self.nbytes, self.runs = [], [], None, 0, []
        return taken

    def add(self, frame: RecordFrame, i: int, j: int) -> None:
        """Records ``i..j-1`` of ``frame`` (the next records of the spool to process)."""
        start, end = frame.first_seq + i, frame.first_seq + j
        runs = self.runs
        if runs and start < runs[-1][1]:
            raise LogError(f"record {start} comes after record {runs[-1][1] - 1} in the processing buffer")
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
        if frame.meta is not None or self.metas is not None:
            if self.metas is None:  # the first with metadata: the records before it had none
                self.metas = [None] * len(self.datas)
            self.metas += frame.meta[i:j] if frame.meta is not None else [None] * (j - i)
        self.datas += frame.records[i:j]
        self.arrivals += repeat(frame.arrival_ms, j - i)


class ProcessingStage:
    """Runs one stream's processing chain. All methods run on the stream's event loop."""

    def __init__(self, ctx: StageContext, chain: ProcessingChain, ingest: Log, out: Log, *, cap_bytes: int,
                 backup_all: bool) -> None:
        self.name, self.clock, self.metrics, self.log = ctx.name, ctx.clock, ctx.metrics, ctx.log
        self.signals = ctx.signals
        self.chain = chain
        self.ingest = ingest
        self.out = out
        self.throttle_bytes = cap_bytes // 2  # outcomes waiting on disk past this: stop reading
        self.backup_all = backup_all
        self.cursor = 0  # the next ingested record to put in a processing buffer
        # What the ingest log had sealed or finished when the stage started: past the cursor,
        # records sealed before processing was turned on (a partitioned stream seals out of
        # order). Their own batches deliver them; the stage steps over them.
        self.skip = IntervalSet()
        self.recorded_upto = 0  # raw records up to here have their outcome appended
        self.dropped_records = 0
        self.task: asyncio.Task[None] | None = None

    def start(self, cursor: int) -> None:
        """Process ingested records from ``cursor`` on, in a task, except those already sealed or
        committed in the ingest spool (their own batches deliver them)."""
        self.cursor = cursor
        self.skip = IntervalSet.union(self.ingest.sealed, self.ingest.committed)
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"processing-{self.name}")
        self.signals.processing.set()  # records ingested before the restart are waiting

    async def cancel(self) -> None:
        """Stop processing; buffers in the chain are cancelled (their records are processed
        again after a restart: their outcomes were not recorded)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @property
    def _throttled(self) -> bool:
        return self.out.size_bytes >= self.throttle_bytes

    # ------------------------------------------------------------------ reading and submitting
    async def _run(self) -> None:
        """Fill processing buffers from the ingest log and hand each to the chain; several are in
        processing at once (Firehose keeps up to 5 invocations outstanding per shard); the
        recorder records their outcomes strictly in order."""
        depth = max(2, self.chain.concurrency)
        queue: asyncio.Queue[_InChain] = asyncio.Queue(maxsize=depth)
        recorder = asyncio.get_running_loop().create_task(self._record_loop(queue), name=f"recorder-{self.name}")
        buf = _Buffer()
        failures = 0
        try:
            while not self.signals.stopping:
                await self._wait(buf)
                try:
                    await self._fill(queue, buf)
                    if buf.datas and self._due(buf):
                        await self._submit(queue, *buf.take())
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # re-read the unsubmitted records on the next pass
                    if buf.datas:
                        self.cursor = buf.take()[0].first_seq
                    failures += 1
                    await retry_after(self.log, "processing_failed", exc, failures, self.signals.processing)
        finally:
            recorder.cancel()
            while not queue.empty():
                queue.get_nowait().task.cancel()
            await asyncio.gather(recorder, return_exceptions=True)

    def _due(self, buf: _Buffer) -> bool:
        interval_ms = self.chain.buffer_interval_secs * 1000
        return not interval_ms or self.clock.now_ms() >= buf.arrivals[0] + interval_ms

    async def _wait(self, buf: _Buffer) -> None:
        """Until woken, or the buffer's interval is up, or (throttled) a second has passed."""
        interval_ms = self.chain.buffer_interval_secs * 1000
        timeout: float | None = None
        if buf.datas and interval_ms:
            timeout = max(0.0, (buf.arrivals[0] + interval_ms - self.clock.now_ms()) / 1000.0)
        if self._throttled:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)  # throttled: look again soon
        if not buf.datas or timeout:
            try:
                await asyncio.wait_for(self.signals.processing.wait(), timeout)
            except TimeoutError:
                pass
        self.signals.processing.clear()

    async def _fill(self, queue: asyncio.Queue[_InChain], buf: _Buffer) -> None:
        """Read ingested records into the buffer, submitting it whenever it reaches the size hint.
        Outcomes wait on disk like records do: stop reading when the batcher is far behind."""
        limit = self.chain.buffer_size_bytes
        ingest = self.ingest
        skip = self.skip
        while self.cursor < ingest.next_seq and not self.signals.stopping and not self._throttled:
            if self.cursor in skip:
                self.cursor = skip.next_gap(self.cursor)
                continue
            frame = await ingest.read_frame(self.cursor)
            if frame is None:
                self.cursor = max(self.cursor, ingest.min_seq)
                break
            first, n, cum = frame.first_seq, len(frame.records), frame.cum
            stop = skip.next_start_after(self.cursor)
            if stop is not None and stop < first + n:
                n = stop - first
            i = self.cursor - first
            while i < n:
                # The records up to the one that fills the buffer, taken as one run.
                j = min(n, bisect.bisect_left(cum, cum[i] + limit - buf.nbytes, i + 1))
                buf.add(frame, i, j)
                buf.nbytes += cum[j] - cum[i]
                i = j
                if buf.nbytes >= limit:
                    self.cursor = first + i
                    await self._submit(queue, *buf.take())
            self.cursor = first + n
            ingest.reader_passed(self.cursor)
            # Reading a frame never suspends: give the requests waiting on the loop their turn
            # between frames, or a backlog of ingested frames is read in one long stretch.
            await asyncio.sleep(0)

    async def _submit(self, queue: asyncio.Queue[_InChain], batch: SourceBatch, metas: list[Any] | None,
                      nbytes: int, runs: list[tuple[int, int]]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_chain(batch, metas))
        await queue.put(_InChain(batch, metas, nbytes, runs, task))

    async def _run_chain(self, batch: SourceBatch, metas: list[Any] | None) -> Sequence[Any]:
        t0 = time.monotonic()
        # A record its source already failed (a KPL aggregate that does not verify) skips the chain.
        # Most buffers carry no metadata at all: looked at record by record only when some does.
        failed = {i: ErrorInfo.decode(e) for i, m in enumerate(metas)
                  if (e := RecordMeta.error(m)) is not None} if metas is not None else {}
        outcomes: Sequence[Any]
        if not failed:
            outcomes = await self.chain.process(batch)
        else:
            from firehose.records import Outcome

            keep = [i for i in range(len(batch)) if i not in failed]
            some = list(await self.chain.process([batch[i] for i in keep])) if keep else []
            for o in some:
                o.source = keep[o.source]
            some += [Outcome(i, batch.datas[i]).failed(e.code or "", e.message or "", e.output_type or PROCESSING_FAILED)
                     for i, e in failed.items()]
            some.sort(key=lambda o: o.source)  # stable: a record's outcomes keep their order
            outcomes = some
        self.metrics.execute_processing_seconds.labels(self.name).inc(time.monotonic() - t0)
        self.metrics.execute_processing_calls.labels(self.name).inc()
        return outcomes

    # ------------------------------------------------------------------ recording
    async def _record_loop(self, queue: asyncio.Queue[_InChain]) -> None:
        """Record outcomes in order. Buffers the chain finished while the previous frame was being
        made durable are recorded together, as one frame and one fsync: a stream whose
        processing keeps several buffers in flight is not held to one fsync per buffer."""
        head: _InChain | None = None
        while True:
            if head is None:
                head = await queue.get()
            group = [await self._outcomes_of(head)]
            size = head.nbytes
            head = None
            while size < GROUP_BYTES and not queue.empty():
                entry = queue.get_nowait()
                if not entry.task.done():
                    head = entry  # still in the chain: it starts the next group
                    break
                group.append(await self._outcomes_of(entry))
                size += entry.nbytes
            await self._record_reliably(group)

    async def _outcomes_of(self, entry: _InChain) -> _Done:
        batch, metas, nbytes, runs, task = entry
        while True:
            try:
                return batch, metas, nbytes, await task, runs
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a stage: run the same buffer again, in order
                log_failure(self.log, "processing_failed", exc)
                await asyncio.sleep(1.0)
                task = asyncio.get_running_loop().create_task(self._run_chain(batch, metas))

    async def _record_reliably(self, group: list[_Done]) -> None:
        """Record the outcomes of consecutive buffers, retrying on local I/O errors until they
        succeed. The frame is appended at most once: after a successful append only the release
        of the raw records is retried."""
        # The raw records to release: the buffers' own (ranges stepped over are not).
        raw = list(IntervalSet(r for *_, runs in group for r in runs).ranges())
        end = raw[-1][1]
        failures = 0
        while True:
            try:
                if self.recorded_upto >= end:
                    # Appended (durably) already: finish the release, not the append.
                    await self.ingest.commit_ranges(raw)
                    self.signals.batcher.set()
                else:
                    await self._record(group, raw, end)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log_failure(self.log, "outcome_recording_failed", exc, attempt=failures)
                await asyncio.sleep(local_failure_pause(failures))

    async def _record(self, group: list[_Done], raw: list[tuple[int, int]], end: int) -> None:
        now_ms = self.clock.now_ms()
        records: list[bytes] = []
        metas: list[Any] = []
        dropped = failed = ok_bytes = count = nbytes = 0
        for batch, source_metas, batch_bytes, outcomes, _runs in group:
            frame = outcome_frame(outcomes, batch, source_metas, now_ms=now_ms, lambda_arn=self.chain.lambda_arn,
                                  backup_all=self.backup_all, batch_bytes=batch_bytes)
            records += frame.records
            metas += frame.metas
            dropped += frame.dropped
            failed += frame.failed
            ok_bytes += frame.ok_bytes
            nbytes += frame.nbytes
            count += len(outcomes)
        has_meta = metas.count(None) != len(metas)
        await self.out.append(
            records, group[0][0].arrivals[0], meta=metas if has_meta else None, positions={"raw_end": end},
            enforce_cap=False, nbytes=nbytes,
        )
        self.recorded_upto = end
        if self.skip and end >= self.skip.last_end():  # never read below ``end`` again: let it go
            self.skip = IntervalSet()
        # Counted once recorded, before the release: a release that fails is retried alone.
        self.dropped_records += dropped
        self.metrics.dropped_records.labels(self.name).inc(dropped)
        self.metrics.failed_processing_records.labels(self.name).inc(failed)
        self.metrics.succeed_processing_records.labels(self.name).inc(count - failed - dropped)
        self.metrics.succeed_processing_bytes.labels(self.name).inc(ok_bytes)
        self.log.debug("records_processed", records=sum(b - a for a, b in raw), outputs=len(records), dropped=dropped,
                       failed=failed)
        await self.ingest.commit_ranges(raw)
        self.signals.batcher.set()
