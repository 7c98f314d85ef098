"""Sources other than the Firehose API: where a stream's records come from.

Each source has a config class (validated from ``streams[].sources[]``, keyed by ``type:`` in
:data:`firehose.registry.BUILTIN_SOURCES`) whose ``build()`` makes a :class:`firehose.interfaces.Source`.
"""
