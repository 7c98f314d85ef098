"""Credentials in endpoint URLs never reach a description."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from firehose.destinations.opensearch import OpenSearchDestinationConfig
from firehose.redact import url_without_credentials


@pytest.mark.parametrize(("url", "shown"), [
    ("https://admin:s3cret@search.example:9200/x?y=1", "https://search.example:9200/x?y=1"),
    ("http://user@[::1]:8088", "http://[::1]:8088"),
    ("https://search.example", "https://search.example"),
])
def test_userinfo_is_removed(url: str, shown: str) -> None:
    assert url_without_credentials(url) == shown


def test_describe_of_an_opensearch_stream_hides_the_password_in_the_endpoint() -> None:
    cfg = OpenSearchDestinationConfig.model_validate(
        {"type": "opensearch", "endpoint": "https://admin:hunter2-secret@search.example:9200", "index": "logs"})
    desc = str(cfg.describe(SimpleNamespace(size_mib=5, interval_secs=60), "123456789012"))
    assert "hunter2-secret" not in desc and "admin" not in desc
    assert "https://search.example:9200" in desc
