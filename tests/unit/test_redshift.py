"""Redshift destination without servers: config rules and their messages, identifiers, COPY
statements parsed by sqlfluff's Redshift dialect, the manifest layout, JSON 'auto' mapping."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from firehose.config import ConfigError, load_config_text
from firehose.destinations.redshift import RedshiftDestination, RedshiftDestinationConfig, manifest_key
from firehose.destinations.sql import (
    BadRecordError,
    JsonAutoMapper,
    SqlError,
    json_objects,
    manifest_document,
    parse_copy_options,
    parse_name,
)
from firehose.interfaces import BuildContext

ENV = {"REDSHIFT_PASSWORD": "s3cr3t-Pa55word"}
GOOD = """\
streams:
  - name: clicks
    destination:
      type: redshift
      connection:
        host: cluster.example.internal
        port: 5439
        database: dev
        user: firehose
        password: ${REDSHIFT_PASSWORD}
      table: public.clicks
      columns: [event_id, ts, user_id, page]
      copy_options: "JSON 'auto' GZIP TIMEFORMAT 'auto'"
      load_method: copy_from_s3
      iam_role: arn:aws:iam::123456789012:role/firehose-copy
      staging: {type: s3, bucket: staging-bucket, prefix: "firehose/", compression: gzip}
      retry_duration_secs: 3600
