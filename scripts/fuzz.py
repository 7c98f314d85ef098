#!/usr/bin/env python3
"""Fuzz the Firehose API and the spool's frames with a seeded generator.

    build/dev-venv/bin/python scripts/fuzz.py --requests 90000 --frames 30000 --seed 1 --auth

**API.** The daemon runs as a subprocess (tests/support.py's ``Daemon``) with a local destination
and a 1 s buffering interval; with ``--auth`` a second daemon runs with ``api.auth.mode: sigv4``,
where requests are signed with botocore's ``SigV4Auth`` and then, most of them, mutated. Request
``i`` is generated from ``random.Random(f"{seed}:{run}:{i}")`` alone, so ``--replay RUN:I`` shows
it again. It starts from a valid body (PutRecord, PutRecordBatch, ListDeliveryStreams,
DescribeDeliveryStream, Tag/Untag/ListTags) and mutates its JSON (types, depth, huge numbers,
duplicate keys, unicode, base64, Records of 0/500/501, records at and over 1,024,000 bytes), its
bytes (flips, truncation, insertion), its headers (X-Amz-Target, Content-Type, Content-Encoding
with valid and broken gzip/deflate), its framing (Content-Length wrong, absent, huge; chunked;
request line) and, in the auth run, its signature. Requests go over raw sockets from a few
threads, many per kept-alive connection, framing mutations on fresh ones.

Every answer must be 200, 400, 403, 404, 405, 408, 411, 413, 415, 431 or 503 (a 503 with
Firehose's ``ServiceUnavailableException`` body); a JSON error must have ``__type`` and
``message``; no answer within 30 s is a hang; the daemon must be alive and ``/healthz`` answer at
the end. **Delivery:** every record carries a marker ``<FZ + 32 hex + >``. A marker is
acknowledged when a PutRecord answered 200, or a PutRecordBatch answered 200 with a RecordId for
its entry; the records a 200 covered are found by decoding the bytes the daemon saw for that
request (after a mutation a marker may change, or a record appear twice: what counts is what the
accepted body decodes to). After SIGTERM (the daemon flushes), the local destination must hold
every acknowledged marker exactly as many times as it was acknowledged, and nothing else, except
records of requests whose answer the fuzzer itself made impossible (it half-closed or cut the
connection): those may be delivered at most once.

**Spool frames.** Spools are written with ``firehose.spool.Spool`` (acknowledged appends, seals,
commits, sometimes an unacknowledged tail, sometimes records that contain valid-looking spool
frames, as any client's data may), then a copy is damaged (bit flips, truncation, insertion,
duplicated, swapped, garbage or zeroed frames, zeroed ranges, zeros appended, header damage)
and: ``check()`` must not fail; ``salvage()`` of a copy must not fail and the salvaged copy must
open; ``Spool.open()`` of the damaged copy must either raise ``SpoolError`` naming the segment or
open. Every record an opened spool returns must equal what was written at that sequence number,
and every acknowledged, uncommitted record in a frame before the damage must still be there.

Exit status 0 when there is no violation, 1 otherwise; the first violations are printed with
their run and index (or the frame case and its mutation).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from support import Daemon, daemon_config, local_objects, stream_config  # noqa: E402

STREAM = "s"
TARGET = "Firehose_20150804."
JSON_CT = "application/x-amz-json-1.1"
MAX_RECORD = 1_024_000
ALLOWED = {200, 400, 403, 404, 405, 408, 411, 413, 415, 431, 503}
KEY, SECRET = "AKIDFUZZ", "fuzz-secret-key"
OPERATOR_TOKEN = "fuzz-operator-token-0123456789"
MARKER_RE = re.compile(rb"<FZ([0-9a-f]{32})>")
HANG_SECS = 30.0
LIMITS = {"header_timeout_secs": 2, "body_timeout_secs": 2, "idle_timeout_secs": 30, "max_connections": 512}
OPS = ["PutRecord", "PutRecordBatch", "ListDeliveryStreams", "DescribeDeliveryStream",
       "ListTagsForDeliveryStream", "TagDeliveryStream", "UntagDeliveryStream"]


# ====================================================================== JSON with duplicates
class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs: keys may repeat, order is kept."""


class Raw(bytes):
    """JSON text inserted verbatim (numbers JSON cannot hold, deep nesting, invalid bytes)."""


def dumps(node: Any, ascii_only: bool = True) -> bytes:
    if isinstance(node, Raw):
        return bytes(node)
    if isinstance(node, Pairs | dict):
        items = node if isinstance(node, Pairs) else node.items()
        return b"{" + b",".join(dumps(k, ascii_only) + b":" + dumps(v, ascii_only) for k, v in items) + b"}"
    if isinstance(node, list):
        return b"[" + b",".join(dumps(v, ascii_only) for v in node) + b"]"
    if isinstance(node, str):
        return json.dumps(node, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if node is None or isinstance(node, bool | int | float):
        return json.dumps(node).encode()
    raise TypeError(type(node))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ====================================================================== requests
@dataclass
class Req:
    run: str
    index: int
    op: str
    tags: list[str] = field(default_factory=list)
    method: str = "POST"
    path: str = "/"
    version: str = "HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""  # the body as sent (after Content-Encoding), before any chunked framing
    wire: bytes = b""
    visible: bytes | None = b""  # what the daemon reads as this request's body (None: unknown)
    markers: list[str] = field(default_factory=list)
    fresh: bool = False  # own connection (framing mutations; some clean ones too)
    halfclose: bool = False  # the client shuts its side after sending: no answer is possible
    stall: bool = False  # waits for one of the daemon's deadlines
    wellformed: bool = True  # valid HTTP framing and header syntax
    clean: bool = True  # no mutation at all: must be accepted
    forged: bool | None = None  # auth run: True when the signature no longer covers what is sent
    signed_target: bytes = b""  # auth run: the X-Amz-Target value that was signed

    def header(self, name: str) -> str | None:
        lname = name.lower().encode()
        for k, v in self.headers:
            if k.strip().lower() == lname:
                return v.decode("latin-1").strip()
        return None

    def describe(self) -> str:
        head = self.wire[: self.wire.find(b"\r\n\r\n") + 4] if b"\r\n\r\n" in self.wire else self.wire[:600]
        body = self.wire[len(head):]
        return (f"run={self.run} index={self.index} op={self.op} mutations={','.join(self.tags) or 'none'}\n"
                f"      head={head[:600]!r}\n      body[{len(body)}]={body[:300]!r}")


def _payload(rng: Random, marker: str, size: int | None = None) -> bytes:
    head = b"<FZ" + marker.encode() + b">"
    if size is not None:
        return head + b"x" * (size - len(head) - 1) + b"\n"
    kind = rng.random()
    if kind < 0.6:
        filler = rng.randbytes(rng.randrange(0, 120)).translate(_PRINTABLE)
    elif kind < 0.8:
        filler = rng.randbytes(rng.randrange(0, 64))
    else:
        filler = "é€😀\u200f\x00".encode() * rng.randrange(1, 5)
    filler = filler.replace(b"<FZ", b"<fz")
    return head + filler + b"\n"


_PRINTABLE = bytes(32 + b % 95 for b in range(256))
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _marker(rng: Random) -> str:
    return f"{rng.getrandbits(128):032x}"


_WEIRD_STRINGS = ["", " ", "s ", "S", "s\x00", "é", "\ud800", "\udfff", "😀", "\u202es", "a" * 65, "a" * 64,
                  "../s", "s/../s", "%73", "\\u0073", "null", "true", "0", "s" * 10000, "\ufeffs", "ｓ"]


def _weird_value(rng: Random) -> Any:
    c = rng.randrange(20)
    if c == 0:
        return None
    if c == 1:
        return rng.choice([True, False])
    if c == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**40)])
    if c == 3:
        return rng.choice([1.5, -0.0, 1e308, 5e-324])
    if c == 4:
        return Raw(rng.choice([b"1e999999", b"-1e999999", b"NaN", b"Infinity", b"-0", b"01", b"1.", b".5", b"0x10",
                               b"123456789012345678901234567890123456789012345678901234567890", b"1E+2", b"-",
                               b"tru", b"nul", b"[", b"{", b"\"", b"\"\\ud800\\udc00\"", b"\"\\x41\"",
                               b"\"\xff\xfe\"", b"\"\xc3\"", b"\"a\x00b\"", b"\"\\u0000\"", b"[,]", b"{,}"]))
    if c == 5:
        return rng.choice(_WEIRD_STRINGS)
    if c == 6:
        return []
    if c == 7:
        return {}
    if c == 8:
        return [_weird_value(rng) for _ in range(rng.randrange(1, 4))]
    if c == 9:
        return Pairs([(rng.choice(["Data", "Record", "Records", "x", ""]), _weird_value(rng))])
    if c == 10:
        depth = rng.choice([10, 100, 600, 1100, 5000])
        return Raw(b"[" * depth + b"1" + b"]" * depth)
    if c == 11:
        depth = rng.choice([10, 600, 1100])
        return Raw(b'{"a":' * depth + b"1" + b"}" * depth)
    if c == 12:
        return "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD7FF),
                                       rng.randrange(0xD800, 0xE000), rng.randrange(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randrange(1, 30)))
    if c == 13:
        return "A" * rng.choice([1, 2, 3, 5, 4 * 1000 + 1])
    if c == 14:
        return b64(b"no marker here")
    return rng.choice(["DirectPut", "KinesisStreamAsSource", "directput", "s", "t"])


def _seed_doc(op: str, rng: Random, markers: list[str]) -> Pairs:
    def record(size: int | None = None) -> Pairs:
        m = _marker(rng)
        markers.append(m)
        return Pairs([("Data", b64(_payload(rng, m, size)))])

    name = STREAM if rng.random() < 0.93 else rng.choice(["nope", "s2", "S", "s.", "a" * 64])
    if op == "PutRecord":
        return Pairs([("DeliveryStreamName", name), ("Record", record())])
    if op == "PutRecordBatch":
        n = rng.choice([1, 1, 2, 3, 5, 10, 20, 50])
        return Pairs([("DeliveryStreamName", name), ("Records", [record() for _ in range(n)])])
    if op == "ListDeliveryStreams":
        doc = Pairs()
        if rng.random() < 0.5:
            doc.append(("Limit", rng.choice([1, 2, 10, 10000])))
        if rng.random() < 0.3:
            doc.append(("DeliveryStreamType", rng.choice(["DirectPut", "KinesisStreamAsSource"])))
        if rng.random() < 0.3:
            doc.append(("ExclusiveStartDeliveryStreamName", rng.choice(["a", "s", "z"])))
        return doc
    if op == "DescribeDeliveryStream":
        return Pairs([("DeliveryStreamName", name)])
    if op == "ListTagsForDeliveryStream":
        doc = Pairs([("DeliveryStreamName", name)])
        if rng.random() < 0.4:
            doc.append(("Limit", rng.choice([1, 5, 50])))
        if rng.random() < 0.3:
            doc.append(("ExclusiveStartTagKey", rng.choice(["a", "k1", "zz"])))
        return doc
    if op == "TagDeliveryStream":
        tags = [Pairs([("Key", f"k{rng.randrange(40)}"), ("Value", rng.choice(["v", "", "x y", "a:b"]))])
                for _ in range(rng.randrange(1, 4))]
        return Pairs([("DeliveryStreamName", name), ("Tags", tags)])
    if op == "UntagDeliveryStream":
        return Pairs([("DeliveryStreamName", name), ("TagKeys", [f"k{rng.randrange(40)}" for _ in range(rng.randrange(1, 4))])])
    raise ValueError(op)


