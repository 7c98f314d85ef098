"""The per-record path: parse each record in Python and normalise it to canonical JSON whose keys
are the output names and whose scalars are text, for the same kernels to convert."""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from firehose.transforms.formats.arrays import _show
from firehose.transforms.formats.errors import MALFORMED_DATA, PARSE_ERROR
from firehose.transforms.formats.nodes import _Leaf, _List, _MapN, _Node, _Struct


class _Num(str):
    """A JSON number kept as its source text: decimals stay exact and OpenX's text rules apply."""

    __slots__ = ()


class _RecordError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# pyarrow's reader (rapidjson) accepts NaN, -NaN, Inf, -Inf, Infinity and -Infinity as numbers;
# the per-record path accepts the same, so a record's fate never depends on which path read it.
_EXACT_DECODER: Final = json.JSONDecoder(parse_int=_Num, parse_float=_Num, parse_constant=_Num)
_PLAIN_DECODER: Final = json.JSONDecoder(parse_constant=_Num)
_NON_FINITE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|(-?)(NaN|Infinity|Inf)(?![A-Za-z0-9_])')


def _spell_non_finite(match: re.Match[str]) -> str:
    if match.group(2) is None:
        return match.group(0)  # a string: left alone
    return "NaN" if match.group(2) == "NaN" else match.group(1) + "Infinity"


