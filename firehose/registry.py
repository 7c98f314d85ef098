"""The one table that maps a config ``type:`` string to the class that implements it.

Built-ins are named here as import strings and imported lazily, so the core never imports a
plugin it does not use and a missing optional dependency fails only for the stream that needs
it. Third-party plugins register through the ``firehose.destinations``, ``firehose.sources`` and
``firehose.processors`` entry-point groups (a ``pydantic`` config class with the methods the
core calls; see ``_CONTRACTS``). A plugin is run or refused, never skipped. A plugin processor
runs after Firehose's built-in record transforms and before the Lambda (see
firehose/transforms/chain.py for the whole order).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from firehose.interfaces import DestinationConfig, ProcessorConfig, SourceConfig

BUILTIN_DESTINATIONS: dict[str, str] = {
    "s3": "firehose.destinations.s3:S3DestinationConfig",
    "local": "firehose.destinations.local:LocalDestinationConfig",
    "redshift": "firehose.destinations.redshift:RedshiftDestinationConfig",
    "http_endpoint": "firehose.destinations.http_endpoint:HttpEndpointDestinationConfig",
    "opensearch": "firehose.destinations.opensearch:OpenSearchDestinationConfig",
    "splunk": "firehose.destinations.splunk:SplunkDestinationConfig",
    "iceberg": "firehose.destinations.iceberg:IcebergDestinationConfig",
}

BUILTIN_SOURCES: dict[str, str] = {
    "kinesis": "firehose.sources.kinesis:KinesisSourceConfig",
    "file": "firehose.sources.file:FileSourceConfig",
    "firehose_http": "firehose.sources.firehose_http:FirehoseHttpSourceConfig",
}


BUILTIN_PROCESSORS: dict[str, str] = {
    "lambda": "firehose.transforms.config:LambdaProcessorConfig",
    "append_delimiter": "firehose.transforms.config:AppendDelimiterConfig",
    "record_deaggregation": "firehose.transforms.config:RecordDeaggregationConfig",
    "decompression": "firehose.transforms.config:DecompressionConfig",
    "cloudwatch_log_processing": "firehose.transforms.config:CloudWatchLogProcessingConfig",
    "metadata_extraction": "firehose.transforms.config:MetadataExtractionConfig",
}

# Stream-level plugin hooks, imported lazily like the tables above.
PROCESSING_CHECK = "firehose.transforms.config:check_processing"
BACKUP_CONFIG = "firehose.transforms.config:BackupConfig"
PROCESSING_CHAIN = "firehose.transforms.chain:ProcessingChain"
METADATA_EXTRACTION = "firehose.transforms.processors:metadata_extraction"
QUERY_KEYS = "firehose.transforms.processors:query_keys"
FORMAT_CONFIG = "firehose.transforms.formats:FormatConfig"
CONVERTER = "firehose.transforms.formats:Converter"
HANDLER_CHECK = "firehose.transforms.handler_check:check_local_handlers"
HANDLER_IMPORT_TIMEOUT = "firehose.transforms.handler_check:HANDLER_IMPORT_TIMEOUT_SECS"
HARNESS = "firehose.transforms.testing"
CODECS = "firehose.transforms.compression:get_codec"


def load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class UnknownTypeError(ValueError):
    """A ``type:`` that no built-in and no installed plugin provides; the message names the known ones."""


class PluginError(ValueError):
    """A ``type:`` provided by a third-party plugin that cannot run: its entry point does not
    load, or its class lacks the config contract."""


# What the core calls on a plugin's config class (besides pydantic's ``model_validate`` and
# ``model_dump``), per entry-point group: a class without one of them would fail mid-run.
_CONTRACTS: dict[str, tuple[str, ...]] = {
    "firehose.destinations": ("build", "buffering_limits", "describe"),
    "firehose.sources": ("build",),
    "firehose.processors": ("build", "describe"),
}
# The class attributes it declares (see firehose/interfaces.py); subclassing a built-in gives them.
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "firehose.destinations": ("requires_backup",),
    "firehose.sources": ("stream_type", "exclusive"),
}


def _config_class(type_name: str, builtins: dict[str, str], group: str) -> Any:
    if type_name in builtins:
        return load(builtins[type_name])
    plugins = _plugins(group)
    if type_name in plugins:
        return _plugin_class(type_name, plugins[type_name], group)
    known = ", ".join(sorted(set(builtins) | set(plugins)))
    raise UnknownTypeError(f"unknown type {type_name!r}; known: {known}")


def _plugin_class(type_name: str, ep: Any, group: str) -> type:
    """Load a plugin's config class, or refuse it with :class:`PluginError`."""
    kind = group.rpartition(".")[2].rstrip("s")
    origin = f"the plugin package {_dist_name(ep)!r} (entry point {group}: {ep.name} = {ep.value})"
    try:
        cls = ep.load()
    except Exception as exc:  # ImportError, AttributeError, or whatever its module raises
        raise PluginError(f"{kind} type {type_name!r} from {origin} does not load: {one_line(exc)}") from None
    from pydantic import BaseModel

    if not isinstance(cls, type) or not issubclass(cls, BaseModel):
        raise PluginError(f"{kind} type {type_name!r} from {origin} is not a pydantic model class")
    missing = [name + "()" for name in _CONTRACTS.get(group, ()) if not callable(getattr(cls, name, None))]
    missing += [name for name in _ATTRIBUTES.get(group, ()) if not hasattr(cls, name)]
    if missing:
        raise PluginError(
            f"{kind} type {type_name!r} from {origin} lacks {', '.join(missing)} of the {kind} config contract"
        )
    return cls


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return str(getattr(dist, "name", None) or "?")


def one_line(exc: BaseException) -> str:
    """An exception as one log or error line: its type and its message, whitespace folded."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def processor_config_class(type_name: str) -> type[ProcessorConfig]:
    """The config class for a processor ``type:``; ``UnknownTypeError`` names the known ones,
    ``PluginError`` says why a plugin's cannot be used."""
    return cast("type[ProcessorConfig]", _config_class(type_name, BUILTIN_PROCESSORS, "firehose.processors"))


def source_config_class(type_name: str) -> type[SourceConfig]:
    """The config class for a source ``type:``; ``UnknownTypeError`` names the known ones,
    ``PluginError`` says why a plugin's cannot be used."""
    return cast("type[SourceConfig]", _config_class(type_name, BUILTIN_SOURCES, "firehose.sources"))


def _plugins(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def destination_config_class(type_name: str) -> type[DestinationConfig]:
    """The config class for a destination ``type:``; ``UnknownTypeError`` names the known ones,
    ``PluginError`` says why a plugin's cannot be used."""
    return cast("type[DestinationConfig]", _config_class(type_name, BUILTIN_DESTINATIONS, "firehose.destinations"))
