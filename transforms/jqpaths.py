"""Path-only metadata-extraction queries, evaluated without libjq.

Most dynamic-partitioning queries only pick fields: ``{customer_id: .customer.id, device:
.device}``. libjq evaluates them at 17-41k records/s while holding the GIL; a direct lookup on the
record orjson already parsed (to check it is one JSON document) costs a few dictionary reads.
:func:`compile_paths` recognises such a query and returns its lookups; every other query
(functions, pipes, conditionals, ``//``, ``?``, array indexes, ...) returns None and stays with
libjq.

What a path-only query does, exactly as libjq does it (tests/unit/test_jqpaths.py compares the
two on a randomised corpus of records and queries):

* ``.a`` on an object is its member ``a`` or null; on null it is null; on anything else it is
  the error ``Cannot index <type> with string ("a")`` (a key longer than 27 characters cut to
  24 and ``...``);
* the entries are evaluated in order and the first error is the query's;
* numbers come back as the Python jq binding returns them: through a double, integral values as
  ``int`` (``1e2`` -> ``100``, 2^53 + 1 -> 2^53).

Accepted: ``{key: path, ...}`` and ``{key}`` (``{key: .key}``), keys as identifiers or as plain
double-quoted ASCII strings; paths of ``.ident``, ``."str"``, ``.["str"]`` and ``["str"]`` steps.
jq's keywords are left to libjq.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_STRING = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'  # printable ASCII without '"' and '\': no escapes to mimic
_STEP = re.compile(rf"\s*(?:\.\s*({_IDENT})|\.\s*({_STRING})|\.?\s*\[\s*({_STRING})\s*\])")
_KEY = re.compile(rf"\s*(?:({_IDENT})|({_STRING}))\s*")
_KEYWORDS = frozenset({"def", "if", "then", "elif", "else", "end", "as", "reduce", "foreach", "try", "catch",
                       "label", "import", "include", "and", "or", "not", "__loc__"})

Paths = tuple[tuple[str, tuple[str, ...]], ...]


@functools.lru_cache(maxsize=256)
def compile_paths(query: str) -> Paths | None:
    """The query's ``(key, path)`` lookups when it is path-only, else None (use libjq)."""
    text = query.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    body, pos, out = text[1:-1], 0, []
    while True:
        m = _KEY.match(body, pos)
        if m is None:
            return None
        ident, quoted = m.group(1), m.group(2)
        if ident in _KEYWORDS:
            return None
        name = ident if ident is not None else quoted[1:-1]
        pos = m.end()
        if body.startswith(":", pos):
            steps, pos = _path(body, pos + 1)
            if steps is None:
                return None
        elif ident is not None:  # {a}: shorthand for {a: .a}
            steps = (ident,)
        else:
            return None
        out.append((name, steps))
        pos = _skip(body, pos)
        if pos == len(body):
            return tuple(out) if out else None
        if not body.startswith(",", pos):
            return None
        pos += 1


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _path(body: str, pos: int) -> tuple[tuple[str, ...] | None, int]:
    pos = _skip(body, pos)
    if not body.startswith(".", pos):
        return None, pos
    steps: list[str] = []
    while True:
        m = _STEP.match(body, pos)
        if m is None or (not steps and not body[_skip(body, pos):].startswith(".")):
            break
        ident, quoted, bracket = m.groups()
        if ident in _KEYWORDS:
            return None, pos
        steps.append(ident if ident is not None else (quoted or bracket)[1:-1])
        pos = m.end()
    return (tuple(steps) if steps else None), pos


def evaluate(paths: Paths, doc: Any) -> dict[str, Any]:
    """The object the query makes from ``doc`` (a parsed JSON value), as libjq would return it;
    ValueError with libjq's message when a step indexes something that is not an object."""
    out: dict[str, Any] = {}
    for name, steps in paths:
        cur = doc
        for step in steps:
            if cur is None:
                continue
            if not isinstance(cur, dict):
                raise ValueError(f"Cannot index {_jq_type(cur)} with string ({_dump(step)})")
            cur = cur.get(step)
        out[name] = _as_jq_returns(cur)
    return out


def _jq_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _dump(key: str) -> str:
    """A key as jq prints it in an error (plain ASCII here): quoted, cut to 24 characters and
    ``...`` when longer than 27."""
    return f'"{key}"' if len(key) <= 27 else f'"{key[:24]}..."'



def _as_jq_returns(v: Any) -> Any:
    """A scalar as the jq binding returns it: numbers go through a double; integral ones are ints."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return v
    d = float(v)
    return int(d) if math.isfinite(d) and d.is_integer() else d
