"""Strict YAML loading that remembers where every value came from.

PyYAML's safe loader silently keeps the last of two duplicate keys and forgets line numbers once
it builds Python objects. Config errors must name the file, line and field, so this module
composes the node graph itself, rejects duplicate keys, expands ``${ENV}`` references in string
scalars, and returns a map from field path (``("streams", 0, "buffering")``) to a 1-based line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

Path = tuple[str | int, ...]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class YamlError(ValueError):
    """A YAML document that cannot be turned into config data; ``str()`` names file and line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")


def format_path(path: Path) -> str:
    """``("streams", 0, "buffering", "size_mib")`` -> ``streams[0].buffering.size_mib``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def load_yaml(text: str, file: str, env: Mapping[str, str] | None = None) -> tuple[Any, dict[Path, int]]:
    """Parse ``text`` into plain Python data and a path -> line map.

    Raises :class:`YamlError` for syntax errors, duplicate keys, non-string keys and undefined
    ``${VAR}`` references (``${VAR:-default}`` supplies a default).
    """
    environ = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlError(file, line, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlError(file, None, f"invalid YAML: {exc}") from None
    lines: dict[Path, int] = {}
    if node is None:
        return {}, lines
    # One loader resolves every scalar's tag (int, bool, null, ...) for this document.
    scalars = yaml.SafeLoader("")
    return _build(node, (), lines, file, environ, scalars), lines


def _build(
    node: yaml.Node, path: Path, lines: dict[Path, int], file: str, env: Mapping[str, str], scalars: yaml.SafeLoader
) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(file, key_node.start_mark.line + 1, "YAML merge keys ('<<') are not supported")
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(file, key_node.start_mark.line + 1, f"{format_path(path) or 'top level'}: keys must be strings")
            key = key_node.value
            if key in out:
                first = lines.get(path + (key,))
                raise YamlError(
                    file,
                    key_node.start_mark.line + 1,
                    f"{format_path(path + (key,))}: duplicate key (first defined on line {first})",
                )
            out[key] = _build(value_node, path + (key,), lines, file, env, scalars)
            # An error about a field points at its key, which is where a reader looks.
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), lines, file, env, scalars) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    value = scalars.construct_object(node)
    if isinstance(value, str):
        value = _interpolate(value, path, node.start_mark.line + 1, file, env)
    return value


def _interpolate(value: str, path: Path, line: int, file: str, env: Mapping[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise YamlError(file, line, f"{format_path(path)}: environment variable ${{{name}}} is not set")

    return _ENV_RE.sub(repl, value)
