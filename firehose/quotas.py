"""Per-stream throughput quotas: Firehose's Direct PUT limits, as token buckets.

Firehose limits each delivery stream's PutRecord and PutRecordBatch calls by records, bytes and
requests per second (reference §1.6: 500,000 records/s, 2,000 requests/s and 5 MiB/s in
us-east-1, us-west-2 and eu-west-1; 100,000 records/s, 1,000 requests/s and 1 MiB/s elsewhere). A
stream's ``quotas:`` block sets any of the three; a field left out is unlimited, and a stream
without the block has none.

Each limit is a token bucket holding one second's worth, refilled continuously. A request is
admitted whole or not at all: when any bucket is short, it is answered 503
``ServiceUnavailableException`` "Slow down." (which every SDK retries) and nothing of it is
stored; Firehose's per-record form would leave a batch half written. A request bigger than one
second's worth (500 records against 100 records/s) is admitted when the bucket is full and takes
it below zero, so the rate still averages out at the quota instead of refusing it forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import Field

from firehose.models import StrictModel

__all__ = ["Quota", "QuotasConfig", "TokenBucket"]


class QuotasConfig(StrictModel):
    """A stream's throughput quotas (Firehose: the Direct PUT limits); each one left out is
    unlimited. Changing them on reload neither restarts the stream nor bumps its VersionId."""

    records_per_sec: int | None = Field(
        default=None, ge=1,
        description="Records accepted per second through PutRecord and PutRecordBatch together (Firehose: "
        "500,000 in us-east-1, us-west-2 and eu-west-1, 100,000 elsewhere); unset: unlimited.",
    )
    mib_per_sec: float | None = Field(
        default=None, gt=0,
        description="MiB of record data accepted per second (Firehose: 5 or 1); unset: unlimited.",
    )
    requests_per_sec: int | None = Field(
        default=None, ge=1,
        description="PutRecord and PutRecordBatch calls accepted per second (Firehose: 2,000 or 1,000); "
        "unset: unlimited.",
    )


class TokenBucket:
    """``rate`` tokens a second, holding at most one second's worth (full at the start)."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.tokens = self.rate
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def has(self, cost: float) -> bool:
        """Whether ``cost`` may be taken now: the tokens are there, or the bucket is full (a request
        bigger than one second's worth goes through on a full bucket and leaves it in debt)."""
        return self.tokens >= cost or self.tokens >= self.rate


class Quota:
    """The buckets of one stream's :class:`QuotasConfig`."""

    def __init__(self, config: QuotasConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        now = clock()
        self._records = TokenBucket(config.records_per_sec, now) if config.records_per_sec else None
        self._bytes = TokenBucket(config.mib_per_sec * (1 << 20), now) if config.mib_per_sec else None
        self._requests = TokenBucket(config.requests_per_sec, now) if config.requests_per_sec else None

    def admit(self, records: int, nbytes: int) -> bool:
        """Take one request of ``records`` records and ``nbytes`` bytes from every bucket, or, when
        any of them is short, nothing from any (False)."""
        now = self.clock()
        wants = [(b, cost) for b, cost in ((self._records, records), (self._bytes, nbytes), (self._requests, 1))
                 if b is not None]
        for bucket, _ in wants:
            bucket.refill(now)
        if not all(bucket.has(cost) for bucket, cost in wants):
            return False
        for bucket, cost in wants:
            bucket.tokens -= cost
        return True
