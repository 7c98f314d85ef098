"""Delivery-stream names: the rule they follow, the ARN Firehose gives them, and the names the
daemon derives from them for files and directories on disk."""

from __future__ import annotations

import re

#: Firehose's delivery stream name rule.
STREAM_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


def stream_arn(region: str, account_id: str, name: str) -> str:
    """The ARN Firehose gives a delivery stream: ``arn:aws:firehose:<region>:<account>:deliverystream/<name>``."""
    return f"arn:aws:firehose:{region}:{account_id}:deliverystream/{name}"


def disk_name(stream: str) -> str:
    """A stream's name as one directory entry. Stream names are ``[a-zA-Z0-9_.-]{1,64}``, so
    only ``.`` and ``..`` (valid Firehose stream names) could mean something else on disk: they
    become ``%2E`` and ``%2E%2E``, keeping every stream's spool and state in its own entry."""
    if stream in (".", ".."):
        return "%2E" * len(stream)
    return stream
