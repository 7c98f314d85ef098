"""A file source's ``processing:`` options: Kinesis Agent's ``dataProcessingOptions`` (reference §12.3).

They run in the file source, on each record as the tailer cut it (a line, or a multi-line record,
with its trailing newline), before the record reaches the spool. Each option takes Kinesis Agent's
behaviour, checked against its converters, including its quirks where a migrated config would
otherwise produce different output:

* ``single_line`` joins the lines of a record: each line is trimmed of leading and trailing
  characters up to U+0020 (Java's ``String.trim``) unless ``no_trim``, and the lines are joined with
  nothing, or with ``escape_new_line`` with the three characters ``\\\\n`` (backslash, backslash,
  ``n``: what Kinesis Agent's ``ESCAPE_NEW_LINE`` writes). Empty lines at the end are dropped. It
  works on bytes, so it passes any encoding through.
* ``csv_to_json`` splits on a one-character delimiter, with no quoting (Kinesis Agent splits with
  ``String.split``): ``{"<field>": "<column>", ...}``. Missing columns, and empty columns at the end
  of the line (which ``String.split`` drops), become ``null``; columns beyond ``field_names`` are
  dropped.
* ``log_to_json`` matches the whole line (without its newline) against a log format, or
  ``match_pattern``, and names the groups with the format's fields or ``field_names``. For the
  Apache formats a ``-`` value becomes ``null``; for the syslog formats it stays ``"-"``, as in
  Kinesis Agent, whose syslog parser has no such rule. A group that did not take part in the match
  is ``null``. Built-in patterns use ASCII ``\\w``, ``\\d`` and ``\\s``, as Java's regexes do.
* ``add_metadata`` wraps the record:
  ``{"ts": "<UTC yyyy-MM-dd'T'HH:mm:ss.SSS'Z'>", "metadata": {...}, "data": "<record without its
  trailing newline>"}`` (``ts`` only with ``timestamp: true``).

Every option that outputs JSON ends the record with ``\\n``. A record an option cannot convert
raises :class:`ConversionError` (Kinesis Agent silently skips a line its log format does not
match); the file source decides what becomes of it.

Thread-safety: a converter can be called from several threads; the only state it keeps between
records is ``add_metadata``'s date of the current second, replaced as one tuple.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import Field, TypeAdapter, field_validator, model_validator

from firehose.clock import Clock, SystemClock
from firehose.models import StrictModel

__all__ = [
    "FILE_OPTION_TYPES",
    "LOG_FORMAT_FIELDS",
    "AddMetadataOption",
    "ConversionError",
    "CsvToJsonOption",
    "FileOption",
    "LogToJsonOption",
    "SingleLineOption",
    "build_converter",
    "from_agent_option",
]


class ConversionError(ValueError):
    """A record an option cannot convert; the message names the option and what did not match."""


class SingleLineOption(StrictModel):
    """Kinesis Agent's ``SINGLELINE`` (``parseOptions``: ``NO_TRIM``, ``ESCAPE_NEW_LINE``)."""

    type: Literal["single_line"] = Field(description="`single_line` (Kinesis Agent: SINGLELINE).")
    no_trim: bool = Field(
        default=False,
        description="Keep each line's leading and trailing whitespace (Kinesis Agent: parseOptions NO_TRIM).",
    )
    escape_new_line: bool = Field(
        default=False,
        description="Join the lines with the characters `\\\\n` instead of nothing (Kinesis Agent: "
        "parseOptions ESCAPE_NEW_LINE).",
    )


class CsvToJsonOption(StrictModel):
    """Kinesis Agent's ``CSVTOJSON`` (``customFieldNames``, ``delimiter``)."""

    type: Literal["csv_to_json"] = Field(description="`csv_to_json` (Kinesis Agent: CSVTOJSON).")
    field_names: list[str] = Field(
        min_length=1,
        description="The JSON key of each column, in order (Kinesis Agent: customFieldNames).",
    )
    delimiter: str = Field(
        default=",",
        description="The column delimiter: one character other than a newline; no quoting (Kinesis Agent: "
        "delimiter).",
    )

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1 or v == "\n":
            raise ValueError(f"must be one character other than a newline, got {v!r}")
        return v


