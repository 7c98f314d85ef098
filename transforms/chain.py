"""A stream's processing chain: its processors as a list of steps, run in Firehose's order.

Each ``processing:`` item's config builds its step (:class:`firehose.interfaces.Processor`);
whatever their order in the list, the steps run in Firehose's fixed order (reference §4.1):

1. ``record_deaggregation`` (KPL aggregates, or JSON / delimited records split),
2. ``decompression``,
3. ``cloudwatch_log_processing``,
4. third-party processors (entry point ``firehose.processors``), in the order listed: they see
   de-aggregated, decompressed records, and what they return is what the Lambda gets,
5. ``lambda``,
6. ``metadata_extraction`` (dynamic partitioning's query, on what the Lambda returned),
7. the record format conversion check, when the stream converts to Parquet/ORC/Avro.

``append_delimiter`` builds no step: it applies when objects are written.

``process`` never raises for bad records or failed invocations: every source record comes back
as one or more :class:`Outcome` (Ok, Dropped or ProcessingFailed with Firehose's error code), so
the caller can record the outcome durably before anything is delivered or archived.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, overload

from firehose.interfaces import Processor, ProcessorContext
from firehose.records import Outcome, SourceRecord, initial_outcomes
from firehose.transforms.config import AppendDelimiterConfig, LambdaProcessorConfig

FORMAT_CONVERSION_FAILED = "format-conversion-failed"

# Without a Lambda, the built-ins run on what has arrived (Firehose's processing buffer hints
# exist for Lambda invocations); a bound keeps one pass small.
BUILTIN_BUFFER_BYTES = 1 << 20
CONVERSION_BUFFER_BYTES = 8 << 20

#: Where each built-in runs in Firehose's order; every other (third-party) type runs at PLUGIN_ORDER.
ORDER = {"record_deaggregation": 10, "decompression": 20, "cloudwatch_log_processing": 30,
         "lambda": 50, "metadata_extraction": 60}
PLUGIN_ORDER = 40


class ThreadStep:
    """A step that is a function of the outcomes, run on a worker thread (CPU-bound: gzip, JSON,
    jq, schema checks) so the event loop keeps serving."""

    def __init__(self, fn: Callable[[list[Outcome]], list[Outcome]]) -> None:
        self.fn = fn

    async def start(self) -> None:
        """Nothing to start."""

    async def process(self, outcomes: list[Outcome], records: list[SourceRecord]) -> list[Outcome]:
        return await asyncio.to_thread(self.fn, outcomes)

    async def close(self) -> None:
        """Nothing to close."""


def _unchanged(outcomes: list[Outcome], records: list[SourceRecord]) -> bool:
    """Whether the outcomes are still the source records themselves (no step changed them)."""
    return len(outcomes) == len(records) and all(
        o.ok and o.source == i and o.data is records[i].data for i, o in enumerate(outcomes))


class LambdaStep:
    """The Lambda function: a local handler in worker processes, or a real Lambda through boto3."""

    def __init__(self, config: LambdaProcessorConfig, ctx: ProcessorContext) -> None:
        self.config = config
        self.ctx = ctx
        self._invoker: Any = None

    async def start(self) -> None:
        from firehose.transforms.lambda_ import LocalFunction
        from firehose.transforms.lambda_remote import RemoteFunction

        c = self.config
        if c.function is not None:
            self._invoker = LocalFunction(c.function, timeout_secs=c.timeout_secs, processes=c.workers,
                                          nice=c.worker_nice)
            await self._invoker.start()
        else:
            assert c.arn is not None
            self._invoker = RemoteFunction(c.arn, endpoint_url=c.endpoint_url, region=c.region or self.ctx.region,
                                           timeout_secs=c.timeout_secs)

    async def close(self) -> None:
        if self._invoker is not None:
            await self._invoker.close()
            self._invoker = None

    @overload
    async def invoke(self, batch: Sequence[SourceRecord], *, compact: Literal[False] = False) -> list[Outcome]: ...
    @overload
    async def invoke(self, batch: Sequence[SourceRecord], *, compact: bool) -> Sequence[Outcome]: ...

    async def invoke(self, batch: Sequence[SourceRecord], *, compact: bool = False) -> Sequence[Outcome]:
        """The function's outcomes for ``batch`` (``Outcome.source`` indexes it); ``compact``: see
        :func:`~firehose.transforms.lambda_.invoke_with_retries`."""
        from firehose.transforms.lambda_ import invoke_with_retries

        return await invoke_with_retries(
            self._invoker, batch, retries=self.config.retries, stream_arn=self.ctx.stream_arn,
            region=self.ctx.region, source_kinesis_stream_arn=self.ctx.source_kinesis_stream_arn, compact=compact,
        )

    async def process(self, outcomes: list[Outcome], records: list[SourceRecord]) -> list[Outcome]:
        if _unchanged(outcomes, records):
            # Straight to the function, under the records' own ids: its outcomes index them.
            return await self.invoke(records)
        return await self._run_lambda(records, outcomes)

    async def _run_lambda(self, records: list[SourceRecord], outs: list[Outcome]) -> list[Outcome]:
        """Records changed by earlier steps (split, decompressed): those still Ok go to the
        function under new ids, and its outcomes are mapped back to their source records."""
        ok = [o for o in outs if o.ok]
        if not ok:
            return outs
        batch = [
            SourceRecord(str(k), o.data, records[o.source].arrival_ms, records[o.source].kinesis)
            for k, o in enumerate(ok)
        ]
        results = await self.invoke(batch)
        mapped: dict[int, list[Outcome]] = {}
        for r in results:
            src = ok[r.source]
            mapped.setdefault(r.source, []).append(
                replace(r, source=src.source, sub_index=src.sub_index, meta={**src.meta, **r.meta})
            )
        final: list[Outcome] = []
        k = 0
        for o in outs:
            if o.ok:
                final.extend(mapped.get(k, []))
                k += 1
            else:
                final.append(o)
        return final


class ProcessingChain:
    """A stream's processing steps, built from its ``processing:`` configs (see the module
    docstring for their order), plus the format conversion check when ``converter`` is given."""

    def __init__(
        self, configs: list[Any], *, stream_arn: str, region: str, converter: Any = None,
        source_kinesis_stream_arn: str | None = None,
    ) -> None:
        ctx = ProcessorContext(stream_arn, region, source_kinesis_stream_arn)
        ordered = sorted(enumerate(configs), key=lambda item: (ORDER.get(item[1].type, PLUGIN_ORDER), item[0]))
        self.steps: list[Processor] = [step for _, c in ordered if (step := c.build(ctx)) is not None]
        # Record format conversion: each record is checked against the schema here, so a record
        # that cannot be converted is archived (format-conversion-failed) instead of poisoning
        # its batch; batches are encoded at delivery with records known to convert.
        self.converter = converter
        if converter is not None:
            self.steps.append(ThreadStep(self._check_conversion))
        self._lambda = next((c for c in configs if isinstance(c, LambdaProcessorConfig)), None)
        delimiters = [c.delimiter.encode() for c in configs if isinstance(c, AppendDelimiterConfig)]
        self.delimiter: bytes | None = delimiters[0] if delimiters else None

    @property
    def enabled(self) -> bool:
        """True when records pass through a processing step (append_delimiter alone does not)."""
        return bool(self.steps)

    @property
    def buffer_size_bytes(self) -> int:
        if self._lambda is not None:
            return int(self._lambda.buffer_size_mib * (1 << 20))
        if self.converter is not None:
            # pyarrow's JSON reader is far more efficient on larger blocks (0.5 -> 0.7 of the
            # bare rate from 1 to 8 MiB on clickstream data).
            return CONVERSION_BUFFER_BYTES
        return BUILTIN_BUFFER_BYTES

    @property
    def buffer_interval_secs(self) -> int:
        return self._lambda.buffer_interval_secs if self._lambda is not None else 0

    @property
    def concurrency(self) -> int:
        """Processing buffers in flight at once: a worker that answers takes the next buffer
        waiting for it straight away (in its IPC thread), so each worker has one waiting, and one
        more is being filled or recorded. With one per worker (plus one) the workers sat idle
        between invocations for two turns of a busy event loop."""
        return (2 * self._lambda.workers + 1) if self._lambda is not None else 2

    @property
    def lambda_arn(self) -> str | None:
        return self._lambda.lambda_arn if self._lambda is not None else None

    async def start(self) -> None:
        started: list[Processor] = []
        try:
            for step in self.steps:
                await step.start()
                started.append(step)
        except BaseException:
            for step in reversed(started):
                await step.close()
            raise

    async def close(self) -> None:
        for step in reversed(self.steps):
            await step.close()

    async def process(self, records: Sequence[SourceRecord]) -> Sequence[Outcome]:
        """The outcomes of one processing buffer. ``records`` may be a
        :class:`~firehose.records.SourceBatch`: the function reads its columns, and the other
        steps get a list of its records. A function alone that gave the buffer back whole
        answers with an :class:`~firehose.records.UnchangedOutcomes`; otherwise, a list."""
        steps = self.steps
        outs: list[Outcome] | None = None
        if steps and isinstance(steps[0], LambdaStep):
            # The function comes first: it gets the records as they are, under their own ids.
            if len(steps) == 1:
                return await steps[0].invoke(records, compact=True)
            outs = await steps[0].invoke(records)
            steps = steps[1:]
        # Every other step takes a list of SourceRecords (a plugin's too).
        listed = records if isinstance(records, list) else list(records)
        if outs is None:
            outs = initial_outcomes(listed)
        for step in steps:
            outs = await step.process(outs, listed)
        return outs

    def _check_conversion(self, outs: list[Outcome]) -> list[Outcome]:
        ok = [o for o in outs if o.ok]
        if not ok:
            return outs
        verdicts = self.converter.check([o.data for o in ok])
        for o, verdict in zip(ok, verdicts, strict=True):
            if verdict is not None:
                code, message = verdict
                o.result = "ProcessingFailed"
                o.error_code, o.error_message = code, message
                o.error_output_type = FORMAT_CONVERSION_FAILED
        return outs
