"""The config documents itself: the JSON Schema that `firehose config-schema` prints describes every
shipped config, refuses what the loader refuses key by key, and the checked-in
docs/config-reference.md is what the models generate today."""

from __future__ import annotations

import datetime
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # in the test extras through moto[server] (openapi-spec-validator)
import pytest
import yaml

from firehose.configdoc import (
    REFERENCE_PATH,
    REGENERATE_COMMAND,
    config_schema,
    reference_markdown,
    schema_text,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "config" / "examples").glob("*.yaml")) + [ROOT / "config" / "firehose.yaml",
                                                                   ROOT / "firehose" / "default.yaml"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return config_schema()


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def problems(validator: Any, doc: Any) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def as_editor_sees(value: Any) -> Any:
    """YAML as a language server reads it: timestamps stay strings (YAML 1.2), `${VAR}` unexpanded."""
    if isinstance(value, dict):
        return {k: as_editor_sees(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_editor_sees(v) for v in value]
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    return value


def test_checked_in_reference_is_what_the_models_generate() -> None:
    generated = reference_markdown()
    checked_in = (ROOT / REFERENCE_PATH).read_text(encoding="utf-8")
    if generated != checked_in:
        diff = "".join(list(difflib.unified_diff(checked_in.splitlines(True), generated.splitlines(True),
                                                 REFERENCE_PATH, "generated"))[:60])
        pytest.fail(f"{REFERENCE_PATH} is stale: regenerate it with `{REGENERATE_COMMAND}`\n{diff}")


def test_output_is_stable() -> None:
    assert schema_text(config_schema()) == schema_text(config_schema())
    assert reference_markdown() == reference_markdown()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate_against_the_schema(path: Path, validator: Any) -> None:
    doc = as_editor_sees(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert problems(validator, doc) == []


def test_schema_covers_every_typed_part(schema: dict[str, Any]) -> None:
    from firehose.registry import BUILTIN_DESTINATIONS, BUILTIN_PROCESSORS, BUILTIN_SOURCES

    stream = schema["$defs"]["StreamConfig"]["properties"]
    assert set(stream["destination"]["discriminator"]["mapping"]) == set(BUILTIN_DESTINATIONS)
    assert set(stream["sources"]["items"]["discriminator"]["mapping"]) == set(BUILTIN_SOURCES)
    assert set(stream["processing"]["items"]["discriminator"]["mapping"]) == set(BUILTIN_PROCESSORS)
    assert stream["format"]["anyOf"][0] == {"$ref": "#/$defs/FormatConfig"}
    assert stream["backup"]["anyOf"][0] == {"$ref": "#/$defs/BackupConfig"}
    file_options = schema["$defs"]["FileSourceConfig"]["properties"]["processing"]["items"]
    assert set(file_options["discriminator"]["mapping"]) == {"single_line", "csv_to_json", "log_to_json",
                                                             "add_metadata"}
    assert set(schema["properties"]) == {"api", "data_dir", "shutdown_timeout_secs", "streams", "cluster"}  # not `source`


def valid() -> dict[str, Any]:
    return {"streams": [{"name": "a", "destination": {"type": "local", "path": "out"}}]}


def with_destination(**destination: Any) -> dict[str, Any]:
    doc = valid()
    doc["streams"][0]["destination"] = destination
    return doc


@pytest.mark.parametrize("doc, where", [
    ({"bogus": 1}, ""),
    ({"api": {"listen": "127.0.0.1:1", "bogus": 1}}, "api"),
    ({"streams": [{"destination": {"type": "local", "path": "out"}}]}, "streams/0"),
    (with_destination(type="nope", path="out"), "streams/0/destination"),
    (with_destination(type="s3"), "streams/0/destination"),
    (with_destination(type="local", path="out", bucket="b"), "streams/0/destination"),
    (with_destination(type="local", path="out", compression=5), "streams/0/destination"),
    ({"streams": [{**valid()["streams"][0], "buffering": {"size_mib": "5"}}]}, "streams/0/buffering/size_mib"),
    ({"streams": [{**valid()["streams"][0], "spool": {"fsync": "sometimes"}}]}, "streams/0/spool/fsync"),
    ({"streams": [{**valid()["streams"][0], "processing": [{"type": "lambda", "bogus": 1}]}]},
     "streams/0/processing/0"),
    ({"streams": [{**valid()["streams"][0], "sources": [{"type": "file"}]}]}, "streams/0/sources/0"),
    ({"streams": [{**valid()["streams"][0], "sources": [{"type": "file", "paths": ["x"],
                                                         "processing": [{"type": "nope"}]}]}]},
     "streams/0/sources/0"),
    ({"shutdown_timeout_secs": 0}, "shutdown_timeout_secs"),
])
def test_schema_refuses_unknown_keys_missing_keys_and_unknown_types(validator: Any, doc: Any, where: str) -> None:
    found = problems(validator, doc)
    assert found and all(p.startswith(where) for p in found), found
    assert problems(validator, valid()) == []


def test_other_spellings_a_validator_normalizes_are_not_refused(validator: Any) -> None:
    doc = valid()
    doc["streams"][0]["format"] = {"type": "parquet", "schema": {"columns": [{"name": "a", "type": "string"}]},
                                   "parquet": {"compression": "SNAPPY"}}
    assert problems(validator, doc) == []


def test_every_field_of_every_built_in_model_has_a_description(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]

    def reachable(name: str, seen: set[str]) -> set[str]:
        if name not in seen:
            seen.add(name)
            for ref in _refs(defs[name]):
                reachable(ref, seen)
        return seen

    # The format models (transforms/formats) are documented with whatever descriptions they have.
    formats = reachable("FormatConfig", set())
    missing = [f"{name}.{key}" for name, model in sorted(defs.items()) if name not in formats
               for key, prop in model.get("properties", {}).items() if not prop.get("description")]
    missing += [f"<top level>.{key}" for key, prop in schema["properties"].items() if not prop.get("description")]
    assert missing == []
    assert [name for name, model in sorted(defs.items()) if not model.get("description")] == []


def _refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        out = {value["$ref"].rsplit("/", 1)[-1]} if isinstance(value.get("$ref"), str) else set()
        for v in value.values():
            out |= _refs(v)
        return out
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value)) if value else set()
    return set()


def test_every_field_of_the_built_in_classes_has_a_description() -> None:
    """Checked on the classes too, fields the schema leaves out (the loader's own) included."""
    from firehose.config import DaemonConfig
    from firehose.registry import (
        BACKUP_CONFIG,
        BUILTIN_DESTINATIONS,
        BUILTIN_PROCESSORS,
        BUILTIN_SOURCES,
        load,
    )
    from firehose.sources.file_options import (
        AddMetadataOption,
        CsvToJsonOption,
        LogToJsonOption,
        SingleLineOption,
    )

    classes: list[Any] = [DaemonConfig, load(BACKUP_CONFIG), SingleLineOption, CsvToJsonOption, LogToJsonOption,
                          AddMetadataOption]
    classes += [load(t) for table in (BUILTIN_DESTINATIONS, BUILTIN_SOURCES, BUILTIN_PROCESSORS) for t in table.values()]
    seen: set[type] = set()
    missing: list[str] = []
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, info in cls.model_fields.items():
            if not info.description:
                missing.append(f"{cls.__module__}.{cls.__name__}.{name}")
            classes += [t for t in _model_types(info.annotation)]
    assert missing == []


def _model_types(annotation: Any) -> list[type]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in get_args(annotation) for t in _model_types(arg)]


