from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firehose.config import ConfigError, load_config, load_config_text


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", env or {})
    return info.value.errors


GOOD = """\
api:
  listen: "127.0.0.1:4573"
data_dir: /tmp/d
streams:
  - name: clicks
    buffering: {size_mib: 5, interval_secs: 300}
    destination:
      type: s3
      bucket: arn:aws:s3:::my-bucket
      prefix: "logs/"
      compression: GZIP
"""


def test_good_config_fills_defaults_and_normalises() -> None:
    cfg = load_config_text(GOOD, "f.yaml", {})
    s = cfg.streams[0]
    assert s.destination.bucket == "my-bucket"
    assert s.destination.compression == "gzip"
    assert s.spool.fsync == "always"
    assert cfg.shutdown_timeout_secs == 30
    assert (s.size_bytes, s.interval_secs) == (5 << 20, 300)


def test_buffering_defaults_come_from_the_destination() -> None:
    cfg = load_config_text("streams:\n  - name: a\n    destination: {type: local, path: /x}\n", "f.yaml", {})
    assert cfg.streams[0].buffering.size_mib == 5
    assert cfg.streams[0].buffering.interval_secs == 300


def test_out_of_range_buffering_names_file_line_and_field() -> None:
    errs = errors_of(GOOD.replace("size_mib: 5", "size_mib: 512"))
    assert errs == ["f.yaml:6: streams[0].buffering.size_mib: must be between 1 and 128 for a s3 destination, got 512"]


def test_unknown_field_is_rejected_with_its_line() -> None:
    errs = errors_of(GOOD.replace("      prefix:", "      prefx:"))
    assert errs == ["f.yaml:10: streams[0].destination.prefx: unknown field"]


def test_duplicate_key_is_rejected() -> None:
    errs = errors_of(GOOD.replace('data_dir: /tmp/d\n', 'data_dir: /tmp/d\ndata_dir: /tmp/e\n'))
    assert errs == ["f.yaml:4: data_dir: duplicate key (first defined on line 3)"]


def test_unknown_destination_type_lists_known_types() -> None:
    errs = errors_of(GOOD.replace("type: s3", "type: opensearh"))
    assert len(errs) == 1
    assert errs[0].startswith("f.yaml:8: streams[0].destination.type: unknown type 'opensearh'; known: ")
    assert "local" in errs[0] and "s3" in errs[0]


def test_bad_stream_name_and_wrong_type() -> None:
    errs = errors_of(GOOD.replace("name: clicks", "name: 'bad name!'").replace("size_mib: 5", "size_mib: five"))
    assert "f.yaml:5: streams[0].name: must match [a-zA-Z0-9_.-]{1,64} (Firehose's stream name rule), got 'bad name!'" in errs
    assert any(e.startswith("f.yaml:6: streams[0].buffering.size_mib: input should be a valid integer") for e in errs)


def test_duplicate_stream_names() -> None:
    text = "streams:\n  - name: a\n    destination: {type: local, path: /x}\n  - name: a\n    destination: {type: local, path: /y}\n"
    assert errors_of(text) == ["f.yaml:4: streams[1].name: duplicate stream name 'a' (also streams[0])"]


def test_env_interpolation_and_missing_variable() -> None:
    text = GOOD.replace("bucket: arn:aws:s3:::my-bucket", "bucket: ${BUCKET}")
    assert load_config_text(text, "f.yaml", {"BUCKET": "from-env"}).streams[0].destination.bucket == "from-env"
    assert errors_of(text) == ["f.yaml:9: streams[0].destination.bucket: environment variable ${BUCKET} is not set"]
    text2 = GOOD.replace("bucket: arn:aws:s3:::my-bucket", "bucket: ${BUCKET:-fallback-bucket}")
    assert load_config_text(text2, "f.yaml", {}).streams[0].destination.bucket == "fallback-bucket"


def test_bad_compression_and_prefix_rules() -> None:
    errs = errors_of(GOOD.replace("compression: GZIP", "compression: lz4"))
    assert errs == ["f.yaml:11: streams[0].destination.compression: unknown compression 'lz4'; known: none, gzip, zip, snappy, hadoop_snappy"]
    errs = errors_of(GOOD.replace('prefix: "logs/"', 'prefix: "logs/!{timestamp:yyyy}/"'))
    assert len(errs) == 1 and "ErrorOutputPrefix" in errs[0] and errs[0].startswith("f.yaml:7: streams[0].destination: ")


def test_yaml_syntax_error_has_a_line() -> None:
    errs = errors_of("streams:\n  - name: a\n   bad: [\n")
    assert errs[0].startswith("f.yaml:") and "invalid YAML" in errs[0]


def test_embedded_default_config_loads() -> None:
    cfg = load_config(None)
    assert [s.name for s in cfg.streams] == ["default"]
    assert cfg.api.listen == "127.0.0.1:4573"
    assert cfg.data_dir == "./var/firehose"
    assert cfg.streams[0].destination.path == "./var/delivered"


def test_readable_copy_matches_embedded_default() -> None:
    root = Path(__file__).resolve().parents[2]
    assert (root / "config" / "firehose.yaml").read_text() == (root / "firehose" / "default.yaml").read_text()


