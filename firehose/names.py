"""Names the daemon derives from a stream's name for files and directories on disk."""

from __future__ import annotations


def disk_name(stream: str) -> str:
    """A stream's name as one directory entry. Stream names are ``[a-zA-Z0-9_.-]{1,64}``, so
    only ``.`` and ``..`` (valid Firehose stream names) could mean something else on disk: they
    become ``%2E`` and ``%2E%2E``, keeping every stream's spool and state in its own entry."""
    if stream in (".", ".."):
        return "%2E" * len(stream)
    return stream
