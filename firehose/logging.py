"""The daemon's logs: structlog events with snake_case past-tense names, one per line.

The renderer is chosen once, at start (:func:`configure`): JSON (one object a line, for log
shippers) unless the output is a terminal, where people read it, then structlog's console
format (coloured unless ``NO_COLOR`` is set). ``--log-format`` forces either.

Libraries log through the standard library (aiohttp, botocore, opensearch-py, asyncio's
"Task exception was never retrieved", Python warnings): the root logger renders their records
through the same processors (structlog's ``ProcessorFormatter``), so each is one line of the
same format, its traceback inside the JSON object, never loose lines between them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
}
FORMATS = ("auto", "console", "json")
LogFormat = Literal["auto", "console", "json"]

# Library records below this level are dropped: their INFO lines (botocore's credential lookup,
# aiohttp's access log) are noise beside the daemon's own events.
_LIBRARY_LEVEL = logging.WARNING


def parse_level(text: str | None) -> int:
    """A ``FIREHOSE_LOG_LEVEL`` value (``debug``, ``info``, ``warning``, ``error``; any case; unset
    or empty means ``info``) as a :mod:`logging` level; :class:`ValueError` names the choices."""
    if text is None or not text.strip():
        return logging.INFO
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise ValueError(f"FIREHOSE_LOG_LEVEL: must be one of {', '.join(LEVELS)}, got {text!r}")
    return level


def use_console(fmt: LogFormat, stream: TextIO) -> bool:
    """Whether ``fmt`` means the console renderer on ``stream``: ``auto`` picks it for a terminal."""
    if fmt == "auto":
        try:
            return stream.isatty()
        except (AttributeError, ValueError):  # a closed or fake stream
            return False
    return fmt == "console"


def _renderer(console: bool, stream: TextIO) -> Any:
    if not console:
        return structlog.processors.JSONRenderer()
    # https://no-color.org: any non-empty NO_COLOR turns colours off; a pipe never gets them.
    colors = not os.environ.get("NO_COLOR") and use_console("auto", stream)
    return structlog.dev.ConsoleRenderer(colors=colors)


def _client_errors_are_not_ours(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request (bad request line, bad header, bad chunking) at ERROR with
    a traceback. That is a client's error, not the daemon's: it becomes one line at INFO, named
    ``http_bad_request``, without the traceback (it is dropped when INFO is below the threshold)."""
    exc = record.exc_info[1] if record.exc_info else None
    if record.name.startswith("aiohttp.server") and exc is not None and exc.__class__.__module__.startswith(
            "aiohttp.http_exceptions"):
        if logging.getLogger().level > logging.INFO:
            return False
        record.msg, record.args = "http_bad_request", ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        record.exc_info, record.exc_text = None, None
    return True


def configure(level: int | str = logging.INFO, fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Send structlog events at ``level`` and up, and library records at WARNING and up (or
    ``level`` when higher), to ``stream`` (stdout), rendered as ``fmt`` decides."""
    out = sys.stdout if stream is None else stream
    lvl = parse_level(level) if isinstance(level, str) else level
    console = use_console(fmt, out)
    renderer = _renderer(console, out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # JSON carries a traceback as one string member; the console renderer prints it readably.
    tail: list[Any] = [renderer] if console else [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # One write per event (PrintLogger writes the newline separately), so lines from the
        # root handler below never land inside one of these.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(_client_errors_are_not_ours)
    root.addHandler(handler)
    root.setLevel(max(_LIBRARY_LEVEL, lvl))
    logging.captureWarnings(True)  # warnings.warn(...) from libraries: a record, not loose stderr text
