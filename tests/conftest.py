from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import MotoServer  # noqa: E402


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    client = moto.client()
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return name


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL 15 server for the session (tests/pgserver.py); skipped without binaries."""
    from pgserver import PostgresServer, available

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def kinesalite() -> Iterator[object]:
    """A kinesalite server (Kinesis Data Streams) for the session; skipped without node."""
    from kinesalite import Kinesalite, available

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    server = Kinesalite()
    server.start()
    yield server
    server.stop()
