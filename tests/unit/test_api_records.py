"""PutRecordBatch's one-pass decoding (firehose/api_records.py) against the general way (orjson,
then pybase64 record by record with Firehose's checks): on a randomised corpus of bodies, valid
and damaged, whatever the one-pass decoder takes, the general way takes too and makes the same
stream name and the same record bytes; and it takes every valid body, so the daemon's fast way
is the one that runs. The same for the Firehose HTTP delivery requests the firehose_http source
receives."""

from __future__ import annotations

import base64
import random
from typing import Any

import orjson
import pybase64
import pytest

from firehose.api import ApiError, decode_records
from firehose.api_records import DecodedRecords, decode_batch, decode_delivery


def _general(body: bytes) -> tuple[str, list[bytes]] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("DeliveryStreamName"), str):
        return None
    records = doc.get("Records")
    if not isinstance(records, list):
        return None
    try:
        return doc["DeliveryStreamName"], decode_records(records)[0]
    except ApiError:
        return None


def _b64(rng: random.Random) -> str:
    return base64.b64encode(rng.randbytes(rng.choice([0, 1, 2, 3, 4, 5, 57, 58, 59, 1000]))).decode()


_DAMAGE = [
    lambda s, r: s.rstrip("="),  # padding left off
    lambda s, r: s + "=",  # padding too long
    lambda s, r: s[: len(s) // 2] + " " + s[len(s) // 2 :],
    lambda s, r: s + "\n",
    lambda s, r: s.replace("+", "-").replace("/", "_") + "-_",  # URL-safe alphabet
    lambda s, r: s[:1] + "=" + s[2:] if len(s) > 2 else "=",  # "=" inside
    lambda s, r: s[:-1] + "é",
    lambda s, r: s[:3],  # not whole quartets
    lambda s, r: "====",
    lambda s, r: s[:-2] + "@@" if len(s) > 2 else "@",
]


def _record(rng: random.Random, damaged: bool) -> Any:
    data: Any = _b64(rng)
    if damaged:
        kind = rng.randrange(len(_DAMAGE) + 4)
        if kind < len(_DAMAGE):
            data = _DAMAGE[kind](data, rng)
        else:
            return [{"Data": None}, {"data": data}, {"Data": 17}, "QUJD"][kind - len(_DAMAGE)]
    record: dict[str, Any] = {"Data": data}
    if damaged and rng.random() < 0.3:
        record[rng.choice(["PartitionKey", ""])] = rng.choice(["extra", [[[[1]]]]])
    return record


def _body(rng: random.Random, damaged: bool) -> bytes:
    records = [_record(rng, damaged and rng.random() < 0.3) for _ in range(rng.randint(1, 12))]
    doc: dict[str, Any] = {"DeliveryStreamName": "clicks", "Records": records}
    text = orjson.dumps(doc).decode()
    if damaged and rng.random() < 0.3:
        text = rng.choice([
            text.replace('"Data"', '"Data":"QUJD","Data"', 1),  # a repeated key: the last counts
            text.replace('"clicks"', '"cl\\u0069cks"'),  # escapes inside strings
            text.replace('"Records"', '"Records":null,"Records"', 1),
            text.replace('"clicks"', '"\\ud800"'),  # a lone surrogate
            text + " x",
            text[:-1],
            text.replace("QU", "\\u0051U", 1),
            text.replace("/", "\\/"),  # escaped slashes, as PHP's json_encode writes them
            '{"DeliveryStreamName":7,' + text[1:],
            '{"Extra":' + "[" * 5000 + "]" * 5000 + "," + text[1:],  # deeper than either parser goes
        ])
    raw = text.encode()
    if damaged and rng.random() < 0.1:  # not UTF-8: in the name, or in a member a parser skips
        raw = rng.choice([raw.replace(b"clicks", b"cl\xffcks"), raw.replace(b'"Data"', b'"X":"\xed\xa0\x80","Data"', 1)])
    return raw


@pytest.mark.parametrize("seed", range(4))
def test_one_pass_decoding_agrees_with_the_general_way(seed: int) -> None:
    rng = random.Random(seed)
    taken = valid = 0
    for n in range(1500):
        damaged = n % 2 == 1
        body = _body(rng, damaged)
        general = _general(body)
        fast = decode_batch(body)
        if fast is not None:
            taken += 1
            assert isinstance(fast["Records"], DecodedRecords)
            assert general is not None, body
            assert (fast["DeliveryStreamName"], list(fast["Records"])) == general, body
        if not damaged:
            valid += 1
            assert fast is not None, body
    assert valid == 750 and taken > valid  # damage that leaves a body valid is taken too


def test_damaged_base64_is_left_to_the_general_way() -> None:
    for data in ["QQ", "QQ=", "Q===", "QQ==QQ==", "QU JD", "QU-_", "QUJ\u00e9", "===="]:
        body = orjson.dumps({"DeliveryStreamName": "s", "Records": [{"Data": "QUJD"}, {"Data": data}]})
        assert decode_batch(body) is None, data
    body = orjson.dumps({"DeliveryStreamName": "s", "Records": [{"Data": "QQ=="}, {"Data": ""}]})
    assert decode_batch(body) == {"DeliveryStreamName": "s", "Records": [b"A", b""]}


def _general_delivery(body: bytes) -> tuple[Any, Any, list[bytes]] | None:
    """The firehose_http source's general way: what it accepts, or None where it answers 400."""
    try:
        doc = orjson.loads(body)
        return doc["requestId"], doc["timestamp"], [pybase64.b64decode(r["data"], None, True) for r in doc["records"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


@pytest.mark.parametrize("seed", range(2))
def test_one_pass_delivery_decoding_agrees_with_the_general_way(seed: int) -> None:
    rng = random.Random(seed)
    for n in range(1500):
        damaged = n % 2 == 1
        doc: dict[str, Any] = {"requestId": "r-1", "timestamp": 1_700_000_000_000,
                               "records": [{"data": r["Data"]} if isinstance(r, dict) and "Data" in r else r
                                           for r in (_record(rng, damaged and rng.random() < 0.3)
                                                     for _ in range(rng.randint(0, 12)))]}
        if damaged and rng.random() < 0.3:
            doc[rng.choice(["requestId", "timestamp", "records"])] = rng.choice([None, 7, 1.5, True, "x", []])
        if damaged and rng.random() < 0.1:
            doc["extra"] = 1
        body = orjson.dumps(doc)
        fast, general = decode_delivery(body), _general_delivery(body)
        if fast is not None:
            assert fast == general, body
        elif not damaged:
            raise AssertionError(f"a valid delivery request not taken: {body[:200]!r}")
