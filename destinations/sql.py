"""SQL text for the Redshift destination, built only from pieces validated at config time.

Nothing from a record ever reaches SQL text: records travel as ``COPY`` data (``FROM STDIN``) or
stay in S3 (``FROM 's3://...' MANIFEST``). What does reach SQL text is checked here:

* identifiers (``table``, ``columns``, the bookkeeping table) are parsed as SQL identifiers and
  always rendered double-quoted. An unquoted name is folded to lower case first, which is what
  PostgreSQL and Redshift do with it, so quoting changes nothing but makes reserved words
  (``user``, ``timestamp``) and injection attempts harmless;
* ``copy_options`` (Firehose's ``CopyOptions``) must tokenise as COPY options: words, numbers and
  single-quoted strings, with no statement separator or comment; options this destination adds
  itself (``MANIFEST``, credentials) are refused;
* string literals (the manifest URL, the IAM role, access keys) have quotes doubled, and their
  characters are restricted at config time.

Also here: the Redshift manifest document, and the ``JSON 'auto'`` mapping of JSON objects onto
columns used when the daemon streams staged records itself (``COPY ... FROM STDIN``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "BadRecordError",
    "CopyOptions",
    "Identifier",
    "JsonAutoMapper",
    "SqlError",
    "copy_from_s3_sql",
    "copy_from_stdin_sql",
    "json_objects",
    "literal",
    "manifest_document",
    "parse_copy_options",
    "parse_identifier",
    "parse_name",
]

#: Redshift's limit for an identifier, in bytes of UTF-8 (PostgreSQL truncates past 63).
MAX_IDENTIFIER_BYTES = 127

_NAKED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


class SqlError(ValueError):
    """A value that cannot be used in SQL text; the message says what was expected."""


class BadRecordError(ValueError):
    """A staged record that ``JSON 'auto'`` cannot load (not JSON, or not an object)."""


@dataclass(frozen=True, slots=True)
class Identifier:
    """One SQL identifier, as the server stores it (unquoted names already folded to lower case)."""

    name: str

    def sql(self) -> str:
        return '"' + self.name.replace('"', '""') + '"'


def _identifier_at(text: str, pos: int) -> tuple[Identifier, int]:
    if text.startswith('"', pos):
        parts: list[str] = []
        i = pos + 1
        while True:
            end = text.find('"', i)
            if end < 0:
                raise SqlError(f"unterminated quoted identifier at position {pos}")
            parts.append(text[i:end])
            if text.startswith('"', end + 1):  # "" is a literal quote inside a quoted name
                parts.append('"')
                i = end + 2
                continue
            pos = end + 1
            break
        name = "".join(parts)
        if not name:
            raise SqlError("a quoted identifier cannot be empty")
        if "\x00" in name:
            raise SqlError("an identifier cannot contain NUL")
    else:
        m = _NAKED.match(text, pos)
        if m is None:
            raise SqlError(
                f"expected an identifier at position {pos} (letters, digits, _ and $, not starting with a "
                'digit; put any other name in double quotes, "like this")'
            )
        name = m.group().lower()  # ASCII only, as the server folds unquoted names
        pos = m.end()
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise SqlError(f"identifier {name!r} is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return Identifier(name), pos


def parse_name(text: str, max_parts: int = 2) -> tuple[Identifier, ...]:
    """Parse ``name``, ``schema.name`` (up to ``max_parts`` dotted parts; no spaces)."""
    parts: list[Identifier] = []
    pos = 0
    while True:
        ident, pos = _identifier_at(text, pos)
        parts.append(ident)
        if pos == len(text):
            break
        if text[pos] != ".":
            raise SqlError(f"unexpected {text[pos]!r} at position {pos}")
        pos += 1
    if len(parts) > max_parts:
        raise SqlError(f"at most {max_parts} dotted parts (schema.table), got {len(parts)}")
    return tuple(parts)


def parse_identifier(text: str) -> Identifier:
    """Parse exactly one identifier (a column name)."""
    (ident,) = parse_name(text, 1)
    return ident


def name_sql(parts: Sequence[Identifier]) -> str:
    return ".".join(p.sql() for p in parts)


def literal(value: str) -> str:
    """A single-quoted SQL string literal. Callers restrict backslashes at config time (Redshift
    treats ``\\`` in literals as an escape)."""
    return "'" + value.replace("'", "''") + "'"


# --- COPY options -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<string>'(?:[^'\\]|\\.|'')*')|(?P<number>\d+(?:\.\d+)?))",
    re.S,
)
# Options this destination writes itself, or that would make COPY read something else.
_RESERVED_OPTIONS = {
    "MANIFEST": "the destination adds MANIFEST itself",
    "IAM_ROLE": "set iam_role instead",
    "CREDENTIALS": "set iam_role or credentials instead",
    "ACCESS_KEY_ID": "set credentials instead",
    "SECRET_ACCESS_KEY": "set credentials instead",
    "SESSION_TOKEN": "set credentials instead",
    "WITH": "set iam_role or credentials instead",
    "FROM": "the destination names the source itself",
}
# Compression COPY could be told about, but staging only ever writes gzip (or nothing).
_OTHER_COMPRESSION = ("LZOP", "BZIP2", "ZSTD")


@dataclass(frozen=True)
class CopyOptions:
    """Firehose's CopyOptions, tokenised: ``text`` is what goes into the statement (normalised
    spacing, no trailing semicolon); ``words`` the upper-cased option words."""

    text: str
    tokens: tuple[tuple[str, str], ...]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(v.upper() for kind, v in self.tokens if kind == "word")

    @property
    def gzip(self) -> bool:
        return "GZIP" in self.words

    def json_auto(self) -> str | None:
        """For ``copy_from_stdin``: the JSON argument (``auto`` / ``auto ignorecase``), checking
        that nothing but ``[FORMAT [AS]] JSON 'auto'`` and ``GZIP`` is present. Raises SqlError."""
        json_arg: str | None = None
        seen: set[str] = set()
        toks = list(self.tokens)
        i = 0
        while i < len(toks):
            kind, value = toks[i]
            word = value.upper() if kind == "word" else ""
            if word in seen:
                raise SqlError(f"{word} appears twice")
            if word == "GZIP":
                seen.add(word)
                i += 1
                continue
            if word == "FORMAT":
                seen.add(word)
                i += 1
                if i < len(toks) and toks[i][0] == "word" and toks[i][1].upper() == "AS":
                    i += 1
                if not (i < len(toks) and toks[i][0] == "word" and toks[i][1].upper() == "JSON"):
                    raise SqlError("with load_method copy_from_stdin, FORMAT must be FORMAT AS JSON 'auto'")
                continue
            if word == "JSON":
                seen.add(word)
                arg = toks[i + 1] if i + 1 < len(toks) else ("", "")
                text = arg[1][1:-1].lower() if arg[0] == "string" else ""
                if text not in ("auto", "auto ignorecase"):
                    raise SqlError(
                        "with load_method copy_from_stdin, JSON takes 'auto' or 'auto ignorecase' (a JSONPaths "
                        f"file needs copy_from_s3), got {arg[1] or 'nothing'}"
                    )
                json_arg = text
                i += 2
                continue
            raise SqlError(
                f"with load_method copy_from_stdin only JSON 'auto' and GZIP are supported, got {value}"
            )
        if "FORMAT" in seen and json_arg is None:
            raise SqlError("FORMAT AS JSON needs 'auto'")
        return json_arg or "auto"


def parse_copy_options(text: str) -> CopyOptions:
    """Tokenise Firehose's CopyOptions; raise SqlError for anything that is not a COPY option."""
    body = text.strip()
    if body.endswith(";"):  # Firehose's own examples end with one ("delimiter '\t' lzop;")
        body = body[:-1].rstrip()
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None or m.end() == pos:
            rest = body[pos:].lstrip()
            at = len(body) - len(rest)
            what = "an unterminated string" if rest.startswith("'") else repr(rest[:1])
            raise SqlError(
                f"unexpected {what} at position {at}: COPY options are words, numbers and 'quoted strings' "
                "(no ; or comments)"
            )
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    for kind, value in tokens:
        word = value.upper()
        if kind == "word" and word in _RESERVED_OPTIONS:
            raise SqlError(f"{value} is not allowed here: {_RESERVED_OPTIONS[word]}")
        if kind == "word" and word in _OTHER_COMPRESSION:
            raise SqlError(f"{value}: staged files are gzip or uncompressed, never {word.lower()}")
    return CopyOptions(" ".join(v for _k, v in tokens), tuple(tokens))


