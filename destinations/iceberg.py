"""Apache Iceberg tables (Firehose: IcebergDestinationConfiguration), written with pyiceberg.

Records are JSON objects; each goes to a table and is inserted, updated or deleted there:

* **Routing.** A record's table and operation come from its metadata when it has some: a
  Lambda's ``metadata.otfMetadata`` (``destinationDatabaseName``, ``destinationTableName``,
  ``operation``), with what it leaves out from the keys of a ``metadata_extraction`` query of
  those names.
  What a record does not name comes from the config: its only ``destination_tables`` entry, and
  ``insert``. With several entries and no route in the record, the record fails.
* **Columns** are the table's, matched to the record's fields by name, case-insensitively; a
  field without a column is ignored, a column without a field is null. Values are converted as
  format conversion converts them (transforms/formats: the table's types as their Hive
  equivalents). A record that does not fit is refused at once (``Iceberg.SchemaMismatch``).
* **Operations.** ``update`` and ``delete`` need unique keys (the table's ``unique_keys``, else
  its identifier fields); an update replaces every row with the record's key values (inserting
  it when there is none), a delete removes them. Within a batch they apply in
  record order (the last operation on a key decides). pyiceberg writes no delete files, so a
  delete rewrites the data files that hold matching rows (copy-on-write): its cost grows with
  the table, not the batch (docs/iceberg.md measures it). ``append_only: true`` takes every
  record as an insert.
* **Exactly once.** A batch is one commit per table: its data files and, for updates and
  deletes, the rewritten files, in one catalog transaction whose snapshots carry the batch's
  identity in their summary (``firehose.batch-id``). Before committing, the table's snapshot
  history (from the current snapshot back through its parents to an hour before the batch's
  oldest record arrived) is searched for that identity: a batch replayed after a crash, or
  retried after a commit whose answer was lost, finds its snapshot and is not committed again.
  A writer that expires snapshots younger than a replay's age removes that evidence (see
  docs/iceberg.md). A commit that loses a race with another writer is retried by pyiceberg on
  the new table state; past its retries, or when the files a delete rewrites are gone, the whole
  commit is planned again here (:data:`COMMIT_ATTEMPTS` times).
* **Failures.** A record that does not fit the schema (``Iceberg.SchemaMismatch``,
  ``Iceberg.MissingColumnWithinRecord``), names a table that does not exist
  (``Iceberg.NoSuchTable``) or none (``Iceberg.InvalidTableName``), or asks to update or delete
  without unique keys (``Iceberg.InvalidUniqueKeys``) is archived at once as ``iceberg-failed``; a
  catalog or storage failure is retried until ``retry_duration_secs`` after the first failed
  attempt, then archived the same way. The stream keeps flowing.

Catalogs are pyiceberg's (``catalog:`` holds its properties): ``sql`` (SQLite, the embedded
default in ``data_dir``, or PostgreSQL through psycopg 3), ``rest`` and ``glue``.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from firehose.destinations.remote import backup_description
from firehose.interfaces import (
    Batch,
    BufferingLimits,
    BuildContext,
    DeliveryResult,
    Destination,
    RecordFailure,
)
from firehose.models import StrictModel
from firehose.records import RecordMeta
from firehose.registry import one_line

# Firehose's Iceberg buffering ranges: 1-128 MiB, 0-900 s; its documented defaults, 5 MiB and 300 s.
ICEBERG_BUFFERING = BufferingLimits(1, 128, 5, 0, 900, 300)
ERROR_OUTPUT_TYPE = "iceberg-failed"

#: The snapshot-summary properties that identify the batch a commit wrote.
BATCH_ID_PROPERTY = "firehose.batch-id"
STREAM_PROPERTY = "firehose.stream"
#: How far before a batch's oldest record the replay check still looks (clock skew between writers).
LOOKBACK_MARGIN_MS = 3_600_000
#: Commits that lose a race with another writer are rebuilt and tried this many times per attempt.
COMMIT_ATTEMPTS = 8
#: Bounds on catalog and storage calls a user's properties leave unbounded (seconds).
NETWORK_TIMEOUT_SECS = 10
CALL_TIMEOUT_SECS = 120
#: A batch may name at most this many tables (a record's metadata is input, so is this number).
MAX_TABLES_PER_BATCH = 100

OPERATIONS = ("insert", "update", "delete")
#: The catalog's name (a SQL catalog keeps each name's tables apart): pyiceberg's usual default.
DEFAULT_CATALOG_NAME = "default"
CATALOG_TYPES = ("sql", "rest", "glue")
# Database and table names: Firehose's pattern ([a-zA-Z0-9._]{1,255}) without the dot, which
# pyiceberg reads as a namespace separator (Firehose also refuses hyphens).
_NAME = re.compile(r"[A-Za-z0-9_]{1,255}")
# Catalog properties whose values are never shown (describe, logs).
_SECRET = re.compile(r"secret|password|token|credential|session", re.IGNORECASE)

# Firehose's documented codes, then the ones it documents no name for (docs/iceberg.md).
NO_SUCH_TABLE = "Iceberg.NoSuchTable"
INVALID_TABLE_NAME = "Iceberg.InvalidTableName"
INVALID_UNIQUE_KEYS = "Iceberg.InvalidUniqueKeys"
MISSING_COLUMN = "Iceberg.MissingColumnWithinRecord"
SCHEMA_MISMATCH = "Iceberg.SchemaMismatch"
INVALID_OPERATION = "Iceberg.InvalidOperation"
UNSUPPORTED_TYPE = "Iceberg.UnsupportedColumnType"
CATALOG_FAILED = "Iceberg.CatalogFailure"
COMMIT_CONFLICT = "Iceberg.CommitConflict"


class IcebergTableConfig(StrictModel):
    """One destination table (Firehose: DestinationTableConfiguration)."""

    database: str = Field(description="The table's namespace (Firehose: DestinationDatabaseName).")
    table: str = Field(description="The table's name (Firehose: DestinationTableName).")
    unique_keys: list[str] | None = Field(
        default=None,
        description="Columns that identify a row, for update and delete (Firehose: UniqueKeys).",
    )

    @field_validator("database", "table")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"must be 1-255 letters, digits or '_', got {v!r}")
        return v

    @field_validator("unique_keys")
    @classmethod
    def _keys(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v or any(not k or len(k) > 255 for k in v):
                raise ValueError("must be a non-empty list of column names")
            if len({k.lower() for k in v}) != len(v):
                raise ValueError("names a column twice")
        return v


class IcebergDestinationConfig(StrictModel):
    """Apache Iceberg tables through a pyiceberg catalog (Firehose:
    IcebergDestinationConfiguration); needs the stream's ``backup:``."""

    requires_backup: ClassVar[bool] = True  # failed records are archived to the stream's backup:
    routes_by_metadata: ClassVar[bool] = True  # metadata_extraction may route records here
    BACKUP_MODE_NAMES: ClassVar[tuple[str, str]] = ("FailedDataOnly", "AllData")

    type: Literal["iceberg"] = Field(description="`iceberg`.")
    catalog: dict[str, str] = Field(
        default_factory=dict,
        description="pyiceberg catalog properties: `type` (`sql`, `rest` or `glue`), `uri`, `warehouse`, "
        "`s3.endpoint`, ..., and `name` (default `default`; a SQL catalog keeps each name's tables apart). "
        "Empty: a SQLite catalog and a warehouse directory in the daemon's `data_dir`. Write secrets as `${ENV}`.",
    )
    destination_tables: list[IcebergTableConfig] = Field(
        default_factory=list,
        description="The tables (Firehose: DestinationTableConfigurationList). With one, every record "
        "without a route of its own goes there; a record's `otfMetadata` may name any table of the catalog.",
    )
    append_only: bool = Field(
        default=False,
        description="Every record is an insert, whatever its operation (Firehose: AppendOnly).",
    )
    retry_duration_secs: int = Field(
        default=300, ge=0, le=7200,
        description="Seconds a failed commit is retried after the first failed attempt; then its records "
        "are archived to the stream's backup as `iceberg-failed` (Firehose: RetryOptions.DurationInSeconds).",
    )

    @field_validator("catalog", mode="before")
    @classmethod
    def _scalars(cls, v: Any) -> Any:
        if isinstance(v, dict):  # YAML numbers and booleans are properties too
            return {k: str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, int | float) else x
                    for k, x in v.items()}
        return v

    @field_validator("catalog")
    @classmethod
    def _catalog(cls, v: dict[str, str]) -> dict[str, str]:
        if v:
            kind = v.get("type")
            if kind not in CATALOG_TYPES:
                raise ValueError(f"type must be one of {', '.join(CATALOG_TYPES)}, got {kind!r}")
            if kind == "sql" and not v.get("uri"):
                raise ValueError("a sql catalog needs uri (sqlite:////path/catalog.db or "
                                 "postgresql+psycopg://user@host/db)")
            if kind == "sql" and v["uri"].startswith("postgresql") and not v["uri"].startswith("postgresql+psycopg:"):
                raise ValueError("a PostgreSQL catalog's uri must start postgresql+psycopg:// (psycopg 3)")
        return v

    @model_validator(mode="after")
    def _tables(self) -> IcebergDestinationConfig:
        seen = set()
        for t in self.destination_tables:
            key = (t.database.lower(), t.table.lower())
            if key in seen:
                raise ValueError(f"destination_tables: {t.database}.{t.table} is listed twice")
            seen.add(key)
        return self

    def buffering_limits(self) -> BufferingLimits:
        return ICEBERG_BUFFERING

    @classmethod
    def cluster_problem(cls, raw: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
        """Cluster mode needs one catalog for every daemon: the embedded one is per data_dir."""
        if not raw.get("catalog"):
            return ("catalog",), ("the embedded catalog is in each daemon's data_dir; in cluster mode give every "
                                  "daemon the same catalog (sql on PostgreSQL, rest or glue)")
        return None

    def catalog_properties(self, data_dir: str) -> dict[str, str]:
        """The catalog's properties; the embedded default when none are given."""
        if self.catalog:
            return dict(self.catalog)
        root = Path(data_dir).absolute() / "iceberg"
        return {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": (root / "warehouse").as_uri()}

    def describe(self, buffering: Any, account_id: str, backup: Any = None) -> dict[str, Any]:
        """Firehose's IcebergDestinationDescription (catalog secrets are not shown)."""
        shown = {k: ("*" if _SECRET.search(k) else v) for k, v in self.catalog.items()}
        return {
            "IcebergDestinationDescription": {
                "DestinationTableConfigurationList": [
                    {"DestinationDatabaseName": t.database, "DestinationTableName": t.table,
                     **({"UniqueKeys": list(t.unique_keys)} if t.unique_keys else {})}
                    for t in self.destination_tables
                ],
                "AppendOnly": self.append_only,
                "BufferingHints": {"SizeInMBs": buffering.size_mib, "IntervalInSeconds": buffering.interval_secs},
                "RetryOptions": {"DurationInSeconds": self.retry_duration_secs},
                "CatalogConfiguration": {"CatalogARN": f"arn:aws:glue:::catalog/{shown.get('type', 'sql')}"},
                "RoleARN": f"arn:aws:iam::{account_id}:role/firehose",
                "ProcessingConfiguration": {"Enabled": False, "Processors": []},
                "CloudWatchLoggingOptions": {"Enabled": False},
                **backup_description(self.BACKUP_MODE_NAMES, backup, buffering, account_id),
            }
        }

    def build(self, ctx: BuildContext) -> IcebergDestination:
        return IcebergDestination(self, ctx)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


@dataclass
class _Route:
    """The records of a batch bound for one table: their positions and operations."""

    database: str
    table: str
    positions: list[int] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    converted: tuple[int, Any] | None = None  # (schema id, Converter.to_arrow's result), made early


@dataclass
class _Plan:
    """One table's commit: rows to append, a filter of rows to delete, the records that failed."""

    rows: Any = None  # pa.Table in the table's Arrow schema
    delete: Any = None  # a pyiceberg BooleanExpression
    failures: dict[int, RecordFailure] = field(default_factory=dict)


def _refuse(code: str, message: str) -> RecordFailure:
    return RecordFailure(False, code, message[:1000])


def _retry(code: str, message: str) -> RecordFailure:
    return RecordFailure(True, code, message[:1000])


class IcebergDestination(Destination):
    error_output_type = ERROR_OUTPUT_TYPE
    metrics_prefix = "DeliveryToIceberg"
    reads_record_metadata = True
    ordered_delivery = True  # an update must not overtake the insert before it

    def __init__(self, config: IcebergDestinationConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self.retry_duration_secs = config.retry_duration_secs
        self.properties = config.catalog_properties(ctx.data_dir)
        self._catalog: Any = None
        self._catalog_lock = threading.Lock()
        # One commit at a time, in the order deliveries arrive (the seal order): each waits for
        # the one before it, though it converts its records while that one commits.
        self._last_turn: asyncio.Future[None] | None = None
        self._tables = {(t.database.lower(), t.table.lower()): t for t in config.destination_tables}
        self._converters: dict[tuple[str, str, int], Any] = {}
        self._schemas: dict[tuple[str, str], Any] = {}  # each table's schema at its last load
        self.commit_latency_secs: list[float] = []  # the last commits' (bench figures)
        self.commit_conflicts = 0  # commits lost to another writer and rebuilt

    # ------------------------------------------------------------------ catalog
    def catalog(self) -> Any:
        """The pyiceberg catalog, made on first use, by preflight or the first delivery (in a
        worker thread: it may connect), never by start, which must not wait for it."""
        with self._catalog_lock:
            if self._catalog is None:
                from pyiceberg.catalog import load_catalog

                props = self.properties
                if props.get("type") == "sql" and props["uri"].startswith("sqlite:///"):
                    Path(props["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
                    warehouse = props.get("warehouse", "")
                    if warehouse.startswith("file://"):
                        Path(warehouse[len("file://"):]).mkdir(parents=True, exist_ok=True)
                props = with_timeouts({k: v for k, v in props.items() if k != "name"})
                self._catalog = load_catalog(self.properties.get("name", DEFAULT_CATALOG_NAME), **props)
            return self._catalog

    async def preflight(self) -> str | None:
        def check() -> str | None:
            from pyiceberg.exceptions import NoSuchTableError

            catalog = self.catalog()
            for t in self.config.destination_tables:
                try:
                    table = catalog.load_table((t.database, t.table))
                except NoSuchTableError:
                    return f"table {t.database}.{t.table} does not exist in the catalog"
                problem = _unsupported(table.schema())
                if problem:
                    return f"table {t.database}.{t.table}: {problem}"
                missing = [k for k in t.unique_keys or [] if _column(table.schema(), k) is None]
                if missing:
                    return f"table {t.database}.{t.table} has no column {missing[0]!r} (unique_keys)"
            return None

        try:
            return await asyncio.to_thread(check)
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            return f"the catalog does not answer: {one_line(exc)[:300]}"

    async def close(self) -> None:
        engine = getattr(self._catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        return f"{self.ctx.stream_name}/{oldest_arrival:%Y%m%dT%H%M%S}/{rng.getrandbits(128):032x}"

    # ------------------------------------------------------------------ delivery
    async def deliver(self, batch: Batch) -> DeliveryResult:
        before, mine = self._last_turn, asyncio.get_running_loop().create_future()
        self._last_turn = mine
        try:
            routes, failures = self._route(batch)
            for route in routes.values():  # converted before its turn: overlaps the commit before it
                await asyncio.to_thread(self._convert_early, batch, route)
            if before is not None:
                await asyncio.shield(before)
            for route in routes.values():
                started = time.monotonic()
                failures.update(await asyncio.to_thread(self._write, batch, route))
                self.commit_latency_secs = [*self.commit_latency_secs[-999:], time.monotonic() - started]
            return DeliveryResult(failures)
        finally:
            mine.set_result(None)  # the next delivery's turn, however this one ended

    def _route(self, batch: Batch) -> tuple[dict[tuple[str, str], _Route], dict[int, RecordFailure]]:
        """Each record's table and operation (see the module doc)."""
        only = self.config.destination_tables[0] if len(self.config.destination_tables) == 1 else None
        routes: dict[tuple[str, str], _Route] = {}
        failures: dict[int, RecordFailure] = {}
        metas = batch.meta or [None] * len(batch.records)
        for i, meta in enumerate(metas):
            otf = _otf(meta)
            db = otf.get("destinationDatabaseName") or (only.database if only else None)
            name = otf.get("destinationTableName") or (only.table if only else None)
            op = (otf.get("operation") or "insert").lower()
            if db is None or name is None:
                failures[i] = _refuse(INVALID_TABLE_NAME, "the record names no destination table (otfMetadata) "
                                      "and the stream has not exactly one destination_tables entry")
            elif not (_NAME.fullmatch(db) and _NAME.fullmatch(name)):
                failures[i] = _refuse(INVALID_TABLE_NAME,
                                      f"invalid database or table name {db[:100]!r}.{name[:100]!r}")
            elif op not in OPERATIONS:
                failures[i] = _refuse(INVALID_OPERATION, f"operation must be insert, update or delete, got {op[:50]!r}")
            elif len(routes) >= MAX_TABLES_PER_BATCH and (db, name) not in routes:
                failures[i] = _refuse(INVALID_TABLE_NAME, f"the batch names more than {MAX_TABLES_PER_BATCH} tables")
            else:
                route = routes.setdefault((db, name), _Route(db, name))
                route.positions.append(i)
                route.operations.append("insert" if self.config.append_only else op)
        return routes, failures

    def _convert_early(self, batch: Batch, route: _Route) -> None:
        """Convert a table's records in the table's current schema (a worker thread); whatever
        goes wrong here is met again, and reported, by :meth:`_write`."""
        try:
            # The schema the last commit saw: no catalog call here (_write loads the table anyway,
            # and converts again only if its schema changed since).
            schema = self._schemas.get((route.database, route.table))
            if schema is None:
                schema = self.catalog().load_table((route.database, route.table)).schema()
            if _unsupported(schema) is None:
                converter = self._converter(route, schema)
                route.converted = (schema.schema_id, converter.to_arrow([batch.records[i] for i in route.positions]))
        except Exception:  # noqa: BLE001, S110 - the catalog or the table: _write reports it
            pass

    def _write(self, batch: Batch, route: _Route) -> dict[int, RecordFailure]:
        """Commit one table's records (a worker thread); their failures by batch position."""
        from pyiceberg.exceptions import (
            CommitFailedException,
            NoSuchNamespaceError,
            NoSuchTableError,
            ValidationException,
        )

        marker = {BATCH_ID_PROPERTY: batch.key, STREAM_PROPERTY: self.ctx.stream_name}
        where = f"{route.database}.{route.table}"
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                table = self.catalog().load_table((route.database, route.table))
                if len(self._schemas) > 256:  # tables named by records: bounded like the converters
                    self._schemas.clear()
                self._schemas[(route.database, route.table)] = table.schema()
            except (NoSuchTableError, NoSuchNamespaceError):
                return {i: _refuse(NO_SUCH_TABLE, f"table {where} does not exist") for i in route.positions}
            except Exception as exc:  # noqa: BLE001 - the catalog is away: retried
                return {i: _retry(CATALOG_FAILED, f"{where}: {one_line(exc)}") for i in route.positions}
            try:
                plan = self._plan(table, batch, route)
            except Exception as exc:  # noqa: BLE001 - the same records would fail again: archived, never looped on
                self.ctx.log.error("iceberg_write_refused", table=where, batch_id=batch.batch_id, error=one_line(exc)[:300])
                return {i: _refuse(SCHEMA_MISMATCH, f"{where}: cannot be written: {one_line(exc)}")
                        for i in route.positions}
            if plan.rows is None and plan.delete is None:
                return plan.failures
            if committed(table, batch.key, batch.oldest_arrival_ms):
                # A replay: the commit is in the table. The records it refused are refused again
                # (the same schema decides), so their archiving is not lost to a crash.
                self.ctx.log.info("iceberg_commit_found", table=where, batch_id=batch.batch_id, key=batch.key)
                return plan.failures
            try:
                with table.transaction() as tx:
                    if plan.delete is not None:
                        tx.delete(plan.delete, snapshot_properties=marker)
                    if plan.rows is not None:
                        tx.append(plan.rows, snapshot_properties=marker)
                return plan.failures
            except (CommitFailedException, ValidationException) as exc:
                # Another writer committed first, past pyiceberg's own retries (or removed files
                # this commit rewrites): plan again on the table as it is now.
                self.commit_conflicts += 1
                self.ctx.log.info("iceberg_commit_conflict", table=where, attempt=attempt + 1, error=one_line(exc)[:300])
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * random.random())
            except Exception as exc:  # noqa: BLE001 - storage or catalog failure: retried
                failed = {i: _retry(CATALOG_FAILED, f"{where}: {one_line(exc)}") for i in route.positions}
                return failed | plan.failures
        return {i: _retry(COMMIT_CONFLICT, f"{where}: {COMMIT_ATTEMPTS} commits lost to other writers")
                for i in route.positions}

    def _plan(self, table: Any, batch: Batch, route: _Route) -> _Plan:
        """Convert a table's records and decide what to append and what to delete."""
        import numpy as np
        import pyarrow as pa

        schema = table.schema()
        where = f"{route.database}.{route.table}"
        plan = _Plan()
        problem = _unsupported(schema)
        if problem:
            plan.failures = {i: _refuse(UNSUPPORTED_TYPE, f"{where}: {problem}") for i in route.positions}
            return plan
        if route.converted is not None and route.converted[0] == schema.schema_id:
            rows, record_of_row, failed = route.converted[1]
        else:  # the schema changed since (or the early conversion failed)
            converter = self._converter(route, schema)
            rows, record_of_row, failed = converter.to_arrow([batch.records[i] for i in route.positions])
        for k, (_code, message) in failed.items():
            plan.failures[route.positions[k]] = _refuse(SCHEMA_MISMATCH, f"{where}: {message}")
        keys = self._unique_keys(route, schema)
        ops = route.operations
        # The last operation on a key decides: per key, whether existing rows go and which row stays.
        deleted: dict[tuple[Any, ...], None] = {}
        keep: dict[int, None] = {}  # rows to append, in order
        of_key: dict[tuple[Any, ...], list[int]] = {}  # this batch's rows kept, per key
        key_values = [rows.column(c).to_pylist() for c in keys] if keys else []
        required_null = _required_null_rows(rows, schema)
        for r, k in enumerate(record_of_row.tolist()):
            pos = route.positions[k]
            if pos in plan.failures:
                continue
            op = ops[k]
            if op != "delete" and r in required_null:  # checked before any of its deletes is planned
                plan.failures[pos] = _refuse(MISSING_COLUMN, f"{where}: a required column is missing or null")
                continue
            key = tuple(_literal(col[r]) for col in key_values)
            if op == "insert":
                keep[r] = None
                if keys and None not in key:
                    of_key.setdefault(key, []).append(r)
                continue
            if not keys:
                plan.failures[pos] = _refuse(INVALID_UNIQUE_KEYS, f"{where}: {op} needs unique keys: the table's "
                                             "unique_keys in the config, or its identifier fields")
                continue
            if None in key:
                plan.failures[pos] = _refuse(SCHEMA_MISMATCH, f"{where}: {op}: a unique key column is null")
                continue
            deleted[key] = None
            for earlier in of_key.pop(key, []):  # rows of this batch with the key go too
                keep.pop(earlier, None)
            if op == "update":
                keep[r] = None
                of_key[key] = [r]
        bad_rows = {r for r, k in enumerate(record_of_row.tolist()) if route.positions[k] in plan.failures}
        keep_rows = [r for r in keep if r not in bad_rows]
        if keep_rows:
            plan.rows = _to_table_schema(rows.take(pa.array(np.array(keep_rows, dtype=np.int64))), schema)
        if deleted:
            plan.delete = _delete_filter(keys, list(deleted))
        return plan

    def _unique_keys(self, route: _Route, schema: Any) -> list[str]:
        """The table's unique key columns as the table spells them: its ``unique_keys`` in the
        config, else the table's identifier fields (none: updates and deletes fail)."""
        config = self._tables.get((route.database.lower(), route.table.lower()))
        wanted = list(config.unique_keys) if config is not None and config.unique_keys else []
        if not wanted:
            return sorted(schema.identifier_field_names())
        names = [f.name for f in (_column(schema, k) for k in wanted) if f is not None]
        return names if len(names) == len(wanted) else []

    def _converter(self, route: _Route, schema: Any) -> Any:
        """The JSON-to-Arrow converter for a table's schema (cached per schema version)."""
        cache_key = (route.database, route.table, schema.schema_id)
        conv = self._converters.get(cache_key)
        if conv is None:
            from firehose.registry import CONVERTER, FORMAT_CONFIG, load

            columns = [{"name": f.name, "type": _hive_type(f.field_type)} for f in schema.fields]
            config = load(FORMAT_CONFIG).model_validate(
                {"type": "parquet", "schema": {"columns": columns},
                 "deserializer": {"type": "openx_json", "case_insensitive": True}})
            conv = load(CONVERTER)(config)
            if len(self._converters) > 256:
                self._converters.clear()
            self._converters[cache_key] = conv
        return conv


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _otf(meta: Any) -> dict[str, str]:
    """A record's routing: a Lambda's otfMetadata, with what it leaves out taken from a
    metadata_extraction query's keys of the same names (Firehose's order)."""
    otf = RecordMeta.otf(meta) or {}
    pk = RecordMeta.partition_keys(meta) or {}
    out = {}
    for name in ("destinationDatabaseName", "destinationTableName", "operation"):
        v = otf.get(name)
        if not isinstance(v, str) or not v:
            v = pk.get("partitionKeyFromQuery:" + name)
        if isinstance(v, str) and v:
            out[name] = v
    return out


def committed(table: Any, batch_id: str, oldest_arrival_ms: int) -> bool:
    """Whether the table's history holds a commit of ``batch_id``: from the current snapshot back
    through its parents, down to :data:`LOOKBACK_MARGIN_MS` before the batch's oldest record."""
    snapshots = {s.snapshot_id: s for s in table.metadata.snapshots}
    snap = table.current_snapshot()
    floor = oldest_arrival_ms - LOOKBACK_MARGIN_MS
    while snap is not None and snap.timestamp_ms >= floor:
        summary = snap.summary
        if summary is not None and summary.additional_properties.get(BATCH_ID_PROPERTY) == batch_id:
            return True
        snap = snapshots.get(snap.parent_snapshot_id) if snap.parent_snapshot_id is not None else None
    return False


def with_timeouts(props: dict[str, str]) -> dict[str, str]:
    """Catalog properties with a bound on every network call the user left unbounded: S3
    (pyarrow's connect and request timeouts), PostgreSQL's connect timeout, and a REST catalog
    whose HTTP session has one (pyiceberg's sends its requests without)."""
    out = {"s3.connect-timeout": str(NETWORK_TIMEOUT_SECS), "s3.request-timeout": str(CALL_TIMEOUT_SECS), **props}
    uri = out.get("uri", "")
    if uri.startswith("postgresql+psycopg:") and "connect_timeout=" not in uri:
        out["uri"] = f"{uri}{'&' if '?' in uri else '?'}connect_timeout={NETWORK_TIMEOUT_SECS}"
    if out.get("type") == "rest" and "py-catalog-impl" not in out:
        del out["type"]  # pyiceberg takes one or the other
        out["py-catalog-impl"] = f"{__name__}.BoundedRestCatalog"
    return out


@functools.cache
def _rest_catalog_class() -> type:
    from pyiceberg.catalog.rest import RestCatalog

    class BoundedRestCatalog(RestCatalog):
        """pyiceberg's REST catalog, its HTTP requests bounded by :data:`CALL_TIMEOUT_SECS`."""

        def _create_session(self) -> Any:
            session: Any = super()._create_session()
            request = session.request

            def bounded(method: str, url: str, **kwargs: Any) -> Any:
                kwargs.setdefault("timeout", (NETWORK_TIMEOUT_SECS, CALL_TIMEOUT_SECS))
                return request(method, url, **kwargs)

            session.request = bounded
            return session

    return BoundedRestCatalog


def __getattr__(name: str) -> Any:  # BoundedRestCatalog, made when pyiceberg loads it (imported lazily)
    if name == "BoundedRestCatalog":
        return _rest_catalog_class()
    raise AttributeError(name)


def _column(schema: Any, name: str) -> Any:
    for f in schema.fields:
        if f.name.lower() == name.lower():
            return f
    return None


def _hive_type(t: Any) -> str:
    """An Iceberg type as the Hive type string format conversion takes."""
    from pyiceberg import types as it

    simple = {it.BooleanType: "boolean", it.IntegerType: "int", it.LongType: "bigint", it.FloatType: "float",
              it.DoubleType: "double", it.DateType: "date", it.TimestampType: "timestamp",
              it.TimestamptzType: "timestamp", it.StringType: "string", it.BinaryType: "binary"}
    for cls, name in simple.items():
        if isinstance(t, cls):
            return name
    if isinstance(t, it.DecimalType):
        return f"decimal({t.precision},{t.scale})"
    if isinstance(t, it.ListType):
        return f"array<{_hive_type(t.element_type)}>"
    if isinstance(t, it.MapType):
        return f"map<{_hive_type(t.key_type)},{_hive_type(t.value_type)}>"
    if isinstance(t, it.StructType):
        return "struct<" + ",".join(f"{f.name}:{_hive_type(f.field_type)}" for f in t.fields) + ">"
    raise ValueError(f"column type {t} is not supported")


def _unsupported(schema: Any) -> str | None:
    """Why the table cannot be written (a column type format conversion has no kernel for)."""
    for f in schema.fields:
        try:
            _hive_type(f.field_type)
        except ValueError:
            return f"column {f.name!r} has type {f.field_type}, which this destination cannot write"
    return None


def _required_null_rows(rows: Any, schema: Any) -> set[int]:
    """The rows that leave a required (top-level) column null."""
    import pyarrow.compute as pc

    out: set[int] = set()
    for i, f in enumerate(schema.fields):
        col = rows.column(i)
        if f.required and col.null_count:
            out.update(pc.indices_nonzero(pc.is_null(col)).to_pylist())
    return out


def _to_table_schema(rows: Any, schema: Any) -> Any:
    """The converted rows in the table's own Arrow schema (names, field ids, timestamp units and
    zones)."""
    import pyarrow as pa

    target = schema.as_arrow()
    return pa.Table.from_arrays([rows.column(i).cast(f.type) for i, f in enumerate(target)], schema=target)


def _literal(v: Any) -> Any:
    """A key value as a pyiceberg literal takes it (dates and times as ISO text)."""
    return v.isoformat() if isinstance(v, datetime | date) else v


def _delete_filter(keys: list[str], values: list[tuple[Any, ...]]) -> Any:
    """Rows whose unique key columns hold one of ``values``."""
    from pyiceberg import expressions

    ex: Any = expressions  # its expression classes take positional arguments (their stubs say keywords)
    if len(keys) == 1:
        return ex.In(keys[0], [v[0] for v in values]) if len(values) > 1 else ex.EqualTo(keys[0], values[0][0])
    terms = [ex.And(*[ex.EqualTo(k, v) for k, v in zip(keys, value, strict=True)]) for value in values]
    return terms[0] if len(terms) == 1 else ex.Or(*terms)
