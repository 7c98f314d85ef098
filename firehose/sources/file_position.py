"""What a file source knows of a file it follows: its identity (device, inode, and a fingerprint of
its first bytes, so a reused inode is a new file) and its position, kept in the spool under
``file/<device>:<inode>`` (see ``firehose.sources.file``)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

FINGERPRINT_BYTES = 1024


@dataclass
class FollowedFile:
    """One file being read: its identity, handle and the position committed in the spool."""

    dev: int
    ino: int
    path: str
    fp: str  # hex digest of the first fp_len bytes
    fp_len: int
    offset: int  # after the last record in the spool
    fd: int = -1
    skip_line: bool = False  # inside a cut line: skip to its newline
    header_left: int = 0
    matched: bool = True  # found at a matching path on the last scan
    # A new file with the same first bytes as a file being read may be copytruncate's copy of it:
    # it waits (until ``held_until``) for that file's truncation, then continues at its position.
    held_by: tuple[int, int] | None = None
    held_since: float = 0.0
    held_until: float = 0.0
    skip_record: bool = False  # inside a multi-line record cut at max_record_bytes: skip to the next start
    stall: tuple[int, bool, bool] | None = None  # (size, eof, final) of the last read that found nothing
    seen_size: int = -1
    last_growth: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return f"file/{self.dev}:{self.ino}"

    def restore(self, saved: dict[str, Any]) -> None:
        """Take up a position read back from the spool (what ``position`` wrote)."""
        self.offset = int(saved["offset"])
        self.fp, self.fp_len = str(saved["fp"]), int(saved["fp_len"])
        self.skip_line = bool(saved.get("skip_line"))
        self.skip_record = bool(saved.get("skip_record"))
        self.header_left = int(saved.get("header_left", 0))

    def position(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "fp": self.fp, "fp_len": self.fp_len, "offset": self.offset}
        if self.skip_line:
            doc["skip_line"] = True
        if self.skip_record:
            doc["skip_record"] = True
        if self.header_left:
            doc["header_left"] = self.header_left
        return doc


def fingerprint(fd: int, length: int) -> tuple[str, int]:
    """The SHA-1 (hex) of the file's first ``length`` bytes, and how many there are (fewer in a short file)."""
    data = os.pread(fd, length, 0)
    return hashlib.sha1(data).hexdigest(), len(data)


def starts_with(fd: int, fp: str, fp_len: int) -> bool:
    """Whether the file's first ``fp_len`` bytes have the fingerprint ``fp``."""
    return fingerprint(fd, fp_len)[0] == fp
