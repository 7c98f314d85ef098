"""The vectorised reader: records as NDJSON read by ``pyarrow.json``, key rewrites, reader-type
adaptation and bisection of batches it rejects."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from firehose.transforms.formats.nodes import _final_type, _Leaf, _List, _Node, _raw_decimal_scale, _Struct
from firehose.transforms.formats.timestamps import _re2_literal

# Bisection of a batch the fast reader rejects stops at chunks this small (they go to the
# per-record path), and gives up when every chunk of a level of at least this many failed, or
# when more than one chunk in 64 records failed (about 1.5 % of records bad).
_MIN_BISECT_RECORDS: Final = 32
_DENSE_LEVEL_CHUNKS: Final = 16


_CHANGED: Final = re.compile(r"Column\((/[^)]*)\) changed from (\w+) to (\w+)")
_NUMERIC_KINDS: Final = ("int", "float", "double", "decimal", "bool")


class _FastPath:
    """The vectorised reader's part of :class:`Converter` (a mixin: the converter sets these)."""

    _root: _Struct
    _openx: bool
    _fold: bool
    _dots: bool
    _detect: bool
    _lock: threading.Lock
    #: JSON paths as pyarrow's reader names them in errors (/user/id, /tags/[]) -> their nodes.
    _known_paths: dict[str, _Node]
    #: leaf path -> the reader type ("string", "int64") it takes instead of its usual one.
    _overrides: dict[str, str]
    _variant_patterns: tuple[str, str, str] | None
    _fast_schema_cache: pa.Schema | None
    _dense_streak: int
    path_stats: dict[str, int]

    # -- fast path -------------------------------------------------------------------------------

    def _fast_type(self, node: _Node) -> pa.DataType:
        if isinstance(node, _Leaf):
            override = self._overrides.get(node.path)
            if override == "string":
                return pa.string()
            if override == "int64":
                return pa.int64()
            if node.kind in ("bool", "int", "float", "double"):
                return _final_type(node)
            if node.kind == "decimal":
                return pa.decimal128(38, _raw_decimal_scale(node))
            return pa.string()
        if isinstance(node, _Struct):
            return pa.struct([pa.field(c.key, self._fast_type(c)) for c in node.fields])
        assert isinstance(node, _List)
        return pa.list_(self._fast_type(node.element))

    def _fast_schema(self) -> pa.Schema:
        with self._lock:
            if self._fast_schema_cache is None:
                self._fast_schema_cache = pa.schema(
                    [pa.field(c.key, self._fast_type(c)) for c in self._root.fields]
                )
            return self._fast_schema_cache

    def _adapt(self, node: _Node, seen_kind: str, tried: set[tuple[str, str]]) -> bool:
        """Switch a leaf's raw reader type to what the data holds, when the deserializer allows
        that JSON type (OpenX numbers as strings, epoch numbers for timestamps)."""
        if not isinstance(node, _Leaf):
            return False
        if node.kind == "timestamp":
            wanted = {"number": "int64", "string": ""}.get(seen_kind)
        elif node.kind in _NUMERIC_KINDS and self._openx:
            wanted = {"string": "string", "number": "", "boolean": ""}.get(seen_kind)
        else:
            wanted = None
        if wanted is None or (node.path, wanted) in tried:
            return False
        with self._lock:
            if self._overrides.get(node.path, "") == wanted:
                return False
            if wanted:
                self._overrides[node.path] = wanted
            else:
                self._overrides.pop(node.path, None)
            self._fast_schema_cache = None
        tried.add((node.path, wanted))
        return True

    def _variants(self, fields: Iterator[pa.Field] | pa.Schema, node: _Struct, out: set[str]) -> None:
        """Collect JSON keys that are another spelling (case, dots) of an expected key."""
        expected = {c.key: c for c in node.fields}
        for f in fields:
            child = expected.get(f.name)
            if child is None:
                folded = f.name.lower() if self._fold else f.name
                if self._dots:
                    folded = folded.replace(".", "_")
                child = expected.get(folded)
                if child is None:
                    continue
                out.add(f.name)  # and look inside it too, so one rewrite fixes every level
            typ = f.type
            while isinstance(child, _List) and pa.types.is_list(typ):
                child, typ = child.element, typ.value_type
            if isinstance(child, _Struct) and pa.types.is_struct(typ):
                self._variants((typ.field(i) for i in range(typ.num_fields)), child, out)

    def _rewrite(self, buf: Any, variants: set[str]) -> Any:
        """``buf`` with every key in ``variants`` renamed to its folded spelling.

        A string followed by a colon is always a key in valid JSON, so replacing '"Key":' by
        '"key":' renames exactly keys (at any depth, which is what folding means). Spellings this
        misses (a space before the colon, escapes) are still there when the result is re-read,
        and those records take the per-record path.
        """
        text = _text_view(buf)
        for name in sorted(variants):
            folded = name.lower() if self._fold else name
            if self._dots:
                folded = folded.replace(".", "_")
            pattern = orjson.dumps(name) + b":"
            text = pc.replace_substring(text, pattern.decode(), (orjson.dumps(folded) + b":").decode())
        offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + 2]
        return text.buffers()[2].slice(int(offsets[0]), int(offsets[1] - offsets[0]))

    def _maybe_variant(self, buf: Any) -> bool:
        """Could a key in ``buf`` need rewriting? Used when unknown fields could not be inferred.

        Counts the keys that equal an expected key once folded (any case; ``.`` for ``_`` when
        dots are converted) against the keys that are spelled exactly: a difference means some
        key needs rewriting. Keys with escapes are not compared and count as suspect.
        """
        if self._variant_patterns is None:
            keys = sorted({p.rsplit("/", 1)[1] for p in self._known_paths if not p.endswith("/[]")})

            def spelled(key: str) -> str:
                text = _re2_literal(key)
                return text.replace("_", "[._]") if self._dots else text

            folded = "(?i:" if self._fold else "(?:"
            self._variant_patterns = (
                '"' + folded + "|".join(spelled(k) for k in keys) + ')"[ \t\n\r]*:',
                '"(?:' + "|".join(_re2_literal(k) for k in keys) + ')"[ \t\n\r]*:',
                r'"(?:[^"\\]|\\.)*\\(?:[^"\\]|\\.)*"[ \t\n\r]*:',
            )
        text = _text_view(buf)
        loose, exact, escaped = (pc.count_substring_regex(text, p)[0].as_py() for p in self._variant_patterns)
        return bool(loose != exact or escaped)

    def _attempt(self, buf: Any, n: int) -> pa.Table | None:
        """Read ``n`` prepared records with pyarrow; None when they need the per-record path."""
        tried: set[tuple[str, str]] = set()
        mode = "infer" if self._detect else "ignore"
        rewrites = 0
        for _ in range(4 * len(self._known_paths) + 8):
            options = pj.ParseOptions(explicit_schema=self._fast_schema(), unexpected_field_behavior=mode)
            try:
                table = pj.read_json(
                    pa.BufferReader(buf), read_options=_read_options(len(buf)), parse_options=options
                )
            except pa.ArrowException as exc:
                match = _CHANGED.search(str(exc))
                if match is not None and match.group(1) in self._known_paths:
                    if self._adapt(self._known_paths[match.group(1)], match.group(3), tried):
                        continue
                    return None
                if mode == "infer":
                    # Possibly an unknown field whose type varies: read without inferring.
                    mode = "ignore"
                    continue
                return None
            if table.num_rows != n:
                return None  # concatenated objects (or a stray value) in some record
            if mode == "infer":
                variants: set[str] = set()
                self._variants(table.schema, self._root, variants)
                if not variants:
                    return table
                if rewrites == 2:
                    return None
                rewrites += 1
                with self._lock:
                    self.path_stats["key_rewrites"] += 1
                buf = self._rewrite(buf, variants)
                continue
            if self._detect and self._maybe_variant(buf):
                return None
            return table
        return None

    def _fast_pieces(
        self, prepared: _Prepared, rows: np.ndarray[Any, Any], slow: list[int]
    ) -> Iterator[tuple[np.ndarray[Any, Any], pa.Table]]:
        """Read the records by halving failing chunks until each failure is pinned to a few
        records (which go to ``slow``); yields (record indices, raw table) pieces."""
        level: list[np.ndarray[Any, Any]] = [rows]
        first = True
        while level:
            failed = []
            for chunk in level:
                data = prepared.buffer if first else prepared.subset(chunk)
                table = self._attempt(data, len(chunk))
                if table is None:
                    with self._lock:
                        self.path_stats["fast_failures"] += 1
                    failed.append(chunk)
                else:
                    yield chunk, table
            first = False
            if not failed:
                if self._dense_streak:
                    with self._lock:
                        self._dense_streak = 0
                return
            if (len(failed) == len(level) and len(level) >= _DENSE_LEVEL_CHUNKS) or len(failed) * 64 > len(
                rows
            ):
                # Errors everywhere: most records end on the per-record path anyway, and every
                # further level would parse the failing data once more.
                for chunk in failed:
                    slow.extend(chunk.tolist())
                with self._lock:
                    self._dense_streak += 1
                return
            level = []
            for chunk in failed:
                if len(chunk) <= _MIN_BISECT_RECORDS:
                    slow.extend(chunk.tolist())
                else:
                    half = len(chunk) // 2
                    level += [chunk[:half], chunk[half:]]


