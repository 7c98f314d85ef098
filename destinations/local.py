"""Local directory destination: the embedded default. Same key layout as S3, under ``path``.

Guarantee: exactly-once files. An object is written to a temporary name, fsynced and renamed to
its sealed key, so a replay after a crash replaces the file instead of adding a second one, and a
reader never sees a partial file.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import field_validator

from firehose.destinations.objectstore import ObjectStoreConfig, ObjectStoreDestination
from firehose.interfaces import BuildContext


class LocalDestinationConfig(ObjectStoreConfig):
    type: Literal["local"]
    path: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v:
            raise ValueError("must be a directory path")
        return v

    def describe(self, buffering: Any, account_id: str) -> dict[str, Any]:
        return self.describe_destination("arn:aws:s3:::local", buffering, account_id)

    def build(self, ctx: BuildContext) -> LocalDestination:
        return LocalDestination(self, ctx)


class LocalDestination(ObjectStoreDestination):
    def __init__(self, config: LocalDestinationConfig, ctx: BuildContext) -> None:
        super().__init__(config, ctx)
        self.root = os.path.abspath(config.path)

    def _classify(self, exc: Exception) -> tuple[str, str]:
        if isinstance(exc, OSError):
            return "Local.WriteFailed", f"{exc.strerror}: {exc.filename}"
        return "Local.EncodeFailed", f"{type(exc).__name__}: {exc}"

    def _store(self, key: str, data: bytes) -> None:
        target = os.path.join(self.root, key)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        # Unique per write: after a reload an old write may still be finishing the same key.
        tmp = f"{target}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
