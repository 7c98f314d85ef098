"""A :class:`firehose.log.Log` on NATS JetStream: cluster mode's replicated log.

Each log (one partition of a delivery stream, ingest or processed) is a JetStream stream of its
own, so its writes go to its own Raft leader and the leaders of many logs spread over the NATS
servers. A message's body is one or more spool frames (firehose/spool_format.py: RECORDS, SEAL,
COMMIT, CHECKPOINT), so the records' layout, the batch identities and the recovery rules are
the file spool's.

Guarantees (the :class:`Log` protocol's):

* **Durable on return.** An append, seal or commit returns once JetStream acknowledged the
  message, that is once it is stored on a quorum of the stream's replicas (and, with the
  servers' ``sync_interval: always``, fsynced there; see docs/cluster.md). Concurrent calls share
  one message (group commit): while one publish is in flight, the next calls' frames gather and
  go out together, up to the server's ``max_payload``.
* **All or nothing.** An append larger than one message (a 4 MiB PutRecordBatch against servers
  left at NATS's default 1 MB ``max_payload``) is split into several RECORDS frames in several
  messages, published as one JetStream *atomic batch* (``allow_atomic`` on the stream, server
  2.12+): the server stores every message of it or none, so no record of a request is stored
  while another is refused.
* **Conditional.** Every message carries ``Nats-Expected-Last-Sequence``: the stream's last
  sequence as this writer knows it. If any other writer (a daemon that took the partition's
  lease, after this one lost it) wrote in between, JetStream refuses the message and this log
  fences itself (:class:`LogFencedError`): it writes nothing more, and its stream stops. Opening
  a log writes a CHECKPOINT first, so an earlier writer is fenced at its next write.
* A publish that fails for another reason (a timeout, no quorum) leaves the log unknown to this
  writer (the message may be stored): the log is failed, the caller answers 503, and the cluster
  reopens the partition, which reads what is really stored.

Trimming: once every record and seal in the oldest messages is committed, a CHECKPOINT
(counters and source positions) is written and those messages are purged.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from firehose.intervals import IntervalSet, Ranges
from firehose.log import (
    FrameFile,
    LogError,
    LogFencedError,
    LogFullError,
    LogTooLargeError,
    RecordFrame,
    RecoveryState,
    SealedBatch,
    SizedFrame,
    read_ranges_by_frame,
)
from firehose.registry import one_line
from firehose.spool_format import (
    _RECORDS_HEAD,
    F_POSITIONS,
    T_CHECKPOINT,
    T_COMMIT,
    T_RECORDS,
    T_SEAL,
    _frame,
    decode_records_payload,
    iter_frames,
    records_payload,
)

# JetStream's error codes for a failed expectation (another writer moved the stream) and a full stream.
_WRONG_LAST_SEQUENCE = {10071, 10164}
_STREAM_FULL = {10023, 10047, 10077}  # insufficient resources, storage; stream full
_CONFIG_DIFFERS = 10058  # "stream name already in use with a different configuration"
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
# Atomic batch publish (ADR-50): the batch's id, the message's place in it, and the last message's mark.
BATCH_ID, BATCH_SEQUENCE, BATCH_COMMIT = "Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit"
MAX_BATCH_MESSAGES = 1000  # the server's limit on one atomic batch
PUBLISH_TIMEOUT = 5.0  # seconds: nats-py's default for a JetStream publish
FRAME_ROOM = 1024  # bytes kept free in a message for the frame header and the NATS headers
DIRECT_READ_MESSAGES = 16  # a log of more messages than this is read back through a consumer
# Frames kept in memory for the reader that follows the writer (the batcher).
TRIM_MESSAGES = 32  # purge once this many leading messages are finished


@dataclass
class _Write:
    """One caller's frames waiting for a message. ``tags`` has one entry per frame: the records
    ``(first, end, arrival_ms)`` a RECORDS frame holds, the batch id a SEAL frame seals, or None."""

    frames: list[bytes]
    tags: list[Any]
    future: asyncio.Future[None]
    nbytes: int


@dataclass
class _Message:
    """One stored message: its stream sequence, size, and what it holds (for trimming)."""

    seq: int
    nbytes: int
    records: tuple[int, int] | None = None  # the span of the records its RECORDS frames hold
    seal_ids: set[int] = field(default_factory=set)


class JetStreamLog:
    """One log in one JetStream stream (implements :class:`Log`). See the module docstring."""

    def __init__(self, nc: Any, *, stream: str, subject: str, replicas: int = 1,
                 max_size_bytes: int = 1 << 30, cache_bytes: int = 64 << 20, max_payload: int = 8 << 20,
                 metrics: Any = None, label: str = "") -> None:
        self.nc = nc  # the NATS connection: atomic batches are plain requests with headers
        self.js = nc.jetstream()
        # Publish latency and bytes awaiting acknowledgement, under the delivery stream's name.
        self._m_publish = metrics.jetstream_publish_seconds.labels(label) if metrics is not None else None
        self._m_pending = metrics.jetstream_pending_bytes.labels(label) if metrics is not None else None
        self.stream = stream
        self.subject = subject
        self.replicas = replicas
        self._max_size_bytes = max_size_bytes
        self._cache_limit = cache_bytes
        self.max_payload = max_payload
        self._last = 0  # the stream's last sequence, as this writer knows it
        self._messages: list[_Message] = []
        self._starts: list[int] = []  # RECORDS frames: first_seq, ascending
        self._frames: list[tuple[int, int, int]] = []  # (end_seq, arrival_ms, message seq)
        self._cache: dict[int, RecordFrame] = {}
        self._cache_size = 0
        self._next_seq = 0  # records below it are stored and indexed: readable
        self._assigned = 0  # records below it have a sequence number (some may be in flight)
        self._min_seq = 0
        self._sealed = IntervalSet()
        self._committed = IntervalSet()
        self._seals: dict[int, SealedBatch] = {}
        self._committed_ids: set[int] = set()
        self._positions: dict[str, Any] = {}
        self.next_batch_id = 1
        self._size = 0
        self._failed: LogError | None = None
        self._queue: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        self._trimming = False
        self._queued_bytes = 0  # frames waiting for (or in) a publish
        self._closed = False

    # ------------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return f"jetstream:{self.stream}"

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def min_seq(self) -> int:
        return self._min_seq

    @property
    def sealed(self) -> IntervalSet:
        return self._sealed

    @property
    def committed(self) -> IntervalSet:
        return self._committed

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def max_size_bytes(self) -> int:
        return self._max_size_bytes

    @property
    def positions(self) -> dict[str, Any]:
        return self._positions

    @property
    def failed(self) -> LogError | None:
        return self._failed

    # ------------------------------------------------------------------ open and recovery
    async def open(self) -> RecoveryState:
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError

        # No max_bytes: JetStream reserves a stream's max_bytes out of the server's
        # max_file_store when the stream is made, so 1 GiB per log would use a server up at a few
        # dozen logs, whatever they hold. The cap is this writer's (has_room); the servers'
        # max_file_store is the backstop (a publish over it is LogFullError: 503).
        config = StreamConfig(name=self.stream, subjects=[self.subject], num_replicas=self.replicas,
                              storage=StorageType.FILE, discard=DiscardPolicy.NEW,
                              max_msg_size=self.max_payload, allow_atomic=True)
        try:
            try:
                info = await self.js.add_stream(config)
            except BadRequestError as exc:
                if exc.err_code != _CONFIG_DIFFERS:
                    raise
                info = await self.js.update_stream(config)  # made by an earlier version, or another cap
        except Exception as exc:
            raise LogError(f"{self.name}: cannot create or open the JetStream stream: {one_line(exc)}") from None
        state = info.state
        commits: list[int] = []
        if state.messages > DIRECT_READ_MESSAGES:
            await self._read_stream(state.last_seq, commits)
        else:
            seq = state.first_seq
            while state.messages and seq <= state.last_seq:
                msg = await self._get(seq)
                if msg is not None:
                    self._apply_message(msg.seq, msg.data or b"", commits)
                seq = (msg.seq if msg is not None else seq) + 1
        self._last = state.last_seq
        self._assigned = self._next_seq
        for batch_id in commits:
            self._finish_seal(batch_id)
        self._min_seq = self._starts[0] if self._starts else self._next_seq
        self._sealed.discard_below(self._min_seq)
        self._committed.discard_below(self._min_seq)
        pending = [b for _, b in sorted(self._seals.items())]
        # Taking the log: this write moves the stream, so an earlier writer's next write fails.
        await self._write([self._checkpoint()])
        unsealed = self._next_seq - self._min_seq - len(self._sealed)
        return RecoveryState(pending, dict(self._positions), unsealed, 0)

    async def _read_stream(self, last: int, commits: list[int]) -> None:
        """Read every stored message up to ``last`` through an ordered consumer: the server
        streams them (with flow control), instead of one request per message."""
        from nats.js.api import DeliverPolicy

        sub = await self.js.subscribe(self.subject, stream=self.stream, ordered_consumer=True,
                                      deliver_policy=DeliverPolicy.ALL, pending_bytes_limit=4 * self.max_payload + (64 << 20))
        try:
            while True:
                msg = await sub.next_msg(timeout=PUBLISH_TIMEOUT)
                seq = int(msg.metadata.sequence.stream)
                if seq > last:
                    break
                self._apply_message(seq, msg.data or b"", commits)
                if seq == last:
                    break
        except Exception as exc:
            raise LogError(f"{self.name}: cannot read the log back: {one_line(exc)}") from None
        finally:
            await sub.unsubscribe()

    async def _get(self, seq: int) -> Any:
        from nats.js.errors import NotFoundError

        try:
            return await self.js.get_msg(self.stream, seq)
        except NotFoundError:
            return None  # purged or deleted

    def _apply_message(self, msg_seq: int, body: bytes, commits: list[int]) -> None:
        message = _Message(msg_seq, len(body))
        for ftype, payload in iter_frames(body, f"{self.name} message {msg_seq}"):
            if ftype == T_RECORDS:
                first, arrival, count, flags = _RECORDS_HEAD.unpack_from(payload, 0)
                if count:
                    self._index(first, first + count, arrival, msg_seq, message)
                self._next_seq = max(self._next_seq, first + count)
                if flags & F_POSITIONS:
                    self._merge_positions(decode_records_payload(payload)[1] or {})
            elif ftype == T_SEAL:
                doc = orjson.loads(payload)
                self._add_seal(SealedBatch(doc["id"], doc["key"], Ranges(doc["ranges"]), doc["oldest"],
                                           doc.get("info", {})), message)
            elif ftype == T_COMMIT:
                doc = orjson.loads(payload)
                if "ranges" in doc:
                    self._committed.add_many(doc["ranges"])
                else:
                    commits.append(doc["id"])
            elif ftype == T_CHECKPOINT:
                doc = orjson.loads(payload)
                self._next_seq = max(self._next_seq, doc["next_seq"])
                self.next_batch_id = max(self.next_batch_id, doc["next_batch_id"])
                self._merge_positions(doc.get("positions", {}))
        self._messages.append(message)
        self._size += message.nbytes

    def _index(self, first: int, end: int, arrival: int, msg_seq: int, message: _Message) -> None:
        self._next_seq = max(self._next_seq, end)
        self._starts.append(first)
        self._frames.append((end, arrival, msg_seq))
        lo = first if message.records is None else message.records[0]
        message.records = (lo, end)

    def _add_seal(self, batch: SealedBatch, message: _Message) -> None:
        self._seals[batch.batch_id] = batch
        message.seal_ids.add(batch.batch_id)
        self._sealed.add_many(batch.ranges)
        self.next_batch_id = max(self.next_batch_id, batch.batch_id + 1)

    def _finish_seal(self, batch_id: int) -> None:
        self._committed_ids.add(batch_id)
        batch = self._seals.pop(batch_id, None)
        if batch is not None:
            self._committed.add_many(batch.ranges)

    def _merge_positions(self, positions: dict[str, Any]) -> None:
        for key, value in positions.items():
            if value is None:
                self._positions.pop(key, None)
            else:
                self._positions[key] = value

    def _checkpoint(self) -> bytes:
        return _frame(T_CHECKPOINT, orjson.dumps({"next_seq": self._assigned, "next_batch_id": self.next_batch_id,
                                                  "positions": self._positions}))

    # ------------------------------------------------------------------ writing
    def has_room(self, nbytes: int) -> bool:
        return self._failed is None and self._size + self._queued_bytes + nbytes <= self._max_size_bytes

    async def append(self, records: Sequence[bytes], arrival_ms: int, *, meta: list[Any] | None = None,
                     positions: dict[str, Any] | None = None, enforce_cap: bool = True,
                     nbytes: int | None = None) -> int:
        if self._failed is not None:
            raise self._failed
        first = self._assigned
        chunks = self._chunks(first, arrival_ms, records, meta, positions)
        total = sum(len(payload) for _, _, payload in chunks)
        if enforce_cap and not self.has_room(total):
            raise LogFullError(f"{self.name} is at its cap of {self._max_size_bytes} bytes")
        self._assigned = first + len(records)
        if positions:
            self._merge_positions(positions)
        frames, tags = [], []
        for lo, hi, payload in chunks:
            frames.append(_frame(T_RECORDS, payload))
            tags.append((first + lo, first + hi, arrival_ms))
            if hi > lo:
                part = records[lo:hi]
                frame = RecordFrame(first + lo, arrival_ms, list(part), meta[lo:hi] if meta is not None else None)
                size = sum(map(len, part)) if nbytes is None or len(chunks) > 1 else nbytes
                if self._cache_size + size <= self._cache_limit:
                    self._cache[first + lo] = frame
                    self._cache_size += size
        # Indexed once stored (its message's sequence is known then): see _flush.
        await self._write(frames, tags)
        return first

    def _chunks(self, first: int, arrival_ms: int, records: Sequence[bytes], meta: list[Any] | None,
                positions: dict[str, Any] | None) -> list[tuple[int, int, bytes]]:
        """``records`` as RECORDS payloads that each fit one message: ``(lo, hi, payload)`` for
        ``records[lo:hi]``; the source positions ride on the last one."""
        limit = self.max_payload - FRAME_ROOM
        payload = records_payload(first, arrival_ms, records, meta, positions)
        if len(payload) <= limit:
            return [(0, len(records), payload)]
        cost = [4 + len(r) + (len(orjson.dumps(meta[i])) + 1 if meta is not None else 0)
                for i, r in enumerate(records)]
        room = limit - len(orjson.dumps(positions or {})) - 64
        chunks: list[tuple[int, int, bytes]] = []
        lo = 0
        while lo < len(records):
            hi, used = lo, 0
            while hi < len(records) and (hi == lo or used + cost[hi] <= room):
                used += cost[hi]
                hi += 1
            last = hi == len(records)
            part = records_payload(first + lo, arrival_ms, records[lo:hi],
                                   meta[lo:hi] if meta is not None else None, positions if last else None)
            if len(part) > limit:
                raise LogTooLargeError(f"record {lo} of the request is {len(records[lo])} bytes, over what one "
                                       f"message to the NATS servers can hold (max_payload {self.max_payload} "
                                       "bytes); set max_payload: 8MB on them (docs/cluster.md)")
            chunks.append((lo, hi, part))
            lo = hi
        if len(chunks) > MAX_BATCH_MESSAGES:
            raise LogTooLargeError(f"the request needs {len(chunks)} messages, over JetStream's "
                                   f"{MAX_BATCH_MESSAGES} per atomic batch")
        return chunks

    def allocate_batch_id(self) -> int:
        bid = self.next_batch_id
        self.next_batch_id += 1
        return bid

    async def seal(self, batches: Sequence[SealedBatch]) -> None:
        if self._failed is not None:
            raise self._failed
        new = [b for b in batches if b.batch_id not in self._seals and b.batch_id not in self._committed_ids]
        frames = [_frame(T_SEAL, orjson.dumps({"id": b.batch_id, "key": b.key, "ranges": list(b.ranges),
                                                "oldest": b.oldest_arrival_ms, "info": b.info})) for b in new]
        for b in new:
            self._seals[b.batch_id] = b
            self._sealed.add_many(b.ranges)
        await self._write(frames, [b.batch_id for b in new])

    async def commit(self, batch_id: int, info: dict[str, Any] | None = None) -> None:
        if self._failed is not None:
            raise self._failed
        doc: dict[str, Any] = {"id": batch_id}
        if info:
            doc["info"] = info
        await self._write([_frame(T_COMMIT, orjson.dumps(doc))])
        self._finish_seal(batch_id)
        await self._trim()

    async def commit_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        if self._failed is not None:
            raise self._failed
        await self._write([_frame(T_COMMIT, orjson.dumps({"ranges": [list(r) for r in ranges]}))])
        self._committed.add_many(ranges)
        await self._trim()

    # ------------------------------------------------------------------ group commit
    async def _write(self, frames: list[bytes], tags: list[Any] | None = None) -> None:
        """Queue frames for the next message and wait until it is stored."""
        if not frames:
            if tags is not None and self._flusher is not None:
                await asyncio.shield(self._flusher)  # a seal made again: wait for the one in flight
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller cancelled while it waited (a client that hung up) leaves the future to the
        # flusher: its failure is the log's, already reported, not an unretrieved exception.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        write = _Write(frames, tags if tags is not None else [None] * len(frames), fut, sum(map(len, frames)))
        self._queue.append(write)
        self._queued_bytes += write.nbytes
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        limit = self.max_payload - FRAME_ROOM
        while self._queue:
            # Whole writes, up to one message's worth; a write larger than that goes alone, as
            # several messages in one atomic batch.
            take, size = 0, 0
            while take < len(self._queue):
                n = self._queue[take].nbytes
                if take and size + n > limit:
                    break
                take += 1
                size += n
            group, self._queue = self._queue[:take], self._queue[take:]
            messages = _pack([(f, t) for w in group for f, t in zip(w.frames, w.tags, strict=True)], limit)
            try:
                seqs = await self._publish([b"".join(f for f, _ in m) for m in messages])
                self._queued_bytes -= size
            except LogError as exc:
                self._failed = exc
                for w in group + self._queue:
                    if not w.future.done():
                        w.future.set_exception(exc)
                self._queue = []
                return
            for seq, parts in zip(seqs, messages, strict=True):
                message = _Message(seq, sum(len(f) for f, _ in parts))
                for _, tag in parts:
                    if isinstance(tag, tuple):
                        if tag[1] > tag[0]:
                            self._index(tag[0], tag[1], tag[2], seq, message)
                    elif tag is not None:
                        message.seal_ids.add(tag)
                self._messages.append(message)
                self._size += message.nbytes
            for w in group:
                if not w.future.done():
                    w.future.set_result(None)

    async def _publish(self, bodies: list[bytes]) -> list[int]:
        """Store ``bodies`` as consecutive messages, all or none; their stream sequences."""
        from nats.js.errors import APIError

        started = time.monotonic()
        nbytes = sum(map(len, bodies))
        if self._m_pending is not None:
            self._m_pending.inc(nbytes)
        try:
            if len(bodies) == 1:
                ack = await self.js.publish(self.subject, bodies[0], stream=self.stream,
                                            headers={EXPECTED_LAST_SEQUENCE: str(self._last)})
                last, count = int(ack.seq), 1
            else:
                last, count = await self._publish_batch(bodies)
        except APIError as exc:
            raise self._refused(exc.err_code, one_line(exc)) from None
        except LogError:
            raise
        except Exception as exc:  # a timeout, no responders, a closed connection
            raise LogError(f"{self.name}: publish failed: {one_line(exc)}") from None
        finally:
            if self._m_pending is not None:
                self._m_pending.dec(nbytes)
        if count != len(bodies):
            raise LogError(f"{self.name}: JetStream stored {count} of a batch of {len(bodies)} messages")
        if self._m_publish is not None:
            self._m_publish.observe(time.monotonic() - started)
        self._last = last
        return list(range(last - count + 1, last + 1))

    async def _publish_batch(self, bodies: list[bytes]) -> tuple[int, int]:
        """One JetStream atomic batch (ADR-50): every message is a request the server answers (an
        empty reply, or an error that abandons the batch); the last one commits, and its reply is
        the batch's acknowledgement. The expectation rides on the first message and is checked
        at the commit, under the stream's lock."""
        batch = uuid.uuid4().hex
        for i, body in enumerate(bodies, 1):
            headers = {BATCH_ID: batch, BATCH_SEQUENCE: str(i)}
            if i == 1:
                headers[EXPECTED_LAST_SEQUENCE] = str(self._last)
            if i == len(bodies):
                headers[BATCH_COMMIT] = "1"
            reply = await self.nc.request(self.subject, body, timeout=PUBLISH_TIMEOUT, headers=headers)
            doc = orjson.loads(reply.data) if reply.data else {}
            error = doc.get("error")
            if error:
                raise self._refused(error.get("err_code"), str(error.get("description", error))[:300])
        return int(doc["seq"]), int(doc.get("count", 0))

    def _refused(self, err_code: int | None, what: str) -> LogError:
        """The log's error for a publish JetStream refused."""
        if err_code in _WRONG_LAST_SEQUENCE:
            return LogFencedError(f"{self.name}: another writer wrote to this log (its lease moved); this writer stops")
        if err_code in _STREAM_FULL:
            return LogFullError(f"{self.name}: the JetStream stream is full")
        return LogError(f"{self.name}: publish failed: {what}")

    # ------------------------------------------------------------------ reading
    def _locate(self, seq: int) -> int:
        i = bisect.bisect_right(self._starts, seq) - 1
        if i < 0 or seq >= self._frames[i][0]:
            return -1
        return i

    def sizes_at(self, seq: int) -> SizedFrame | None:
        return None  # a message is fetched whole: its sizes cost what its records do

    def frame_file(self, seq: int) -> FrameFile | None:
        return None  # in the JetStream server

    async def read_frame(self, seq: int) -> RecordFrame | None:
        i = self._locate(seq)
        if i < 0:
            return None
        first = self._starts[i]
        cached = self._cache.get(first)
        if cached is not None:
            return cached
        msg = await self._get(self._frames[i][2])
        if msg is None:
            raise LogError(f"{self.name}: the message holding record {seq} is gone")
        for ftype, payload in iter_frames(msg.data or b"", f"{self.name} message {msg.seq}"):
            # A message can hold a positions-only frame (no records) with the same first seq as
            # the records frame after it (a source's checkpoint and its next read, group-committed).
            if ftype != T_RECORDS:
                continue
            head = _RECORDS_HEAD.unpack_from(payload, 0)
            if head[0] == first and head[2]:
                return decode_records_payload(payload)[0]
        raise LogError(f"{self.name}: record {seq} is not in its message")

    def arrival_of(self, seq: int) -> int | None:
        i = self._locate(seq)
        return self._frames[i][1] if i >= 0 else None

    def reader_passed(self, seq: int) -> None:
        while self._cache:
            first = next(iter(self._cache))
            frame = self._cache[first]
            if frame.end_seq > seq:
                break
            del self._cache[first]
            self._cache_size -= sum(map(len, frame.records))

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], list[Any] | None]:
        return await read_ranges_by_frame(self, ranges)

    async def read_records(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return (await self.read_ranges(ranges))[0]

    # ------------------------------------------------------------------ trimming
    def _done(self, message: _Message) -> bool:
        if message.records is not None and not self._committed.covers(*message.records):
            return False
        return all(b in self._committed_ids for b in message.seal_ids)

    async def _trim(self, force: bool = False) -> None:
        if self._trimming:
            return
        self._trimming = True
        try:
            await self._trim_once(force)
        finally:
            self._trimming = False

    async def _trim_once(self, force: bool) -> None:
        done = 0
        while done < len(self._messages) - 1 and self._done(self._messages[done]):
            done += 1
        if not done or (done < TRIM_MESSAGES and not force):
            return
        keep = self._messages[done].seq
        await self._write([self._checkpoint()])  # the counters survive the purge
        try:
            await self.js.purge_stream(self.stream, seq=keep)
        except Exception:  # noqa: BLE001 - trimming is an aid: a failed purge is retried at the next commit
            return
        gone, self._messages = self._messages[:done], self._messages[done:]
        for message in gone:
            self._size -= message.nbytes
            self._committed_ids.difference_update(message.seal_ids)
        drop = bisect.bisect_left([f[2] for f in self._frames], keep)
        for first in self._starts[:drop]:
            frame = self._cache.pop(first, None)
            if frame is not None:
                self._cache_size -= sum(map(len, frame.records))
        del self._starts[:drop]
        del self._frames[:drop]
        self._min_seq = self._starts[0] if self._starts else self._next_seq
        self._committed.discard_below(self._min_seq)
        self._sealed.discard_below(self._min_seq)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)



