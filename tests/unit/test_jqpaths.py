"""Path-only metadata-extraction queries looked up directly agree with libjq, record by record:
the same partition keys, or the same failure with the same message, on a randomised corpus of
records (objects, nesting, null, arrays, scalars at the top, number spellings jq and orjson read
differently, keys around the length where jq cuts them in messages) and of queries."""

from __future__ import annotations

import random

import orjson
import pytest

from firehose.records import Outcome
from firehose.transforms.jqpaths import compile_paths
from firehose.transforms.processors import METADATA_EXTRACTION_FAILED, _ExtractionError, _run_query

KEYS = ["a", "b", "customer", "id", "device", "x_1", "k" * 24, "k" * 27, "k" * 28, "long_key_" * 4]


@pytest.mark.parametrize(("query", "paths"), [
    ("{customer_id: .customer.id, device: .device}", (("customer_id", ("customer", "id")), ("device", ("device",)))),
    ('{ "a b" : ."x y" . z , c }', (("a b", ("x y", "z")), ("c", ("c",)))),
    ('{k: .["a"]["b"].c}', (("k", ("a", "b", "c")),)),
])
def test_path_only_queries_compile_to_lookups(query: str, paths: object) -> None:
    assert compile_paths(query) == paths


@pytest.mark.parametrize("query", [
    "{a: .x | tostring}", '{a: .x // "none"}', "{a: .x?}", "{a: .x[0]}", "{a: .}", "{(.k): .v}", "{a: [.x]}",
    '{a: "static"}', "{if: .x}", "{a: .and}", "{a: .x, b: (.y)}", ".x", "{}", '{a: ."es\\"c"}', "{$__loc__}",
    "{a: .x} | .a",
])
def test_anything_else_stays_with_libjq(query: str) -> None:
    assert compile_paths(query) is None


def _number(rng: random.Random) -> str:
    return rng.choice(["0", "-0", "1", "-7", "1e2", "1.0", "2.5", "0.1", "1E-3", "9007199254740993",
                       "123456789012345678901", "1.5e300", "-12.75e1", str(rng.randint(-10**6, 10**6)),
                       repr(rng.uniform(-1e6, 1e6))])


def _value(rng: random.Random, depth: int) -> str:
    kind = rng.random()
    if depth < 3 and kind < 0.35:
        members = [f'"{rng.choice(KEYS)}": {_value(rng, depth + 1)}' for _ in range(rng.randint(0, 4))]
        return "{" + ", ".join(members) + "}"
    if depth < 3 and kind < 0.42:
        return "[" + ", ".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if kind < 0.62:
        return _number(rng)
    if kind < 0.82:
        return orjson.dumps(rng.choice(["s", "", "ünï", "a\\nb", "tab\t", "x" * 40])).decode()
    return rng.choice(["true", "false", "null"])


def _with_paths(rng: random.Random, paths: list[tuple[str, ...]]) -> str:
    doc: dict[str, object] = {}
    for steps in paths:
        cur = doc
        for step in steps[:-1]:
            nxt = cur.get(step)
            if not isinstance(nxt, dict):
                nxt = cur[step] = {}
            cur = nxt
        cur[steps[-1]] = rng.choice([1, -3, 2.5, 1e20, "v", "ünï", True, False, None, [1], {"z": 1}, 2**64, 7.0])
    return _json(doc)