def _slots(node: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key-or-index) below ``node``, to pick a place to mutate."""
    if isinstance(node, Pairs):
        for i, (_k, v) in enumerate(node):
            out.append((node, i))
            _slots(v, out)
    elif isinstance(node, list) and not isinstance(node, Pairs):
        for i, v in enumerate(node):
            out.append((node, i))
            _slots(v, out)


def _get(container: Any, i: int) -> Any:
    return container[i][1] if isinstance(container, Pairs) else container[i]


def _set(container: Any, i: int, value: Any) -> None:
    if isinstance(container, Pairs):
        container[i] = (container[i][0], value)
    else:
        container[i] = value


def _mutate_base64(rng: Random, s: str) -> tuple[str, str]:
    c = rng.randrange(11)
    if c == 0:
        return s.rstrip("="), "b64-nopad"
    if c == 1:
        i = rng.randrange(len(s) + 1)
        return s[:i] + rng.choice([" ", "\n", "\r\n", "\t"]) + s[i:], "b64-space"
    if c == 2:
        i = rng.randrange(len(s) + 1)
        return s[:i] + rng.choice(["!", "-", "_", "*", ".", "é", "\x00", "="]) + s[i:], "b64-badchar"
    if c == 3:
        return s.replace("+", "-").replace("/", "_"), "b64-urlsafe"
    if c == 4:
        return s[: rng.randrange(len(s) + 1)], "b64-truncate"
    if c == 5:
        return "", "b64-empty"
    if c == 6:
        return s + "=", "b64-extra-pad"
    if c == 7:
        i = rng.randrange(len(s)) if s else 0
        return s[:i] + rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") + s[i + 1:], "b64-char"
    if c == 8:
        return s + s, "b64-doubled"
    if c == 9:
        return s.lower(), "b64-lower"
    return "====", "b64-only-pad"


def _records_of(doc: Any) -> list[Any] | None:
    if isinstance(doc, Pairs):
        for k, v in doc:
            if k == "Records" and isinstance(v, list) and not isinstance(v, Pairs):
                return v
    return None


def _mutate_json(doc: Any, rng: Random, markers: list[str], tags: list[str]) -> Any:
    c = rng.randrange(13)
    if c in (8, 11) and rng.random() > 0.08:  # megabyte bodies: a few, or they are all the run does
        c = 12
    slots: list[tuple[Any, Any]] = []
    _slots(doc, slots)
    if c == 0 and slots:  # any value to another type
        cont, i = rng.choice(slots)
        _set(cont, i, _weird_value(rng))
        tags.append("json-type")
    elif c == 1 and isinstance(doc, Pairs) and doc:  # drop a member
        cont, i = rng.choice([s for s in slots if isinstance(s[0], Pairs)] or [(doc, 0)])
        del cont[i]
        tags.append("json-drop")
    elif c == 2 and isinstance(doc, Pairs) and doc:  # duplicate key, other or same value
        cont, i = rng.choice([s for s in slots if isinstance(s[0], Pairs)] or [(doc, 0)])
        key, value = cont[i]
        dup = value if rng.random() < 0.3 else _weird_value(rng)
        cont.insert(rng.randrange(len(cont) + 1), (key, dup))
        tags.append("json-dupkey")
    elif c == 3:  # unknown members
        target = rng.choice([s for s in slots if isinstance(_get(*s), Pairs)] or [None])
        obj = doc if target is None else _get(*target)
        if isinstance(obj, Pairs):
            obj.append((rng.choice(["Unknown", "data", "__type", "", "DeliveryStreamName\x00", "😀"]), _weird_value(rng)))
        tags.append("json-extra")
    elif c == 4 and slots:  # deep nesting around a value
        cont, i = rng.choice(slots)
        depth = rng.choice([3, 50, 500, 1000, 1100, 3000])
        _set(cont, i, Raw(b"[" * depth + dumps(_get(cont, i)) + b"]" * depth))
        tags.append(f"json-nest{depth}")
    elif c == 5:  # strings: unicode
        strs = [s for s in slots if isinstance(_get(*s), str)]
        if strs:
            cont, i = rng.choice(strs)
            s = _get(cont, i)
            k = rng.randrange(len(s) + 1)
            _set(cont, i, s[:k] + rng.choice(["\ud800", "\udc00", "😀", "\u0000", "\u202e", "\u0301", "é",
                                               "\uffff", "\ufeff", "\x7f", "ı"]) + s[k:])
        tags.append("json-unicode")
    elif c == 6:  # base64 of a Data field
        datas = [s for s in slots if isinstance(s[0], Pairs) and s[0][s[1]][0] == "Data" and isinstance(_get(*s), str)]
        if datas:
            cont, i = rng.choice(datas)
            new, tag = _mutate_base64(rng, _get(cont, i))
            _set(cont, i, new)
            tags.append(tag)
    elif c == 7 and _records_of(doc) is not None:  # Records of 0 / 500 / 501
        recs = _records_of(doc)
        assert recs is not None
        n = rng.choice([0, 499, 500, 501, 1000])
        del recs[:]
        for _ in range(n):
            m = _marker(rng)
            markers.append(m)
            recs.append(Pairs([("Data", b64(b"<FZ" + m.encode() + b">\n"))]))
        tags.append(f"records{n}")
    elif c == 8:  # record sizes at and over the limit
        size = rng.choice([MAX_RECORD, MAX_RECORD, MAX_RECORD + 1, MAX_RECORD - 1, MAX_RECORD + 4000])
        recs = _records_of(doc)
        m = _marker(rng)
        markers.append(m)
        big = Pairs([("Data", b64(_payload(rng, m, size)))])
        if recs is not None:
            if rng.random() < 0.3:  # 5 of them: over the 4 MiB batch limit
                for _ in range(4):
                    m2 = _marker(rng)
                    markers.append(m2)
                    recs.append(Pairs([("Data", b64(_payload(rng, m2, MAX_RECORD)))]))
            recs.append(big)
        elif isinstance(doc, Pairs):
            doc.append(("Record", big))
        tags.append(f"size{size}")
    elif c == 9:  # the whole document another type
        doc = rng.choice([[], "s", 1, None, [doc], Raw(b"\"" + b"a" * 100 + b"\""), Raw(b"")])
        tags.append("json-toplevel")
    elif c == 10 and slots:  # a container emptied or a list as object and back
        cont, i = rng.choice(slots)
        v = _get(cont, i)
        if isinstance(v, Pairs):
            _set(cont, i, [x for _k, x in v])
        elif isinstance(v, list):
            _set(cont, i, Pairs([(str(j), x) for j, x in enumerate(v)]))
        else:
            _set(cont, i, [v])
        tags.append("json-shape")
    elif c == 11 and slots:  # a big value
        cont, i = rng.choice(slots)
        _set(cont, i, rng.choice([Raw(b'"' + b"s" * 200_000 + b'"'), Raw(orjson.dumps(list(range(20_000)))),
                                  Raw(orjson.dumps([{"Data": "QQ=="}] * 2000))]))
        tags.append("json-big")
    else:  # a string member's content swapped for a weird string
        strs = [s for s in slots if isinstance(_get(*s), str)]
        if strs:
            cont, i = rng.choice(strs)
            _set(cont, i, rng.choice(_WEIRD_STRINGS))
        tags.append("json-string")
    return doc


def _mutate_bytes(body: bytes, rng: Random, tags: list[str]) -> bytes:
    b = bytearray(body)
    c = rng.randrange(8)
    if c == 0 and b:
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        tags.append("bytes-flip")
    elif c == 1:
        del b[rng.randrange(len(b) + 1):]
        tags.append("bytes-truncate")
    elif c == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
        tags.append("bytes-insert")
    elif c == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.choice([b"{", b"}", b"[", b"]", b"\"", b"\\", b",", b":", b"\x00", b"\xff", b"\xc3", b"\n",
                             b"\xef\xbb\xbf", b"/*", b"//"])
        tags.append("bytes-special")
    elif c == 4 and b:
        i = rng.randrange(len(b))
        del b[i : i + rng.randrange(1, 32)]
        tags.append("bytes-delete")
    elif c == 5 and b:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randrange(1, 64))
        b[j:j] = b[i:j]
        tags.append("bytes-dup")
    elif c == 6 and len(b) > 1:
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]
        tags.append("bytes-swap")
    else:
        b = bytearray(b"\xef\xbb\xbf") + b if rng.random() < 0.5 else b + rng.choice([b" ", b"\n", b"x", b"{}", b"\x00"])
        tags.append("bytes-affix")
    return bytes(b)


_BOMB: bytes | None = None


def _bomb() -> bytes:
    global _BOMB
    if _BOMB is None:
        _BOMB = gzip.compress(b"[" + b" " * (17 << 20) + b"]", compresslevel=9)
    return _BOMB


def _encode(body: bytes, rng: Random, headers: list[tuple[bytes, bytes]], tags: list[str]) -> bytes:
    c = rng.randrange(12)
    if c <= 2:
        headers.append((b"Content-Encoding", rng.choice([b"gzip", b"x-gzip", b"GZIP", b" gzip "])))
        tags.append("gzip")
        return gzip.compress(body, compresslevel=1)
    if c == 3:
        headers.append((b"Content-Encoding", b"deflate"))
        tags.append("deflate-zlib")
        return zlib.compress(body, 1)
    if c == 4:
        headers.append((b"Content-Encoding", b"deflate"))
        co = zlib.compressobj(1, zlib.DEFLATED, -15)
        tags.append("deflate-raw")
        return co.compress(body) + co.flush()
    if c == 5:
        headers.append((b"Content-Encoding", b"gzip"))
        z = bytearray(gzip.compress(body, compresslevel=1))
        for _ in range(rng.randrange(1, 4)):
            z[rng.randrange(len(z))] ^= 1 << rng.randrange(8)
        tags.append("gzip-flipped")
        return bytes(z)
    if c == 6:
        headers.append((b"Content-Encoding", b"gzip"))
        z = gzip.compress(body, compresslevel=1)
        tags.append("gzip-truncated")
        return z[: rng.randrange(len(z))]
    if c == 7:
        headers.append((b"Content-Encoding", b"gzip"))
        tags.append("gzip-header-plain-body")
        return body
    if c == 8:
        headers.append((b"Content-Encoding", rng.choice([b"br", b"zstd", b"gzip, gzip", b"compress", b"\xff", b"",
                                                         b"identity", b"gzip;q=1"])))
        tags.append("encoding-other")
        return body
    if c == 9:
        headers.append((b"Content-Encoding", b"gzip"))
        tags.append("gzip-bomb")
        return _bomb()
    if c == 10:
        headers.append((b"Content-Encoding", b"gzip"))
        tags.append("gzip-twice-body")
        z = gzip.compress(body, compresslevel=1)
        return z + z  # two members: the daemon reads the first
    headers.append((b"Content-Encoding", b"gzip"))
    headers.append((b"Content-Encoding", b"identity"))
    tags.append("gzip-dup-header")
    return gzip.compress(body, compresslevel=1)


def _mutate_headers(req: Req, rng: Random) -> None:
    """Header mutations that keep the request's framing (safe on a kept-alive connection) or,
    when they break the header syntax, move the request to its own connection."""
    h = req.headers
    c = rng.randrange(16)

    def drop(name: bytes) -> None:
        h[:] = [(k, v) for k, v in h if k.lower() != name.lower()]

    def replace(name: bytes, value: bytes) -> None:
        drop(name)
        h.append((name, value))

    if c == 0:
        drop(b"X-Amz-Target")
        req.tags.append("target-missing")
    elif c == 1:
        replace(b"X-Amz-Target", rng.choice([b"", b"Firehose_20150804.", b"Firehose_20150805.PutRecord",
                                             b"firehose_20150804.PutRecord", b"Firehose_20150804.putrecord",
                                             b"PutRecord", b"Firehose_20150804.PutRecord ", b" Firehose_20150804.PutRecord",
                                             b"Firehose_20150804.PutRecordBatchX", b"Firehose_20150804.CreateDeliveryStream",
                                             b"Firehose_20150804.DeleteDeliveryStream", b"Firehose_20150804.__init__",
                                             b"Firehose_20150804.ops", b"Firehose_20150804.PutRecord\x00",
                                             b"Firehose_20150804.P\xc3\xa9", b"Firehose_20150804.\xff\xfe",
                                             b"Firehose_20150804." + b"A" * 4000,
                                             (TARGET + rng.choice(OPS)).encode()]))
        req.tags.append("target-value")
    elif c == 2:
        h.insert(rng.randrange(1, len(h) + 1), (b"X-Amz-Target", (TARGET + rng.choice(OPS)).encode()))
        req.tags.append("target-dup")
    elif c == 3:
        drop(b"Content-Type")
        req.tags.append("ct-missing")
    elif c == 4:
        replace(b"Content-Type", rng.choice([b"application/json", b"text/plain", b"application/x-amz-json-1.0",
                                             b"application/x-amz-json-1.1; charset=latin-1", b"multipart/form-data; boundary=x",
                                             b"application/x-www-form-urlencoded", b"\xff", b"a" * 3000]))
        req.tags.append("ct-value")
    elif c == 5:
        h.append((b"Expect", b"100-continue"))
        req.tags.append("expect-continue")
    elif c == 6:
        for k in range(rng.choice([10, 50, 90])):
            h.append((f"X-Fuzz-{k}".encode(), b"v" * rng.randrange(0, 40)))
        req.tags.append("many-headers")
    elif c == 7:
        h.append((b"X-Amzn-Trace-Id", b"Root=1-" + b"a" * rng.randrange(10, 200)))
        h.append((b"User-Agent", "fuzz/1.0 é".encode()))
        req.tags.append("extra-headers")
    elif c == 8:
        # Broken header syntax: the daemon answers 400 and closes; own connection.
        bad = rng.choice([(b"X-Bad Name", b"v"), (b"X-Bad\x00", b"v"), (b"X-Nul", b"a\x00b"),
                          (b"", b"no-name"), (b"X-Long", b"v" * 9000), (b"X-Ctl", b"a\x01\x7fb"),
                          (b"X-Fold", b"a\r\n\tfolded"), (b"X-CR", b"a\rb"), (b"X-LF", b"a\nb"),
                          (b"Host", b"other.example"), (b":authority", b"x"), (b"X-Hi", b"\x80\xff")])
        h.insert(rng.randrange(1, len(h) + 1), bad)
        req.tags.append("header-syntax")
        req.fresh = True
        req.wellformed = False
    elif c == 9:
        for k in range(rng.choice([150, 300, 2000])):
            h.append((f"X-Many-{k}".encode(), b"v"))
        req.tags.append("too-many-headers")
        req.fresh = True
        req.wellformed = False
    elif c == 10:
        h.append((b"Connection", rng.choice([b"close", b"keep-alive", b"upgrade", b"Close, TE"])))
        req.tags.append("connection")
    elif c == 11:
        h.append((b"Upgrade", rng.choice([b"websocket", b"h2c"])))
        h.append((b"Connection", b"Upgrade"))
        req.tags.append("upgrade")
        req.fresh = True
        req.wellformed = False
    elif c == 12:
        h[:] = [(k.upper() if rng.random() < 0.5 else k.lower(), v) for k, v in h]
        req.tags.append("header-case")
    elif c == 13:
        h[:] = [(k, b"  " + v + b" \t") for k, v in h]
        req.tags.append("header-ows")
    elif c == 14:
        replace(b"Content-Type", JSON_CT.encode())
        h.append((b"Content-Type", b"text/plain"))
        req.tags.append("ct-dup")
        req.fresh = True
        req.wellformed = False  # aiohttp refuses a repeated singleton header
    else:
        h.append((b"Accept-Encoding", b"gzip, br"))
        h.append((b"X-Amz-Date", b"20000101T000000Z"))
        req.tags.append("accept-encoding")


def _chunked(body: bytes, rng: Random, broken: bool, tags: list[str]) -> tuple[bytes, bool]:
    """(wire body, stalls): the body in random chunks; ``broken`` damages the framing."""
    out = bytearray()
    pos = 0
    while pos < len(body):
        n = rng.randrange(1, max(2, min(len(body) - pos, 4096) + 1))
        ext = b";ext=1" if rng.random() < 0.1 else b""
        out += b"%x%s\r\n" % (n, ext) + body[pos : pos + n] + b"\r\n"
        pos += n
    out += b"0\r\n" + (b"X-Trailer: 1\r\n" if rng.random() < 0.1 else b"") + b"\r\n"
    if not broken:
        tags.append("chunked")
        return bytes(out), False
    c = rng.randrange(6)
    tags.append(f"chunked-broken{c}")
    if c == 0:
        return b"zz\r\n" + bytes(out), False
    if c == 1:
        return bytes(out[:-5]), True  # no last chunk: the daemon waits for it
    if c == 2:
        return b"%x\r\n" % (len(body) + 5) + body + b"\r\n0\r\n\r\n", True
    if c == 3:
        return bytes(out).replace(b"\r\n", b"\n"), False
    if c == 4:
        return b"-1\r\n" + bytes(out), False
    return b"ffffffffffffffffffff\r\n" + bytes(out), False


def _framing(req: Req, rng: Random) -> bytes:
    """Mutate how the body is delimited (own connection); returns the body bytes on the wire."""
    h = req.headers
    h[:] = [(k, v) for k, v in h if k.lower() != b"content-length"]
    body = req.body
    was_wellformed = req.wellformed
    req.fresh = True
    req.wellformed = False
    c = rng.randrange(14)
    if c == 0 and body:
        n = rng.randrange(0, len(body))
        h.append((b"Content-Length", b"%d" % n))
        req.visible = body[:n]
        req.tags.append("cl-short")
        return body
    if c in (1, 2):
        h.append((b"Content-Length", b"%d" % (len(body) + rng.randrange(1, 200))))
        req.tags.append("cl-long")
        req.visible = None
        if rng.random() < 0.97:
            req.halfclose = True
        else:
            req.stall = True
        return body
    if c == 3:
        req.tags.append("cl-absent")
        req.visible = b""
        return body
    if c == 4:
        h.append((b"Content-Length", rng.choice([b"99999999999999999999999", b"17000000", b"16777217", b"4294967296"])))
        req.tags.append("cl-huge")
        req.visible = None
        req.halfclose = rng.random() < 0.5
        return body
    if c == 5:
        h.append((b"Content-Length", rng.choice([b"-1", b"abc", b"+5", b"0x10", b" ", b"1 2", b"1.0", b"\xff", b"%d " % len(body)])))
        req.tags.append("cl-invalid")
        req.visible = body  # what aiohttp takes (" 197 ") delimits the body as sent
        return body
    if c == 6:
        h.append((b"Content-Length", b"%d" % len(body)))
        h.append((b"Content-Length", b"%d" % (len(body) + rng.choice([0, 1]))))
        req.tags.append("cl-dup")
        req.visible = None
        return body
    if c in (7, 8):
        h.append((b"Transfer-Encoding", b"chunked"))
        wire, waits = _chunked(body, rng, broken=c == 8, tags=req.tags)
        if waits:  # the daemon waits for the rest: usually cut it short, now and then wait for the deadline
            req.halfclose = rng.random() < 0.97
            req.stall = not req.halfclose
        req.visible = body if c == 7 else None
        req.wellformed = was_wellformed and c == 7
        return wire
    if c == 9:
        h.append((b"Transfer-Encoding", b"chunked"))
        h.append((b"Content-Length", b"%d" % len(body)))
        wire, _ = _chunked(body, rng, broken=False, tags=req.tags)
        req.tags.append("te-and-cl")
        req.visible = None
        return wire
    if c == 10:
        h.append((b"Transfer-Encoding", rng.choice([b"gzip, chunked", b"chunked, gzip", b"identity", b"gzip", b"chunked\x00",
                                                     b"CHUNKED", b"chunked, chunked", b"xchunked"])))
        h.append((b"Content-Length", b"%d" % len(body)))
        req.tags.append("te-other")
        req.visible = None
        return body
    if c == 11:
        req.method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "post", "TRACE", "CONNECT", "P\xd3ST", "X" * 100])
        h.append((b"Content-Length", b"%d" % len(body)))
        req.tags.append(f"method-{req.method[:8]}")
        req.visible = None
        return body
    if c == 12:
        req.path = rng.choice(["/x", "//", "/?a=b", "/?Action=PutRecord", "/%00", "*", "http://127.0.0.1/",
                               "/" + "a" * 9000, "/healthz", "/metrics/../", "/\xff", "", "/ /"])
        h.append((b"Content-Length", b"%d" % len(body)))
        req.tags.append("path")
        req.visible = body  # if a path is routed to the API at all, Content-Length delimits it
        return body
    req.version = rng.choice(["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.2", "HTTP/1.1 x", "http/1.1", "HTTP/11", ""])
    h.append((b"Content-Length", b"%d" % len(body)))
    req.tags.append(f"version-{req.version[:10]}")
    req.visible = body  # if the daemon takes the request at all, Content-Length delimits it
    return body


def _assemble(req: Req, wire_body: bytes, port: int) -> None:
    line = f"{req.method} {req.path} {req.version}".rstrip().encode("latin-1", "replace") + b"\r\n"
    head = b"".join(k + b": " + v + b"\r\n" if k or v else b"\r\n" for k, v in req.headers)
    req.wire = line + head + b"\r\n" + wire_body


class Generator:
    """Builds request ``i`` of a run from the seed alone."""

    def __init__(self, seed: int, run: str, port: int, auth: bool) -> None:
        self.seed, self.run, self.port, self.auth = seed, run, port, auth

    def make(self, index: int) -> Req:
        rng = Random(f"{self.seed}:{self.run}:{index}")
        r = rng.random()
        if r < 0.005:
            return self._garbage(rng, index)
        if r < 0.025:
            return self._operator(rng, index)
        op = rng.choices(OPS, weights=[28, 30, 8, 8, 6, 6, 6])[0]
        req = Req(self.run, index, op)
        doc: Any = _seed_doc(op, rng, req.markers)
        if not all(k == "DeliveryStreamName" and v == STREAM or k != "DeliveryStreamName" for k, v in doc):
            req.clean = False
        clean = rng.random() < (0.25 if op.startswith("Put") else 0.08)
        if not clean and rng.random() < 0.5:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                doc = _mutate_json(doc, rng, req.markers, req.tags)
        body = dumps(doc, ascii_only=rng.random() < 0.7)
        headers: list[tuple[bytes, bytes]] = [(b"Host", f"127.0.0.1:{self.port}".encode())]
        headers += [(b"Content-Type", JSON_CT.encode()), (b"X-Amz-Target", (TARGET + op).encode())]
        if not clean and rng.random() < 0.25:
            body = _mutate_bytes(body, rng, req.tags)
        if not clean and rng.random() < 0.12:
            body = _encode(body, rng, headers, req.tags)
        elif clean and rng.random() < 0.05:
            headers.append((b"Content-Encoding", b"gzip"))
            body = gzip.compress(body, compresslevel=1)
            req.tags.append("clean-gzip")
        req.body = body
        req.visible = body
        req.headers = headers
        if self.auth:
            self._sign(req)
        if not clean and rng.random() < 0.25:
            _mutate_headers(req, rng)
            if self.auth:
                req.forged = None  # it may or may not have changed what was signed
        if self.auth and not clean and rng.random() < 0.6:
            self._mutate_signature(req, rng)
        if not clean and rng.random() < 0.08:
            wire_body = _framing(req, rng)
        else:
            req.headers.insert(1, (b"Content-Length", b"%d" % len(req.body)))
            wire_body = req.body
        if any(_CONTROL.search(v) for _k, v in req.headers):
            req.fresh, req.wellformed = True, False  # a control character: aiohttp refuses the request
        if rng.random() < 0.04:
            req.fresh = True
        if req.fresh:
            req.headers.append((b"Connection", b"close"))
        req.clean = req.clean and not [t for t in req.tags if t != "clean-gzip"]
        if req.clean and self.auth:
            req.forged = False
        _assemble(req, wire_body, self.port)
        return req

    def _garbage(self, rng: Random, index: int) -> Req:
        req = Req(self.run, index, "garbage", tags=["raw-garbage"], fresh=True, wellformed=False, clean=False)
        c = rng.randrange(5)
        if c == 0:
            req.wire = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif c == 1:
            req.wire = b"POST / HTTP/1.1\r\n" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n"
        elif c == 2:  # headers never finished: the header deadline closes it (or we cut it)
            req.wire = f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nX-Amz-Target: {TARGET}PutRecord\r\n".encode()
            req.halfclose = rng.random() < 0.97
            req.stall = not req.halfclose
        elif c == 3:
            req.wire = b"\r\n" * rng.randrange(1, 50) + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        else:
            req.wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(rng.randrange(256) for _ in range(30))
        req.tags.append(f"garbage{c}")
        req.visible = None
        return req

    def _operator(self, rng: Random, index: int) -> Req:
        """GET /healthz (?detail=1) or /metrics, with no, a bearer or a SigV4 Authorization."""
        req = Req(self.run, index, "operator", clean=False, visible=None)
        req.method = rng.choice(["GET", "GET", "GET", "HEAD", "POST"])
        req.path = rng.choice(["/healthz", "/healthz?detail=1", "/healthz?detail=0", "/healthz?detail=true&x=%ff",
                               "/healthz?detail=1&detail=0", "/metrics", "/metrics?x=1", "/healthz/"])
        headers = [(b"Host", f"127.0.0.1:{self.port}".encode())]
        c = rng.randrange(7)
        if c == 1:
            headers.append((b"Authorization", b"Bearer " + OPERATOR_TOKEN.encode()))
        elif c == 2:
            headers.append((b"Authorization", rng.choice([b"Bearer ", b"Bearer x", b"Bearer " + OPERATOR_TOKEN.encode()[:-1],
                                                          b"Bearer " + OPERATOR_TOKEN.encode() + b"\xff", b"bearer " +
                                                          OPERATOR_TOKEN.encode(), b"Bearer \xff\xfe", b"Basic eDp5"])))
        elif c >= 3:
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
            from botocore.credentials import Credentials

            extra = {"X-Fuzz": rng.choice(["a", "\xff", "é", "a  b"])} if rng.random() < 0.5 else {}
            aws = AWSRequest(method=req.method, url=f"http://127.0.0.1:{self.port}{req.path}", headers=extra)
            SigV4Auth(Credentials(KEY, SECRET), "firehose", "us-east-1").add_auth(aws)
            for k, v in aws.headers.items():
                headers.append((k.encode(), v.encode("latin-1")))
            req.tags.append("signed-get" + ("-" + extra["X-Fuzz"].encode("unicode_escape").decode() if extra else ""))
            if c >= 5:  # and then damaged
                i = next(j for j, (k, _v) in enumerate(headers) if k == b"Authorization")
                v = bytearray(headers[i][1])
                v[rng.randrange(len(v))] = rng.choice(b"0123456789abcdef\xff ,=/")
                headers[i] = (b"Authorization", bytes(v))
                req.tags.append("damaged")
        req.tags.insert(0, f"operator-{req.method}-{c}")
        req.headers = headers
        if req.method == "POST":
            req.headers.append((b"Content-Length", b"0"))
        if any(_CONTROL.search(v) for _k, v in req.headers):
            req.fresh, req.wellformed = True, False
        _assemble(req, b"", self.port)
        return req

    # -------------------------------------------------------------- SigV4
    def _sign(self, req: Req) -> None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        hdrs = {k.decode(): v.decode("latin-1") for k, v in req.headers if k.lower() != b"host"}
        aws = AWSRequest(method="POST", url=f"http://127.0.0.1:{self.port}/", data=req.body, headers=hdrs)
        SigV4Auth(Credentials(KEY, SECRET), "firehose", "us-east-1").add_auth(aws)
        req.headers = [req.headers[0]] + [(k.encode(), v.encode("latin-1")) for k, v in aws.headers.items()]
        req.signed_target = (TARGET + req.op).encode()
        req.forged = False

    def _mutate_signature(self, req: Req, rng: Random) -> None:
        h = req.headers
        auth_i = next((i for i, (k, _v) in enumerate(h) if k.lower() == b"authorization"), None)
        date_i = next((i for i, (k, _v) in enumerate(h) if k.lower() == b"x-amz-date"), None)
        if auth_i is None or date_i is None:  # a header mutation took them away
            req.forged = True
            return
        auth = h[auth_i][1]
        before = (list(h), req.body)
        c = rng.randrange(15)
        forged = True
        if c == 0:
            signed_body = req.body
            req.body = _mutate_bytes(req.body, rng, req.tags)  # the body no longer matches the signature
            req.visible = req.body
            forged = True if req.body != signed_body else None
        elif c == 1:
            sig_at = auth.rindex(b"Signature=") + 10 + rng.randrange(64)
            new = rng.choice(b"0123456789abcdef".replace(auth[sig_at:sig_at + 1], b""))
            h[auth_i] = (h[auth_i][0], auth[:sig_at] + bytes([new]) + auth[sig_at + 1:])
            req.tags.append("sig-char")
        elif c == 2:
            del h[auth_i]
            req.tags.append("sig-missing")
        elif c == 3:
            h[auth_i] = (h[auth_i][0], rng.choice([b"", b"AWS4-HMAC-SHA256", b"Bearer x", auth[: rng.randrange(len(auth))],
                                                   auth.replace(b"AWS4-HMAC-SHA256", b"AWS4-HMAC-SHA1"),
                                                   auth.replace(b"Credential=", b"Credential= "), auth + b",",
                                                   auth.upper(), auth.replace(b", ", b","), auth + b"\x00"]))
            forged = None  # some of these are the same signature, spelled otherwise
            req.tags.append("sig-garbled")
        elif c == 4:
            repl = rng.choice([(KEY.encode(), b"AKIDOTHER"), (b"/us-east-1/", b"/eu-west-1/"), (b"/firehose/", b"/s3/"),
                               (b"/aws4_request", b"/aws4_requesx"), (b"/us-east-1/", b"/")])
            h[auth_i] = (h[auth_i][0], auth.replace(*repl))
            req.tags.append("sig-credential")
        elif c == 5:
            m = re.search(rb"SignedHeaders=([^,]+)", auth)
            assert m is not None
            names = m.group(1).split(b";")
            choice = rng.randrange(3)
            if choice == 0:
                names = [n for n in names if n != b"host"]
            elif choice == 1:
                names.append(b"x-not-sent")
            else:
                rng.shuffle(names)
            h[auth_i] = (h[auth_i][0], auth[: m.start(1)] + b";".join(names) + auth[m.end(1):])
            forged = None if choice == 2 and names == sorted(names) else True
            req.tags.append("sig-signedheaders")
        elif c == 6:
            d = h[date_i][1].strip()
            h[date_i] = (h[date_i][0], rng.choice([b"", b"garbage", d[:-1], d.replace(b"T", b" "), b"20000101T000000Z",
                                                   b"29990101T000000Z", d[:-3] + (b"00" if d[-3:-1] != b"00" else b"01") + b"Z"]))
            forged = True if h[date_i][1].strip() != d else None
            req.tags.append("sig-date")
        elif c == 7:
            del h[date_i]
            req.tags.append("sig-date-missing")
        elif c == 8:
            for i, (k, v) in enumerate(h):
                if k.lower() == b"x-amz-target":
                    ops = [op for op in OPS if (TARGET + op).encode() not in (v.strip(), req.signed_target)]
                    h[i] = (k, (TARGET + rng.choice(ops)).encode())
            req.tags.append("sig-target-swapped")
        elif c == 9:
            for i, (k, _v) in enumerate(h):
                if k.lower() == b"content-type":
                    h[i] = (k, b"application/json")
            req.tags.append("sig-ct-changed")
        elif c == 10:
            import hashlib

            digest = hashlib.sha256(req.body).hexdigest().encode()
            val = rng.choice([digest, b"UNSIGNED-PAYLOAD", b"STREAMING-AWS4-HMAC-SHA256-PAYLOAD", digest[::-1], digest.upper()])
            h.append((b"X-Amz-Content-SHA256", val))
            forged = None if val in (digest, digest.upper()) else True
            req.tags.append("sig-content-sha256")
        elif c == 11:
            h.append((b"Authorization", auth))
            req.tags.append("sig-dup")
        elif c == 12:
            i = next(j for j, (k, _v) in enumerate(h) if k.lower() == b"host")
            h[i] = (h[i][0], rng.choice([b"localhost", b"127.0.0.1", b"127.0.0.1:1", b""]))
            req.tags.append("sig-host")
        elif c == 13:
            h.append((b"X-Unsigned", b"anything"))
            forged = None  # an unsigned header: the signature still holds
            req.tags.append("sig-unsigned-header")
        else:
            req.body = req.body + b" "
            req.visible = req.body
            req.tags.append("sig-body-space")
        req.forged = forged if (list(h), req.body) != before else None


# ====================================================================== the wire
@dataclass
class Resp:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    version: str
    keepalive: bool


class ProtocolFailure(Exception):
    pass


class Conn:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.used = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(1 << 18)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, head_request: bool = False) -> Resp | None:
        """The next final response (1xx skipped); None on end of stream before any byte."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._fill():
                    if self.buf:
                        raise ProtocolFailure(f"connection closed inside a response head: {self.buf[:200]!r}")
                    return None
            end = self.buf.index(b"\r\n\r\n")
            lines = self.buf[:end].split(b"\r\n")
            self.buf = self.buf[end + 4:]
            status_line = lines[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ProtocolFailure(f"not an HTTP status line: {status_line[:200]!r}")
            status = int(parts[1])
            headers: dict[str, list[str]] = {}
            for line in lines[1:]:
                k, _, v = line.decode("latin-1").partition(":")
                headers.setdefault(k.strip().lower(), []).append(v.strip())
            if 100 <= status < 200:
                continue
            body = self._read_body(headers, status, head_request)
            conn_hdr = ",".join(headers.get("connection", [])).lower()
            keepalive = parts[0] == "HTTP/1.1" and "close" not in conn_hdr
            return Resp(status, headers, body, parts[0], keepalive)

    def _read_body(self, headers: dict[str, list[str]], status: int, head_request: bool) -> bytes:
        if head_request or status in (204, 304):
            return b""
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            out = bytearray()
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise ProtocolFailure("connection closed inside a chunked response")
                line, self.buf = self.buf.split(b"\r\n", 1)
                n = int(line.split(b";")[0], 16)
                while len(self.buf) < n + 2:
                    if not self._fill():
                        raise ProtocolFailure("connection closed inside a chunk")
                out += self.buf[:n]
                self.buf = self.buf[n + 2:]
                if n == 0:
                    return bytes(out)
        if "content-length" in headers:
            n = int(headers["content-length"][0])
            while len(self.buf) < n:
                if not self._fill():
                    raise ProtocolFailure(f"connection closed inside a body ({len(self.buf)} of {n} bytes)")
            body, self.buf = self.buf[:n], self.buf[n:]
            return body
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return body


# ====================================================================== the delivery model
def _inflate(data: bytes, encoding: str) -> bytes:
    """What the daemon's Content-Encoding step makes of a body (the daemon caps it the same way)."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return data
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise ValueError("encoding")
    wbits = 31 if enc != "deflate" else (15 if data[:1] == b"\x78" else -15)
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, (16 << 20) + 1)
    if len(out) > 16 << 20 or d.unconsumed_tail or not d.eof:
        raise ValueError("size")
    return out


def model_records(req: Req, shape: str) -> list[bytes]:
    """The records the daemon took from this request, decoded independently from the bytes it
    saw (``shape``: ``single`` for PutRecord, ``batch`` for PutRecordBatch). Raises when the
    request should not have been accepted."""
    if req.visible is None:
        raise ValueError("the body the daemon saw is not known")
    doc = orjson.loads(_inflate(req.visible, req.header("Content-Encoding") or "")) if req.visible else {}
    if not isinstance(doc, dict) or doc.get("DeliveryStreamName") != STREAM:
        raise ValueError("not a put to the stream")
    datas = [doc["Record"]["Data"]] if shape == "single" else [r["Data"] for r in doc["Records"]]
    if not 1 <= len(datas) <= 500:
        raise ValueError(f"{len(datas)} records")
    out = [base64.b64decode(d.encode("ascii"), validate=True) for d in datas]
    if any(len(r) > MAX_RECORD for r in out):
        raise ValueError("a record over 1,024,000 bytes")
    if shape == "batch" and sum(map(len, out)) > 4 << 20:
        raise ValueError("over 4 MiB")
    return out


def _maybe_records(req: Req) -> list[bytes]:
    """Records a request might have put, whatever its answer (for requests left unanswered)."""
    for shape in ("single", "batch"):
        try:
            return model_records(req, shape)
        except Exception:  # anything the daemon would refuse
            continue
    return []


# ====================================================================== the API run
def violation_kind(text: str) -> str:
    """A violation without its particulars (numbers, bytes, paths), to count alike ones."""
    line = text.split("\n", 1)[0]
    line = re.sub(r"^frame case \d+ \(seed \d+, base \d+\): ", "", line)
    line = re.sub(r"b'.*|b\".*|/\S+|\b[0-9a-f]{32}\b|\d+", "#", line)
    return line[:110]


@dataclass
class Stats:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    acked: Counter[str] = field(default_factory=Counter)  # marker -> times acknowledged
    indeterminate: Counter[str] = field(default_factory=Counter)  # marker -> times possibly put, unanswered
    unacked: set[str] = field(default_factory=set)
    kinds: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violation_count += 1
            self.kinds[violation_kind(text)] += 1
            if len(self.violations) < 2000:
                self.violations.append(text)


def _check_response(req: Req, resp: Resp, stats: Stats) -> None:
    ctype = ",".join(resp.headers.get("content-type", []))
    code = "-"
    doc: Any = None
    if "json" in ctype and req.method != "HEAD":
        try:
            doc = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            stats.violation(f"{resp.status} with a JSON content type but a body that is not JSON: {resp.body[:200]!r}\n  {req.describe()}")
            return
        if not isinstance(doc, dict):
            stats.violation(f"{resp.status}: JSON body is not an object: {resp.body[:200]!r}\n  {req.describe()}")
            return
        if resp.status >= 400:
            code = doc.get("__type")
            if not isinstance(code, str) or not code or not isinstance(doc.get("message"), str):
                stats.violation(f"{resp.status}: error without __type/message: {resp.body[:200]!r}\n  {req.describe()}")
    with stats.lock:
        stats.statuses[f"{resp.status} {code}"] += 1
    if resp.status not in ALLOWED:
        stats.violation(f"status {resp.status} ({code}): {resp.body[:300]!r}\n  {req.describe()}")
        return
    if resp.status == 503 and not req.path.startswith("/healthz") and (doc is None or doc.get("__type") != "ServiceUnavailableException"):
        stats.violation(f"503 without ServiceUnavailableException: {resp.body[:200]!r}\n  {req.describe()}")
    if resp.status >= 400 and doc is None and req.wellformed and req.method == "POST" and req.path == "/":
        stats.violation(f"{resp.status} for a well-formed POST / without Firehose's error body: {resp.body[:200]!r}\n  {req.describe()}")
    if req.clean and resp.status not in (200, 503) and code != "LimitExceededException":
        # (Mutated TagDeliveryStream requests add keys of their own: the 50-tag limit is real.)
        stats.violation(f"a valid request was refused: {resp.status} {resp.body[:200]!r}\n  {req.describe()}")
    if req.forged and resp.status == 200:
        stats.violation(f"a request whose signature does not cover what was sent was accepted\n  {req.describe()}")


def _account(req: Req, resp: Resp | None, stats: Stats, closed_by_client: bool) -> None:
    """Which markers this request acknowledged (or may have put without an answer)."""
    if resp is not None and resp.status == 200 and req.method == "POST":
        try:
            doc = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            doc = None
        shape = ("single" if isinstance(doc, dict) and "RecordId" in doc else
                 "batch" if isinstance(doc, dict) and "RequestResponses" in doc else None)
        if shape is not None:
            try:
                records = model_records(req, shape)
            except Exception as exc:
                stats.violation(f"200 for a put the model says is not acceptable ({type(exc).__name__}: {exc})\n  {req.describe()}")
                records = _maybe_records(req)
                with stats.lock:
                    for r in records:
                        for m in MARKER_RE.findall(r):
                            stats.indeterminate[m.decode()] += 1
                    for m in req.markers:
                        stats.indeterminate[m] = max(stats.indeterminate[m], 1)
                return
            if shape == "batch":
                entries = doc["RequestResponses"]
                if len(entries) != len(records) or doc.get("FailedPutCount") != sum(1 for e in entries if "ErrorCode" in e):
                    stats.violation(f"PutRecordBatch answer does not match the request ({len(entries)} entries for "
                                    f"{len(records)} records)\n  {req.describe()}")
                    return
                ok = [r for r, e in zip(records, entries, strict=True) if e.get("RecordId") and not e.get("ErrorCode")]
                bad = [r for r, e in zip(records, entries, strict=True) if not (e.get("RecordId") and not e.get("ErrorCode"))]
            else:
                if not isinstance(doc.get("RecordId"), str) or not doc["RecordId"]:
                    stats.violation(f"PutRecord 200 without a RecordId: {resp.body[:200]!r}\n  {req.describe()}")
                ok, bad = records, []
            with stats.lock:
                for r in ok:
                    for m in MARKER_RE.findall(r):
                        stats.acked[m.decode()] += 1
                for r in bad:
                    for m in MARKER_RE.findall(r):
                        stats.unacked.add(m.decode())
            return
    if resp is None and closed_by_client:
        with stats.lock:
            for r in _maybe_records(req):
                for m in MARKER_RE.findall(r):
                    stats.indeterminate[m.decode()] += 1
            for m in req.markers:
                stats.indeterminate[m] = max(stats.indeterminate[m], 1)
        return
    with stats.lock:
        stats.unacked.update(req.markers)


def _send(req: Req, conn: Conn | None, port: int, stats: Stats) -> Conn | None:
    """Send one request and check what comes back; returns the connection to reuse (or None)."""
    use = Conn(port, HANG_SECS) if req.fresh or conn is None else conn
    t0 = time.monotonic()
    send_error = None
    try:
        use.sock.sendall(req.wire)
        if req.halfclose:
            use.sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        send_error = exc
    use.used += 1
    responses: list[Resp] = []
    outcome = None
    try:
        first = use.read_response(head_request=req.method == "HEAD")
        if first is not None:
            responses.append(first)
            if req.fresh:
                # Read whatever else the daemon says on this connection (answers to pipelined
                # garbage). It may keep the connection a while after answering (aiohttp lingers
                # up to 10 s for an unread body): only what arrives promptly is read.
                use.sock.settimeout(0.3)
                try:
                    while True:
                        more = use.read_response(head_request=False)
                        if more is None:
                            break
                        responses.append(more)
                except (TimeoutError, ProtocolFailure, ConnectionResetError):
                    pass
        elif req.halfclose or send_error is not None:
            outcome = "closed-after-client-shutdown"
        elif req.stall:
            outcome = "closed-at-deadline"
        else:
            outcome = "closed-without-answer"
    except TimeoutError:
        waited = time.monotonic() - t0
        stats.violation(f"no answer within {waited:.0f} s (hang)\n  {req.describe()}")
        outcome = "hang"
    except ConnectionResetError:
        outcome = "reset-after-client-shutdown" if req.halfclose or send_error else "reset"
    except ProtocolFailure as exc:
        stats.violation(f"unparseable response: {exc}\n  {req.describe()}")
        outcome = "bad-response"
    except OSError as exc:
        outcome = f"oserror-{type(exc).__name__}"
    if outcome is not None:
        with stats.lock:
            stats.outcomes[outcome] += 1
    if responses:
        with stats.lock:
            stats.outcomes["answered"] += 1
            if req.stall and responses[0].status != 408:
                stats.outcomes["stall-answered-" + str(responses[0].status)] += 1
    for i, resp in enumerate(responses):
        if i == 0:
            _check_response(req, resp, stats)
        elif resp.status not in ALLOWED or resp.status == 200:
            stats.violation(f"a later answer on the connection was {resp.status}: {resp.body[:200]!r}\n  {req.describe()}")
    if req.stall and (time.monotonic() - t0) > HANG_SECS:
        stats.violation(f"stalled request held for {time.monotonic() - t0:.0f} s\n  {req.describe()}")
    client_cut = req.halfclose or send_error is not None
    _account(req, responses[0] if responses else None, stats, client_cut)
    with stats.lock:
        stats.sent += 1
    if req.fresh:
        use.close()
        return conn
    if not responses or not responses[0].keepalive or use.eof or use.buf or outcome is not None:
        use.close()
        return None
    return use


@dataclass
class ApiResult:
    run: str
    requests: int
    seconds: float
    stats: Stats
    delivered: int = 0
    delivery: str = ""
    log_errors: Counter[str] = field(default_factory=Counter)
    log_noise: Counter[str] = field(default_factory=Counter)


def run_api(seed: int, requests: int, workdir: Path, *, auth: bool = False, workers: int = 8,
            max_seconds: float | None = None, progress: Callable[[str], None] | None = None,
            first: int = 0) -> ApiResult:
    """One daemon, fuzzed requests ``first`` to ``first + requests - 1``, then the delivery check.
    Violations are in ``result.stats``."""
    run = "auth" if auth else "api"
    tmp = workdir / run
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = daemon_config(tmp, [stream_config(STREAM, {"type": "local", "path": str(tmp / "out")})])
    cfg["api"]["limits"] = LIMITS
    cfg["shutdown_timeout_secs"] = 120
    if auth:
        cfg["api"]["auth"] = {"mode": "sigv4", "credentials": {KEY: SECRET}}
        from firehose.config import ApiConfig

        if "operator_tokens" in ApiConfig.model_fields:
            cfg["api"]["operator_tokens"] = [OPERATOR_TOKEN]
    daemon = Daemon(tmp, cfg, env={"FIREHOSE_LOG_FORMAT": "json"}).start()
    stats = Stats()
    gen = Generator(seed, run, daemon.port, auth)
    counter = itertools.count(first)
    deadline = time.monotonic() + max_seconds if max_seconds else None
    stop = threading.Event()

    def worker() -> None:
        conn: Conn | None = None
        while not stop.is_set():
            i = next(counter)
            if i >= first + requests or (deadline is not None and time.monotonic() > deadline):
                break
            try:
                req = gen.make(i)
            except Exception as exc:
                stats.violation(f"fuzzer error making run={run} index={i}: {type(exc).__name__}: {exc}")
                continue
            try:
                conn = _send(req, conn, daemon.port, stats)
            except OSError as exc:  # connecting failed: the daemon is gone or refusing
                stats.violation(f"could not connect: {exc}\n  {req.describe()}")
                conn = None
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    stop.set()
            except Exception as exc:  # a bug of the fuzzer: report it with the input
                stats.violation(f"fuzzer error {type(exc).__name__}: {exc}\n  {req.describe()}")
                conn = None
        if conn is not None:
            conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"fuzz-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    last = t0
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(1.0)
        if progress and time.monotonic() - last > 10:
            last = time.monotonic()
            progress(f"  {run}: {stats.sent} requests, {stats.sent / (last - t0):.0f}/s, {stats.violation_count} violations")
    seconds = time.monotonic() - t0
    result = ApiResult(run, stats.sent, seconds, stats)
    # The daemon must be alive and answer /healthz.
    alive = daemon.proc is not None and daemon.proc.poll() is None
    if not alive:
        stats.violation(f"the daemon exited during the run (code {daemon.proc.returncode if daemon.proc else None})")
    else:
        try:
            from support import wait_http

            wait_http("127.0.0.1", daemon.port, "/healthz", timeout=10)
        except TimeoutError as exc:
            stats.violation(f"/healthz does not answer 200 after the run: {exc}")
    rc = daemon.stop(timeout=150)
    if alive and rc != 0:
        stats.violation(f"the daemon exited with {rc} on SIGTERM")
    for ev in daemon.events():
        if ev.get("level") not in ("error", "critical", "exception"):
            continue
        exc = str(ev.get("exception", ""))
        if ev.get("logger") == "aiohttp.server" and ("aiohttp.http_exceptions." in exc or "ClientConnectionResetError" in exc):
            # aiohttp logs every malformed request (and a client gone mid-answer) at error, with
            # a traceback: noise an attacker controls, reported, not a failure of the daemon.
            result.log_noise[exc.rsplit("\n", 1)[-1].split(":")[0][:60] if "\n" in exc else exc[:60]] += 1
            continue
        key = f"{ev.get('event')}: {ev.get('error') or exc.strip().splitlines()[-1:] or ''}"
        result.log_errors[str(key)[:300]] += 1
    for name, n in result.log_errors.items():
        stats.violation(f"daemon logged an error x{n}: {name} (see {daemon.log_path})")
    _check_delivery(result, tmp / "out")
    return result


def _check_delivery(result: ApiResult, out: Path) -> None:
    stats = result.stats
    delivered: Counter[str] = Counter()
    for _key, data in local_objects(out).items():
        for m in MARKER_RE.findall(data):
            delivered[m.decode()] += 1
    result.delivered = sum(delivered.values())
    problems = 0
    for m, n in delivered.items():
        want = stats.acked.get(m, 0)
        if want:
            if n != want:
                problems += 1
                stats.violation(f"marker {m} acknowledged {want}x, delivered {n}x")
        elif m in stats.indeterminate:
            if n > stats.indeterminate[m]:
                problems += 1
                stats.violation(f"marker {m} of an unanswered request delivered {n}x")
        else:
            problems += 1
            where = "refused" if m in stats.unacked else "never sent"
            stats.violation(f"marker {m} delivered {n}x but never acknowledged ({where})")
    missing = [m for m in stats.acked if m not in delivered]
    for m in missing[:20]:
        stats.violation(f"marker {m} acknowledged {stats.acked[m]}x, never delivered")
    if len(missing) > 20:
        stats.violation(f"... and {len(missing) - 20} more acknowledged markers never delivered")
    problems += len(missing)
    unanswered_delivered = sum(1 for m in stats.indeterminate if m in delivered and m not in stats.acked)
    result.delivery = (f"{sum(stats.acked.values())} acknowledged, {result.delivered} delivered, "
                       f"{problems} mismatches; {unanswered_delivered} of {len(stats.indeterminate)} markers of "
                       f"client-cut requests delivered")


# ====================================================================== spool frames
def _frame(ftype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((ftype,))))
    return struct.pack(">IIB", len(payload), crc, ftype) + payload


def _records_frame(first_seq: int, records: list[bytes]) -> bytes:
    payload = struct.pack(">QQIH", first_seq, 1, len(records), 0) + b"".join(struct.pack("<I", len(r)) for r in records)
    return _frame(1, payload + b"".join(records))


@dataclass
class FrameInfo:
    segment: str
    offset: int
    end: int
    ftype: int
    first_seq: int = 0
    count: int = 0


@dataclass
class BaseSpool:
    path: Path
    written: dict[int, bytes]
    acked: set[int]
    committed: set[int]
    frames: list[FrameInfo]
    segments: list[str]


def _layout(directory: Path) -> tuple[list[str], list[FrameInfo]]:
    names = sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))
    frames = []
    for name in names:
        data = (directory / name).read_bytes()
        pos = _header_size(data)
        while pos + 9 <= len(data):
            length, _crc, ftype = struct.unpack_from(">IIB", data, pos)
            info = FrameInfo(name, pos, pos + 9 + length, ftype)
            if ftype == 1:
                info.first_seq, _a, info.count, _f = struct.unpack_from(">QQIH", data, pos + 9)
            frames.append(info)
            pos += 9 + length
    return names, frames


def _header_size(data: bytes) -> int:
    """Where a segment's first frame starts: 12 bytes, and from format version 3 on two copies of
    the segment's CRC key."""
    return 20 if len(data) >= 10 and struct.unpack_from(">H", data, 8)[0] >= 3 else 12


def _spool_record(rng: Random, embed: bool, seg_number: int, seg_size: int, seqs: list[int]) -> bytes:
    if embed and rng.random() < 0.25:
        c = rng.randrange(5)
        if c == 0:  # a DURABLE frame that looks like it covers this segment
            return b"pad" + _frame(5, struct.pack(">QQ", seg_number, max(12, seg_size - rng.randrange(0, 50))))
        if c == 1 and seqs:  # a RECORDS frame claiming an existing sequence number
            return b"p" + _records_frame(rng.choice(seqs), [b"FORGED-" + bytes([rng.randrange(256)])])
        if c == 2:
            return _frame(3, orjson.dumps({"ranges": [[0, 10**6]]}))
        if c == 3:
            return b"xx" + (_frame(2, b"{not json") if rng.random() < 0.5 else _frame(2, orjson.dumps(
                {"id": 10**6 + rng.randrange(100), "key": "FORGED", "ranges": [[0, 10**6]], "oldest": 1, "info": {}})))
        return _frame(4, orjson.dumps({"next_seq": 10**12, "next_batch_id": 1}))
    n = rng.choice([0, 1, 5, 20, 60, 150, 400])
    return bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.3 else bytes(rng.randrange(32, 127) for _ in range(n))


async def _write_spool(directory: Path, rng: Random, embed: bool) -> tuple[dict[int, bytes], set[int], set[int]]:
    from firehose.spool import SealedBatch, Spool

    sp = Spool(str(directory), fsync="always", segment_size_bytes=rng.choice([5000, 9000, 30000]),
               max_size_bytes=1 << 30, cache_bytes=1 << 20)
    sp.open()
    written: dict[int, bytes] = {}
    acked: set[int] = set()
    committed: set[int] = set()
    sealed_to = sp.next_seq
    batches: list[tuple[int, int, int]] = []
    for step in range(rng.randrange(8, 50)):
        r = rng.random()
        if r < 0.72:
            seg = sp._active
            records = [_spool_record(rng, embed, seg.number if seg else 1, seg.size if seg else 12, list(written))
                       for _ in range(rng.choice([1, 1, 2, 3, 8]))]
            first = sp.append_records(records, 1_700_000_000_000 + step)
            for j, rec in enumerate(records):
                written[first + j] = rec
            await sp.wait_durable()
            acked.update(range(first, first + len(records)))
        elif r < 0.86 and sp.next_seq > sealed_to:
            bid = sp.allocate_batch_id()
            await sp.append_seal(SealedBatch(bid, f"key-{bid}", [(sealed_to, sp.next_seq)], 1_700_000_000_000))
            batches.append((bid, sealed_to, sp.next_seq))
            sealed_to = sp.next_seq
        elif batches:
            bid, s, e = batches.pop(0)
            sp.append_commit(bid, {"n": e - s} if rng.random() < 0.5 else None)
            committed.update(range(s, e))
    await sp.wait_durable(force=True)  # the commits (not awaited above) and the unlinks they allow
    if rng.random() < 0.5:
        await sp.aclose()
        return written, acked, committed
    # An unacknowledged tail: written, never fsynced, then the process "dies".
    for step in range(rng.randrange(1, 4)):
        seg = sp._active
        records = [_spool_record(rng, embed, seg.number if seg else 1, seg.size if seg else 12, list(written))
                   for _ in range(rng.randrange(1, 4))]
        first = sp.append_records(records, 1_700_000_000_000 + 100 + step)
        for j, rec in enumerate(records):
            written[first + j] = rec
    _abandon(sp)
    return written, acked, committed


def _abandon(sp: Any) -> None:
    """Close a Spool's descriptors without fsyncing or writing anything more."""
    sp.abandon()  # first: the sync thread closes rolled-over descriptors itself
    sp._closed = True
    for fd in [*sp._to_close, sp._fd, sp._dir_fd, *sp._read_fds.values()]:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    sp._to_close, sp._fd, sp._dir_fd = [], -1, -1
    sp._read_fds.clear()


def build_base(directory: Path, seed: int, k: int) -> BaseSpool:
    rng = Random(f"{seed}:base:{k}")
    written, acked, committed = asyncio.run(_write_spool(directory, rng, embed=k % 3 == 2))
    names, frames = _layout(directory)
    return BaseSpool(directory, written, acked, committed, frames, names)


@dataclass
class Damage:
    segment: str
    offset: int  # the first byte that differs from what the spool wrote
    what: str


def _damage(case: Path, base: BaseSpool, rng: Random) -> Damage:
    names = base.segments
    seg = names[-1] if rng.random() < 0.6 else rng.choice(names)
    path = case / seg
    data = bytearray(path.read_bytes())
    frames = [f for f in base.frames if f.segment == seg]
    size = len(data)

    def at() -> int:
        """An offset: anywhere, or in a frame's header, or at its first payload bytes."""
        if frames and rng.random() < 0.6:
            f = rng.choice(frames)
            return min(size - 1, f.offset + rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 25, 30]))
        return rng.randrange(size) if size else 0

    c = rng.randrange(14)
    if c == 0 and size:
        offs = sorted(at() for _ in range(rng.randrange(1, 4)))
        for o in offs:
            data[o] ^= 1 << rng.randrange(8)
        dmg = Damage(seg, offs[0], "flip")
    elif c == 1:
        o = rng.choice([f.offset for f in frames] + [f.end - 1 for f in frames] + [at(), 0, 5, 11, 12, 15, 19, 20]) if frames else at()
        o = max(0, min(o, size))
        del data[o:]
        dmg = Damage(seg, o, "truncate")
    elif c == 2:
        o = rng.choice([f.offset for f in frames] or [_header_size(data)]) if rng.random() < 0.5 else at()
        data[o:o] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        dmg = Damage(seg, o, "insert")
    elif c == 3 and frames:  # a valid frame duplicated at a frame boundary
        f = rng.choice(frames)
        o = rng.choice([g.offset for g in frames] + [size])
        data[o:o] = data[f.offset:f.end]
        dmg = Damage(seg, o, f"duplicate-frame-type{f.ftype}")
    elif c == 4:  # garbage frame: plausible header, wrong CRC
        o = rng.choice([g.offset for g in frames] + [size])
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        garbage = struct.pack(">IIB", len(payload), rng.getrandbits(32), rng.randrange(1, 6)) + payload
        data[o:o] = garbage
        dmg = Damage(seg, o, "garbage-frame")
    elif c == 5 and size > 12:
        o = at()
        n = rng.choice([1, 4, 9, 64, 512, 4096])
        data[o:o + n] = bytes(len(data[o:o + n]))
        dmg = Damage(seg, o, f"zero{n}")
    elif c == 6:
        data += bytes(rng.choice([1, 9, 100, 4096]))
        dmg = Damage(seg, size, "zeros-appended")
    elif c == 7 and len(frames) >= 2:
        i = rng.randrange(len(frames) - 1)
        a, b = frames[i], frames[i + 1]
        data[a.offset:b.end] = data[b.offset:b.end] + data[a.offset:a.end]
        dmg = Damage(seg, a.offset, "swap-frames")
    elif c == 8 and frames:
        f = rng.choice(frames)
        del data[f.offset:f.end]
        dmg = Damage(seg, f.offset, f"drop-frame-type{f.ftype}")
    elif c == 9:
        o = rng.randrange(min(_header_size(data), size)) if size else 0
        if size:
            data[o] ^= 1 << rng.randrange(8)
        dmg = Damage(seg, o, "segment-header")
    elif c == 10 and size >= 12:
        struct.pack_into(">H", data, 8, rng.choice([0, 1, 2, 3, 4, 65535]))
        dmg = Damage(seg, 8, "format-version")
    elif c == 11 and frames:  # a frame's length field changed
        f = rng.choice(frames)
        struct.pack_into(">I", data, f.offset, rng.choice([0, 1, f.end - f.offset - 8, f.end - f.offset, 2**31, 2**32 - 1]))
        dmg = Damage(seg, f.offset, "frame-length")
    elif c == 12 and frames:  # a frame from another segment (a misdirected write)
        other = rng.choice(base.frames)
        src = (case / other.segment).read_bytes()[other.offset:other.end] if other.segment != seg else bytes(data[other.offset:other.end])
        o = rng.choice([g.offset for g in frames] + [size])
        data[o:o] = src
        dmg = Damage(seg, o, "misplaced-frame")
    else:
        o = at()
        data[o:o] = data[o:o + rng.randrange(1, 40)]
        dmg = Damage(seg, o, "dup-bytes")
    path.write_bytes(bytes(data))
    return dmg


