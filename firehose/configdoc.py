"""The config documents itself: a JSON Schema of the whole config file, and the Markdown reference
(docs/config-reference.md), both generated from the pydantic models that validate the file.

The models type a stream's typed parts loosely (``destination: Any``, ``processing: list[Any]``,
...) because the loader resolves each ``type:`` through the registry, one item at a time, so that
one bad item does not hide another. For the schema, :func:`config_schema` builds subclasses of
those models whose loose fields are discriminated unions (by ``type``) of the registry's built-in
classes (and, when asked, installed plugins' classes), then lets pydantic generate the schema. The
Markdown reference is rendered from that schema, built-ins only, so what it says is exactly what
the schema (and so the models) say: keys, types, defaults, ranges and the fields' descriptions.

Regenerate the reference with ``firehose config-schema --markdown > docs/config-reference.md``;
a unit test fails while the checked-in file differs from what the models generate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, create_model
from pydantic.json_schema import GenerateJsonSchema

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REFERENCE_PATH = "docs/config-reference.md"
REGENERATE_COMMAND = "firehose config-schema --markdown > docs/config-reference.md"


# --------------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------------


class _Generate(GenerateJsonSchema):
    """pydantic's generator, adjusted for a config file's schema."""

    def field_is_present(self, field: Any) -> bool:
        # A field excluded from dumps (DaemonConfig.source) is set by the loader, not a config key.
        return not field.get("serialization_exclude") and super().field_is_present(field)

    def get_default_value(self, schema: Any) -> Any:
        # Show what a default_factory makes ({} and [] mostly), as for a plain default.
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)

    def model_schema(self, schema: Any) -> Any:
        # Keys in the order a reader wants them: a model's own fields before those it inherits
        # (an S3 destination's bucket before the prefix rules it shares with local).
        json_schema = super().model_schema(schema)
        props = json_schema.get("properties")
        if isinstance(props, dict):
            order = {key: i for i, key in enumerate(_key_order(schema["cls"]))}
            json_schema["properties"] = dict(sorted(props.items(), key=lambda kv: order.get(kv[0], len(order))))
        return json_schema

    def function_before_schema(self, schema: Any) -> Any:
        # A before-validator may accept more than its type says (it normalizes other spellings, such
        # as upper case, into the allowed values): the values stay as suggestions, never a refusal.
        inner = super().function_before_schema(schema)
        if isinstance(inner.get("enum"), list) and all(isinstance(v, str) for v in inner["enum"]):
            return {"anyOf": [inner, {"type": "string"}]}
        return inner


def _key_order(cls: type[BaseModel]) -> list[str]:
    """``cls``'s config keys: ``type`` first, then the fields each class declares, from the most
    derived class to its bases (schema-only subclasses made by :func:`_retyped` do not count)."""
    type_field = cls.model_fields.get("type")
    keys = ["type"] if type_field is not None and get_origin(type_field.annotation) is Literal else []
    for klass in cls.__mro__:
        if klass.__dict__.get("_schema_view", False):
            continue
        for name in klass.__dict__.get("__annotations__", {}):
            info = cls.model_fields.get(name)
            key = (info.alias or name) if info is not None else None
            if key is not None and key not in keys:
                keys.append(key)
    return keys


def _field_like(cls: type[BaseModel], name: str) -> Any:
    """A ``Field`` with the default (or factory) and description of ``cls``'s field ``name``."""
    info = cls.model_fields[name]
    kw: dict[str, Any] = {"description": info.description}
    if info.default_factory is not None:
        kw["default_factory"] = info.default_factory
    elif not info.is_required():
        kw["default"] = info.default
    return Field(**kw)


def _retyped(cls: type[BaseModel], **types: Any) -> type[BaseModel]:
    """A subclass of ``cls``, for schema generation only, whose fields ``types`` have the given
    types (their defaults and descriptions kept)."""
    fields: dict[str, Any] = {name: (tp, _field_like(cls, name)) for name, tp in types.items()}
    model: type[BaseModel] = create_model(
        cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **fields
    )
    model._schema_view = True  # type: ignore[attr-defined]
    return model


def _union(classes: list[type[BaseModel]]) -> Any:
    """The classes, chosen by their ``type`` field (pydantic's discriminated union)."""
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]  # noqa: UP007