def _json(v: object) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{orjson.dumps(k).decode()}: {_json(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_json(x) for x in v) + "]"
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else orjson.dumps(v).decode()


def _query(rng: random.Random) -> str:
    entries = []
    for n in range(rng.randint(1, 3)):
        steps = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(KEYS)
            steps.append(rng.choice([f".{key}", f'."{key}"', f'.["{key}"]']))
        if rng.random() < 0.15:
            entries.append(rng.choice(KEYS))  # shorthand {key}
        else:
            entries.append(f"k{n}: " + "".join(steps))
    return "{" + ", ".join(entries) + "}"


def _path_query(rng: random.Random) -> tuple[str, object, list[tuple[str, ...]]]:
    """A random path-only query, libjq's program for it, and the paths it looks up."""
    from firehose.transforms.config import compile_query

    query = _query(rng)
    paths = compile_paths(query)
    assert paths is not None, query
    return query, compile_query(query), [steps for _, steps in paths]


def _libjq(program: object, data: bytes) -> tuple[str, object]:
    """What the libjq path makes of a record: its keys, or its failure message."""
    try:
        return "ok", _run_query(program, data)
    except _ExtractionError as exc:
        return "failed", str(exc)


def test_lookups_agree_with_libjq_on_a_randomised_corpus() -> None:
    from firehose.transforms.processors import metadata_extraction

    rng = random.Random(20261206)
    compared = failed = 0
    for _ in range(300):
        query, program, paths = _path_query(rng)
        records = []
        for _ in range(30):
            roll = rng.random()
            if roll < 0.2:
                text = _value(rng, 0)  # anything at the top: scalars and arrays fail
            elif roll < 0.5:
                text = "{" + ", ".join(f'"{rng.choice(KEYS)}": {_value(rng, 1)}' for _ in range(rng.randint(0, 6))) + "}"
            else:  # the queried paths present, ending in a random scalar (or, at times, not)
                text = _with_paths(rng, paths)
            records.append(text.encode())
        outcomes = metadata_extraction([Outcome(i, r) for i, r in enumerate(records)], query)
        for record, o in zip(records, outcomes, strict=True):
            want = _libjq(program, record)
            got = ("ok", o.query_keys) if o.result == "Ok" else ("failed", o.error_message)
            assert got == want, (query, record)
            if o.result != "Ok":
                assert o.error_code == METADATA_EXTRACTION_FAILED
                failed += 1
            compared += 1
    assert compared == 9000 and 2000 < failed < 7000  # both outcomes well represented


@pytest.mark.parametrize("query", ["{id: .c.id}", "{id: (.c.id)}"])  # the lookup, and libjq
def test_a_number_past_64_bits_is_a_key_not_a_crash(query: str) -> None:
    from firehose.transforms.processors import metadata_extraction

    records = [b'{"c": {"id": 1.5e300}}', b'{"c": {"id": 123456789012345678901}}', b'{"c": {"id": 1e2}}']
    outcomes = metadata_extraction([Outcome(i, r) for i, r in enumerate(records)], query)
    assert [o.query_keys for o in outcomes] == [{"id": "1.5e+300"}, {"id": "1.2345678901234568e+20"}, {"id": "100"}]


def test_plain_string_keys_taken_directly_agree_with_libjq() -> None:
    """Inline extraction takes a record's keys directly when the query picks fields and every
    value is a string (``query_keys``), and sends every other record through
    ``metadata_extraction``: the metadata it records for each record is libjq's answer either way,
    on a corpus where most records take the direct way (string values, escapes, duplicate keys)."""
    from firehose.records import ErrorInfo
    from firehose.stages.inline import extract_frame
    from firehose.transforms.processors import query_keys

    rng = random.Random(61206)
    strings = ["v", "", "ünï", "a\\nb", "\\u00e9t\\u00e9", "x" * 40, "\\ud83d\\ude00", "1", "null"]
    direct = compared = 0
    for _ in range(200):
        query, program, paths = _path_query(rng)
        records = []
        for _ in range(40):
            roll = rng.random()
            if roll < 0.6:  # the paths present, ending in strings (written with escapes at times)
                text = _with_paths(rng, paths)
                text = text.replace('"v"', f'"{rng.choice(strings)}"')
                for value in ("1", "-3", "2.5", "true", "false", "null", "[1]", '{"z": 1}', "7.0"):
                    if rng.random() < 0.8:
                        text = text.replace(f": {value}", f': "{rng.choice(strings)}"')
            elif roll < 0.7:  # a duplicate key: the last value counts, as in jq
                text = _with_paths(rng, paths[:1])
                text = text[:-1] + ', ' + text[1:] if text.startswith("{") and len(text) > 2 else text
            elif roll < 0.85:
                text = _value(rng, 0)
            else:  # not one JSON document, or not an object, or not UTF-8
                records.append(rng.choice([b'{"a": "x"} {"a": "y"}', b'"just a string"', b"{", b"", b'{"a": "\xff"}',
                                           b'{"a": "x"}\n']))
                continue
            records.append(text.encode())
        plain = query_keys(records, query)  # None: a query naming a key twice is left to libjq
        direct += sum(k is not None for k in plain or ())
        extracted = extract_frame(query, records, None, 5, 6)
        metas, failed = extracted.expand(), extracted.failed
        assert extracted.extracted == len(records)
        for record, meta in zip(records, metas, strict=True):
            kind, want = _libjq(program, record)
            if kind == "ok":
                assert meta == {"pk": {f"partitionKeyFromQuery:{k}": v for k, v in want.items()}}, (query, record)
            else:
                assert ErrorInfo.decode(meta["err"]).message == want, (query, record)
            compared += 1
        assert failed == sum("err" in m for m in metas)
    assert compared == 8000 and 2000 < direct < 6000  # most records, not all, took the direct way
