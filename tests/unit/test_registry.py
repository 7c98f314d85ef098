"""Plugins through entry points: destinations, sources and processors that implement the config
contract load (a plugin processor runs in its place in Firehose's order); one that lacks the
contract, or does not load, is one config error naming its package."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from firehose.config import ConfigError, load_config_text
from firehose.registry import PluginError, destination_config_class, processor_config_class
from support import PLUGIN_SOURCE


def install_plugin(root: Path, module_code: str, entry_points: dict[str, dict[str, str]]) -> tuple[str, str]:
    """A throwaway distribution in ``root``: a module and a ``.dist-info`` whose
    ``entry_points.txt`` importlib.metadata finds once ``root`` is on sys.path. Entry point
    values use the placeholder ``MOD`` for the module's (unique) name. Returns (dist, module)."""
    module = f"fh_plugin_{uuid.uuid4().hex[:8]}"
    dist = f"fh-test-plugins-{module[-8:]}"
    (root / f"{module}.py").write_text(module_code)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    text = ""
    for group, eps in entry_points.items():
        text += f"[{group}]\n" + "".join(f"{k} = {v.replace('MOD', module)}\n" for k, v in eps.items()) + "\n"
    (info / "entry_points.txt").write_text(text)
    return dist, module


PLUGIN_CODE = PLUGIN_SOURCE + '''

class NoStep(BaseModel):
    type: Literal["nostep"]

    def describe(self):
        return {}


class NoBuild(BaseModel):
    type: Literal["nobuild"]

    def buffering_limits(self):
        return None


class NotAModel:
    pass
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    dist, module = install_plugin(tmp_path, PLUGIN_CODE, {
        "firehose.destinations": {"copy": "MOD:CopyDestinationConfig", "nobuild": "MOD:NoBuild",
                                  "plain": "MOD:NotAModel", "broken": "fh_no_such_module_xyz:Config"},
        "firehose.sources": {"tail": "MOD:TailSourceConfig"},
        "firehose.processors": {"upper": "MOD:UpperConfig", "nostep": "MOD:NoStep"},
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return dist, module


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    return info.value.errors


def test_a_plugin_processor_runs_after_the_built_in_transforms_and_before_the_lambda(
        plugin: tuple[str, str]) -> None:
    """Listed first, the plugin still runs in its place: it sees the decompressed record, and the
    partition-key query (after the Lambda's place) sees its output."""
    import asyncio
    import gzip

    from firehose.records import SourceRecord
    from firehose.registry import PROCESSING_CHAIN, load

    text = """streams:
  - name: a
    processing:
      - {type: upper}
      - {type: metadata_extraction, query: '{c: .C}'}
      - {type: decompression}
    dynamic_partitioning: {enabled: true}
    destination: {type: local, path: o, prefix: "!{partitionKeyFromQuery:c}/", error_output_prefix: e/}
"""
    stream = load_config_text(text, "f.yaml", {}).streams[0]
    assert [p.describe()["Type"] for p in stream.processing] == ["Upper", "MetadataExtraction", "Decompression"]
    chain = load(PROCESSING_CHAIN)(stream.processing, stream_arn="arn", region="us-east-1")

    async def go() -> list[Any]:
        await chain.start()
        try:
            return await chain.process([SourceRecord("0", gzip.compress(b'{"c": "a"}'), 1, None)])
        finally:
            await chain.close()

    (out,) = asyncio.run(go())
    assert (out.result, out.data, out.query_keys) == ("Ok", b'{"C": "A"}', {"c": "A"})


def test_a_processor_plugin_without_the_contract_is_refused_naming_its_package(plugin: tuple[str, str]) -> None:
    dist, module = plugin
    text = "streams:\n  - name: a\n    processing:\n      - {type: nostep}\n    destination: {type: local, path: o}\n"
    assert errors_of(text) == [
        f"f.yaml:4: streams[0].processing[0].type: processor type 'nostep' from the plugin package {dist!r} "
        f"(entry point firehose.processors: nostep = {module}:NoStep) lacks build() of the processor config contract"
    ]
    with pytest.raises(PluginError):
        processor_config_class("nostep")


def test_destination_and_source_plugins_that_implement_the_contract_load(plugin: tuple[str, str]) -> None:
    _, module = plugin
    text = ("streams:\n  - name: a\n    sources: [{type: tail, paths: [/var/log/x.log]}]\n"
            "    destination: {type: copy, path: out}\n")
    stream = load_config_text(text, "f.yaml", {}).streams[0]
    assert type(stream.destination).__module__ == module and stream.destination.type == "copy"
    assert type(stream.sources[0]).__name__ == "TailSourceConfig"
    assert stream.buffering.size_mib == 5  # the plugin's limits apply


def test_a_destination_plugin_without_the_contract_is_refused(plugin: tuple[str, str]) -> None:
    dist, module = plugin
    (err,) = errors_of("streams:\n  - name: a\n    destination: {type: nobuild}\n")
    assert err == (f"f.yaml:3: streams[0].destination.type: destination type 'nobuild' from the plugin package "
                   f"{dist!r} (entry point firehose.destinations: nobuild = {module}:NoBuild) lacks build(), "
                   "describe(), requires_backup of the destination config contract")
    (err,) = errors_of("streams:\n  - name: a\n    destination: {type: plain}\n")
    assert err == (f"f.yaml:3: streams[0].destination.type: destination type 'plain' from the plugin package "
                   f"{dist!r} (entry point firehose.destinations: plain = {module}:NotAModel) is not a pydantic "
                   "model class")


def test_a_plugin_that_does_not_import_is_one_config_error(plugin: tuple[str, str]) -> None:
    (err,) = errors_of("streams:\n  - name: a\n    destination: {type: broken}\n")
    assert err.startswith("f.yaml:3: streams[0].destination.type: destination type 'broken' from the plugin package")
    assert err.endswith("does not load: ModuleNotFoundError: No module named 'fh_no_such_module_xyz'")


def test_unknown_types_list_the_plugin_types_too(plugin: tuple[str, str]) -> None:
    (err,) = errors_of("streams:\n  - name: a\n    destination: {type: cpy}\n")
    assert "unknown type 'cpy'; known: broken, copy, http_endpoint, iceberg, local, nobuild, opensearch, plain" in err
    assert destination_config_class("copy").__name__ == "CopyDestinationConfig"