_JSON_WS: Final = re.compile(r"[ \t\n\r]*")  # RFC 8259 whitespace, nothing Unicode-wide
_MISSING: Final = object()


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (_Num, int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array"


def _parse_documents(data: bytes, exact: bool) -> list[dict[str, Any]]:
    """The JSON objects in one record (several may be concatenated, as Firehose allows).

    ``exact`` keeps numbers as :class:`_Num` text (needed for decimal columns); otherwise orjson
    parses single-document records and ints/floats are rendered back to text by the normaliser.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, which Jackson (Firehose's parser) skips
    docs: list[Any] = []
    parsed = False
    if not exact:
        try:
            docs = [orjson.loads(data)]
            parsed = True
        except orjson.JSONDecodeError:
            pass  # concatenated objects, or an error the slower decoder describes
    if not parsed:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _RecordError(
                PARSE_ERROR, f"Encountered malformed JSON: invalid UTF-8 at byte {exc.start}"
            ) from None
        try:
            docs = _decode_all(text, exact)
        except ValueError as exc:
            if "NaN" not in text and "Inf" not in text:
                raise _RecordError(PARSE_ERROR, f"Encountered malformed JSON: {exc}") from None
            try:
                docs = _decode_all(_NON_FINITE.sub(_spell_non_finite, text), exact)
            except ValueError:
                raise _RecordError(PARSE_ERROR, f"Encountered malformed JSON: {exc}") from None
        except RecursionError:
            raise _RecordError(PARSE_ERROR, "Encountered malformed JSON: nesting too deep") from None
        if not docs:
            raise _RecordError(
                MALFORMED_DATA, "The record is empty or holds only whitespace; expected a JSON object"
            )
    for doc in docs:
        if isinstance(doc, list):
            raise _RecordError(
                MALFORMED_DATA,
                "A JSON array is not a valid record; send JSON objects (several may be concatenated)",
            )
        if not isinstance(doc, dict):
            raise _RecordError(MALFORMED_DATA, f"The record holds a JSON {_json_kind(doc)}, not an object")
    return docs


def _decode_all(text: str, exact: bool) -> list[Any]:
    decoder = _EXACT_DECODER if exact else _PLAIN_DECODER
    docs = []
    pos = _JSON_WS.match(text).end()  # type: ignore[union-attr]
    while pos < len(text):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    return docs


class _ValueMismatch(Exception):
    pass


class _Normaliser:
    """Maps a parsed JSON object onto the schema following the deserializer's rules.

    Output: nested dicts keyed by output names, lists, ``{"k", "v"}`` entries for maps, and text
    for every scalar, ready for ``orjson.dumps`` and the slow-type reader.
    """

    def __init__(self, openx: bool, fold: bool, dots: bool) -> None:
        self.openx = openx
        self.fold = fold
        self.dots = dots
        # OpenX lower-cases every key it parses, map keys included; the Hive SerDe only matches
        # column names case-insensitively.
        self.fold_map_keys = openx and fold

    def struct(self, node: _Struct, obj: dict[str, Any]) -> dict[str, Any]:
        view = {k.lower(): v for k, v in obj.items()} if self.fold else obj
        dotted: dict[str, Any] | None = None
        out: dict[str, Any] = {}
        for child in node.fields:
            value = view.get(child.key, _MISSING)
            if value is _MISSING and self.dots:
                if dotted is None:
                    dotted = {
                        (k.lower() if self.fold else k).replace(".", "_"): v
                        for k, v in obj.items()
                        if "." in k
                    }
                value = dotted.get(child.key, _MISSING)
            if value is _MISSING or value is None:
                continue
            result = self.value(child, value)
            if result is not None:
                out[child.name] = result
        return out

    def value(self, node: _Node, value: Any) -> Any:
        if isinstance(node, _Leaf):
            return self.leaf(node, value)
        if isinstance(node, _Struct):
            if isinstance(value, dict):
                return self.struct(node, value)
            if self.openx and isinstance(value, list) and not value:
                return None  # OpenX reads [] where an object is expected as null (its issue #113)
            raise self.mismatch(node, "a JSON object", value)
        if isinstance(node, _List):
            if not isinstance(value, list):
                raise self.mismatch(node, "a JSON array", value)
            return [None if v is None else self.value(node.element, v) for v in value]
        assert isinstance(node, _MapN)
        if not isinstance(value, dict):
            raise self.mismatch(node, "a JSON object", value)
        items: dict[str, Any] = {}
        for k, v in value.items():
            items[k.lower() if self.fold_map_keys else k] = v
        return [{"k": k, "v": None if v is None else self.value(node.values, v)} for k, v in items.items()]

    def leaf(self, node: _Leaf, value: Any) -> str:
        kind = _json_kind(value)
        if kind == "number":
            text = (
                value
                if isinstance(value, str)
                else str(value)
                if isinstance(value, int)
                else orjson.dumps(value).decode()
            )
        else:
            text = ""
        target = node.kind
        if target == "string":
            if kind == "string":
                return str(value)
            if kind == "number":
                return str(text)
            if kind == "boolean":
                return "true" if value else "false"
            if self.openx:
                return self.json_text(value)  # OpenX hands nested JSON to string columns as text
            raise self.mismatch(
                node, "a string (the Hive JSON SerDe does not turn nested JSON into text)", value
            )
        if target == "bool":
            if kind == "boolean":
                return "true" if value else "false"
            if kind == "string" and self.openx:
                return str(value)
            raise self.mismatch(node, "a boolean", value)
        if target in ("int", "float", "double", "decimal"):
            if kind == "number":
                return str(text)
            if kind == "string":
                if self.openx:
                    return str(value)
                raise self.mismatch(
                    node, "a number (the Hive JSON SerDe does not read numbers from strings)", value
                )
            raise self.mismatch(node, "a number", value)
        if target == "timestamp":
            if kind in ("number", "string"):
                return str(text) if kind == "number" else str(value)
            raise self.mismatch(node, "a timestamp string or number", value)
        if kind == "string":  # date, binary
            return str(value)
        raise self.mismatch(node, "a string", value)

    def json_text(self, value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, _Num):
            return str.__str__(value)
        if isinstance(value, int):
            return str(value)
        if isinstance(value, (float, str)):
            return orjson.dumps(value).decode()
        if isinstance(value, dict):
            parts = (
                orjson.dumps(k.lower() if self.fold else k).decode() + ":" + self.json_text(v)
                for k, v in value.items()
            )
            return "{" + ",".join(parts) + "}"
        return "[" + ",".join(self.json_text(v) for v in value) + "]"

    @staticmethod
    def mismatch(node: _Node, expected: str, value: Any) -> _ValueMismatch:
        shown = value if not isinstance(value, (dict, list)) else json.dumps(value)
        return _ValueMismatch(
            f"column '{node.path}': expected {expected}, got JSON {_json_kind(value)} {_show(shown)}"
        )
