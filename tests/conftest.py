from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The tests import the installed firehose (scripts/test.sh installs the built wheel), never the
# source tree: the repository root must not be on sys.path, here or in any interpreter a test
# starts (PYTHONSAFEPATH keeps `python -m ...` from adding its working directory). The helpers in
# tests/ (support, fakes, handlers, ...) are importable by their own names.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(TESTS))
os.environ["PYTHONSAFEPATH"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])

from support import MotoServer, NatsServer, unavailable  # noqa: E402


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server with JetStream for the session (fsync on every write)."""
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
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
        unavailable(reason)
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
        unavailable(reason)
    server = Kinesalite()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "memory"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """Makes a stream log by name, not yet opened: the file spool (FileLog) or the in-memory log
    (MemoryLog), so a stage's tests run on both sides of the Log seam. Asking again for a name
    gives a new writer on the same log: a restart."""
    from firehose.filelog import FileLog
    from firehose.memlog import MemoryLog, MemoryLogStore

    stores: dict[str, MemoryLogStore] = {}

    def make(name: str = "spool", **kwargs: object) -> object:
        if request.param == "file":
            return FileLog(str(tmp_path / name), **kwargs)  # type: ignore[arg-type]
        size = kwargs.get("max_size_bytes", 1 << 30)
        return MemoryLog(stores.setdefault(name, MemoryLogStore(name)), max_size_bytes=size)  # type: ignore[arg-type]

    return make