def _pack(frames: list[tuple[bytes, Any]], limit: int) -> list[list[tuple[bytes, Any]]]:
    """Frames, in order, into messages of at most ``limit`` bytes (a frame is never cut)."""
    messages: list[list[tuple[bytes, Any]]] = [[]]
    size = 0
    for frame, tag in frames:
        if messages[-1] and size + len(frame) > limit:
            messages.append([])
            size = 0
        messages[-1].append((frame, tag))
        size += len(frame)
    return messages


def jetstream_names(stream: str, partition: int, log: str) -> tuple[str, str]:
    """The JetStream stream name and subject of one log: readable, and unique by a hash of the
    delivery stream's name (JetStream names cannot hold '.', '*', '>' or path separators)."""
    import hashlib
    import re

    readable = re.sub(r"[^A-Za-z0-9_-]", "_", stream)[:32]
    digest = hashlib.sha256(stream.encode()).hexdigest()[:10]
    ident = f"{readable}_{digest}"
    return f"FH_{ident}_P{partition}_{log}", f"fh.{ident}.p{partition}.{log}"


class JetStreamLogs:
    """The JetStream :class:`firehose.log.LogStore` of one partition: every stream's logs of
    partition ``partition``. ``known`` holds the JetStream stream names found to exist (by
    :meth:`refresh`, or opened here), so :meth:`exists` needs no round trip."""

    def __init__(self, nc: Any, *, partition: int = 0, replicas: int = 1, max_size_bytes: int = 1 << 30,
                 max_payload: int = 8 << 20, metrics: Any = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.metrics = metrics
        self.partition = partition
        self.replicas = replicas
        self.max_size_bytes = max_size_bytes
        self.max_payload = max_payload
        self.known: set[str] = set()

    async def refresh(self, stream: str) -> None:
        """Find which of ``stream``'s logs in this partition exist (one lookup each)."""
        from nats.js.errors import NotFoundError

        for log in ("ingest", "processed"):
            js_stream = jetstream_names(stream, self.partition, log)[0]
            try:
                await self.js.stream_info(js_stream)
            except NotFoundError:
                continue
            self.known.add(js_stream)

    def log(self, stream: str, name: str, *, cache_bytes: int = 64 << 20) -> JetStreamLog:
        js_stream, subject = jetstream_names(stream, self.partition, name)
        self.known.add(js_stream)
        return JetStreamLog(self.nc, stream=js_stream, subject=subject, replicas=self.replicas,
                            max_size_bytes=self.max_size_bytes, cache_bytes=cache_bytes,
                            max_payload=self.max_payload, metrics=self.metrics, label=stream)

    def exists(self, stream: str, name: str) -> bool:
        return jetstream_names(stream, self.partition, name)[0] in self.known
