"""Schemas: resolving a :class:`SchemaConfig` (reading an ``.avsc`` file, fetching a Glue table) and
compiling the result into the node tree the converter works on.

:func:`resolve_schema` is the only step that does I/O: a :class:`Converter` given an already
:class:`ResolvedSchema` does none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from firehose.transforms.formats.avro import _AvroReader
from firehose.transforms.formats.config import GlueConfig, SchemaConfig
from firehose.transforms.formats.errors import ENTITY_NOT_FOUND, SchemaError
from firehose.transforms.formats.hive import HiveArray, HiveMap, HivePrimitive, HiveType, parse_hive_type
from firehose.transforms.formats.nodes import _Leaf, _List, _MapN, _Node, _Struct


@dataclass(frozen=True)
class ResolvedSchema:
    """A schema's source once any I/O is done: exactly one of ``columns`` (Glue/Hive
    ``(name, type string)`` pairs, from ``columns`` or a Glue table) and ``avro_text`` (an Avro
    schema's JSON text; ``avro_source`` names where it came from, for messages)."""

    columns: tuple[tuple[str, str], ...] | None = None
    avro_text: str | None = None
    avro_source: str = "<avro_schema>"

    def __post_init__(self) -> None:
        if (self.columns is None) == (self.avro_text is None):
            raise ValueError("ResolvedSchema needs exactly one of 'columns' and 'avro_text'")


def resolve_schema(schema: SchemaConfig) -> ResolvedSchema:
    """Do the I/O a schema needs: read the ``avro_schema`` file, or fetch the ``glue`` table's
    columns (once, with bounded timeouts); ``columns`` need none.

    Raises :class:`SchemaError` (``ENTITY_NOT_FOUND`` for a file that cannot be read or a table
    that does not exist).
    """
    if schema.avro_schema is not None:
        path_text = schema.avro_schema
        try:
            text = Path(path_text).read_text(encoding="utf-8")
        except OSError as exc:
            raise SchemaError(f"avro_schema {path_text!r}: cannot read it: {exc}", ENTITY_NOT_FOUND) from None
        except ValueError as exc:  # not UTF-8
            raise SchemaError(f"avro_schema {path_text!r}: not JSON: {exc}") from None
        return ResolvedSchema(avro_text=text, avro_source=path_text)
    if schema.columns is not None:
        return ResolvedSchema(columns=tuple((c.name, c.type) for c in schema.columns))
    assert schema.glue is not None
    return ResolvedSchema(columns=tuple(_glue_columns(schema.glue)))


def _glue_columns(glue: GlueConfig) -> list[tuple[str, str]]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "glue",
        region_name=glue.region,
        endpoint_url=glue.endpoint_url,
        config=Config(
            connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}
        ),
    )
    where = f"Glue table {glue.database}.{glue.table} ({glue.region})"
    try:
        table = client.get_table(DatabaseName=glue.database, Name=glue.table)["Table"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if code == "EntityNotFoundException":
            raise SchemaError(f"{where} not found: {message}", ENTITY_NOT_FOUND) from None
        raise SchemaError(f"{where}: {code}: {message}") from None
    except BotoCoreError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    columns = table.get("StorageDescriptor", {}).get("Columns", [])
    if not columns:
        raise SchemaError(f"{where} has no columns in its storage descriptor")
    return [(c["Name"], c["Type"]) for c in columns]


# --------------------------------------------------------------------------------------------
# Compiling a resolved schema into nodes (no I/O)
# --------------------------------------------------------------------------------------------


def _root_node(resolved: ResolvedSchema) -> _Struct:
    """The top-level struct of a resolved schema; a type string or Avro schema that cannot be
    used raises :class:`SchemaError` naming the field."""
    if resolved.avro_text is not None:
        return _from_avro_text(resolved.avro_text, resolved.avro_source)
    fields: list[_Node] = []
    for name, type_text in resolved.columns or ():
        try:
            hive = parse_hive_type(type_text)
        except ValueError as exc:
            raise SchemaError(f"column {name!r}: {exc}") from None
        fields.append(_from_hive(hive, name, name))
    return _Struct("", "", "", False, fields)


_INT_BITS: Final = {"tinyint": 8, "smallint": 16, "int": 32, "bigint": 64}


def _leaf_from_hive(prim: HivePrimitive, name: str, key: str, path: str) -> _Leaf:
    if prim.name in _INT_BITS:
        return _Leaf(name, key, path, True, "int", bits=_INT_BITS[prim.name])
    if prim.name == "decimal":
        return _Leaf(name, key, path, True, "decimal", precision=prim.args[0], scale=prim.args[1])
    if prim.name in ("char", "varchar"):
        return _Leaf(name, key, path, True, "string", length=prim.args[0])
    kind = {"boolean": "bool"}.get(prim.name, prim.name)
    return _Leaf(name, key, path, True, kind)


def _from_hive(hive: HiveType, name: str, path: str) -> _Node:
    if isinstance(hive, HivePrimitive):
        return _leaf_from_hive(hive, name, name, path)
    if isinstance(hive, HiveArray):
        return _List(name, name, path, True, _from_hive(hive.item, "item", path + "[]"))
    if isinstance(hive, HiveMap):
        key = _leaf_from_hive(hive.key, "key", "key", path + "{}")
        key.nullable = False
        return _MapN(name, name, path, True, key, _from_hive(hive.value, "value", path + "{}"))
    return _Struct(name, name, path, True, [_from_hive(t, n, f"{path}.{n}") for n, t in hive.fields])


def _from_avro_text(text: str, path_text: str) -> _Struct:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"avro_schema {path_text!r}: not JSON: {exc}") from None
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise SchemaError(f"avro_schema {path_text!r}: the top level must be a record")
    node = _AvroReader().node(schema, "", "")
    assert isinstance(node, _Struct)
    node.nullable = False
    return node


def _no_dots(node: _Node) -> None:
    if isinstance(node, _Struct):
        for child in node.fields:
            if "." in child.name:
                raise SchemaError(
                    f"field {child.path!r}: the Hive JSON SerDe rejects dots in column names"
                )
            _no_dots(child)
    elif isinstance(node, _List):
        _no_dots(node.element)
    elif isinstance(node, _MapN):
        _no_dots(node.values)


def _assign_keys(node: _Node, fold: bool, mappings: dict[str, str]) -> None:
    """Set each struct field's JSON key (folded, mapped) and refuse two fields sharing one."""
    if isinstance(node, _Struct):
        seen: dict[str, str] = {}
        for child in node.fields:
            folded = child.name.lower() if fold else child.name
            child.key = mappings.get(folded, folded)
            if child.key in seen:
                raise SchemaError(
                    f"fields {seen[child.key]!r} and {child.path!r} both read the JSON key {child.key!r}"
                )
            seen[child.key] = child.path
            _assign_keys(child, fold, mappings)
    elif isinstance(node, _List):
        _assign_keys(node.element, fold, mappings)
    elif isinstance(node, _MapN):
        _assign_keys(node.values, fold, mappings)


def _index_paths(node: _Node, prefix: str, out: dict[str, _Node]) -> None:
    # Paths as pyarrow's JSON reader names them in errors: /user/id, /tags/[], /items/[]/sku.
    if isinstance(node, _Struct):
        for child in node.fields:
            path = f"{prefix}/{child.key}"
            out[path] = child
            _index_paths(child, path, out)
    elif isinstance(node, _List):
        path = f"{prefix}/[]"
        out[path] = node.element
        _index_paths(node.element, path, out)
