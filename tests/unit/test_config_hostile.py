"""Config files as an attacker or a clumsy editor writes them: alias bombs, recursive aliases,
secrets given as numbers. Each is one clear error, fast, and no secret is echoed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from firehose.config import ConfigError, load_config_text

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def test_an_alias_bomb_is_refused_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config_text(BOMB, "bomb.yaml", env={})
    assert time.monotonic() - started < 2
    assert "aliases expand this document past 100000 nodes" in str(info.value)


def test_ordinary_aliases_still_work() -> None:
    text = """\
defaults: &dest {type: local, path: /tmp/out}
"""
    with pytest.raises(ConfigError) as info:  # 'defaults' is not a field, but the alias resolves
        load_config_text(text + "streams:\n  - {name: s, destination: *dest}\n", "a.yaml", env={})
    assert [e for e in info.value.errors if "defaults" in e] and len(info.value.errors) == 1


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n"])
def test_a_recursive_alias_is_one_line_through_the_cli(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rec.yaml"
    path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "firehose", "validate", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"{path}:1: an alias refers to the node that contains it"


def test_secrets_given_as_numbers_are_not_echoed() -> None:
    text = """\
api:
  auth: {mode: sigv4, credentials: {AKIDEXAMPLE: 987654321012345}}
streams:
  - name: s
    destination:
      type: redshift
      connection: {host: h, database: d, user: u, password: 98765432101}
      table: t
      staging: {type: s3, bucket: my-bucket, secret_access_key: 12345678901234}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "s.yaml", env={})
    message = str(info.value)
    for secret in ("987654321012345", "98765432101", "12345678901234"):
        assert secret not in message
    for field in ("api.auth.credentials.AKIDEXAMPLE:", "destination.connection.password:",
                  "destination.staging.secret_access_key:"):
        assert field in message, message  # each reported, none with its value
