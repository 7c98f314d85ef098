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
    """A YAML document that cannot be turned into config data; ``str()`` names file and line of
    the first problem, ``errors`` lists every problem found (each ``file:line: message``)."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")
        self.errors: list[str] = [str(self)]


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

    Raises :class:`YamlError` for syntax errors (the first: nothing after it can be read), and
    for duplicate keys, non-string keys, merge keys and undefined ``${VAR}`` references
    (``${VAR:-default}`` supplies a default): all of those in the document, in one error.
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
    _check_expansion(node, file)
    # One loader resolves every scalar's tag (int, bool, null, ...) for this document.
    scalars = yaml.SafeLoader("")
    problems: list[YamlError] = []
    data = _build(node, (), lines, _Ctx(file, environ, scalars, problems))
    if problems:
        first = problems[0]
        error = YamlError(first.file, first.line, first.message)
        error.errors = [str(p) for p in problems]
        raise error
    return data, lines


MAX_EXPANDED_NODES = 100_000  # a config is a few hundred nodes; aliases must not multiply it


def _check_expansion(root: yaml.Node, file: str) -> None:
    """Refuse a document whose aliases refer to themselves or expand past MAX_EXPANDED_NODES
    (a 7-line alias bomb expands to millions), before anything walks the expanded tree."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order walk over the node graph (aliases are shared nodes, so each distinct
    # node is sized once): (node, children visited yet?).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_EXPANDED_NODES:
                raise YamlError(file, node.start_mark.line + 1,
                                f"aliases expand this document past {MAX_EXPANDED_NODES} nodes; refusing it")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlError(file, node.start_mark.line + 1, "an alias refers to the node that contains it")
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YamlError(file, child.start_mark.line + 1, "an alias refers to the node that contains it")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _Ctx:
    """What every node of one document is built with; ``problems`` collects what is wrong."""

    def __init__(self, file: str, env: Mapping[str, str], scalars: yaml.SafeLoader, problems: list[YamlError]) -> None:
        self.file = file
        self.env = env
        self.scalars = scalars
        self.problems = problems

    def problem(self, line: int, message: str) -> None:
        self.problems.append(YamlError(self.file, line, message))


def _build(node: yaml.Node, path: Path, lines: dict[Path, int], ctx: _Ctx) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                ctx.problem(line, "YAML merge keys ('<<') are not supported")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                ctx.problem(line, f"{format_path(path) or 'top level'}: keys must be strings")
                continue
            key = key_node.value
            if key in out:
                first = lines.get(path + (key,))
                ctx.problem(line, f"{format_path(path + (key,))}: duplicate key (first defined on line {first})")
                continue  # the first definition stays, so its line is the one reported for it
            out[key] = _build(value_node, path + (key,), lines, ctx)
            # An error about a field points at its key, which is where a reader looks.
            lines[path + (key,)] = line
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), lines, ctx) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    value = ctx.scalars.construct_object(node)
    if isinstance(value, str):
        value = _interpolate(value, path, node.start_mark.line + 1, ctx)
    return value


def _interpolate(value: str, path: Path, line: int, ctx: _Ctx) -> str:
    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in ctx.env:
            return ctx.env[name]
        if default is not None:
            return default
        ctx.problem(line, f"{format_path(path)}: environment variable ${{{name}}} is not set")
        return match.group(0)

    return _ENV_RE.sub(repl, value)
