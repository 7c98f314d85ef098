"""Writer options reaching the Parquet and ORC files, the fingerprint, empty input."""

from __future__ import annotations

import io

import pyarrow.orc as orc
import pyarrow.parquet as pq

from unit.formats_support import converter, lines


def test_parquet_options_reach_the_file() -> None:
    records = lines(*[{"a": i % 3, "s": "x" * (i % 5)} for i in range(5000)])
    for codec, expected in [
        ("snappy", "SNAPPY"),
        ("gzip", "GZIP"),
        ("zstd", "ZSTD"),
        ("uncompressed", "UNCOMPRESSED"),
    ]:
        conv = converter(
            [("a", "int"), ("s", "string")], parquet={"compression": codec, "enable_dictionary": False}
        )
        meta = pq.ParquetFile(io.BytesIO(conv.convert(records))).metadata
        column = meta.row_group(0).column(0)
        assert column.compression == expected
        assert "RLE_DICTIONARY" not in column.encodings and "PLAIN_DICTIONARY" not in column.encodings
    v2 = converter([("a", "int")], parquet={"writer_version": "v2"})
    assert pq.read_table(io.BytesIO(v2.convert(records)), use_threads=False).num_rows == 5000


def test_orc_options_reach_the_file() -> None:
    records = lines(*[{"a": i, "s": f"v{i}", "n": {"x": i}} for i in range(3000)])
    for codec in ("zlib", "snappy", "zstd", "none"):
        conv = converter(
            [("n", "struct<x:int>"), ("a", "int"), ("s", "string")],
            "orc",
            orc={"compression": codec, "bloom_filter_columns": ["s"], "row_index_stride": 1000},
        )
        file = orc.ORCFile(io.BytesIO(conv.convert(records)))
        assert file.compression == ("UNCOMPRESSED" if codec == "none" else codec.upper())
        assert file.nrows == 3000
    plain = converter([("n", "struct<x:int>"), ("a", "int"), ("s", "string")], "orc")
    bloom = converter(
        [("n", "struct<x:int>"), ("a", "int"), ("s", "string")], "orc", orc={"bloom_filter_columns": ["S"]}
    )
    assert len(bloom.convert(records)) > len(plain.convert(records))  # the bloom filter streams take room


def test_fingerprint_is_stable_and_tracks_schema_and_options() -> None:
    base = converter([("a", "int")])
    assert base.fingerprint == converter([("a", "int")]).fingerprint
    assert base.fingerprint == converter([("a", "int")], deserializer={"case_insensitive": False}).fingerprint
    others = {
        converter([("a", "bigint")]).fingerprint,
        converter([("a", "int")], parquet={"compression": "gzip"}).fingerprint,
        converter([("a", "int")], "orc").fingerprint,
        converter([("a", "int")], "avro").fingerprint,
    }
    assert base.fingerprint not in others and len(others) == 4
    assert (base.extension, converter([("a", "int")], "orc").extension) == (".parquet", ".orc")


def test_empty_input_writes_an_empty_file() -> None:
    conv = converter([("a", "int")])
    assert conv.check([]) == []
    assert pq.read_table(io.BytesIO(conv.convert([])), use_threads=False).num_rows == 0
