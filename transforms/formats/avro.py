"""Avro: schema derivation from the compiled schema, reading ``.avsc`` schemas, rows for fastavro."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

import pyarrow as pa

from firehose.transforms.formats.errors import SchemaError
from firehose.transforms.formats.nodes import _has_map, _Leaf, _List, _MapN, _Node, _Struct

_AVRO_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _avro_name(name: str, path: str) -> str:
    if not _AVRO_NAME.match(name):
        raise SchemaError(f"field {path!r}: {name!r} is not a valid Avro name ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def _avro_type(node: _Node, names: dict[str, int]) -> Any:
    if isinstance(node, _Leaf):
        avro: Any
        kind = node.kind
        if kind == "bool":
            avro = "boolean"
        elif kind == "int":
            avro = "long" if node.bits == 64 else "int"
        elif kind == "float":
            avro = "float"
        elif kind == "double":
            avro = "double"
        elif kind == "decimal":
            avro = {
                "type": "bytes",
                "logicalType": "decimal",
                "precision": node.precision,
                "scale": node.scale,
            }
        elif kind == "string":
            avro = "string"
        elif kind == "binary":
            avro = "bytes"
        elif kind == "date":
            avro = {"type": "int", "logicalType": "date"}
        else:
            logical = "timestamp-millis" if node.unit == "ms" else "timestamp-micros"
            avro = {"type": "long", "logicalType": logical}
    elif isinstance(node, _Struct):
        base = "r_" + re.sub(r"[^A-Za-z0-9_]", "_", (node.path or "root").replace("[]", "").replace("{}", ""))
        count = names.get(base, 0)
        names[base] = count + 1
        avro = {
            "type": "record",
            "name": base if count == 0 else f"{base}_{count}",
            "fields": [_avro_field(c, names) for c in node.fields],
        }
    elif isinstance(node, _List):
        avro = {"type": "array", "items": _avro_type(node.element, names)}
    else:
        assert isinstance(node, _MapN)
        if node.keys.kind == "string":
            avro = {"type": "map", "values": _avro_type(node.values, names)}
        else:
            # Avro map keys are strings; a map<int,...> becomes an array of key/value records.
            entry = _Struct("entry", "entry", node.path + "{}", False, [node.keys, node.values])
            avro = {"type": "array", "items": _avro_type(entry, names)}
    return ["null", avro] if node.nullable else avro


def _avro_field(node: _Node, names: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": _avro_name(node.name, node.path), "type": _avro_type(node, names)}
    if node.nullable:
        out["default"] = None
    return out


class _AvroReader:
    """Builds nodes from an Avro schema (a top-level record)."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}
        self.active: set[str] = set()

    def node(self, schema: Any, name: str, path: str) -> _Node:
        nullable = False
        if isinstance(schema, list):
            branches = [b for b in schema if b != "null"]
            if len(branches) != 1 or len(schema) > 2:
                raise SchemaError(
                    f"field {path!r}: only unions of null and one type are supported, got {schema!r}"
                )
            nullable = len(branches) != len(schema)
            schema = branches[0]
        node = self.plain(schema, name, path)
        node.nullable = nullable
        return node

    def plain(self, schema: Any, name: str, path: str) -> _Node:
        if isinstance(schema, str):
            if schema in self.named:
                if schema in self.active:
                    raise SchemaError(f"field {path!r}: recursive type {schema!r} is not supported")
                return self.plain(self.named[schema], name, path)
            schema = {"type": schema}
        if not isinstance(schema, dict) or "type" not in schema:
            raise SchemaError(f"field {path!r}: not an Avro type: {schema!r}")
        typ = schema["type"]
        logical = schema.get("logicalType")
        if isinstance(typ, (dict, list)):
            return self.node(typ, name, path)
        if typ in ("record", "error"):
            full = schema.get("name", "")
            if full:
                self.named[full] = schema
                self.active.add(full)
            fields = []
            seen: set[str] = set()
            for f in schema.get("fields", []):
                fname = f["name"]
                if fname.lower() in seen:
                    raise SchemaError(
                        f"field {path!r}: duplicate field {fname!r} (names are matched case-insensitively)"
                    )
                seen.add(fname.lower())
                fields.append(self.node(f["type"], fname, f"{path}.{fname}" if path else fname))
            self.active.discard(full)
            return _Struct(name, name, path, True, fields)
        if typ == "enum":
            if schema.get("name"):
                self.named[schema["name"]] = schema
            return _Leaf(name, name, path, True, "string", symbols=tuple(schema["symbols"]))
        if typ == "fixed":
            if schema.get("name"):
                self.named[schema["name"]] = schema
            if logical == "decimal":
                return self.decimal(schema, name, path)
            return _Leaf(name, name, path, True, "binary", fixed_size=int(schema["size"]))
        if typ == "array":
            return _List(name, name, path, True, self.node(schema["items"], "item", path + "[]"))
        if typ == "map":
            key = _Leaf("key", "key", path + "{}", False, "string")
            return _MapN(name, name, path, True, key, self.node(schema["values"], "value", path + "{}"))
        if typ == "boolean":
            return _Leaf(name, name, path, True, "bool")
        if typ == "int":
            if logical == "date":
                return _Leaf(name, name, path, True, "date")
            return _Leaf(name, name, path, True, "int", bits=32)
        if typ == "long":
            if logical in ("timestamp-millis", "local-timestamp-millis"):
                return _Leaf(name, name, path, True, "timestamp", unit="ms")
            if logical in ("timestamp-micros", "local-timestamp-micros"):
                return _Leaf(name, name, path, True, "timestamp", unit="us")
            return _Leaf(name, name, path, True, "int", bits=64)
        if typ == "float":
            return _Leaf(name, name, path, True, "float")
        if typ == "double":
            return _Leaf(name, name, path, True, "double")
        if typ == "bytes":
            if logical == "decimal":
                return self.decimal(schema, name, path)
            return _Leaf(name, name, path, True, "binary")
        if typ == "string":
            return _Leaf(name, name, path, True, "string")
        raise SchemaError(f"field {path!r}: unsupported Avro type {typ!r}")

    def decimal(self, schema: dict[str, Any], name: str, path: str) -> _Leaf:
        precision, scale = int(schema.get("precision", 0)), int(schema.get("scale", 0))
        if not 1 <= precision <= 38 or not 0 <= scale <= precision:
            raise SchemaError(f"field {path!r}: decimal({precision},{scale}) is outside Arrow's decimal128")
        return _Leaf(name, name, path, True, "decimal", precision=precision, scale=scale)


def _avro_rows(table: pa.Table, root: _Struct) -> Iterator[dict[str, Any]]:
    """Rows for fastavro: maps become dicts (or key/value records for non-string keys)."""
    needs_fix = _has_map(root)
    for batch in table.to_batches():
        for row in batch.to_pylist():
            yield _avro_fix(root, row) if needs_fix else row


def _avro_fix(node: _Node, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(node, _Struct):
        return {c.name: _avro_fix(c, value[c.name]) for c in node.fields}
    if isinstance(node, _List):
        return [_avro_fix(node.element, v) for v in value]
    if isinstance(node, _MapN):
        if node.keys.kind == "string":
            return {k: _avro_fix(node.values, v) for k, v in value}
        return [{"key": k, "value": _avro_fix(node.values, v)} for k, v in value]
    return value
