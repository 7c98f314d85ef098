"""Request ids deduplicated across a cluster: a ``firehose_http`` source's request ids, and the
batch ids of ``firehose redrive``. On one node each is kept among the positions of the frame its
records are in; in cluster mode a retry may reach any daemon, so each id is also a fact in the
shared ``FH_SOURCES`` bucket (keyed by a digest of the stream, the kind and the id):

1. the id is *claimed* (created only if absent, with a TTL of a few lease TTLs);
2. its records go into a partition this daemon owns, with ``<prefix><id>`` among the positions
   of the same frame, as on one node;
3. the claim becomes *stored* (kept for ``REMEMBER_SECS``).

A retry that finds the id stored is answered as a success without its records; one that finds it
claimed (the first attempt still running) is answered "send it again". If the daemon dies
between 2 and 3, the partition's next owner finds the id among the log's positions when it opens
it and marks it stored (:meth:`ClusterIds.tend_partition`); that happens within the lease TTL,
well before the claim's TTL lets a retry in. The positions are forgotten again after
``POSITION_SECS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

__all__ = ["CLAIMED", "POSITION_SECS", "REMEMBER_SECS", "STORED", "ClusterIds", "id_fact"]

#: How long a stored id is remembered (Firehose retries an HTTP endpoint for at most 7,200 s).
REMEMBER_SECS = 24 * 3600
#: How long an id stays among a partition log's positions.
POSITION_SECS = 600
STORED, CLAIMED = b"stored", b"claimed"

Outcome = Literal["stored", "duplicate", "busy"]


def id_fact(stream: str, rid: str, kind: str = "http") -> str:
    """The shared fact's key of an id (a digest: the id is the sender's)."""
    return f"{kind}." + hashlib.sha256(f"{stream}\0{rid}".encode()).hexdigest()[:40]


class ClusterIds:
    """The ids of one kind (``prefix`` among the positions, ``kind`` in the facts) of one stream."""

    def __init__(self, placement: Any, stream: str, *, prefix: str, kind: str, log: Any) -> None:
        self.placement = placement  # ClusterPlacement: .facts and .lease_ttl_secs
        self.stream, self.prefix, self.kind = stream, prefix, kind
        self.log = log
        self.duplicates = 0
        self._unmarked: dict[str, int] = {}  # stored, but the claim not yet turned "stored" (NATS away)

    def fact(self, rid: str) -> str:
        return id_fact(self.stream, rid, self.kind)

    @property
    def claim_ttl(self) -> float:
        """Seconds a claim lives: well past a takeover (the lease TTL) and a publish timeout."""
        return max(60.0, 6 * float(self.placement.lease_ttl_secs))

    async def store(self, rid: str, put: Callable[[dict[str, Any]], Awaitable[Any]]) -> Outcome:
        """Claim ``rid`` and call ``put(positions)`` to store its records: ``stored``, or
        ``duplicate`` (stored before: store nothing, answer success), or ``busy`` (an earlier
        attempt is storing it: answer "send it again"). Raises when the facts cannot be reached
        (nothing stored) or ``put`` fails (the claim is released)."""
        facts = self.placement.facts
        revision = await facts.create(self.fact(rid), CLAIMED, ttl_secs=self.claim_ttl)
        if revision is None:
            found = await facts.get(self.fact(rid))
            if found is not None and found[0] == STORED:
                self.duplicates += 1
                return "duplicate"
            return "busy"
        try:
            await put({self.prefix + rid: int(time.time() * 1000)})
        except BaseException:
            await self._release(rid, revision)
            raise
        await self.mark_stored(rid, revision)
        return "stored"

    async def _release(self, rid: str, revision: int) -> None:
        try:
            await self.placement.facts.update(self.fact(rid), b"", revision, ttl_secs=1)
        except Exception:  # noqa: BLE001 - the claim's own TTL frees it
            pass

    async def mark_stored(self, rid: str, revision: int | None) -> None:
        facts = self.placement.facts
        try:
            if revision is not None and await facts.update(self.fact(rid), STORED, revision,
                                                           ttl_secs=REMEMBER_SECS) is not None:
                self._unmarked.pop(rid, None)
                return
            found = await facts.get(self.fact(rid))
            if found is None or found[0] != STORED:
                new = await facts.create(self.fact(rid), STORED, ttl_secs=REMEMBER_SECS) if found is None \
                    else await facts.update(self.fact(rid), STORED, found[1], ttl_secs=REMEMBER_SECS)
                if new is None:
                    raise RuntimeError("the claim moved while it was being marked")
            self._unmarked.pop(rid, None)
        except Exception as exc:  # noqa: BLE001 - tried again at the next lease round
            self._unmarked[rid] = revision or 0
            self.log.warning(f"{self.kind}_id_mark_failed", request_id=rid[:64], error=str(exc)[:300])

    async def tend_partition(self, sink: Any, *, opened: bool) -> None:
        """For each partition this daemon owns: when it is taken, mark stored every id its log
        holds (an earlier owner may have died before marking them); at every round, retry the
        marks that failed and forget positions older than ``POSITION_SECS``."""
        for rid, revision in list(self._unmarked.items()):
            await self.mark_stored(rid, revision or None)
        n = len(self.prefix)
        ids = {k[n:]: v for k, v in sink.positions.items() if k.startswith(self.prefix) and v is not None}
        now = int(time.time() * 1000)
        if opened:
            # Only ids recent enough for their claim to matter (an older claim has expired), a
            # few at a time.
            recent = now - int(2000 * self.claim_ttl)
            todo = [rid for rid, when in ids.items() if isinstance(when, int) and when >= recent]
            for i in range(0, len(todo), 64):
                await asyncio.gather(*(self.mark_stored(rid, None) for rid in todo[i:i + 64]))
        cutoff = now - POSITION_SECS * 1000
        old = {self.prefix + rid: None for rid, when in ids.items() if not isinstance(when, int) or when < cutoff}
        if old:
            await sink.put([], positions=old)