def _has_type_literal(cls: type[BaseModel], name: str) -> bool:
    field = cls.model_fields.get("type")
    if field is None:
        return False
    annotation = field.annotation
    return get_origin(annotation) is Literal and get_args(annotation) == (name,)


def _plugin_classes(group: str, builtins: dict[str, str], class_for: Any, notes: list[str]) -> list[type[BaseModel]]:
    """Installed plugins' config classes of an entry-point group, by type name; each one that
    cannot be used (it does not load, breaks the contract, has no schema) is left out with a note."""
    out: list[type[BaseModel]] = []
    for name in sorted({ep.name for ep in entry_points(group=group)} - set(builtins)):
        try:
            cls = class_for(name)
        except ValueError as exc:  # the registry's PluginError
            notes.append(f"{group} {name!r} left out: {exc}")
            continue
        if "type" not in cls.model_fields:
            notes.append(f"{group} {name!r} left out: its config class {cls.__name__} has no 'type' field")
            continue
        if not _has_type_literal(cls, name):  # `type: str`: the entry point's name is its value
            type_field: Any = (Literal[name], Field(description=f"`{name}`."))
            cls = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__,
                               type=type_field)
        try:
            cls.model_json_schema(schema_generator=_Generate)
        except Exception as exc:  # a field type without a JSON Schema, whatever pydantic raises
            notes.append(f"{group} {name!r} left out: no JSON Schema for {cls.__name__}: {exc}")
            continue
        out.append(cls)
    return out


def _root_model(plugins: bool, notes: list[str]) -> type[BaseModel]:
    from firehose.config import DaemonConfig, StreamConfig
    from firehose.registry import (
        BACKUP_CONFIG,
        BUILTIN_DESTINATIONS,
        BUILTIN_PROCESSORS,
        BUILTIN_SOURCES,
        FORMAT_CONFIG,
        destination_config_class,
        load,
        source_config_class,
    )
    from firehose.sources.file import FileSourceConfig
    from firehose.sources.file_options import FileOption

    file_source = _retyped(FileSourceConfig, processing=list[FileOption])
    destinations: list[type[BaseModel]] = [load(t) for t in BUILTIN_DESTINATIONS.values()]
    sources: list[type[BaseModel]] = [
        file_source if load(t) is FileSourceConfig else load(t) for t in BUILTIN_SOURCES.values()
    ]
    processors: list[type[BaseModel]] = [load(t) for t in BUILTIN_PROCESSORS.values()]
    if plugins:
        destinations += _plugin_classes("firehose.destinations", BUILTIN_DESTINATIONS, destination_config_class,
                                        notes)
        sources += _plugin_classes("firehose.sources", BUILTIN_SOURCES, source_config_class, notes)
    stream = _retyped(
        StreamConfig,
        destination=_union(destinations),
        sources=list[_union(sources)],  # type: ignore[misc]
        processing=list[_union(processors)],  # type: ignore[misc]
        backup=load(BACKUP_CONFIG) | None,
        format=load(FORMAT_CONFIG) | None,
    )
    return _retyped(DaemonConfig, streams=list[stream])  # type: ignore[valid-type]


