"""The compiled schema: a tree of nodes, each knowing its JSON key, Arrow type and raw (reader) type."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(eq=False)
class _Node:
    name: str  # output (Arrow/Avro) field name
    key: str  # the JSON key read for it: folded (lower-cased) and mapped as the deserializer says
    path: str  # for messages: user.items[].sku
    nullable: bool


@dataclass(eq=False)
class _Leaf(_Node):
    kind: str  # bool int float double decimal string binary date timestamp
    bits: int = 64
    precision: int = 0
    scale: int = 0
    length: int | None = None  # char/varchar: values are truncated to this many characters
    unit: str = "ms"  # timestamp unit (Avro timestamp-micros gives "us")
    symbols: tuple[str, ...] | None = None  # Avro enum: the allowed strings
    fixed_size: int | None = None  # Avro fixed: the exact byte length


@dataclass(eq=False)
class _Struct(_Node):
    fields: list[_Node] = field(default_factory=list)


@dataclass(eq=False)
class _List(_Node):
    item: _Node | None = None

    @property
    def element(self) -> _Node:
        assert self.item is not None
        return self.item


@dataclass(eq=False)
class _MapN(_Node):
    key_leaf: _Leaf | None = None
    value: _Node | None = None

    @property
    def keys(self) -> _Leaf:
        assert self.key_leaf is not None
        return self.key_leaf

    @property
    def values(self) -> _Node:
        assert self.value is not None
        return self.value


def _final_type(node: _Node) -> pa.DataType:
    """The Arrow type written to the file."""
    if isinstance(node, _Leaf):
        kind = node.kind
        if kind == "bool":
            return pa.bool_()
        if kind == "int":
            return {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}[node.bits]
        if kind == "float":
            return pa.float32()
        if kind == "double":
            return pa.float64()
        if kind == "decimal":
            return pa.decimal128(node.precision, node.scale)
        if kind == "string":
            return pa.string()
        if kind == "binary":
            return pa.binary()
        if kind == "date":
            return pa.date32()
        return pa.timestamp(node.unit)
    if isinstance(node, _Struct):
        return pa.struct([pa.field(c.name, _final_type(c), nullable=c.nullable) for c in node.fields])
    if isinstance(node, _List):
        item = node.element
        return pa.list_(pa.field("item", _final_type(item), nullable=item.nullable))
    assert isinstance(node, _MapN)
    value = node.values
    return pa.map_(_final_type(node.keys), pa.field("value", _final_type(value), nullable=value.nullable))


def _raw_decimal_scale(node: _Leaf) -> int:
    # Numbers are read exactly into decimal128(38, S) and rounded to the column's scale. S keeps
    # one spare integer digit over the column's so that rounding 99.995 up cannot overflow.
    integer_digits = node.precision - node.scale
    return max(node.scale, 37 - integer_digits)


def _slow_type(node: _Node) -> pa.DataType:
    """The type of the canonical JSON the per-record path emits: every scalar as text, maps as
    lists of {k, v}. Field names are the output names."""
    if isinstance(node, _Leaf):
        return pa.string()
    if isinstance(node, _Struct):
        return pa.struct([pa.field(c.name, _slow_type(c)) for c in node.fields])
    if isinstance(node, _List):
        return pa.list_(_slow_type(node.element))
    assert isinstance(node, _MapN)
    return pa.list_(pa.struct([pa.field("k", pa.string()), pa.field("v", _slow_type(node.values))]))


def _has_map(node: _Node) -> bool:
    if isinstance(node, _MapN):
        return True
    if isinstance(node, _Struct):
        return any(_has_map(c) for c in node.fields)
    if isinstance(node, _List):
        return _has_map(node.element)
    return False


def _has_decimal(node: _Node) -> bool:
    if isinstance(node, _Leaf):
        return node.kind == "decimal"
    if isinstance(node, _Struct):
        return any(_has_decimal(c) for c in node.fields)
    if isinstance(node, _List):
        return _has_decimal(node.element)
    assert isinstance(node, _MapN)
    return _has_decimal(node.keys) or _has_decimal(node.values)


def _plain(node: _Node) -> bool:
    """True when the fast reader's value is already the final value (no kernel, no check)."""
    if not node.nullable:
        return False
    if isinstance(node, _Leaf):
        return node.kind in ("bool", "int", "float", "double") or (
            node.kind == "string" and node.length is None and node.symbols is None
        )
    if isinstance(node, _Struct):
        return all(_plain(c) for c in node.fields)
    if isinstance(node, _List):
        return _plain(node.element)
    return False
