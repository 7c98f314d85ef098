"""The converter: JSON records in, one Parquet, ORC or Avro file out (see the package doc)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Final

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pj

from firehose.transforms.formats.arrays import _Errs, _valid
from firehose.transforms.formats.avro import _avro_rows, _avro_type
from firehose.transforms.formats.config import FormatConfig
from firehose.transforms.formats.errors import MALFORMED_DATA, ConversionError, SchemaError
from firehose.transforms.formats.fastpath import _FastPath, _Prepared, _read_options
from firehose.transforms.formats.kernels import _Kernels
from firehose.transforms.formats.nodes import (
    _final_type,
    _has_decimal,
    _has_map,
    _plain,
    _slow_type,
)
from firehose.transforms.formats.normalise import _Normaliser, _parse_documents, _RecordError, _ValueMismatch
from firehose.transforms.formats.schema import (
    ResolvedSchema,
    _assign_keys,
    _index_paths,
    _no_dots,
    _root_node,
    resolve_schema,
)
from firehose.transforms.formats.timestamps import _OPENX_TIMESTAMPS, _hive_timestamp_specs, _TsSpec

#: Default bound of the rows ``check`` keeps for ``convert`` (``Converter.cache_limit_bytes``).
CACHE_LIMIT_BYTES: Final = 256 * 1024 * 1024


# After this many calls in a row that found errors everywhere, only every _RETRY_FAST-th call
# tries the vectorised reader first (a producer whose every record needs the per-record path
# would otherwise pay for the failed attempts on every batch).
_DENSE_STREAK: Final = 3
_RETRY_FAST: Final = 8

# The cache holds at most this many check() results; a convert() whose rows come in more
# separate runs than this is recomputed (gathering tiny pieces costs more than parsing again).
_MAX_CACHE_ENTRIES: Final = 4096
_ENTRY_IDS: Final = 1 << 15  # entry ids are packed into 15 bits of the index values


@dataclass
class _Outcome:
    """Converted rows in record order (failed records have none) and the failures."""

    table: pa.Table
    record_of_row: np.ndarray[Any, np.dtype[np.int64]]
    failures: dict[int, tuple[str, str]]


@dataclass
class _CacheEntry:
    table: pa.Table
    keys: list[bytes]
    nbytes: int


class Converter(_FastPath):
    """Converts JSON records into one Parquet, ORC or Avro file per call (see the package doc).

    Attributes:
        extension: ``.parquet``, ``.orc`` or ``.avro``.
        arrow_schema: the Arrow schema of the written files.
        fingerprint: a stable hash of the schema and the output options (not the deserializer,
            which does not change the file); a change means a new file.
        cache_limit_bytes: the bound of the rows ``check`` keeps for ``convert`` (Arrow bytes).
        path_stats: counters of records read by the vectorised reader and by the per-record
            path, failed vectorised reads and key rewrites.

    Building a converter parses the schema; a problem raises :class:`SchemaError` with a message
    naming the field. Given ``schema`` (a :class:`ResolvedSchema` from :func:`resolve_schema`),
    the constructor does no I/O; without it, it resolves the schema itself (reads the
    ``avro_schema`` file, or fetches the ``glue`` table once, with bounded timeouts).
    ``check`` and ``convert`` are CPU-bound and release the GIL mostly inside pyarrow; call them
    off the event loop.
    """

    def __init__(self, config: FormatConfig, schema: ResolvedSchema | None = None) -> None:
        if config.type == "json" or config.schema_ is None:
            raise ValueError("format 'json' needs no conversion; build a Converter for parquet, orc or avro")
        self.config = config
        de = config.deserializer
        self._openx = de.type == "openx_json"
        self._fold = de.case_insensitive if self._openx else True
        self._dots = self._openx and de.convert_dots_in_json_keys_to_underscores
        self._mappings = (
            {self._fold_name(k): self._fold_name(v) for k, v in de.column_to_json_key_mappings.items()}
            if self._openx
            else {}
        )
        resolved = schema if schema is not None else resolve_schema(config.schema_)
        avro_text = resolved.avro_text
        root = _root_node(resolved)
        if not self._openx:
            _no_dots(root)
        _assign_keys(root, self._fold, self._mappings)
        self._root = root
        self.arrow_schema = pa.schema(
            [pa.field(c.name, _final_type(c), nullable=c.nullable) for c in root.fields]
        )
        self.extension = {"parquet": ".parquet", "orc": ".orc", "avro": ".avro"}[config.type]
        self._avro_schema: dict[str, Any] | None = None
        if config.type == "avro":
            if avro_text is not None:
                self._avro_schema = json.loads(avro_text)
            else:
                record = _avro_type(root, {})
                record["name"] = "firehose_record"
                self._avro_schema = record
            import fastavro

            try:
                self._avro_parsed = fastavro.parse_schema(self._avro_schema)
            except Exception as exc:  # fastavro raises several exception types for bad schemas
                raise SchemaError(f"Avro schema: {exc}") from None
        self._orc_bloom_ids = self._bloom_ids(config.orc.bloom_filter_columns) if config.type == "orc" else []
        self.fingerprint = self._fingerprint()
        if self._openx:
            specs: tuple[_TsSpec, ...] = _OPENX_TIMESTAMPS
            hint = (
                "accepted: yyyy-MM-dd'T'HH:mm:ss[.S]Z, yyyy-M-d H:mm:ss[.S], "
                "epoch seconds/millis, epoch seconds with fraction"
            )
        else:
            specs = _hive_timestamp_specs(de.timestamp_formats)
            hint = "accepted: " + ", ".join([*de.timestamp_formats, "yyyy-M-d H:m:s[.S]"])
        self._kernels = _Kernels(specs, hint)
        self._normaliser = _Normaliser(self._openx, self._fold, self._dots)
        self._exact_numbers = _has_decimal(root)
        self._fast_enabled = not _has_map(root)
        self._detect = self._fold or self._dots
        self._slow_schema = pa.schema([pa.field(c.name, _slow_type(c)) for c in root.fields])
        self._known_paths = {}
        _index_paths(root, "", self._known_paths)
        self._overrides = {}
        self._variant_patterns = None
        self._dense_streak = 0
        self._calls = 0
        self._fast_schema_cache = None
        self._lock = threading.Lock()
        self.cache_limit_bytes = CACHE_LIMIT_BYTES
        self._cache: OrderedDict[int, _CacheEntry] = OrderedDict()
        self._cache_index: dict[bytes, int] = {}  # record -> entry << 48 | first row << 16 | rows
        self._cache_bytes = 0
        self._next_entry = 0
        #: Counters for monitoring and benchmarks: records converted by the vectorised reader
        #: and by the per-record path, failed vectorised reads, and key rewrites.
        self.path_stats = {
            "fast_records": 0,
            "slow_records": 0,
            "fast_failures": 0,
            "key_rewrites": 0,
        }

    # -- schema ----------------------------------------------------------------------------------

    def _fold_name(self, name: str) -> str:
        return name.lower() if self._fold else name

    def _bloom_ids(self, names: list[str]) -> list[int]:
        # ORC numbers columns in pre-order with 0 for the root struct; nested types take ids too.
        def size(t: pa.DataType) -> int:
            return 1 + sum(size(t.field(i).type) for i in range(t.num_fields))

        ids: dict[str, int] = {}
        next_id = 1
        for f in self.arrow_schema:
            ids[f.name.lower()] = next_id
            next_id += size(f.type)
        out = []
        for name in names:
            if name.lower() not in ids:
                raise SchemaError(f"orc.bloom_filter_columns: no top-level column {name!r}")
            out.append(ids[name.lower()])
        return out

    def _fingerprint(self) -> str:
        options: dict[str, Any] = {"type": self.config.type, "schema": str(self.arrow_schema)}
        if self.config.type == "parquet":
            options["parquet"] = self.config.parquet.model_dump()
        elif self.config.type == "orc":
            options["orc"] = self.config.orc.model_dump()
        else:
            options["avro"] = self._avro_schema
        blob = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    # -- public API ------------------------------------------------------------------------------

    def check(self, records: Sequence[bytes]) -> list[tuple[str, str] | None]:
        """Per record: ``None`` when it converts, else ``(error_code, error_message)``.

        A record may hold several concatenated JSON objects (each becomes a row); it fails as a
        whole if any of them fails. The converted rows are cached for :meth:`convert`.
        """
        records = _as_bytes(records)
        outcome = self._process(records)
        self._remember(records, outcome)
        verdicts: list[tuple[str, str] | None] = [None] * len(records)
        for i, failure in outcome.failures.items():
            verdicts[i] = failure
        return verdicts

    def convert(self, records: Sequence[bytes]) -> bytes:
        """The whole output file holding these records' rows, in record order.

        Raises :class:`ConversionError` if any record does not convert (``check`` reports the
        same failures).
        """
        records = _as_bytes(records)
        table = self._from_cache(records)
        if table is None:
            outcome = self._process(records)
            if outcome.failures:
                raise ConversionError(outcome.failures)
            table = outcome.table
        return self._write(table)

    def to_arrow(self, records: Sequence[bytes]) -> tuple[pa.Table, np.ndarray[Any, np.dtype[np.int64]],
                                                          dict[int, tuple[str, str]]]:
        """The rows of the records that convert (in the schema's Arrow types, in record order),
        the index of the record each row came from, and the failures (as :meth:`check` reports
        them). For a writer that does its own encoding (the Iceberg destination)."""
        outcome = self._process(_as_bytes(records))
        return outcome.table, outcome.record_of_row, outcome.failures

    def clear_cache(self) -> None:
        """Forget the rows ``check`` kept for ``convert``."""
        with self._lock:
            self._cache.clear()
            self._cache_index.clear()
            self._cache_bytes = 0

    # -- cache -----------------------------------------------------------------------------------

    def _remember(self, records: list[bytes], outcome: _Outcome) -> None:
        """Keep the converted rows of these records for ``convert`` (keyed by content)."""
        n = len(records)
        table = outcome.table
        if not n or table.nbytes > self.cache_limit_bytes or table.num_rows >= 1 << 32:
            return
        counts = np.bincount(outcome.record_of_row, minlength=n).astype(np.int64)
        starts = np.cumsum(counts) - counts
        keep = counts < 1 << 16  # a record with that many objects is simply not cached
        if outcome.failures:
            keep[np.fromiter(outcome.failures, np.int64, len(outcome.failures))] = False
        with self._lock:
            entry_id = self._next_entry
            self._next_entry = (self._next_entry + 1) % _ENTRY_IDS
            packed = (entry_id << 48) | (starts << 16) | counts
            if keep.all():
                keys = records
                self._cache_index.update(zip(records, packed.tolist(), strict=True))
            else:
                rows = np.flatnonzero(keep).tolist()
                keys = [records[i] for i in rows]
                self._cache_index.update(zip(keys, packed[rows].tolist(), strict=True))
            self._cache[entry_id] = _CacheEntry(table, keys, table.nbytes)
            self._cache_bytes += table.nbytes
            while self._cache and (
                self._cache_bytes > self.cache_limit_bytes or len(self._cache) > _MAX_CACHE_ENTRIES
            ):
                old_id, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
                for key in old.keys:
                    value = self._cache_index.get(key)
                    if value is not None and value >> 48 == old_id:
                        del self._cache_index[key]

    def _from_cache(self, records: list[bytes]) -> pa.Table | None:
        """The rows ``check`` produced for exactly these records, or None if any is unknown."""
        n = len(records)
        if not n:
            return None
        with self._lock:
            packed = np.fromiter(map(self._cache_index.get, records, repeat(-1)), np.int64, n)
            if (packed < 0).any():
                return None
            entry = packed >> 48
            tables = {int(e): self._cache[int(e)].table for e in np.unique(entry)}
        start = (packed >> 16) & 0xFFFFFFFF
        count = packed & 0xFFFF
        # Runs of records whose rows follow each other in one cached table become one slice;
        # records converted in a batch and delivered in the same order give one run per batch.
        cut = np.flatnonzero((entry[1:] != entry[:-1]) | (start[1:] != start[:-1] + count[:-1])) + 1
        bounds = np.concatenate(([0], cut, [n]))
        if len(bounds) - 1 <= _MAX_CACHE_ENTRIES:
            totals = np.concatenate(([0], np.cumsum(count)))
            slices = [
                tables[int(entry[a])].slice(int(start[a]), int(totals[b] - totals[a]))
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
            ]
            return slices[0] if len(slices) == 1 else pa.concat_tables(slices)
        return None

    # -- conversion ------------------------------------------------------------------------------

    def _process(self, records: list[bytes]) -> _Outcome:
        failures: dict[int, tuple[str, str]] = {}
        pieces: list[tuple[np.ndarray[Any, Any], pa.Table]] = []
        slow: list[int] = []
        with self._lock:
            self._calls += 1
            skip = self._dense_streak >= _DENSE_STREAK and self._calls % _RETRY_FAST != 0
        if self._fast_enabled and records and not skip:
            prepared = _Prepared(records)
            slow.extend(np.flatnonzero(~prepared.ok).tolist())
            fast_rows = np.flatnonzero(prepared.ok)
            if len(fast_rows):
                for rows, raw in self._fast_pieces(prepared, fast_rows, slow):
                    table, errs = self._convert_raw(raw, fast=True)
                    for row, message in errs.first_by_row().items():
                        failures.setdefault(int(rows[row]), (MALFORMED_DATA, message))
                    pieces.append((rows, table))
        else:
            slow = list(range(len(records)))
        with self._lock:
            self.path_stats["fast_records"] += len(records) - len(slow)
            self.path_stats["slow_records"] += len(slow)
        if slow:
            slow.sort()
            record_of_row, raw = self._slow_raw(records, slow, failures)
            if raw is not None:
                table, errs = self._convert_raw(raw, fast=False)
                for row, message in errs.first_by_row().items():
                    failures.setdefault(int(record_of_row[row]), (MALFORMED_DATA, message))
                pieces.append((record_of_row, table))
        return self._assemble(pieces, failures)

    def _assemble(
        self, pieces: list[tuple[np.ndarray[Any, Any], pa.Table]], failures: dict[int, tuple[str, str]]
    ) -> _Outcome:
        if not pieces:
            empty = self.arrow_schema.empty_table()
            return _Outcome(empty, np.zeros(0, np.int64), failures)
        owners = np.concatenate([p[0] for p in pieces]).astype(np.int64)
        table = pieces[0][1] if len(pieces) == 1 else pa.concat_tables([p[1] for p in pieces])
        keep = np.ones(len(owners), dtype=bool)
        if failures:
            keep = ~np.isin(owners, np.fromiter(failures, np.int64, len(failures)))
        order = np.argsort(owners, kind="stable")
        in_order = bool(np.all(order == np.arange(len(order))))
        if in_order and keep.all():
            return _Outcome(table, owners, failures)
        order = order[keep[order]]
        return _Outcome(table.take(pa.array(order, pa.int64())), owners[order], failures)

    def _convert_raw(self, raw: pa.Table, fast: bool) -> tuple[pa.Table, _Errs]:
        """Apply the kernels column by column; columns the reader already produced in their
        final form stay as they are (chunked, zero-copy)."""
        errs = _Errs()
        index = {name: i for i, name in enumerate(raw.schema.names)}
        columns: list[pa.ChunkedArray] = []
        for child in self._root.fields:
            at = index.get(child.key if fast else child.name)
            column = (
                raw.column(at)
                if at is not None
                else pa.chunked_array([pa.nulls(raw.num_rows, _slow_type(child))])
            )
            if _plain(child) and column.type == _final_type(child):
                columns.append(column)
                continue
            converted, child_errs = self._kernels.convert(child, column.combine_chunks(), fast)
            errs.extend(child_errs)
            if not child.nullable and converted.null_count:
                rows = np.flatnonzero(~_valid(converted))
                errs.add(rows, [f"required field '{child.path}' is missing or null"] * len(rows))
            columns.append(pa.chunked_array([converted], type=_final_type(child)))
        return pa.Table.from_arrays(columns, schema=self.arrow_schema), errs


    # -- per-record path -------------------------------------------------------------------------

    def _slow_raw(
        self, records: list[bytes], indices: list[int], failures: dict[int, tuple[str, str]]
    ) -> tuple[np.ndarray[Any, Any], pa.Table | None]:
        lines: list[bytes] = []
        owners: list[int] = []
        for i in indices:
            try:
                docs = _parse_documents(records[i], self._exact_numbers)
                out = [orjson.dumps(self._normaliser.struct(self._root, doc)) for doc in docs]
            except _RecordError as exc:
                failures[i] = (exc.code, exc.message)
                continue
            except _ValueMismatch as exc:
                failures[i] = (MALFORMED_DATA, str(exc))
                continue
            except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate escape in a string
                failures[i] = (MALFORMED_DATA, f"a string is not valid Unicode: {exc}")
                continue
            lines.extend(out)
            owners.extend([i] * len(out))
        if not lines:
            return np.zeros(0, np.int64), None
        options = pj.ParseOptions(explicit_schema=self._slow_schema, unexpected_field_behavior="ignore")
        data = b"\n".join(lines)
        try:
            table = pj.read_json(
                pa.BufferReader(data), read_options=_read_options(len(data)), parse_options=options
            )
        except pa.ArrowException:
            # The canonical JSON always fits the text schema; should pyarrow still refuse a
            # line, find it rather than fail the batch.
            tables: list[pa.Table] = []
            kept: list[int] = []
            for line, owner in zip(lines, owners, strict=True):
                try:
                    part = pj.read_json(pa.BufferReader(line), parse_options=options)
                except pa.ArrowException as exc:
                    failures[owner] = (MALFORMED_DATA, f"the record could not be read: {exc}")
                    continue
                tables.append(part)
                kept.append(owner)
            # A record whose other object failed fails whole: drop its good rows too.
            rows = [i for i, owner in enumerate(kept) if owner not in failures]
            if not rows:
                return np.zeros(0, np.int64), None
            table = pa.concat_tables([tables[i] for i in rows])
            owners = [kept[i] for i in rows]
        return np.array(owners, dtype=np.int64), table

    # -- writers ---------------------------------------------------------------------------------

    def _write(self, table: pa.Table) -> bytes:
        sink = io.BytesIO()
        kind = self.config.type
        if kind == "parquet":
            import pyarrow.parquet as pq

            opts = self.config.parquet
            row_bytes = max(1, table.nbytes // max(1, table.num_rows))
            pq.write_table(
                table,
                sink,
                compression="none" if opts.compression == "uncompressed" else opts.compression,
                row_group_size=max(1024, opts.block_size_mib * 1024 * 1024 // row_bytes),
                data_page_size=opts.page_size_kib * 1024,
                use_dictionary=opts.enable_dictionary,
                data_page_version="1.0" if opts.writer_version == "v1" else "2.0",
            )
        elif kind == "orc":
            import pyarrow.orc as po

            orc = self.config.orc
            po.write_table(
                table,
                sink,
                compression="uncompressed" if orc.compression == "none" else orc.compression,
                stripe_size=orc.stripe_size_mib * 1024 * 1024,
                row_index_stride=orc.row_index_stride,
                bloom_filter_columns=self._orc_bloom_ids or None,
                bloom_filter_fpp=orc.bloom_filter_false_positive_probability,
                dictionary_key_size_threshold=orc.dictionary_key_threshold or 0.0,
            )
        else:
            import fastavro

            fastavro.writer(sink, self._avro_parsed, _avro_rows(table, self._root), codec="snappy")
        return sink.getvalue()


def _as_bytes(records: Sequence[bytes]) -> list[bytes]:
    # Records are dictionary keys of the cache and are stripped, so they must be bytes proper.
    if isinstance(records, list) and set(map(type, records)) <= {bytes}:
        return records
    return [r if type(r) is bytes else bytes(r) for r in records]
