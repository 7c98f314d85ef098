"""Per-stream quotas as token buckets: a request is admitted whole or not at all, buckets refill
at their rate, and a request bigger than one second's worth still gets through on a full bucket."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from firehose.quotas import Quota, QuotasConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second() -> None:
    clock = Clock()
    quota = Quota(QuotasConfig(requests_per_sec=3), clock)
    assert [quota.admit(1, 10) for _ in range(4)] == [True, True, True, False]
    clock.now += 0.34  # one request's worth refilled
    assert [quota.admit(1, 10) for _ in range(2)] == [True, False]
    clock.now += 10  # never more than one second's worth
    assert [quota.admit(1, 10) for _ in range(4)] == [True, True, True, False]


def test_a_refused_request_takes_nothing_from_any_bucket() -> None:
    clock = Clock()
    quota = Quota(QuotasConfig(records_per_sec=1000, mib_per_sec=1, requests_per_sec=100), clock)
    assert quota.admit(900, 1000)
    assert not quota.admit(200, 1000)  # records short: the bytes and the request are not taken either
    assert quota.admit(100, (1 << 20) - 1000)  # exactly what is left of both
    assert not quota.admit(1, 1)


def test_a_request_bigger_than_a_second_goes_through_on_a_full_bucket_and_leaves_it_in_debt() -> None:
    clock = Clock()
    quota = Quota(QuotasConfig(records_per_sec=100), clock)
    assert quota.admit(500, 0)  # full bucket: admitted, 400 records of debt
    clock.now += 3.9
    assert not quota.admit(1, 0)  # still 10 short of zero
    clock.now += 0.2
    assert not quota.admit(500, 0)  # 10 tokens: not full, not enough
    assert quota.admit(10, 0)
    clock.now += 1.0
    assert quota.admit(500, 0)  # full again


def test_unset_fields_are_unlimited() -> None:
    quota = Quota(QuotasConfig(mib_per_sec=0.5), Clock())
    assert all(quota.admit(100_000, 1024) for _ in range(512))  # 512 KiB: records and requests unlimited
    assert not quota.admit(1, 1024)


@pytest.mark.parametrize("bad", [{"records_per_sec": 0}, {"mib_per_sec": -1.0}, {"requests_per_sec": 1.5},
                                 {"bytes_per_sec": 10}])
def test_invalid_quotas_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        QuotasConfig(**bad)  # type: ignore[arg-type]