LogFormat = Literal["common_apache_log", "combined_apache_log", "apache_error_log", "syslog", "rfc3339_syslog"]


# Kinesis Agent's PatternConstants (grok-style building blocks), written out for Python's re.
_INT = r"(?:[+-]?[0-9]+)"
_POSINT = r"(?:[1-9][0-9]*)"
_NONNEGINT = r"(?:[0-9]+)"
_HOSTNAME = r"(?:[\w\-]+)(?:\.(?:[\w\-]+))*(?:\.?|\b)"
_IPORHOST = rf"(?:{_HOSTNAME}|(?:[\d.]+))"
_URIHOST = rf"(?:{_IPORHOST}(?::{_POSINT})?)"
_USER = r"(?:[a-zA-Z0-9._-]+)"
_MONTHDAY = r"(?:0[1-9]|[12][0-9]|3[01]|[1-9])"
_WEEKDAY = r"(?:Mon(?:day)?|Tue(?:sday)?|Wed(?:nesday)?|Thu(?:rsday)?|Fri(?:day)?|Sat(?:urday)?|Sun(?:day)?)"
_MONTH = (r"\b(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?"
          r"|Sep(?:tember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\b")
_YEAR = r"(?:[1-9]\d*)"
_TIME = r"(?:(?:2[0-3]|[01]?[0-9]):[0-5][0-9]:(?:(?:[0-5]?[0-9]|60)(?:[:.,][0-9]+)?))"
_HTTPDATE = rf"(?:{_MONTHDAY}/{_MONTH}/{_YEAR}:{_TIME}\s{_INT})"
_ERRORLOG_TS = rf"(?:{_WEEKDAY}\s+{_MONTH}\s+{_MONTHDAY}\s+{_TIME}\s+{_YEAR})"
_SYSLOG_TS = rf"(?:{_MONTH}\s+{_MONTHDAY}\s+{_TIME})"
_RFC3339 = r"(?:\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[-+]\d{2}:\d{2}))"
# "<facility.priority> " as Kinesis Agent writes it: its "." is a regex wildcard, kept as such.
_SYSLOG_FACILITY = rf"<{_NONNEGINT}.{_NONNEGINT}>"
_SYSLOG_PROG = rf"([\w._/%-]+)(?:\[({_POSINT})\])?"

_COMMON = rf'({_IPORHOST}) ({_USER}) ({_USER}) \[({_HTTPDATE})\] "([^"]+)" ({_INT}|-) ({_INT}|-)'
_COMBINED = rf'{_COMMON} "([^"]+)" "([^"]+)"'
_SYSLOG_TAIL = rf"(?:{_SYSLOG_FACILITY} )?({_USER}) {_SYSLOG_PROG}: (.*)"

_PATTERNS: dict[str, str] = {
    # The Apache access formats allow anything after the last field (Kinesis Agent appends ".*").
    "common_apache_log": _COMMON + ".*",
    "combined_apache_log": _COMBINED + ".*",
    "apache_error_log": (rf"\[({_ERRORLOG_TS})\] \[(?:(\w+):)?(\w+)\] \[pid ({_NONNEGINT})(?::tid ({_NONNEGINT}))?\]"
                         rf" \[client ({_URIHOST})\] (.*)"),
    "syslog": rf"({_SYSLOG_TS}) {_SYSLOG_TAIL}",
    "rfc3339_syslog": rf"({_RFC3339}) {_SYSLOG_TAIL}",
}

LOG_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "common_apache_log": ("host", "ident", "authuser", "datetime", "request", "response", "bytes"),
    "combined_apache_log": ("host", "ident", "authuser", "datetime", "request", "response", "bytes",
                            "referer", "agent"),
    "apache_error_log": ("timestamp", "module", "severity", "processid", "threadid", "client", "message"),
    "syslog": ("timestamp", "hostname", "program", "processid", "message"),
    "rfc3339_syslog": ("timestamp", "hostname", "program", "processid", "message"),
}
"""Each log format's field names, in group order (Kinesis Agent's; note its spelling ``referer``)."""

