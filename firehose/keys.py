"""Amazon Kinesis Data Firehose's S3 object key naming, as pure functions.

A key is ``<evaluated prefix><object name>``:

* The prefix is the configured ``Prefix`` (or ``ErrorOutputPrefix`` for failed records) with its
  ``!{namespace:value}`` expressions evaluated. A prefix without any ``!{timestamp:...}`` gets the
  default ``!{timestamp:yyyy/MM/dd/HH/}`` appended by plain concatenation, so ``"logs"`` yields
  ``logs2024/05/01/13/``.
* The object name is ``<stream>-<version>-YYYY-MM-DD-HH-MM-SS-<uuid><extension>``.

Expressions:

``!{timestamp:<pattern>}``
    the instant formatted with a ``java.time.format.DateTimeFormatter`` pattern (see
    :func:`java_datetime_format`); every occurrence in one prefix formats the same instant.
``!{firehose:random-string}``
    11 random lowercase hex characters, drawn anew for each occurrence.
``!{firehose:error-output-type}``
    why the records failed (``processing-failed``, ``format-conversion-failed``, ...); only in
    ``ErrorOutputPrefix``.
``!{partitionKeyFromQuery:<key>}`` / ``!{partitionKeyFromLambda:<key>}``
    a dynamic-partitioning key's value; only in ``Prefix`` and only with dynamic partitioning.

Nothing here reads the clock, draws from a global random source or does I/O: the instant and a
``random.Random`` are passed in, so keys are reproducible in tests. Configuration problems raise
:class:`PrefixError`, worded like the InvalidArgumentException Firehose returns where its wording
is known.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Final, TypeAlias

__all__ = [
    "DEFAULT_TIMESTAMP_PATTERN",
    "MAX_EVALUATED_PREFIX_LENGTH",
    "MAX_PREFIX_LENGTH",
    "RANDOM_STRING_LENGTH",
    "PrefixError",
    "evaluate_error_prefix",
    "evaluate_prefix",
    "java_datetime_format",
    "object_name",
    "random_object_suffix",
    "validate_prefixes",
]

#: API limit on the configured Prefix and ErrorOutputPrefix strings.
MAX_PREFIX_LENGTH: Final = 1024
#: Firehose's limit on a prefix after evaluation.
MAX_EVALUATED_PREFIX_LENGTH: Final = 512
#: Length of ``!{firehose:random-string}``.
RANDOM_STRING_LENGTH: Final = 11
#: What Firehose appends to a prefix that has no timestamp expression.
DEFAULT_TIMESTAMP_PATTERN: Final = "yyyy/MM/dd/HH/"

_TIMESTAMP: Final = "timestamp"
_FIREHOSE: Final = "firehose"
_FROM_QUERY: Final = "partitionKeyFromQuery"
_FROM_LAMBDA: Final = "partitionKeyFromLambda"
_NAMESPACES: Final = (_FIREHOSE, _TIMESTAMP, _FROM_QUERY, _FROM_LAMBDA)
_PARTITION_NAMESPACES: Final = (_FROM_QUERY, _FROM_LAMBDA)
_RANDOM_STRING: Final = "random-string"
_ERROR_OUTPUT_TYPE: Final = "error-output-type"
_FIREHOSE_VALUES: Final = (_ERROR_OUTPUT_TYPE, _RANDOM_STRING)
_ERROR_OUTPUT_TYPE_EXPRESSION: Final = "!{firehose:error-output-type}"


class PrefixError(ValueError):
    """A Prefix or ErrorOutputPrefix that Firehose would reject, or that can't be evaluated.

    Raised by :func:`validate_prefixes` for configuration errors (Firehose answers those with
    InvalidArgumentException) and by the evaluate functions for per-object failures such as a
    missing partition key or an evaluated prefix over 512 characters (Firehose routes such records
    to the error prefix).
    """


# --- Java DateTimeFormatter patterns ----------------------------------------------------------------

# English text as java.time prints it for Locale.US (the JVM default Firehose's formatters see).
_MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_Renderer: TypeAlias = Callable[[datetime, int], str]


def _number(value: int, width: int) -> str:
    return f"{value:0{width}d}"


def _year(value: int, count: int) -> str:
    # "yy" is the two-digit reduced year; any other count is a minimum width ("y" = unpadded).
    return _number(value % 100, 2) if count == 2 else _number(value, count)


def _text(full: str, count: int) -> str:
    # 1-3 letters: short form ("Jan", "Mon"); 4: full; 5: narrow (first letter).
    if count == 4:
        return full
    if count == 5:
        return full[0]
    return full[:3]


def _us_week(when: datetime) -> tuple[int, int]:
    """Return (week-based-year, week-of-week-based-year) with Locale.US rules.

    java.time takes ``Y`` and ``w`` from WeekFields.of(locale); for the US weeks start on Sunday
    and week 1 is the week that contains January 1st, so the last days of December can belong to
    week 1 of the next year.
    """
    day = when.date()
    week_start = day - timedelta(days=(day.weekday() + 1) % 7)
    year = (week_start + timedelta(days=6)).year
    january_first = date(year, 1, 1)
    first_week_start = january_first - timedelta(days=(january_first.weekday() + 1) % 7)
    return year, (week_start - first_week_start).days // 7 + 1


def _month(when: datetime, count: int) -> str:
    return _number(when.month, count) if count <= 2 else _text(_MONTHS[when.month - 1], count)


def _quarter(when: datetime, count: int) -> str:
    quarter = (when.month - 1) // 3 + 1
    if count <= 2:
        return _number(quarter, count)
    if count == 3:
        return f"Q{quarter}"
    if count == 4:
        return f"{quarter}{('st', 'nd', 'rd', 'th')[quarter - 1]} quarter"
    return str(quarter)


def _offset(when: datetime, style: str, zero: str) -> str:
    """Render ``when``'s UTC offset like DateTimeFormatterBuilder.appendOffset(style, zero).

    Naive datetimes count as UTC. Styles: "+HHmm" (minutes only if non-zero), "+HHMM", "+HH:MM",
    "+HHMMss" / "+HH:MM:ss" (seconds only if non-zero).
    """
    offset = when.utcoffset()
    total = 0 if offset is None else int(offset.total_seconds())
    if total == 0:
        return zero
    sign = "+" if total > 0 else "-"
    hours, rest = divmod(abs(total), 3600)
    minutes, seconds = divmod(rest, 60)
    colon = ":" if ":" in style else ""
    text = f"{sign}{hours:02d}"
    shown = hours
    if style != "+HHmm" or minutes:
        text += f"{colon}{minutes:02d}"
        shown += minutes
    if style.endswith("ss") and seconds:
        text += f"{colon}{seconds:02d}"
        shown += seconds
    # An offset whose printed digits are all zero (a few seconds off UTC) prints as no offset.
    return text if shown else zero


_OFFSET_STYLES: Final = ("+HHmm", "+HHMM", "+HH:MM", "+HHMMss", "+HH:MM:ss")


def _offset_x(when: datetime, count: int, *, zero_as_z: bool) -> str:
    style = _OFFSET_STYLES[count - 1]
    if zero_as_z:
        return _offset(when, style, "Z")
    return _offset(when, style, "+00" if count == 1 else "+00:00" if ":" in style else "+0000")


def _offset_z(when: datetime, count: int) -> str:
    if count <= 3:
        return _offset(when, "+HHMM", "+0000")
    if count == 4:  # localized full form: GMT, GMT+08:00
        text = _offset(when, "+HH:MM:ss", "")
        return f"GMT{text}"
    return _offset(when, "+HH:MM:ss", "Z")


# letter -> (largest count java.time accepts, renderer)
_FIELDS: Final[dict[str, tuple[int, _Renderer]]] = {
    "y": (19, lambda w, n: _year(w.year, n)),  # year-of-era
    "u": (19, lambda w, n: _year(w.year, n)),  # proleptic year; equal to year-of-era for AD years
    "Y": (19, lambda w, n: _year(_us_week(w)[0], n)),  # week-based year
    "M": (5, _month),
    "L": (5, _month),  # stand-alone month: identical to M in English
    "d": (2, lambda w, n: _number(w.day, n)),
    "D": (3, lambda w, n: _number(w.timetuple().tm_yday, n)),
    "w": (2, lambda w, n: _number(_us_week(w)[1], n)),
    "E": (5, lambda w, n: _text(_WEEKDAYS[w.weekday()], n)),
    "a": (1, lambda w, n: "AM" if w.hour < 12 else "PM"),
    "H": (2, lambda w, n: _number(w.hour, n)),
    "k": (2, lambda w, n: _number(w.hour or 24, n)),
    "K": (2, lambda w, n: _number(w.hour % 12, n)),
    "h": (2, lambda w, n: _number(w.hour % 12 or 12, n)),
    "m": (2, lambda w, n: _number(w.minute, n)),
    "s": (2, lambda w, n: _number(w.second, n)),
    # fraction-of-second, truncated to n digits; datetime stops at microseconds, so digits 7-9 are 0
    "S": (9, lambda w, n: f"{w.microsecond:06d}000"[:n]),
    "Q": (5, _quarter),
    "q": (5, _quarter),
    "X": (5, lambda w, n: _offset_x(w, n, zero_as_z=True)),
    "x": (5, lambda w, n: _offset_x(w, n, zero_as_z=False)),
    "Z": (5, _offset_z),
}

# Literal pieces are str; fields are (letter, count).
_PatternItem: TypeAlias = str | tuple[str, int]


@lru_cache(maxsize=256)
def _compile_pattern(pattern: str) -> tuple[_PatternItem, ...]:
    """Parse a DateTimeFormatter pattern into literals and fields, rejecting what java.time rejects.

    Raises PrefixError (without the expression context; callers add it).
    """
    items: list[_PatternItem] = []
    depth = 0  # optional-section nesting
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char.isascii() and char.isalpha():
            end = i
            while end < len(pattern) and pattern[end] == char:
                end += 1
            count = end - i
            spec = _FIELDS.get(char)
            if spec is None:
                raise PrefixError(f"unsupported pattern letter {char!r}")
            if count > spec[0]:
                raise PrefixError(f"too many pattern letters: {char * count!r}")
            items.append((char, count))
            i = end
        elif char == "'":
            # Quoted literal, scanned as java.time does: a doubled quote inside stays in the text
            # (then collapses to one), and an empty literal ('') stands for a single quote.
            end = i + 1
            while end < len(pattern):
                if pattern[end] == "'":
                    if end + 1 < len(pattern) and pattern[end + 1] == "'":
                        end += 1
                    else:
                        break
                end += 1
            if end >= len(pattern):
                raise PrefixError("pattern ends with an incomplete string literal")
            literal = pattern[i + 1 : end]
            items.append(literal.replace("''", "'") if literal else "'")
            i = end + 1
        elif char == "[":
            # Optional section: every field is available when formatting an instant, so its content
            # always prints; the brackets themselves print nothing.
            depth += 1
            i += 1
        elif char == "]":
            if depth == 0:
                raise PrefixError("pattern contains ] without a previous [")
            depth -= 1
            i += 1
        elif char in "#{}":
            raise PrefixError(f"pattern character {char!r} is reserved")
        else:
            items.append(char)
            i += 1
    return tuple(items)


def java_datetime_format(pattern: str, when: datetime) -> str:
    """Format ``when`` like ``DateTimeFormatter.ofPattern(pattern, Locale.US).format(when)``.

    Supported letters: ``y u Y`` (years; two letters = two-digit year, otherwise a minimum width),
    ``M L`` (1-2 digits, ``MMM`` "Jan", ``MMMM`` "January", ``MMMMM`` "J"), ``d``, ``D`` (day of
    year), ``w`` (week of week-based year, US rules), ``E`` (``E``-``EEE`` "Wed", ``EEEE``
    "Wednesday"), ``a`` (AM/PM), ``H k K h m s``, ``S``-``SSSSSSSSS`` (fraction of second),
    ``Q q`` (quarter) and the offsets ``X x Z`` (a naive ``when`` counts as UTC). ``'text'`` is
    literal, ``''`` is a single quote, ``[...]`` optional sections always print their content, and
    other non-letters print as themselves. Fields use ``when``'s own wall-clock time, so pass the
    instant in UTC (or the stream's time zone). Raises PrefixError for other letters (zone names
    and ids, eras, localized fields), too many letters, an unterminated quote, an unmatched ``]``
    and the reserved ``# { }``. Every case was checked against java.time on JDK 17.
    """
    parts: list[str] = []
    for item in _compile_pattern(pattern):
        if isinstance(item, str):
            parts.append(item)
        else:
            letter, count = item
            parts.append(_FIELDS[letter][1](when, count))
    return "".join(parts)


# --- prefix expressions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Expression:
    namespace: str
    value: str


@dataclass(frozen=True, slots=True)
class _Template:
    """A parsed prefix: literal text and expressions in order, plus what the rules need to know."""

    parts: tuple[str | _Expression, ...]
    expressions: tuple[_Expression, ...]
    has_timestamp: bool

    @classmethod
    def of(cls, parts: list[str | _Expression]) -> _Template:
        expressions = tuple(part for part in parts if isinstance(part, _Expression))
        return cls(tuple(parts), expressions, any(e.namespace == _TIMESTAMP for e in expressions))

    def uses(self, namespace: str, value: str) -> bool:
        return any(e.namespace == namespace and e.value == value for e in self.expressions)

    @property
    def uses_partition_keys(self) -> bool:
        return any(e.namespace in _PARTITION_NAMESPACES for e in self.expressions)

    @property
    def fixed_length(self) -> int:
        """Characters every evaluation has at least: literals plus random strings."""
        literal = sum(len(part) for part in self.parts if isinstance(part, str))
        return literal + RANDOM_STRING_LENGTH * sum(
            1 for e in self.expressions if (e.namespace, e.value) == (_FIREHOSE, _RANDOM_STRING)
        )


_DEFAULT_TIMESTAMP: Final = _Expression(_TIMESTAMP, DEFAULT_TIMESTAMP_PATTERN)


@lru_cache(maxsize=1024)
def _parse(text: str, field: str) -> _Template:
    """Split a prefix into literals and expressions, checking each expression on its own.

    Cached because dynamic partitioning evaluates the same Prefix for every record.
    """
    parts: list[str | _Expression] = []
    pos = 0
    while True:
        start = text.find("!{", pos)
        if start < 0:
            break
        if start > pos:
            parts.append(text[pos:start])
        end = text.find("}", start + 2)
        body = text[start + 2 : end] if end >= 0 else ""
        if end < 0 or "!{" in body or ":" not in body:
            raise PrefixError(
                f"The sequence !{{ can only appear in !{{namespace:value}} expressions; {field} has one "
                f"at position {start} that isn't one: {text!r}"
            )
        namespace, value = body.split(":", 1)
        expression = f"!{{{body}}}"
        if namespace not in _NAMESPACES:
            raise PrefixError(
                f"Unknown namespace {namespace!r} in {field} expression {expression}; "
                f"valid namespaces are {', '.join(_NAMESPACES)}"
            )
        if not value:
            raise PrefixError(f"The {namespace} expression in {field} has no value: {expression}")
        if namespace == _FIREHOSE and value not in _FIREHOSE_VALUES:
            raise PrefixError(
                f"Unknown value {value!r} for the firehose namespace in {field} expression {expression}; "
                f"valid values are {', '.join(_FIREHOSE_VALUES)}"
            )
        if namespace == _TIMESTAMP:
            try:
                _compile_pattern(value)
            except PrefixError as exc:
                raise PrefixError(
                    f"Invalid DateTimeFormatter pattern in {field} expression {expression}: {exc}"
                ) from None
        parts.append(_Expression(namespace, value))
        pos = end + 1
    if pos < len(text):
        parts.append(text[pos:])
    return _Template.of(parts)


def _check_length(text: str, field: str) -> None:
    if len(text) > MAX_PREFIX_LENGTH:
        raise PrefixError(
            f"Value at '{field}' failed to satisfy constraint: Member must have length less than or equal "
            f"to {MAX_PREFIX_LENGTH} (got {len(text)})"
        )


def validate_prefixes(
    prefix: str, error_output_prefix: str | None, *, dynamic_partitioning: bool = False
) -> None:
    """Apply Firehose's rules for a Prefix / ErrorOutputPrefix pair; raise PrefixError on the first break.

    ``error_output_prefix`` None or "" means "not set". Rules, in the order checked:

    * each string is at most 1024 characters;
    * ``!{`` appears only in well-formed ``!{namespace:value}`` expressions with a known namespace,
      a known ``firehose`` value and a valid timestamp pattern;
    * Prefix doesn't contain ``!{firehose:error-output-type}``;
    * partition-key expressions only with dynamic partitioning, and then Prefix must contain at least
      one and ErrorOutputPrefix must be set;
    * ErrorOutputPrefix may be unset only when Prefix has no expressions;
    * ErrorOutputPrefix never uses partition keys, and if it has any expression it has at least one
      ``!{firehose:error-output-type}``;
    * neither can evaluate to more than 512 characters. Only what is certain now is checked here
      (literal text and random strings); :func:`evaluate_prefix` checks each actual evaluation.
    """
    prefix = prefix or ""
    error_output_prefix = error_output_prefix or None
    _check_length(prefix, "Prefix")
    if error_output_prefix is not None:
        _check_length(error_output_prefix, "ErrorOutputPrefix")

    template = _parse(prefix, "Prefix")
    if template.uses(_FIREHOSE, _ERROR_OUTPUT_TYPE):
        raise PrefixError(f"Prefix can't contain {_ERROR_OUTPUT_TYPE_EXPRESSION}")
    if template.uses_partition_keys and not dynamic_partitioning:
        raise PrefixError(
            "Prefix can only use !{partitionKeyFromQuery:...} and !{partitionKeyFromLambda:...} "
            "expressions when dynamic partitioning is enabled"
        )
    if dynamic_partitioning:
        if not template.uses_partition_keys:
            raise PrefixError(
                "When dynamic partitioning is enabled, Prefix must contain at least one "
                "!{partitionKeyFromQuery:...} or !{partitionKeyFromLambda:...} expression"
            )
        if error_output_prefix is None:
            raise PrefixError("ErrorOutputPrefix is required when dynamic partitioning is enabled")
    if error_output_prefix is None and template.expressions:
        raise PrefixError("ErrorOutputPrefix can't be null when Prefix contains expressions")
    if template.fixed_length > MAX_EVALUATED_PREFIX_LENGTH:
        raise PrefixError(
            f"Prefix can't be greater than {MAX_EVALUATED_PREFIX_LENGTH} characters after it's evaluated"
        )

    if error_output_prefix is None:
        return
    error_template = _parse(error_output_prefix, "ErrorOutputPrefix")
    if error_template.uses_partition_keys:
        raise PrefixError(
            "ErrorOutputPrefix can't contain !{partitionKeyFromQuery:...} or !{partitionKeyFromLambda:...} "
            "expressions"
        )
    if error_template.expressions and not error_template.uses(_FIREHOSE, _ERROR_OUTPUT_TYPE):
        raise PrefixError(
            "If you specify an expression for ErrorOutputPrefix, you must include at least one instance of "
            f"{_ERROR_OUTPUT_TYPE_EXPRESSION}"
        )
    if error_template.fixed_length > MAX_EVALUATED_PREFIX_LENGTH:
        raise PrefixError(
            f"ErrorOutputPrefix can't be greater than {MAX_EVALUATED_PREFIX_LENGTH} characters after it's evaluated"
        )


def _random_string(rng: random.Random) -> str:
    # Firehose's docs show both "5abf82daaa5" and "046b6c7f-0b" (a UUID's first 11 characters);
    # plain lowercase hex matches the former and keeps keys free of extra separators.
    return f"{rng.getrandbits(4 * RANDOM_STRING_LENGTH):0{RANDOM_STRING_LENGTH}x}"


# On a file system (the local destination, backup directories) a key is a path: a partition-key
# value must stay one path segment there. These characters are written as %XX (upper-case hex of
# their UTF-8 bytes), and "%" itself too, so the encoding is reversible: urllib.parse.unquote gives
# the value back. A value that is exactly "." or ".." becomes "%2E" / "%2E%2E". S3 keys are not
# paths and keep Firehose's behaviour: the value as it is.
_SEGMENT_UNSAFE = re.compile(r"[%/\\\x00-\x1f\x7f]")
MAX_SEGMENT_BYTES = 255  # NAME_MAX of Linux file systems


def path_segment(value: str) -> str:
    """``value`` encoded so that it is one file-system path segment (see ``_SEGMENT_UNSAFE``).
    Raises PrefixError when even the encoded value cannot be one (longer than 255 bytes)."""
    out = _SEGMENT_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)
    if out in (".", ".."):
        out = "%2E" * len(out)
    if len(out.encode()) > MAX_SEGMENT_BYTES:
        raise PrefixError(f"partition key value is {len(out.encode())} bytes as a path segment; the limit is "
                          f"{MAX_SEGMENT_BYTES}")
    return out


def check_path_prefix(text: str, field: str) -> None:
    """A Prefix or ErrorOutputPrefix of a file-system destination must stay under its root: no
    leading "/", no "." or ".." segment, no backslash or control character in its literal text.
    Raises PrefixError naming the problem."""
    literal = "".join(p for p in _parse(text, field).parts if isinstance(p, str))
    if text.startswith("/"):
        raise PrefixError(f"{field} must be relative to the destination's path (it starts with '/')")
    if any(seg in (".", "..") for seg in literal.split("/")):
        raise PrefixError(f"{field} must stay under the destination's path (it has a '.' or '..' segment)")
    if re.search(r"[\\\x00-\x1f\x7f]", literal):
        raise PrefixError(f"{field} must not contain a backslash or control characters")


def _evaluate(
    text: str,
    field: str,
    when: datetime,
    rng: random.Random,
    partition_keys: Mapping[str, str] | None,
    error_output_type: str | None,
    segments: bool = False,
) -> str:
    template = _parse(text, field)
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
        elif part.namespace == _TIMESTAMP:
            out.append(java_datetime_format(part.value, when))
        elif part.namespace == _FIREHOSE and part.value == _RANDOM_STRING:
            out.append(_random_string(rng))
        elif part.namespace == _FIREHOSE:  # error-output-type
            if not error_output_type:
                raise PrefixError(
                    f"{field} uses {_ERROR_OUTPUT_TYPE_EXPRESSION} but no error output type applies"
                )
            out.append(error_output_type)
        else:  # partitionKeyFromQuery / partitionKeyFromLambda
            # Keys may be namespaced ("partitionKeyFromQuery:customer_id", as the stream records
            # them, so a query key and a Lambda key of the same name stay apart) or plain.
            value = None
            if partition_keys is not None:
                value = partition_keys.get(f"{part.namespace}:{part.value}")
                if value is None:
                    value = partition_keys.get(part.value)
            if value is None:
                raise PrefixError(
                    f"{field} uses !{{{part.namespace}:{part.value}}} but the record has no partition key "
                    f"{part.value!r}"
                )
            out.append(path_segment(value) if segments else value)
    evaluated = "".join(out)
    # The limit applies to what the configured text evaluates to: a 512-character literal prefix is
    # accepted although the implicit default timestamp then pushes the key prefix past 512.
    if len(evaluated) > MAX_EVALUATED_PREFIX_LENGTH:
        raise PrefixError(
            f"{field} can't be greater than {MAX_EVALUATED_PREFIX_LENGTH} characters after it's evaluated "
            f"(got {len(evaluated)})"
        )
    if not template.has_timestamp:
        evaluated += java_datetime_format(DEFAULT_TIMESTAMP_PATTERN, when)
    return evaluated


def partition_key_refs(prefix: str) -> tuple[str, ...]:
    """The partition keys a Prefix uses, namespaced (``partitionKeyFromQuery:customer_id``), each
    once, in order of first use: a record's values for them identify its partition."""
    seen: dict[str, None] = {}
    for e in _parse(prefix or "", "Prefix").expressions:
        if e.namespace in _PARTITION_NAMESPACES:
            seen.setdefault(f"{e.namespace}:{e.value}")
    return tuple(seen)


def evaluate_prefix(
    prefix: str,
    when: datetime,
    rng: random.Random,
    *,
    partition_keys: Mapping[str, str] | None = None,
    error_output_type: str | None = None,
    path_segments: bool = False,
) -> str:
    """Evaluate a prefix for one object and return the key's leading part.

    ``when`` is the arrival time of the object's oldest record; timestamp fields use its own
    wall-clock time (callers pass UTC, or the stream's CustomTimeZone), and every timestamp
    expression formats that same instant. If the prefix has no timestamp expression the default
    ``yyyy/MM/dd/HH/`` is appended by plain concatenation ("" -> "2024/05/01/13/", "logs" ->
    "logs2024/05/01/13/"). Each ``!{firehose:random-string}`` draws 11 fresh hex characters from
    ``rng`` (left to right, so a seeded rng gives a reproducible key). ``error_output_type``
    fills ``!{firehose:error-output-type}``; ``partition_keys`` fills both partition-key
    namespaces.

    ``path_segments``: the key names a file (see :func:`path_segment`): each partition-key value
    is encoded as one path segment.

    Raises PrefixError for a malformed expression, a missing partition key or error output type,
    or a result over 512 characters. Cross-field rules are :func:`validate_prefixes`' job.
    """
    return _evaluate(prefix or "", "Prefix", when, rng, partition_keys, error_output_type, path_segments)


def evaluate_error_prefix(
    prefix: str,
    error_output_prefix: str | None,
    when: datetime,
    rng: random.Random,
    error_output_type: str,
    *,
    partition_keys: Mapping[str, str] | None = None,
) -> str:
    """Evaluate where failed records of type ``error_output_type`` go.

    With ErrorOutputPrefix set, it is evaluated like :func:`evaluate_prefix` (including the default
    timestamp when it has none). With ErrorOutputPrefix None or "", the Prefix must be plain and
    the result is ``<Prefix><error_output_type>/yyyy/MM/dd/HH/``; a Prefix with expressions then
    raises PrefixError, as Firehose refuses that configuration. ``partition_keys`` is accepted so a
    record's keys can be passed uniformly, but ErrorOutputPrefix can never reference them.
    """
    del partition_keys  # ErrorOutputPrefix can't use partition keys (validate_prefixes rejects them)
    if error_output_prefix:
        return _evaluate(error_output_prefix, "ErrorOutputPrefix", when, rng, None, error_output_type)
    prefix = prefix or ""
    if _parse(prefix, "Prefix").expressions:
        raise PrefixError("ErrorOutputPrefix can't be null when Prefix contains expressions")
    plain = f"{prefix}{error_output_type}/"
    if len(plain) > MAX_EVALUATED_PREFIX_LENGTH:
        raise PrefixError(
            f"Prefix can't be greater than {MAX_EVALUATED_PREFIX_LENGTH} characters after it's evaluated "
            f"(got {len(plain)})"
        )
    return plain + java_datetime_format(DEFAULT_TIMESTAMP_PATTERN, when)


def object_name(stream: str, version: int, when: datetime, random_part: str, extension: str) -> str:
    """Return Firehose's object name: ``<stream>-<version>-YYYY-MM-DD-HH-MM-SS-<random><extension>``.

    ``when`` is the same instant as the prefix's (its own wall-clock fields are used);
    ``random_part`` is normally :func:`random_object_suffix`'s UUID and ``extension`` the codec's
    extension or the configured FileExtension (may be ""). Example:
    ``mystream-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa.gz``.
    """
    stamp = (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}-{when.hour:02d}-{when.minute:02d}-{when.second:02d}"
    )
    return f"{stream}-{version}-{stamp}-{random_part}{extension}"


def random_object_suffix(rng: random.Random) -> str:
    """Return a random version-4 UUID string (36 characters) drawn from ``rng``.

    Drawing from the given generator instead of ``uuid.uuid4()`` keeps keys reproducible with a
    seeded rng; the version and variant bits are set as uuid4 sets them.
    """
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