def _read_all(sp: Any) -> tuple[dict[int, bytes], list[str]]:
    """Every record an opened spool returns, by sequence number, and anything out of order."""
    got: dict[int, bytes] = {}
    issues: list[str] = []
    prev = -1
    for first in sorted(set(sp._frame_starts)):
        if first < prev:
            issues.append(f"frame index out of order at {first}")
        prev = first
        frame = sp.frame_at(first)
        if frame is None:
            continue
        for j, rec in enumerate(frame.records):
            got[frame.first_seq + j] = rec
    return got, issues


def _verify_open(directory: Path, base: BaseSpool, dmg: Damage, label: str) -> tuple[str, list[str]]:
    """Open the spool: the outcome, and the problems (none when it refused cleanly or opened with
    the right records)."""
    from firehose.spool import Spool, SpoolError

    sp = Spool(str(directory), fsync="never")
    try:
        state = sp.open()
    except SpoolError as exc:
        _abandon(sp)
        if label == "salvaged" and "written by a newer firehose" not in str(exc):
            # (A version field damaged into a newer version cannot be told from a newer spool.)
            return "SpoolError", [f"{label}: the salvaged spool does not open: SpoolError: {exc}"]
        if "seg-" not in str(exc):
            return "SpoolError", [f"{label}: SpoolError does not name the segment: {exc}"]
        return "SpoolError", []
    except Exception as exc:
        _abandon(sp)
        return "exception", [f"{label}: open raised {type(exc).__name__}: {exc}"]
    try:
        got, issues = _read_all(sp)
    except Exception as exc:
        _abandon(sp)
        return "opened", [f"{label}: reading after open raised {type(exc).__name__}: {exc}"]
    _abandon(sp)
    problems: list[str] = []
    # Forged frames in record data never come to life: no batch under a key the spool never
    # sealed, and no record still there marked finished that never was.
    problems += [f"{label}: a pending batch under a key never sealed: {b.key!r}"
                 for b in state.pending if not b.key.startswith("key-")][:1]
    finished = [seq for seq in got if seq in base.acked and seq not in base.committed and seq in sp.committed]
    if finished:
        problems.append(f"{label}: {len(finished)} records never committed are marked finished (first: seq {finished[0]})")
    for seq, rec in got.items():
        want = base.written.get(seq)
        if want is None:
            problems.append(f"{label}: record {seq} returned but never written: {rec[:60]!r}")
        elif rec != want:
            problems.append(f"{label}: record {seq} differs from what was written: {rec[:60]!r} != {want[:60]!r}")
        if len(problems) > 3:
            break
    # Acknowledged, uncommitted records in frames before the damage must still be there.
    lost = []
    for f in base.frames:
        if f.ftype != 1 or (f.segment == dmg.segment and f.end > dmg.offset):
            continue
        lost += [seq for seq in range(f.first_seq, f.first_seq + f.count)
                 if seq in base.acked and seq not in base.committed and seq not in got]
    if lost:
        problems.append(f"{label}: {len(lost)} acknowledged records before the damage are gone "
                        f"(first: seq {lost[0]}){'; ' + issues[0] if issues else ''}")
    return "opened", problems


