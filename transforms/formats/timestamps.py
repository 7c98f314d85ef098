"""Timestamps and dates: layout specs (RE2 patterns with named groups, Joda-Time patterns) and
their vectorised parsing, assembled arithmetically with numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from firehose.transforms.formats.arrays import _I64, _MASK, _np_bool, _np_int, _valid

_MONTHS: Final = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_MONTHS_FULL: Final = [
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
]  # fmt: skip
_DAYS: Final = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS_FULL: Final = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


@dataclass(frozen=True)
class _TsRegex:
    """A timestamp layout: an anchored RE2 pattern whose named groups are date/time fields.

    Groups: y (year), yy (two-digit year), mo (month number), mon/month (month name), d (day),
    H (0-23), k (1-24), K (0-11), h (1-12), ampm, mi, s, f (fraction digits), tz (``Z`` or an
    offset); anything else (day names) is matched and ignored.
    """

    pattern: str
    source: str  # what the user wrote, for messages
    # Arrow's ISO-8601 cast accepts exactly the valid dates/times among this layout's matches
    # (checked by the tests), so it replaces the slower capture-group path when every matched
    # text casts: "" for naive, "UTC" for a layout with a zone. None: no such shortcut.
    cast_zone: str | None = None


@dataclass(frozen=True)
class _TsNumber:
    """An integer epoch: ``rule`` is ``openx`` (13+ characters: millis, else seconds) or ``millis``."""

    rule: str


@dataclass(frozen=True)
class _TsFloat:
    """Floating epoch seconds (OpenX), truncated to milliseconds like Java's ``(long)(d*1000)``."""


_TsSpec: TypeAlias = _TsRegex | _TsNumber | _TsFloat

_FRACTION: Final = r"(?:\.(?P<f>[0-9]{1,9}))?"
_OPENX_ZONED: Final = _TsRegex(
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})T(?P<H>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})"
    + _FRACTION
    + r"(?P<tz>Z|[+-][0-9]{2}:?[0-9]{2})$",
    "yyyy-MM-dd'T'HH:mm:ss[.S]'Z'",
    "UTC",
)
_VALUE_OF: Final = _TsRegex(
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2}) "
    r"(?P<H>[0-9]{1,2}):(?P<mi>[0-9]{1,2}):(?P<s>[0-9]{1,2})" + _FRACTION + "$",
    "yyyy-[M]M-[d]d HH:mm:ss[.S]",
    "",
)
_DATE: Final = _TsRegex(r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2})$", "yyyy-[M]M-[d]d", "")
_OPENX_TIMESTAMPS: Final[tuple[_TsSpec, ...]] = (_OPENX_ZONED, _VALUE_OF, _TsNumber("openx"), _TsFloat())

_JODA_NUMERIC: Final = set("yYuMdHkKhmsS")


def _re2_literal(text: str) -> str:
    return "".join(c if c.isalnum() else "\\" + c if c in r"\.^$|?*+()[]{}-/" else c for c in text)


def _compile_joda(pattern: str) -> _TsRegex:
    """Translate a Joda-Time ``DateTimeFormat`` pattern into a :class:`_TsRegex`.

    Supported letters: y/Y/u (year; yy is a two-digit year, 1950..2049 as Joda's default pivot),
    M/MM (month), MMM/MMMM (month name), d, H, k, K, h, m, s, S (fraction), a (AM/PM), E (day
    name, ignored), Z/ZZ (offset or ``Z``); ``'quoted'`` text and other characters are literals.
    Adjacent numeric fields (``yyyyMMdd``) are read with fixed widths. Anything else (zone names,
    week fields, eras) raises ``ValueError``.
    """
    tokens: list[tuple[str, int] | str] = []  # (letter, count) or a literal
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"timestamp format {pattern!r}: unterminated quote at position {i}")
            tokens.append("'" if end == i + 1 else pattern[i + 1 : end])
            i = end + 1
        elif c.isascii() and c.isalpha():
            j = i
            while j < len(pattern) and pattern[j] == c:
                j += 1
            tokens.append((c, j - i))
            i = j
        else:
            tokens.append(c)
            i += 1
    parts: list[str] = []
    used: set[str] = set()

    def group(name: str, body: str) -> str:
        if name in used:
            raise ValueError(f"timestamp format {pattern!r}: field {name!r} appears twice")
        used.add(name)
        return f"(?P<{name}>{body})"

    for pos, tok in enumerate(tokens):
        if isinstance(tok, str):
            parts.append(_re2_literal(tok))
            continue
        letter, count = tok
        nxt = tokens[pos + 1] if pos + 1 < len(tokens) else None
        fixed = isinstance(nxt, tuple) and nxt[0] in _JODA_NUMERIC and not (nxt[0] == "M" and nxt[1] >= 3)

        def digits(lo: int, hi: int, count: int = count, fixed: bool = fixed) -> str:
            width = max(count, lo)
            return f"[0-9]{{{width}}}" if fixed else f"[0-9]{{{lo},{hi}}}"

        if letter in "yYu":
            parts.append(
                group("yy", "[0-9]{2}")
                if count == 2
                else group("y", digits(4, 4) if count <= 4 else digits(count, count))
            )
        elif letter == "M":
            if count >= 4:
                parts.append(group("month", "(?i:" + "|".join(_MONTHS_FULL) + ")"))
            elif count == 3:
                parts.append(group("mon", "(?i:" + "|".join(_MONTHS) + ")"))
            else:
                parts.append(group("mo", digits(1, 2)))
        elif letter in "dHkKhms":
            parts.append(group({"m": "mi", "s": "s"}.get(letter, letter), digits(1, 2)))
        elif letter == "S":
            parts.append(group("f", f"[0-9]{{{count}}}" if fixed else "[0-9]{1,9}"))
        elif letter == "a":
            parts.append(group("ampm", "(?i:am|pm)"))
        elif letter == "E":
            names = _DAYS_FULL if count >= 4 else _DAYS
            parts.append("(?i:" + "|".join(names) + ")")
        elif letter == "Z" and count <= 2:
            parts.append(group("tz", "Z|[+-][0-9]{2}:?[0-9]{2}"))
        else:
            raise ValueError(
                f"timestamp format {pattern!r}: pattern letter {letter * count!r} is not supported "
                "(supported: y M d H k K h m s S a E Z, quoted text)"
            )
    if "h" in used or "K" in used:
        if "H" in used or "k" in used:
            raise ValueError(f"timestamp format {pattern!r}: mixes 12-hour and 24-hour fields")
    return _TsRegex("^" + "".join(parts) + "$", pattern)


