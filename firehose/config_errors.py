"""How config problems are worded: ``file:line: field: message`` from pydantic's errors, with
the line of the nearest key that exists and no secret field's value ever echoed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from firehose.yamlload import Path, format_path


def _line_for(path: Path, lines: Mapping[Path, int]) -> int | None:
    p = tuple(path)
    while True:
        if p in lines:
            return lines[p]
        if not p:
            return None
        p = p[:-1]


def _describe_error(err: Any) -> str:
    etype = err["type"]
    value = err.get("input")
    if etype == "extra_forbidden":
        return "unknown field"
    if etype == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    shown = "<redacted>" if _is_secret(err.get("loc", ())) else _short(value)
    return f"{msg[0].lower()}{msg[1:]}, got {shown}"


# A field whose value is a secret is never echoed in an error, whatever its type.
_SECRET_FIELD = re.compile(r"pass|secret|token|credential|private|(^|_)key$|access_keys|hec_token", re.I)


def _is_secret(loc: Any) -> bool:
    return any(isinstance(part, str) and _SECRET_FIELD.search(part) for part in loc)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _collect(exc: ValidationError, base: Path, file: str, lines: Mapping[Path, int], out: list[str]) -> None:
    for err in exc.errors():
        path = base + tuple(err["loc"])
        line = _line_for(path, lines)
        where = f"{file}:{line}" if line is not None else file
        out.append(f"{where}: {format_path(path)}: {_describe_error(err)}")
