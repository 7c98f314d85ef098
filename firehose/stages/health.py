"""Whether a stream's destinations deliver, as ``/healthz`` shows it.

Owns: per destination role (``destination``, and ``backup`` when failed records go elsewhere) the
latest failed attempt and when the current run of failed attempts started. The delivery runner
and the archiver report every attempt here; the runtime's ``status()`` reads it. Also the
destinations' start-up checks (:func:`preflight`), which only log.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from firehose.interfaces import PREFLIGHT_TIMEOUT_SECS, Destination

# What /healthz may show of an error message: destinations' messages name URLs (with query
# strings) and file paths; the log keeps them whole, health shows a placeholder.
_URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_PATH_RE = re.compile(r"(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\":,;()<>]+")
MAX_HEALTH_MESSAGE = 256


def health_message(message: str) -> str:
    """An error message fit for ``/healthz``: URLs and file paths replaced, one line, bounded."""
    text = _PATH_RE.sub("<path>", _URL_RE.sub("<url>", " ".join(message.split())))
    return text if len(text) <= MAX_HEALTH_MESSAGE else text[: MAX_HEALTH_MESSAGE - 3] + "..."


def iso_utc(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds: ``2026-12-05T10:00:00.123Z``."""
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DeliveryError:
    """A failed delivery attempt as ``/healthz`` shows it (``message`` already fit for it)."""

    code: str
    message: str
    time_ms: int
    destination: str  # "destination" or "backup"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "time": iso_utc(self.time_ms),
                "destination": self.destination}


class DeliveryHealth:
    """Whether one destination of a stream delivers: its latest failed attempt, and when the
    current run of failed attempts started (None once an attempt succeeds). Updated on the event
    loop by the delivery runner after every attempt."""

    __slots__ = ("role", "last_error", "failing_since_ms")

    def __init__(self, role: str) -> None:
        self.role = role
        self.last_error: DeliveryError | None = None
        self.failing_since_ms: int | None = None

    def failed(self, code: str, message: str, now_ms: int) -> None:
        self.last_error = DeliveryError(code, health_message(message), now_ms, self.role)
        if self.failing_since_ms is None:
            self.failing_since_ms = now_ms

    def succeeded(self) -> None:
        """The destination took an attempt (the last error stays, for the record)."""
        self.failing_since_ms = None


class StreamHealth:
    """The :class:`DeliveryHealth` of each of a stream's destinations."""

    def __init__(self) -> None:
        self.main = DeliveryHealth("destination")
        self.backup: DeliveryHealth | None = None  # set when failed records go to a backup

    @property
    def archive(self) -> DeliveryHealth:
        """Where archiving reports: the backup's, else the destination's own."""
        return self.backup if self.backup is not None else self.main

    def _all(self) -> list[DeliveryHealth]:
        return [self.main] if self.backup is None else [self.main, self.backup]

    def last_error(self) -> DeliveryError | None:
        errors = [h.last_error for h in self._all() if h.last_error is not None]
        return max(errors, key=lambda e: e.time_ms) if errors else None

    def failing_since_ms(self) -> int | None:
        """When the longest current run of failed attempts started (None: none is failing)."""
        since = [h.failing_since_ms for h in self._all() if h.failing_since_ms is not None]
        return min(since) if since else None

    def failing_for_secs(self, now_ms: int) -> float | None:
        """How long (seconds) the longest current run of failed attempts has lasted (None: none)."""
        since = self.failing_since_ms()
        return None if since is None else max(0.0, (now_ms - since) / 1000.0)


async def preflight(checks: list[tuple[str, str, Destination]], log: Any) -> None:
    """Run each destination's start-up check (``role``, ``type``, destination) and log the
    outcome: ``destination_preflight_passed``, or a warning naming the reason. Never raises for
    a check: a bug or a timeout is the reason, and the stream runs on."""

    async def check(role: str, kind: str, destination: Destination) -> None:
        try:
            reason = await asyncio.wait_for(destination.preflight(), PREFLIGHT_TIMEOUT_SECS)
        except TimeoutError:
            reason = f"no answer within {PREFLIGHT_TIMEOUT_SECS:g} s"
        except Exception as exc:  # a bug in a check: say so, and keep the stream running
            reason = f"the check itself failed: {type(exc).__name__}: {exc}"
        if reason is None:
            log.info("destination_preflight_passed", destination=kind, role=role)
        else:
            log.warning("destination_preflight_failed", destination=kind, role=role, reason=reason)

    await asyncio.gather(*(check(*c) for c in checks))