_COMPILED: dict[str, re.Pattern[str]] = {name: re.compile(p, re.ASCII) for name, p in _PATTERNS.items()}


class LogToJsonOption(StrictModel):
    """Kinesis Agent's ``LOGTOJSON`` (``logFormat``, ``matchPattern``, ``customFieldNames``).

    ``match_pattern`` is a Python regular expression matched against the whole line; it needs
    ``field_names``, one per capturing group. ``log_format`` is still required with it: it decides
    whether ``-`` becomes ``null`` (the Apache formats) or not (the syslog formats). Without
    ``match_pattern``, ``field_names`` renames the format's fields and must have as many names.
    """

    type: Literal["log_to_json"] = Field(description="`log_to_json` (Kinesis Agent: LOGTOJSON).")
    log_format: LogFormat = Field(
        description="The log format; with `match_pattern` it still decides whether `-` becomes null (the "
        "Apache formats) (Kinesis Agent: logFormat).",
    )
    match_pattern: str | None = Field(
        default=None,
        description="A Python regular expression matched against the whole line instead of the format's; "
        "needs `field_names`, one per group (Kinesis Agent: matchPattern).",
    )
    field_names: list[str] | None = Field(
        default=None,
        description="JSON keys: one per group of `match_pattern`, or new names for all of the format's fields "
        "(Kinesis Agent: customFieldNames).",
    )

    @model_validator(mode="after")
    def _check(self) -> LogToJsonOption:
        if self.match_pattern is not None:
            if self.field_names is None:
                raise ValueError("field_names is required with match_pattern (one name per group)")
            try:
                groups = re.compile(self.match_pattern).groups
            except re.error as exc:
                raise ValueError(f"match_pattern: not a valid regular expression: {exc}") from None
            if groups != len(self.field_names):
                raise ValueError(f"match_pattern has {groups} capturing group{'s' if groups != 1 else ''} "
                                 f"but field_names has {len(self.field_names)} names")
        elif self.field_names is not None:
            want = len(LOG_FORMAT_FIELDS[self.log_format])
            if len(self.field_names) != want:
                raise ValueError(f"{self.log_format} has {want} fields "
                                 f"({', '.join(LOG_FORMAT_FIELDS[self.log_format])}), "
                                 f"field_names has {len(self.field_names)}; rename all of them or give match_pattern")
        return self


