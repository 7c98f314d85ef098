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
        "f.yaml:7: streams[0].sources[0].type: file sources stay per host: run a single-node daemon on each "
        "host that tails the files and delivers with an http_endpoint destination into a firehose_http source of "
        "this cluster (docs/cluster.md)",
        "f.yaml:6: streams[0].spool: means nothing in cluster mode: the stream's log is in JetStream (each "
        "partition's log holds up to 1 GiB); remove it",
    ]


def test_kinesis_and_firehose_http_sources_run_in_cluster_mode() -> None:
    text = """cluster:
  node: n1
  jetstream: {servers: ["nats://127.0.0.1:4222"]}
streams:
  - name: from-kds
    sources: [{type: kinesis, stream_name: orders}]
    destination: {type: local, path: out}
  - name: from-http
    sources: [{type: firehose_http, listen: "127.0.0.1:8443"}]
    destination: {type: local, path: out2}
"""
    cfg = load_config_text(text, "f.yaml", {})
    placements = [type(s).cluster_placement for st in cfg.streams for s in st.sources]  # type: ignore[attr-defined]
    assert placements == ["partition", "node"]