def _hive_timestamp_specs(formats: Sequence[str]) -> tuple[_TsSpec, ...]:
    # Hive's TimestampParser tries the configured formats in order, then Timestamp.valueOf.
    specs: list[_TsSpec] = [_TsNumber("millis") if f == "millis" else _compile_joda(f) for f in formats]
    specs.append(_VALUE_OF)
    return tuple(specs)


# --------------------------------------------------------------------------------------------
# Parsing: texts -> microseconds since the epoch, vectorised
# --------------------------------------------------------------------------------------------

_US_PER_SECOND: Final = 1_000_000
_US_PER_DAY: Final = 86_400 * _US_PER_SECOND
_DAYS_0001: Final = -719162  # 0001-01-01 relative to 1970-01-01
_DAYS_10000: Final = 2932897  # 10000-01-01
_MIN_US: Final = _DAYS_0001 * _US_PER_DAY
_MAX_US: Final = _DAYS_10000 * _US_PER_DAY - 1


def _days_from_civil(y: _I64, m: _I64, d: _I64) -> _I64:
    # Howard Hinnant's days_from_civil, vectorised; valid for the years 1..9999 used here.
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _days_in_month(y: _I64, m: _I64) -> _I64:
    lengths = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    return lengths[np.clip(m, 1, 12) - 1] + ((m == 2) & leap)