# --- statements -------------------------------------------------------------------------------------


def _columns_sql(columns: Sequence[Identifier]) -> str:
    return f" ({', '.join(c.sql() for c in columns)})" if columns else ""


def copy_from_s3_sql(
    table: Sequence[Identifier],
    columns: Sequence[Identifier],
    manifest_url: str,
    authorization: str,
    options: CopyOptions | None,
) -> str:
    """Redshift's ``COPY table [(columns)] FROM 's3://...manifest' <authorization> MANIFEST <options>``.

    ``authorization`` is ``IAM_ROLE '...'`` or ``ACCESS_KEY_ID '...' SECRET_ACCESS_KEY '...'``
    (see :func:`authorization_sql`)."""
    tail = f" {options.text}" if options is not None and options.text else ""
    return f"COPY {name_sql(table)}{_columns_sql(columns)} FROM {literal(manifest_url)} {authorization} MANIFEST{tail}"


def copy_from_stdin_sql(table: Sequence[Identifier], columns: Sequence[Identifier]) -> str:
    return f"COPY {name_sql(table)}{_columns_sql(columns)} FROM STDIN"


def authorization_sql(
    iam_role: str | None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
) -> str:
    """The credentials clause of Redshift's COPY: ``IAM_ROLE default``, ``IAM_ROLE 'arn,...'``, or
    ``ACCESS_KEY_ID '...' SECRET_ACCESS_KEY '...' [SESSION_TOKEN '...']``."""
    if iam_role is not None:
        return "IAM_ROLE default" if iam_role == "default" else f"IAM_ROLE {literal(iam_role)}"
    if access_key_id is None or secret_access_key is None:
        raise SqlError("COPY from S3 needs an IAM role or an access key pair")
    clause = f"ACCESS_KEY_ID {literal(access_key_id)} SECRET_ACCESS_KEY {literal(secret_access_key)}"
    if session_token:
        clause += f" SESSION_TOKEN {literal(session_token)}"
    return clause