def config_schema(*, plugins: bool = False, notes: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file. ``plugins``: include the destination
    and source types of installed plugins (each one left out is described in ``notes``)."""
    schema = _root_model(plugins, notes if notes is not None else []).model_json_schema(
        mode="validation", schema_generator=_Generate
    )
    schema["title"] = "firehose configuration"
    return {"$schema": SCHEMA_DIALECT, **schema}


def schema_text(schema: dict[str, Any]) -> str:
    """The schema as the CLI prints it: JSON, keys sorted, the same bytes every run."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------
# Markdown reference
# --------------------------------------------------------------------------------------------------

_INTRO = """\
# Configuration reference

<!-- Generated from the config models by `{command}`.
     Do not edit: change the models' field descriptions, then regenerate. -->

Every key of the config file (`firehose run --config FILE`, `firehose validate FILE`), generated
from the models that validate it: one section per part of the file, each key with its type,
default, range or allowed values, and what it does. "Firehose:" names the member of Amazon
Kinesis Data Firehose's API the key corresponds to. Built-in types only: a plugin documents its
own.

* Unknown keys and duplicate keys are errors; so is a value of the wrong type (`"5"` is not a
  number).
* `${{VAR}}` and `${{VAR:-default}}` in a string value expand environment variables: write
  secrets that way.
* A range `a..b` includes both ends. "unset" means the key is left out (or `null`).
* `firehose validate FILE` also checks the rules across keys (a stream's buffering against its
  destination's limits, dynamic partitioning, format conversion) that this reference states in
  the descriptions.

Editors: `firehose config-schema > firehose.schema.json` writes the JSON Schema of the same
models (including installed plugins' types). With VS Code's YAML extension (Red Hat), start the
config file with the line `# yaml-language-server: $schema=./firehose.schema.json` (a path
relative to the file, or a URL), or map files to it in `settings.json`:
`"yaml.schemas": {{"./firehose.schema.json": ["firehose.yaml"]}}`.
"""


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _refs(prop: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The models a property holds: (``$defs`` name, path suffix: ``[]`` for a list item)."""
    if "$ref" in prop:
        yield _ref_name(prop["$ref"]), ""
    if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
        for name, suffix in _refs(prop["items"]):
            yield name, "[]" + suffix
    if isinstance(prop.get("additionalProperties"), dict):
        for name, suffix in _refs(prop["additionalProperties"]):
            yield name, ".*" + suffix
    for alt in prop.get("oneOf", []) + prop.get("anyOf", []):
        yield from _refs(alt)


class _Reference:
    """The Markdown reference of one schema: sections in the order a reader meets them (depth
    first from the top level, keys in the models' order)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
        self.order: list[tuple[str | None, str]] = [(None, "Top level")]  # ($defs name, heading)
        self.titles: dict[str | None, str] = {None: "Top level"}
        self._walk(schema, "")

    def _walk(self, model: dict[str, Any], path: str) -> None:
        for key, prop in model.get("properties", {}).items():
            for name, suffix in _refs(prop):
                if name in self.titles or name not in self.defs:
                    continue
                where = f"{path}.{key}{suffix}" if path else f"{key}{suffix}"
                variant = self.defs[name].get("properties", {}).get("type", {}).get("const")
                title = f"`{where}`" + (f" with `type: {variant}`" if variant is not None else "")
                self.titles[name] = title
                self.order.append((name, title))
                self._walk(self.defs[name], where)

    def link(self, name: str, text: str) -> str:
        return f"[{text}](#{_slug(self.titles[name])})" if name in self.titles else text

    # --- cells ------------------------------------------------------------------------------------
    def type_of(self, prop: dict[str, Any]) -> str:
        if "$ref" in prop:
            return self.link(_ref_name(prop["$ref"]), "object")
        alts = [a for a in prop.get("oneOf", prop.get("anyOf", [])) if a.get("type") != "null"]
        if alts:
            return self._union(alts)
        kind = prop.get("type")
        if kind == "array":
            return "list of " + self.type_of(prop.get("items", {}))
        if kind == "object":
            values = prop.get("additionalProperties")
            return "map of string to " + self.type_of(values) if isinstance(values, dict) and values else "map"
        if kind == "string":
            return {"password": "string (secret)", "date-time": "date-time"}.get(prop.get("format", ""), "string")
        return kind if isinstance(kind, str) else "any"

    def _union(self, alts: list[dict[str, Any]]) -> str:
        refs = [a for a in alts if "$ref" in a]
        if len(refs) > 1 and len(refs) == len(alts):
            links = []
            for alt in refs:
                name = _ref_name(alt["$ref"])
                variant = self.defs.get(name, {}).get("properties", {}).get("type", {}).get("const", name)
                links.append(self.link(name, f"`{variant}`"))
            return "object, by `type`: " + ", ".join(links)
        kinds: list[str] = []
        for alt in alts:
            if self.type_of(alt) not in kinds:
                kinds.append(self.type_of(alt))
        return " or ".join(kinds)

    @staticmethod
    def range_of(prop: dict[str, Any]) -> str:
        alts = [a for a in prop.get("anyOf", []) if a.get("type") != "null"]
        if len(alts) == 1:
            prop = {**alts[0], **{k: v for k, v in prop.items() if k != "anyOf"}}
        elif alts and any("enum" in a for a in alts) and all("enum" in a or a == {"type": "string"} for a in alts):
            values = [v for a in alts for v in a.get("enum", [])]
            return ", ".join(f"`{v}`" for v in values) + " (other spellings are normalized)"
        if "const" in prop:
            return _literal(prop["const"])
        if "enum" in prop:
            return ", ".join(_literal(v) for v in prop["enum"])
        parts = [*_bounds(prop), *_sizes(prop)]
        if prop.get("pattern"):
            parts.append(f"pattern `{prop['pattern']}`")
        return ", ".join(parts)

    def default_of(self, key: str, prop: dict[str, Any], required: list[str]) -> str:
        if key in required:
            return "required"
        if "default" not in prop:
            return ""
        value = prop["default"]
        if value is None:
            return "unset"
        if isinstance(value, dict) and value and value == self._model_defaults(prop):
            return "its defaults"
        return _literal(value)

    def _model_defaults(self, prop: dict[str, Any]) -> dict[str, Any] | None:
        names = [name for name, suffix in _refs(prop) if not suffix]
        if len(names) != 1 or names[0] not in self.defs:
            return None
        props = self.defs[names[0]].get("properties", {})
        return {k: p["default"] for k, p in props.items() if "default" in p}

    # --- document ---------------------------------------------------------------------------------
    def section(self, name: str | None, title: str) -> list[str]:
        model = self.schema if name is None else self.defs[name]
        lines = [f"## {title}", ""]
        intro = _markdown_text(model.get("description", ""))
        if intro:
            lines += [intro, ""]
        props: dict[str, Any] = model.get("properties", {})
        required: list[str] = model.get("required", [])
        lines += ["| Key | Type | Default | Range / values | Description |", "|---|---|---|---|---|"]
        for key, prop in props.items():
            cells = [f"`{key}`", self.type_of(prop), self.default_of(key, prop, required), self.range_of(prop),
                     _markdown_text(prop.get("description", ""))]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
        if name == "BufferingConfig":
            lines += _buffering_table()
        return lines

    def markdown(self) -> str:
        lines = [_INTRO.format(command=REGENERATE_COMMAND), "## Contents", ""]
        lines += [f"* [{title}](#{_slug(title)})" for _, title in self.order]
        lines.append("")
        for name, title in self.order:
            lines += self.section(name, title)
        return "\n".join(lines).rstrip("\n") + "\n"


def _buffering_table() -> list[str]:
    """Each built-in destination's buffering ranges and defaults, from its own class."""
    from firehose.registry import BUILTIN_DESTINATIONS, load

    lines = ["Ranges and defaults by destination (a value outside them is a config error):", "",
             "| Destination `type` | `size_mib` | `interval_secs` |", "|---|---|---|"]
    for type_name, target in BUILTIN_DESTINATIONS.items():
        limits = load(target).model_construct().buffering_limits()
        lines.append(f"| `{type_name}` | {limits.min_size_mib}..{limits.max_size_mib} "
                     f"(default {limits.default_size_mib}) | {limits.min_interval_secs}..{limits.max_interval_secs} "
                     f"(default {limits.default_interval_secs}) |")
    return lines + [""]


def _bounds(prop: dict[str, Any]) -> list[str]:
    """A number's range: ``low..high``, or each bound that is set."""
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        return [f"{low}..{high}"]
    parts = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if prop.get(key) is not None:
            parts.append(f"{sign} {prop[key]}")
    return parts


def _sizes(prop: dict[str, Any]) -> list[str]:
    """A string's length range and a list's item-count range."""
    parts = []
    for unit, lo_key, hi_key in (("characters", "minLength", "maxLength"), ("items", "minItems", "maxItems")):
        lo, hi = prop.get(lo_key), prop.get(hi_key)
        if lo is not None and hi is not None:
            parts.append(f"{lo}..{hi} {unit}")
        elif lo is not None:
            parts.append(f"≥ {lo} {unit[:-1] if lo == 1 else unit}")
        elif hi is not None:
            parts.append(f"≤ {hi} {unit}")
    return parts


def _literal(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[\w.:/@+-]+", value):
        return f"`{value}`"
    return "`" + json.dumps(value, ensure_ascii=False, separators=(", ", ": ")) + "`"


def _markdown_text(text: str) -> str:
    """A docstring or description as Markdown: reST literals and roles become code spans."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`").strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference_markdown() -> str:
    """docs/config-reference.md: every key of every built-in model, from the JSON Schema."""
    return _Reference(config_schema(plugins=False)).markdown()