def _regex_fields(texts: pa.Array, spec: _TsRegex) -> tuple[_MASK, _I64, _MASK]:
    """Match ``texts`` against a layout; return (matched, microseconds since epoch, valid)."""
    n = len(texts)
    st = pc.extract_regex(texts, pattern=spec.pattern)
    matched = _valid(st)
    names = {st.type.field(i).name for i in range(st.type.num_fields)}
    ok = matched.copy()

    def text(name: str) -> pa.Array:
        # Rows that did not match, and optional groups that did not take part, read as null.
        values = st.field(name)
        return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)

    def num(name: str, default: int) -> _I64:
        if name not in names:
            return np.full(n, default, dtype=np.int64)
        return _np_int(pc.cast(text(name), pa.int64()), default)

    if "yy" in names:
        yy = num("yy", 70)
        year = np.where(yy < 50, 2000 + yy, 1900 + yy)  # Joda's two-digit-year pivot around 2000
    else:
        year = num("y", 1970)
    if "mon" in names or "month" in names:
        label = "mon" if "mon" in names else "month"
        table = _MONTHS if label == "mon" else _MONTHS_FULL
        month = _np_int(pc.index_in(pc.utf8_lower(text(label)), value_set=pa.array(table)), -1) + 1
    else:
        month = num("mo", 1)
    day = num("d", 1)
    pm = _np_bool(pc.equal(pc.utf8_lower(text("ampm")), "pm")) if "ampm" in names else np.zeros(n, dtype=bool)
    if "H" in names:
        hour = num("H", 0)
        ok &= hour <= 23
    elif "k" in names:
        raw = num("k", 24)
        ok &= (raw >= 1) & (raw <= 24)
        hour = raw % 24
    elif "K" in names:
        raw = num("K", 0)
        ok &= raw <= 11
        hour = raw + 12 * pm
    elif "h" in names:
        raw = num("h", 12)
        ok &= (raw >= 1) & (raw <= 12)
        hour = raw % 12 + 12 * pm
    else:
        hour = np.zeros(n, dtype=np.int64)
    minute = num("mi", 0)
    second = num("s", 0)
    if "f" in names:
        six = pc.utf8_slice_codeunits(pc.utf8_rpad(text("f"), width=6, padding="0"), 0, 6)
        micros = _np_int(pc.cast(six, pa.int64()), 0)
    else:
        micros = np.zeros(n, dtype=np.int64)
    offset_minutes = np.zeros(n, dtype=np.int64)
    if "tz" in names:
        tz = text("tz")
        tz = pc.if_else(pc.equal(tz, "Z"), pa.scalar(None, pa.string()), tz)
        sign = np.where(_np_bool(pc.starts_with(tz, "-")), -1, 1)
        tz_h = _np_int(pc.cast(pc.utf8_slice_codeunits(tz, 1, 3), pa.int64()), 0)
        tz_m = _np_int(pc.cast(pc.utf8_slice_codeunits(tz, -2), pa.int64()), 0)
        ok &= (tz_h <= 23) & (tz_m <= 59)
        offset_minutes = sign * (tz_h * 60 + tz_m)
    ok &= (year >= 1) & (year <= 9999) & (month >= 1) & (month <= 12) & (day >= 1)
    ok &= day <= _days_in_month(year, month)
    ok &= (minute <= 59) & (second <= 59)
    year = np.where(ok, year, 1970)
    month = np.where(ok, month, 1)
    day = np.where(ok, day, 1)
    days = _days_from_civil(year, month, day)
    us = (days * 86400 + hour * 3600 + minute * 60 + second) * _US_PER_SECOND + micros
    us = us - offset_minutes * 60 * _US_PER_SECOND
    ok &= (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _epoch_number(texts: pa.Array, rule: str) -> tuple[_MASK, _I64, _MASK]:
    # OpenX's ParsePrimitiveUtils.parseTimestamp: integer text of 13+ characters (the length of
    # "1454612111000") is epoch millis, shorter is epoch seconds. Hive's "millis": always millis.
    matched = _np_bool(pc.match_substring_regex(texts, r"^-?[0-9]+$"))
    short = matched & _np_bool(pc.less_equal(pc.utf8_length(texts), 16))  # beyond is out of range anyway
    values = _np_int(pc.cast(pc.if_else(pa.array(short), texts, pa.scalar(None, pa.string())), pa.int64()), 0)
    if rule == "openx":
        millis = _np_bool(pc.greater_equal(pc.utf8_length(texts), 13))
    else:
        millis = np.ones(len(texts), dtype=bool)
    us = np.where(millis, values * 1000, values * _US_PER_SECOND)
    ok = short & (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _epoch_float(texts: pa.Array) -> tuple[_MASK, _I64, _MASK]:
    matched = _np_bool(pc.match_substring_regex(texts, r"^[+-]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"))
    seconds = pc.cast(pc.if_else(pa.array(matched), texts, pa.scalar(None, pa.string())), pa.float64())
    ms_float = np.asarray(pc.multiply(seconds, 1000.0).fill_null(0.0).to_numpy(zero_copy_only=False))
    in_range = np.abs(ms_float) < 4e14
    ms = np.trunc(np.where(in_range, ms_float, 0.0)).astype(np.int64)  # Java's (long) cast truncates
    us = ms * 1000
    ok = matched & in_range & (us >= _MIN_US) & (us <= _MAX_US)
    return matched, np.where(ok, us, 0), ok


def _layout(texts: pa.Array, spec: _TsRegex) -> tuple[_I64, _MASK]:
    """Microseconds and acceptance of each text under one layout."""
    if spec.cast_zone is not None:
        matched = _np_bool(pc.match_substring_regex(texts, spec.pattern))
        rows = np.flatnonzero(matched)
        subset = texts if len(rows) == len(texts) else texts.take(pa.array(rows, pa.int64()))
        try:
            cast = pc.cast(subset, pa.timestamp("us", spec.cast_zone or None))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # e.g. 7-9 fraction digits or one-digit fields: the capture path decides
        else:
            us = np.zeros(len(texts), dtype=np.int64)
            us[rows] = _np_int(pc.cast(cast, pa.int64()), 0)
            ok = matched & (us >= _MIN_US) & (us <= _MAX_US)
            return np.where(ok, us, 0), ok
    _, us, ok = _regex_fields(texts, spec)
    return us, ok


def _parse_instants(texts: pa.Array, specs: Sequence[_TsSpec]) -> tuple[_I64, _MASK]:
    """Microseconds since the epoch for each text (first layout that fits wins); the mask marks
    non-null texts no layout accepts."""
    n = len(texts)
    out = np.zeros(n, dtype=np.int64)
    pending = _valid(texts)
    for spec in specs:
        rows = np.flatnonzero(pending)
        if not len(rows):
            break
        sub = texts if len(rows) == n else texts.take(pa.array(rows, pa.int64()))
        if isinstance(spec, _TsRegex):
            us, ok = _layout(sub, spec)
        elif isinstance(spec, _TsNumber):
            _, us, ok = _epoch_number(sub, spec.rule)
        else:
            _, us, ok = _epoch_float(sub)
        done = rows[ok]
        out[done] = us[ok]
        pending[done] = False
    return out, pending