def test_validate_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("size_mib: 5", "size_mib: 0"))
    ok = subprocess.run([sys.executable, "-m", "firehose", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{bad}:6: streams[0].buffering.size_mib: must be between 1 and 128" in res.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[2] / "config" / "examples").glob("*.yaml")))
def test_shipped_examples_are_valid(example: Path) -> None:
    cfg = load_config(str(example), env={"S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"})
    assert cfg.streams


def test_stream_state_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    from firehose.daemon import StreamState

    state = StreamState(str(tmp_path))
    (tmp_path / "streams" / "s.json").write_text('{"format": 99, "version": 3}')
    with pytest.raises(ConfigError, match="state format version 99 .* reads version 1"):
        state.load("s")


def test_one_load_reports_every_problem_of_every_stream() -> None:
    """A typo in a stream's buffering used to hide everything below it (the first pass raised
    before destinations, sources and processors were checked): one run lists them all."""
    text = (
        "api: {region: 'Not A Region'}\n"
        "streams:\n"
        "  - name: a\n"
        "    buffering: {size_mib: five}\n"
        "    sources: [{type: fil}]\n"
        "    processing:\n"
        "      - {type: decompression, compression_format: lz}\n"
        "    backup: {path: /b, mode: sometimes}\n"
        "    destination: {type: local, path: out, compression: lz4}\n"
        "  - name: b\n"
        "    destination: {type: s3}\n"
    )
    errs = errors_of(text)
    assert errs[0] == "f.yaml:1: api.region: must be a region name such as us-east-1, got 'Not A Region'"
    assert errs[1] == "f.yaml:4: streams[0].buffering.size_mib: input should be a valid integer, got 'five'"
    assert errs[2] == ("f.yaml:9: streams[0].destination.compression: unknown compression 'lz4'; "
                       "known: none, gzip, zip, snappy, hadoop_snappy")
    assert errs[3].startswith("f.yaml:5: streams[0].sources[0].type: unknown type 'fil'; known: ")
    assert errs[4] == "f.yaml:7: streams[0].processing[0].compression_format: input should be 'gzip' or 'GZIP', got 'lz'"
    assert errs[5].startswith("f.yaml:8: streams[0].backup.mode: must be failed_only or all")
    assert errs[6] == "f.yaml:11: streams[1].destination.bucket: required field is missing"
    assert len(errs) == 7


def test_an_invalid_destination_does_not_hide_the_streams_processing_or_format() -> None:
    text = (
        "streams:\n"
        "  - name: a\n"
        "    processing: [{type: metadata_extraction, query: '{a: .a'}]\n"
        "    format: {type: parquet}\n"
        "    destination: {type: opensearh}\n"
    )
    errs = errors_of(text)
    assert errs[0].startswith("f.yaml:5: streams[0].destination.type: unknown type 'opensearh'; known: ")
    assert errs[1].startswith("f.yaml:3: streams[0].processing[0].query: is not a valid jq program")
    assert errs[2] == "f.yaml:4: streams[0].format: format 'parquet' needs a 'schema' (columns, avro_schema or glue)"
    assert len(errs) == 3


def test_a_broken_stream_field_does_not_cause_errors_that_are_not_there() -> None:
    """An invalid dynamic_partitioning block is reported once; the destination's partition-key
    prefix is still judged as partitioned (what was meant), not flagged as well."""
    text = (
        "streams:\n"
        "  - name: a\n"
        "    dynamic_partitioning: {enabled: true, max_active_partitions: 0}\n"
        "    processing: [{type: metadata_extraction, query: '{k: .k}'}]\n"
        "    destination:\n"
        "      type: local\n"
        "      path: out\n"
        "      prefix: 'k=!{partitionKeyFromQuery:k}/'\n"
        "      error_output_prefix: 'errors/!{firehose:error-output-type}/'\n"
    )
    assert errors_of(text) == [
        "f.yaml:3: streams[0].dynamic_partitioning.max_active_partitions: input should be greater than or "
        "equal to 1, got 0"
    ]


def test_a_stream_that_is_not_a_mapping_is_named() -> None:
    errs = errors_of("streams:\n  - just-a-name\n  - name: b\n    destination: {type: nope}\n")
    assert errs[0].startswith("f.yaml:2: streams[0]: input should be a valid dictionary")
    assert errs[1].startswith("f.yaml:4: streams[1].destination.type: unknown type 'nope'")


def test_every_duplicate_key_and_missing_variable_is_reported_at_once() -> None:
    text = (
        "data_dir: ${DATA}\n"
        "streams:\n"
        "  - name: a\n"
        "    name: b\n"
        "    destination: {type: s3, bucket: '${BUCKET}', prefix: '${PREFIX:-p/}'}\n"
    )
    assert errors_of(text) == [
        "f.yaml:1: data_dir: environment variable ${DATA} is not set",
        "f.yaml:4: streams[0].name: duplicate key (first defined on line 3)",
        "f.yaml:5: streams[0].destination.bucket: environment variable ${BUCKET} is not set",
    ]
