"""The `cluster:` block: what it takes, and what a stream may not hold in cluster mode, each
problem as `file:line: field: message` in one run."""

from __future__ import annotations

import re

import pytest

from firehose.cluster import node_name
from firehose.config import ConfigError, load_config_text

GOOD = """cluster:
  node: n1
  jetstream: {servers: ["nats://127.0.0.1:4222"], replicas: 3, partitions: 16}
streams:
  - name: a
    destination: {type: local, path: out}
"""


def test_a_cluster_block_is_read_with_its_defaults() -> None:
    cfg = load_config_text(GOOD, "f.yaml", {})
    assert cfg.cluster is not None
    assert (cfg.cluster.node, cfg.cluster.jetstream.replicas, cfg.cluster.jetstream.partitions) == ("n1", 3, 16)
    assert cfg.cluster.lease_ttl_secs == 10 and cfg.cluster.jetstream.credentials is None
    unnamed = load_config_text(GOOD.replace("  node: n1\n", ""), "f.yaml", {}).cluster
    assert unnamed is not None and unnamed.node is None
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", node_name(unnamed))  # the host name, made a valid name


def test_every_problem_of_a_cluster_config_is_reported_with_its_line() -> None:
    text = """cluster:
  node: "bad name"
  jetstream: {servers: ["http://x:4222"], replicas: 7}
streams:
  - name: a
    spool: {fsync: always}
    sources: [{type: file, paths: [/var/log/x.log]}]
    destination: {type: local, path: out}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    assert info.value.errors == [
        "f.yaml:2: cluster.node: string should match pattern '^[A-Za-z0-9_-]{1,64}$', got 'bad name'",
        "f.yaml:3: cluster.jetstream.servers: must be nats:// or tls:// URLs, got 'http://x:4222'",
        "f.yaml:3: cluster.jetstream.replicas: input should be less than or equal to 5, got 7",
        "f.yaml:7: streams[0].sources: sources are not supported in cluster mode yet: its streams are DirectPut "
        "(records come through the API of any daemon)",
        "f.yaml:6: streams[0].spool: means nothing in cluster mode: the stream's log is in JetStream (each "
        "partition's log holds up to 1 GiB); remove it",
    ]