def _text_view(buf: Any) -> pa.Array:
    """A one-element large_string array over ``buf`` (bytes or a pa.Buffer), without a copy."""
    data = pa.py_buffer(buf) if isinstance(buf, bytes) else buf
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, data])


def _read_options(size: int) -> pj.ReadOptions:
    # pyarrow parses blocks in parallel; a batch smaller than a block per core (the daemon checks
    # 1 MiB processing batches) gets smaller blocks so every core takes part.
    block = min(1 << 20, max(128 << 10, -(-size // max(1, pa.cpu_count()))))
    return pj.ReadOptions(use_threads=True, block_size=block)


class _Prepared:
    """The records as NDJSON for pyarrow, and which records it must not see.

    A record goes to the per-record path unless it is one ``{...}`` line of valid UTF-8: a line
    that starts with ``null`` at a block boundary crashes pyarrow 26's JSON reader, so every line
    it gets must start with ``{``, and a record spanning lines could otherwise split that way.
    The common shape (every record ``{...}\\n``) is checked with numpy on one Arrow copy of the
    data, which then is the buffer pyarrow reads.
    """

    def __init__(self, records: list[bytes]) -> None:
        n = len(records)
        self.records = records
        self.stripped: list[bytes] | None = None
        arr = pa.array(records, pa.large_binary())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
        starts, ends = offsets[:-1], offsets[1:]
        data = arr.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
        ok = (ends - starts) >= 3
        if n and ok.all():
            ok &= (raw[starts] == ord("{")) & (raw[ends - 1] == ord("\n")) & (raw[ends - 2] == ord("}"))
        if (
            n
            and ok.all()
            and int(np.count_nonzero(raw[offsets[0] : offsets[-1]] <= 13)) == n
            and _valid_utf8(arr)
        ):
            # Fast shape: one object per record, each ending in its only newline, no CR or tab.
            self.arrow = arr
            self.ok = ok
            self.buffer: Any = data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            return
        self.arrow = None
        stripped = [r.strip(b" \t\r\n") for r in records]
        self.stripped = stripped
        lengths = np.fromiter(map(len, stripped), dtype=np.int64, count=n)
        buf = b"\n".join(stripped)
        joined = np.frombuffer(buf, dtype=np.uint8)
        ok = lengths > 0
        if len(joined):
            first_at = np.zeros(n, dtype=np.int64)
            first_at[1:] = np.cumsum(lengths[:-1] + 1)
            first = joined[np.minimum(first_at, len(joined) - 1)]
            last = joined[np.clip(first_at + lengths - 1, 0, len(joined) - 1)]
            ok &= (first == ord("{")) & (last == ord("}"))
        if int(np.count_nonzero(joined == ord("\n"))) != n - 1:
            ok &= np.fromiter((b"\n" not in r for r in stripped), dtype=bool, count=n)
        if buf.find(b"\r") >= 0:
            ok &= np.fromiter((b"\r" not in r for r in stripped), dtype=bool, count=n)
        if not _is_utf8_buffer(buf):
            ok &= np.fromiter((_is_utf8(r) for r in stripped), dtype=bool, count=n)
        if not ok.all():
            buf = b"\n".join([r for r, good in zip(stripped, ok.tolist(), strict=True) if good])
        self.ok = ok
        self.buffer = buf

    def subset(self, rows: np.ndarray[Any, Any]) -> Any:
        """NDJSON of the given (accepted) records."""
        if self.arrow is not None:
            part = self.arrow.take(pa.array(rows, pa.int64()))
            offsets = np.frombuffer(part.buffers()[1], dtype=np.int64)[
                part.offset : part.offset + len(rows) + 1
            ]
            return part.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        assert self.stripped is not None
        return b"\n".join([self.stripped[i] for i in rows.tolist()])


def _valid_utf8(arr: pa.Array) -> bool:
    try:
        arr.cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _is_utf8_buffer(buf: bytes) -> bool:
    return _valid_utf8(pa.array([buf], pa.large_binary()))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
