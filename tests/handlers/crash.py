"""Handlers that end the worker process the way a broken native extension or a stray exit would."""

from __future__ import annotations

import base64
import ctypes
import os
from typing import Any


def exit_hard(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Leave the interpreter immediately with status 3 (no cleanup, no response)."""
    os._exit(3)


def segfault(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Dereference a null pointer: the process dies with SIGSEGV."""
    ctypes.string_at(0)
    return {"records": []}


def sys_exit(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """``sys.exit(5)``: on Lambda this ends the runtime rather than raising a function error."""
    raise SystemExit(5)


def on_demand(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Crash when the first record's payload says so (``b"exit"``, ``b"segv"``), else behave like identity."""
    from handlers import identity

    command = base64.b64decode(event["records"][0]["data"]) if event["records"] else b""
    if command == b"exit":
        os._exit(3)
    if command == b"segv":
        ctypes.string_at(0)
    return identity.handler(event, context)
