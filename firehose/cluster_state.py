"""Cluster mode's shared facts in JetStream key-value buckets: the sources' facts (``FH_SOURCES``)
and every stream's state (``FH_STREAMS``: VersionId, times, tags), read and written by every
daemon of the cluster with revision-checked writes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

__all__ = ["SOURCE_FACTS", "STREAM_STATE", "JetStreamFacts", "SharedStreamState", "bucket_keys"]


async def bucket_keys(js: Any, bucket: str) -> list[str]:
    """The keys of a key-value bucket, from one stream-info request (the server's own list of the
    bucket stream's subjects). nats-py's ``kv.keys()`` walks a watcher instead, and can miss a
    key that is being rewritten meanwhile. A deleted key may still be listed (its tombstone):
    reading it raises ``KeyNotFoundError``."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject.removeprefix(prefix) for subject in (info.state.subjects or {}))

STREAM_STATE = "FH_STREAMS"
SOURCE_FACTS = "FH_SOURCES"


class JetStreamFacts:
    """The sources' shared facts (:class:`firehose.interfaces.SharedFacts`) in the key-value
    bucket ``FH_SOURCES``: a Kinesis shard read to its end, a firehose_http request id stored.
    A value may carry its own TTL (JetStream per-message TTL, server 2.11+)."""

    def __init__(self, js: Any, kv: Any) -> None:
        self.js = js
        self.kv = kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or b"", int(entry.revision)

    async def create(self, key: str, value: bytes, *, ttl_secs: float | None = None) -> int | None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return int(await self.kv.create(key, value, msg_ttl=ttl_secs))
        except KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int, *, ttl_secs: float | None = None) -> int | None:
        from nats.js.errors import APIError

        # kv.update takes no TTL: the same revision-checked write, made as the bucket's publish.
        try:
            ack = await self.js.publish(f"$KV.{SOURCE_FACTS}.{key}", value, msg_ttl=ttl_secs,
                                        headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})
        except APIError as exc:
            if exc.err_code in (10071, 10164):  # the key moved on
                return None
            raise
        return int(ack.seq)

    async def put(self, key: str, value: bytes) -> None:
        await self.kv.put(key, value)


class SharedStreamState:
    """Cluster mode's stream state (VersionId, creation and update times, tags) in the JetStream
    key-value bucket ``FH_STREAMS``, one JSON document per stream, shared by every daemon. Reads
    answer from a copy refreshed every lease round; writes are revision-checked and retried on a
    conflict, so two daemons tagging at once lose nothing. The same methods as the local
    ``StreamState`` the API calls."""

    def __init__(self, kv: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.kv = kv
        self.loop = loop
        self._docs: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _key(name: str) -> str:
        from firehose.jslog import jetstream_names

        return jetstream_names(name, 0, "state")[1].removeprefix("fh.").removesuffix(".p0.state")

    async def _read(self, name: str) -> tuple[dict[str, Any] | None, int]:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(self._key(name))
        except KeyNotFoundError:
            return None, 0
        return orjson.loads(entry.value or b"{}"), int(entry.revision)

    async def _change(self, name: str, change: Any) -> dict[str, Any]:
        """Apply ``change(doc | None) -> doc`` with a revision check, again on a conflict."""
        from nats.js.errors import KeyWrongLastSequenceError

        while True:
            doc, revision = await self._read(name)
            new = change(doc)
            if new is doc:
                break
            try:
                if revision:
                    await self.kv.update(self._key(name), orjson.dumps(new), last=revision)
                else:
                    await self.kv.create(self._key(name), orjson.dumps(new))
            except KeyWrongLastSequenceError:
                continue  # another daemon wrote it meanwhile: read again
            doc = new
            break
        if doc is None:  # none, and the change made none
            self._docs.pop(name, None)
            return {}
        self._docs[name] = doc
        return doc

    async def sync_version(self, stream: Any) -> int:
        """The stream's VersionId, shared: 1 at first sight, +1 whenever its config changes."""
        fp = stream.fingerprint()
        now = time.time()

        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                return {"version": 1, "fingerprint": fp, "created": now, "updated": now, "tags": {}}
            if doc.get("fingerprint") != fp:
                return {**doc, "version": int(doc["version"]) + 1, "fingerprint": fp, "updated": now}
            return doc

        return int((await self._change(stream.name, change))["version"])

    async def read(self, name: str) -> dict[str, Any] | None:
        """The stream's state as JetStream holds it now (not the copy of the last round)."""
        return (await self._read(name))[0]

    async def amend(self, name: str, change: Any) -> dict[str, Any]:
        """``change(doc) -> doc`` on the stream's state (created at version 1 if it has none)."""
        now = time.time()
        return await self._change(name, lambda doc: change(doc or {"version": 1, "created": now, "updated": now,
                                                                   "tags": {}}))

    async def ensure(self, name: str, version: int, fingerprint: str, initial: dict[str, Any]) -> None:
        """An API stream's state as its entry says (firehose/control_cluster.py): created with
        ``initial`` (tags, encryption) if it has none, else given the entry's VersionId and config
        fingerprint, leaving what TagDeliveryStream and the encryption calls changed since."""
        now = time.time()

        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                return {"version": version, "fingerprint": fingerprint, "created": now, "updated": now, "tags": {},
                        **initial}
            if int(doc.get("version", 0)) == version and doc.get("fingerprint") == fingerprint:
                return doc
            return {**doc, "version": version, "fingerprint": fingerprint, "updated": now}

        await self._change(name, change)

    async def forget(self, name: str) -> None:
        """Remove the stream's state (its stream was deleted through the API)."""
        from nats.js.errors import KeyNotFoundError

        try:
            await self.kv.delete(self._key(name))
        except KeyNotFoundError:
            pass
        self._docs.pop(name, None)

    async def refresh(self, names: list[str]) -> None:
        for name in names:
            doc, _ = await self._read(name)
            if doc is not None:
                self._docs[name] = doc

    # The local StreamState's interface, as the API and the daemon call it.
    def load(self, name: str) -> dict[str, Any] | None:
        return self._docs.get(name)

    def version_for(self, stream: Any) -> int:
        doc = self._docs.get(stream.name)
        return int(doc["version"]) if doc is not None else 1

    def tags(self, name: str) -> dict[str, str]:
        return dict((self._docs.get(name) or {}).get("tags", {}))

    def update_tags(self, name: str, change: Any) -> None:
        """From a worker thread (as the API calls it): one revision-checked write on the loop."""

        def apply(doc: dict[str, Any] | None) -> dict[str, Any]:
            base = doc or {"version": 1, "created": time.time(), "updated": time.time(), "tags": {}}
            return {**base, "tags": change(dict(base.get("tags", {})))}

        asyncio.run_coroutine_threadsafe(self._change(name, apply), self.loop).result(timeout=30)