def _newer(exc: Exception) -> bool:
    """Check and salvage refuse, touching nothing, a segment whose version is newer than theirs."""
    return type(exc).__name__ == "SpoolError" and "written by a newer firehose" in str(exc)


class Hang(Exception):
    pass


@dataclass
class FrameResult:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def violation(self, text: str) -> None:
        self.violation_count += 1
        self.kinds[violation_kind(text)] += 1
        if len(self.violations) < 2000:
            self.violations.append(text)


def run_frames(seed: int, cases: int, workdir: Path, *, bases: int = 24, max_seconds: float | None = None,
               keep_failures: bool = True, progress: Callable[[str], None] | None = None,
               first: int = 0) -> FrameResult:
    """Write ``bases`` spools, then damage copies of them: cases ``first`` to ``first + cases - 1``
    (see the module doc). A failing case's spool, before and after the damage, is kept under
    ``workdir/failed-frames``."""
    try:
        from firehose.spool_repair import check, salvage
    except ImportError:  # before check/salvage moved out of firehose.spool
        from firehose.spool_repair import check, salvage  # type: ignore[attr-defined,no-redef]

    root = workdir / "frames"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    result = FrameResult()
    t0 = time.monotonic()
    built = [build_base(root / f"base-{k}", seed, k) for k in range(bases)]
    on_main = threading.current_thread() is threading.main_thread()

    def alarm(_sig: int, _frm: Any) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm) if on_main else None
    last = time.monotonic()
    import logging

    import structlog

    saved_log_config = structlog.get_config()
    # The spool warns about every tail it truncates: thousands of lines here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        for i in range(first, first + cases):
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                break
            rng = Random(f"{seed}:frame:{i}")
            k = rng.randrange(len(built))
            base = built[k]
            case, salv = root / f"case-{i}", root / f"salv-{i}"
            shutil.copytree(base.path, case)
            dmg = _damage(case, base, rng)
            result.mutations[dmg.what.split("-type")[0]] += 1
            where = f"frame case {i} (seed {seed}, base {k}): {dmg.what} at {dmg.segment}+{dmg.offset}"
            problems: list[str] = []
            if on_main:
                signal.setitimer(signal.ITIMER_REAL, HANG_SECS)
            try:
                try:
                    reports = check(str(case))
                    result.outcomes["check: damage found" if any(not r.clean for r in reports) else "check: clean"] += 1
                except Exception as exc:
                    if _newer(exc):
                        result.outcomes["check: a newer version refused"] += 1
                    else:
                        problems.append(f"check raised {type(exc).__name__}: {exc}")
                shutil.copytree(case, salv)
                try:
                    salvage(str(salv), aside=str(root / f"aside-{i}"))
                except Exception as exc:
                    if _newer(exc):  # (a version field damaged into a newer one reads the same)
                        result.outcomes["salvage: a newer version refused"] += 1
                    else:
                        problems.append(f"salvage raised {type(exc).__name__}: {exc}")
                else:
                    outcome, found = _verify_open(salv, base, dmg, "salvaged")
                    result.outcomes[f"salvaged: {outcome}"] += 1
                    problems += found
                outcome, found = _verify_open(case, base, dmg, "damaged")
                result.outcomes[f"open: {outcome}"] += 1
                problems += found
            except Hang:
                problems.append(f"no result within {HANG_SECS:.0f} s (hang)")
            finally:
                if on_main:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            result.cases += 1
            if problems:
                for p in problems:
                    result.violation(f"{where}: {p}")
                if keep_failures:
                    kept = workdir / "failed-frames" / f"case-{i}"
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(base.path, kept / "original")
                    shutil.copytree(base.path, kept / "damaged")
                    again = Random(f"{seed}:frame:{i}")
                    again.randrange(len(built))
                    _damage(kept / "damaged", base, again)
            shutil.rmtree(case, ignore_errors=True)
            shutil.rmtree(salv, ignore_errors=True)
            shutil.rmtree(root / f"aside-{i}", ignore_errors=True)
            if progress and time.monotonic() - last > 10:
                last = time.monotonic()
                progress(f"  frames: {result.cases} cases, {result.violation_count} violations")
    finally:
        structlog.configure(**saved_log_config)
        if old is not None:
            signal.signal(signal.SIGALRM, old)
    result.seconds = time.monotonic() - t0
    return result


