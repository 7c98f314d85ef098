"""Plugins through entry points: destinations and sources that implement the config contract
load; processors, which the processing chain cannot run, are refused at config load instead of
validating and then being skipped; a plugin that does not load is one config error."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from firehose.config import ConfigError, load_config_text
from firehose.registry import PluginError, destination_config_class, processor_config_class


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


PLUGIN_CODE = '''
from typing import Literal

from pydantic import BaseModel

from firehose.destinations.local import LocalDestinationConfig
from firehose.sources.file import FileSourceConfig
from firehose.transforms.config import AppendDelimiterConfig


class CopyDestinationConfig(LocalDestinationConfig):
    type: Literal["copy"]


class TailSourceConfig(FileSourceConfig):
    type: Literal["tail"]


class UpperConfig(AppendDelimiterConfig):
    type: Literal["upper"]


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
        "firehose.processors": {"upper": "MOD:UpperConfig"},
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return dist, module


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    return info.value.errors


def test_a_plugin_processor_is_refused_at_load_naming_its_package(plugin: tuple[str, str]) -> None:
    dist, module = plugin
    text = "streams:\n  - name: a\n    processing:\n      - {type: upper}\n    destination: {type: local, path: o}\n"
    assert errors_of(text) == [
        f"f.yaml:4: streams[0].processing[0].type: processor type 'upper' comes from the plugin package "
        f"{dist!r} (entry point firehose.processors: upper = {module}:UpperConfig); third-party processors "
        "are not supported yet"
    ]
    with pytest.raises(PluginError):
        processor_config_class("upper")


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
                   "describe() of the destination config contract")
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
    assert "unknown type 'cpy'; known: broken, copy, http_endpoint, local, nobuild, opensearch, plain" in err
    assert destination_config_class("copy").__name__ == "CopyDestinationConfig"