def firehose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firehose", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


PLUGIN = '''
from typing import Literal

from firehose.destinations.local import LocalDestinationConfig
from firehose.sources.file import FileSourceConfig


class CopyDestinationConfig(LocalDestinationConfig):
    type: Literal["copy"]


class TailSourceConfig(FileSourceConfig):
    type: str
'''


def test_cli_prints_the_schema_and_the_reference_with_installed_plugins_in_the_schema_only(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fh_schema_plugin.py").write_text(PLUGIN)
    info = plugins / "fh_schema_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fh-schema-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[firehose.destinations]\ncopy = fh_schema_plugin:CopyDestinationConfig\n"
        "broken = fh_schema_plugin:Missing\n\n[firehose.sources]\ntail = fh_schema_plugin:TailSourceConfig\n")
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}

    res = firehose("config-schema", env=env)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    stream = printed["$defs"]["StreamConfig"]["properties"]
    assert "copy" in stream["destination"]["discriminator"]["mapping"]
    assert "tail" in stream["sources"]["items"]["discriminator"]["mapping"]  # its `type: str` made the name
    assert "broken" not in stream["destination"]["discriminator"]["mapping"]
    assert "note: firehose.destinations 'broken' left out:" in res.stderr
    doc = {"streams": [{"name": "a", "destination": {"type": "copy", "path": "out"},
                        "sources": [{"type": "tail", "paths": ["x.log"]}]}]}
    assert problems(jsonschema.validators.validator_for(printed)(printed), doc) == []

    res = firehose("config-schema", "--builtin-only", env=env)
    assert (res.returncode, res.stdout, res.stderr) == (0, schema_text(config_schema()), "")
    res = firehose("config-schema", "--markdown", env=env)
    assert (res.returncode, res.stdout) == (0, (ROOT / REFERENCE_PATH).read_text(encoding="utf-8"))


def test_help_says_what_it_prints_and_how_to_point_an_editor_at_it() -> None:
    res = firehose("config-schema", "--help")
    assert res.returncode == 0
    assert "Prints" in res.stdout and "# yaml-language-server: $schema=" in res.stdout
    assert "--markdown" in res.stdout and "docs/config-reference.md" in res.stdout
