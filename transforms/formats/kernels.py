"""Conversion kernels: raw Arrow arrays (what the JSON reader produced) -> final arrays."""

from __future__ import annotations

import base64
import binascii
import decimal
import re
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from firehose.transforms.formats.arrays import (
    _MASK,
    _Errs,
    _messages,
    _np_bool,
    _np_int,
    _null_where,
    _show,
    _valid,
)
from firehose.transforms.formats.nodes import (
    _final_type,
    _Leaf,
    _List,
    _MapN,
    _Node,
    _plain,
    _raw_decimal_scale,
    _slow_type,
    _Struct,
)
from firehose.transforms.formats.timestamps import _DATE, _US_PER_DAY, _layout, _parse_instants, _TsSpec

_INT_TEXT: Final = r"^-?[0-9]{1,18}$|^0[xX][0-9a-fA-F]{1,15}$"  # always castable to int64
_FLOAT_TEXT: Final = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_DECIMAL_TEXT: Final = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


_Converted: TypeAlias = tuple[pa.Array, _Errs]


class _Kernels:
    """Converts raw arrays to final arrays for one compiled schema and deserializer."""

    def __init__(self, timestamp_specs: Sequence[_TsSpec], timestamp_hint: str) -> None:
        self.timestamp_specs = tuple(timestamp_specs)
        self.timestamp_hint = timestamp_hint

    # -- nested --------------------------------------------------------------------------------

    def convert(self, node: _Node, arr: pa.Array, fast: bool) -> _Converted:
        if isinstance(node, _Leaf):
            out, errs = self.leaf(node, arr)
        elif isinstance(node, _Struct):
            out, errs = self.struct(node, arr, fast)
        elif isinstance(node, _List):
            out, errs = self.list_(node, arr, fast)
        else:
            assert isinstance(node, _MapN)
            out, errs = self.map_(node, arr, fast)
        return out, errs

    def children(
        self, node: _Struct, arrays: Sequence[pa.Array], names: Sequence[str], fast: bool
    ) -> tuple[list[pa.Array], _Errs]:
        errs = _Errs()
        index = {name: i for i, name in enumerate(names)}
        length = len(arrays[0]) if arrays else 0
        out: list[pa.Array] = []
        for child in node.fields:
            at = index.get(child.key if fast else child.name)
            raw = arrays[at] if at is not None else pa.nulls(length, _slow_type(child))
            if _plain(child) and raw.type == _final_type(child):
                out.append(raw)
                continue
            converted, child_errs = self.convert(child, raw, fast)
            errs.extend(child_errs)
            out.append(converted)
        return out, errs

    def required(self, node: _Struct, parent_valid: _MASK, children: Sequence[pa.Array], errs: _Errs) -> None:
        for child, arr in zip(node.fields, children, strict=True):
            if not child.nullable and arr.null_count:
                rows = np.flatnonzero(parent_valid & ~_valid(arr))
                errs.add(rows, [f"required field '{child.path}' is missing or null"] * len(rows))

    def struct(self, node: _Struct, arr: pa.Array, fast: bool) -> _Converted:
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        arrays = [arr.field(i) for i in range(arr.type.num_fields)]
        children, errs = self.children(node, arrays, names, fast)
        valid = _valid(arr)
        self.required(node, valid, children, errs)
        mask = None if arr.null_count == 0 else pa.array(~valid)
        fields = [pa.field(c.name, _final_type(c), nullable=c.nullable) for c in node.fields]
        return pa.StructArray.from_arrays(children, fields=fields, mask=mask), errs

    @staticmethod
    def _list_parts(arr: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray[Any, Any]]:
        offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        start, end = int(offsets[0]), int(offsets[-1])
        values = arr.values.slice(start, end - start)
        offsets = offsets - start
        parents = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
        return pa.array(offsets.astype(np.int32), pa.int32()), values, parents

    def list_(self, node: _List, arr: pa.Array, fast: bool) -> _Converted:
        offsets, values, parents = self._list_parts(arr)
        item = node.element
        converted, item_errs = self.convert(item, values, fast)
        errs = _Errs()
        errs.extend(item_errs, parents)
        if not item.nullable and converted.null_count:
            rows = np.unique(parents[~_valid(converted)])
            errs.add(rows, [f"'{item.path}' holds a null item, which the schema does not allow"] * len(rows))
        mask = None if arr.null_count == 0 else arr.is_null()
        out = pa.ListArray.from_arrays(offsets, converted, type=_final_type(node), mask=mask)
        return out, errs

    def map_(self, node: _MapN, arr: pa.Array, fast: bool) -> _Converted:
        offsets, entries, parents = self._list_parts(arr)
        keys, key_errs = self.convert(node.keys, entries.field("k"), fast)
        items, item_errs = self.convert(node.values, entries.field("v"), fast)
        errs = _Errs()
        errs.extend(key_errs, parents)
        errs.extend(item_errs, parents)
        if not node.values.nullable and items.null_count:
            rows = np.unique(parents[~_valid(items)])
            errs.add(
                rows,
                [f"'{node.values.path}' holds a null value, which the schema does not allow"] * len(rows),
            )
        if keys.null_count:
            # Only rows already failed have null keys; a map cannot hold them, so fill any value.
            keys = keys.fill_null(pa.scalar(_placeholder(node.keys), _final_type(node.keys)))
        mask = None if arr.null_count == 0 else arr.is_null()
        out = pa.MapArray.from_arrays(offsets, keys, items, type=_final_type(node), mask=mask)
        return out, errs

    # -- leaves --------------------------------------------------------------------------------

    def leaf(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        kind = node.kind
        typ = arr.type
        if kind == "string":
            out = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
            if node.length is not None:
                out = pc.utf8_slice_codeunits(out, 0, node.length)
            if node.symbols is not None:
                bad = _valid(out) & ~_np_bool(pc.is_in(out, value_set=pa.array(node.symbols, pa.string())))
                rows = np.flatnonzero(bad)
                errs.add(
                    rows,
                    _messages(out, rows, f"column '{node.path}': {{value}} is not one of the enum symbols"),
                )
                out = _null_where(out, bad)
            return out, errs
        if kind == "bool":
            if pa.types.is_boolean(typ):
                return arr, errs
            low = pc.utf8_lower(arr)
            true, false = _np_bool(pc.equal(low, "true")), _np_bool(pc.equal(low, "false"))
            bad = _valid(arr) & ~(true | false)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not a boolean"))
            return pa.array(true, pa.bool_(), mask=~(true | false)), errs
        if kind == "int":
            return self.integer(node, arr)
        if kind in ("float", "double"):
            target = pa.float32() if kind == "float" else pa.float64()
            if pa.types.is_floating(typ) or pa.types.is_integer(typ):
                return (arr if typ == target else pc.cast(arr, target)), errs
            out, bad = _cast_isolating(arr, target, _FLOAT_TEXT)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not a number"))
            return out, errs
        if kind == "decimal":
            return self.decimal(node, arr)
        if kind == "binary":
            return self.binary(node, arr)
        if kind == "date":
            texts = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
            us, ok = _layout(texts, _DATE)
            bad = _valid(texts) & ~ok
            rows = np.flatnonzero(bad)
            errs.add(
                rows, _messages(texts, rows, f"column '{node.path}': {{value}} is not a date (yyyy-MM-dd)")
            )
            days = (us // _US_PER_DAY).astype(np.int32)
            return pa.array(days, pa.date32(), mask=~ok), errs
        assert kind == "timestamp"
        texts = arr if pa.types.is_string(typ) else pc.cast(arr, pa.string())
        us, bad = _parse_instants(texts, self.timestamp_specs)
        rows = np.flatnonzero(bad)
        errs.add(
            rows,
            _messages(
                texts,
                rows,
                f"column '{node.path}': cannot parse {{value}} as a timestamp ({self.timestamp_hint})",
            ),
        )
        values = us if node.unit == "us" else np.floor_divide(us, 1000)
        return pa.array(values, pa.timestamp(node.unit), mask=~_valid(texts) | bad), errs

    def integer(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        target = _final_type(node)
        typ = arr.type
        if typ == target:
            return arr, errs
        if pa.types.is_integer(typ):
            values, bad = arr, np.zeros(len(arr), dtype=bool)
        else:
            values, bad = _cast_isolating(arr, pa.int64(), _INT_TEXT)
            rows = np.flatnonzero(bad)
            errs.add(rows, _messages(arr, rows, f"column '{node.path}': {{value}} is not an integer"))
        if node.bits < 64:
            lo, hi = -(2 ** (node.bits - 1)), 2 ** (node.bits - 1) - 1
            ints = _np_int(values, 0)
            over = _valid(values) & ((ints < lo) | (ints > hi))
            rows = np.flatnonzero(over)
            name = {8: "tinyint", 16: "smallint", 32: "int"}[node.bits]
            errs.add(
                rows, _messages(values, rows, f"column '{node.path}': {{value}} is out of range for {name}")
            )
            bad = bad | over
            values = pa.array(np.where(over, 0, ints), pa.int64(), mask=~_valid(values) | over)
        return pc.cast(values, target), errs

    def decimal(self, node: _Leaf, arr: pa.Array) -> _Converted:
        errs = _Errs()
        raw_scale = _raw_decimal_scale(node)
        wide = pa.decimal128(38, raw_scale)
        target = _final_type(node)
        if pa.types.is_decimal(arr.type):
            exact: pa.Array | None = arr if arr.type == wide else pc.cast(arr, wide)
        else:
            try:
                exact = pc.cast(arr, wide)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                exact = None
        if exact is None:
            # Some text has more digits than decimal128(38, S) holds: Python's decimal does the
            # same exact rounding for the whole array (rare: over-precise input).
            values: list[decimal.Decimal | None] = []
            bad_rows: list[int] = []
            reasons: list[str] = []
            for i, text in enumerate(arr.to_pylist()):
                value, reason = _py_decimal(text, node)
                values.append(value)
                if reason:
                    bad_rows.append(i)
                    reasons.append(f"column '{node.path}': {reason}")
            errs.add(np.array(bad_rows, dtype=np.int64), reasons)
            return pa.array(values, target), errs
        if raw_scale > node.scale:
            exact = pc.round(exact, ndigits=node.scale, round_mode="half_towards_infinity")
        limit = pa.scalar(decimal.Decimal(10) ** (node.precision - node.scale), wide)
        over = _np_bool(pc.greater_equal(pc.abs(exact), limit))
        rows = np.flatnonzero(over)
        shown = arr if not pa.types.is_decimal(arr.type) else None
        if shown is None and len(rows):
            # Show the number as written rather than padded to the reading scale.
            shown = pa.array([format(d.normalize(), "f") for d in arr.take(pa.array(rows)).to_pylist()])
            rows_shown = np.arange(len(rows))
        else:
            rows_shown = rows
        text = f"column '{node.path}': {{value}} does not fit decimal({node.precision},{node.scale})"
        errs.add(rows, _messages(shown, rows_shown, text) if len(rows) else [])
        if len(rows):
            exact = _null_where(exact, over)
        return pc.cast(exact, target), errs

    def binary(self, node: _Leaf, arr: pa.Array) -> _Converted:
        # base64 has no Arrow kernel; decoding per value is the one per-value loop on the fast path.
        errs = _Errs()
        out: list[bytes | None] = []
        bad_rows: list[int] = []
        reasons: list[str] = []
        for i, text in enumerate(arr.to_pylist()):
            if text is None:
                out.append(None)
                continue
            try:
                if not isinstance(text, str):
                    raise binascii.Error("not a string")
                value = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                out.append(None)
                bad_rows.append(i)
                reasons.append(f"column '{node.path}': {_show(text)} is not valid base64")
                continue
            if node.fixed_size is not None and len(value) != node.fixed_size:
                out.append(None)
                bad_rows.append(i)
                reasons.append(
                    f"column '{node.path}': {len(value)} bytes, but the fixed type holds {node.fixed_size}"
                )
                continue
            out.append(value)
        errs.add(np.array(bad_rows, dtype=np.int64), reasons)
        return pa.array(out, pa.binary()), errs


def _placeholder(node: _Leaf) -> Any:
    return {"bool": False, "string": "", "binary": b"", "date": 0, "timestamp": 0}.get(node.kind, 0)


def _cast_isolating(arr: pa.Array, target: pa.DataType, gate: str) -> tuple[pa.Array, _MASK]:
    """Cast text to ``target`` with Arrow's parser; on failure find exactly which values fail.

    Values matching ``gate`` always cast; the others are tried one by one (only on this error
    path), so the result is what a whole-array cast gives wherever that cast would succeed.
    """
    try:
        return pc.cast(arr, target), np.zeros(len(arr), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    valid = _valid(arr)
    gated = _np_bool(pc.match_substring_regex(arr, gate)) & valid
    try:
        base = pc.cast(_null_where(arr, ~gated), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        base = pa.nulls(len(arr), target)
        gated = np.zeros(len(arr), dtype=bool)
    values = base.to_pylist()
    bad = np.zeros(len(arr), dtype=bool)
    for i in np.flatnonzero(valid & ~gated).tolist():
        try:
            values[i] = pc.cast(arr.slice(i, 1), target)[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad[i] = True
            values[i] = None
    return pa.array(values, target), bad


def _py_decimal(text: Any, node: _Leaf) -> tuple[decimal.Decimal | None, str]:
    """Exact decimal parsing and HALF_UP rounding, equal to the Arrow path where both apply."""
    if text is None:
        return None, ""
    if not isinstance(text, str) or not _DECIMAL_TEXT.match(text):
        return None, f"{_show(text)} is not a decimal number"
    context = decimal.Context(prec=200, rounding=decimal.ROUND_HALF_UP, Emax=10_000, Emin=-10_000)
    try:
        value = decimal.Decimal(text)
        quantum = decimal.Decimal(1).scaleb(-node.scale)
        if value.adjusted() >= node.precision - node.scale + 1:
            raise decimal.InvalidOperation
        rounded = value.quantize(quantum, context=context)
    except decimal.DecimalException:
        return None, f"{_show(text)} does not fit decimal({node.precision},{node.scale})"
    if abs(rounded) >= decimal.Decimal(10) ** (node.precision - node.scale):
        return None, f"{_show(text)} does not fit decimal({node.precision},{node.scale})"
    return rounded, ""