# ====================================================================== summary and CLI
def summarize(api: list[ApiResult], frames: FrameResult | None, total_secs: float, out: Callable[[str], None] = print,
              show: int = 6) -> int:
    """Print the one-screen summary; returns the number of violations."""
    violations = 0
    for r in api:
        st = r.stats
        rate = r.requests / r.seconds if r.seconds else 0.0
        out(f"[{r.run}] {r.requests} requests in {r.seconds:.1f} s ({rate:.0f}/s); {st.violation_count} violations")
        top = sorted(st.statuses.items(), key=lambda kv: -kv[1])
        out("  status/error: " + ", ".join(f"{k} {v}" for k, v in top[:14]) + (" ..." if len(top) > 14 else ""))
        out("  unanswered:   " + (", ".join(f"{k} {v}" for k, v in sorted(st.outcomes.items()) if k != "answered") or "none"))
        out(f"  delivery:     {r.delivery}")
        for kind, n in st.kinds.most_common(6):
            out(f"  violation x{n}: {kind}")
        if r.log_noise:
            out(f"  log noise:    {sum(r.log_noise.values())} aiohttp 'Error handling request' tracebacks for malformed HTTP")
        violations += st.violation_count
    if frames is not None:
        rate = frames.cases / frames.seconds if frames.seconds else 0.0
        out(f"[frames] {frames.cases} damaged spools in {frames.seconds:.1f} s ({rate:.0f}/s); "
            f"{frames.violation_count} violations")
        out("  outcomes:  " + ", ".join(f"{k} {v}" for k, v in sorted(frames.outcomes.items())))
        out("  mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(frames.mutations.items())))
        for kind, n in frames.kinds.most_common(8):
            out(f"  violation x{n}: {kind}")
        violations += frames.violation_count
    total = sum(r.requests for r in api) + (frames.cases if frames else 0)
    out(f"TOTAL {total} inputs ({sum(r.requests for r in api)} requests + {frames.cases if frames else 0} frame cases) "
        f"in {total_secs:.1f} s: {'OK, no violation' if not violations else f'{violations} VIOLATIONS'}")
    shown = 0
    for label, items in [*((r.run, r.stats.violations) for r in api), ("frames", frames.violations if frames else [])]:
        for v in items[: max(0, show - shown)]:
            out(f"  ! [{label}] {v}")
            shown += 1
    return violations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="API requests in all (split with --auth)")
    ap.add_argument("--frames", type=int, default=2000, help="damaged spools to open, check and salvage")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--auth", action="store_true", help="also run a SigV4 daemon (gets --auth-share of the requests)")
    ap.add_argument("--auth-share", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=8, help="client threads")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop each part after this long")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--show", type=int, default=6, help="violations to print")
    ap.add_argument("--replay", metavar="RUN:INDEX",
                    help="print request INDEX of RUN (api or auth), or with --send run just that input "
                         "(RUN frames: damaged spool INDEX, kept under --workdir) and exit")
    ap.add_argument("--send", action="store_true", help="with --replay: send the request to a fresh daemon")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="firehose-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.replay:
        run, _, idx = args.replay.partition(":")
        if run == "frames":
            fr = run_frames(args.seed, 1, workdir, first=int(idx))
            summarize([], fr, fr.seconds, show=20)
            print(f"spool before/after the damage: {workdir / 'failed-frames'}")
            return 1 if fr.violation_count else 0
        if not args.send:
            req = Generator(args.seed, run, 4573, auth=run == "auth").make(int(idx))
            print(req.describe())
            print(f"full wire ({len(req.wire)} bytes): {req.wire[:4000]!r}")
            return 0
        res = run_api(args.seed, 1, workdir, auth=run == "auth", first=int(idx), workers=1)
        summarize([res], None, res.seconds, show=20)
        print(f"daemon log: {workdir / run / 'daemon.log'}")
        return 1 if res.stats.violation_count else 0
    t0 = time.monotonic()
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    plain = args.requests - (int(args.requests * args.auth_share) if args.auth else 0)
    try:
        if plain:
            results.append(run_api(args.seed, plain, workdir, workers=args.workers, max_seconds=args.max_seconds, progress=say))
        if args.auth and args.requests - plain:
            results.append(run_api(args.seed, args.requests - plain, workdir, auth=True, workers=args.workers,
                                   max_seconds=args.max_seconds, progress=say))
        frames = run_frames(args.seed, args.frames, workdir, max_seconds=args.max_seconds, progress=say) if args.frames else None
        violations = summarize(results, frames, time.monotonic() - t0, show=args.show)
        with open(workdir / "violations.txt", "w") as f:
            for r in results:
                f.writelines(f"[{r.run}] {v}\n" for v in r.stats.violations)
            f.writelines(f"[frames] {v}\n" for v in (frames.violations if frames else []))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.keep or args.workdir:
        print(f"scratch directory: {workdir}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
