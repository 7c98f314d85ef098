"""Local directory destination: the embedded default. Same key layout as S3, under ``path``.

Guarantee: exactly-once files. An object is written to a temporary name, fsynced and renamed to
its sealed key, so a replay after a crash replaces the file instead of adding a second one, and a
reader never sees a partial file.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from pydantic import Field, field_validator

from firehose.destinations.objectstore import ObjectStoreConfig, ObjectStoreDestination
from firehose.interfaces import BuildContext


class LocalDestinationConfig(ObjectStoreConfig):
    """A local directory: each batch is one file, at the key S3 would get (prefix and name), written
    to a temporary name, fsynced and renamed."""

    KEYS_ARE_PATHS = True

    type: Literal["local"] = Field(description="`local`.")
    path: str = Field(
        description="The directory objects are written under (created if missing); relative paths are from "
        "the working directory.",
    )

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

    async def preflight(self) -> str | None:
        """The directory is writable (a probe file is created and removed), or, while it does not
        exist yet, could be created (its nearest existing parent is a writable directory)."""
        return await asyncio.to_thread(self._check_writable)

    def _check_writable(self) -> str | None:
        root = self.root
        if not os.path.exists(root):
            parent = os.path.dirname(root)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                return f"path '{root}' cannot be created: '{parent}' is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"path '{root}' cannot be created: no write permission on '{parent}'"
            return None
        if not os.path.isdir(root):
            return f"path '{root}' is not a directory"
        probe = os.path.join(root, f".firehose-preflight.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            return f"path '{root}' is not writable: {exc.strerror or exc}"
        return None

    def _classify(self, exc: Exception) -> tuple[str, str]:
        if isinstance(exc, OSError):
            return "Local.WriteFailed", f"{exc.strerror}: {exc.filename}"
        return "Local.EncodeFailed", f"{type(exc).__name__}: {exc}"

    def _store(self, key: str, data: bytes) -> None:
        """Write ``data`` as ``root/key`` without a check-then-use race: the directories are
        walked from the root by descriptor (``dir_fd``), each opened with ``O_NOFOLLOW``, so a
        symlink planted inside the root is never followed, and a key can name nothing outside the
        root (empty segments are skipped; ``.`` and ``..`` segments are refused)."""
        *dirs, name = key.split("/")
        if not name or any(seg in (".", "..") for seg in dirs) or name in (".", "..") or "\x00" in key:
            raise UnsafeKeyError(f"object key {key[:200]!r} does not name a file under the destination path")
        os.makedirs(self.root, exist_ok=True)  # the root itself is the operator's (it may be a link)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for seg in dirs:
                if not seg:
                    continue
                try:
                    os.mkdir(seg, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(seg, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
            # Unique per write: after a reload an old write may still be finishing the same key.
            tmp = f"{name[:200]}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(wfd, view) :]
                os.fsync(wfd)
            finally:
                os.close(wfd)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
        finally:
            os.close(fd)


class UnsafeKeyError(ValueError):
    """An object key that would not name a file under the destination's path."""
