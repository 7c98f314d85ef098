"""The one table that maps a config ``type:`` string to the class that implements it.

Built-ins are named here as import strings and imported lazily, so the core never imports a
plugin it does not use and a missing optional dependency fails only for the stream that needs
it. Third-party plugins register through the ``firehose.destinations``, ``firehose.processors``
and ``firehose.sources`` entry-point groups.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

BUILTIN_DESTINATIONS: dict[str, str] = {
    "s3": "firehose.destinations.s3:S3DestinationConfig",
    "local": "firehose.destinations.local:LocalDestinationConfig",
    "redshift": "firehose.destinations.redshift:RedshiftDestinationConfig",
    "http_endpoint": "firehose.destinations.http_endpoint:HttpEndpointDestinationConfig",
    "opensearch": "firehose.destinations.opensearch:OpenSearchDestinationConfig",
    "splunk": "firehose.destinations.splunk:SplunkDestinationConfig",
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
FORMAT_CONFIG = "firehose.transforms.formats:FormatConfig"
CONVERTER = "firehose.transforms.formats:Converter"


def load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _config_class(type_name: str, builtins: dict[str, str], group: str) -> type:
    if type_name in builtins:
        return load(builtins[type_name])  # type: ignore[no-any-return]
    plugins = _plugins(group)
    if type_name in plugins:
        return plugins[type_name].load()  # type: ignore[no-any-return]
    known = ", ".join(sorted(set(builtins) | set(plugins)))
    raise UnknownTypeError(f"unknown type {type_name!r}; known: {known}")


def processor_config_class(type_name: str) -> type:
    return _config_class(type_name, BUILTIN_PROCESSORS, "firehose.processors")


def source_config_class(type_name: str) -> type:
    """The config class for a source ``type:``; ``UnknownTypeError`` names the known ones."""
    return _config_class(type_name, BUILTIN_SOURCES, "firehose.sources")


class UnknownTypeError(ValueError):
    pass


def _plugins(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def known_destination_types() -> list[str]:
    return sorted(set(BUILTIN_DESTINATIONS) | set(_plugins("firehose.destinations")))


def destination_config_class(type_name: str) -> type:
    """The config class for a destination ``type:``; ``UnknownTypeError`` names the known ones."""
    return _config_class(type_name, BUILTIN_DESTINATIONS, "firehose.destinations")
