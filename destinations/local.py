"""Local directory destination: the embedded default. Same key layout as S3, under ``path``.

Guarantee: exactly-once files. An object is written to a temporary name, fsynced and renamed to
its sealed key, so a replay after a crash replaces the file instead of adding a second one, and a
reader never sees a partial file.
"""

from __future__ import annotations

import asyncio
import os
import random
from datetime import datetime
from typing import Any, Literal

from pydantic import field_validator

from destinations.objectstore import ObjectStoreConfig
from firehose.interfaces import Batch, BuildContext, DeliveryResult, Destination


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


class LocalDestination(Destination):
    def __init__(self, config: LocalDestinationConfig, ctx: BuildContext) -> None:
        self.config = config
        self.ctx = ctx
        self.root = os.path.abspath(config.path)
        self._encoded: dict[str, bytes] = {}
        self.converter: Any = None

    def set_converter(self, converter: Any) -> None:
        """Write batches as columnar files (record format conversion) instead of concatenated records."""
        self.converter = converter

    def batch_key(self, oldest_arrival: datetime, rng: random.Random) -> str:
        ext = self.converter.extension if self.converter is not None else None
        return self.config.object_key(self.ctx.stream_name, self.ctx.version, oldest_arrival, rng, ext)

    def _encode(self, batch: Batch) -> bytes:
        if self.converter is not None and not batch.archive:
            return bytes(self.converter.convert(batch.records))
        return self.config.encode(batch.key, batch.records, batch.delimiter)

    def archive_key(self, oldest_arrival: datetime, rng: random.Random, error_output_type: str) -> str:
        """The key of an archive object of failed records (Firehose's error-output layout)."""
        return self.config.archive_key(self.ctx.stream_name, self.ctx.version, oldest_arrival, rng, error_output_type)

    async def deliver(self, batch: Batch) -> DeliveryResult:
        data = self._encoded.pop(batch.key, None)  # kept from a failed attempt: no re-compression
        try:
            if data is None:
                data = await asyncio.to_thread(self._encode, batch)
            await asyncio.to_thread(self._write, batch.key, data)
        except OSError as exc:
            if data is not None:
                self._encoded[batch.key] = data
            return DeliveryResult.all_failed(
                len(batch.records), retryable=True, code="Local.WriteFailed", message=f"{exc.strerror}: {exc.filename}"
            )
        return DeliveryResult.delivered()

    def _write(self, key: str, data: bytes) -> None:
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