"""


def config(text: str = GOOD) -> Any:
    return load_config_text(text, "f.yaml", ENV).streams[0].destination


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", ENV if env is None else env)
    return info.value.errors


def test_the_documented_config_loads_with_firehose_defaults() -> None:
    cfg = load_config_text(GOOD, "f.yaml", ENV).streams[0]
    dest = cfg.destination
    assert isinstance(dest, RedshiftDestinationConfig)
    assert (cfg.buffering.size_mib, cfg.buffering.interval_secs) == (5, 300)  # S3 staging's defaults
    assert dest.connection.password.get_secret_value() == ENV["REDSHIFT_PASSWORD"]
    assert dest.bookkeeping_table == "firehose_loaded_manifests"
    assert ENV["REDSHIFT_PASSWORD"] not in repr(dest) + str(dest.model_dump(mode="json")) + cfg.fingerprint()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("table: public.clicks", "table: 'clicks; DROP TABLE users'",
         "f.yaml:11: streams[0].destination.table: must be a table name (name or schema.name, \"quoted\" if need "
         "be): unexpected ';' at position 6; got 'clicks; DROP TABLE users'"),
        ("table: public.clicks", "table: a.b.c", "f.yaml:11: streams[0].destination.table: must be a table name "
         "(name or schema.name, \"quoted\" if need be): at most 2 dotted parts (schema.table), got 3; got 'a.b.c'"),
        ("columns: [event_id, ts, user_id, page]", "columns: [event_id, 'ts) FROM x --']",
         "f.yaml:12: streams[0].destination.columns: column 'ts) FROM x --' is not a column name: unexpected ')' "
         "at position 2"),
        ("columns: [event_id, ts, user_id, page]", "columns: [event_id, EVENT_ID]",
         "f.yaml:12: streams[0].destination.columns: column 'EVENT_ID' is listed twice (also 'event_id')"),
        ("copy_options: \"JSON 'auto' GZIP TIMEFORMAT 'auto'\"", "copy_options: \"GZIP; DELETE FROM clicks\"",
         "f.yaml:13: streams[0].destination.copy_options: unexpected ';' at position 4: COPY options are words, "
         "numbers and 'quoted strings' (no ; or comments); got 'GZIP; DELETE FROM clicks'"),
        ("copy_options: \"JSON 'auto' GZIP TIMEFORMAT 'auto'\"", "copy_options: \"GZIP IAM_ROLE 'x'\"",
         "f.yaml:13: streams[0].destination.copy_options: IAM_ROLE is not allowed here: set iam_role instead; "
         "got \"GZIP IAM_ROLE 'x'\""),
        ("copy_options: \"JSON 'auto' GZIP TIMEFORMAT 'auto'\"", "copy_options: \"JSON 'auto'\"",
         "f.yaml:13: streams[0].destination.copy_options: must include GZIP when staging.compression is gzip "
         "(COPY must be told), got \"JSON 'auto'\""),
        ("load_method: copy_from_s3", "load_method: copy_from_stdin",
         "f.yaml:13: streams[0].destination.copy_options: with load_method copy_from_stdin only JSON 'auto' and "
         "GZIP are supported, got TIMEFORMAT; got \"JSON 'auto' GZIP TIMEFORMAT 'auto'\""),
        ("compression: gzip}", "compression: snappy}",
         "f.yaml:16: streams[0].destination.staging.compression: must be none or gzip for Redshift staging "
         "(COPY cannot read snappy), got 'snappy'"),
        ('prefix: "firehose/"', 'prefix: "f/!{timestamp:yyyy}/"',
         "f.yaml:16: streams[0].destination.staging.prefix: Redshift staging Prefix cannot contain expressions "
         "(Firehose's rule), got 'f/!{timestamp:yyyy}/'"),
        ('prefix: "firehose/"', 'prefix: "firehose/", error_output_prefix: "errors/"',
         "f.yaml:16: streams[0].destination.staging.error_output_prefix: must not be set for Redshift staging "
         "(Firehose's rule: ErrorOutputPrefix must be null)"),
        ("iam_role: arn:aws:iam::123456789012:role/firehose-copy", "iam_role: \"arn:aws:iam::1:role/x' --\"",
         "f.yaml:15: streams[0].destination.iam_role: must be default or an IAM role ARN "
         "(arn:aws:iam::<account>:role/<name>; a chain is comma-separated), got \"arn:aws:iam::1:role/x' --\""),
        ("iam_role: arn:aws:iam::123456789012:role/firehose-copy", "iam_role: null",
         "f.yaml:3: streams[0].destination: load_method copy_from_s3 needs iam_role or credentials: what "
         "Redshift's COPY presents to S3"),
        ("retry_duration_secs: 3600", "retry_duration_secs: 7201",
         "f.yaml:17: streams[0].destination.retry_duration_secs: input should be less than or equal to 7200, got 7201"),
    ],
)
def test_config_errors_name_file_line_and_field(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    assert errors_of(GOOD.replace(old, new)) == [expected]


def test_password_comes_from_the_environment() -> None:
    assert errors_of(GOOD, env={}) == [
        "f.yaml:10: streams[0].destination.connection.password: environment variable ${REDSHIFT_PASSWORD} is not set"
    ]


def test_copy_from_stdin_accepts_json_auto_and_gzip_only() -> None:
    stdin = GOOD.replace("load_method: copy_from_s3", "load_method: copy_from_stdin").replace(
        "JSON 'auto' GZIP TIMEFORMAT 'auto'", "JSON 'auto' GZIP")
    for options in ("JSON 'auto' GZIP", "gzip format as json 'auto'", "GZIP JSON 'auto ignorecase'"):
        assert config(stdin.replace("JSON 'auto' GZIP", options)).load_method == "copy_from_stdin"
    no_options = stdin.replace("      copy_options: \"JSON 'auto' GZIP\"\n", "")
    assert config(no_options).copy_options is None  # JSON 'auto' is the default; the staged gzip is known
    for bad, why in (("JSON 's3://b/paths.json' GZIP", "JSON takes 'auto' or 'auto ignorecase'"),
                     ("CSV GZIP", "got CSV"), ("GZIP GZIP", "GZIP appears twice"),
                     ("JSON 'auto'", "must include GZIP")):
        (err,) = errors_of(stdin.replace("JSON 'auto' GZIP", bad))
        assert err.startswith("f.yaml:13: streams[0].destination.copy_options: ") and why in err
    # No IAM role or keys needed: the daemon reads the staged records itself.
    assert config(stdin.replace("      iam_role: arn:aws:iam::123456789012:role/firehose-copy\n", "")).iam_role is None


# --- COPY statements through sqlfluff's Redshift dialect ---------------------------------------------

CREDENTIALS = "credentials: {access_key_id: AKIAIOSFODNN7EXAMPLE, secret_access_key: 'wJalr/K7MDENG+bPxRfiCY'}"


def _parse(sql: str) -> Any:
    from sqlfluff.core import FluffConfig, Linter

    parsed = Linter(config=FluffConfig(overrides={"dialect": "redshift"})).parse_string(sql + ";\n")
    assert not parsed.violations, parsed.violations
    assert parsed.tree is not None
    assert not list(parsed.tree.recursive_crawl("unparsable")), parsed.tree.stringify()
    (statement,) = list(parsed.tree.recursive_crawl("copy_statement"))
    return statement


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("auth", ["iam_role", "keys", "keys+token", "default_role"])
def test_copy_statement_parses_as_redshift(auth: str, columns: bool) -> None:
    text = GOOD
    if auth != "iam_role":
        role = "      iam_role: arn:aws:iam::123456789012:role/firehose-copy\n"
        text = text.replace(role, "      iam_role: default\n" if auth == "default_role" else f"      {CREDENTIALS}\n")
    if auth == "keys+token":
        text = text.replace("'wJalr/K7MDENG+bPxRfiCY'}", "'wJalr/K7MDENG+bPxRfiCY', session_token: 'FwoGZXIvYXdzE+x'}")
    if not columns:
        text = text.replace("      columns: [event_id, ts, user_id, page]\n", "")
    text = text.replace("table: public.clicks", 'table: public."Click Events"')
    cfg = config(text)
    url = "s3://staging-bucket/firehose/manifests/2024/05/01/13/clicks-1-2024-05-01-13-55-09-a9fa96af"
    sql = cfg.copy_sql(url)
    statement = _parse(sql)

    table = next(statement.recursive_crawl("table_reference"))
    assert [s.raw for s in table.segments if s.is_type("naked_identifier", "quoted_identifier")] == [
        '"public"', '"Click Events"']
    cols = [s.raw for s in statement.recursive_crawl("column_reference")]
    assert cols == (['"event_id"', '"ts"', '"user_id"', '"page"'] if columns else [])
    literals = [s.raw for s in statement.get_children("quoted_literal")]
    assert literals[0] == f"'{url}'"  # the FROM source
    authz = next(statement.recursive_crawl("authorization_segment"))
    words = [s.raw.upper() for s in authz.recursive_crawl("keyword")]
    values = [s.raw for s in authz.recursive_crawl("quoted_literal")]
    if auth == "iam_role":
        assert (words, values) == (["IAM_ROLE"], ["'arn:aws:iam::123456789012:role/firehose-copy'"])
    elif auth == "default_role":
        assert words == ["IAM_ROLE", "DEFAULT"] and values == []
    else:
        expected = ["ACCESS_KEY_ID", "SECRET_ACCESS_KEY"] + (["SESSION_TOKEN"] if auth == "keys+token" else [])
        assert words == expected
        assert values[:2] == ["'AKIAIOSFODNN7EXAMPLE'", "'wJalr/K7MDENG+bPxRfiCY'"]
    assert "MANIFEST" in [s.raw.upper() for s in statement.get_children("keyword")]
    tail = sql.split(" MANIFEST ", 1)[1]
    assert tail == "JSON 'auto' GZIP TIMEFORMAT 'auto'"
    redacted = cfg.copy_sql(url, redacted=True)
    assert "wJalr" not in redacted and "FwoGZ" not in redacted
    _parse(redacted)


def test_reserved_words_and_odd_names_are_quoted_never_spliced() -> None:
    assert [p.sql() for p in parse_name('Public."we""ird; name"')] == ['"public"', '"we""ird; name"']
    assert parse_name("user")[0].sql() == '"user"'
    for bad in ("", "a b", "a;b", '"unterminated', '""', "1abc", "a.", "x" * 128):
        with pytest.raises(SqlError):
            parse_name(bad)


def test_copy_options_tokens() -> None:
    opts = parse_copy_options("delimiter '\\t' lzop;".replace("lzop", "escape"))
    assert opts.text == "delimiter '\\t' escape"
    assert parse_copy_options("JSON 'it''s' MAXERROR 10 GZIP").gzip
    for bad in ("GZIP -- comment", "GZIP /* x */", "JSON 'open", "a; b", "LZOP", "MANIFEST", 'JSON "x"'):
        with pytest.raises(SqlError):
            parse_copy_options(bad)


# --- manifests and keys ----------------------------------------------------------------------------


def test_manifest_keys_derive_from_the_batch_key() -> None:
    key = "firehose/2024/05/01/13/clicks-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa.gz"
    assert manifest_key("firehose/", key) == (
        "firehose/manifests/2024/05/01/13/clicks-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa")
    assert manifest_key("firehose/", key, failed=True) == (
        "firehose/errors/manifests/2024/05/01/13/clicks-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa")
    assert manifest_key("", key[len("firehose/"):]).startswith("manifests/2024/05/01/13/clicks-1-")
    assert manifest_document("b", [key]) == (
        b'{"entries":[{"url":"s3://b/' + key.encode() + b'","mandatory":true}]}')


def test_batch_keys_use_the_s3_layout() -> None:
    import random
    from datetime import UTC, datetime

    dest = config().build(BuildContext("clicks", 3, "us-east-1", "123456789012", "/tmp"))
    key = dest.batch_key(datetime(2024, 5, 1, 13, 55, 9, tzinfo=UTC), random.Random(1))
    assert key.startswith("firehose/2024/05/01/13/clicks-3-2024-05-01-13-55-09-") and key.endswith(".gz")
    assert dest.archive_key(datetime(2024, 5, 1, 13, tzinfo=UTC), random.Random(1), "processing-failed").startswith(
        "firehose/processing-failed/2024/05/01/13/clicks-3-")


# --- JSON 'auto' -------------------------------------------------------------------------------------


def test_json_auto_maps_keys_onto_columns_case_insensitively() -> None:
    m = JsonAutoMapper(["event_id", "user", "page", "flag", "absent"])
    assert m.row({"EVENT_ID": "e1", "User": {"id": 1, "t": [1, 2]}, "page": 3.5, "flag": True, "x": 1}) == [
        "e1", '{"id":1,"t":[1,2]}', 3.5, "true", None]
    assert m.row({"Page": "wrong", "page": "right"}) == [None, None, "right", None, None]  # exact match wins
    assert m.row({"event_id": None, "flag": False}) == [None, None, None, "false", None]


def test_json_objects_reads_records_as_copy_reads_a_file() -> None:
    assert list(json_objects([b'{"a":1}\n', b'{"a":2}'])) == [{"a": 1}, {"a": 2}]
    assert list(json_objects([b'{"a":1}{"a":2}', b' {"a":', b'3}\n', b"\n"])) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert list(json_objects([b'{"a":1}', b'{"a":2}'], b"\n")) == [{"a": 1}, {"a": 2}]
    for records, delimiter in (([b'{"a":1}', b"[1,2]"], None), ([b'{"a":1}', b"{nope"], None),
                               ([b'{"a":1}', b'{"a":2}'], b"|"), ([b"\xff"], None)):
        with pytest.raises(BadRecordError):
            list(json_objects(records, delimiter))


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (psycopg.errors.UndefinedTable("relation \"x\" does not exist"), "Redshift.TableNotFound"),
        (psycopg.errors.UndefinedColumn("column \"q\" does not exist"), "Redshift.ColumnNotFound"),
        (psycopg.errors.InvalidTextRepresentation("invalid input syntax for type integer"), "Redshift.DataLoadFailed"),
        (psycopg.errors.NotNullViolation("null value in column"), "Redshift.DataLoadFailed"),
        (psycopg.errors.InvalidPassword("password authentication failed"), "Redshift.AuthenticationFailed"),
        (psycopg.OperationalError("connection to server failed: s3cr3t-Pa55word"), "Redshift.ConnectionFailed"),
        (psycopg.errors.InternalError_("Load into table 'x' failed. Check 'stl_load_errors'"), "Redshift.DataLoadFailed"),
        (psycopg.errors.FeatureNotSupported("nope"), "InternalError"),
    ],
)
def test_database_errors_get_firehose_codes_and_lose_secrets(exc: Exception, code: str) -> None:
    dest = config().build(BuildContext("clicks", 1, "us-east-1", "123456789012", "/tmp"))
    assert isinstance(dest, RedshiftDestination)
    got, message = dest._classify(exc)
    assert got == code
    assert ENV["REDSHIFT_PASSWORD"] not in message


# --- the retry window --------------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [0, 3600])
def test_a_failing_copy_is_retried_within_retry_duration_then_archived(duration: int) -> None:
    import asyncio

    from firehose.destinations.redshift import LoadError
    from firehose.interfaces import Batch, DeliveryResult

    now = [100.0]
    cfg = config(GOOD.replace("retry_duration_secs: 3600", f"retry_duration_secs: {duration}"))
    dest = RedshiftDestination(cfg, BuildContext("clicks", 1, "us-east-1", "123456789012", "/tmp"),
                               monotonic=lambda: now[0])
    archived: list[tuple[str, int]] = []

    async def stage(batch: Batch, manifest: str) -> DeliveryResult:
        return DeliveryResult.delivered()

    def load(batch: Batch, manifest: str, staged: Any) -> int:
        raise LoadError("Redshift.DataLoadFailed", "invalid input syntax for type integer")

    async def archive(batch: Batch, manifest: str, exc: LoadError, attempts: int) -> DeliveryResult:
        archived.append((exc.code, attempts))
        return DeliveryResult.delivered()

    dest._stage = stage  # type: ignore[method-assign]
    dest._load = load  # type: ignore[method-assign]
    dest._archive = archive  # type: ignore[method-assign]
    batch = Batch("clicks", 1, "firehose/2024/05/01/13/clicks-1-2024-05-01-13-55-09-x.gz", [b"{}"] * 3, 0)

    async def attempt(at: float) -> DeliveryResult:
        now[0] = at
        return await dest.deliver(batch)

    if duration == 0:  # no retry: the first failure archives
        assert asyncio.run(attempt(100.0)).ok and archived == [("Redshift.DataLoadFailed", 1)]
        return
    first, second, last = (asyncio.run(attempt(t)) for t in (100.0, 100.0 + duration - 1, 100.0 + duration))
    for r in (first, second):
        assert set(r.failures) == {0, 1, 2}
        assert r.failures[0].retryable and r.failures[0].error_code == "Redshift.DataLoadFailed"
    assert last.ok and archived == [("Redshift.DataLoadFailed", 3)]


class _FakeCursor:
    def __init__(self, log: list[str], loaded: set[str]) -> None:
        self.log, self.loaded, self.rowcount, self._row = log, loaded, -1, None

    def __enter__(self) -> _FakeCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def execute(self, sql: str, params: Any = None) -> None:
        self.log.append(sql)
        self._row = None
        if sql.startswith("SELECT 1 FROM"):
            self._row = (1,) if params[0] in self.loaded else None
        elif sql.startswith("COPY"):
            self.rowcount = 3
        elif sql.startswith("INSERT"):
            self.loaded.add(params[0])

    def fetchone(self) -> Any:
        return self._row


class _FakeConnection:
    """Enough of a psycopg connection to see what a Redshift load sends, in order."""

    closed = False

    def __init__(self) -> None:
        self.log: list[str] = []
        self.loaded: set[str] = set()

    def transaction(self) -> _FakeCursor:
        return _FakeCursor([], set())  # a no-op context manager

    def cursor(self) -> _FakeCursor:
        return _FakeCursor(self.log, self.loaded)

    def close(self) -> None:
        self.closed = True


def test_copy_from_s3_sends_lock_check_copy_and_bookkeeping_in_one_transaction() -> None:
    import asyncio

    from firehose.interfaces import Batch, DeliveryResult

    text = GOOD.replace("      iam_role: arn:aws:iam::123456789012:role/firehose-copy\n", f"      {CREDENTIALS}\n")
    dest = RedshiftDestination(config(text), BuildContext("clicks", 1, "us-east-1", "123456789012", "/tmp"))
    conn = _FakeConnection()
    dest._acquire = lambda: conn  # type: ignore[method-assign]
    staged: list[str] = []

    async def stage(batch: Batch, manifest: str) -> DeliveryResult:
        staged.append(manifest)
        return DeliveryResult.delivered()

    dest._stage = stage  # type: ignore[method-assign]
    key = "firehose/2024/05/01/13/clicks-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa.gz"
    batch = Batch("clicks", 1, key, [b"{}"] * 3, 0)
    assert asyncio.run(dest.deliver(batch)).ok
    assert asyncio.run(dest.deliver(batch)).ok  # a replay
    manifest = manifest_key("firehose/", key)
    assert staged == [manifest, manifest]
    create, lock, check, copy, insert, lock2, check2 = conn.log
    assert create.startswith('CREATE TABLE IF NOT EXISTS "firehose_loaded_manifests" (manifest VARCHAR(1024)')
    assert lock == lock2 == 'LOCK TABLE "firehose_loaded_manifests"'
    assert check == check2 == 'SELECT 1 FROM "firehose_loaded_manifests" WHERE manifest = %s'
    assert copy == dest.config.copy_sql(f"s3://staging-bucket/{manifest}")
    assert "SECRET_ACCESS_KEY 'wJalr/K7MDENG+bPxRfiCY'" in copy
    assert insert.startswith('INSERT INTO "firehose_loaded_manifests" (manifest, loaded_at, row_count)')
    assert conn.loaded == {manifest}