class AddMetadataOption(StrictModel):
    """Kinesis Agent's ``ADDMETADATA`` (``timestamp``, ``metadata``)."""

    type: Literal["add_metadata"] = Field(description="`add_metadata` (Kinesis Agent: ADDMETADATA).")
    timestamp: bool = Field(
        default=False,
        description="Add `ts`, the UTC time the record was read (Kinesis Agent: timestamp).",
    )
    metadata: dict[str, Any] = Field(
        default={},
        description="JSON added as `metadata` (Kinesis Agent: metadata).",
    )

    @field_validator("metadata")
    @classmethod
    def _json(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            orjson.dumps(v)
        except TypeError as exc:
            raise ValueError(f"must be JSON (string keys; strings, numbers, booleans, null, lists, maps): {exc}") from None
        return v


FileOption = Annotated[
    Union[SingleLineOption, CsvToJsonOption, LogToJsonOption, AddMetadataOption],  # noqa: UP007
    Field(discriminator="type"),
]
FILE_OPTION_TYPES: tuple[str, ...] = ("single_line", "csv_to_json", "log_to_json", "add_metadata")

_ADAPTER: TypeAdapter[FileOption] = TypeAdapter(FileOption)

Converter = Callable[[bytes], bytes]

# Java's String.trim strips every character up to U+0020, not only whitespace.
_JAVA_TRIM = bytes(range(33))
_ESCAPED_NEWLINE = b"\\\\n"
_DUMPS = orjson.dumps
_NL = orjson.OPT_APPEND_NEWLINE


def _text(record: bytes, option: str) -> str:
    """The record as text without its one trailing newline."""
    if record.endswith(b"\n"):
        record = record[:-1]
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{option}: record is not valid UTF-8 (byte 0x{record[exc.start]:02x} "
                              f"at offset {exc.start})") from None


def _single_line(option: SingleLineOption) -> Converter:
    trim = not option.no_trim
    joiner = _ESCAPED_NEWLINE if option.escape_new_line else b""

    def convert(record: bytes) -> bytes:
        body = record.rstrip(b"\n")
        if b"\n" not in body:  # the common case: one line
            return (body.strip(_JAVA_TRIM) if trim else body) + b"\n"
        lines = body.split(b"\n")
        if trim:
            lines = [line.strip(_JAVA_TRIM) for line in lines]
        return joiner.join(lines) + b"\n"

    return convert


def _csv_to_json(option: CsvToJsonOption) -> Converter:
    names = tuple(option.field_names)
    width = len(names)
    delimiter = option.delimiter
    padding = (None,) * width

    def convert(record: bytes) -> bytes:
        line = _text(record, "csv_to_json")
        columns = line.split(delimiter, width)
        trailing = True
        if len(columns) > width:
            # The unsplit rest: unless it is only delimiters, the columns kept are not at the end.
            trailing = not columns.pop().strip(delimiter)
        if trailing and line:
            # String.split drops the empty strings at the end of a non-empty line: null here.
            while columns and columns[-1] == "":
                columns.pop()
        if len(columns) < width:
            return _DUMPS(dict(zip(names, (*columns, *padding[len(columns):]), strict=True)), option=_NL)
        return _DUMPS(dict(zip(names, columns, strict=True)), option=_NL)

    return convert


def _log_to_json(option: LogToJsonOption) -> Converter:
    if option.match_pattern is not None:
        pattern = re.compile(option.match_pattern)
        what = "match_pattern"
    else:
        pattern = _COMPILED[option.log_format]
        what = f"the {option.log_format} format"
    names = tuple(option.field_names or LOG_FORMAT_FIELDS[option.log_format])
    dash_is_null = option.log_format not in ("syslog", "rfc3339_syslog")
    fullmatch = pattern.fullmatch

    def convert(record: bytes) -> bytes:
        line = _text(record, "log_to_json")
        m = fullmatch(line)
        if m is None:
            raise ConversionError(f"log_to_json: line does not match {what} ({len(line)} characters)")
        values = m.groups()
        if dash_is_null and "-" in values:
            values = tuple(None if v == "-" else v for v in values)
        return _DUMPS(dict(zip(names, values, strict=True)), option=_NL)

    return convert


def _add_metadata(option: AddMetadataOption, clock: Clock) -> Converter:
    # The constant part is serialised once; only the record (and the time) are per-record work.
    middle = b'"metadata":' + _DUMPS(option.metadata) + b',"data":'
    if not option.timestamp:
        head = b"{" + middle

        def convert(record: bytes) -> bytes:
            return head + _DUMPS(_text(record, "add_metadata")) + b"}\n"

        return convert

    now_ms = clock.now_ms
    # '{"ts":"yyyy-MM-ddTHH:mm:ss' for the last second seen; one tuple, so threads never see half of it.
    last: list[tuple[int, bytes]] = [(-1, b"")]

    def convert_ts(record: bytes) -> bytes:
        data = _DUMPS(_text(record, "add_metadata"))
        seconds, millis = divmod(now_ms(), 1000)
        cached_seconds, prefix = last[0]
        if seconds != cached_seconds:
            prefix = b'{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()
            last[0] = (seconds, prefix)
        return b"%s.%03dZ\",%s%s}\n" % (prefix, millis, middle, data)

    return convert_ts


def _build_one(option: FileOption, clock: Clock) -> Converter:
    if isinstance(option, SingleLineOption):
        return _single_line(option)
    if isinstance(option, CsvToJsonOption):
        return _csv_to_json(option)
    if isinstance(option, LogToJsonOption):
        return _log_to_json(option)
    return _add_metadata(option, clock)


def _identity(record: bytes) -> bytes:
    return record


def build_converter(options: Sequence[FileOption], clock: Clock | None = None) -> Callable[[bytes], bytes]:
    """Apply the options in order to one record (the raw bytes of a line or multi-line record,
    including its trailing newline if it had one). Returns the converted record; JSON outputs end
    with ``b"\\n"`` as Kinesis Agent's do. Raises :class:`ConversionError` for a record an option
    cannot convert (not UTF-8 where text is needed, a line the log format does not match, ...).

    ``clock`` stamps ``add_metadata``'s ``ts`` (default: the system clock). No options: the record
    is returned unchanged.
    """
    clk: Clock = clock if clock is not None else SystemClock()
    steps = [_build_one(o, clk) for o in options]
    if not steps:
        return _identity
    if len(steps) == 1:
        return steps[0]
    if len(steps) == 2:
        first, second = steps

        def two(record: bytes) -> bytes:
            return second(first(record))

        return two
    chain = tuple(steps)

    def many(record: bytes) -> bytes:
        for step in chain:
            record = step(record)
        return record

    return many


# --- Kinesis Agent's names (agent.json), for the importer -------------------------------------

_AGENT_LOG_FORMATS = {
    "COMMONAPACHELOG": "common_apache_log",
    "COMBINEDAPACHELOG": "combined_apache_log",
    "APACHEERRORLOG": "apache_error_log",
    "SYSLOG": "syslog",
    "RFC3339SYSLOG": "rfc3339_syslog",
}

_UNMAPPABLE = {
    "ADDEC2METADATA": "EC2 instance metadata is not looked up; use add_metadata with the values as "
                      "fixed metadata, or a transform in the stream's processing: list",
    "ADDBRACKETS": "no equivalent option; wrap records in a transform in the stream's processing: list",
    "USINGPLUGGIN": "Java converter classes cannot run here; port the class to a Python transform "
                    "in the stream's processing: list",
}

# Kinesis Agent splits CSV with String.split, so its delimiter is a Java regular expression: "\\t" is a
# tab and a backslash before a punctuation character stands for the character.
_REGEX_METACHARACTERS = frozenset(".$|()[{^?*+\\")


def _agent_bool(value: Any, key: str) -> bool:
    # Kinesis Agent reads the string with Boolean(String): "true" in any case is true, anything else false.
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.lower() == "true"
    raise ValueError(f"{key} must be \"true\" or \"false\", got {value!r}")


# Each _from_agent_* makes the processing: entry of one optionName, adding notes on what it ignored.
def _from_agent_single_line(option: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    parse = option.get("parseOptions") or []
    if isinstance(parse, str):
        parse = [parse]
    out: dict[str, Any] = {"type": "single_line"}
    for p in parse:
        if p == "NO_TRIM":
            out["no_trim"] = True
        elif p == "ESCAPE_NEW_LINE":
            out["escape_new_line"] = True
        else:
            notes.append(f"SINGLELINE: parseOptions {p!r} is not a Kinesis Agent option; ignored")
    return out


def _from_agent_csv_delimiter(delimiter: Any, notes: list[str]) -> Any:
    """Kinesis Agent's CSV delimiter (a Java regular expression) as the character csv_to_json splits on."""
    if not isinstance(delimiter, str):
        return delimiter  # not a string: refused by csv_to_json's validation
    if len(delimiter) == 1 and delimiter in _REGEX_METACHARACTERS:
        notes.append(f"CSVTOJSON: delimiter {delimiter!r} is a regular-expression metacharacter, which Kinesis "
                     "Agent did not split on as a character; csv_to_json splits on the character itself")
    elif len(delimiter) == 2 and delimiter[0] == "\\" and (delimiter[1] == "t" or not delimiter[1].isalnum()):
        return "\t" if delimiter[1] == "t" else delimiter[1]
    elif len(delimiter) != 1:
        raise ValueError(f"CSVTOJSON: delimiter {delimiter!r} is a regular expression; "
                         f"csv_to_json takes one character")
    return delimiter


def _from_agent_csv_to_json(option: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    delimiter = _from_agent_csv_delimiter(option.get("delimiter", ","), notes)
    return {"type": "csv_to_json", "field_names": option.get("customFieldNames"), "delimiter": delimiter}


def _from_agent_log_to_json(option: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    fmt = option.get("logFormat")
    if fmt not in _AGENT_LOG_FORMATS:
        raise ValueError(f"LOGTOJSON: logFormat must be one of {', '.join(_AGENT_LOG_FORMATS)}, got {fmt!r}")
    out: dict[str, Any] = {"type": "log_to_json", "log_format": _AGENT_LOG_FORMATS[fmt]}
    if option.get("matchPattern") is not None:
        out["match_pattern"] = option["matchPattern"]
    if option.get("customFieldNames") is not None:
        out["field_names"] = option["customFieldNames"]
    return out


def _from_agent_add_metadata(option: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "add_metadata"}
    if "timestamp" in option:
        out["timestamp"] = _agent_bool(option["timestamp"], "ADDMETADATA: timestamp")
    if option.get("metadata") is not None:
        out["metadata"] = option["metadata"]
    return out


# optionName -> (what makes its processing: entry, adding notes on what it ignored; the parameters it reads)
_AGENT_OPTIONS: dict[str, tuple[Callable[[Mapping[str, Any], list[str]], dict[str, Any]], frozenset[str]]] = {
    "SINGLELINE": (_from_agent_single_line, frozenset({"parseOptions"})),
    "CSVTOJSON": (_from_agent_csv_to_json, frozenset({"customFieldNames", "delimiter", "jsonFormat"})),
    "LOGTOJSON": (_from_agent_log_to_json, frozenset({"logFormat", "matchPattern", "customFieldNames", "jsonFormat"})),
    "ADDMETADATA": (_from_agent_add_metadata, frozenset({"timestamp", "metadata", "jsonFormat"})),
}


def from_agent_option(option: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """One of Kinesis Agent's ``dataProcessingOptions`` entries as a file source ``processing:``
    entry, validated, plus notes on parameters that were ignored. Raises ``ValueError`` (saying why,
    and what to use instead where there is something) for an option that cannot be mapped."""
    name = str(option.get("optionName", "")).upper()
    if name in _UNMAPPABLE:
        raise ValueError(f"{name}: {_UNMAPPABLE[name]}")
    if name not in _AGENT_OPTIONS:
        raise ValueError(f"unknown optionName {option.get('optionName')!r}")
    convert, parameters = _AGENT_OPTIONS[name]
    notes: list[str] = []
    out = convert(option, notes)
    notes.extend(_ignored(name, option, parameters))
    try:
        validated = _ADAPTER.validate_python(out)
    except Exception as exc:  # pydantic's ValidationError: name the option and the reason
        raise ValueError(f"{name}: {_first_error(exc)}") from None
    return validated.model_dump(exclude_defaults=True), notes


def _ignored(name: str, option: Mapping[str, Any], parameters: frozenset[str]) -> list[str]:
    """Notes on what in option ``name`` has no effect here: PRETTYPRINT, and parameters other than
    ``optionName`` and the option's own ``parameters``."""
    notes: list[str] = []
    if str(option.get("jsonFormat", "COMPACT")).upper() == "PRETTYPRINT" and "jsonFormat" in parameters:
        notes.append(f"{name}: jsonFormat PRETTYPRINT is not supported; records are compact JSON, one a line")
    used = parameters | {"optionName"}
    notes.extend(f"{name}: unknown parameter {key!r}; ignored" for key in option if key not in used)
    return notes


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    first = errors()[0]
    loc = ".".join(str(p) for p in first["loc"][1:])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