def manifest_document(bucket: str, keys: Sequence[str]) -> bytes:
    """A Redshift manifest naming the staged objects; every entry is mandatory, so a missing file
    fails the COPY instead of loading part of a batch."""
    entries = [{"url": f"s3://{bucket}/{key}", "mandatory": True} for key in keys]
    return orjson.dumps({"entries": entries})


# --- JSON 'auto' ------------------------------------------------------------------------------------


def json_objects(records: Sequence[bytes], delimiter: bytes | None = None) -> Iterator[dict[str, Any]]:
    """The JSON objects in a staged file, as COPY's JSON reader sees them: a stream of root-level
    objects separated by nothing or whitespace. Records are parsed one by one (the usual case: one
    object per record); if one is not a whole object the rest of the file is read as a stream, so
    an object split across records still loads. Raises BadRecordError for anything else."""
    stream_from = None
    if delimiter and delimiter.strip():
        stream_from = 0  # the file has a non-blank separator between records: read it as written
    else:
        for i, record in enumerate(records):
            try:
                value = orjson.loads(record)
            except orjson.JSONDecodeError:
                stream_from = i
                break
            if type(value) is not dict:
                raise BadRecordError(f"record {i} of the batch is JSON but not an object")
            yield value
    if stream_from is None:
        return
    # The splitter record de-aggregation uses: exact object bytes, byte offsets in its errors.
    from firehose.transforms.processors import _JsonSplitError, _split_json_objects

    sep = delimiter or b""
    body = sep.join(records[stream_from:]) + (sep if records else b"")
    try:
        pieces = _split_json_objects(body)
    except _JsonSplitError as exc:
        raise BadRecordError(f"staged data from record {stream_from} of the batch on: {exc}") from None
    for piece in pieces:
        yield orjson.loads(piece)


def _cell(value: Any) -> Any:
    t = type(value)
    if t is dict or t is list:
        return orjson.dumps(value).decode()  # nested values load as their JSON text
    if t is bool:
        return "true" if value else "false"  # valid for boolean columns and readable in text ones
    return value


class JsonAutoMapper:
    """Maps JSON objects onto columns by key, as Redshift's ``JSON 'auto'`` does: keys match column
    names regardless of case (an exact match wins), a missing key is NULL, other keys are ignored,
    nested objects and arrays load as JSON text.

    The key-to-column plan is cached per distinct key sequence, so a batch of similar records does
    the matching once. Not thread-safe; use one per load."""

    _MAX_PLANS = 1024

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self._lower = tuple(c.lower() for c in columns)
        self._plans: dict[tuple[str, ...], tuple[str | None, ...]] = {}

    def _plan(self, keys: tuple[str, ...]) -> tuple[str | None, ...]:
        present = set(keys)
        plan: list[str | None] = []
        for col, low in zip(self.columns, self._lower, strict=True):
            if col in present:
                plan.append(col)
            else:
                plan.append(next((k for k in keys if k.lower() == low), None))
        if len(self._plans) >= self._MAX_PLANS:
            self._plans.clear()
        result = self._plans[keys] = tuple(plan)
        return result

    def row(self, obj: dict[str, Any]) -> list[Any]:
        keys = tuple(obj)
        plan = self._plans.get(keys) or self._plan(keys)
        return [None if k is None else _cell(obj[k]) for k in plan]
